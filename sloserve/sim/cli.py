"""`sloserve profile` (time the real executor, fit a step-time model) and `sloserve simulate` (predict a run)."""
from __future__ import annotations

import math
from typing import Optional

import typer

from sloserve import cli_args

# Heavy imports (torch, numpy, rich) happen inside the commands: `sloserve` imports this for every subcommand.
O = typer.Option


def profile(
    model: Optional[str] = typer.Argument(None, help="Hugging Face model directory (default: the bundled demo model)."),
    load_format: str = O("auto", help="auto | safetensors | dummy (random weights)."),
    dtype: str = O("auto", help="auto | float32 | bfloat16 | float16."),
    max_num_batched_tokens: int = O(512, help="Token budget of one step (the grid's largest chunk)."),
    max_num_seqs: int = O(64),
    device: str = cli_args.DEVICE,
    gpu_memory_utilization: float = cli_args.GPU_MEMORY_UTILIZATION,
    enforce_eager: bool = cli_args.ENFORCE_EAGER,
    kv_cache_memory: Optional[str] = cli_args.KV_CACHE_MEMORY,
    num_kv_blocks: Optional[int] = O(None, help="KV-cache blocks (overrides --kv-cache-memory)."),
    max_model_len: Optional[int] = O(None, help="Default: the model's max_position_embeddings."),
    block_size: int = O(16),
    seed: int = O(0),
    quick: bool = O(False, "--quick", help="A small grid (tests, smoke runs)."),
    repeats: int = O(3, help="Timed repetitions per shape; the median is kept."),
    warmups: int = O(1, help="Untimed rounds over the grid first."),
    engine_requests: Optional[int] = O(None, help="Requests of the real engine run (default 32; 8 with --quick)."),
    output: str = O("profile.json", "--output", "-o"),
    speculative_config: Optional[str] = O(None, help=cli_args.SPECULATIVE_CONFIG_HELP + "; the profile then holds "
                                          "the draft's step time and the acceptance measured in its engine run"),
) -> None:
    """Time the real executor over a grid of step shapes and a real engine run; fit and save a step-time model."""
    from pathlib import Path

    from rich.console import Console

    from sloserve.config import EngineConfig
    from sloserve.cli_args import default_model_dir
    from sloserve.sim.profiler import ProfileSettings, profile_model

    console = Console()
    model_dir = Path(model) if model else default_model_dir()
    if not (model_dir / "config.json").is_file():
        raise typer.BadParameter(f"{model_dir} is not a Hugging Face model directory", param_hint="MODEL")
    try:
        config = EngineConfig(
            model=str(model_dir), load_format=load_format, dtype=dtype, seed=seed, block_size=block_size,
            num_kv_blocks=num_kv_blocks, max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
            max_model_len=max_model_len, speculative_config=cli_args.parse_speculative_config(speculative_config),
            **cli_args.device_knobs(device, gpu_memory_utilization, enforce_eager, kv_cache_memory),
        )
        settings = ProfileSettings(quick=quick, repeats=repeats, warmups=warmups, seed=seed,
                                   engine_requests=engine_requests or (8 if quick else 32))
        if repeats < 1 or warmups < 0 or settings.engine_requests < 1:
            raise ValueError("--repeats and --engine-requests must be >= 1, --warmups >= 0")
        result = profile_model(config, settings, log=lambda m: console.print(f"[dim]{m}[/dim]"))
    except (ValueError, FileNotFoundError) as error:
        raise typer.BadParameter(str(error)) from None
    result.save(output)
    _print_fit(console, result)
    if result.speculative:
        _print_speculation(console, result.speculative)
    load, spread = result.machine.get("load_average"), result.settings["repeat_spread_median"]
    console.print(f"  repeats of a shape differ by {spread:.1%} (median); load average before "
                  f"{load[0] if load else float('nan'):.2f} (machine has {result.machine['cores']} cores)")
    console.print(f"Wrote {output}")


