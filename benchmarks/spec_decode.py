"""Speculative decoding on the bundled pair: no speculation vs fixed k (2, 4) vs adaptive, draft_model on chats and
ngram on two copy-heavy workloads (benchmarks/spec_workloads.py), at several concurrencies, interleaved in one run;
greedy outputs must agree in every row.

    .venv/bin/python benchmarks/spec_decode.py [--concurrency 1,4,16,32] [--max-tokens 48] [--row-tokens 2048]
        [--repeats 3] [--dtype float32] [--workloads chats,copy,copy-own] [--trace]
    .venv/bin/python benchmarks/spec_decode.py --breakdown [--workloads copy,copy-own]  # one request: where time goes
    .venv/bin/python benchmarks/spec_decode.py --sim-check [--profile P] [--sim-concurrency 1,16]  # simulated vs measured

float32 by default. In the checkpoint's bfloat16 a verification's rows now round exactly as plain decodes of their
positions (decode attention, the batch-invariant matmul), and at 4 concurrent every row matched; at 32 some greedy
outputs still flip on near-ties, because a prompt's rows are not: speculation's k + 1 tokens per request change how
the token budget cuts prompts into chunks, and which prompt blocks the prefix cache still holds, and SDPA/oneDNN
round a prompt row by the shape of its chunk. In float32 every row matched. With VLLM_BATCH_INVARIANT=1 prompt
rows are computed as decodes too, and every bfloat16 row matched (chats, 32 concurrent: off, k=2, k=4, adaptive).

Offline engine (LLM's engine), closed loop as `vllm bench serve --max-concurrency c`: `c` requests in flight, each
one that finishes replaced by the next, as many requests as a row needs to emit at least `--row-tokens` tokens (and 4 x c at least) (a row
must last seconds, not 0.1 s, to resolve a 3% difference on a shared machine). Not waves of `c`: with speculation
requests of one wave finish steps apart, and a wave's last steps ran one lagging request alone (at 4 concurrent
on copy-own, 129 of k = 4's 198 decode steps had fewer than 4 rows): that measured the waves, not the load.
Configs run interleaved (the order rotated each round), `--repeats` rounds; "vs off" is each round's tok/s over off's
in the same round, the median of those ratios (and their min..max); "off again", a second engine without speculation,
shows how far two identical configs differ in the same run: the noise floor of every row. TPOT per request = (last token - first token) / (tokens - 1), p50/p99
over the requests of the median round; tok/s = output tokens / wall time, median over rounds. Load average per row.
"vs off (CPU)": off's process CPU time over the config's, median of rounds (the same tokens): on a loaded machine
the work itself, with `--threads 1` (no intra-op thread spinning while it waits for a core).
`--trace`: for adaptive rows, the k it chose per step and its predicted vs measured step (benchmarks/spec_trace.py).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
import uuid
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent.parent))  # benchmarks/ beside sloserve/, run as a script
from benchmarks.spec_breakdown import best_breakdowns, print_breakdown, timers  # noqa: E402
from benchmarks.spec_trace import decode_steps, summarise, summarise_steps, trace_adaptive  # noqa: E402
from benchmarks.spec_workloads import SEPARATOR, chats_and_copy, copy_own_prompts, openings  # noqa: E402
from sloserve import LLM, SamplingParams  # noqa: E402
from sloserve.cli_args import default_model_dir  # noqa: E402

TARGET = default_model_dir()
DRAFT = TARGET.parent / "demo-draft"
METHODS = {"chats": "draft_model", "copy": "ngram", "copy-own": "ngram"}
MAX_K = 4  # the largest k of the table's configs (k=4, adaptive up to 4)


def workload_prompts(name: str, off: LLM, passage_tokens: int) -> list[list[int]]:
    """Token ids of a workload's prompts; copy-own's are written by the target itself (`off`, greedy)."""
    tok = off.tokenizer
    if name != "copy-own":
        return [tok.encode(p) for p in chats_and_copy()[name]]

    def generate(prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        return [o.outputs[0].token_ids for o in off.generate(prompt_token_ids=prompts, sampling_params=params)]

    return copy_own_prompts(generate, [tok.encode(o) for o in openings()], tok.encode(SEPARATOR), passage_tokens)


def configs(method: str) -> dict[str, dict | None]:
    base = {"method": "ngram", "prompt_lookup_min": 2, "prompt_lookup_max": 4} if method == "ngram" else \
        {"method": "draft_model", "model": str(DRAFT)}
    return {
        "off": None,
        "k=2": base | {"num_speculative_tokens": 2},
        "k=4": base | {"num_speculative_tokens": MAX_K},
        "adaptive": base | {"num_speculative_tokens": MAX_K, "k_policy": "adaptive"},
    }


def closed_loop(engine, prompts: list[list[int]], params: SamplingParams, concurrency: int) -> list:
    """Every prompt to completion with `concurrency` in flight; outputs in the prompts' order."""
    run = uuid.uuid4().hex[:8]
    ids = [f"{run}-{i}" for i in range(len(prompts))]
    finished, submitted = {}, 0
    try:
        while len(finished) < len(prompts):
            while submitted < len(prompts) and submitted - len(finished) < concurrency:
                engine.add_request(ids[submitted], prompts[submitted], params)
                submitted += 1
            for out in engine.step():
                if out.finished:
                    finished[out.request_id] = out
    finally:  # an error part-way must not leave requests holding KV blocks
        for request_id in ids:
            engine.abort_request(request_id)
    return [finished[i] for i in ids]


