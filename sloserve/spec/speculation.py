"""Speculation as the engine sees it: which requests draft how many tokens this step, and what verification showed."""
from __future__ import annotations

from dataclasses import dataclass, field

from sloserve.engine.clock import Clock, MonotonicClock
from sloserve.engine.cost import StepTimeModel
from sloserve.engine.scheduler import SchedulerOutput
from sloserve.model.logits_processors import is_active
from sloserve.request import Request
from sloserve.spec.adaptive import AcceptanceEstimator, Exploration, ZeroHold, best_k, candidates
from sloserve.spec.config import SpeculativeConfig
from sloserve.spec.proposer import DraftRequest, Proposer

# Exploring a verification (adaptive.Exploration) is worth a step only where drafts are accepted at all.
EXPLORE_MIN_ACCEPTANCE = 0.2


@dataclass(slots=True)
class SpecDecodeStats:
    """Cumulative counters, as vLLM's spec-decode metrics count them."""

    num_drafts: int = 0  # verifications (requests x steps that verified at least one draft)
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_emitted_tokens: int = 0  # accepted drafts plus the target's own token of each verification
    accepted_per_pos: list[int] = field(default_factory=list)
    steps_per_k: list[int] = field(default_factory=list)  # decoding steps by the k chosen for them (0..K)

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens per verification, the target's own included (vLLM's 'mean acceptance length')."""
        return self.num_emitted_tokens / self.num_drafts if self.num_drafts else 0.0


class Speculation:
    def __init__(self, config: SpeculativeConfig, proposer: Proposer, max_model_len: int,
                 clock: Clock | None = None) -> None:
        self.config = config
        # The engine's clock: real time when serving, virtual time when simulated proposals cost modelled seconds.
        self.clock = clock or MonotonicClock()
        self.proposer = proposer
        self.max_model_len = max_model_len
        self.acceptance = AcceptanceEstimator()
        self.stats = SpecDecodeStats(accepted_per_pos=[0] * config.num_speculative_tokens,
                                     steps_per_k=[0] * (config.num_speculative_tokens + 1))
        self.last_k = 0  # the k the latest step chose (adaptive) or K (fixed)
        # Measured over predicted proposal time: the proposer's model times its forward passes, a proposal
        # also pays for building batches and sampling; this running ratio folds that in.
        self.draft_scale = 1.0
        # Requests proposed for since they (re)started: a first proposal also feeds a draft model the prompt, which
        # the per-step price does not mean to cover (see propose).
        self._proposed: set[str] = set()
        self.hold = ZeroHold()  # adaptive: a clear k = 0 kept for a few steps without weighing it again
        self.exploration = Exploration()

    def propose(self, running: list[Request], predictor: StepTimeModel) -> dict[str, list[int]]:
        """Draft tokens for the running requests that are decoding (their prompt fully computed)."""
        # Requests whose logits processors read the token history (penalties, min_tokens, min_p) decode one
        # token a step: their verification would need a history per draft position.
        decoding = [r for r in running if r.num_computed_tokens == r.num_tokens - 1 and not is_active(r.sampling_params)]
        k = self.config.num_speculative_tokens
        limits = None
        if self.config.k_policy == "adaptive" and decoding:
            if not self.exploration.due and self.hold.keeps(len(decoding)):
                k = 0
                self.exploration.held()
            else:
                limits = self._limits(decoding)
                k = self._choose(decoding, limits, predictor)
        self.last_k = k
        if decoding:
            self.stats.steps_per_k[k] += 1
        batch = []
        if k:  # k = 0 asks the proposer nothing
            batch = [DraftRequest(r.request_id, r.all_token_ids, min(k, limit), r.sampling_params)
                     for r, limit in zip(decoding, limits or self._limits(decoding)) if min(k, limit) > 0]
        drafts = []
        if batch:
            predicted = self.proposer.predict_seconds([r.k for r in batch], [len(r.token_ids) for r in batch])
            start = self.clock.now()
            drafts = self.proposer.propose(batch)
            for r, d in zip(batch, drafts):
                self.acceptance.asked(r.request_id, bool(d))
            # A batch with a request's first proposal is left out: its prompt's prefill in the draft (once a request)
            # would read as drafting that costs twice its price, and adaptive fell to k = 0 for thousands of steps.
            first = any(r.request_id not in self._proposed for r in batch)
            self._proposed.update(r.request_id for r in batch)
            if predicted > 0 and not first:
                ratio = min(max((self.clock.now() - start) / predicted, 0.1), 10.0)
                self.draft_scale += 0.1 * (ratio - self.draft_scale)
        return {r.request_id: d for r, d in zip(batch, drafts) if d}

    def _limits(self, decoding: list[Request]) -> list[int]:
        """Per request, the most drafts it can use: a verification emits up to k + 1 tokens, never past max_tokens or
        the model's length."""
        return [min(self.config.num_speculative_tokens,
                    r.sampling_params.max_tokens - len(r.output_token_ids) - 1,
                    self.max_model_len - r.num_tokens - 1) for r in decoding]

    def _choose(self, decoding: list[Request], limits: list[int], predictor: StepTimeModel) -> int:
        """Adaptive: the k whose step yields the most expected tokens per predicted second."""
        alphas = [self.acceptance.alpha(r.request_id) for r in decoding]
        cands = candidates(self.config.num_speculative_tokens, limits, [r.num_tokens for r in decoding], alphas,
                           predictor, self._draft_seconds,
                           [self.acceptance.draft_rate(r.request_id) for r in decoding],
                           self.acceptance.position_factors(self.config.num_speculative_tokens))
        k = best_k(cands)
        # Now and then the other side: k = 0, or the verification the prices favour where drafts are accepted at all.
        other = 0
        if k == 0 and sum(alphas) > EXPLORE_MIN_ACCEPTANCE * len(alphas):
            other = max(cands[1:], key=lambda c: c.rate).k
        k = self.exploration.step(k, other)
        self.hold.weighed(cands, k, len(decoding))
        return k

    def _draft_seconds(self, ks: list[int], contexts: list[int]) -> float:
        return self.draft_scale * self.proposer.predict_seconds(ks, contexts)

    def observe(self, plan: SchedulerOutput, sampled: list[list[int]]) -> None:
        for s, tokens in zip(plan.scheduled, sampled):
            if not s.spec_token_ids or not tokens:
                continue
            accepted = len(tokens) - 1
            self.acceptance.observe(s.request_id, len(s.spec_token_ids), accepted)
            st = self.stats
            st.num_drafts += 1
            st.num_draft_tokens += len(s.spec_token_ids)
            st.num_accepted_tokens += accepted
            st.num_emitted_tokens += len(tokens)
            for pos in range(accepted):
                st.accepted_per_pos[pos] += 1

    def forget(self, request_ids: list[str]) -> None:
        """Requests that ended or were preempted: their draft state goes (a preempted one restarts it)."""
        self.proposer.forget(request_ids)
        self._proposed.difference_update(request_ids)
        for request_id in request_ids:
            self.acceptance.forget(request_id)
