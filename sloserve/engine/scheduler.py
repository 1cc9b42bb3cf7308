"""Scheduler: one step's plan under a token budget (decode first, chunked prefill, preemption), and the
state update from the step's sampled tokens."""
from __future__ import annotations

from dataclasses import dataclass, field

from sloserve.engine.cost import StepTimeModel, prefill_chunk, rate_floor
from sloserve.engine.features import StepShape
from sloserve.engine.kv_cache import BlockManager
from sloserve.engine.policy import POLICIES, Policy
from sloserve.request import Request, RequestStatus, SamplingParams


@dataclass(slots=True)
class SchedulerConfig:
    """The scheduler's knobs, free of torch, so the engine and the simulator take the same ones."""

    max_num_batched_tokens: int = 512
    max_num_seqs: int = 64
    block_size: int = 16
    policy: str = "fcfs"  # a name in POLICIES; the engine builds it with its clock and predictor
    enable_prefix_caching: bool = True  # share computed full blocks between requests (vLLM's flag)

    def __post_init__(self) -> None:
        for name in ("max_num_batched_tokens", "max_num_seqs", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; choose from {', '.join(POLICIES)}")


@dataclass(slots=True)
class ScheduledRequest:
    """One request's work in a step, as plain data (no live Request), so a plan can cross a process boundary."""

    request_id: str
    token_ids: list[int]  # the tokens computed this step: positions [num_computed_tokens, + num_new_tokens)
    num_computed_tokens: int  # tokens already in the KV cache before this step (the chunk's start position)
    num_new_tokens: int
    samples: bool  # the step reaches the end of the request's tokens, so its next token is sampled
    block_table: list[int]
    sampling_params: SamplingParams
    # Draft tokens to verify: the last len(spec_token_ids) of token_ids (vLLM v1's scheduled spec tokens).
    spec_token_ids: list[int] = field(default_factory=list)


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted_request_ids: list[str] = field(default_factory=list)
    # Requests that ended since the last plan, so executors can drop per-request state.
    finished_request_ids: list[str] = field(default_factory=list)
    num_waiting_ranked: int = 0  # waiting requests the policy ranked for this plan (the simulator charges for them)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


def token_slice(request: Request, start: int, end: int) -> list[int]:
    """request.all_token_ids[start:end] without concatenating the whole prompt and output."""
    prompt, n = request.prompt_token_ids, len(request.prompt_token_ids)
    if end <= n:
        return prompt[start:end]
    if start >= n:
        return request.output_token_ids[start - n : end - n]
    return prompt[start:] + request.output_token_ids[: end - n]


class Scheduler:
    """Spends `max_num_batched_tokens` per step: running requests first, then waiting ones.

    Every request simply catches `num_computed_tokens` up with its token count, so a long prompt
    is cut into chunks that share steps with decodes (Sarathi-Serve's stall-free batching).
    """

    def __init__(self, block_manager: BlockManager, policy: Policy, config: SchedulerConfig,
                 predictor: StepTimeModel | None = None, min_chunk: int = 16) -> None:
        self.block_manager = block_manager
        self.policy = policy
        self.config = config
        self.predictor = predictor  # needed only by policies that limit a step's time
        self.min_chunk = min_chunk  # the smallest prefill chunk a step time limit may cut to
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}  # every unfinished request, by id
        self._finished_ids: list[str] = []
        self._drafts: dict[str, list[int]] = {}  # this step's draft tokens per running request
        self._prefill_rate = 0.0  # this step's policy.prefill_rate: how far the step time limit may cut chunks
        self._prompt_floor: int | None = None
        self._prompt_tokens = 0

    def add(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, drafts: dict[str, list[int]] | None = None) -> SchedulerOutput:
        """`drafts`: draft tokens proposed for running requests; they spend the budget like any token."""
        out = SchedulerOutput(finished_request_ids=self._finished_ids)
        self._finished_ids = []
        self._drafts = drafts or {}
        budget = self.config.max_num_batched_tokens
        batch: list[Request] = []  # the requests of out.scheduled, in the same order
        for request in self.waiting:  # policies rank by the prefill each will compute: after its cached prefix
            request.num_cached_tokens = 0 if request.sampling_params.prompt_logprobs is not None else (
                self.block_manager.num_cached_tokens(
                    request.all_token_ids if request.output_token_ids else request.prompt_token_ids))
        self.running.sort(key=self.policy.rank)
        self.waiting.sort(key=self.policy.rank)
        out.num_waiting_ranked = len(self.waiting)
        self._prefill_rate = self.policy.prefill_rate(self.running, self.waiting)
        self._prompt_floor, self._prompt_tokens = None, 0  # prompt tokens this step must carry, and has

        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            n = self._chunk(request, budget, batch, out)
            if n == 0:  # a prompt chunk the step time limit leaves no room for
                i += 1
                continue
            without_drafts = min(n, request.num_tokens - request.num_computed_tokens)
            if n > without_drafts and not self.block_manager.allocate_slots(
                    request.request_id, request.num_computed_tokens + n):
                n = without_drafts  # speculation never preempts anyone
            if self._allocate(request, n, out):
                self._add(request, n, batch, out)
                budget -= n
                i += 1
            # else: `request` itself was preempted, and it was the last one left

        if not out.preempted_request_ids:  # a step that had to preempt for running requests admits nobody new
            while self.waiting and budget > 0 and self.waiting[0].request_id not in out.preempted_request_ids:
                request = self.waiting[0]
                # A cached prefix is not recomputed: the request starts after it (prefix caching). Prompt
                # logprobs need every prompt position's logits, so such a request skips the lookup (as vLLM's).
                cached = ([] if request.sampling_params.prompt_logprobs is not None
                          else self.block_manager.cached_prefix(request.all_token_ids))
                request.num_computed_tokens = request.num_cached_tokens = len(cached) * self.block_manager.block_size
                n = self._chunk(request, budget, batch, out)
                if n == 0:  # the step is full by the policy's time limit
                    request.num_computed_tokens = 0
                    break
                ok, refund = self._make_room(request, n, batch, out, cached)
                budget += refund
                if not ok:
                    request.num_computed_tokens = 0
                    break
                self.block_manager.record_lookup(request.num_tokens, request.num_computed_tokens)
                self.waiting.pop(0)
                request.status = RequestStatus.RUNNING
                self.running.append(request)
                self._add(request, n, batch, out)
                budget -= n
        self._drafts = {}
        return out

    def _chunk(self, request: Request, budget: int, batch: list[Request], out: SchedulerOutput) -> int:
        """The request's next tokens within the budget. Under the policy's step time limit a prompt chunk is
        cut to fit, or 0 when the step is full; but the step carries at least `min_chunk` prompt tokens (so
        prefill always progresses) and as many as the policy's prefill rate needs (there the limit yields)."""
        n = min(request.num_tokens + len(self._drafts.get(request.request_id, ())) - request.num_computed_tokens, budget)
        if request.num_tokens - request.num_computed_tokens <= 1 or self.predictor is None:
            return n  # a decode (and its drafts) is never cut
        limit = self.policy.step_time_limit(batch)
        if limit is None:
            return n
        shape = StepShape.of(out)
        if self._prompt_floor is None:  # the step's first prompt chunk: how many prompt tokens the step must carry
            self._prompt_floor = self.min_chunk
            if self._prefill_rate > 0:
                self._prompt_floor = max(self.min_chunk, rate_floor(
                    self.predictor, shape, request.num_computed_tokens, budget, self._prefill_rate))
        n = prefill_chunk(self.predictor, shape, request.num_computed_tokens, n,
                          max(0, self._prompt_floor - self._prompt_tokens), limit)
        self._prompt_tokens += n
        return n

    def _make_room(self, request: Request, n: int, batch: list[Request], out: SchedulerOutput,
                   cached: list[int]) -> tuple[bool, int]:
        """Find a seat and blocks for a waiting request, preempting running requests the policy lets it.

        Returns whether it fits, and the budget handed back by preempted requests planned this step.
        """
        refund = 0
        while (len(self.running) >= self.config.max_num_seqs or not self._seat_in_time()
               or not self.block_manager.allocate_slots(request.request_id, request.num_computed_tokens + n, cached)):
            victim = max(self.running, key=self.policy.rank, default=None)
            if victim is None or not self.policy.preempts(request, victim):
                return False, refund
            for j, planned in enumerate(batch):
                if planned is victim:
                    refund += out.scheduled.pop(j).num_new_tokens
                    batch.pop(j)
                    break
            self.running.remove(victim)
            self._preempt(victim)
            out.preempted_request_ids.append(victim.request_id)
        return True, refund

    def _seat_in_time(self) -> bool:
        """Whether one more request may take a seat under the policy's step time limit for the running batch: not
        while the running requests' decodes fit the limit but not with the smallest prefill chunk beside them.

        Every seat adds a decode to every later step, and prefill chunks are cut no smaller than `min_chunk`: on a
        machine slower than a full batch's TPOT allows (a loaded box, a profile from a quieter hour), seating up to
        max_num_seqs made every step with a prompt chunk miss the TPOT, and the running requests' TPOT was lost
        whatever was cut (on a 400-request mix at 0.8x load, 1.5x slower than profiled: 20% of interactive
        requests met their SLOs, 97% with this limit). Where the decodes alone miss the limit, holding seats saves
        no TPOT and seating goes on as before. A seat held by the limit is a seat the policy may preempt for."""
        limit = self.policy.step_time_limit(self.running) if self.predictor is not None else None
        if limit is None:
            return True
        k, contexts = len(self.running), [r.num_tokens for r in self.running]
        if self.predictor.step_seconds(StepShape([1] * k, contexts, [True] * k)) > limit:
            return True
        shape = StepShape([1] * k + [self.min_chunk], contexts + [0], [True] * k + [False])
        return self.predictor.step_seconds(shape) <= limit

    def update_from_output(self, plan: SchedulerOutput, sampled: list[list[int]]) -> list[tuple[Request, list[int]]]:
        """Advance each scheduled request by its computed tokens and append what it sampled.

        Returns (request, new tokens) for the requests that got tokens; the engine checks their stop
        conditions. A request that ended while its step ran (an abort) is skipped.
        """
        if len(sampled) != len(plan.scheduled):
            raise ValueError(f"the executor returned {len(sampled)} token lists for {len(plan.scheduled)} requests")
        updated = []
        for s, tokens in zip(plan.scheduled, sampled):
            request = self.requests.get(s.request_id)
            if request is None:
                continue
            # Rejected drafts roll back: their KV slots are rewritten by the tokens that replace them.
            rejected = len(s.spec_token_ids) + 1 - len(tokens) if s.spec_token_ids else 0
            request.num_computed_tokens += s.num_new_tokens - rejected
            if tokens:
                request.output_token_ids.extend(tokens)
                updated.append((request, tokens))
            # Blocks this step filled now hold real KV: from here on other requests may share them. (After the
            # append: accepted drafts are computed tokens whose ids arrive with this step's output.)
            self.block_manager.cache_full_blocks(
                request.request_id, request.num_computed_tokens, lambda a, b, r=request: token_slice(r, a, b))
        return updated

    def _allocate(self, request: Request, n: int, out: SchedulerOutput) -> bool:
        """Make room for `n` more tokens of `request`, preempting the worst-ranked running requests."""
        while not self.block_manager.allocate_slots(request.request_id, request.num_computed_tokens + n):
            victim = self.running.pop()
            self._preempt(victim)
            out.preempted_request_ids.append(victim.request_id)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request) -> None:
        # Recompute, not swap: the freed blocks are refilled when the request is admitted again.
        self.block_manager.free(request.request_id)
        self._drafts.pop(request.request_id, None)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.waiting.append(request)

    def _add(self, request: Request, n: int, batch: list[Request], out: SchedulerOutput) -> None:
        start = request.num_computed_tokens
        num_drafts = max(0, start + n - request.num_tokens)
        drafts = self._drafts.get(request.request_id, [])[:num_drafts]
        batch.append(request)
        out.scheduled.append(ScheduledRequest(
            request_id=request.request_id,
            token_ids=token_slice(request, start, start + n - num_drafts) + drafts,
            num_computed_tokens=start,
            num_new_tokens=n,
            samples=start + n >= request.num_tokens,
            # A copy: the plan must not change under an executor when the table grows next step.
            block_table=list(self.block_manager.block_tables[request.request_id]),
            sampling_params=request.sampling_params,
            spec_token_ids=drafts,
        ))

    def finish(self, request: Request, status: RequestStatus) -> None:
        """End a request wherever it is and free its blocks."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.requests.pop(request.request_id, None)
        request.status = status
        self.block_manager.free(request.request_id)
        self._finished_ids.append(request.request_id)
