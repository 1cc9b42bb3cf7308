"""Prefill, decode and batch speed of sloserve vs transformers and llama.cpp, side by side."""

# Run: python benchmarks/decode_vs_peers.py [--rounds 3] [--dtypes float32,bfloat16,int8] [--threads 2]
#      [--systems sloserve,hf,llamacpp] [--quick] [--json out.json]
# Peers: CMAKE_ARGS="-DGGML_NATIVE=ON" CMAKE_BUILD_PARALLEL_LEVEL=2 pip install -e .[bench-peers]
# (llama-cpp-python compiles llama.cpp; GGML_NATIVE targets this CPU's AVX-512/BF16/AMX). All systems live in one process and take turns
# measure by measure (A,B,C,A,B,C,...) because this machine's speed drifts; each gets the same
# thread count and the same token ids.

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402  (sibling module; benchmarks/ is not a package)

# SmolLM2-135M's shape; weights are random, so only speed means anything.
MODEL = dict(
    vocab_size=32000, hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, intermediate_size=1536, tie_word_embeddings=True, rms_norm_eps=1e-5,
    rope_theta=10000.0, max_position_embeddings=2048,
)
# sloserve_layers: the same engine running decode steps layer by layer, op by op (the path before the
# fused decode stack), so that the previous version is measured in the same run.
ALL_SYSTEMS = ("sloserve", "sloserve_layers", "hf", "llamacpp")
# What each system runs in a row of the table: sloserve (dtype, quantization), HF's dtype, llama.cpp's
# GGUF type. int8 is sloserve's weight-only int8 beside llama.cpp's q8_0; transformers has no CPU int8 path.
VARIANTS = {
    "float32": {"sloserve": ("float32", None), "sloserve_layers": ("float32", None), "hf": "float32",
                "llamacpp": "float32"},
    "bfloat16": {"sloserve": ("bfloat16", None), "sloserve_layers": ("bfloat16", None), "hf": "bfloat16",
                 "llamacpp": "bfloat16"},
    "int8": {"sloserve": ("bfloat16", "int8"), "sloserve_layers": ("bfloat16", "int8"), "llamacpp": "q8_0"},
}
# decode_cpu_ms: this process's CPU time (all threads) per generated token of the single-request decode:
# on a shared machine it moves far less than wall time when others take cores away.
MEASURES = ("prefill_s", "decode_tok_s", "decode_cpu_ms", "batch_total_tok_s", "batch_gen_tok_s")
LOWER_IS_BETTER = {"prefill_s", "decode_cpu_ms"}


@dataclass
class Workload:
    prefill_prompt: list[int]
    decode_prompt: list[int]
    decode_new: int
    batch_prompts: list[list[int]]
    batch_outputs: list[int]

    def describe(self) -> str:
        lens = [len(p) for p in self.batch_prompts]
        return (f"prefill {len(self.prefill_prompt)} tok; decode {len(self.decode_prompt)}+"
                f"{self.decode_new} tok; batch {len(lens)} req, prompts {min(lens)}-{max(lens)} "
                f"({sum(lens)} tok), outputs {min(self.batch_outputs)}-{max(self.batch_outputs)} "
                f"({sum(self.batch_outputs)} tok)")

    @property
    def longest_request(self) -> int:
        pairs = zip(self.batch_prompts, self.batch_outputs)
        batch = max(len(p) + n for p, n in pairs)
        return max(batch, len(self.prefill_prompt) + 1, len(self.decode_prompt) + self.decode_new)

    @property
    def kv_tokens(self) -> int:
        return sum(len(p) + n for p, n in zip(self.batch_prompts, self.batch_outputs))


def make_workload(quick: bool, seed: int = 0) -> Workload:
    rng = np.random.default_rng(seed)
    if quick:
        prefill, decode_prompt, decode_new, n_req, prompts, outs = 128, 32, 16, 8, (16, 128), (4, 16)
    else:
        prefill, decode_prompt, decode_new, n_req, prompts, outs = 512, 128, 64, 32, (32, 512), (16, 128)

    def ids(n: int) -> list[int]:
        return rng.integers(peers.FIRST_PLAIN_TOKEN, MODEL["vocab_size"], n).tolist()

    prompt_lens = rng.integers(prompts[0], prompts[1] + 1, n_req)
    out_lens = rng.integers(outs[0], outs[1] + 1, n_req)
    return Workload(ids(prefill), ids(decode_prompt), decode_new,
                    [ids(int(n)) for n in prompt_lens], [int(n) for n in out_lens])


