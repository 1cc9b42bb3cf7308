"""AsyncLLMEngine: the asyncio front of the engine, one background step loop and a stream per request."""
from __future__ import annotations

import asyncio
import logging
import math
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from sloserve.engine.admission import LoadSnapshot
from sloserve.engine.engine import LLMEngine
from sloserve.engine.request_group import RequestGroup, output_of
from sloserve.request import SLO, Request, RequestOutput, SamplingParams

logger = logging.getLogger(__name__)

_ERROR_EVERY = 32  # steps between recomputations of the predictor's running error for the stats


class EngineStepError(RuntimeError):
    """A step raised: the requests in the engine at that moment were failed with this error."""


class EngineStoppedError(RuntimeError):
    """The engine loop has stopped (shutdown, or a fault in the loop itself)."""


class _HandOverFault(Exception):
    """Taking queued adds and aborts failed outside any one request's handling: the front's own machinery is
    broken (not a step), so the loop dies rather than fail the running requests and try again."""


@dataclass(slots=True)
class StreamOutput:
    """A request's state right after one step.

    Each `output.outputs[i].token_ids` is the engine's live list and keeps growing in later steps, so the
    snapshot remembers how many of its tokens belong to this moment instead of copying the lists every step.
    """

    output: RequestOutput
    counts: list[int]  # tokens of each completion (choice) at this moment

    @classmethod
    def of(cls, output: RequestOutput) -> StreamOutput:
        return cls(output, [len(c.token_ids) for c in output.outputs])

    @property
    def num_tokens(self) -> int:
        """Output tokens of all completions together (what usage counts)."""
        return sum(self.counts)

    def choice_token_ids(self, index: int) -> list[int]:
        return self.output.outputs[index].token_ids[: self.counts[index]]

    @property
    def token_ids(self) -> list[int]:
        return self.choice_token_ids(0)

    @property
    def finished(self) -> bool:
        return self.output.finished


@dataclass(slots=True)
class EngineStats:
    """Engine state taken on the loop side between steps, so readers never touch the engine."""

    num_running: int = 0
    num_waiting: int = 0
    num_waiting_tokens: int = 0
    num_used_blocks: int = 0
    num_blocks: int = 0
    step_time_error: float = float("nan")  # median |predicted - measured| / measured of recent steps
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache, since start
    prefix_cache_hits: int = 0  # of those, tokens found cached


