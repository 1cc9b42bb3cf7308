"""ReplicaSet: N engine replicas (Ray actors) behind the router, looking to the server like one AsyncLLMEngine."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from dataclasses import dataclass, field

from ray.exceptions import RayActorError, RayTaskError

from sloserve.engine.async_engine import EngineStats, EngineStepError, EngineStoppedError, RequestStream, StreamOutput
from sloserve.request import SLO, CompletionOutput, RequestOutput, SamplingParams
from sloserve.router.replica import ModelInfo
from sloserve.router.replica_link import ReplicaLinks
from sloserve.router.router import NoReplicaError, RouteRefused, Router
from sloserve.router.spec_totals import ReplicaSpecTotals

logger = logging.getLogger(__name__)


class ReplicaDiedError(EngineStoppedError):
    """The replica running a request died after the request's first output: it cannot move elsewhere."""


@dataclass(slots=True)
class _InFlight:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int
    slo: SLO | None
    replica: int
    arrival_time: float
    stream: RequestStream
    accepted: asyncio.Future
    aborted: bool = False
    last: StreamOutput | None = None
    task: asyncio.Task | None = field(default=None, repr=False)
    # Set by the replica's output reader: `ended` with the request's error (None: finished); `lost` when its
    # replica died (the request's own task decides between a retry and an error).
    ended: asyncio.Future | None = field(default=None, repr=False)
    lost: asyncio.Event = field(default_factory=asyncio.Event, repr=False)


