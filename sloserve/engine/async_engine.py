"""AsyncLLMEngine: the asyncio front of the engine, one background step loop and a stream per request."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from sloserve.engine.admission import LoadSnapshot
from sloserve.engine.engine import LLMEngine
from sloserve.engine.request_group import RequestGroup, output_of
from sloserve.request import SLO, Request, RequestOutput, SamplingParams

logger = logging.getLogger(__name__)


class EngineStepError(RuntimeError):
    """A step raised: the requests in the engine at that moment were failed with this error."""


class EngineStoppedError(RuntimeError):
    """The engine loop has stopped (shutdown, or a fault in the loop itself)."""


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

    The blocking `engine.step()` runs on a dedicated worker thread, step after step while nothing is
    pending; adds and aborts are applied on the loop between those runs, so the engine is never touched
    by two threads at once. A step's outputs are delivered on the loop while the next step runs.
    """

    def __init__(self, engine: LLMEngine, on_finished: FinishedHook | None = None) -> None:
        self.engine = engine
        self.on_finished = on_finished
        self.stats = EngineStats(num_blocks=engine.block_manager.num_blocks)
        self._pending_adds: dict[str, _PendingAdd] = {}
        self._pending_aborts: set[str] = set()
        self._tracked: dict[str, _Tracked] = {}
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sloserve-step")
        self._stopping = False
        self.dead_error: BaseException | None = None
        self.track_load = False  # keep `load` current (TTFT admission needs it; it costs a rank per waiting request)
        self.load = LoadSnapshot()

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
        return request_id in self._pending_adds or request_id in self._tracked

    @property
    def is_running(self) -> bool:
        return self._task is not None and not self._task.done() and not self._stopping

    @property
    def num_unfinished(self) -> int:
        return len(self._pending_adds) + len(self._tracked)

    @property
    def num_waiting(self) -> int:
        """Requests queued in the engine plus those accepted but not yet handed to it."""
        return self.stats.num_waiting + len(self._pending_adds)

    @property
    def num_waiting_tokens(self) -> int:
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
        if request_id in self._pending_adds or request_id in self._tracked:
            raise ValueError(f"request id {request_id!r} is already in use")
        future = asyncio.get_running_loop().create_future()
        # Arrival is not when the loop gets to it: queueing behind a step is part of TTFT.
        arrived = self.engine.clock.now() if arrival_time is None else arrival_time
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
        pending = self._pending_adds.pop(request_id, None)
        if pending is not None:
            pending.future.cancel()
            return
        if request_id in self._tracked:
            self._pending_aborts.add(request_id)
            self._wakeup.set()

    def abort_all(self) -> None:
        for request_id in list(self._pending_adds) + list(self._tracked):
            self.abort(request_id)

    async def wait_until_idle(self, poll_s: float = 0.05) -> None:
        while self.num_unfinished:
            await asyncio.sleep(poll_s)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while not self._stopping:
                self._apply_pending()
                self._snapshot_stats()
                if not self.engine.has_unfinished_requests():
                    await self._wakeup.wait()
                    self._wakeup.clear()
                    continue
                try:
                    await loop.run_in_executor(self._worker, self._step_until_interrupted, loop)
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
            adds, self._pending_adds = self._pending_adds, {}
            for p in adds.values():
                if not p.future.done():
                    p.future.set_exception(EngineStoppedError("the engine stopped before taking this request"))
            self._end_all(None if self.dead_error is None else EngineStoppedError(f"the engine loop died: {self.dead_error!r}"))
            self._snapshot_stats()

    def _step_until_interrupted(self, loop: asyncio.AbstractEventLoop) -> None:
        """On the worker thread: step while there is work and nothing for the loop to apply (adds, aborts, stop).

        Each step's outputs go to the loop as a callback, and the next step starts at once: waiting for
        the loop to deliver them first would leave the engine idle while it wakes every streaming handler.
        Token counts are taken here, before the next step grows the token lists.
        """
        while True:
            ready = [StreamOutput.of(out) for out in self.engine.step()]
            self._snapshot_stats()
            loop.call_soon_threadsafe(self._dispatch, ready)
            if (self._stopping or self._pending_adds or self._pending_aborts
                    or not self.engine.has_unfinished_requests()):
                return

    def _apply_pending(self) -> None:
        adds, self._pending_adds = self._pending_adds, {}
        for p in adds.values():
            if p.future.done():  # its caller was cancelled and has not run its cleanup yet
                continue
            try:
                request = self.engine.add_request(
                    p.request_id, p.prompt_token_ids, p.params,
                    priority=p.priority, slo=p.slo, arrival_time=p.arrival_time,
                )
            except Exception as error:  # noqa: BLE001 - ValueError is bad input; anything else still fails only this request
                p.future.set_exception(error)
                continue
            stream = RequestStream(p.request_id)
            self._tracked[p.request_id] = _Tracked(request, stream)
            p.future.set_result(stream)
        aborts, self._pending_aborts = self._pending_aborts, set()
        for request_id in aborts:
            tracked = self._tracked.pop(request_id, None)
            if tracked is not None:
                self.engine.abort_request(request_id)
                self._end(tracked, None)

    def _dispatch(self, ready: list[StreamOutput]) -> None:
        for item in ready:
            out = item.output
            tracked = self._tracked.get(out.request_id)
            if tracked is None:  # aborted since its step (its stream has ended)
                continue
            tracked.stream.put(item)
            if out.finished:
                del self._tracked[out.request_id]
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

    def _snapshot_stats(self) -> None:
        scheduler, blocks = self.engine.scheduler, self.engine.block_manager
        self.stats = EngineStats(
            num_running=len(scheduler.running),
            num_waiting=len(scheduler.waiting),
            num_waiting_tokens=sum(r.num_tokens for r in scheduler.waiting),
            num_used_blocks=blocks.num_used_blocks,
            num_blocks=blocks.num_blocks,
            step_time_error=self.engine.predictor.error().median,
            prefix_cache_queries=blocks.stats.queries,
            prefix_cache_hits=blocks.stats.hits,
        )
        if self.track_load:
            self.load = LoadSnapshot.of(scheduler)
