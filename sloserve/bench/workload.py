"""Workloads: a seeded list of request specs (prompt, lengths, arrival offset); no HTTP, no clocks."""
# Shared by the load generator and the simulator, so it only describes *what*
# is sent and *when* (offsets in seconds from the benchmark start).
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np

from sloserve.bench.arrivals import Arrivals
from sloserve.bench.lengths import LengthDist
from sloserve.bench.multiturn import MultiTurnSource
from sloserve.bench.sharegpt import ShareGPTSource
from sloserve.bench.synthetic import SyntheticSource
from sloserve.bench.tokens import Tokenizer
from sloserve.bench.trace import TraceSource

Source = SyntheticSource | ShareGPTSource | TraceSource | MultiTurnSource

# Independent random streams, so that changing the rate in a sweep changes
# only the gaps (and with the same unit draws: common random numbers), never
# the prompts; and warm-up prompts differ from measured ones (no cache hits). A sweep's probes each
# take another `draw` of prompts (the shared prefix, drawn from its own stream, stays shared).
_PROMPTS, _ARRIVALS, _PREFIX = 0, 1, 2
_MAIN, _WARMUP = 0, 1


@dataclass(slots=True)
class RequestSpec:
    index: int
    prompt: str | list[int]  # text, or token ids for the completions API
    prompt_len: int  # tokens (estimated when there is no tokenizer)
    output_len: int  # sent as max_tokens
    arrival_s: float  # offset from the benchmark start
    messages: list[dict] | None = None  # the conversation, for chat endpoints (multi-turn); else `prompt` is sent


