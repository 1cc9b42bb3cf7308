"""Scheduler: one step's plan under a token budget (decode first, chunked prefill, preemption)."""
from __future__ import annotations

from dataclasses import dataclass, field

from sloserve.engine.kv_cache import BlockManager
from sloserve.engine.policy import Policy
from sloserve.request import Request, RequestStatus


@dataclass(slots=True)
class ScheduledRequest:
    request: Request
    num_new_tokens: int
    block_table: list[int]

    @property
    def samples(self) -> bool:
        """Whether this step reaches the end of the request's tokens and so samples its next one."""
        return self.request.num_computed_tokens + self.num_new_tokens == self.request.num_tokens


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    # Requests that ended since the last plan, so executors can drop per-request state.
    finished_request_ids: list[str] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    """Spends `max_num_batched_tokens` per step: running requests first, then waiting ones.

    Every request simply catches `num_computed_tokens` up with its token count, so a long prompt
    is cut into chunks that share steps with decodes (Sarathi-Serve's stall-free batching).
    """

    def __init__(
        self,
        block_manager: BlockManager,
        policy: Policy,
        max_num_batched_tokens: int,
        max_num_seqs: int,
    ) -> None:
        self.block_manager = block_manager
        self.policy = policy
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self._finished_ids: list[str] = []

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished_request_ids=self._finished_ids)
        self._finished_ids = []
        budget = self.max_num_batched_tokens
        self.running.sort(key=self.policy.rank)

        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            if self._allocate(request, n, out):
                out.scheduled.append(self._plan(request, n))
                budget -= n
                i += 1
            # else: `request` itself was preempted, and it was the last one left

        if not out.preempted:  # a step that had to preempt admits nobody new
            self.waiting.sort(key=self.policy.rank)
            while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
                request = self.waiting[0]
                n = min(request.num_tokens - request.num_computed_tokens, budget)
                if not self.block_manager.allocate_slots(request.request_id, request.num_computed_tokens + n):
                    break
                self.waiting.pop(0)
                request.status = RequestStatus.RUNNING
                self.running.append(request)
                out.scheduled.append(self._plan(request, n))
                budget -= n
        return out

    def _allocate(self, request: Request, n: int, out: SchedulerOutput) -> bool:
        """Make room for `n` more tokens of `request`, preempting the worst-ranked running requests."""
        while not self.block_manager.allocate_slots(request.request_id, request.num_computed_tokens + n):
            victim = self.running.pop()
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request) -> None:
        # Recompute, not swap: the freed blocks are refilled when the request is admitted again.
        self.block_manager.free(request.request_id)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.waiting.append(request)

    def _plan(self, request: Request, n: int) -> ScheduledRequest:
        return ScheduledRequest(request, n, self.block_manager.block_tables[request.request_id])

    def finish(self, request: Request, status: RequestStatus) -> None:
        """End a request wherever it is and free its blocks."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.status = status
        self.block_manager.free(request.request_id)
        self._finished_ids.append(request.request_id)