def run_once(llm: LLM, prompts: list[list[int]], max_tokens: int, concurrency: int | None = None) -> dict:
    """`prompts` with `concurrency` in flight (all at once by default)."""
    engine = llm.engine
    spec = engine.speculator
    counters = ("num_drafts", "num_draft_tokens", "num_accepted_tokens", "num_emitted_tokens")
    before = [getattr(spec.stats, c) for c in counters] if spec else None
    k_before = list(spec.stats.steps_per_k) if spec else None
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    with timers(llm) as timed:
        start, cpu = time.perf_counter(), time.process_time()
        outs = closed_loop(engine, prompts, params, concurrency or len(prompts))
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    tpots = [(o.outputs[0].token_times[-1] - o.outputs[0].token_times[0]) / (len(o.outputs[0].token_ids) - 1) for o in outs if len(o.outputs[0].token_ids) > 1]
    row = {"wall": wall, "cpu": cpu, "tokens": [o.outputs[0].token_ids for o in outs], "tpots": tpots,
           "tok_s": sum(len(o.outputs[0].token_ids) for o in outs) / wall,
           "draft_s": timed["propose"].seconds_from(0) if spec else 0.0, "target_s": timed["execute"].seconds_from(0)}
    if spec:
        d = [getattr(spec.stats, c) - b for c, b in zip(counters, before)]
        row["acceptance"] = d[2] / d[1] if d[1] else 0.0
        row["mean_len"] = d[3] / d[0] if d[0] else 0.0
        row["k_steps"] = [a - b for a, b in zip(spec.stats.steps_per_k, k_before)]
    return row