class RequestStream:
    """Latest-wins stream of one request's outputs: a slow reader skips to the newest state."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self._latest: StreamOutput | None = None
        self._error: BaseException | None = None
        self._ended = False
        self._ready = asyncio.Event()

    def put(self, item: StreamOutput) -> None:
        self._latest = item
        self._ready.set()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._ready.set()

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> StreamOutput:
        if self._ended:
            raise StopAsyncIteration
        await self._ready.wait()
        self._ready.clear()
        if self._latest is not None:
            item, self._latest = self._latest, None
            self._ended = item.finished
            if self._error is not None:
                self._ready.set()  # deliver the progress first, the error on the next read
            return item
        self._ended = True
        raise self._error


@dataclass(slots=True)
class _PendingAdd:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int
    slo: SLO | None
    arrival_time: float
    future: asyncio.Future


@dataclass(slots=True)
class _Tracked:
    request: Request | RequestGroup
    stream: RequestStream


# Called on the loop for every accepted request when it ends, with the error if it failed.
FinishedHook = Callable[[RequestOutput, BaseException | None], None]


class AsyncLLMEngine:
    """Drives an LLMEngine from one background task; handlers only queue adds and aborts.

    The blocking `engine.step()` runs on a dedicated worker thread, step after step while there is work.
    The worker itself takes the queued adds and aborts between its steps (under `_lock`, which guards the
    queues and `_tracked`), so arrivals never stop the step loop; the loop touches the engine only while the
    worker is idle, so the engine is never used by two threads at once. A step's outputs, and the streams of
    requests the worker took, are handed to the loop as callbacks (in order) while the next step runs.
    """

    def __init__(self, engine: LLMEngine, on_finished: FinishedHook | None = None) -> None:
        self.engine = engine
        self.on_finished = on_finished
        self.stats = EngineStats(num_blocks=engine.block_manager.num_blocks)
        self._pending_adds: dict[str, _PendingAdd] = {}
        self._pending_aborts: set[str] = set()
        self._tracked: dict[str, _Tracked] = {}
        self._lock = threading.Lock()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sloserve-step")
        self._stopping = False
        self.dead_error: BaseException | None = None
        self.track_load = False  # keep `load` current (TTFT admission needs it; it costs a rank per waiting request)
        self.load = LoadSnapshot()
        self._step_started: float | None = None  # on the engine's clock; None between steps
        self._last_step_s = 0.0
        # The predictor's running error (a median over its window) at its `num_observed` then: recomputed every
        # _ERROR_EVERY steps, not every step (it is ~0.07 ms, a few % of a short step).
        self._step_time_error = (-_ERROR_EVERY, float("nan"))

    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="sloserve-step-loop")

    async def shutdown(self) -> None:
        """Abort everything still in flight and stop the loop."""
        self._stopping = True
        if self._task is not None:
            self._wakeup.set()
            await asyncio.gather(self._task, return_exceptions=True)  # a dead loop has logged its error
        self._worker.shutdown(wait=True)

    @property
    def started(self) -> bool:
        return self._task is not None

    def has_request(self, request_id: str) -> bool:
        """Accepted and not yet ended."""
        with self._lock:
            return request_id in self._pending_adds or request_id in self._tracked

    @property
    def is_running(self) -> bool:
        return self._task is not None and not self._task.done() and not self._stopping

    def step_seconds_left(self) -> float:
        """Until the step in progress ends, judged by the last step's length (0 between steps): a router
        sending a request here knows nothing new starts sooner."""
        started = self._step_started  # set and cleared on the worker thread
        if started is None:
            return 0.0
        return max(0.0, started + self._last_step_s - self.engine.clock.now())

    @property
    def num_unfinished(self) -> int:
        with self._lock:
            return len(self._pending_adds) + len(self._tracked)

    @property
    def num_waiting(self) -> int:
        """Requests queued in the engine plus those accepted but not yet handed to it."""
        with self._lock:  # the worker moves adds into the engine and refreshes `stats` in one hold
            return self.stats.num_waiting + len(self._pending_adds)

    @property
    def num_waiting_tokens(self) -> int:
        with self._lock:
            return self.stats.num_waiting_tokens + sum(len(p.prompt_token_ids) for p in self._pending_adds.values())

    @property
    def num_free_slots(self) -> int:
        """Running slots (max_num_seqs) not taken at the last step: what the next step can admit at once."""
        return max(0, self.engine.scheduler.config.max_num_seqs - self.stats.num_running)

    async def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, *, priority: int = 0,
        slo: SLO | None = None, arrival_time: float | None = None,
    ) -> RequestStream:
        """Queue a request; returns its stream once the engine took it, or raises its ValueError.

        `arrival_time` (on the engine's clock) is when the request reached the front end; by default, now.
        """
        if not self.is_running:
            raise EngineStoppedError("the engine is not running")
        future = asyncio.get_running_loop().create_future()
        # Arrival is not when the loop gets to it: queueing behind a step is part of TTFT.
        arrived = self.engine.clock.now() if arrival_time is None else arrival_time
        with self._lock:
            if request_id in self._pending_adds or request_id in self._tracked:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._pending_adds[request_id] = _PendingAdd(
                request_id, list(prompt_token_ids), params, priority, slo, arrived, future
            )
        self._wakeup.set()
        try:
            return await future
        except asyncio.CancelledError:
            self.abort(request_id)  # the caller left before the engine took the request
            raise

    def abort(self, request_id: str) -> None:
        """End a request; its stream yields a final 'abort' output and its blocks are freed after this step."""
        with self._lock:
            pending = self._pending_adds.pop(request_id, None)
            if pending is None and request_id in self._tracked:
                self._pending_aborts.add(request_id)
        if pending is not None:
            pending.future.cancel()
        else:
            self._wakeup.set()

    def abort_all(self) -> None:
        with self._lock:
            ids = list(self._pending_adds) + list(self._tracked)
        for request_id in ids:
            self.abort(request_id)

    async def wait_until_idle(self, poll_s: float = 0.05) -> None:
        while self.num_unfinished:
            await asyncio.sleep(poll_s)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while not self._stopping:
                # Only this task starts the worker, and it is idle here: the engine may be read.
                if not (self._pending_adds or self._pending_aborts or self.engine.has_unfinished_requests()):
                    self._snapshot_stats()
                    await self._wakeup.wait()
                    self._wakeup.clear()
                    continue
                try:
                    await loop.run_in_executor(self._worker, self._step_until_interrupted, loop)
                except _HandOverFault:
                    raise
                except Exception as error:  # noqa: BLE001 - any fault in a step must end its requests
                    logger.exception("engine step failed; failing %d in-flight requests", len(self._tracked))
                    self._end_all(EngineStepError(f"the engine failed while running this request: {error!r}"))
        except BaseException as error:
            # A fault in the loop machinery itself: nothing would drive the requests any more.
            self.dead_error = error
            logger.exception("the engine loop died")
            raise
        finally:
            self._stopping = True
            with self._lock:
                adds, self._pending_adds = self._pending_adds, {}
            for p in adds.values():
                if not p.future.done():
                    p.future.set_exception(EngineStoppedError("the engine stopped before taking this request"))
            self._end_all(None if self.dead_error is None else EngineStoppedError(f"the engine loop died: {self.dead_error!r}"))
            self._snapshot_stats()

    def _step_until_interrupted(self, loop: asyncio.AbstractEventLoop) -> None:
        """On the worker thread: take what the loop queued (adds, aborts), step, and again, until there is no
        work or the front stops.

        Arrivals are taken here, between steps: handing them to the loop would stop the step loop at every
        arrival, and the next step would wait while the loop wakes every streaming handler of the last one.
        Each step's outputs go to the loop as a callback and the next step starts at once; token counts are
        taken here, before the next step grows the token lists.
        """
        while True:
            try:
                self._take_pending(loop)
            except Exception as error:
                raise _HandOverFault(repr(error)) from error
            if self._stopping or not self.engine.has_unfinished_requests():
                return
            self._step_started = self.engine.clock.now()
            try:
                outputs = self.engine.step()
            finally:
                self._last_step_s, self._step_started = self.engine.clock.now() - self._step_started, None
            ready = [StreamOutput.of(out) for out in outputs]
            self._snapshot_stats()
            loop.call_soon_threadsafe(self._dispatch, ready)

    def _take_pending(self, loop: asyncio.AbstractEventLoop) -> None:
        """On the worker, between steps: hand the queued adds to the engine and end the queued aborts; their
        streams and endings reach the loop as one callback, queued before any of their steps' outputs."""
        if not (self._pending_adds or self._pending_aborts):
            return
        accepted: list[tuple[_PendingAdd, RequestStream | BaseException]] = []
        ended: list[_Tracked] = []
        with self._lock:
            adds, self._pending_adds = self._pending_adds, {}
            aborts, self._pending_aborts = self._pending_aborts, set()
            try:
                for p in adds.values():
                    if p.future.done():  # its caller was cancelled and has not run its cleanup yet
                        continue
                    try:
                        request = self.engine.add_request(
                            p.request_id, p.prompt_token_ids, p.params,
                            priority=p.priority, slo=p.slo, arrival_time=p.arrival_time,
                        )
                    except Exception as error:  # noqa: BLE001 - ValueError is bad input; anything else still fails only this request
                        accepted.append((p, error))
                        continue
                    stream = RequestStream(p.request_id)
                    self._tracked[p.request_id] = _Tracked(request, stream)
                    accepted.append((p, stream))
                for request_id in aborts:
                    tracked = self._tracked.pop(request_id, None)
                    if tracked is not None:
                        self.engine.abort_request(request_id)
                        ended.append(tracked)
                # In the same hold: a reader never counts an add twice (queued and in the engine) or not at all.
                self._snapshot_stats()
            finally:  # even when this bookkeeping fails (and the loop dies), every caller taken here hears back
                answered = {p.request_id for p, _ in accepted}
                accepted += [(p, EngineStoppedError("the engine stopped before taking this request"))
                             for p in adds.values() if p.request_id not in answered]
                loop.call_soon_threadsafe(self._hand_over, accepted, ended)

    def _hand_over(self, accepted: list[tuple[_PendingAdd, RequestStream | BaseException]], ended: list[_Tracked]) -> None:
        """On the loop: give each caller its stream (or error) and end the aborted requests' streams."""
        for p, result in accepted:
            if isinstance(result, BaseException):
                if not p.future.done():
                    p.future.set_exception(result)
            elif p.future.done():  # its caller left while the worker took it: nobody reads the stream
                self.abort(p.request_id)
            else:
                p.future.set_result(result)
        for tracked in ended:
            self._end(tracked, None)

    def _dispatch(self, ready: list[StreamOutput]) -> None:
        for item in ready:
            out = item.output
            with self._lock:
                tracked = self._tracked.pop(out.request_id, None) if out.finished else self._tracked.get(out.request_id)
            if tracked is None:  # aborted since its step (its stream has ended)
                continue
            tracked.stream.put(item)
            if out.finished:
                self._notify(out, None)

    def _end(self, tracked: _Tracked, error: BaseException | None) -> None:
        out = output_of(tracked.request)
        if error is None:
            tracked.stream.put(StreamOutput.of(out))
        else:
            tracked.stream.fail(error)
        self._notify(out, error)

    def _end_all(self, error: BaseException | None) -> None:
        """End every tracked request, aborted (error None) or failed, freeing its blocks."""
        with self._lock:
            tracked, self._tracked = self._tracked, {}
        for request_id, t in tracked.items():
            try:
                self.engine.abort_request(request_id)
            except Exception:  # noqa: BLE001 - the engine may be broken already; still end the rest
                logger.exception("could not abort %s", request_id)
            self._end(t, error)

    def _notify(self, out: RequestOutput, error: BaseException | None) -> None:
        if self.on_finished is None:
            return
        try:
            self.on_finished(out, error)
        except Exception:  # noqa: BLE001 - a metrics fault must not stop the loop
            logger.exception("on_finished hook failed")

    def _current_step_time_error(self) -> float:
        predictor = self.engine.predictor
        at, error = self._step_time_error
        if predictor.num_observed - at >= _ERROR_EVERY or (math.isnan(error) and predictor.num_observed != at):
            self._step_time_error = at, error = predictor.num_observed, predictor.error().median
        return error

    def _snapshot_stats(self) -> None:
        scheduler, blocks = self.engine.scheduler, self.engine.block_manager
        self.stats = EngineStats(
            num_running=len(scheduler.running),
            num_waiting=len(scheduler.waiting),
            num_waiting_tokens=sum(r.num_tokens for r in scheduler.waiting),
            num_used_blocks=blocks.num_used_blocks,
            num_blocks=blocks.num_blocks,
            step_time_error=self._current_step_time_error(),
            prefix_cache_queries=blocks.stats.queries,
            prefix_cache_hits=blocks.stats.hits,
        )
        if self.track_load:
            self.load = LoadSnapshot.of(scheduler, self.engine.clock.now())
