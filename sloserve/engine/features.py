"""Step shape -> feature vectors: the one definition the profiler fits and the simulator predicts with."""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the scheduler imports this module (its policies cost steps by shape)
    from sloserve.engine.scheduler import SchedulerOutput

# Terms of the executor's step time, after Vidur and DistServe. The linear layers' cost is a
# function of the step's batched tokens that is not a straight line on a CPU (BLAS switches
# kernels at small batch sizes: one or three rows cost about the same, four cost 1.5x more), so
# like Vidur's per-token-count profiles it is a piecewise-linear table over token counts: the
# "@k" terms are hat functions, whose coefficients are the cost at k tokens. There are two tables,
# decode positions and prompt tokens, because the CPU runner computes them apart: decode rows (a
# decode's one position, each of a verification's k + 1) always in its row-streaming matmul kernel,
# prompt chunks beside them in a GEMM. One table over a step's total tokens, fitted mostly on prompt
# chunks, priced 32 rows verifying 4 drafts at 18 ms against 48 measured, and beside a prompt chunk
# made drafts look almost free. Where one GEMM computes every row (a GPU) the sum of two tables
# still fits its cost; "step" is the fixed cost the two would otherwise each carry. Then linear terms:
_ATTENTION_TERMS = (
    "step",              # every step: the fixed cost of a forward pass
    "samples",           # rows that sample a token (LM head over the vocabulary, sampler)
    "requests",          # scheduled requests (slot mapping, block tables)
    "prefill_chunks",    # prefill spans (each is its own attention call)
    "prefill_attn",      # chunks without cached context: new tokens x new tokens (causal kernel)
    "prefill_ctx_attn",  # chunks on cached context: new tokens x attended tokens (masked kernel)
    "prefill_ctx",       # attended tokens of those chunks, gathered from the paged cache
    "decode_ctx",        # sum of decode context lengths
    # The PyTorch ops path pads decode rows to the longest context; the C++ kernel reads each context
    # in place (decode_ctx alone), and the fit then gives these two terms no weight.
    "decode_padded",     # decodes x longest decode context
    "decode_masked",     # the same rectangle when contexts differ: padding needs a mask and a slower kernel
)

# The engine's own work around the executor: scheduling, appending tokens, stop checks,
# detokenizing, building outputs.
OVERHEAD_TERMS = ("step", "requests", "samples")


def token_knots(max_num_batched_tokens: int) -> tuple[int, ...]:
    """1, 2, 3, 4 (where CPU BLAS changes regime), then powers of two, and the token budget itself."""
    knots, k = {1, 2, 3, 4}, 8
    while k < max_num_batched_tokens:
        knots.add(k)
        k *= 2
    knots.add(max_num_batched_tokens)
    return tuple(sorted(knots))


@dataclass(slots=True)
class StepShape:
    """Per scheduled request: new tokens this step, tokens already cached, whether it samples, and how many of its
    new tokens are drafts to verify (none where not given)."""

    new_tokens: list[int]
    contexts: list[int]
    samples: list[bool]
    spec_tokens: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.spec_tokens:
            self.spec_tokens = [0] * len(self.new_tokens)
        elif len(self.spec_tokens) != len(self.new_tokens):  # the features zip the rows: one short would drop a row
            raise ValueError(f"{len(self.spec_tokens)} draft counts for {len(self.new_tokens)} rows")

    @classmethod
    def of(cls, plan: SchedulerOutput) -> StepShape:
        return cls(
            [s.num_new_tokens for s in plan.scheduled],
            [s.num_computed_tokens for s in plan.scheduled],
            [s.samples for s in plan.scheduled],
            [len(s.spec_token_ids) for s in plan.scheduled],
        )

    def to_dict(self) -> dict:
        d = {"new_tokens": self.new_tokens, "contexts": self.contexts, "samples": self.samples}
        return {**d, "spec_tokens": self.spec_tokens} if any(self.spec_tokens) else d

    @classmethod
    def from_dict(cls, d: dict) -> StepShape:
        return cls(list(d["new_tokens"]), list(d["contexts"]), [bool(s) for s in d["samples"]],
                   list(d.get("spec_tokens", [])))


