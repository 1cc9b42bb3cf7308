"""LLM: the offline API, an LLMEngine composed with a ModelExecutor over a local model."""
from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

from sloserve.config import EngineConfig
from sloserve.engine.engine import LLMEngine
from sloserve.engine.cost import StepCostModel, StepPredictor
from sloserve.model.loader import load_model
from sloserve.model.runner import ModelExecutor
from sloserve.request import RequestOutput, SamplingParams, TextPrompt, TokensPrompt

PromptType = str | TextPrompt | TokensPrompt
Message = Mapping[str, str]


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
    """`LLM(model=...).generate(prompts, SamplingParams(...))` and `.chat(messages)`, as in vLLM."""

    def __init__(self, model: str, **engine_args) -> None:
        self.engine = build_engine(EngineConfig(model=model, **engine_args))
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType] | None = None,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,  # no progress bar is ever drawn, so both values are honoured
        lora_request=None,
        *,
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in the order of the prompts.

        A prompt is a string, `{"prompt": str}` or `{"prompt_token_ids": [...]}` (vLLM's TextPrompt
        and TokensPrompt); `prompt_token_ids=` is the older spelling of a batch of the latter.
        With `SamplingParams(n=k)`, a prompt's RequestOutput holds k completions (index 0..k-1).
        """
        if lora_request is not None:
            raise ValueError("LoRA adapters are not supported (lora_request must be None)")
        texts, token_lists = self._prompts(prompts, prompt_token_ids)
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
        outputs = [finished[i] for i in ids]
        for out, text in zip(outputs, texts):
            out.prompt = text
        return outputs

    def chat(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        lora_request=None,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
    ) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"} messages) or a list of them, through the
        tokenizer's chat template (or `chat_template`)."""
        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer, and this model has none")
        if chat_template is None and not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template; pass chat_template=")
        conversations = [messages] if messages and isinstance(messages[0], Mapping) else list(messages)
        prompts: list[PromptType] = []
        texts: list[str] = []
        for conversation in conversations:
            text = self.tokenizer.apply_chat_template(
                [dict(m) for m in conversation], chat_template=chat_template, tokenize=False,
                add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message,
            )
            # The template writes any special tokens (BOS, role markers) itself.
            texts.append(text)
            prompts.append(TokensPrompt(prompt_token_ids=self.tokenizer.encode(text, add_special_tokens=False)))
        outputs = self.generate(prompts, sampling_params, use_tqdm, lora_request)
        for out, text in zip(outputs, texts):
            out.prompt = text
        return outputs

    def _prompts(self, prompts, prompt_token_ids) -> tuple[list[str | None], list[list[int]]]:
        """Each prompt's text (None for token prompts) and its token ids."""
        if (prompts is None) == (prompt_token_ids is None):
            raise ValueError("give either prompts or prompt_token_ids")
        if prompt_token_ids is not None:
            prompts = [TokensPrompt(prompt_token_ids=list(t)) for t in prompt_token_ids]
        elif isinstance(prompts, (str, Mapping)):
            prompts = [prompts]
        texts, token_lists = [], []
        for prompt in prompts:
            text = prompt if isinstance(prompt, str) else None
            if isinstance(prompt, Mapping):
                unknown = set(prompt) - {"prompt", "prompt_token_ids"}
                if unknown or len(prompt) != 1:
                    raise ValueError(
                        "a prompt dict holds exactly one of 'prompt' (text) or 'prompt_token_ids'"
                        + (f"; not supported: {', '.join(sorted(unknown))}" if unknown else "")
                    )
                if "prompt_token_ids" in prompt:
                    texts.append(None)
                    token_lists.append(list(prompt["prompt_token_ids"]))
                    continue
                text = prompt["prompt"]
            if not isinstance(text, str):
                raise TypeError(f"a prompt is a string or a prompt dict, not {type(prompt).__name__}")
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer; this model has none (pass {'prompt_token_ids': [...]})")
            texts.append(text)
            token_lists.append(self.tokenizer.encode(text))
        return texts, token_lists
