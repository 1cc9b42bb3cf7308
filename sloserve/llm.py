"""LLM: the offline API, an LLMEngine composed with a ModelExecutor over a local model."""
from __future__ import annotations

import itertools
from collections.abc import Sequence

from sloserve.config import EngineConfig
from sloserve.engine.engine import LLMEngine
from sloserve.engine.cost import StepCostModel, StepPredictor
from sloserve.model.loader import load_model
from sloserve.model.runner import ModelExecutor
from sloserve.request import RequestOutput, SamplingParams


def build_engine(config: EngineConfig, step_model: StepCostModel | None = None) -> LLMEngine:
    """The one place where a real model, its executor and the engine are put together.

    `step_model` (a profile's) starts the engine's step-time predictor; without one it starts from
    a conservative default. Either way the engine recalibrates it from its own measured steps.
    """
    loaded = load_model(config)
    executor, speculation = ModelExecutor(loaded, config), None
    if config.speculative_config is not None:
        from sloserve.spec.build import build_speculation

        executor, speculation = build_speculation(config, loaded, executor)
    return LLMEngine(
        executor,
        config.scheduler_config(),
        max_model_len=loaded.max_model_len,
        vocab_size=loaded.vocab_size,
        eos_token_ids=loaded.eos_token_ids,
        tokenizer=loaded.tokenizer,
        predictor=StepPredictor(step_model) if step_model else None,
        speculator=speculation,
    )


class LLM:
    """`LLM(model=DIR).generate(prompts, SamplingParams(...))`, as in vLLM."""

    def __init__(self, model: str, **engine_args) -> None:
        self.engine = build_engine(EngineConfig(model=model, **engine_args))
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(
        self,
        prompts: str | Sequence[str] | None = None,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in the order of the prompts."""
        token_lists = self._token_lists(prompts, prompt_token_ids)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = [sampling_params] * len(token_lists) if isinstance(sampling_params, SamplingParams) else list(sampling_params)
        if len(params) != len(token_lists):
            raise ValueError(f"{len(params)} sampling params for {len(token_lists)} prompts")
        ids = [str(next(self._ids)) for _ in token_lists]
        try:
            for request_id, tokens, p in zip(ids, token_lists, params):
                self.engine.add_request(request_id, tokens, p)
            finished: dict[str, RequestOutput] = {}
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        finished[out.request_id] = out
        finally:  # an error part-way must not leave requests holding KV blocks
            for request_id in ids:
                self.engine.abort_request(request_id)
        return [finished[i] for i in ids]

    def _token_lists(self, prompts, prompt_token_ids) -> list[list[int]]:
        if (prompts is None) == (prompt_token_ids is None):
            raise ValueError("give either prompts or prompt_token_ids")
        if prompt_token_ids is not None:
            return [list(t) for t in prompt_token_ids]
        if self.tokenizer is None:
            raise ValueError("text prompts need a tokenizer; this model directory has none (pass prompt_token_ids)")
        if isinstance(prompts, str):
            prompts = [prompts]
        return [self.tokenizer.encode(p) for p in prompts]