@dataclass(slots=True)
class Workload:
    """Where prompts come from, when they arrive, how many, and the seed.

    Requests stop at `num_requests` or at the first arrival >= `duration_s`,
    whichever comes first; `num_requests=None` means the whole trace, or
    needs a duration and a finite rate. `max_concurrency` (closed-loop cap on requests in flight) belongs to
    the load shape, but is enforced by whoever plays the workload.
    """

    source: Source = field(default_factory=SyntheticSource)
    arrivals: Arrivals = field(default_factory=Arrivals)
    num_requests: int | None = 1000
    duration_s: float | None = None
    max_concurrency: int | None = None
    seed: int = 0
    draw: int = 0  # which set of prompts the seed gives (a sweep takes a fresh one per probe)
    # Text prompts go out as the tokenizer's ids (SGLang bench's --tokenize-prompt): servers with other tokenizers,
    # or none that matches, then compute exactly the same tokens.
    tokenize_prompt: bool = False

    def __post_init__(self) -> None:
        if self.arrivals.kind == "trace" and not isinstance(self.source, TraceSource):
            raise ValueError("trace arrivals need a trace dataset")
        finite = isinstance(self.source, TraceSource) or (self.duration_s is not None and self._open_loop_finite())
        if self.num_requests is None and not finite:
            raise ValueError("without num_requests, replay a trace or give a duration and a finite, non-burst rate")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")

    def requests(self, tokenizer: Tokenizer | None = None) -> list[RequestSpec]:
        return self._build(self.num_requests, _MAIN, tokenizer)

    def warmup_requests(self, k: int, tokenizer: Tokenizer | None = None) -> list[RequestSpec]:
        """k requests from the same source with other prompts, all at offset 0."""
        if k <= 0:
            return []
        specs = self._build(k, _WARMUP, tokenizer, arrivals=False)
        return [dataclasses.replace(s, arrival_s=0.0) for s in specs]

    def with_rate(self, rate: float) -> Workload:
        """The same workload at another rate (bursts become Poisson), for sweeps."""
        kind = self.arrivals.kind if self.arrivals.kind in ("constant", "poisson", "gamma") else "poisson"
        return dataclasses.replace(self, arrivals=Arrivals(kind, rate, self.arrivals.burstiness))

    def with_draw(self, draw: int) -> Workload:
        """The same workload with other prompts (same lengths' distribution, same shared prefix, same gaps)."""
        return dataclasses.replace(self, draw=draw)

    def _build(self, n: int | None, variant: int, tok: Tokenizer | None, arrivals: bool = True) -> list[RequestSpec]:
        # Draw 0 keeps the stream it always had, so a seed gives the prompts it gave before draws existed.
        prompt_rng = self._rng(_PROMPTS, variant) if self.draw == 0 else self._rng(_PROMPTS, variant, self.draw)
        if isinstance(self.source, TraceSource):
            items, trace_offsets = self.source.sample(n if n is not None else 1 << 62, prompt_rng, tok)
            offsets = self.arrivals.offsets(len(items), self._rng(_ARRIVALS, variant), trace_offsets)
        else:
            offsets = self._offsets(n, variant) if arrivals else [0.0] * (n or 0)
            if isinstance(self.source, SyntheticSource):
                items = self.source.sample(len(offsets), prompt_rng, self._rng(_PREFIX, _MAIN), tok)
            else:
                items = self.source.sample(len(offsets), prompt_rng, tok)
        if arrivals and self.duration_s is not None:
            items = [it for it, t in zip(items, offsets) if t < self.duration_s]
        if self.tokenize_prompt:
            items = [self._tokenized(it, tok) for it in items]
        return [RequestSpec(i, it[0], it[1], it[2], t, *it[3:]) for i, (it, t) in enumerate(zip(items, offsets))]

    @staticmethod
    def _tokenized(item: tuple, tok: Tokenizer | None) -> tuple:
        if tok is None:
            raise ValueError("--tokenize-prompt needs --tokenizer (the ids sent are that tokenizer's)")
        if not isinstance(item[0], str):
            return item  # already ids
        ids = tok.encode(item[0])
        return (ids, len(ids), *item[2:])

    def _offsets(self, n: int | None, variant: int) -> list[float]:
        if n is not None:
            return self.arrivals.offsets(n, self._rng(_ARRIVALS, variant))
        # Open-ended: draw more arrivals until they cover the duration.
        n = max(1, math.ceil(self.arrivals.rate * self.duration_s))
        while True:
            offsets = self.arrivals.offsets(n, self._rng(_ARRIVALS, variant))
            if offsets[-1] >= self.duration_s:
                return [t for t in offsets if t < self.duration_s]
            n *= 2

    def _open_loop_finite(self) -> bool:
        return self.arrivals.kind in ("constant", "poisson", "gamma") and math.isfinite(self.arrivals.rate)

    def _rng(self, stream: int, variant: int, *more: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, stream, variant, *more])

    def to_dict(self) -> dict:
        return {
            "source": self.source.to_dict(),
            "arrivals": self.arrivals.to_dict(),
            "num_requests": self.num_requests,
            "duration_s": self.duration_s,
            "max_concurrency": self.max_concurrency,
            "seed": self.seed,
            "draw": self.draw,
            "tokenize_prompt": self.tokenize_prompt,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Workload:
        src = d["source"]
        kinds = {"random": SyntheticSource, "sharegpt": ShareGPTSource, "trace": TraceSource, "multiturn": MultiTurnSource}
        return cls(
            source=kinds[src["name"]].from_dict(src),
            arrivals=Arrivals.from_dict(d["arrivals"]),
            num_requests=d["num_requests"],
            duration_s=d["duration_s"],
            max_concurrency=d["max_concurrency"],
            seed=d["seed"],
            draw=d.get("draw", 0),  # results saved before draws existed
            tokenize_prompt=d.get("tokenize_prompt", False),
        )


@dataclass(slots=True)
class WorkloadOptions:
    """The workload flags `sloserve bench` and `sloserve simulate` share (vLLM's names), as one value."""

    dataset_name: str = "random"  # random | sharegpt | trace | multiturn
    dataset_path: str | None = None
    num_prompts: int | None = None  # None: 1000, a whole trace, or as many as `duration` takes
    request_rate: float = math.inf
    burstiness: float = 1.0
    arrival: str = "auto"  # auto | burst | synchronous | constant | poisson | gamma | trace
    max_concurrency: int | None = None
    random_input_len: int = 1024
    random_output_len: int = 128
    random_range_ratio: float = 0.0
    random_dist: str = "uniform"
    random_input_min: int = 1
    random_input_max: int | None = None
    random_output_min: int = 1
    random_output_max: int | None = None
    random_prefix_len: int = 0
    vocab_size: int = 32000
    prompt_format: str = "ids"  # ids | words
    sharegpt_output_len: int | None = None
    seed: int = 0
    duration: float | None = None
    multiturn_turns: int = 4  # exchanges per conversation (--dataset-name multiturn)
    tokenize_prompt: bool = False  # send text prompts as the tokenizer's ids

    def build(self) -> Workload:
        """The Workload these options describe."""
        kind, concurrency = self._arrival()
        open_ended = self.dataset_name == "trace" or (
            self.duration and math.isfinite(self.request_rate) and kind != "burst")
        n = self.num_prompts if self.num_prompts is not None else (None if open_ended else 1000)
        return Workload(self._source(), Arrivals(kind, self.request_rate, self.burstiness), n, self.duration,
                        concurrency, self.seed, tokenize_prompt=self.tokenize_prompt)

    def _source(self) -> Source:
        if self.dataset_name == "random":
            return SyntheticSource(
                LengthDist(self.random_input_len, self.random_dist, self.random_range_ratio, self.random_input_min,
                           self.random_input_max),
                LengthDist(self.random_output_len, self.random_dist, self.random_range_ratio, self.random_output_min,
                           self.random_output_max),
                self.random_prefix_len, self.vocab_size, self.prompt_format)
        if self.dataset_name == "sharegpt":
            return ShareGPTSource(self.dataset_path or "", self.sharegpt_output_len)
        if self.dataset_name == "trace":
            return TraceSource(self.dataset_path or "", self.vocab_size, self.prompt_format)
        if self.dataset_name == "multiturn":
            return MultiTurnSource(self.dataset_path or "", self.multiturn_turns, self.sharegpt_output_len)
        raise ValueError(f"--dataset-name must be random, sharegpt, trace or multiturn, got {self.dataset_name!r}")

    def _arrival(self) -> tuple[str, int | None]:
        kind, rate, cap = self.arrival, self.request_rate, self.max_concurrency
        if kind == "auto":
            if math.isinf(rate):
                return ("trace" if self.dataset_name == "trace" else "burst"), cap
            return ("poisson" if self.burstiness == 1.0 else "gamma"), cap
        if kind == "synchronous":
            return "burst", 1
        if kind in ("constant", "poisson", "gamma") and math.isinf(rate):
            raise ValueError(f"--arrival {kind} needs a finite --request-rate")
        return kind, cap
