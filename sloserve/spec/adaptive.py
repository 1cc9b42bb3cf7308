"""Adaptive speculation length (SmartSpec): per-request acceptance estimates, and the k in 0..K whose
step yields the most expected tokens per predicted second, draft cost included."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sloserve.engine.cost import StepTimeModel
from sloserve.engine.features import StepShape


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens a k-draft verification yields when each draft is accepted with probability alpha
    (until the first rejection), plus the target's own token: (1 - alpha^(k+1)) / (1 - alpha)."""
    if alpha >= 1.0:
        return k + 1.0
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def totals_by_k(max_k: int, limits: list[int], alphas: list[float], draft_rates: list[float],
                position_factors: list[float] | None = None) -> tuple[list[float], list[float]]:
    """For each k in 0..max_k, over the rows: expected output tokens and expected draft tokens.

    A row asked for k drafts drafts min(k, its limit), and finds them only with probability `draft_rate` (an n-gram
    proposer finds no match for some rows): then it yields expected_tokens(alpha, that many), else the target's one
    token. `position_factors` (AcceptanceEstimator.position_factors) scale a row's acceptance draft position by draft
    position, where acceptance is not geometric. One pass over the rows, each row's sum built term by term (the choice
    runs every step, over every row: a call per row and k cost ~100 us at 32 rows)."""
    factors = position_factors or [1.0] * max_k
    tokens, drafts = [0.0] * (max_k + 1), [0.0] * (max_k + 1)
    for alpha, limit, rate in zip(alphas, limits, draft_rates):
        tokens[0] += 1.0
        total = term = 1.0  # expected_tokens(alpha, x) for x drafts so far
        x = 0
        for k in range(1, max_k + 1):
            if x < limit:
                term *= min(alpha * factors[x], 1.0)
                x += 1
                total += term
            if x:
                tokens[k] += rate * total + (1.0 - rate)
                drafts[k] += rate * x
            else:
                tokens[k] += 1.0
    return tokens, drafts


@dataclass(slots=True)
class _Counts:
    """Counts over an exponential window (see `_fade`): the newest verifications and proposals weigh the most."""

    accepted: float = 0.0
    trials: float = 0.0  # accepted drafts plus rejections (a verification that accepted all has none)
    asked: float = 0.0  # proposals asked of the proposer for this request
    drafted: float = 0.0  # of those, the ones that came back with drafts

    def verified(self, accepted: int, trials: int, window: float) -> float:
        """Counts one verification; returns the factor older counts faded by."""
        fade = _fade(self.trials + trials, window)
        self.accepted = (self.accepted + accepted) * fade
        self.trials = (self.trials + trials) * fade
        return fade

    def proposed(self, drafted: bool, window: float) -> None:
        fade = _fade(self.asked + 1, window)
        self.asked = (self.asked + 1) * fade
        self.drafted = (self.drafted + drafted) * fade


def _fade(count: float, window: float) -> float:
    """The factor that keeps `count` observations' weight within `window`: exact counts until the window fills,
    then each new observation weighs as the window's mean one and the older fade geometrically (by window / (window
    + 1) an observation): a shift in the workload shows in the estimate within a few windows, however long it ran."""
    return 1.0 if count <= window else window / count


