"""EngineReplica: one engine in its own process (a Ray actor), streaming each request's outputs back."""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from sloserve.config import EngineConfig
from sloserve.engine.async_engine import AsyncLLMEngine, EngineStoppedError, StreamOutput
from sloserve.engine.clock import Clock, MonotonicClock
from sloserve.engine.scheduler import SchedulerConfig
from sloserve.request import SLO, SamplingParams
from sloserve.router.load import ReplicaLoad
from sloserve.router.outbox import Outbox, OutputBatch
from sloserve.startup_heap import freeze_startup_heap


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
    (`ray.remote(EngineReplica)`). Requests come in by `add`; the outputs of all of them go out through one
    stream (`outputs`), a batch per item, each with the replica's load."""

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
        self._outbox = Outbox()
        self._forwarding: dict[str, asyncio.Task] = {}  # request id -> the task moving its outputs to the outbox
        self._subscription = 0  # the latest `outputs` call; an older one stops (one reader at a time)
        self._incarnation, self._reports = uuid.uuid4().hex, 0  # this run of the replica; its reports so far
        # A step loop that died leaves the process alive, and Ray restarts only a process that ends.
        self._exit_process = exit_process
        self._drain_s = drain_s
        self._exiting = False

    def _start(self) -> None:
        if not self.engine.started:  # the loop exists only once the actor serves its first call
            self.engine.start()
            freeze_startup_heap()  # a replica process pauses for a full collection as the front would

    async def info(self) -> ModelInfo:
        self._start()
        return ModelInfo(self.core.max_model_len, self.core.vocab_size, self.core.tokenizer, self.core.config,
                         self.core.speculator is not None)

    async def load(self) -> ReplicaLoad:
        self._start()
        if self.engine.dead_error is not None and not self._exiting:
            self._exiting = True
            asyncio.get_running_loop().create_task(self._exit_when_drained())
        return self._load()  # not ready: routed around

    async def _exit_when_drained(self) -> None:
        """The step loop died (its requests failed with engine_stopped): once their streams have carried the
        error out (or after `drain_s`), end the process so that Ray restarts the replica."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._drain_s
        while (self._forwarding or len(self._outbox)) and loop.time() < deadline:
            await asyncio.sleep(0.02)
        logger.error("replica %d: the engine loop died (%r); exiting so that Ray restarts it",
                     self.replica, self.engine.dead_error)
        self._exit_process(1)

    def _load(self) -> ReplicaLoad:
        self._reports += 1
        load = ReplicaLoad.of(self.replica, self.engine, self.num_received)
        load.incarnation, load.seq = self._incarnation, self._reports
        return load

    async def add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                  priority: int = 0, slo: SLO | None = None, waited_s: float = 0.0) -> None:
        """Returns once the engine took the request (or raises its ValueError); its outputs go to `outputs`.

        `waited_s`: how long ago the request reached the front end (its arrival on this engine's clock, which
        need not be the front's: replicas may run on other machines).
        """
        self._start()
        self.num_received += 1
        if request_id in self._early_aborts:  # the front aborted before this call ran
            self._early_aborts.discard(request_id)
            self._outbox.fail(request_id, EngineStoppedError("the request was aborted before it started"))
            return
        arrival = self.core.clock.now() - max(0.0, waited_s)
        stream = await self.engine.add_request(request_id, prompt_token_ids, params, priority=priority, slo=slo,
                                               arrival_time=arrival)
        task = asyncio.get_running_loop().create_task(self._forward(request_id, stream))
        self._forwarding[request_id] = task
        task.add_done_callback(lambda _: self._forwarding.pop(request_id, None))

    async def _forward(self, request_id: str, stream) -> None:
        try:
            async for item in stream:
                self._outbox.put(request_id, item)
        except Exception as error:  # noqa: BLE001 - the front learns every way a request ends
            self._outbox.fail(request_id, error)

    async def outputs(self):
        """The stream the front reads: an OutputBatch whenever requests have moved. A new call takes over from an
        older one (the front reconnecting); when the reader goes away, every request here is aborted, as a
        client that disconnects: nobody would read their tokens."""
        self._start()
        self._subscription += 1
        mine = self._subscription
        try:
            while mine == self._subscription:
                updates = await self._outbox.take()
                if mine != self._subscription:  # a newer reader took over while this one waited
                    self._outbox.give_back(updates)
                    return
                for u in updates:
                    if u.output is not None:
                        u.output = wire_copy(u.output)
                yield OutputBatch(updates, self._load())
        except (GeneratorExit, asyncio.CancelledError):  # the reader went away (not a newer one taking over)
            if mine == self._subscription:
                self.engine.abort_all()
            raise

    async def abort(self, request_id: str) -> None:
        if self.engine.has_request(request_id):
            self.engine.abort(request_id)
        else:
            self._early_aborts.add(request_id)
