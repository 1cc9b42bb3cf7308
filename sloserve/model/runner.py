"""ModelExecutor: turns a scheduler plan into batch tensors, runs the model, samples."""
from __future__ import annotations

import torch

from sloserve.config import EngineConfig
from sloserve.engine.executor import StepLogprobs
from sloserve.engine.scheduler import ScheduledRequest, SchedulerOutput
from sloserve.model.attention import SequenceRows
from sloserve.model.kv_memory import kv_cache_blocks
from sloserve.model.loader import LoadedModel
from sloserve.model.logits_processors import TokenHistories
from sloserve.model.logprobs import PromptScorer, position_logprobs
from sloserve.model.sampler import Sampler
from sloserve.spec.rejection import verify


class ModelExecutor:
    def __init__(self, loaded: LoadedModel, config: EngineConfig) -> None:
        self.model = loaded.model
        self.block_size = config.block_size
        self.batch_invariant = config.batch_invariant  # prompt rows computed as decodes too (EngineConfig)
        self.device = torch.device(config.device)
        shape = self.model.shape
        self.num_kv_blocks = kv_cache_blocks(self.model, config, loaded.dtype)
        use_graphs = self.device.type == "cuda" and not config.enforce_eager
        # CUDA graphs pad a batch up to a captured size; the padding rows write their keys and values
        # into one extra block that no request is ever given.
        num_slots = (self.num_kv_blocks + use_graphs) * config.block_size
        # Zeroed, not empty: padded gathers read unused slots, and NaN garbage would survive masking.
        cache = torch.zeros(
            shape.num_layers, 2, num_slots, shape.num_kv_heads, shape.head_dim, dtype=loaded.dtype, device=self.device
        )
        self.kv_caches = [(layer[0], layer[1]) for layer in cache]
        self.sampler = Sampler(config.seed, self.device)
        self.histories = TokenHistories(loaded.eos_token_ids)  # for penalties and min_tokens
        self.prompt_scorer = PromptScorer()
        self._logprobs: dict[str, StepLogprobs] = {}  # computed since the engine last took them
        self.graphs = None
        if use_graphs:
            from sloserve.model.cuda_graphs import DecodeGraphs  # CUDA only: imports Triton

            self.graphs = DecodeGraphs(self.model, self.kv_caches, config.block_size, config.max_num_seqs,
                                       loaded.max_model_len, sink_block=self.num_kv_blocks)

    @torch.inference_mode()
    def execute(self, plan: SchedulerOutput, draft_probs: dict[str, torch.Tensor] | None = None) -> list[list[int]]:
        """`draft_probs`: per request, the draft model's distributions its drafts were sampled from
        (absent: deterministic drafts, such as n-gram's or a greedy draft's)."""
        sampling, logits, prompt_parts, prompt_logits = self._run(plan)
        step_logprobs: dict[str, StepLogprobs] = {}
        scored, waiting = self.prompt_scorer.score(prompt_parts, prompt_logits) if prompt_parts else ({}, {})
        for request_id, (first, positions) in scored.items():
            step_logprobs[request_id] = StepLogprobs(prompt_start=first, prompt=positions)
        if not sampling:
            self._commit(step_logprobs, waiting)
            return [[] for _ in plan.scheduled]
        # A request verifying k drafts owns k + 1 consecutive logits rows; any other sampling request one.
        first_row, row = [], 0
        for s in sampling:
            first_row.append(row)
            row += len(s.spec_token_ids) + 1
        plain = [i for i, s in enumerate(sampling) if not s.spec_token_ids]
        by_request: dict[int, list[int]] = {}
        if plain:
            rows = logits if len(plain) == len(logits) else logits[[first_row[i] for i in plain]]
            tokens = self.sampler.sample(rows, [sampling[i].request_id for i in plain],
                                         [sampling[i].sampling_params for i in plain],
                                         self.histories.of([sampling[i] for i in plain]))
            by_request.update((id(sampling[i]), [t]) for i, t in zip(plain, tokens))
        for s, r in zip(sampling, first_row):
            if s.spec_token_ids:
                p = s.sampling_params
                probabilities = lambda row, p=p, rid=s.request_id: Sampler.probabilities(row, p, rid)  # noqa: E731
                by_request[id(s)] = verify(
                    logits[r : r + len(s.spec_token_ids) + 1], s.spec_token_ids, p, probabilities,
                    None if p.greedy else self.sampler.generator_for(s.request_id, p),
                    (draft_probs or {}).get(s.request_id),
                )
        asking = [(s, r) for s, r in zip(sampling, first_row) if s.sampling_params.logprobs is not None]
        if asking:
            # Row r + i is the distribution token i was drawn from (a verification's accepted drafts too):
            # one log-softmax over all those rows.
            rows, chosen, ks = [], [], []
            for s, r in asking:
                tokens = by_request[id(s)]
                rows += range(r, r + len(tokens))
                chosen += tokens
                ks += [s.sampling_params.logprobs] * len(tokens)
            scored = iter(position_logprobs(logits[rows], chosen, ks))
            for s, _ in asking:
                step = step_logprobs.setdefault(s.request_id, StepLogprobs())
                step.sampled = [next(scored) for _ in by_request[id(s)]]
        self._commit(step_logprobs, waiting)
        return [by_request.get(id(s), []) for s in plan.scheduled]

    def _commit(self, step_logprobs: dict[str, StepLogprobs], waiting: dict) -> None:
        # Only once the whole step succeeded: a step retried in halves (engine/isolation.py) must not
        # lose a waiting prompt row or half a step's logprobs.
        self._logprobs.update(step_logprobs)
        self.prompt_scorer.keep(waiting)

    def take_logprobs(self) -> dict[str, StepLogprobs]:
        taken, self._logprobs = self._logprobs, {}
        return taken

    @torch.inference_mode()
    def forward(self, plan: SchedulerOutput) -> tuple[list[ScheduledRequest], torch.Tensor]:
        """Run the plan's tokens; return the sampling requests (batch order) and their logits rows: one
        each, or k + 1 for a request verifying k drafts (one forward pass over all k + 1 positions)."""
        sampling, logits, _, _ = self._run(plan, score_prompts=False)  # a draft model's pass scores nothing
        return sampling, logits

    def _run(self, plan: SchedulerOutput, score_prompts: bool = True):
        """As `forward`, and then the prompt rows of the requests that ask for prompt logprobs: (request,
        number of its rows) in row order, and those rows' logits. Other requests get no extra rows."""
        self.sampler.forget(plan.finished_request_ids)
        self.prompt_scorer.forget(plan.finished_request_ids)
        self.histories.record(plan)
        # Decode rows (one new token, a verification's k + 1, every span in batch-invariant mode) first, then prompt
        # chunks: the CPU backend computes the former with decode arithmetic, so their numbers never depend on the step.
        as_decodes = lambda s: s.num_new_tokens == 1 or bool(s.spec_token_ids) or self.batch_invariant  # noqa: E731
        ordered = sorted(plan.scheduled, key=lambda s: not as_decodes(s))  # stable
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        prompt_rows: list[int] = []
        prompt_parts: list[tuple[ScheduledRequest, int]] = []
        rows: list[SequenceRows] = []
        for s in ordered:
            start, table = s.num_computed_tokens, s.block_table
            end = start + s.num_new_tokens
            input_ids += s.token_ids
            positions += range(start, end)
            slots += [table[p // bs] * bs + p % bs for p in range(start, end)]
            rows.append(SequenceRows(start, s.num_new_tokens, table, as_decodes=as_decodes(s)))
            num_sampled = len(s.spec_token_ids) + 1 if s.samples else 0
            if s.samples:
                sample_rows += range(len(positions) - num_sampled, len(positions))
            if score_prompts and s.sampling_params.prompt_logprobs is not None:
                first = len(positions) - s.num_new_tokens
                prompt_rows += range(first, len(positions) - num_sampled)
                prompt_parts.append((s, s.num_new_tokens - num_sampled))
        logits = self.run_rows(rows, input_ids, positions, slots, sample_rows + prompt_rows)
        if not sample_rows and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the step ends when the GPU is done, not when it is queued
        n = len(sample_rows)
        return [s for s in ordered if s.samples], logits[:n] if prompt_rows else logits, prompt_parts, logits[n:]

    def run_rows(self, rows: list[SequenceRows], input_ids: list[int] | torch.Tensor, positions: list[int],
                 slots: list[int], wanted: list[int]) -> torch.Tensor:
        """The model over a step laid out as batch rows (decode rows first): the logits of rows `wanted`."""
        # CUDA graphs cover steps of one new token per request only; verifications take the eager path.
        if self.graphs is not None and len(positions) == len(rows) and self.graphs.fits(len(rows)):
            ids = input_ids.tolist() if isinstance(input_ids, torch.Tensor) else input_ids
            return self.graphs.run(rows, ids, positions, slots)[wanted]  # one row per request
        meta = self.model.attention.prepare(rows, self._tensor(slots))
        ids = input_ids if isinstance(input_ids, torch.Tensor) else self._tensor(input_ids)
        return self.model(ids, self._tensor(positions), meta, self.kv_caches, self._tensor(wanted or [0]))

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)