class ExecuteFeatures:
    """The executor's features for a given table of token counts (the knots are saved in the profile)."""

    def __init__(self, knots: tuple[int, ...]) -> None:
        if list(knots) != sorted(set(knots)) or knots[0] < 1:
            raise ValueError(f"token knots must be increasing positive integers, got {knots}")
        self.knots = tuple(knots)
        # A one-token span is a decode row to the runner: prompt tokens in a step are none or at least 2.
        self.prefill_knots = tuple(k for k in knots if k > 1)
        self.terms = (tuple(f"prefill_tokens@{k}" for k in self.prefill_knots)
                      + tuple(f"decode_tokens@{k}" for k in knots) + _ATTENTION_TERMS)

    def bends(self) -> list[list[float]]:
        """Rows over the terms: how far each table bends at each inner knot (see StepPredictor.refit)."""
        prefill, decode, rest = len(self.prefill_knots), len(self.knots), len(_ATTENTION_TERMS)
        return ([row + [0.0] * (decode + rest) for row in _bends(self.prefill_knots)]
                + [[0.0] * prefill + row + [0.0] * rest for row in _bends(self.knots)])

    def __call__(self, shape: StepShape) -> list[float]:
        prompt = prefill_chunks = prefill_attn = prefill_ctx_attn = prefill_ctx = 0
        decodes = decode_ctx = longest = 0
        samples = sum(shape.samples)
        shortest = None
        for n, c, drafts in zip(shape.new_tokens, shape.contexts, shape.spec_tokens):
            # The runner batches every one-token row as a decode, whatever its phase, and computes a verification's
            # n positions as n decodes (decode attention, the decode matmul kernel, logits at each): priced as a
            # prefill chunk on cached context, its cost came from prefill steps and missed by up to 3x.
            if n == 1 or drafts:
                decodes += n
                decode_ctx += n * (c + 1) + n * (n - 1) // 2
                longest = max(longest, c + n)
                shortest = c + 1 if shortest is None else min(shortest, c + 1)
                if drafts:
                    samples += n - 1  # the drafts' positions are scored too
            else:
                prompt += n
                prefill_chunks += 1
                if c:
                    prefill_ctx_attn += n * (c + n)
                    prefill_ctx += c + n
                else:
                    prefill_attn += n * n
        padded = decodes * longest
        return _hats(self.prefill_knots, prompt) + _hats(self.knots, decodes) + [
            1.0, samples, len(shape.new_tokens), prefill_chunks, prefill_attn, prefill_ctx_attn, prefill_ctx,
            decode_ctx, padded, padded if shortest != longest else 0,
        ]


def _bends(knots: tuple[int, ...]) -> list[list[float]]:
    """Per inner knot, its table value less the straight line through its neighbours' (zero where the table is
    straight there): rows in the coefficients of a table over `knots`."""
    rows = []
    for i in range(1, len(knots) - 1):
        lo, k, hi = knots[i - 1], knots[i], knots[i + 1]
        row = [0.0] * len(knots)
        row[i - 1], row[i], row[i + 1] = -(hi - k) / (hi - lo), 1.0, -(k - lo) / (hi - lo)
        rows.append(row)
    return rows


def _hats(knots: tuple[int, ...], tokens: int) -> list[float]:
    """Linear interpolation weights of `tokens` between its two neighbouring knots (beyond the last: scaled;
    none: all 0)."""
    out = [0.0] * len(knots)
    if tokens == 0:
        return out
    i = bisect.bisect_left(knots, tokens)
    if i == len(knots):
        out[-1] = tokens / knots[-1]
    elif knots[i] == tokens or i == 0:
        out[i] = 1.0
    else:
        lo, hi = knots[i - 1], knots[i]
        out[i] = (tokens - lo) / (hi - lo)
        out[i - 1] = 1.0 - out[i]
    return out


def overhead_features(shape: StepShape) -> list[float]:
    return [1.0, len(shape.new_tokens), sum(shape.samples)]
