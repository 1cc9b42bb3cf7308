"""Step-time prediction: the model policies, admission and the simulator ask, calibrated online from measured steps."""
from __future__ import annotations

from collections import deque
from typing import Protocol

import numpy as np

from sloserve.engine.cost_model import FitError, LinearCostModel
from sloserve.engine.features import OVERHEAD_TERMS, ExecuteFeatures, StepShape, overhead_features, token_knots


MIN_STEP_SECONDS = 1e-6


class StepTimeModel(Protocol):
    def step_seconds(self, shape: StepShape) -> float:
        """Predicted seconds from one step's start to the next: the executor's and the engine's own work."""
        ...


class StepFeatures:
    """The executor's features followed by the engine's overhead features: one vector, one linear model."""

    def __init__(self, knots: tuple[int, ...]) -> None:
        self.execute = ExecuteFeatures(knots)
        self.knots = self.execute.knots
        self.terms = self.execute.terms + tuple(f"overhead:{t}" for t in OVERHEAD_TERMS)

    def __call__(self, shape: StepShape) -> list[float]:
        return self.execute(shape) + overhead_features(shape)

    def bends(self) -> list[list[float]]:
        """The execute tables' bends (ExecuteFeatures.bends) as rows over every term."""
        return [row + [0.0] * len(OVERHEAD_TERMS) for row in self.execute.bends()]


class StepCostModel:
    """seconds = coefficients . StepFeatures(shape); a profile's execute and overhead fits side by side."""

    __slots__ = ("knots", "coefficients", "features", "_linear")

    def __init__(self, knots: tuple[int, ...], coefficients: list[float]) -> None:
        self.knots = tuple(knots)
        self.coefficients = [float(c) for c in coefficients]
        self.features = StepFeatures(self.knots)
        if len(self.coefficients) != len(self.features.terms):
            raise ValueError(f"{len(self.coefficients)} coefficients for {len(self.features.terms)} terms")
        self._linear = LinearCostModel(self.features.terms, self.coefficients)

    @property
    def num_execute_terms(self) -> int:
        return len(self.features.execute.terms)

    def step_seconds(self, shape: StepShape) -> float:
        # A non-negative fit may price a shape it has no evidence for at zero; no step is free, and the scheduler
        # divides by these times (a zero once raised in the middle of a served step and failed its requests).
        return max(self._linear.predict(self.features(shape)), MIN_STEP_SECONDS)

    @classmethod
    def default(cls, max_num_batched_tokens: int) -> StepCostModel:
        """With no profile: 50 ms a step plus 2 ms a batched token, slower than any model this engine runs
        on a CPU core, so a policy or admission acting on it errs towards caution until measured steps
        replace it."""
        knots = token_knots(max_num_batched_tokens)
        tables = {term: 0.002 * int(term.split("@")[1]) for term in StepFeatures(knots).terms if "_tokens@" in term}
        return cls.of(knots, tables | {"step": 0.05})

    @classmethod
    def of(cls, knots: tuple[int, ...], prices: dict[str, float]) -> StepCostModel:
        """A model from seconds per unit of the terms named (the rest cost nothing)."""
        terms = StepFeatures(knots).terms
        if unknown := set(prices) - set(terms):
            raise ValueError(f"unknown step-time terms {sorted(unknown)}")
        return cls(knots, [prices.get(term, 0.0) for term in terms])


