"""`sloserve bench`: load-test any OpenAI-compatible server (options read like `vllm bench serve`)."""
from __future__ import annotations

import math
from typing import Optional

import typer

from sloserve.cli_args import parse_percentiles

# Everything else is imported inside the commands: `sloserve` imports this
# module for every subcommand, and matplotlib, httpx and numpy cost ~1 s.

app = typer.Typer(help="Benchmark an OpenAI-compatible server; `bench report RESULTS.json` re-renders a run.",
                  add_completion=False)
O = typer.Option


@app.callback(invoke_without_command=True)
def bench(
    ctx: typer.Context,
    base_url: str = O("http://127.0.0.1:8000", help="Server URL (without /v1)."),
    host: Optional[str] = O(None, help="vLLM's spelling: server host (with --port, instead of --base-url)."),
    port: Optional[int] = O(None, help="vLLM's spelling: server port (default 8000 with --host)."),
    endpoint: str = O("/v1/completions", help="/v1/completions or /v1/chat/completions."),
    model: Optional[str] = O(None, help="Model name; default: the first one /v1/models lists."),
    api_key: Optional[str] = O(None, envvar="OPENAI_API_KEY", help="Bearer token (never saved)."),
    dataset_name: str = O("random", help="random | sharegpt | trace | multiturn (each turn resends the conversation so far)."),
    dataset_path: Optional[str] = O(None, help="ShareGPT JSON or JSONL trace; default: the bundled sample."),
    num_prompts: Optional[int] = O(None, help="Requests to send (default: 1000; a whole trace; or as many as --duration takes)."),
    request_rate: float = O(math.inf, help="Requests per second; inf sends all at once."),
    burstiness: float = O(1.0, help="Gamma shape of the gaps: 1 is Poisson, < 1 burstier."),
    arrival: str = O("auto", help="auto | burst | synchronous | constant | poisson | gamma | trace. "
                     "auto: trace for a trace at rate inf, burst at rate inf, else poisson/gamma."),
    max_concurrency: Optional[int] = O(None, help="Cap on requests in flight (fixed concurrency with rate inf)."),
    random_input_len: int = O(1024), random_output_len: int = O(128),
    random_range_ratio: float = O(0.0, help="Spread: uniform half-width / mean, or std / mean for normal/lognormal."),
    random_dist: str = O("uniform", help="fixed | uniform | normal | lognormal (input and output lengths)."),
    random_input_min: int = O(1), random_input_max: Optional[int] = O(None),
    random_output_min: int = O(1), random_output_max: Optional[int] = O(None),
    random_prefix_len: int = O(0, help="Tokens of prefix shared by every prompt."),
    random_vocab_size: Optional[int] = O(None, help="Token ids are drawn below this (default: the tokenizer's, or 32000)."),
    random_prompt_format: str = O("auto", help="ids | words | auto (words for chat without a tokenizer)."),
    sharegpt_output_len: Optional[int] = O(None, help="Fixed max_tokens instead of the reply's length (sharegpt, multiturn)."),
    multiturn_turns: int = O(4, help="Exchanges per conversation in the multiturn dataset."),
    tokenizer: Optional[str] = O(None, help="Local tokenizer directory for exact token counts."),
    tokenize_prompt: bool = O(False, "--tokenize-prompt", help="Send text prompts as --tokenizer's token ids "
                              "(SGLang bench's flag; completions only): every server computes the same tokens."),
    seed: int = O(0),
    num_warmups: int = O(0, help="Warm-up requests sent first and excluded from results."),
    duration: Optional[float] = O(None, help="Stop sending new requests after this many seconds."),
    slo: Optional[str] = O(None, "--slo", "--goodput", help="e.g. ttft=200ms,tpot=50ms,e2e=2s; vLLM's --goodput "
                           "form works quoted: --goodput 'ttft:200 tpot:50' (milliseconds)."),
    sweep: bool = O(False, help="Find the max rate whose SLO attainment >= --attainment (needs --slo)."),
    attainment: float = O(0.9, help="Target SLO attainment for --sweep."),
    sweep_start_rate: Optional[float] = O(None, help="First rate probed (default: --request-rate if finite, else 1)."),
    sweep_max_rate: float = O(1024.0), sweep_max_probes: int = O(10), sweep_tolerance: float = O(0.05),
    sweep_same_prompts: bool = O(False, help="Resend the same prompts at every probe (default: fresh ones, so a "
                                 "server's prompt cache cannot answer later probes)."),
    percentiles: str = O("50,90,95,99", "--percentiles", "--metric-percentiles"),
    percentile_metrics: str = O("ttft,tpot,itl,e2el", help="Latencies shown with percentiles (vLLM's names: "
                                "ttft, tpot, itl, e2el); all are always saved."),
    metadata: Optional[list[str]] = O(None, help="KEY=VALUE recorded in the results (repeatable, as vLLM's)."),
    result_filename: str = O("results.json", help="Name of the results JSON inside --result-dir."),
    save_result: bool = O(True, "--save-result", help="vLLM's flag; results are always saved here."),
    save_detailed: bool = O(True, "--save-detailed", help="vLLM's flag; per-request records are always saved here."),
    disable_tqdm: bool = O(False, "--disable-tqdm", help="No progress bar."),
    result_dir: Optional[str] = O(None, help="Output folder (default: bench-results/<time>)."),
    no_plots: bool = O(False, "--no-plots", help="Skip the PNG plots."),
    ignore_eos: bool = O(False, help="Send ignore_eos=true (vLLM/sloserve extension)."),
    continuous_usage_stats: bool = O(False, help="Ask for usage in every chunk (vLLM/sloserve extension): "
                                     "exact tokens per chunk when a chunk carries several."),
    temperature: float = O(0.0),
    extra_body: Optional[str] = O(None, help="JSON merged into every request body."),
    timeout: float = O(600.0, help="Seconds a whole request may take."),
    label: str = O("", help="Name of this run in tables and plots."),
) -> None:
    if ctx.invoked_subcommand is not None:
        return
    import asyncio
    import json
    import sys
    import time

    import httpx

    from rich.console import Console

    from sloserve.bench.client import ClientConfig, fetch_first_model
    from sloserve.bench.results import BenchResults, capture_environment
    from sloserve.bench.server_counters import (prefix_cache_counters, prefix_cache_delta, spec_decode_counters,
                                                  spec_decode_delta)
    from sloserve.bench.session import default_result_dir, run_once, run_sweep, write_outputs
    from sloserve.bench.slo import SLO
    from sloserve.bench.sweep import SweepConfig
    from sloserve.bench.tokens import HFTokenizer
    from sloserve.bench.workload import WorkloadOptions

    console = Console()
    try:
        if host is not None or port is not None:
            base_url = f"http://{host or '127.0.0.1'}:{port or 8000}"
        tok = HFTokenizer(tokenizer) if tokenizer else None
        pcts = parse_percentiles(percentiles)
        shown = _percentile_metrics(percentile_metrics)
        meta = _metadata(metadata or [])
        slo_obj = SLO.parse(slo) if slo else None
        chat = endpoint.rstrip("/").endswith("chat/completions")
        fmt = random_prompt_format if random_prompt_format != "auto" else ("words" if chat and tok is None else "ids")
        if chat and fmt == "ids" and tok is None:
            raise ValueError("chat endpoints take text: use --random-prompt-format words or --tokenizer")
        if tokenize_prompt and (tok is None or chat):
            raise ValueError("--tokenize-prompt needs --tokenizer and the completions endpoint (chat takes messages)")
        vocab = random_vocab_size or (tok.vocab_size if tok else 32000)
        workload = WorkloadOptions(
            dataset_name, dataset_path, num_prompts, request_rate, burstiness, arrival, max_concurrency,
            random_input_len, random_output_len, random_range_ratio, random_dist, random_input_min, random_input_max,
            random_output_min, random_output_max, random_prefix_len, vocab, fmt, sharegpt_output_len, seed, duration,
            multiturn_turns, tokenize_prompt,
        ).build()
        sweep_cfg = None
        if sweep:
            if slo_obj is None:
                raise ValueError("--sweep needs --slo")
            start = sweep_start_rate or (request_rate if math.isfinite(request_rate) else 1.0)
            sweep_cfg = SweepConfig(attainment, start, min(0.01, start), max(sweep_max_rate, start),
                                    sweep_max_probes, sweep_tolerance)
        if not (0 < timeout < math.inf):
            raise ValueError("--timeout must be a positive number of seconds")
        cfg = ClientConfig(base_url, endpoint, model or "", api_key, timeout, temperature, ignore_eos,
                           continuous_usage_stats, json.loads(extra_body) if extra_body else {})
    except (ValueError, OSError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2)
    if not cfg.model:
        try:
            cfg.model = asyncio.run(fetch_first_model(base_url, api_key))
        except (httpx.ConnectError, httpx.TimeoutException) as e:
            console.print(f"[red]error:[/red] no server answers at {base_url} ({e}); is it running?")
            raise typer.Exit(2)
        except Exception as e:  # noqa: BLE001 - it answered, but not with a model list
            console.print(f"[red]error:[/red] could not list models at {base_url} ({e}); pass --model")
            raise typer.Exit(2)
    created = time.time()
    counters_before = prefix_cache_counters(base_url, api_key)
    spec_before = spec_decode_counters(base_url, api_key)
    try:
        if sweep_cfg is not None:
            runs, sweep_info = run_sweep(workload, cfg, sweep_cfg, slo_obj, num_warmups, tok, console,
                                         progress_bar=not disable_tqdm, same_prompts=sweep_same_prompts)
        else:
            runs, sweep_info = [run_once(workload, cfg, num_warmups, tok, console, label, not disable_tqdm)], None
    except (ValueError, OSError) as e:  # the dataset could not be read or used; requests never raise
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2)
    config = {"workload": workload.to_dict(), "client": cfg.to_dict(), "slo": slo_obj.to_dict() if slo_obj else None,
              "percentiles": list(pcts), "num_warmups": num_warmups, "tokenizer": tokenizer,
              "sweep": sweep_info["config"] if sweep_info else None, "command": _redacted(sys.argv),
              "percentile_metrics": shown, "metadata": meta,
              "server_prefix_cache": prefix_cache_delta(counters_before, prefix_cache_counters(base_url, api_key)),
              "server_spec_decode": spec_decode_delta(spec_before, spec_decode_counters(base_url, api_key))}
    results = BenchResults(config, capture_environment(), runs, sweep_info, "client", created)
    write_outputs(results, result_dir or default_result_dir(), console, plots=not no_plots, json_name=result_filename)
    cache = config["server_prefix_cache"]
    if cache and cache["hit_rate"] is not None:  # warm-ups included: the server's counters cannot tell them apart
        console.print(f"Prefix cache hit rate (server /metrics, warm-ups included): {cache['hit_rate']:.1%} "
                      f"of {cache['queries']:.0f} prompt tokens")
    if not any(r.success for run in runs for r in run.records):
        console.print("[red]no request succeeded[/red]")
        raise typer.Exit(1)


