"""Option parsing shared by `serve`, `profile`, `simulate` and `bench`: sizes, percentiles, SLO classes, the model."""
from __future__ import annotations

import re
from pathlib import Path

import typer

import sloserve
from sloserve.slo_classes import SLOClasses

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "t": 10**12, "tb": 10**12}


# Where the model runs: the same flags, with vLLM's names, on serve, generate and profile.
DEVICE = typer.Option("auto", help="auto | cpu | cuda (auto: CUDA where PyTorch sees a GPU)")
GPU_MEMORY_UTILIZATION = typer.Option(0.9, help="CUDA: share of the GPU's memory for weights, activations and "
                                      "the KV cache (the KV cache gets what is left)")
ENFORCE_EAGER = typer.Option(False, "--enforce-eager", help="CUDA: run decode steps op by op, without CUDA graphs")
KV_CACHE_MEMORY = typer.Option(None, help="KV-cache memory, in bytes or e.g. 2GiB (default: 1GiB on a CPU; on CUDA "
                               "what --gpu-memory-utilization leaves)")
# vLLM's flag, on by default: serve and simulate take it.
ENABLE_PREFIX_CACHING = typer.Option(True, "--enable-prefix-caching/--no-enable-prefix-caching",
                                     help="reuse the KV cache of prompt prefixes earlier requests computed")

# Replicas behind a router: `serve` runs them on Ray, `simulate` on one virtual clock.
DATA_PARALLEL_SIZE = typer.Option(1, "--data-parallel-size", "-dp", help="engine replicas behind the router "
                                  "(serve: Ray actors; 1 keeps one in-process engine)")
ROUTER = typer.Option("slo", help="with --data-parallel-size > 1: round_robin | least_loaded | slo (least predicted "
                      "TTFT, near-ties to the replica caching the prompt's prefix)")


def device_knobs(device: str, gpu_memory_utilization: float, enforce_eager: bool, kv_cache_memory: str | None) -> dict:
    """EngineConfig's keyword arguments for the device flags above."""
    return dict(device=device, gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager,
                kv_cache_memory_bytes=parse_bytes(kv_cache_memory) if kv_cache_memory else None)


def default_model_dir() -> Path:
    return Path(sloserve.__file__).parent / "assets" / "demo-target"


def parse_bytes(text: str) -> int:
    """'1073741824', '2GiB', '512MB', '1.5g' -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise typer.BadParameter(f"{text!r} is not a size; write bytes or e.g. 512MiB, 2GiB")
    size = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if size < 1:
        raise typer.BadParameter(f"{text!r} must be at least one byte")
    return size


def parse_percentiles(text: str) -> tuple[float, ...]:
    vals = tuple(float(x) for x in text.replace(" ", "").split(",") if x)
    if not vals or any(not 0 <= v <= 100 for v in vals):
        raise ValueError(f"percentiles must be numbers in [0, 100], got {text!r}")
    return vals


def parse_slo_classes(specs: list[str] | None, default: str | None) -> SLOClasses:
    """`--slo-class interactive=ttft:200ms,tpot:50ms` (repeatable) and `--default-slo-class interactive`."""
    from sloserve.bench.slo import SLO as Objectives  # the bench's parser: `ttft:200ms,tpot:50ms`, bare numbers in ms
    from sloserve.request import SLO

    classes: dict[str, SLO] = {}
    for spec in specs or []:
        name, sep, terms = spec.partition("=")
        name = name.strip()
        if not sep or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError(f"bad --slo-class {spec!r}; expected NAME=ttft:200ms,tpot:50ms")
        if name in classes:
            raise ValueError(f"--slo-class {name!r} is given twice")
        o = Objectives.parse(terms)
        classes[name] = SLO(ttft=o.ttft_s, tpot=o.tpot_s, e2e=o.e2e_s)
    return SLOClasses(classes, default)


SPECULATIVE_CONFIG_HELP = ('speculative decoding, as vLLM spells it (JSON): {"method": "ngram", "num_speculative_tokens": 3, '
                           '"prompt_lookup_min": 2, "prompt_lookup_max": 4} or {"method": "draft_model", "model": DIR, '
                           '"num_speculative_tokens": 3}; add "k_policy": "adaptive" to pick k per step from load')


def parse_speculative_config(text: str | None):
    """--speculative-config JSON -> SpeculativeConfig (None when absent)."""
    import typer

    from sloserve.spec.config import SpeculativeConfig

    try:
        return SpeculativeConfig.parse(text)
    except (ValueError, TypeError) as error:
        raise typer.BadParameter(str(error), param_hint="--speculative-config") from None