def prior_shapes(knots: tuple[int, ...]) -> list[StepShape]:
    """Shapes on which a starting model anchors the refit wherever measured steps say nothing yet."""
    budget = knots[-1]
    shapes = []
    for k in knots:
        shapes.append(StepShape([k], [0], [True]))  # a prefill chunk
        shapes.append(StepShape([k], [budget], [False]))  # a chunk on cached context
        shapes.append(StepShape([1] * k, [64 + 16 * i for i in range(k)], [True] * k))  # decodes
    half = max(1, budget // 2)
    shapes.append(StepShape([1] * 8 + [half], [256] * 8 + [0], [True] * 9))  # mixed
    return shapes


class StepPredictor:
    """A step-time model refitted online from the engine's measured steps (a rolling window).

    The refit is non-negative least squares on relative error over the window plus the starting
    model's predictions on `prior_shapes` at a small weight: measured steps decide wherever they
    reach, the start (a profile, or a conservative default) holds where none has been seen yet.
    `error()` is prequential: each step's prediction made before that step was measured.
    """

    def __init__(self, start: StepCostModel, *, window: int = 1024, refit_every: int = 32,
                 prior_weight: float = 0.02, straightness: float = 1.0, calibrate: bool = True) -> None:
        self.start = start
        self.model = start  # replaced whole by a refit, so readers on another thread see one or the other
        self.calibrate = calibrate
        self.refit_every = refit_every
        self.prior_weight = prior_weight
        self.observations: deque[tuple[StepShape, float]] = deque(maxlen=window)
        self._rows: deque[list[float]] = deque(maxlen=window)  # features of the observations, kept for refits
        self._predicted: deque[float] = deque(maxlen=window)
        self._measured: deque[float] = deque(maxlen=window)
        self._since_refit = 0
        self.num_observed = 0
        self.num_refits = 0
        shapes = prior_shapes(start.knots)
        self._bends = np.array(start.features.bends(), float) * straightness
        self._prior_x = np.array([start.features(s) for s in shapes], float)
        self._prior_y = np.array([max(start.step_seconds(s), 1e-9) for s in shapes], float)

    def step_seconds(self, shape: StepShape) -> float:
        return self.model.step_seconds(shape)

    def observe(self, shape: StepShape, seconds: float) -> None:
        """One measured step: score the prediction made for it, keep it, refit now and then."""
        if seconds <= 0:
            return
        self._predicted.append(self.model.step_seconds(shape))
        self._measured.append(seconds)
        self.num_observed += 1
        if not self.calibrate:
            return
        self.observations.append((shape, seconds))
        self._rows.append(self.start.features(shape))
        self._since_refit += 1
        # Early on refit often (the start may be far off), later every `refit_every` steps.
        if self._since_refit >= min(self.refit_every, max(8, self.num_refits * 8)):
            self.refit()

    def refit(self) -> None:
        features = self.start.features
        x = np.array(self._rows, float)
        y = np.array([t for _, t in self.observations], float)
        # Where no step was measured the start's shape holds, at the speed the measured steps show: a
        # conservative default is ~10x slow on a fast machine, and left as it is, one unseen step size (a
        # full-budget prefill) would look 10x dear to every policy, router and admission that prices it.
        speed = float(np.median(y / np.maximum(x @ np.asarray(self.start.coefficients), 1e-9)))
        w = np.concatenate([np.ones(len(y)), np.full(len(self._prior_y), self.prior_weight)])
        # Between and beyond the token counts measured, a table runs straight rather than in the start's shape (a
        # step's fixed cost dominates the default's): a single request verifying 4 drafts measures 1 and 5 decode
        # positions, and 2 and 3 were priced near 1; a server at 32 concurrent measures 32, and 128 (4 drafts a row)
        # was priced 35% cheap at a tenth of this weight. Adaptive speculation verified on such prices until a refit
        # had measured them. Relative units: a bend the size of a typical step weighs `straightness` measured steps.
        fitted = LinearCostModel.fit(features.terms, np.vstack([x, self._prior_x]),
                                     np.concatenate([y, self._prior_y * speed]), w, self._bends / float(np.median(y)))
        self.model = StepCostModel(self.start.knots, fitted.coefficients)
        self._since_refit = 0
        self.num_refits += 1

    def error(self) -> FitError:
        """|predicted - measured| / measured of the last `window` steps, each predicted before it ran."""
        return FitError.of(np.array(self._predicted, float), np.array(self._measured, float))


def prefill_chunk(model: StepTimeModel, shape: StepShape, context: int, n: int, floor: int, limit: float | None,
                  min_rate: float = 0.0) -> int:
    """A step's prefill chunk of up to `n` prompt tokens (on `context` cached ones) after the work in `shape`:
    the largest that keeps the step within `limit` seconds, but never below `floor` tokens nor below the
    chunk whose prefill rate (tokens per second of step) reaches `min_rate`: there the limit yields."""
    if limit is None or _step(model, shape, context, n) <= limit:
        return n
    if min_rate > 0:
        floor = max(floor, rate_floor(model, shape, context, n, min_rate))
    return largest_chunk(model, shape, context, n, floor, limit)


def rate_floor(model: StepTimeModel, shape: StepShape, context: int, n: int, min_rate: float) -> int:
    """The smallest chunk of at most `n` tokens whose prefill rate (its tokens per second of step) reaches `min_rate`.

    A step's time grows with its tokens less than in proportion (it has a fixed part: weights read
    once, the decodes in it), so the rate grows with the chunk and a bisection finds the threshold;
    if even `n` tokens fall short, `n`."""
    if n / _step(model, shape, context, n) < min_rate:
        return n
    lo, hi = 0, n  # rate(lo) < min_rate (lo = 0: no tokens, no rate); rate(hi) >= min_rate
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if mid / _step(model, shape, context, mid) >= min_rate:
            hi = mid
        else:
            lo = mid
    return hi


def largest_chunk(model: StepTimeModel, shape: StepShape, context: int, n: int, floor: int, limit: float) -> int:
    """The most of `n` prompt tokens (on `context` cached ones) a step of `shape` can add and stay within
    `limit` seconds; never fewer than `floor`, so prefill always progresses (step time grows with tokens)."""
    if _step(model, shape, context, n) <= limit:
        return n
    lo, hi = min(floor, n), n  # hi does not fit; lo is the answer when nothing above it fits
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _step(model, shape, context, mid) <= limit:
            lo = mid
        else:
            hi = mid
    return lo


def _step(model: StepTimeModel, shape: StepShape, context: int, k: int) -> float:
    """Predicted seconds of `shape` plus a k-token prefill chunk on `context` cached tokens."""
    return model.step_seconds(StepShape(shape.new_tokens + [k], shape.contexts + [context], shape.samples + [False],
                                        shape.spec_tokens + [0]))
