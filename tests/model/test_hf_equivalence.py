"""Greedy outputs equal Hugging Face transformers' on the same weights, whatever the batching."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from sloserve import LLM, SamplingParams

PROMPT_LENS = (3, 17, 40, 31, 9, 64)
MAX_TOKENS = 20

SCENARIOS = {
    "batched": dict(),
    # A budget smaller than most prompts forces chunked prefill alongside decodes.
    "chunked_prefill": dict(max_num_batched_tokens=16),
    # 40 blocks of 4 tokens hold the prompts but not their outputs: running requests get preempted.
    "preemption": dict(block_size=4, num_kv_blocks=40),
}


def hf_greedy(model_dir, prompts):
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outs = []
    for prompt in prompts:  # one at a time: no padding in the reference
        ids = hf.generate(torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False)
        outs.append(ids[0, len(prompt):].tolist())
    return outs


@pytest.mark.parametrize("use_kernels", [True, False], ids=["kernels", "torch_ops"])
@pytest.mark.parametrize("kind", ["llama", "smollm", "mistral", "qwen2", "qwen3"])
def test_greedy_matches_transformers(kind, use_kernels, tiny_model_dir):
    model_dir = tiny_model_dir(kind)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(2, 384, (n,), generator=g).tolist() for n in PROMPT_LENS]
    expected = hf_greedy(model_dir, prompts)
    for name, knobs in SCENARIOS.items():
        llm = LLM(str(model_dir), dtype="float32", use_kernels=use_kernels, **knobs)
        outs = llm.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(max_tokens=MAX_TOKENS, temperature=0))
        assert [o.outputs[0].token_ids for o in outs] == expected, f"{kind} differs under {name}"
        if name == "preemption":
            assert sum(o.num_preemptions for o in outs) > 0
        blocks = llm.engine.block_manager
        assert blocks.num_free_blocks == blocks.num_blocks


def test_bfloat16_runs_close_to_transformers(tiny_model_dir):
    """bfloat16 rounds differently per kernel; the first greedy token must still agree."""
    model_dir = tiny_model_dir("llama")
    prompts = [[5, 9, 22, 31, 7, 100, 250], [3, 4]]
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    expected = [hf.generate(torch.tensor([p]), max_new_tokens=1, do_sample=False)[0, -1].item() for p in prompts]
    llm = LLM(str(model_dir), dtype="bfloat16")
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(max_tokens=1, temperature=0))
    assert [o.outputs[0].token_ids[0] for o in outs] == expected


@pytest.mark.parametrize("isa", ["portable", "avx2"])
def test_forced_fallback_matmul_matches_transformers(isa, tiny_model_dir, monkeypatch):
    """The slower bodies of the matmul kernel, forced as on a CPU without AVX-512, give HF's tokens too."""
    monkeypatch.setenv("SLOSERVE_CPU_ISA", isa)
    model_dir = tiny_model_dir("qwen2")  # biases on q, k, v: the kernel's bias path too
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(2, 384, (n,), generator=g).tolist() for n in PROMPT_LENS]
    llm = LLM(str(model_dir), dtype="float32")
    assert all(layer.qkv_proj.skinny.isa == isa for layer in llm.engine.executor.model.layers)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(max_tokens=MAX_TOKENS, temperature=0))
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(model_dir, prompts)
