"""Adaptive speculation's choices, step by step: the k it chose, what it predicted for that k and for k = 0 (target
step and drafting), what the step then measured, and the acceptance it assumed against what verification showed.

Used by `benchmarks/spec_decode.py --trace`: wrappers around the speculator's k choice, its proposer and the engine's
predictor, so every figure is the engine's own (its predictor as it stood when it chose), not a re-derivation.
"""
from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import sloserve.spec.speculation as speculation_module
from sloserve import LLM


@dataclass(slots=True)
class StepTrace:
    k: int = 0
    rows: int = 0
    alpha: float = 0.0  # mean per-token acceptance the choice assumed
    predicted: dict[int, tuple[float, float]] = field(default_factory=dict)  # k -> (seconds, expected tokens)
    predicted_target: float = 0.0  # the engine's prediction for the shape that ran (drafts as found)
    measured_target: float = 0.0
    measured_draft: float = 0.0
    tokens: int = 0  # output tokens the step emitted (decoding rows only)
    drafted_rows: int = 0


@contextmanager
def trace_adaptive(llm: LLM):
    """Yield a list that fills with one StepTrace per decoding step the speculator chose a k for."""
    engine = llm.engine
    spec, predictor = engine.speculator, engine.predictor
    steps: list[StepTrace] = []
    original_candidates, original_propose, original_observe = speculation_module.candidates, spec.proposer.propose, predictor.observe
    original_spec_observe = spec.observe

    def candidates(*args):  # (max_k, limits, contexts, alphas, ...): adaptive.candidates' arguments
        cands = original_candidates(*args)
        steps.append(StepTrace(0, len(args[1]), statistics.fmean(args[3]), {c.k: (c.seconds, c.tokens) for c in cands}))
        return cands

    def propose(batch):
        start = time.perf_counter()
        try:
            return original_propose(batch)
        finally:
            if steps:
                steps[-1].measured_draft = time.perf_counter() - start
                steps[-1].drafted_rows = len(batch)

    def spec_observe(plan, sampled):
        if steps:
            steps[-1].k = spec.last_k  # the choice, or the verification explored in its place
            steps[-1].tokens = sum(len(t) for s, t in zip(plan.scheduled, sampled) if s.samples)
        return original_spec_observe(plan, sampled)

    def observe(shape, seconds):
        if steps and not steps[-1].measured_target:
            steps[-1].predicted_target = predictor.step_seconds(shape)
            steps[-1].measured_target = seconds
        return original_observe(shape, seconds)

    speculation_module.candidates = candidates
    try:
        with patched(spec.proposer, "propose", propose), patched(spec, "observe", spec_observe), \
                patched(predictor, "observe", observe):
            yield steps
    finally:
        speculation_module.candidates = original_candidates


@contextmanager
def patched(owner, name: str, fn):
    """`owner.name = fn` for the block; what the instance held before (another wrapper, or nothing) comes back."""
    before = vars(owner).get(name)
    setattr(owner, name, fn)
    try:
        yield
    finally:
        if before is None:
            delattr(owner, name)
        else:
            setattr(owner, name, before)


def summarise(steps: list[StepTrace], off_step_seconds: float | None) -> list[str]:
    """Per chosen k: how often, predicted vs measured seconds (target, draft), expected vs emitted tokens, and the
    predicted rate of that k against k = 0's; `off_step_seconds` is the no-speculation engine's mean measured step
    at the same load, the k = 0 step the choice was weighed against."""
    lines = ["| k chosen | steps | rows | alpha assumed | pred k ms (target + draft) | pred target ms (shape as run) | "
             "meas target ms | meas draft ms | pred k=0 ms | meas off step ms | exp tokens | emitted tokens | "
             "pred rate k / k=0 | pred rate K / k=0 | meas rate k / off |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for k in sorted({s.k for s in steps}):
        chosen = [s for s in steps if s.k == k and s.measured_target]
        if not chosen:
            continue
        mean = lambda f: statistics.fmean(f(s) for s in chosen)  # noqa: E731
        pred_total, pred_target = mean(lambda s: s.predicted[k][0]), mean(lambda s: s.predicted_target)
        pred0, exp_tokens = mean(lambda s: s.predicted[0][0]), mean(lambda s: s.predicted[k][1])
        rows, tokens = mean(lambda s: s.rows), mean(lambda s: s.tokens)
        meas = mean(lambda s: s.measured_target + s.measured_draft)
        rate = lambda s, j: s.predicted[j][1] / s.predicted[j][0]  # noqa: E731
        pred_ratio = mean(lambda s: rate(s, k) / rate(s, 0))
        pred_ratio_max = mean(lambda s: rate(s, max(s.predicted)) / rate(s, 0))
        meas_ratio = f"{(tokens / meas) / (rows / off_step_seconds):.2f}" if off_step_seconds else "-"
        lines.append(f"| {k} | {len(chosen)} | {rows:.1f} | {mean(lambda s: s.alpha):.2f} | {pred_total * 1e3:.2f} | {pred_target * 1e3:.2f} | "
                     f"{mean(lambda s: s.measured_target) * 1e3:.2f} | "
                     f"{mean(lambda s: s.measured_draft) * 1e3:.2f} | {pred0 * 1e3:.2f} | "
                     f"{'-' if off_step_seconds is None else f'{off_step_seconds * 1e3:.2f}'} | {exp_tokens:.2f} | "
                     f"{tokens:.2f} | {pred_ratio:.2f} | {pred_ratio_max:.2f} | {meas_ratio} |")
    return lines


@dataclass(slots=True)
class MeasuredStep:
    rows: int
    tokens: int  # new tokens scheduled (drafts included)
    predicted: float  # the engine's prediction for this shape, made before it ran
    measured: float


@contextmanager
def decode_steps(llm: LLM, max_new: int):
    """Yield a list that fills with every decode or verification step (no row over `max_new` new tokens: no prefill)."""
    predictor, steps = llm.engine.predictor, []
    original = predictor.observe

    def observe(shape, measured):
        if max(shape.new_tokens) <= max_new:
            steps.append(MeasuredStep(len(shape.new_tokens), sum(shape.new_tokens), predictor.step_seconds(shape), measured))
        return original(shape, measured)

    with patched(predictor, "observe", observe):
        yield steps


def summarise_steps(name: str, steps: list[MeasuredStep], rows: int) -> str:
    """Steps with all `rows` rows: how many, median measured and predicted ms, median new tokens: the real cost of a
    verification against a decode at this load (fixed-k engines), and how the predictor priced it."""
    full = [s for s in steps if s.rows == rows]
    if not full:
        return f"| {name} | 0 | - | - | - | - |"
    med = lambda f: statistics.median(f(s) for s in full)  # noqa: E731
    return (f"| {name} | {len(full)} | {med(lambda s: s.tokens):.0f} | {med(lambda s: s.measured) * 1e3:.2f} | "
            f"{min(s.measured for s in full) * 1e3:.2f} | {med(lambda s: s.predicted) * 1e3:.2f} |")
