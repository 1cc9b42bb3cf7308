"""EngineReplica: one engine in its own process (a Ray actor), streaming each request's outputs back."""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import Callable
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
    speculating: bool = False
    # Behind the router: the replicas' spec-decode counters summed (ReplicaSpecTotals), for /metrics.
    speculator: object | None = None
    clock: Clock = field(default_factory=MonotonicClock)  # the front's own: arrivals are stamped on it


ACCEPTED = "accepted"  # the first item of every stream: the engine took the request

logger = logging.getLogger("sloserve.router")


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
                 num_threads: int | None = None, exit_process: Callable[[int], None] = os._exit,
                 drain_s: float = 2.0) -> None:
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
        self._open_streams = 0
        # A step loop that died leaves the process alive, and Ray restarts only a process that ends.
        self._exit_process = exit_process
        self._drain_s = drain_s
        self._exiting = False

    def _start(self) -> None:
        if not self.engine.started:  # the loop exists only once the actor serves its first call
            self.engine.start()

    async def info(self) -> ModelInfo:
        self._start()
        return ModelInfo(self.core.max_model_len, self.core.vocab_size, self.core.tokenizer, self.core.config,
                         self.core.speculator is not None)

    async def load(self) -> ReplicaLoad:
        self._start()
        if self.engine.dead_error is not None and not self._exiting:
            self._exiting = True
            asyncio.get_running_loop().create_task(self._exit_when_drained())
        return ReplicaLoad.of(self.replica, self.engine, self.num_received)  # not ready: routed around

    async def _exit_when_drained(self) -> None:
        """The step loop died (its requests failed with engine_stopped): once their streams have carried the
        error out (or after `drain_s`), end the process so that Ray restarts the replica."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._drain_s
        while self._open_streams and loop.time() < deadline:
            await asyncio.sleep(0.02)
        logger.error("replica %d: the engine loop died (%r); exiting so that Ray restarts it",
                     self.replica, self.engine.dead_error)
        self._exit_process(1)

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
        self._open_streams += 1
        finished = False
        try:
            stream = await self.engine.add_request(request_id, prompt_token_ids, params, priority=priority, slo=slo,
                                                   arrival_time=arrival)
            yield ACCEPTED
            async for item in stream:
                finished = item.finished
                yield wire_copy(item)
        finally:
            self._open_streams -= 1
            if not finished:  # the caller went away (cancelled): free the request's blocks
                self.engine.abort(request_id)

    async def abort(self, request_id: str) -> None:
        if self.engine.has_request(request_id):
            self.engine.abort(request_id)
        else:
            self._early_aborts.add(request_id)
