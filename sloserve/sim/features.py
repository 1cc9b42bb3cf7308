"""Step shape -> feature vectors: the one definition the profiler fits and the simulator predicts with."""
from __future__ import annotations

from dataclasses import dataclass

from sloserve.engine.scheduler import SchedulerOutput

# Terms of the executor's step time, after Vidur and DistServe: a fixed launch cost, linear layers
# per batched token, the LM head and sampler per sampled row, per-request input preparation,
# prefill attention ~ chunk x context, decode attention ~ keys read. Decode keys appear twice
# because the runner pads every decode row to the batch's longest context: the fit decides how
# much of the cost follows the sum and how much the padded rectangle.
EXECUTE_TERMS = (
    "step",           # 1 per step
    "tokens",         # tokens computed in the step
    "samples",        # rows that sample a token (LM head over the vocabulary, sampler)
    "requests",       # scheduled requests (slot mapping, block tables)
    "prefill_chunks", # prefill spans (each is its own attention call)
    "prefill_attn",   # sum over prefill chunks of new tokens x attended tokens
    "prefill_ctx",    # cached-context tokens of prefill chunks (gathered from the paged cache)
    "decode_ctx",     # sum of decode context lengths
    "decode_padded",  # decodes x longest decode context
)

# The engine's own work around the executor: scheduling, appending tokens, stop checks,
# detokenizing, building outputs.
OVERHEAD_TERMS = ("step", "requests", "samples")


@dataclass(slots=True)
class StepShape:
    """Per scheduled request: new tokens this step, tokens already cached, whether it samples."""

    new_tokens: list[int]
    contexts: list[int]
    samples: list[bool]

    @classmethod
    def of(cls, plan: SchedulerOutput) -> StepShape:
        return cls(
            [s.num_new_tokens for s in plan.scheduled],
            [s.request.num_computed_tokens for s in plan.scheduled],
            [s.samples for s in plan.scheduled],
        )

    def to_dict(self) -> dict:
        return {"new_tokens": self.new_tokens, "contexts": self.contexts, "samples": self.samples}

    @classmethod
    def from_dict(cls, d: dict) -> StepShape:
        return cls(list(d["new_tokens"]), list(d["contexts"]), [bool(s) for s in d["samples"]])


def execute_features(shape: StepShape) -> list[float]:
    tokens = prefill_chunks = prefill_attn = prefill_ctx = decode_ctx = decodes = longest = 0
    for n, c in zip(shape.new_tokens, shape.contexts):
        tokens += n
        if n == 1:  # the runner batches every one-token row as a decode, whatever its phase
            decodes += 1
            decode_ctx += c + 1
            longest = max(longest, c + 1)
        else:
            prefill_chunks += 1
            prefill_attn += n * (c + n)
            if c:
                prefill_ctx += c + n
    return [1.0, tokens, sum(shape.samples), len(shape.new_tokens), prefill_chunks, prefill_attn, prefill_ctx,
            decode_ctx, decodes * longest]


def overhead_features(shape: StepShape) -> list[float]:
    return [1.0, len(shape.new_tokens), sum(shape.samples)]