class AcceptanceEstimator:
    """Per-token acceptance per request (the geometric model's maximum-likelihood estimate), shrunk towards
    the estimate over all requests so a new request starts from what the workload has shown.

    Every count is over an exponential window: over all requests `window` trials (or proposals), per request
    `request_window`. A long-running server whose workload shifts (copying turns into free text) learns the new
    acceptance within a few windows, not in proportion to everything it served before."""

    def __init__(self, prior_weight: float = 4.0, window: float = 1024.0, request_window: float = 64.0) -> None:
        self.prior_weight = prior_weight
        self.window, self.request_window = window, request_window
        self.total = _Counts()
        self._requests: dict[str, _Counts] = {}
        # Over all requests, per draft position: verifications that reached it, and those that accepted it (faded
        # with the overall counts).
        self._reached: list[float] = []
        self._accepted_at: list[float] = []

    def observe(self, request_id: str, num_drafts: int, num_accepted: int) -> None:
        trials = num_accepted + (num_accepted < num_drafts)
        self._requests.setdefault(request_id, _Counts()).verified(num_accepted, trials, self.request_window)
        fade = self.total.verified(num_accepted, trials, self.window)
        if len(self._reached) < num_drafts:
            grow = num_drafts - len(self._reached)
            self._reached += [0.0] * grow
            self._accepted_at += [0.0] * grow
        for position in range(len(self._reached)):
            reached = position < trials
            self._reached[position] = (self._reached[position] + reached) * fade
            self._accepted_at[position] = (self._accepted_at[position] + (position < num_accepted)) * fade

    def position_factors(self, k: int, weight: float = 8.0) -> list[float]:
        """Per draft position 0..k-1, its acceptance (given the drafts before it were accepted) over the per-token
        rate: 1 everywhere where acceptance is geometric. It is not: drafts tend to stand or fall together (on a
        copy-heavy workload the first draft was accepted 0.76 of the time, later ones 0.87-0.93 given the first), so
        one rate overvalued short drafts, and adaptive chose k < K on half its steps where K yielded more. Each
        position is shrunk towards the overall rate (`weight` verifications' worth) until it has been reached often."""
        overall = (self.total.accepted + 1) / (self.total.trials + 2)
        factors = []
        for position in range(k):
            seen = position < len(self._reached)
            reached, accepted = (self._reached[position], self._accepted_at[position]) if seen else (0, 0)
            factors.append((accepted + weight * overall) / (reached + weight) / overall)
        return factors

    def alpha(self, request_id: str) -> float:
        overall = (self.total.accepted + 1) / (self.total.trials + 2)  # a weak start at 0.5 until verifications are seen
        c = self._requests.get(request_id, _Counts())
        return (c.accepted + self.prior_weight * overall) / (c.trials + self.prior_weight)

    def asked(self, request_id: str, drafted: bool) -> None:
        """The proposer was asked for drafts for this request and found some (or not)."""
        self._requests.setdefault(request_id, _Counts()).proposed(drafted, self.request_window)
        self.total.proposed(drafted, self.window)

    def draft_rate(self, request_id: str) -> float:
        """How often a proposal for this request finds drafts, shrunk towards the rate over all requests (which
        starts at 1: a row is assumed to draft until proposals come back empty)."""
        overall = (self.total.drafted + 1) / (self.total.asked + 1)
        c = self._requests.get(request_id, _Counts())
        return (c.drafted + self.prior_weight * overall) / (c.asked + self.prior_weight)

    def measured(self) -> float | None:
        """Per-draft-token acceptance over the window of recent verifications (no prior): what a simulator draws from."""
        return self.total.accepted / self.total.trials if self.total.trials else None

    def forget(self, request_id: str) -> None:
        self._requests.pop(request_id, None)