class SloservePeer:
    """sloserve's offline LLM API, timed the same way as the peers."""

    name = "sloserve"

    def __init__(self, config_dir: str, dtype: str, quantization: str | None, workload: Workload,
                 batched_tokens: int, seed: int = 0, fused_decode: bool = True):
        from sloserve import LLM, SamplingParams

        self._params = SamplingParams
        # KV room for the whole batch at once (x1.25 for block rounding), so no preemption. No prefix
        # cache: every round sends the same prompts, and llama.cpp's peer clears its KV cache each time.
        kv_bytes = int(workload.kv_tokens * _kv_bytes_per_token(dtype) * 1.25)
        self.llm = LLM(model=config_dir, load_format="dummy", dtype=dtype, seed=seed, quantization=quantization,
                       enable_prefix_caching=False,
                       max_num_batched_tokens=batched_tokens,
                       max_num_seqs=len(workload.batch_prompts),
                       kv_cache_memory_bytes=max(kv_bytes, 64 << 20))
        if not fused_decode:
            self.name = "sloserve_layers"
            self.llm.engine.executor.model.decode_stack = None

    def _generate(self, prompts: list[list[int]], outputs: list[int]):
        params = [self._params(max_tokens=n, temperature=0.0, ignore_eos=True) for n in outputs]
        outs = self.llm.generate(prompt_token_ids=prompts, sampling_params=params)
        for out, n in zip(outs, outputs):
            if len(out.outputs[0].token_ids) != n:
                raise RuntimeError(f"sloserve produced {len(out.outputs[0].token_ids)} tokens, asked {n}")
        return outs

    def prefill_seconds(self, prompt_ids: list[int]) -> float:
        start = time.perf_counter()
        self._generate([prompt_ids], [1])
        return time.perf_counter() - start

    def decode_tokens_per_s(self, prompt_ids: list[int], n_new: int) -> float:
        return peers.decode_rate(self._generate([prompt_ids], [n_new])[0].outputs[0].token_times)

    def batch_tokens_per_s(self, prompts: list[list[int]], outputs: list[int]) -> dict:
        start = time.perf_counter()
        self._generate(prompts, outputs)
        seconds = time.perf_counter() - start
        return peers.batch_result(seconds, prompts, outputs, mode="all at once, continuous batching")


def _kv_bytes_per_token(dtype: str) -> int:
    head_dim = MODEL["hidden_size"] // MODEL["num_attention_heads"]
    width = 4 if dtype == "float32" else 2
    return 2 * MODEL["num_hidden_layers"] * MODEL["num_key_value_heads"] * head_dim * width


# ---------------------------------------------------------------------------------------------
# Building the systems
# ---------------------------------------------------------------------------------------------


def matrix_shapes() -> list[tuple[int, int]]:
    """[out, in] of every matrix a decode token streams: each layer's projections and the vocabulary head."""
    hidden, ffn = MODEL["hidden_size"], MODEL["intermediate_size"]
    head_dim = hidden // MODEL["num_attention_heads"]
    q, kv = MODEL["num_attention_heads"] * head_dim, MODEL["num_key_value_heads"] * head_dim
    layer = [(q, hidden), (kv, hidden), (kv, hidden), (hidden, q), (ffn, hidden), (ffn, hidden), (hidden, ffn)]
    return layer * MODEL["num_hidden_layers"] + [(MODEL["vocab_size"], hidden)]


