"""LLMEngine: add requests, step the scheduler and executor, stop and free finished requests."""
from __future__ import annotations

import logging

from sloserve.engine.clock import Clock, MonotonicClock
from sloserve.engine.cost import StepCostModel, StepPredictor
from sloserve.engine.detokenizer import Detokenizer, make_detokenizer
from sloserve.engine.executor import Executor
from sloserve.engine.features import StepShape
from sloserve.engine.isolation import execute_isolating, unrankable
from sloserve.engine.kv_cache import BlockManager
from sloserve.engine.logprobs import MAX_LOGPROBS, LogprobsRecorder
from sloserve.engine.policy import Policy, make_policy
from sloserve.engine.request_group import RequestGroup, RequestGroups, child_id, child_params
from sloserve.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from sloserve.engine.speculator import Speculator
from sloserve.engine.stop_checker import check_stop
from sloserve.request import SLO, Request, RequestOutput, RequestStatus, SamplingParams

logger = logging.getLogger(__name__)


class LLMEngine:
    def __init__(
        self,
        executor: Executor,
        config: SchedulerConfig | None = None,
        *,
        max_model_len: int,
        vocab_size: int,
        eos_token_ids: frozenset[int] = frozenset(),
        tokenizer=None,
        clock: Clock | None = None,
        policy: Policy | None = None,
        predictor: StepPredictor | None = None,
        speculator: Speculator | None = None,
    ) -> None:
        self.executor = executor
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.eos_token_ids = frozenset(eos_token_ids)
        self.tokenizer = tokenizer
        self.clock = clock or MonotonicClock()
        self.config = config or SchedulerConfig()
        self.block_manager = BlockManager(executor.num_kv_blocks, self.config.block_size,
                                          self.config.enable_prefix_caching)
        # With no profile, a conservative default that the engine's own measured steps soon replace.
        self.predictor = predictor or StepPredictor(StepCostModel.default(self.config.max_num_batched_tokens))
        policy = policy or make_policy(self.config.policy, self.clock, self.predictor, self.config.max_num_batched_tokens)
        self.scheduler = Scheduler(self.block_manager, policy, self.config, self.predictor)
        self._detokenizers: dict[str, Detokenizer] = {}
        self.speculator = speculator
        self._groups = RequestGroups()  # n > 1 requests
        self._busy_until: float | None = None  # when the last step ended, if it left requests to run
        self.logprobs = LogprobsRecorder(tokenizer)

    @property
    def requests(self) -> dict[str, Request]:
        """Unfinished requests by id (the scheduler's own table)."""
        return self.scheduler.requests

    # -- requests -------------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        *,
        priority: int = 0,
        slo: SLO | None = None,
        arrival_time: float | None = None,
    ) -> Request | RequestGroup:
        """Queue a request; with `sampling_params.n > 1`, a group of n siblings reported under `request_id`."""
        self._validate(request_id, prompt_token_ids, sampling_params)
        arrival_time = self.clock.now() if arrival_time is None else arrival_time
        if sampling_params.n == 1:
            request = self._new_request(request_id, prompt_token_ids, sampling_params, priority, slo, arrival_time)
            self.scheduler.add(request)
            return request
        ids = [child_id(request_id, i) for i in range(sampling_params.n)]
        for i in ids:
            self._check_id_free(i)
        children = [self._new_request(i, prompt_token_ids, child_params(sampling_params, index), priority, slo, arrival_time)
                    for index, i in enumerate(ids)]
        group = RequestGroup(request_id, children, held=children[1:])
        self._groups.add(group)
        self.scheduler.add(group.leader)
        return group

    def _new_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, priority: int,
                     slo: SLO | None, arrival_time: float) -> Request:
        request = Request(
            request_id=request_id,
            prompt_token_ids=list(prompt_token_ids),
            sampling_params=params,
            arrival_time=arrival_time,
            priority=priority,
            slo=slo,
            eos_token_ids=self.eos_token_ids,
        )
        self.logprobs.start(request)
        if self.tokenizer is not None:
            self._detokenizers[request_id] = make_detokenizer(
                self.tokenizer, request.prompt_token_ids, params.skip_special_tokens
            )
        return request

    def _check_id_free(self, request_id: str) -> None:
        if request_id in self.requests or request_id in self._groups:
            raise ValueError(f"request id {request_id!r} is already in use")

    def _validate(self, request_id: str, prompt: list[int], params: SamplingParams) -> None:
        self._check_id_free(request_id)
        if not prompt:
            raise ValueError("the prompt is empty")
        if any(not 0 <= t < self.vocab_size for t in prompt):
            raise ValueError(f"prompt token ids must lie in [0, {self.vocab_size})")
        if len(prompt) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(prompt)} tokens, but the model's maximum length is "
                f"{self.max_model_len} (prompt and output together)"
            )
        params.validate()
        for name in ("logprobs", "prompt_logprobs"):
            asked = getattr(params, name)
            if asked is not None and asked > MAX_LOGPROBS:
                raise ValueError(f"Requested {name} of {asked}, which is greater than max allowed: {MAX_LOGPROBS}")
            if asked is not None and not hasattr(self.executor, "take_logprobs"):
                raise ValueError(f"{name}: this engine's executor computes no log-probabilities")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer, and this engine has none")
        # A request that could never fit would preempt itself forever: refuse it up front.
        need = self.block_manager.blocks_needed(min(len(prompt) + params.max_tokens, self.max_model_len))
        if need > self.block_manager.num_blocks:
            raise ValueError(
                f"the request needs {need} KV blocks but the cache holds {self.block_manager.num_blocks}; "
                "lower max_tokens or give the KV cache more memory"
            )

    def abort_request(self, request_id: str) -> bool:
        """End a request wherever it is; its KV blocks are freed at once. False if unknown/finished.

        The id of an n > 1 request aborts all its siblings, held ones included.
        """
        group = self._groups.pop(request_id)
        if group is not None:
            for child in group.children:
                if not child.finished:
                    self._finish(child, RequestStatus.FINISHED_ABORTED)
            return True
        request = self.requests.get(request_id)
        if request is None:
            return False
        self._finish(request, RequestStatus.FINISHED_ABORTED)
        return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or self._groups.has_held

    # -- the step -------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        start = self.clock.now()
        # A server delivers the last step's tokens and takes new requests before it calls step again: while
        # requests were left to run, that time is part of what a step costs, so the predictor is told it.
        between = start - self._busy_until if self._busy_until is not None else 0.0
        self._busy_until = None
        if self._groups:
            self._groups.release(self.scheduler.add, self.config.enable_prefix_caching)
        drafts, draft_seconds = None, 0.0
        if self.speculator is not None:
            drafts = self._propose()
            draft_seconds = self.clock.now() - start
        plan, outputs = self._schedule(drafts)
        if self.speculator is not None and plan.preempted_request_ids:
            self.speculator.forget(plan.preempted_request_ids)
        if not plan.scheduled:
            return self._groups.report(outputs) if self._groups else outputs
        for s in plan.scheduled:
            request = self.requests[s.request_id]
            if request.first_scheduled_time is None:
                request.first_scheduled_time = start
        survivors, sampled, failed = self._execute(plan)
        outputs += failed
        if self.speculator is not None:
            self._observe_drafts(survivors, sampled)
        now = self.clock.now()
        step_logprobs = self._take_prompt_logprobs(outputs)
        for request, tokens in self.scheduler.update_from_output(survivors, sampled):
            try:
                if request.logprobs is not None:
                    self.logprobs.record_sampled(request, step_logprobs.get(request.request_id), len(tokens))
                outputs.append(self._process_tokens(request, tokens, now))
            except Exception as error:  # noqa: BLE001 - its stop strings, detokenizer or logprobs: its fault alone
                outputs.append(self._fail(request, error))
        # The whole step, scheduling and stop checks included: what the predictor is asked about.
        # Drafting is the proposer's own cost, predicted apart (adaptive speculation weighs the two).
        end = self.clock.now()
        try:
            self.predictor.observe(StepShape.of(plan), between + end - start - draft_seconds)
        except Exception:  # noqa: BLE001 - the step's tokens are computed; a predictor that cannot learn keeps its model
            logger.exception("the step-time predictor failed to learn from a step")
        self._busy_until = end if self.has_unfinished_requests() else None
        return self._groups.report(outputs) if self._groups else outputs

    def _schedule(self, drafts: dict[str, list[int]] | None) -> tuple[SchedulerOutput, list[RequestOutput]]:
        """The step's plan, and the outputs of requests that failed making it: when planning raises, a request
        the policy cannot rank on its own is the cause; it fails alone and the plan is made again without it."""
        schedule = lambda: self.scheduler.schedule(drafts) if drafts else self.scheduler.schedule()  # noqa: E731
        try:
            return schedule(), []
        except Exception as error:  # noqa: BLE001 - find whose fault it is; if nobody's, it is the engine's
            culprits = unrankable(self.scheduler.policy, list(self.requests.values()))
            if not culprits:
                raise
            failed = [self._fail(r, error) for r in culprits]
        return schedule(), failed

    # Speculation only saves time: when the proposer fails, the step runs without drafts, and the proposer forgets
    # the requests whose draft state it may have left half-updated (it rebuilds them from their tokens).
    def _propose(self) -> dict[str, list[int]] | None:
        try:
            return self.speculator.propose(self.scheduler.running, self.predictor)
        except Exception:  # noqa: BLE001
            logger.exception("the speculator failed to propose; this step runs without drafts")
            self.speculator.forget([r.request_id for r in self.scheduler.running])
            return None

    def _observe_drafts(self, plan: SchedulerOutput, sampled: list[list[int]]) -> None:
        try:
            self.speculator.observe(plan, sampled)
        except Exception:  # noqa: BLE001
            logger.exception("the speculator failed to learn from a step")
            self.speculator.forget([s.request_id for s in plan.scheduled])

    def _fail(self, request: Request, error: BaseException) -> RequestOutput:
        """End one request with an error (its blocks freed); the others in its step carry on."""
        logger.error("request %s failed and was ended alone: %r", request.request_id, error)
        if not request.finished:
            self._finish(request, RequestStatus.FINISHED_ERROR)
        return RequestOutput.of(request)

    def _execute(self, plan: SchedulerOutput) -> tuple[SchedulerOutput, list[list[int]], list[RequestOutput]]:
        """Run the plan; a request whose step raises fails alone (status error), the rest carry on.

        Returns the plan of the requests that ran, their tokens, and the outputs of those that failed.
        """
        step = execute_isolating(self.executor.execute, plan)
        failed = [self._fail(self.requests[s.request_id], error) for s, error in step.failed if s.request_id in self.requests]
        return step.plan, step.sampled, failed

    def _take_prompt_logprobs(self, outputs: list[RequestOutput]) -> dict:
        """The step's logprobs by request id, the prompt ones recorded already (also mid-prefill, when
        nothing was sampled); a request whose logprobs went wrong fails alone, with an output."""
        taken = self.executor.take_logprobs() if hasattr(self.executor, "take_logprobs") else {}
        for request_id, step in taken.items():
            request = self.requests.get(request_id)
            if request is None or not step.prompt:
                continue
            try:
                self.logprobs.record_prompt(request, step)
            except Exception as error:  # noqa: BLE001 - its fault alone
                outputs.append(self._fail(request, error))
        return taken

    def _process_tokens(self, request: Request, tokens: list[int], now: float) -> RequestOutput:
        """Stamp the new tokens and check stop conditions token by token; tokens past a stop are dropped."""
        num_outputs = len(request.output_token_ids) - len(tokens)
        for token in tokens:
            num_outputs += 1
            request.token_times.append(now)
            status = check_stop(request, token, num_outputs, self._detokenizers.get(request.request_id),
                                self.max_model_len)
            if status is not None:
                del request.output_token_ids[num_outputs:]
                if request.logprobs is not None:
                    del request.logprobs[num_outputs:]
                self._finish(request, status)
                break
        return RequestOutput.of(request)

    def _finish(self, request: Request, status: RequestStatus) -> None:
        request.finished_time = self.clock.now()
        self.scheduler.finish(request, status)
        self._detokenizers.pop(request.request_id, None)
        if self.speculator is not None:
            self.speculator.forget([request.request_id])
