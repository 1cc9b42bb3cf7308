"""Composition of speculative decoding: the proposer a config names, the executor that verifies with it."""
from __future__ import annotations

from sloserve.config import EngineConfig
from sloserve.model.loader import LoadedModel, load_model
from sloserve.model.runner import ModelExecutor
from sloserve.spec.draft_model import DraftModelProposer
from sloserve.spec.ngram import NgramProposer
from sloserve.spec.proposer import Proposer
from sloserve.spec.speculation import Speculation


class SpeculativeExecutor:
    """The target's executor, handed the draft distributions it verifies sampled drafts against."""

    def __init__(self, target: ModelExecutor, proposer: Proposer) -> None:
        self.target = target
        self.proposer = proposer
        self.num_kv_blocks = target.num_kv_blocks

    def execute(self, plan):
        return self.target.execute(plan, self.proposer.draft_probs)

    def take_logprobs(self):
        return self.target.take_logprobs()


def build_speculation(config: EngineConfig, loaded: LoadedModel, target: ModelExecutor) -> tuple[SpeculativeExecutor, Speculation]:
    spec = config.speculative_config
    max_model_len = loaded.max_model_len
    if spec.method == "ngram":
        proposer: Proposer = NgramProposer(spec.prompt_lookup_min, spec.prompt_lookup_max)
    else:
        draft_config = EngineConfig(
            model=spec.model, load_format="dummy" if config.load_format == "dummy" else "auto", dtype=config.dtype,
            seed=config.seed, device=config.device, block_size=config.block_size,
            num_kv_blocks=target.num_kv_blocks,  # room for every token the target's cache can hold
            attention_backend=config.attention_backend, enforce_eager=config.enforce_eager,
            max_num_batched_tokens=config.max_num_batched_tokens, max_num_seqs=config.max_num_seqs,
            use_kernels=config.use_kernels,
        )
        draft = load_model(draft_config)
        check_same_vocabulary(loaded, draft, spec.model)
        max_model_len = min(max_model_len, draft.max_model_len)
        proposer = DraftModelProposer(ModelExecutor(draft, draft_config), config.block_size, config.max_num_batched_tokens)
        if spec.k_policy == "adaptive":
            proposer.calibrate()
    speculation = Speculation(spec, proposer, max_model_len)
    return SpeculativeExecutor(target, proposer), speculation


def check_same_vocabulary(target: LoadedModel, draft: LoadedModel, draft_dir: str) -> None:
    """A draft proposes token ids: they mean the same only under the target's own tokenizer."""
    if draft.vocab_size != target.vocab_size:
        raise ValueError(
            f"the draft model {draft_dir} has a vocabulary of {draft.vocab_size} tokens and the target "
            f"{target.vocab_size}: a draft model must use the target's tokenizer"
        )
    if target.tokenizer is not None and draft.tokenizer is not None and target.tokenizer.get_vocab() != draft.tokenizer.get_vocab():
        raise ValueError(f"the draft model {draft_dir} has a different tokenizer from the target's: a draft model must use the target's tokenizer")