class ReplicaSet:
    """Routes each request to a replica actor (`add`) and reads each replica's one output stream (batches of
    every request's newest output, with the replica's load) into the requests' local RequestStreams.

    A replica that dies is marked down at once (the router routes around it); its requests that had
    streamed nothing yet are sent to another replica, the others fail with ReplicaDiedError. Ray
    restarts the actor; its next load report puts it back in the router.
    """

    def __init__(self, actors: list, info: ModelInfo, router: Router, *, poll_s: float = 0.02,
                 down_after_s: float = 2.0) -> None:
        self.actors = actors
        self.engine = info  # what the server reads of "the engine": tokenizer, vocab, max model len
        self.router = router
        self.on_finished = None
        self._tracked: dict[str, _InFlight] = {}
        self._watchers: list[asyncio.Task] = []
        self._background: set[asyncio.Task] = set()
        self._stopping = False
        self.owns_ray = False  # whether stopping the replicas also stops Ray (launch.py decides)
        self.spec_totals = ReplicaSpecTotals()
        self.links = ReplicaLinks(actors, router, info.clock, self._tracked, self.spec_totals, poll_s=poll_s,
                                  down_after_s=down_after_s)
        if info.speculating:
            info.speculator = self.spec_totals  # what /metrics reads the spec-decode counters from

    # -- the AsyncLLMEngine surface the server uses ---------------------------------------------
    def start(self) -> None:
        self._watchers = self.links.start()

    async def shutdown(self) -> None:
        self._stopping = self.links.stopping = True
        self.abort_all()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wait_until_idle(), 10.0)
        for task in [*self._watchers, *(f.task for f in self._tracked.values() if f.task)]:
            task.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)

    @property
    def is_running(self) -> bool:
        return not self._stopping and bool(self.router.ready_replicas)

    @property
    def num_unfinished(self) -> int:
        return len(self._tracked)

    def _ready_loads(self):
        return [load for load in self.router.loads.values() if load.ready]

    @property
    def num_waiting(self) -> int:
        return sum(load.num_waiting for load in self._ready_loads())

    @property
    def num_waiting_tokens(self) -> int:
        return sum(load.num_waiting_tokens for load in self._ready_loads())

    @property
    def num_free_slots(self) -> int:
        return sum(max(0, self.engine.config.max_num_seqs - load.num_running) for load in self._ready_loads())

    def replica_stats(self) -> list[tuple[str, EngineStats, int]]:
        """(replica label, its last stats, its waiting count) for /metrics; a replica down reports zeros."""
        return [(str(i), load.stats if load.ready else EngineStats(), load.num_waiting if load.ready else 0)
                for i, load in sorted(self.router.loads.items())]

    @property
    def stats(self) -> EngineStats:
        """The replicas' stats summed (the step-time error: the worst replica's)."""
        total = EngineStats()
        for _, s, _ in self.replica_stats():
            total.num_running += s.num_running
            total.num_waiting += s.num_waiting
            total.num_waiting_tokens += s.num_waiting_tokens
            total.num_used_blocks += s.num_used_blocks
            total.num_blocks += s.num_blocks
            total.prefix_cache_queries += s.prefix_cache_queries
            total.prefix_cache_hits += s.prefix_cache_hits
            if not math.isnan(s.step_time_error):
                total.step_time_error = s.step_time_error if math.isnan(total.step_time_error) else max(
                    total.step_time_error, s.step_time_error)
        return total

    async def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, *,
                          priority: int = 0, slo: SLO | None = None, arrival_time: float | None = None) -> RequestStream:
        """As AsyncLLMEngine's; `arrival_time` is on `self.engine.clock` (the front's)."""
        if not self.is_running:
            raise EngineStoppedError("no replica is running")
        if request_id in self._tracked:
            raise ValueError(f"request id {request_id!r} is already in use")
        try:
            route = self.router.route(list(prompt_token_ids), slo, params=params, priority=priority,
                                      now=self.engine.clock.now())
        except NoReplicaError:
            raise EngineStoppedError("no replica is ready") from None
        if route.replica is None:
            raise RouteRefused(route)
        loop = asyncio.get_running_loop()
        now = self.engine.clock.now()
        flight = _InFlight(request_id, list(prompt_token_ids), params, priority, slo, route.replica,
                           now if arrival_time is None else arrival_time, RequestStream(request_id), loop.create_future())
        self._tracked[request_id] = flight
        flight.task = loop.create_task(self._run(flight))
        try:
            await asyncio.shield(flight.accepted)
        except asyncio.CancelledError:
            self.abort(request_id)
            raise
        return flight.stream

    def abort(self, request_id: str) -> None:
        flight = self._tracked.get(request_id)
        if flight is None or flight.aborted:
            return
        flight.aborted = True
        self._fire(self.actors[flight.replica].abort.remote(request_id))

    def abort_all(self) -> None:
        for request_id in list(self._tracked):
            self.abort(request_id)

    async def wait_until_idle(self, poll_s: float = 0.05) -> None:
        while self._tracked:
            await asyncio.sleep(poll_s)

    # -- one request ----------------------------------------------------------------------------
    async def _run(self, flight: _InFlight) -> None:
        error: BaseException | None = None
        tried: set[int] = set()
        try:
            while True:
                flight.ended, flight.lost = asyncio.get_running_loop().create_future(), asyncio.Event()
                try:
                    await self._add_to(flight)
                    lost = asyncio.ensure_future(flight.lost.wait())
                    try:
                        await asyncio.wait({flight.ended, lost}, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        lost.cancel()
                    if flight.ended.done():
                        error = flight.ended.result()
                        break
                except RayActorError:
                    pass
                self.links.down(flight.replica)  # the replica died: under the add, or while it ran the request
                tried.add(flight.replica)
                if flight.last is not None and flight.last.num_tokens > 0 or flight.aborted:
                    raise ReplicaDiedError(f"replica {flight.replica} died while running this request")
                # Nothing reached the client yet: the request can start over elsewhere. The old replica (restarted
                # by Ray, it may have taken the add after all) drops it.
                self._fire(self.actors[flight.replica].abort.remote(flight.request_id))
                try:
                    flight.replica = self.router.route(flight.prompt_token_ids, None, params=flight.params,
                                                       priority=flight.priority, now=self.engine.clock.now(), exclude=frozenset(tried)).replica
                except NoReplicaError:
                    raise EngineStoppedError("every replica is down") from None
                logger.warning("retrying %s on replica %d", flight.request_id, flight.replica)
        except RayTaskError as wrapped:
            error = wrapped.cause if isinstance(wrapped.cause, Exception) else EngineStepError(str(wrapped))
        except asyncio.CancelledError:
            error = EngineStoppedError("the server stopped")
        except Exception as failure:  # noqa: BLE001 - every accepted request must end
            error = failure
        finally:
            self._tracked.pop(flight.request_id, None)
            if flight.aborted and isinstance(error, EngineStoppedError) and not isinstance(error, ReplicaDiedError):
                error = None  # aborted before its replica started it: an abort, not a failure
            self._end(flight, error)

    async def _add_to(self, flight: _InFlight) -> None:
        waited = self.engine.clock.now() - flight.arrival_time
        await self.actors[flight.replica].add.remote(flight.request_id, flight.prompt_token_ids, flight.params,
                                                     flight.priority, flight.slo, waited)
        if not flight.accepted.done():
            flight.accepted.set_result(None)

    def _end(self, flight: _InFlight, error: BaseException | None) -> None:
        if not flight.accepted.done():  # refused by the engine (bad input) or never reached one
            flight.accepted.set_exception(error or EngineStoppedError("the request was aborted before it started"))
            return
        out = flight.last.output if flight.last is not None else self._empty_output(flight)
        if error is not None:
            flight.stream.fail(error)
        elif flight.last is None or not flight.last.finished:
            out.finished = True
            for completion in out.outputs:
                completion.finish_reason = completion.finish_reason or "abort"
            flight.stream.put(StreamOutput.of(out))
        if self.on_finished is not None:
            try:
                self.on_finished(out, error)
            except Exception:  # noqa: BLE001 - a metrics fault must not fail the request
                logger.exception("on_finished hook failed")

    def _empty_output(self, flight: _InFlight) -> RequestOutput:
        return RequestOutput(flight.request_id, None, flight.prompt_token_ids,
                             [CompletionOutput(0, "", [], None, None, [])], True, flight.arrival_time, None, None, 0)

    def _fire(self, ref) -> None:
        """Send a call whose answer nobody needs, but whose failure (a dead actor) must not go unretrieved."""
        async def settle() -> None:
            with contextlib.suppress(Exception):
                await ref
        task = asyncio.get_running_loop().create_task(settle())
        self._background.add(task)
        task.add_done_callback(self._background.discard)
