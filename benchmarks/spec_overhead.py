"""What speculation costs a loaded server on the steps where it does not verify: the engine with adaptive speculation
held at k = 0 (every choice made, no draft verified) against the engine without speculation, per decode step, in the
process's CPU time (torch at one thread, so the forward pass runs on the stepping thread and no worker spins).

    .venv/bin/python benchmarks/spec_overhead.py [--concurrency 16,32] [--repeats 3] [--workloads copy-own]

Both engines run the same closed loop (benchmarks/spec_decode.py's), interleaved; only steps where every row decodes
(no prefill chunk) count. "propose" is the speculator's whole call (the k choice and any lookups), "choice" the part
spent weighing k (adaptive.candidates). On a shared machine the CPU time is the work itself; wall time is
printed beside it for reference.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent.parent))  # benchmarks/ beside sloserve/, run as a script
import sloserve.spec.speculation as speculation_module  # noqa: E402
from benchmarks.spec_breakdown import Timer  # noqa: E402
from benchmarks.spec_decode import METHODS, TARGET, closed_loop, configs, workload_prompts  # noqa: E402
from benchmarks.spec_trace import patched  # noqa: E402
from sloserve import LLM, SamplingParams  # noqa: E402


@contextmanager
def held_at_zero(llm: LLM):
    """Adaptive speculation that weighs k as usual and then verifies nothing (nor explores); each k = 0 counts as
    clear (as under heavy load, where k = 0 wins by far), so it is held between weighings as such a choice is."""
    spec = llm.engine.speculator
    best_k = speculation_module.best_k
    speculation_module.best_k = lambda cands: (best_k(cands), 0)[1]  # the choice is still made
    interval, spec.exploration.interval = spec.exploration.interval, 1 << 60  # no step explores a verification
    margin, spec.hold.margin = spec.hold.margin, 0.0
    try:
        yield
    finally:
        speculation_module.best_k = best_k
        spec.exploration.interval = interval
        spec.hold.margin = margin


def measure(llm: LLM, prompts: list[list[int]], max_tokens: int, c: int) -> dict:
    """Per decode step (all rows decoding): CPU and wall ms of the step, of propose, of the k choice."""
    engine, spec = llm.engine, llm.engine.speculator
    step = Timer(engine.step)
    propose = Timer(spec.propose) if spec else None
    choice = Timer(speculation_module.candidates)
    shapes = []
    observe = engine.predictor.observe

    def record(shape, seconds):
        shapes.append(max(shape.new_tokens) == 1)
        return observe(shape, seconds)

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    original_candidates = speculation_module.candidates
    speculation_module.candidates = choice
    try:
        with patched(engine, "step", step), patched(engine.predictor, "observe", record), \
                (patched(spec, "propose", propose) if spec else _nothing()):
            outs = closed_loop(engine, prompts, params, c)
    finally:
        speculation_module.candidates = original_candidates
    # Every step of the closed loop schedules work, so the predictor observes each: steps and shapes pair up.
    ran = step.calls
    decode = [i for i, d in enumerate(shapes) if d]
    n = len(decode)
    pick = lambda calls: [calls[i] for i in decode if i < len(calls)]  # noqa: E731
    row = {"steps": n, "step_cpu": _ms(pick(ran), 2), "step_wall": _ms(pick(ran), 1),
           "tokens": [o.outputs[0].token_ids for o in outs]}
    row["propose_cpu"] = _ms(pick(propose.calls), 2) if propose else 0.0
    row["choice_cpu"] = _ms(choice.calls, 2)
    return row


def _ms(calls: list[tuple[float, float, float]], i: int) -> float:
    """Mean milliseconds of the calls' field i (Timer's: 1 wall, 2 process CPU)."""
    return statistics.fmean(x[i] for x in calls) * 1e3 if calls else 0.0


@contextmanager
def _nothing():
    yield


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", default="16,32")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--row-tokens", type=int, default=2048)
    ap.add_argument("--workloads", default="copy-own")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"torch threads 1; load average at start {os.getloadavg()}")
    print("| workload | conc | config | decode steps | step CPU ms (median of rounds) | min..max | vs off (CPU) | "
          "propose CPU ms | of it k choice ms | step wall ms | greedy = off |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for workload in args.workloads.split(","):
        cfg = configs(METHODS[workload])
        llms = {"off": LLM(str(TARGET), dtype=args.dtype, speculative_config=cfg["off"]),
                "adaptive held at k=0": LLM(str(TARGET), dtype=args.dtype, speculative_config=cfg["adaptive"])}
        data = workload_prompts(workload, llms["off"], args.max_tokens + 16)
        for c in [int(x) for x in args.concurrency.split(",")]:
            n = max(4 * c, -(-args.row_tokens // args.max_tokens))
            prompts = (data * (n // len(data) + 1))[:n]
            rows: dict[str, list[dict]] = {name: [] for name in llms}
            for _ in range(args.repeats + 1):  # the first round warms up and is dropped
                for name, llm in llms.items():
                    with held_at_zero(llm) if llm.engine.speculator else _nothing():
                        rows[name].append(measure(llm, prompts, args.max_tokens, c))
            off = [r["step_cpu"] for r in rows["off"][1:]]
            for name, rs in rows.items():
                rs = rs[1:]
                cpu = sorted(r["step_cpu"] for r in rs)
                ratio = statistics.median(o / r["step_cpu"] for o, r in zip(off, rs))
                same = all(r["tokens"] == rows["off"][1]["tokens"] for r in rs)
                print(f"| {workload} | {c} | {name} | {rs[0]['steps']} | {statistics.median(cpu):.2f} | {cpu[0]:.2f}..{cpu[-1]:.2f} | "
                      f"{ratio:.3f}x | {statistics.median(r['propose_cpu'] for r in rs):.3f} | "
                      f"{statistics.median(r['choice_cpu'] for r in rs):.3f} | "
                      f"{statistics.median(r['step_wall'] for r in rs):.2f} | {'yes' if same else 'NO'} |", flush=True)
    print(f"load average at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