def simulate(
    profile: str = O(..., "--profile", help="A profile.json from `sloserve profile`."),
    dataset_name: str = O("random", help="random | sharegpt | trace | multiturn."),
    dataset_path: Optional[str] = O(None, help="ShareGPT JSON or JSONL trace; default: the bundled sample."),
    num_prompts: Optional[int] = O(None, help="Requests (default: 1000; a whole trace; or as many as --duration takes)."),
    request_rate: float = O(math.inf, help="Requests per second; inf sends all at once."),
    burstiness: float = O(1.0, help="Gamma shape of the gaps: 1 is Poisson, < 1 burstier."),
    arrival: str = O("auto", help="auto | burst | synchronous | constant | poisson | gamma | trace (as `bench`)."),
    max_concurrency: Optional[int] = O(None, help="Cap on requests in flight."),
    random_input_len: int = O(1024), random_output_len: int = O(128),
    random_range_ratio: float = O(0.0, help="Spread: uniform half-width / mean, or std / mean for normal/lognormal."),
    random_dist: str = O("uniform", help="fixed | uniform | normal | lognormal."),
    random_input_min: int = O(1), random_input_max: Optional[int] = O(None),
    random_output_min: int = O(1), random_output_max: Optional[int] = O(None),
    random_prefix_len: int = O(0, help="Tokens of prefix shared by every prompt."),
    random_vocab_size: Optional[int] = O(None, help="Token ids are drawn below this (default: the profile's vocab)."),
    sharegpt_output_len: Optional[int] = O(None, help="Fixed max_tokens instead of the reply's length."),
    multiturn_turns: int = O(4, help="Exchanges per conversation in the multiturn dataset."),
    tokenizer: Optional[str] = O(None, help="Local tokenizer directory for exact prompt lengths of text datasets."),
    seed: int = O(0),
    duration: Optional[float] = O(None, help="Stop sending new requests after this many (simulated) seconds."),
    max_num_batched_tokens: Optional[int] = O(None, help="Token budget of one step (default: the profile's)."),
    max_num_seqs: Optional[int] = O(None, help="Default: the profile's."),
    num_kv_blocks: Optional[int] = O(None, help="KV-cache blocks (default: the profile's)."),
    kv_cache_memory: Optional[str] = O(None, help="KV-cache memory, e.g. 2GiB (blocks from the profile's bytes per block)."),
    max_model_len: Optional[int] = O(None, help="Default: the profile's."),
    policy: str = O("fcfs", help="fcfs | priority | slo."),
    enable_prefix_caching: bool = cli_args.ENABLE_PREFIX_CACHING,
    slo_class: Optional[list[str]] = O(None, help="A named SLO class, e.g. interactive=ttft:200ms,tpot:50ms (repeatable)."),
    default_slo_class: Optional[str] = O(None, help="The class every simulated request carries (the slo policy and "
                                         "admission act on it)."),
    admission: str = O("none", help="none | slo: refuse (as a 429) requests predicted to miss their TTFT, as serve does."),
    slo: Optional[str] = O(None, help="The SLO results are judged by, e.g. ttft=200ms,tpot=50ms,e2e=2s."),
    percentiles: str = O("50,90,95,99", "--percentiles", "--metric-percentiles"),
    result_dir: Optional[str] = O(None, help="Output folder (default: sim-results/<time>)."),
    no_plots: bool = O(False, "--no-plots", help="Skip the PNG plots."),
    label: str = O("", help="Name of this run in tables and plots."),
    speculative_config: Optional[str] = O(None, help=cli_args.SPECULATIVE_CONFIG_HELP + "; simulated with the draft "
                                          "cost and acceptance the profile measured"),
    spec_acceptance: Optional[float] = O(None, help="With --speculative-config: the chance a draft token is accepted "
                                         "(given the drafts before it were), instead of the profile's measured one."),
    data_parallel_size: int = cli_args.DATA_PARALLEL_SIZE,
    router: str = cli_args.ROUTER,
) -> None:
    """Predict TTFT/TPOT of a workload with the real scheduler on a virtual clock; writes a bench results file."""
    import os
    import sys
    import time

    from rich.console import Console

    from sloserve.bench.workload import WorkloadOptions
    from sloserve.cli_args import parse_percentiles, parse_slo_classes
    from sloserve.bench.session import write_outputs
    from sloserve.bench.slo import SLO
    from sloserve.bench.tokens import HFTokenizer
    from sloserve.engine.policy import POLICIES
    from sloserve.sim.clock import VirtualClock
    from sloserve.sim.profile import Profile
    from sloserve.sim.results import sim_results, sim_run
    from sloserve.sim.simulate import build_sim_engine, simulate as run_simulation

    console = Console()
    try:
        prof = Profile.load(profile)
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; choose from {', '.join(POLICIES)}")
        knobs = _knobs(prof, max_num_batched_tokens, max_num_seqs, num_kv_blocks, kv_cache_memory, max_model_len)
        knobs.enable_prefix_caching = enable_prefix_caching
        tok = HFTokenizer(tokenizer) if tokenizer else None
        vocab = random_vocab_size or (tok.vocab_size if tok else knobs.vocab_size)
        # Token ids: the simulator needs lengths, and ids are what the completions API would send.
        workload = WorkloadOptions(
            dataset_name, dataset_path, num_prompts, request_rate, burstiness, arrival, max_concurrency,
            random_input_len, random_output_len, random_range_ratio, random_dist, random_input_min, random_input_max,
            random_output_min, random_output_max, random_prefix_len, vocab, "ids", sharegpt_output_len, seed, duration,
            multiturn_turns,
        ).build()
        pcts = parse_percentiles(percentiles)
        slo_obj = SLO.parse(slo) if slo else None
        request_slo = parse_slo_classes(slo_class, default_slo_class).resolve(None)
        if admission not in ("none", "slo"):
            raise ValueError(f"--admission must be none or slo, got {admission!r}")
        specs = workload.requests(tok)
        speculation = _speculation(prof, cli_args.parse_speculative_config(speculative_config), spec_acceptance, seed)
        if data_parallel_size < 1:
            raise ValueError("--data-parallel-size must be positive")
        if data_parallel_size > 1 and workload.max_concurrency:
            raise ValueError("--max-concurrency is not simulated with --data-parallel-size > 1 (arrivals only)")
    except (ValueError, OSError, KeyError) as error:
        console.print(f"[red]error:[/red] {error}")
        raise typer.Exit(2)
    for warning in _extrapolation(prof, knobs):
        console.print(f"[yellow]warning:[/yellow] {warning}")
    start = time.perf_counter()
    speculator = None  # the stats below are one engine's; N replicas report only their outcome
    if data_parallel_size > 1:
        from sloserve.sim.replicas import run_replicas

        try:
            outcome = run_replicas(prof.step_model, knobs, policy, data_parallel_size, router, specs,
                                   slo=lambda _: request_slo, admission=admission == "slo",
                                   rank_seconds=prof.rank_seconds_per_waiting.get(policy, 0.0), speculation=speculation)
        except ValueError as error:
            console.print(f"[red]error:[/red] {error}")
            raise typer.Exit(2)
    else:
        clock = VirtualClock()
        engine = build_sim_engine(prof.step_model, knobs, policy, clock, speculation=speculation,
                                  seconds_per_waiting=prof.rank_seconds_per_waiting.get(policy, 0.0))
        outcome = run_simulation(engine, clock, specs, max_concurrency=workload.max_concurrency,
                                 duration_s=workload.duration_s, slo=lambda _: request_slo, admission=admission == "slo")
        speculator = engine.speculator
    wall = time.perf_counter() - start
    run = sim_run(outcome, workload, label or _label(workload))
    results = sim_results([run], workload, prof, profile, knobs, policy, slo_obj, pcts, sys.argv, [outcome])
    out_dir = result_dir or os.path.join("sim-results", time.strftime("%Y%m%d-%H%M%S"))
    write_outputs(results, out_dir, console, plots=not no_plots)
    console.print(f"Simulated {len(specs)} requests, {outcome.num_steps} steps, {outcome.duration_s:.1f} s of "
                  f"virtual time in {wall:.2f} s ({outcome.duration_s / max(wall, 1e-9):.0f}x real time)")
    if speculator is not None:
        st = speculator.stats
        console.print(f"Speculation: acceptance rate {st.acceptance_rate:.1%}, mean accepted length "
                      f"{st.mean_accepted_length:.2f} over {st.num_drafts} verifications")


