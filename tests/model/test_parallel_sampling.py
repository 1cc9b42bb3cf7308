"""Parallel sampling (SamplingParams.n) in the offline LLM: n completions per prompt, as vLLM returns them."""
import dataclasses

import torch

from sloserve import LLM, SamplingParams
from tests.model.test_hf_equivalence import MAX_TOKENS, hf_greedy


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(2, 384, (n,), generator=g).tolist() for n in (23, 9)]


def test_n_greedy_gives_n_identical_outputs_equal_to_transformers_and_prefills_once(tiny_model_dir):
    model_dir = tiny_model_dir("llama")
    expected = hf_greedy(model_dir, prompts())
    llm = LLM(str(model_dir), dtype="float32", block_size=4)
    outs = llm.generate(prompt_token_ids=prompts(), sampling_params=SamplingParams(max_tokens=MAX_TOKENS, temperature=0, n=3))
    assert len(outs) == 2
    for out, want in zip(outs, expected):
        assert [c.index for c in out.outputs] == [0, 1, 2]
        assert [c.token_ids for c in out.outputs] == [want] * 3
    blocks = llm.engine.block_manager
    # Two siblings per prompt reuse its full blocks: 20 of 23 tokens and 8 of 9.
    assert blocks.stats.hits == 2 * 20 + 2 * 8
    assert blocks.num_free_blocks == blocks.num_blocks and all(b.ref_count == 0 for b in blocks.blocks)


def test_seeded_siblings_are_reproducible_and_sibling_i_samples_with_seed_plus_i(tiny_model_dir):
    llm = LLM(str(tiny_model_dir("llama")), dtype="float32", block_size=4)
    prompt = prompts()[:1]
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=100, n=3)
    first = [c.token_ids for c in llm.generate(prompt_token_ids=prompt, sampling_params=params)[0].outputs]
    again = [c.token_ids for c in llm.generate(prompt_token_ids=prompt, sampling_params=params)[0].outputs]
    assert first == again
    assert len({tuple(t) for t in first}) == 3  # three different streams
    for i, tokens in enumerate(first):
        alone = dataclasses.replace(params, n=1, seed=100 + i)
        assert llm.generate(prompt_token_ids=prompt, sampling_params=alone)[0].outputs[0].token_ids == tokens
