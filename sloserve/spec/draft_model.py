"""Draft-model proposer: a small model with the target's tokenizer drafts k tokens, autoregressively,
batched over requests, on its own paged KV cache (blocks freed with the request, reused across steps)."""
from __future__ import annotations

import torch

from sloserve.engine.clock import Clock, MonotonicClock
from sloserve.engine.cost import StepCostModel, StepPredictor
from sloserve.engine.features import StepShape
from sloserve.engine.kv_cache import BlockManager
from sloserve.engine.scheduler import ScheduledRequest, SchedulerOutput
from sloserve.model.runner import ModelExecutor
from sloserve.model.sampler import Sampler
from sloserve.spec.draft_cost import draft_model_seconds
from sloserve.spec.greedy_draft import GreedyRow, draft_greedy
from sloserve.spec.proposer import DraftRequest

class DraftModelProposer:
    def __init__(self, executor: ModelExecutor, block_size: int, max_num_batched_tokens: int,
                 clock: Clock | None = None) -> None:
        self.executor = executor
        self.clock = clock or MonotonicClock()  # times the draft's forward passes for its predictor
        self.blocks = BlockManager(executor.num_kv_blocks, block_size)
        # Per request, the tokens whose keys and values sit in the draft's cache (positions 0..len-1).
        self.cached: dict[str, list[int]] = {}
        # The distributions sampled drafts were drawn from, for the verifier's rejection sampling.
        self.draft_probs: dict[str, torch.Tensor] = {}
        # The draft's step time, by the same predictor the engine uses for the target. Refitted less often than the
        # target's: refits (least squares over the window) every 32 observations, two a proposal, were ~5% of a greedy
        # proposal's CPU time on the bundled pair; between refits `Speculation.draft_scale` follows what proposals take.
        self.predictor = StepPredictor(StepCostModel.default(max_num_batched_tokens), refit_every=128)

    def forget(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self.blocks.free(request_id)
            self.cached.pop(request_id, None)
        self.executor.sampler.forget(request_ids)

    @torch.inference_mode()
    def propose(self, batch: list[DraftRequest]) -> list[list[int]]:
        self.draft_probs = {}
        drafts: list[list[int]] = [[] for _ in batch]
        # Per request: tokens in the draft cache, and the tokens this proposal feeds first.
        computed, pending = [0] * len(batch), [[] for _ in batch]
        ready = []
        for i, r in enumerate(batch):
            cached = self.cached.get(r.request_id, [])
            common = _common_prefix(cached, r.token_ids, len(r.token_ids) - 1)  # rejected drafts roll back here
            # The last draft is never fed back, so k drafts need len(tokens) + k - 1 slots.
            if r.k < 1 or not self.blocks.allocate_slots(r.request_id, len(r.token_ids) + r.k - 1):
                self.cached.pop(r.request_id, None)
                continue
            computed[i], pending[i] = common, r.token_ids[common:]
            ready.append(i)
        greedy = [i for i in ready if batch[i].sampling_params.greedy]
        if greedy:
            tokens = self._draft_greedy([GreedyRow(computed[i], pending[i], self.blocks.block_tables[batch[i].request_id],
                                                   batch[i].k) for i in greedy])
            for i, t in zip(greedy, tokens):
                drafts[i] = t
        sampled = [i for i in ready if not batch[i].sampling_params.greedy]
        if sampled:
            self._propose_sampled(batch, sampled, computed, pending, drafts)
        for i, r in enumerate(batch):
            if drafts[i]:
                self.cached[r.request_id] = r.token_ids + drafts[i][:-1]
        return drafts

    def _draft_greedy(self, rows: list[GreedyRow]) -> list[list[int]]:
        drafted = draft_greedy(self.executor, rows, self.clock)
        for shape, seconds in drafted.observations:
            self.predictor.observe(shape, seconds)
        return drafted.tokens

    def _propose_sampled(self, batch: list[DraftRequest], rows: list[int], computed: list[int],
                         pending: list[list[int]], drafts: list[list[int]]) -> None:
        """Sampled drafts, one step a plan, each draft's distribution kept (`draft_probs`) for rejection sampling."""
        probs: dict[int, list[torch.Tensor]] = {i: [] for i in rows}
        for _ in range(max(batch[i].k for i in rows)):
            active = [i for i in rows if len(drafts[i]) < batch[i].k]
            if not active:
                break
            plan = SchedulerOutput([ScheduledRequest(
                request_id=batch[i].request_id, token_ids=pending[i], num_computed_tokens=computed[i],
                num_new_tokens=len(pending[i]), samples=True, block_table=self.blocks.block_tables[batch[i].request_id],
                sampling_params=batch[i].sampling_params,
            ) for i in active])
            start = self.clock.now()
            sampling, logits = self.executor.forward(plan)
            row_of = {id(s): row for row, s in enumerate(sampling)}
            for s, i in zip(plan.scheduled, active):
                p = batch[i].sampling_params
                q = Sampler.probabilities(logits[row_of[id(s)]], p, s.request_id)
                token = int(torch.multinomial(q, 1, generator=self.executor.sampler.generator_for(s.request_id, p)))
                probs[i].append(q)
                drafts[i].append(token)
                computed[i] += len(pending[i])
                pending[i] = [token]
            self.predictor.observe(StepShape.of(plan), self.clock.now() - start)
        for i in rows:
            self.draft_probs[batch[i].request_id] = torch.stack(probs[i])

    def predict_seconds(self, ks: list[int], contexts: list[int]) -> float:
        return draft_model_seconds(self.predictor, ks, contexts)

    @torch.inference_mode()
    def calibrate(self, batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32), repeats: int = 3) -> None:
        """Time a few greedy proposals on scratch blocks (the path proposals take: a two-token feed, then a draft
        step) so the first adaptive choice knows the draft's cost."""
        context, feed, k = 64, 2, 2
        for b in batch_sizes:
            ids = [f"__calibrate{j}" for j in range(b)]
            if not all(self.blocks.allocate_slots(i, context + feed + k - 1) for i in ids):
                self.forget(ids)
                break
            for _ in range(repeats):
                self._draft_greedy([GreedyRow(context, [0] * feed, self.blocks.block_tables[i], k) for i in ids])
            self.forget(ids)
        self.predictor.refit()


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
