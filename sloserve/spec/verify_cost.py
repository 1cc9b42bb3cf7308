"""What a verification adds to a decode step, measured, and when to run one to see.

Why measured apart from the engine's step-time predictor: that predictor is one linear fit over every step it has run,
and a verification row (k + 1 tokens on a long context) shares its features with a prefill chunk on cached context.
Its coefficients for those features are set by prefill steps, so while adaptive speculation keeps k = 0 the fit prices
a verification from prefill chunks: on the bundled pair at 4 concurrent a k = 4 verification at ~9x a decode step
against ~1.4x measured, and the price moves by 5x from one refit to the next (a ratio of measured to predicted, as an
earlier version kept per k, goes stale with every refit). So the predictor prices only what it measures well, the step
as if every row decoded one token, and this fit prices what verifying adds on top, from verification steps alone:

    seconds = decode_ratio * price(step as decodes) + per_row * verifying rows + per_draft * draft tokens

(on a CPU each verifying row is its own attention call, per layer: a cost per row; each draft a token through the
linear layers: a cost per draft). decode_ratio is measured over predicted of steps without drafts, so both parts are
in the machine's current seconds. After `explore_every` decoding steps without a verification one step verifies (the
k > 0 the prices favour), so the fit stays measured; where verifying truly loses (a loaded server), each exploration
doubles the wait for the next, up to `max_interval` steps: there one k = 4 verification of 32 rows costs ~5 decode
steps, so exploring every 64 steps would cost ~3% of throughput, every 1024 steps ~0.2%.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass(slots=True)
class AddedCost:
    """Seconds verifying adds to a decode step, fitted from the latest `window` verifications of one batch size class."""

    window: int
    per_row: float = 0.0  # seconds a verifying row adds
    per_draft: float = 0.0  # seconds a draft token adds
    verifications: deque = field(default_factory=deque)  # (verifying rows, draft tokens, seconds added)

    def observe(self, rows: int, drafts: int, seconds: float) -> None:
        self.verifications.append((rows, drafts, seconds))
        while len(self.verifications) > self.window:
            self.verifications.popleft()
        # Non-negative: a noisy step that measured under its decode price says verifying is cheap, not that it saves.
        self.per_row, self.per_draft = nonnegative_fit(self.verifications)

    def seconds(self, rows: float, drafts: float) -> float:
        return self.per_row * rows + self.per_draft * drafts


def nonnegative_fit(points) -> tuple[float, float]:
    """argmin over a, b >= 0 of sum (a * rows + b * drafts - seconds)^2 over (rows, drafts, seconds) points: the
    non-negative least squares of two columns, in closed form. Refitted after every verification, which at one request
    is every step: a general solver (numpy's lstsq in an active-set loop) cost ~3% of such a step.

    The squared error is strictly convex unless the columns are proportional, so its one minimum is the best of the
    feasible candidates: both coefficients free, either alone, none. Proportional columns (one request: every
    verification one row) fit equally well with either alone; like the active-set method, the column that correlates
    more with the seconds (drafts, where they outnumber rows) takes it all."""
    rr = rd = dd = rs = ds = 0.0
    for r, d, s in points:
        rr += r * r
        rd += r * d
        dd += d * d
        rs += r * s
        ds += d * s
    row_only = (rs / rr, 0.0) if rr > 0 and rs > 0 else (0.0, 0.0)
    draft_only = (0.0, ds / dd) if dd > 0 and ds > 0 else (0.0, 0.0)
    det = rr * dd - rd * rd  # exact: rows and drafts are integers
    if det <= 0:
        return draft_only if ds > rs else row_only
    both = ((dd * rs - rd * ds) / det, (rr * ds - rd * rs) / det)
    # Squared error less the sum of seconds squared (the same for every candidate).
    error = lambda a, b: a * a * rr + 2 * a * b * rd + b * b * dd - 2 * (a * rs + b * ds)  # noqa: E731
    feasible = [c for c in (both, row_only, draft_only, (0.0, 0.0)) if c[0] >= 0 and c[1] >= 0]
    return min(feasible, key=lambda c: error(*c))


def size_class(batch: int) -> int:
    """Batch sizes by powers of two (1, 2-3, 4-7, ...): a CPU's linear layers leave their memory-bound regime as the
    batch's tokens grow, so a draft beside 32 decodes costs more than one beside 4, and a fit over both mispriced each
    (fitted on 16-row verifications, cheap there, adaptive went on verifying at 32 rows at 0.81x of no speculation)."""
    return max(batch, 1).bit_length()


@dataclass(slots=True)
class VerifyCost:
    explore_every: int = 64
    max_interval: int = 1024
    weight: float = 0.1  # the decode ratio's running average: one step on a loaded machine must not swing the choice
    window: int = 16  # the latest verifications of a size class its added cost is fitted from
    decode_ratio: float | None = None  # measured / predicted, steps without drafts
    added: dict[int, AddedCost] = field(default_factory=dict)  # by the batch's size class
    since_verify: int = 0  # decoding steps since the last verification
    interval: int = 64  # decoding steps without a verification before the next exploration

    def observe_decode(self, measured: float, price: float) -> None:
        """A decoding step without drafts took `measured` seconds; the predictor priced it at `price`."""
        if measured <= 0 or price <= 0:
            return
        # Bounded: a fit that priced a shape near zero (it happens early) is one outlier, not a 10,000x correction.
        ratio = min(max(measured / price, 0.1), 10.0)
        before = self.decode_ratio
        self.decode_ratio = ratio if before is None else before + self.weight * (ratio - before)
        self.since_verify += 1

    def observe_verify(self, measured: float, price: float, batch: int, rows: int, drafts: int) -> None:
        """A step of `batch` decoding rows that verified `drafts` draft tokens over `rows` of them took `measured`
        seconds; the predictor priced the same rows decoding one token each at `price`."""
        self.since_verify = 0
        if measured <= 0 or price <= 0 or not rows:
            return
        fit = self.added.setdefault(size_class(batch), AddedCost(self.window))
        fit.observe(rows, drafts, measured - self.decode_scale * price)

    @property
    def decode_scale(self) -> float:
        """Seconds steps without drafts measure per second the predictor prices them at."""
        return self.decode_ratio if self.decode_ratio is not None else 1.0

    def measured(self, batch: int) -> bool:
        """Whether a verification beside `batch` decoding rows, or more, has been measured: until then the predictor's
        own price of one stands. A smaller batch's cost is no guide: beside more rows a CPU's linear layers leave their
        memory-bound regime and each draft costs more (borrowed from one row, going from 1 to 32 concurrent kept k = 4
        at 0.52x of no speculation, where a closed loop's every step carried a new prompt's prefill and was never
        measured)."""
        c = size_class(batch)
        return any(m >= c for m in self.added)

    def added_seconds(self, batch: int, rows: float, drafts: float) -> float:
        """Seconds verifying `drafts` draft tokens over `rows` of `batch` decoding rows adds to their decode step
        (expected counts welcome); a size class not measured yet borrows the nearest larger measured one (`measured`)."""
        c = size_class(batch)
        return self.added[min(m for m in self.added if m >= c)].seconds(rows, drafts)

    def chose(self, k: int) -> None:
        """The prices chose k for a step: a verification chosen on its own restarts the exploring at its quickest."""
        if k:
            self.interval = self.explore_every

    def held(self) -> None:
        """A decoding step ran k = 0 without weighing it (adaptive.ZeroHold) nor measuring it: it counts towards
        the next exploration as a measured one does."""
        self.since_verify += 1

    @property
    def due(self) -> bool:
        """Whether the next k = 0 choice would explore instead (`explore` without its doubling)."""
        return self.since_verify >= self.interval

    def explore(self) -> bool:
        """Whether this decoding step (the prices chose k = 0) should verify: none did for `interval` steps."""
        if not self.due:
            return False
        self.interval = min(2 * self.interval, self.max_interval)
        return True

    def __post_init__(self) -> None:
        self.interval = self.explore_every
