"""Where one request's step time goes with and without speculation: proposing (k choice + the n-gram lookup),
building the batch, the model's forward pass (a one-token decode, or a verification over k + 1 positions), sampling /
verifying, and the engine around them (scheduling, stop checks, detokenizing, timing).

Used by `benchmarks/spec_decode.py --breakdown`: wall-clock timers wrapped around the engine's own calls, so the parts
add up to the measured step (what the timers cannot see is in "engine other").
"""
from __future__ import annotations

import time
from contextlib import contextmanager

from sloserve import LLM, SamplingParams
import sloserve.model.runner as runner_module

PARTS = ("propose", "lookup", "batch build", "forward", "sample/verify", "engine other")


class Timer:
    """Wraps a callable and records each call's start and duration."""

    def __init__(self, fn) -> None:
        self.fn, self.calls = fn, []

    def __call__(self, *a, **kw):
        start = time.perf_counter()
        try:
            return self.fn(*a, **kw)
        finally:
            self.calls.append((start, time.perf_counter() - start))

    def seconds_from(self, t0: float) -> float:
        return sum(d for s, d in self.calls if s >= t0)


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
        spots |= {"propose": (engine.speculator, "propose"), "lookup": (engine.speculator.proposer, "propose")}
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
    totals = {"steps": 0, "tokens": 0, "total_s": 0.0, "seconds": dict.fromkeys(PARTS, 0.0), "token_ids": []}
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    for prompt in prompts:
        with timers(llm) as t:
            out = llm.generate(prompt_token_ids=[prompt], sampling_params=params)[0].outputs[0]
        step = t.pop("step")
        after_prefill = step.calls[0][0] + step.calls[0][1]
        s = {name: timer.seconds_from(after_prefill) for name, timer in t.items()}
        forward, sample = s["forward"] + s["prepare"], s["sample"] + s["verify"]
        propose = s.get("propose", 0.0)
        parts = {"propose": propose - s.get("lookup", 0.0), "lookup": s.get("lookup", 0.0),
                 "batch build": s["execute"] - forward - sample, "forward": forward, "sample/verify": sample,
                 "engine other": step.seconds_from(after_prefill) - s["execute"] - propose}
        for part, seconds in parts.items():
            totals["seconds"][part] += seconds
        totals["steps"] += len(step.calls) - 1
        totals["tokens"] += len(out.token_ids) - 1
        totals["total_s"] += step.seconds_from(after_prefill)
        totals["token_ids"].append(out.token_ids)
    after = (spec.stats.num_drafts, spec.stats.num_draft_tokens, spec.stats.num_accepted_tokens) if spec else (0, 0, 0)
    drafts, drafted, accepted = (a - b for a, b in zip(after, before))
    totals["acceptance"] = accepted / drafted if drafted else 0.0
    totals["mean_len"] = (drafts + accepted) / drafts if drafts else 0.0
    return totals


def best_breakdowns(llms: dict[str, LLM], prompts: list[list[int]], max_tokens: int, repeats: int) -> dict[str, dict]:
    """Interleaved repeats (the machine's load hits every config alike); per config the repeat of least step time."""
    for llm in llms.values():
        breakdown(llm, prompts[:1], 8)  # warm-up
    best: dict[str, dict] = {}
    for _ in range(repeats):
        for name, llm in llms.items():
            row = breakdown(llm, prompts, max_tokens)
            if name not in best or row["total_s"] < best[name]["total_s"]:
                best[name] = row
    return best


def print_breakdown(rows: dict[str, dict]) -> None:
    """Rows by config name (the first is the reference): ms per step of each part, ms per output token."""
    print("| config | decode steps | tokens/step | acceptance | mean accepted len | step ms | " +
          " | ".join(f"{p} ms/step" for p in PARTS) + " | ms/token | vs off (ms/token) | greedy = off |")
    print("|---|---|---|---|---|---|" + "---|" * len(PARTS) + "---|---|---|")
    ref = next(iter(rows.values()))
    for name, r in rows.items():
        steps = r["steps"]
        per_token = r["total_s"] / r["tokens"]
        print(f"| {name} | {steps} | {r['tokens'] / steps:.2f} | {r['acceptance']:.2f} | {r['mean_len']:.2f} | "
              f"{r['total_s'] / steps * 1e3:.2f} | " +
              " | ".join(f"{r['seconds'][p] / steps * 1e3:.3f}" for p in PARTS) +
              f" | {per_token * 1e3:.2f} | {ref['total_s'] / ref['tokens'] / per_token:.2f}x | "
              f"{'yes' if r['token_ids'] == ref['token_ids'] else 'NO'} |", flush=True)
