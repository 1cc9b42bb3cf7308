"""Sampling: seeded requests are reproducible whatever shares their batch; top-k/top-p cut correctly."""
import torch

from sloserve import LLM, SamplingParams
from sloserve.model.sampler import Sampler


def test_seeded_sampling_is_independent_of_the_batch(tiny_model_dir):
    llm = LLM(str(tiny_model_dir("llama")), dtype="float32")
    seeded = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.9, seed=1234)
    prompt = [11, 12, 13, 14]
    alone = llm.generate(prompt_token_ids=[prompt], sampling_params=seeded)[0].outputs[0].token_ids
    busy_prompts = [[20 + i] * (5 + 7 * i) for i in range(6)]
    busy_params = [SamplingParams(max_tokens=30, temperature=1.0) for _ in busy_prompts]
    outs = llm.generate(prompt_token_ids=busy_prompts + [prompt], sampling_params=busy_params + [seeded])
    assert outs[-1].outputs[0].token_ids == alone
    other_seed = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.9, seed=4321)
    assert llm.generate(prompt_token_ids=[prompt], sampling_params=other_seed)[0].outputs[0].token_ids != alone


def test_top_k_and_top_p_keep_only_the_allowed_tokens():
    sampler = Sampler(seed=0)
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0, 2.8]])
    drawn = {
        sampler.sample(logits, ["a"], [SamplingParams(temperature=1.0, top_k=2)])[0] for _ in range(200)
    }
    assert drawn == {1, 2}
    # Probabilities ~[.03, .35, .32, .01, .29]: top_p=0.6 keeps the two most likely.
    drawn = {
        sampler.sample(logits, ["b"], [SamplingParams(temperature=1.0, top_p=0.6)])[0] for _ in range(200)
    }
    assert drawn == {1, 2}
    assert sampler.sample(logits, ["c"], [SamplingParams(temperature=0.0)]) == [1]