def k_histogram(k_steps: list[int] | None) -> str:
    """Decoding steps by chosen k, e.g. '0:410 4:32' (fixed k: one entry)."""
    if not k_steps or not sum(k_steps):
        return "-"
    return " ".join(f"{k}:{n}" for k, n in enumerate(k_steps) if n)


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def breakdowns(args, chosen: list[str]) -> None:
    """Per workload: its first ten prompts, one request at a time, each config; where a decode step's time goes."""
    for workload in chosen:
        llms = {name: LLM(str(TARGET), dtype=args.dtype, speculative_config=spec)
                for name, spec in configs(METHODS[workload]).items()}
        prompts = workload_prompts(workload, llms["off"], args.max_tokens + 16)[:10]
        print(f"\n{workload} ({METHODS[workload]}): {len(prompts)} requests one at a time, {args.max_tokens} tokens each; "
              f"decode steps only; best of {args.repeats} interleaved repeats")
        print_breakdown(best_breakdowns(llms, prompts, args.max_tokens, args.repeats))
    print(f"load average at end {os.getloadavg()}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", default="1,4,16,32")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--row-tokens", type=int, default=2048, help="each row emits at least this many tokens, and "
                    "runs at least 4 x c requests: long enough to resolve a few percent")
    ap.add_argument("--trace", action="store_true", help="adaptive rows: the k chosen per step, predicted vs measured")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--sim-check", action="store_true", help="simulated vs measured TPOT instead of the main table")
    ap.add_argument("--sim-concurrency", default="1,16")
    ap.add_argument("--profile", default=None, help="--sim-check: a profile made with --speculative-config (default: "
                    "profile now, --quick grid)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workloads", default="chats,copy,copy-own", help=f"of {', '.join(METHODS)}")
    ap.add_argument("--breakdown", action="store_true", help="instead of the table: one request at a time, where each "
                    "decode step's time goes (n-gram workloads: off, k=2, k=4, adaptive)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's); at 1 a "
                    "breakdown's CPU times are not inflated by threads spinning while the machine's other load runs")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    levels = [int(c) for c in args.concurrency.split(",")]
    model_name = next((l.split(":", 1)[1].strip() for l in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
                       if l.startswith("Model name")), platform.processor())
    print(f"machine: {model_name}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}; "
          f"load average at start {os.getloadavg()}")
    if args.sim_check:
        from benchmarks.spec_sim_check import sim_check  # its own room; it reuses this script's configs and runs
        sim_check(args)
        return
    print(f"target {TARGET.name}, draft {DRAFT.name}, {args.dtype}; max_tokens {args.max_tokens} (ignore_eos), greedy; {args.repeats} interleaved rounds, >= {args.row_tokens} tokens a row")
    chosen = args.workloads.split(",")
    if unknown := set(chosen) - set(METHODS):
        ap.error(f"--workloads: unknown {sorted(unknown)}; known: {', '.join(METHODS)}")
    if args.breakdown:
        breakdowns(args, chosen)
        return
    print("| workload | method | conc | requests | config | TPOT p50 ms | TPOT p99 ms | tok/s | vs off (median of rounds) | "
          "min..max | vs off (CPU) | acceptance | mean accepted len | k chosen (steps) | draft s | target s | wall s | load | greedy = off |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for workload in chosen:
        method = METHODS[workload]
        # "off again": a second engine without speculation, measured like the others: its "vs off" is the noise floor
        # every row is read against (two identical engines measured 0.92..1.03x of each other on a 2-core box).
        specs = {"off": None, "off again": None} | configs(method)
        llms = {name: LLM(str(TARGET), dtype=args.dtype, speculative_config=spec) for name, spec in specs.items()}
        data = workload_prompts(workload, llms["off"], args.max_tokens + 16)
        for c in levels:
            n = max(4 * c, -(-args.row_tokens // args.max_tokens))  # the tail (fewer than c left) a small part
            prompts = (data * (n // len(data) + 1))[:n]
            for llm in llms.values():  # warm-up: kernels, the predictor's first steps at this batch size
                run_once(llm, prompts[:c], 8)
            results: dict[str, list[dict]] = {name: [] for name in llms}
            traces: dict[str, list] = {name: [] for name in llms}
            names = list(llms)
            for r in range(args.repeats):
                # Interleaved, so the machine's load hits every config alike, and rotated, so no config always runs
                # right after the same one.
                for name in names[r % len(names):] + names[:r % len(names)]:
                    llm = llms[name]
                    if not args.trace:
                        results[name].append(run_once(llm, prompts, args.max_tokens, c))
                        continue
                    with decode_steps(llm, MAX_K + 1) as steps, (trace_adaptive(llm) if name == "adaptive" else nullcontext([])) as chosen:
                        results[name].append(run_once(llm, prompts, args.max_tokens, c))
                    traces[name].append((steps, chosen))
            load = os.getloadavg()[0]
            rounds = range(args.repeats)
            for name, rs in results.items():
                ratios = sorted(rs[i]["tok_s"] / results["off"][i]["tok_s"] for i in rounds)
                cpu_ratio = statistics.median(results["off"][i]["cpu"] / rs[i]["cpu"] for i in rounds)  # same tokens
                r = sorted(rs, key=lambda x: x["wall"])[len(rs) // 2]  # the median round
                same = all(x["tokens"] == results["off"][0]["tokens"] for x in rs)
                print(f"| {workload} | {method} | {c} | {len(prompts)} | {name} | {statistics.median(r['tpots']) * 1e3:.2f} | "
                      f"{pct(r['tpots'], 99) * 1e3:.2f} | {statistics.median(x['tok_s'] for x in rs):.0f} | "
                      f"{statistics.median(ratios):.3f}x | {ratios[0]:.2f}..{ratios[-1]:.2f} | {cpu_ratio:.3f}x | {r.get('acceptance', 0):.2f} | "
                      f"{r.get('mean_len', 0):.2f} | {k_histogram(r.get('k_steps'))} | {r['draft_s']:.2f} | {r['target_s']:.2f} | "
                      f"{r['wall']:.2f} | {load:.1f} | {'yes' if same else 'NO'} |", flush=True)
            if args.trace:
                print(f"\nsteps with all {c} rows decoding (no prefill), {workload} at {c} concurrent, all rounds:")
                print("| config | steps | new tokens (median) | measured ms (median) | measured ms (min) | predicted ms (median) |")
                print("|---|---|---|---|---|---|")
                for name, runs in traces.items():
                    print(summarise_steps(name, [x for steps, _ in runs for x in steps], c))
                off = [x.measured for steps, _ in traces["off"] for x in steps if x.rows == c]
                print(f"\nadaptive's choices (ms per step; 'meas off step' is off's median {c}-row decode step):")
                print("\n".join(summarise([x for _, chosen in traces["adaptive"] for x in chosen],
                                           statistics.median(off) if off else None)) + "\n", flush=True)
    print(f"load average at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
