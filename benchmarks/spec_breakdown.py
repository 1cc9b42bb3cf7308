"""Where one request's step time goes with and without speculation: proposing (the k choice), drafting (the proposer's
call: a draft model's forward passes, attention metadata included, apart from the rest of it, which is the n-gram
lookup or the draft model's per-step Python: plans, argmax, bookkeeping), building the batch, the model's forward pass (a one-token decode, or a verification over k + 1 positions), sampling /
verifying, and the engine around them (scheduling, stop checks, detokenizing, timing).

Used by `benchmarks/spec_decode.py --breakdown`: timers wrapped around the engine's own calls, so the parts add up to
the measured step (what the timers cannot see is in "engine other"). Each call's wall time and the process's CPU time
are both kept: on a shared machine the wall time swings with the neighbours' load, while the CPU time our own
threads spent is the work itself (the best estimate of a quiet machine's ratios; parts are shown in CPU time).
"""
from __future__ import annotations

import time
from contextlib import contextmanager

from sloserve import LLM, SamplingParams
import sloserve.model.runner as runner_module

PARTS = ("propose", "lookup", "draft forward", "batch build", "forward", "sample/verify", "engine other")


class Timer:
    """Wraps a callable and records each call's start, wall duration and process CPU duration."""

    def __init__(self, fn) -> None:
        self.fn, self.calls = fn, []

    def __call__(self, *a, **kw):
        start, cpu = time.perf_counter(), time.process_time()
        try:
            return self.fn(*a, **kw)
        finally:
            self.calls.append((start, time.perf_counter() - start, time.process_time() - cpu))

    def seconds_from(self, t0: float, cpu: bool = False) -> float:
        """Wall (or CPU) seconds of the calls that started at t0 or later."""
        return sum(c[2 if cpu else 1] for c in self.calls if c[0] >= t0)


@contextmanager
def timers(llm: LLM):
    """Timers on the engine's step, the speculator's propose and its proposer, the executor, the model's forward
    (attention metadata included) and the sampler/verifier; every wrapped attribute restored afterwards."""
    engine = llm.engine
    executor = getattr(engine.executor, "target", engine.executor)  # a SpeculativeExecutor wraps the target's
    spots = {"step": (engine, "step"), "execute": (engine.executor, "execute"), "forward": (executor.model, "forward"),
             "prepare": (executor.model.attention, "prepare"), "sample": (executor.sampler, "sample"),
             "verify": (runner_module, "verify")}
    if engine.speculator is not None:
        proposer = engine.speculator.proposer
        spots |= {"propose": (engine.speculator, "propose"), "lookup": (proposer, "propose")}
        if hasattr(proposer, "executor"):  # a draft model
            spots |= {"draft forward": (proposer.executor.model, "forward"),
                      "draft prepare": (proposer.executor.model.attention, "prepare")}
    saved = []
    found: dict[str, Timer] = {}
    for label, (owner, name) in spots.items():
        saved.append((owner, name, vars(owner).get(name)))
        found[label] = Timer(getattr(owner, name))
        setattr(owner, name, found[label])
    try:
        yield found
    finally:
        for owner, name, original in reversed(saved):
            if original is None:
                delattr(owner, name)  # it was a bound method of the class: drop the instance's wrapper
            else:
                setattr(owner, name, original)


