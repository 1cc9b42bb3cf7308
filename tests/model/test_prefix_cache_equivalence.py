"""Greedy outputs with prefix caching on equal transformers' (and caching off's) on shared-prefix batches."""
import pytest
import torch

from sloserve import LLM, SamplingParams
from tests.model.test_hf_equivalence import MAX_TOKENS, hf_greedy


def shared_prefix_prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    system = torch.randint(2, 384, (37,), generator=g).tolist()  # 9 blocks of 4 and a 1-token tail
    tails = [torch.randint(2, 384, (n,), generator=g).tolist() for n in (1, 6, 13)]
    # The system prompt alone, three questions after it, and a repeat of the second (a whole-prompt hit).
    return [system] + [system + t for t in tails] + [system + tails[1]]


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_caching_on_and_off_both_match_transformers(kind, tiny_model_dir):
    model_dir = tiny_model_dir(kind)
    prompts = shared_prefix_prompts()
    expected = hf_greedy(model_dir, prompts)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    for caching in (True, False):
        # A small budget chunks the prefills, so later prompts are admitted after earlier ones cached blocks.
        llm = LLM(str(model_dir), dtype="float32", block_size=4, max_num_batched_tokens=16,
                  enable_prefix_caching=caching)
        blocks = llm.engine.block_manager
        for attempt in ("cold", "warm"):  # warm: every prompt's prefix is already cached
            outs = llm.generate(prompt_token_ids=prompts, sampling_params=params)
            assert [o.outputs[0].token_ids for o in outs] == expected, f"{kind}, caching={caching}, {attempt}"
            assert blocks.num_free_blocks == blocks.num_blocks  # every block back, free or cached
        if caching:
            assert blocks.stats.hits >= 36 * (2 * len(prompts) - 1)  # all but the very first prompt reuse the system prompt
        else:
            assert blocks.stats.hits == 0 and blocks.num_cached_blocks == 0


def test_preemption_with_shared_blocks_matches_transformers(tiny_model_dir):
    """A cache too small for every output: preempted requests drop references to shared blocks."""
    model_dir = tiny_model_dir("llama")
    prompts = shared_prefix_prompts()
    expected = hf_greedy(model_dir, prompts)
    llm = LLM(str(model_dir), dtype="float32", block_size=4, num_kv_blocks=40)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(max_tokens=MAX_TOKENS, temperature=0))
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert sum(o.num_preemptions for o in outs) > 0
    blocks = llm.engine.block_manager
    assert blocks.num_free_blocks == blocks.num_blocks and all(b.ref_count == 0 for b in blocks.blocks)