def weight_bytes_per_token(name: str, variant: str) -> float:
    """Bytes of weights one decode token reads in this system (the embedding lookup reads one row: left out)."""
    shapes = matrix_shapes()
    if name == "llamacpp":
        return sum(n * k for n, k in shapes) * peers.GGUF_BYTES_PER_WEIGHT[VARIANTS[variant][name]]
    if variant == "int8":  # one int8 per weight and one float32 scale per output row
        return sum(n * k + 4 * n for n, k in shapes)
    return sum(n * k for n, k in shapes) * (4 if variant == "float32" else 2)


def memory_read_gbs(threads: int, mib: int = 512, reps: int = 5) -> float:
    """This machine's memory-read bandwidth as `threads` threads see it: torch.sum over a float32 buffer
    far larger than any cache (vectorized, so the memory is the limit), best of reps."""
    import torch

    torch.set_num_threads(threads)
    buf = torch.ones(mib << 18, dtype=torch.float32)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - start)
    return buf.numel() * 4 / best / 1e9


def build_system(name: str, variant: str, args, workload: Workload, workdir: str):
    dtype = VARIANTS[variant][name]
    if name in ("sloserve", "sloserve_layers"):
        config_dir = os.path.join(workdir, "config")
        if not os.path.exists(os.path.join(config_dir, "config.json")):
            from transformers import LlamaConfig

            LlamaConfig(**MODEL).save_pretrained(config_dir)
        return SloservePeer(config_dir, *dtype, workload, args.sloserve_batched_tokens,
                            fused_decode=name == "sloserve")
    if name == "hf":
        return peers.HFPeer(MODEL, dtype)
    if name == "llamacpp":
        path = os.path.join(workdir, f"model-{dtype}.gguf")
        if not os.path.exists(path):
            peers.write_gguf(MODEL, path, dtype)
        # Cells per sequence rounded up to 256, llama.cpp's own padding of the KV cache.
        seq_len = -(-workload.longest_request // 256) * 256
        return peers.LlamaCppPeer(path, n_threads=args.threads,
                                  max_seqs=len(workload.batch_prompts), max_seq_len=seq_len)
    raise ValueError(f"unknown system {name!r}")


def sloserve_importable() -> str | None:
    """None when sloserve's LLM imports, else the reason it does not."""
    try:
        from sloserve import LLM, SamplingParams  # noqa: F401
    except Exception as exc:  # any import-time failure of a work-in-progress engine
        return f"{type(exc).__name__}: {exc}"
    return None


def warm_up(system, workload: Workload) -> None:
    """One small untimed pass of each path: first calls pay for allocation and kernel setup."""
    short = workload.decode_prompt[:32]
    system.prefill_seconds(short)
    system.decode_tokens_per_s(short, 4)
    system.batch_tokens_per_s([short, short[:16]], [4, 2])


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------


RUNS = ("prefill", "decode", "batch")
# A sample taken while other processes used more than this share of a core is retried: with
# as many threads as cores, any other runnable process stalls every barrier.
QUIET = 0.1
RETRY_PAUSE_S = 5.0


def run_once(system, run: str, workload: Workload) -> dict:
    if run == "prefill":
        return {"prefill_s": system.prefill_seconds(workload.prefill_prompt)}
    if run == "decode":
        cpu0 = sum(os.times()[:2])
        rate = system.decode_tokens_per_s(workload.decode_prompt, workload.decode_new)
        cpu_ms = (sum(os.times()[:2]) - cpu0) * 1e3 / workload.decode_new  # the prompt's prefill included
        return {"decode_tok_s": rate, "decode_cpu_ms": cpu_ms}
    res = system.batch_tokens_per_s(workload.batch_prompts, workload.batch_outputs)
    return {"batch_total_tok_s": res["total_tok_s"], "batch_gen_tok_s": res["generated_tok_s"],
            "batch_mode": res["mode"]}


def _busy_cpu_seconds() -> float | None:
    """CPU seconds all processes have used, from /proc/stat (None off Linux)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def with_interference(fn):
    """Run fn; return its result and the cores' worth of other processes' work meanwhile."""
    busy0, own0, wall0 = _busy_cpu_seconds(), sum(os.times()[:2]), time.perf_counter()
    result = fn()
    busy1, own1, wall = _busy_cpu_seconds(), sum(os.times()[:2]), time.perf_counter() - wall0
    if busy0 is None or busy1 is None:
        return result, None
    return result, max((busy1 - busy0) - (own1 - own0), 0.0) / wall


def measure(system, run: str, workload: Workload, retries: int) -> tuple[dict, float | None]:
    """The least disturbed of up to 1+retries attempts, and how disturbed it was."""
    best = None
    for attempt in range(retries + 1):
        values, noise = with_interference(lambda: run_once(system, run, workload))
        if best is None or (noise is not None and noise < best[1]):
            best = (values, noise)
        if noise is None or noise <= QUIET:
            break
        log(f"  {system.name} {run}: other processes used {noise:.2f} cores meanwhile; "
            f"{'retrying' if attempt < retries else 'keeping the least disturbed try'}")
        if attempt < retries:
            # Other work comes in bursts longer than a prefill: retrying at once hits the same one.
            time.sleep(RETRY_PAUSE_S * (attempt + 1))
    return best


def build_all(dtype: str, names: list[str], args, workload: Workload, workdir: str,
              results: dict) -> dict:
    """Build and warm each system; one that fails is reported, not fatal to the others."""
    systems = {}
    for name in names:
        if name not in VARIANTS[dtype]:
            log(f"[{dtype}] {name}: no such variant, not run")
            continue
        try:
            log(f"[{dtype}] building {name}")
            system = build_system(name, dtype, args, workload, workdir)
            warm_up(system, workload)
        except Exception as exc:
            traceback.print_exc()
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        systems[name] = system
        results[name] = {**{m: [] for m in MEASURES}, "interference": []}
    return systems


def run_dtype(dtype: str, names: list[str], args, workload: Workload, workdir: str) -> dict:
    """Interleave the systems of one dtype round by round, run by run."""
    results: dict[str, dict] = {}
    systems = build_all(dtype, names, args, workload, workdir, results)
    for rnd in range(args.rounds):
        for run in RUNS:
            for name, system in list(systems.items()):
                try:
                    values, noise = measure(system, run, workload, args.retries)
                except Exception as exc:
                    traceback.print_exc()
                    results[name] = {"error": f"{type(exc).__name__}: {exc}"}
                    del systems[name]
                    continue
                _record(results[name], values, noise)
                shown = ", ".join(f"{k} {v:.4g}" for k, v in values.items() if k in MEASURES)
                log(f"[{dtype}] round {rnd + 1}/{args.rounds} {name:15s} {shown}"
                    + (f" (others: {noise:.2f} cores)" if noise is not None else ""))
    for system in systems.values():
        if hasattr(system, "close"):
            system.close()
    return results


def _record(result: dict, values: dict, noise: float | None) -> None:
    for key, value in values.items():
        if key in MEASURES:
            result[key].append(value)
        else:
            result[key] = value
    if noise is not None:
        result["interference"].append(noise)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------


def summarize(samples: list[float], measure: str) -> dict:
    best = min(samples) if measure in LOWER_IS_BETTER else max(samples)
    return {"samples": samples, "min": min(samples), "max": max(samples), "best": best,
            "median": statistics.median(samples)}


def summarize_all(raw: dict) -> dict:
    out: dict = {}
    for dtype, per_system in raw.items():
        out[dtype] = {}
        for name, res in per_system.items():
            if "error" in res:
                out[dtype][name] = {"error": res["error"]}
                continue
            out[dtype][name] = {m: summarize(res[m], m) for m in MEASURES if res[m]}
            if res["decode_tok_s"]:  # weights streamed per second while decoding one request, on the median
                out[dtype][name]["weights_gbs"] = (
                    statistics.median(res["decode_tok_s"]) * weight_bytes_per_token(name, dtype) / 1e9)
            out[dtype][name]["batch_mode"] = res.get("batch_mode", "")
            # Other processes' CPU (in cores) during each kept run: 0 is an undisturbed sample.
            out[dtype][name]["interference"] = res["interference"]
    return out


def ratios(summary: dict) -> dict:
    """sloserve÷peer on medians: below 1 is better for prefill time, above 1 for throughput."""
    out: dict = {}
    for dtype, per_system in summary.items():
        mine = per_system.get("sloserve", {})
        for peer in ("sloserve_layers", "hf", "llamacpp"):
            theirs = per_system.get(peer, {})
            shared = [m for m in MEASURES if m in mine and m in theirs]
            if shared:
                out.setdefault(dtype, {})[peer] = {
                    m: mine[m]["median"] / theirs[m]["median"] for m in shared}
    return out


def machine_info(names: list[str]) -> dict:
    import torch
    import transformers

    info = {"cpu": _cpu_model(), "cores": os.cpu_count(), "isa": _isa_flags(),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "load_avg_start": os.getloadavg()[0]}
    if "llamacpp" in names:
        info["llama.cpp"] = peers.llama_cpp_version()
        info["llama.cpp_system_info"] = peers.llama_cpp_system_info()
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _isa_flags() -> str:
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0].split()
    except (OSError, IndexError):
        return ""
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return " ".join(f for f in wanted if f in flags)


LABELS = {"prefill_s": "prefill ms", "decode_tok_s": "decode tok/s", "decode_cpu_ms": "decode CPU ms/tok",
          "batch_total_tok_s": "batch total tok/s", "batch_gen_tok_s": "batch gen tok/s"}


def _cell(stats: dict | None, measure: str) -> str:
    if not stats:
        return "-"
    scale = 1000.0 if measure == "prefill_s" else 1.0
    return f"{stats['best'] * scale:.1f} / {stats['median'] * scale:.1f}"


def format_report(report: dict) -> str:
    m, s = report["machine"], report["settings"]
    lines = [
        f"machine: {m['cpu']}, {m['cores']} cores [{m['isa']}], load avg "
        f"{m['load_avg_start']:.1f} at start, {m.get('load_avg_end', float('nan')):.1f} at end",
        f"memory read bandwidth ({s['threads']} threads, torch.sum over 512 MiB, best of 5): "
        f"{m['memory_read_gbs_start']:.1f} GB/s at start, {m.get('memory_read_gbs_end', float('nan')):.1f} at end",
        f"versions: python {m['python']}, torch {m['torch']}, transformers {m['transformers']}"
        + (f", {m['llama.cpp']}" if "llama.cpp" in m else ""),
        f"settings: threads {s['threads']}, rounds {s['rounds']}, {s['workload']}",
        "cells: best / median over rounds (best = min for prefill ms, max for tok/s); "
        "others cores: other processes' CPU during a kept run",
    ]
    lines += _busy_warning(report) + [""]
    header = (f"{'dtype':9s} {'system':15s}" + "".join(f"{LABELS[x]:>22s}" for x in MEASURES)
              + f"{'decode weights GB/s':>21s}{'others cores max':>18s}")
    lines += [header, "-" * len(header)]
    for dtype, per_system in report["results"].items():
        for name, stats in per_system.items():
            if "error" in stats:
                lines.append(f"{dtype:9s} {name:15s}  unavailable: {stats['error']}")
                continue
            row = "".join(f"{_cell(stats.get(x), x):>22s}" for x in MEASURES)
            row += f"{stats['weights_gbs']:>21.1f}" if "weights_gbs" in stats else f"{'-':>21s}"
            noise = stats["interference"]
            row += f"{max(noise):>18.2f}" if noise else f"{'-':>18s}"
            lines.append(f"{dtype:9s} {name:15s}{row}")
    lines += _ratio_lines(report["ratios"])
    lines += _batch_mode_lines(report["results"])
    return "\n".join(lines)


def _busy_warning(report: dict) -> list[str]:
    """Say when other processes ran alongside the kept samples, which makes them too slow."""
    noise = [x for per in report["results"].values() for stats in per.values()
             for x in stats.get("interference", [])]
    if noise:
        disturbed = sum(x > QUIET for x in noise)
        if not disturbed:
            return []
        return [f"WARNING: {disturbed} of {len(noise)} kept runs had other processes using up "
                f"to {max(noise):.2f} cores alongside: those figures are too slow"]
    # No /proc/stat: fall back to the load average (start: others only; end: ours too).
    m, threads = report["machine"], report["settings"]["threads"]
    start, end = m["load_avg_start"], m.get("load_avg_end", 0.0)
    if start <= max(m["cores"] - threads, 0) + 0.5 and end <= m["cores"] + 0.5:
        return []
    return [f"WARNING: load average {start:.1f} at start, {end:.1f} at end on {m['cores']} "
            "cores: the machine was busy, timings are not trustworthy"]


def _ratio_lines(all_ratios: dict) -> list[str]:
    if not all_ratios:
        return []
    lines = ["", "sloserve ÷ peer (medians; prefill: <1 is faster, tok/s: >1 is faster)"]
    for dtype, per_peer in all_ratios.items():
        for peer, r in per_peer.items():
            cells = ", ".join(f"{LABELS[x]} {v:.2f}" for x, v in r.items())
            lines.append(f"  {dtype:9s} ÷ {peer:15s} {cells}")
    return lines


def _batch_mode_lines(results: dict) -> list[str]:
    modes = {name: stats.get("batch_mode") for per in results.values()
             for name, stats in per.items() if stats.get("batch_mode")}
    lines = ["", "batch modes:"] + [f"  {name}: {mode}" for name, mode in modes.items()]
    if "hf" in modes:
        lines.append("  (hf pads every request to the longest prompt and output; "
                     "only requested tokens count)")
    return lines


# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtypes", default="float32,bfloat16,int8", help=f"of {', '.join(VARIANTS)}")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--systems", default=",".join(ALL_SYSTEMS))
    ap.add_argument("--quick", action="store_true", help="short workload, 1 round: a smoke run")
    ap.add_argument("--json", metavar="PATH", help="also save every sample and summary here")
    ap.add_argument("--retries", type=int, default=2,
                    help=f"extra tries of a run disturbed by other processes (> {QUIET} cores)")
    ap.add_argument("--sloserve-batched-tokens", type=int, default=2048,
                    help="sloserve max_num_batched_tokens (llama.cpp's n_batch is 2048 too)")
    args = ap.parse_args(argv)
    if args.quick and "--rounds" not in (argv if argv is not None else sys.argv):
        args.rounds = 1
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    names = [n.strip() for n in args.systems.split(",") if n.strip()]
    unknown = set(names) - set(ALL_SYSTEMS)
    if unknown:
        raise SystemExit(f"unknown systems: {', '.join(sorted(unknown))}")
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if set(dtypes) - set(VARIANTS):
        raise SystemExit(f"unknown dtypes: {', '.join(sorted(set(dtypes) - set(VARIANTS)))}")

    import torch

    # Same thread count for torch (HF and sloserve) and llama.cpp.
    torch.set_num_threads(args.threads)
    workload = make_workload(args.quick)
    raw: dict = {}
    unavailable = sloserve_importable() if "sloserve" in names else None
    if unavailable:
        print(f"sloserve: unavailable ({unavailable})", flush=True)
        names.remove("sloserve")

    machine = machine_info(names)
    machine["memory_read_gbs_start"] = memory_read_gbs(args.threads)
    with tempfile.TemporaryDirectory(prefix="decode_vs_peers-") as workdir:
        for dtype in dtypes:
            raw[dtype] = run_dtype(dtype, names, args, workload, workdir)
            if unavailable:
                raw[dtype]["sloserve"] = {"error": unavailable}
    machine["load_avg_end"] = os.getloadavg()[0]
    machine["memory_read_gbs_end"] = memory_read_gbs(args.threads)

    summary = summarize_all(raw)
    report = {"machine": machine,
              "settings": {"threads": args.threads, "rounds": args.rounds, "quick": args.quick,
                           "workload": workload.describe(), "model": MODEL,
                           "sloserve_max_num_batched_tokens": args.sloserve_batched_tokens},
              "results": summary, "ratios": ratios(summary)}
    print(format_report(report))
    if args.json:
        lengths = {"batch_prompt_lens": [len(p) for p in workload.batch_prompts],
                   "batch_outputs": workload.batch_outputs}
        Path(args.json).write_text(json.dumps({**report, "workload_lengths": lengths}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
