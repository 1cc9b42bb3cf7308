"""EngineReplica: one engine in its own process (a Ray actor), streaming each request's outputs back."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from sloserve.config import EngineConfig
from sloserve.engine.async_engine import AsyncLLMEngine, StreamOutput
from sloserve.engine.clock import Clock, MonotonicClock
from sloserve.engine.scheduler import SchedulerConfig
from sloserve.request import SLO, SamplingParams
from sloserve.router.load import ReplicaLoad


@dataclass(slots=True)
class ModelInfo:
    """What the front end needs of the model the replicas serve (it loads no weights itself)."""

    max_model_len: int
    vocab_size: int
    tokenizer: object | None
    config: SchedulerConfig
    speculator: None = None  # spec-decode counters are per replica and not gathered yet
    clock: Clock = field(default_factory=MonotonicClock)  # the front's own: arrivals are stamped on it


ACCEPTED = "accepted"  # the first item of every stream: the engine took the request


def wire_copy(item: StreamOutput) -> StreamOutput:
    """A snapshot safe to serialize while the engine's step thread keeps appending to the live lists."""
    frozen = [
        dataclasses.replace(c, token_ids=c.token_ids[:k], token_times=c.token_times[:k],
                            logprobs=None if c.logprobs is None else c.logprobs[:k])
        for c, k in zip(item.output.outputs, item.counts)
    ]
    return StreamOutput(dataclasses.replace(item.output, outputs=frozen), list(item.counts))


class EngineReplica:
    """Owns an AsyncLLMEngine on the actor's event loop. Ray wraps it as an async actor
    (`ray.remote(EngineReplica)`), so many `generate` streams run side by side on one loop."""

    def __init__(self, replica: int, config: EngineConfig, step_model: dict | None = None,
                 num_threads: int | None = None) -> None:
        import torch

        from sloserve.engine.cost import StepCostModel
        from sloserve.llm import build_engine

        if num_threads:
            torch.set_num_threads(num_threads)  # each replica its own share of the cores
        model = StepCostModel(tuple(step_model["knots"]), step_model["coefficients"]) if step_model else None
        self.replica = replica
        self.core = build_engine(config, model)
        self.engine = AsyncLLMEngine(self.core)
        self.engine.track_load = True  # the router predicts TTFT from the queue snapshot
        self.num_received = 0
        self._early_aborts: set[str] = set()

    def _start(self) -> None:
        if not self.engine.started:  # the loop exists only once the actor serves its first call
            self.engine.start()

    async def info(self) -> ModelInfo:
        self._start()
        return ModelInfo(self.core.max_model_len, self.core.vocab_size, self.core.tokenizer, self.core.config)

    async def load(self) -> ReplicaLoad:
        self._start()
        return ReplicaLoad.of(self.replica, self.engine, self.num_received)

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       priority: int = 0, slo: SLO | None = None, waited_s: float = 0.0):
        """Yields ACCEPTED once the engine took the request (or raises its ValueError), then each output.

        `waited_s`: how long ago the request reached the front end (its arrival on this engine's clock, which
        need not be the front's: replicas may run on other machines).
        """
        self._start()
        self.num_received += 1
        if request_id in self._early_aborts:  # the front aborted before this call ran
            self._early_aborts.discard(request_id)
            return
        arrival = self.core.clock.now() - max(0.0, waited_s)
        stream = await self.engine.add_request(request_id, prompt_token_ids, params, priority=priority, slo=slo,
                                               arrival_time=arrival)
        yield ACCEPTED
        finished = False
        try:
            async for item in stream:
                finished = item.finished
                yield wire_copy(item)
        finally:
            if not finished:  # the caller went away (cancelled): free the request's blocks
                self.engine.abort(request_id)

    async def abort(self, request_id: str) -> None:
        if self.engine.has_request(request_id):
            self.engine.abort(request_id)
        else:
            self._early_aborts.add(request_id)