@dataclass(slots=True)
class Candidate:
    """One k as adaptive speculation weighs it: predicted seconds (target step + drafting) and expected tokens."""

    k: int
    seconds: float
    tokens: float

    @property
    def rate(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def candidates(
    max_k: int,
    limits: list[int],  # per request, the most drafts it can use (max_tokens, max_model_len)
    contexts: list[int],
    alphas: list[float],
    target: StepTimeModel,
    draft_seconds: Callable[[list[int], list[int]], float],
    draft_rates: list[float] | None = None,  # per request, how often its proposals find drafts (1: always)
    position_factors: list[float] | None = None,  # acceptance by draft position over the per-token rate (1: geometric)
) -> list[Candidate]:
    """Each k in 0..max_k: the predicted seconds its drafts and decodes take and the output tokens they are expected
    to yield.

    The engine's predictor prices a verification as the decode rows the runner computes it as (its positions'
    attention, matmul rows and logits), so every step it runs, with or without drafts, teaches it what a draft costs.
    A prefill chunk that shares the step is left out: its prompt is prefilled whatever k is (drafts that take budget
    from it defer it, they do not save it), and the runner computes decode rows apart from a chunk's rows (their own
    matmul kernel and attention), so what drafts add to a step does not shrink beside one. Priced beside the chunk
    instead, through a token table whose large counts are fitted on prompt chunks, a copy-heavy workload's k = 4 at 16
    concurrent looked 1.75x k = 0's rate where it measured 0.95x.
    """
    rates = draft_rates or [1.0] * len(limits)
    samples = [True] * len(limits)

    def price(drafts: list[int]) -> float:
        return target.step_seconds(StepShape([1 + x for x in drafts], contexts, samples, drafts))

    price_0 = price([0] * len(limits))
    tokens, drafts = totals_by_k(max_k, limits, alphas, rates, position_factors)
    out = [Candidate(0, price_0, tokens[0])]
    for k in range(1, max_k + 1):
        ks = [min(k, limit) for limit in limits]
        # What the drafts add, for the drafts expected: rows whose proposals find nothing verify nothing.
        added = (price(ks) - price_0) * drafts[k] / max(sum(ks), 1)
        # More tokens never make a step cheaper: a fit that says otherwise (early, few steps seen) is not believed.
        seconds = max(out[-1].seconds, price_0 + added + draft_seconds(ks, contexts))
        out.append(Candidate(k, seconds, tokens[k]))
    return out


def choose_k(max_k: int, limits: list[int], contexts: list[int], alphas: list[float], target: StepTimeModel,
             draft_seconds: Callable[[list[int], list[int]], float], draft_rates: list[float] | None = None) -> int:
    """The batch's k in 0..max_k with the most expected tokens per predicted second (ties: the smaller k)."""
    return best_k(candidates(max_k, limits, contexts, alphas, target, draft_seconds, draft_rates))


def best_k(cands: list[Candidate]) -> int:
    best = None
    for c in cands:
        if best is None or c.rate > best.rate * 1.02:  # a k must win clearly: a prediction error should not buy speculation
            best = c
    return best.k


@dataclass(slots=True)
class ZeroHold:
    """A k = 0 choice that won clearly, kept for the next few decoding steps without weighing every k again.

    Under heavy load k = 0 wins step after step, and weighing it (an acceptance estimate per row, each k's price) cost
    ~1.7% of a 32-row step. What could turn the choice is re-weighed soon: anything within `steps` steps (a refitted
    predictor, new requests' acceptance), at once when a quarter of the rows left (verifying is cheaper beside fewer
    rows) or an exploration is due (the caller asks `Exploration` first)."""

    margin: float = 1.1  # k = 0's rate over the best k > 0's for the choice to count as clear
    steps: int = 8
    rows: int = 0  # decoding rows the held choice was weighed for
    left: int = 0  # steps it is still held for

    def weighed(self, cands: list[Candidate], k: int, rows: int) -> None:
        """The prices were weighed for `rows` decoding rows and the step runs k."""
        others = max((c.rate for c in cands[1:]), default=0.0)
        clear = k == 0 and cands[0].rate >= self.margin * others
        self.rows, self.left = rows, self.steps if clear else 0

    def keeps(self, rows: int) -> bool:
        """Whether this step, with `rows` decoding rows, runs k = 0 without weighing (one held step spent)."""
        if self.left <= 0 or 4 * rows < 3 * self.rows:
            self.left = 0
            return False
        self.left -= 1
        return True


@dataclass(slots=True)
class Exploration:
    """Now and then a step on the side of k = 0 the prices do not favour, so both stay measured.

    The predictor learns a step's price only from the shapes it runs: a server that always verifies never measures
    a plain decode step (nor refreshes acceptance while it never verifies), and a wrong price on the side it avoids
    would hold for ever. After `every` steps on one side (held ones included) one step runs the other side's best k;
    each exploration that does not turn the choice doubles the wait, up to `most` steps: there one exploring k = 4
    verification of 32 rows costs ~5 decode steps, ~0.5% of throughput."""

    every: int = 64
    most: int = 1024
    interval: int = 0  # steps on one side before the next exploration (from `every`)
    streak: int = 0  # steps in a row on the side the prices favour
    speculating: bool = False  # that side: k > 0

    def __post_init__(self) -> None:
        self.interval = self.interval or self.every

    def step(self, k: int, other: int) -> int:
        """The prices chose k; `other` is the best k on the other side. Returns the k to run."""
        if (k > 0) != self.speculating:  # the choice turned: whatever was learnt is fresh
            self.speculating, self.streak, self.interval = k > 0, 0, self.every
        self.streak += 1
        if self.streak <= self.interval:
            return k
        self.streak, self.interval = 0, min(2 * self.interval, self.most)
        return other

    def held(self) -> None:
        """A k = 0 step ran without weighing (ZeroHold): it counts towards the next exploration."""
        self.streak += 1

    @property
    def due(self) -> bool:
        return self.streak >= self.interval