def _speculation(prof, config, acceptance, seed):
    """The simulated speculation of --speculative-config (None without it; --spec-acceptance alone is refused)."""
    from sloserve.sim.speculation import SpeculationProfile, sim_speculation

    if config is None:
        if acceptance is not None:
            raise ValueError("--spec-acceptance needs --speculative-config")
        return None
    profiled = SpeculationProfile.from_dict(prof.speculative) if prof.speculative else None
    return sim_speculation(config, profiled, acceptance, seed)


def _print_speculation(console, speculative: dict) -> None:
    def fmt(x, spec):
        return "n/a" if x is None else format(x, spec)

    draft = speculative.get("draft_execute")
    err = f"; draft fit held-out median error {draft['heldout_error']['median_abs_rel']:.1%}" if draft else ""
    console.print(f"Speculation ({speculative['config']['method']}): per-token acceptance "
                  f"{fmt(speculative['per_token_acceptance'], '.1%')}, acceptance rate {fmt(speculative['acceptance_rate'], '.1%')}, "
                  f"mean accepted length {fmt(speculative['mean_accepted_length'], '.2f')}, requests given drafts "
                  f"{speculative.get('proposal_rate', 1.0):.0%}, proposal time / draft fit "
                  f"{speculative['draft_scale']:.2f}{err}")


