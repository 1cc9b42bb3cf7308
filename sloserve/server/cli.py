"""`sloserve serve`: load a model, build the OpenAI-compatible app, run it under uvicorn until signalled."""
from __future__ import annotations

import socket
from pathlib import Path

import typer

from sloserve import cli_args
from sloserve.cli_args import (SPECULATIVE_CONFIG_HELP, default_model_dir, parse_bytes, parse_slo_classes,
                               parse_speculative_config)

def read_chat_template(value: str) -> str:
    """vLLM's --chat-template: a file's path, or the Jinja template itself."""
    path = Path(value).expanduser()
    if path.is_file():
        return path.read_text()
    if "{" not in value:  # neither a file nor a template: most likely a mistyped path
        raise typer.BadParameter(f"{value} is neither a file nor a Jinja template", param_hint="--chat-template")
    return value


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not the default 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP, and
    # without it a keep-alive client waits ~40 ms per response (Nagle holds the body for the headers' ACK).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise typer.BadParameter(f"cannot listen on {host}:{port}: {error.strerror} (is another server running?)",
                                 param_hint="--port") from None
    return sock


def serve(
    model: str | None = typer.Argument(None, help="model directory or Hugging Face hub id (default: the bundled demo model)"),
    tokenizer: str | None = typer.Option(None, help="tokenizer directory or hub id (default: the model's)"),
    revision: str | None = typer.Option(None, help="hub revision (branch, tag or commit) of a hub id"),
    download_dir: str | None = typer.Option(None, help="Hugging Face cache directory (default: HF's)"),
    trust_remote_code: bool = typer.Option(False, help="accepted for vLLM's habits; a model that needs its own "
                                           "Python code is refused all the same (sloserve never runs it)"),
    skip_tokenizer_init: bool = typer.Option(False, help="serve without a tokenizer: prompts as token ids, "
                                             "outputs streamed as token ids"),
    chat_template: str | None = typer.Option(None, help="chat template: a Jinja file or the template itself"),
    load_format: str = typer.Option("auto", help="auto | safetensors | dummy (random weights)"),
    dtype: str = typer.Option("auto", help="auto | float32 | bfloat16 | float16"),
    quantization: str | None = typer.Option(None, help="int8: weight-only int8 with per-output-channel scales"),
    host: str = typer.Option("127.0.0.1"),
    port: int = typer.Option(8000),
    max_num_batched_tokens: int = typer.Option(512, help="token budget of one step"),
    device: str = cli_args.DEVICE,
    gpu_memory_utilization: float = cli_args.GPU_MEMORY_UTILIZATION,
    enforce_eager: bool = cli_args.ENFORCE_EAGER,
    kv_cache_memory: str | None = cli_args.KV_CACHE_MEMORY,
    num_kv_blocks: int | None = typer.Option(None, help="KV-cache blocks (overrides --kv-cache-memory)"),
    max_num_seqs: int = typer.Option(64),
    max_model_len: int | None = typer.Option(None, help="default: the model's max_position_embeddings"),
    block_size: int = typer.Option(16),
    seed: int = typer.Option(0),
    policy: str = typer.Option("fcfs", "--scheduling-policy", "--policy",
                               help="fcfs | priority (preempts lower priority) | slo (least slack, TPOT-sized prefill)"),
    slo_class: list[str] | None = typer.Option(None, help="a named SLO class, e.g. interactive=ttft:200ms,tpot:50ms (repeatable)"),
    default_slo_class: str | None = typer.Option(None, help="the class of requests that name none and give no slo"),
    admission: str = typer.Option("queue", help="none | queue (the waiting caps) | slo (the caps, and 429 for requests predicted to miss their TTFT)"),
    profile: str | None = typer.Option(None, help="a profile.json (`sloserve profile`) to start the step-time predictor from"),
    profile_out: str | None = typer.Option(None, help="on shutdown, save the online-calibrated step-time model here (for `sloserve simulate`)"),
    enable_prefix_caching: bool = cli_args.ENABLE_PREFIX_CACHING,
    speculative_config: str | None = typer.Option(None, help=SPECULATIVE_CONFIG_HELP),
    kernels: bool = typer.Option(True, help="sloserve's C++ CPU kernels (built on first use); --no-kernels: plain PyTorch ops"),
    served_model_name: list[str] | None = typer.Option(None, help="name(s) clients use (default: the directory's name)"),
    max_waiting_requests: int = typer.Option(256, help="waiting requests beyond which new ones get 429"),
    max_waiting_tokens: int = typer.Option(131072, help="waiting prompt tokens beyond which new requests get 429"),
    max_tokens_cap: int | None = typer.Option(None, help="largest max_tokens a request may ask for (default: min(4096, max model length))"),
    max_body_size: str = typer.Option("4MiB", help="largest request body; larger ones get 413"),
    shutdown_grace_period: float = typer.Option(30.0, help="seconds in-flight requests get to finish after SIGTERM"),
    metrics_compat: str = typer.Option("none", help="none | vllm (/metrics also exports vLLM's series as vllm:*)"),
    api_key: list[str] | None = typer.Option(
        None, envvar="SLOSERVE_API_KEY",
        help="key(s) clients must send as `Authorization: Bearer <key>` on every route but /health, /ping, /metrics"),
    allowed_origins: list[str] | None = typer.Option(None, help="origins whose web pages may call the API (CORS); default none"),
    limit_concurrency: int | None = typer.Option(None, help="most connections and tasks at once; more get 503 (uvicorn's)"),
    timeout_keep_alive: int = typer.Option(5, help="seconds an idle keep-alive connection stays open"),
    header_timeout: float = typer.Option(10.0, help="seconds a request's headers may take to arrive"),
    body_timeout: float = typer.Option(30.0, help="seconds a request's body may take to arrive (408 after)"),
    ssl_keyfile: str | None = typer.Option(None, help="TLS private key (serve https)"),
    ssl_certfile: str | None = typer.Option(None, help="TLS certificate (serve https)"),
    max_output_tokens_per_key: int | None = typer.Option(
        None, help="most output tokens (sum of max_tokens) one API key may have in flight; more get 429"),
    log_level: str = typer.Option("info"),
) -> None:
    """Serve a model behind an OpenAI-compatible API (completions, chat, /metrics)."""
    import logging

    import uvicorn

    from sloserve.config import EngineConfig
    from sloserve.engine.policy import POLICIES
    from sloserve.llm import build_engine
    from sloserve.model.resolve import has_tokenizer, resolve_model_dir
    from sloserve.server.admission import AdmissionLimits
    from sloserve.server.app import build_app
    from sloserve.server.graceful import GracefulServer
    from sloserve.server.guard import GuardSettings, loopback_hosts
    from sloserve.server.http_timeouts import protocol_with_header_timeout
    from sloserve.server.settings import ServerSettings
    from sloserve.sim.profile import Profile

    if policy not in POLICIES:
        raise typer.BadParameter(f"unknown policy {policy!r}; choose from {', '.join(POLICIES)}",
                                 param_hint="--scheduling-policy")
    try:
        model_dir = resolve_model_dir(model or str(default_model_dir()), revision, download_dir)
    except FileNotFoundError as error:
        hint = "" if model else " (the bundled demo model is not installed yet: pass a model directory)"
        raise typer.BadParameter(f"{error}{hint}", param_hint="MODEL") from None
    if not skip_tokenizer_init and tokenizer is None and not has_tokenizer(model_dir):
        raise typer.BadParameter(f"{model_dir} has no tokenizer: pass --tokenizer, or --skip-tokenizer-init to serve "
                                 "token ids only", param_hint="MODEL")
    template = read_chat_template(chat_template) if chat_template else None
    if (ssl_keyfile is None) != (ssl_certfile is None):
        raise typer.BadParameter("--ssl-keyfile and --ssl-certfile go together", param_hint="--ssl-certfile")
    if header_timeout <= 0 or timeout_keep_alive < 1 or (limit_concurrency is not None and limit_concurrency < 1):
        raise typer.BadParameter("timeouts and --limit-concurrency must be positive")
    try:
        config = EngineConfig(
            model=str(model_dir), tokenizer=tokenizer, revision=revision, download_dir=download_dir,
            skip_tokenizer_init=skip_tokenizer_init, load_format=load_format, dtype=dtype, seed=seed, block_size=block_size,
            num_kv_blocks=num_kv_blocks, max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
            max_model_len=max_model_len, use_kernels=kernels, policy=policy, quantization=quantization,
            speculative_config=parse_speculative_config(speculative_config),
            **cli_args.device_knobs(device, gpu_memory_utilization, enforce_eager, kv_cache_memory),
            enable_prefix_caching=enable_prefix_caching,
        )
        settings = ServerSettings(
            # vLLM's default: the model as given (a hub id stays "org/name"); a directory by its name.
            served_model_names=list(served_model_name or [model if model and not Path(model).is_dir() else model_dir.name]),
            max_body_bytes=parse_bytes(max_body_size),
            max_tokens_cap=max_tokens_cap,
            admission=AdmissionLimits(max_waiting_requests=max_waiting_requests, max_waiting_tokens=max_waiting_tokens,
                                      mode=admission),
            shutdown_grace_s=shutdown_grace_period,
            guard=GuardSettings(api_keys=tuple(k for k in api_key or () if k), allowed_hosts=loopback_hosts(host)),
            allowed_origins=list(allowed_origins or []),
            body_timeout_s=body_timeout,
            max_output_tokens_per_key=max_output_tokens_per_key,
            slo_classes=parse_slo_classes(slo_class, default_slo_class),
            metrics_compat=metrics_compat,
        )
        step_model = Profile.load(profile).step_model if profile else None
    except (ValueError, OSError, KeyError) as error:
        raise typer.BadParameter(str(error)) from None
    # uvicorn configures only its own loggers; sloserve's (drain, step failures) go to the same stream.
    level = logging.getLevelNamesMapping().get(log_level.upper(), logging.DEBUG)  # uvicorn's "trace": debug
    logging.basicConfig(level=level, format="%(levelname)s:     %(name)s: %(message)s")
    # Bind before loading: a busy port fails now, not after minutes of loading the model.
    sock = bind_socket(host, port)
    try:
        engine = build_engine(config, step_model)
    except (ValueError, FileNotFoundError) as error:
        sock.close()
        raise typer.BadParameter(str(error)) from None
    if template is not None:
        if engine.tokenizer is None:
            raise typer.BadParameter("--chat-template needs a tokenizer", param_hint="--chat-template")
        engine.tokenizer.chat_template = template
    app = build_app(engine, settings)
    uv_config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, lifespan="on", timeout_graceful_shutdown=10,
        http=protocol_with_header_timeout(header_timeout), timeout_keep_alive=timeout_keep_alive,
        limit_concurrency=limit_concurrency, ssl_keyfile=ssl_keyfile, ssl_certfile=ssl_certfile,
    )
    scheme = "https" if ssl_certfile else "http"
    typer.echo(f"sloserve: serving {settings.served_model_names[0]} ({engine.block_manager.num_blocks} KV blocks, "
               f"max model len {engine.max_model_len}) on {scheme}://{host}:{port}"
               + ("" if settings.guard.api_keys else " (no --api-key: anyone who can reach it may use it)"))
    GracefulServer(uv_config, drain=app.state.server.drain).run(sockets=[sock])
    if profile_out:
        from sloserve.sim.served_profile import served_profile

        try:
            served_profile(config, engine).save(profile_out)
            typer.echo(f"sloserve: saved the calibrated step-time model to {profile_out}")
        except ValueError as error:
            typer.echo(f"sloserve: no profile saved: {error}", err=True)
