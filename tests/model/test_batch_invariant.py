"""Batch-invariant mode (VLLM_BATCH_INVARIANT=1, or batch_invariant=True): a request's every logit is the same
bits whether its prompt was prefilled alone in one chunk or cut into small chunks beside other requests'
prompts and decodes. In bfloat16 the default path rounds a prompt row by its chunk's shape (oneDNN, SDPA)."""
import pytest
import torch

from sloserve import LLM, SamplingParams
from sloserve.cli_args import default_model_dir
from sloserve.config import EngineConfig

PARAMS = SamplingParams(temperature=0, max_tokens=6, logprobs=3, ignore_eos=True)


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in (53, 9, 31, 70, 4, 22)]


def _first(llm: LLM, prompts: list[list[int]]):
    out = llm.generate(prompt_token_ids=prompts, sampling_params=PARAMS)[0].outputs[0]
    return out.token_ids, [[(t, lp.logprob) for t, lp in sorted(pos.items())] for pos in out.logprobs]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_a_requests_logits_do_not_depend_on_its_batch_or_chunks(built_kernels, dtype):
    assert built_kernels is not None, "sloserve's C++ kernels failed to build"
    model = str(default_model_dir())
    alone = LLM(model, dtype=dtype, batch_invariant=True, max_num_batched_tokens=512, enable_prefix_caching=False)
    prompts = _prompts(alone.engine.vocab_size)
    reference = _first(alone, prompts[:1])
    # The same request in a batch of six, its prompt in chunks of at most 8 tokens mixed with the others'.
    crowded = LLM(model, dtype=dtype, batch_invariant=True, max_num_batched_tokens=8, enable_prefix_caching=False)
    assert _first(crowded, prompts) == reference


def test_batch_invariant_mode_refuses_a_path_without_the_kernels():
    with pytest.raises(ValueError, match="batch-invariant mode needs sloserve's CPU kernels"):
        LLM(str(default_model_dir()), dtype="bfloat16", batch_invariant=True, use_kernels=False)


def test_vllm_environment_variable_turns_it_on(monkeypatch):
    monkeypatch.setenv("VLLM_BATCH_INVARIANT", "1")
    assert EngineConfig(model="m").batch_invariant
    monkeypatch.setenv("VLLM_BATCH_INVARIANT", "0")
    assert not EngineConfig(model="m").batch_invariant