def breakdown(llm: LLM, prompts: list[list[int]], max_tokens: int) -> dict:
    """Each prompt alone, one after another; their decode steps only (each request's first step, its prompt's
    prefill, is left out, as TPOT leaves out the first token): steps, tokens, seconds of each part, acceptance."""
    spec = llm.engine.speculator
    before = (spec.stats.num_drafts, spec.stats.num_draft_tokens, spec.stats.num_accepted_tokens) if spec else (0, 0, 0)
    totals = {"steps": 0, "tokens": 0, "total_s": 0.0, "cpu_s": 0.0, "seconds": dict.fromkeys(PARTS, 0.0), "token_ids": []}
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    for prompt in prompts:
        with timers(llm) as t:
            out = llm.generate(prompt_token_ids=[prompt], sampling_params=params)[0].outputs[0]
        step = t.pop("step")
        after_prefill = step.calls[0][0] + step.calls[0][1]
        s = {name: timer.seconds_from(after_prefill, cpu=True) for name, timer in t.items()}
        forward, sample = s["forward"] + s["prepare"], s["sample"] + s["verify"]
        propose = s.get("propose", 0.0)
        draft_forward = s.get("draft forward", 0.0) + s.get("draft prepare", 0.0)
        parts = {"propose": propose - s.get("lookup", 0.0), "lookup": s.get("lookup", 0.0) - draft_forward,
                 "draft forward": draft_forward,
                 "batch build": s["execute"] - forward - sample, "forward": forward, "sample/verify": sample,
                 "engine other": step.seconds_from(after_prefill, cpu=True) - s["execute"] - propose}
        for part, seconds in parts.items():
            totals["seconds"][part] += seconds
        totals["steps"] += len(step.calls) - 1
        totals["tokens"] += len(out.token_ids) - 1
        totals["total_s"] += step.seconds_from(after_prefill)
        totals["cpu_s"] += step.seconds_from(after_prefill, cpu=True)
        totals["token_ids"].append(out.token_ids)
    after = (spec.stats.num_drafts, spec.stats.num_draft_tokens, spec.stats.num_accepted_tokens) if spec else (0, 0, 0)
    drafts, drafted, accepted = (a - b for a, b in zip(after, before))
    totals["acceptance"] = accepted / drafted if drafted else 0.0
    totals["mean_len"] = (drafts + accepted) / drafts if drafts else 0.0
    return totals


def best_breakdowns(llms: dict[str, LLM], prompts: list[list[int]], max_tokens: int, repeats: int) -> dict[str, dict]:
    """Interleaved repeats (the machine's load hits every config alike); per config the repeat of least CPU time."""
    for llm in llms.values():
        breakdown(llm, prompts[:1], 8)  # warm-up
    best: dict[str, dict] = {}
    for _ in range(repeats):
        for name, llm in llms.items():
            row = breakdown(llm, prompts, max_tokens)
            if name not in best or row["cpu_s"] < best[name]["cpu_s"]:
                best[name] = row
    return best


def print_breakdown(rows: dict[str, dict]) -> None:
    """Rows by config name (the first is the reference): the parts in CPU ms per decode step, then per output token
    wall and CPU ms and their ratios to the reference."""
    print("| config | decode steps | tokens/step | acceptance | mean accepted len | step wall ms | step CPU ms | " +
          " | ".join(f"{p} CPU ms/step" for p in PARTS) +
          " | wall ms/token | vs off (wall) | CPU ms/token | vs off (CPU) | greedy = off |")
    print("|---|---|---|---|---|---|---|" + "---|" * len(PARTS) + "---|---|---|---|---|")
    ref = next(iter(rows.values()))
    for name, r in rows.items():
        steps, tokens = r["steps"], r["tokens"]
        print(f"| {name} | {steps} | {tokens / steps:.2f} | {r['acceptance']:.2f} | {r['mean_len']:.2f} | "
              f"{r['total_s'] / steps * 1e3:.2f} | {r['cpu_s'] / steps * 1e3:.2f} | " +
              " | ".join(f"{r['seconds'][p] / steps * 1e3:.3f}" for p in PARTS) +
              f" | {r['total_s'] / tokens * 1e3:.2f} | {ref['total_s'] / ref['tokens'] / (r['total_s'] / tokens):.2f}x"
              f" | {r['cpu_s'] / tokens * 1e3:.2f} | {ref['cpu_s'] / ref['tokens'] / (r['cpu_s'] / tokens):.2f}x | "
              f"{'yes' if r['token_ids'] == ref['token_ids'] else 'NO'} |", flush=True)