def _knobs(prof, budget, seqs, blocks, memory, max_len):
    from sloserve.cli_args import parse_bytes
    from sloserve.sim.simulate import EngineKnobs

    e = prof.engine
    if blocks is None:
        blocks = parse_bytes(memory) // e["kv_bytes_per_block"] if memory else e["num_kv_blocks"]
    max_len = max_len or e["max_model_len"]
    if max_len > e["max_model_len"]:
        raise ValueError(f"--max-model-len {max_len} exceeds the profiled model's {e['max_model_len']}")
    knobs = EngineKnobs(budget or e["max_num_batched_tokens"], seqs or e["max_num_seqs"], blocks, max_len,
                        e["block_size"], e["vocab_size"])
    if min(knobs.max_num_batched_tokens, knobs.max_num_seqs, knobs.num_kv_blocks, knobs.max_model_len) < 1:
        raise ValueError("engine knobs must be positive")
    return knobs


def _extrapolation(prof, knobs) -> list[str]:
    """Settings beyond what the profile measured make the step-time model extrapolate: say so."""
    e, out = prof.engine, []
    if knobs.max_num_batched_tokens > e["max_num_batched_tokens"]:
        out.append(f"--max-num-batched-tokens {knobs.max_num_batched_tokens} > profiled {e['max_num_batched_tokens']}")
    if knobs.max_num_seqs > e["max_num_seqs"]:
        out.append(f"--max-num-seqs {knobs.max_num_seqs} > profiled {e['max_num_seqs']}")
    if knobs.num_kv_blocks > e["num_kv_blocks"]:
        out.append(f"{knobs.num_kv_blocks} KV blocks > profiled {e['num_kv_blocks']} (longer decode batches than measured)")
    return [f"{w}: the step-time model extrapolates" for w in out]


def _label(workload) -> str:
    rate = workload.arrivals.rate
    parts = ["trace" if workload.arrivals.kind == "trace" else f"rate={rate:g}", "simulated"]
    if workload.max_concurrency:
        parts.insert(1, f"concurrency={workload.max_concurrency}")
    return ",".join(parts)


def _print_fit(console, prof) -> None:
    from rich.table import Table

    for name, fitted in (("execute (ModelExecutor.execute)", prof.execute), ("engine overhead (step - execute)", prof.overhead)):
        table = Table(title=f"Step-time model: {name}")
        table.add_column("term")
        table.add_column("coefficient", justify="right")
        for term, coef in zip(fitted.model.terms, fitted.model.coefficients):
            table.add_row(term, f"{coef:.4g} s")
        console.print(table)
        console.print(f"  abs. relative error: train mean {fitted.train.mean:.1%} / median {fitted.train.median:.1%} "
                      f"({fitted.train.count}); held-out (every {fitted.holdout_every}th) mean {fitted.heldout.mean:.1%}"
                      f" / median {fitted.heldout.median:.1%} ({fitted.heldout.count})")