@app.command()
def report(
    results_json: str = typer.Argument(..., help="A results.json written by `sloserve bench` or the simulator."),
    out_dir: Optional[str] = O(None, help="Where to write the CSV and plots (default: next to the JSON)."),
    percentiles: Optional[str] = O(None, help="Override the saved percentiles."),
    slo: Optional[str] = O(None, help="Override the saved SLO."),
    no_plots: bool = O(False, "--no-plots", help="Skip the PNG plots."),
    detail: bool = O(False, "--detail", help="Full tables for every run of a sweep."),
) -> None:
    """Re-render tables, CSV and plots from a saved results file."""
    import os

    from rich.console import Console

    from sloserve.bench.results import BenchResults
    from sloserve.bench.session import write_outputs
    from sloserve.bench.slo import SLO

    console = Console()
    try:
        results = BenchResults.load(results_json)
        pcts = parse_percentiles(percentiles) if percentiles else None
        slo_obj = SLO.parse(slo) if slo else None
    except (ValueError, OSError, KeyError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2)
    out = out_dir or os.path.dirname(os.path.abspath(results_json))
    write_outputs(results, out, console, plots=not no_plots, percentiles=pcts, slo=slo_obj, save_json=False,
                  detail=detail or None)


def _redacted(argv: list[str]) -> list[str]:
    """The command line as run, without the API key (results files get shared)."""
    out, hide = [], False
    for arg in argv:
        out.append("***" if hide else ("--api-key=***" if arg.startswith("--api-key=") else arg))
        hide = arg == "--api-key"
    return out


def _percentile_metrics(text: str) -> list[str]:
    names = {"ttft": "ttft", "tpot": "tpot", "itl": "itl", "e2el": "e2e", "e2e": "e2e"}
    out = []
    for part in filter(None, text.replace(" ", "").split(",")):
        if part not in names:
            raise ValueError(f"--percentile-metrics takes ttft, tpot, itl, e2el; got {part!r}")
        out.append(names[part])
    return out


def _metadata(items: list[str]) -> dict[str, str]:
    out = {}
    for item in (term for text in items for term in text.split()):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--metadata takes KEY=VALUE, got {item!r}")
        out[key] = value
    return out
