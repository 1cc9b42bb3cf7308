"""min_tokens, repetition/presence/frequency penalties and min_p equal transformers' logits processors."""
from collections import Counter
from dataclasses import dataclass

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
)

from sloserve import LLM, SamplingParams
from sloserve.model.logits_processors import apply_logits_processors

VOCAB = 384


@dataclass
class History:
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    eos_token_ids: frozenset[int] = frozenset({1})


def random_case(seed: int):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, VOCAB, generator=g) * 3
    prompt = torch.randint(0, VOCAB, (12,), generator=g).tolist()
    output = torch.randint(0, VOCAB, (9,), generator=g).tolist() + [7, 7, 7]
    return logits, History(prompt, output)


def process(logits, params, history):
    return apply_logits_processors(logits, [params], [history])


@pytest.mark.parametrize("penalty", [0.7, 1.3, 2.0])
def test_repetition_penalty_equals_transformers(penalty):
    logits, h = random_case(int(penalty * 10))
    expected = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([h.prompt_token_ids + h.output_token_ids]), logits.clone())
    got = process(logits, SamplingParams(repetition_penalty=penalty), h)
    torch.testing.assert_close(got, expected)
    assert not torch.equal(got, logits)


@pytest.mark.parametrize("min_p, temperature", [(0.05, 1.0), (0.1, 0.5), (0.3, 1.7)])
def test_min_p_keeps_what_transformers_keeps(min_p, temperature):
    logits, h = random_case(3)
    hf = MinPLogitsWarper(min_p)(None, TemperatureLogitsWarper(temperature)(None, logits.clone()))
    got = process(logits, SamplingParams(min_p=min_p, temperature=temperature), h)
    kept = ~torch.isinf(got)
    assert torch.equal(kept, ~torch.isinf(hf))
    assert 1 < kept.sum() < VOCAB  # the case really cuts
    torch.testing.assert_close(got[kept], logits[kept])  # survivors untouched


def test_min_tokens_bans_eos_and_stop_ids_like_transformers():
    logits, h = random_case(5)
    h.output_token_ids = h.output_token_ids[:4]
    params = SamplingParams(min_tokens=6, stop_token_ids=[9, 30])
    prompt_len = len(h.prompt_token_ids)
    expected = MinNewTokensLengthLogitsProcessor(prompt_len, 6, [1, 9, 30])(
        torch.tensor([h.prompt_token_ids + h.output_token_ids]), logits.clone()
    )
    torch.testing.assert_close(process(logits, params, h), expected)
    h.output_token_ids += [5, 6]  # six generated: nothing banned any more
    assert torch.equal(process(logits, params, h), logits)


def test_presence_and_frequency_penalties_follow_openai_definition():
    logits, h = random_case(8)
    got = process(logits, SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), h)
    expected = logits.clone()
    for token, count in Counter(h.output_token_ids).items():  # output only, never the prompt
        expected[0, token] -= 0.5 + 0.25 * count
    torch.testing.assert_close(got, expected)


def test_rows_without_processors_are_untouched_and_need_no_history():
    logits = torch.randn(2, VOCAB)
    same = apply_logits_processors(logits, [SamplingParams(), SamplingParams(temperature=0)], None)
    assert same is logits
    with pytest.raises(ValueError, match="tokens"):
        apply_logits_processors(logits, [SamplingParams(repetition_penalty=1.2)], None)


@pytest.fixture(scope="module")
def llama(tiny_model_dir):
    model_dir = tiny_model_dir("llama")
    return LLM(str(model_dir), dtype="float32"), AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


PROMPTS = [[5, 9, 22, 31, 7, 100, 250], [3, 4, 3, 4, 3, 4]]


@pytest.mark.parametrize("knobs", [{}, dict(max_num_batched_tokens=4), dict(block_size=4, num_kv_blocks=12)],
                         ids=["batched", "chunked_prefill", "preemption"])
def test_greedy_with_repetition_penalty_equals_transformers_generate(llama, tiny_model_dir, knobs):
    # The executor sees only each step's slice of tokens: chunked prompts and recomputation after
    # preemption must still give the penalty every token of the prompt and the output.
    llm, hf = llama
    if knobs:
        llm = LLM(str(tiny_model_dir("llama")), dtype="float32", **knobs)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                        SamplingParams(max_tokens=24, temperature=0, repetition_penalty=1.8))
    if "num_kv_blocks" in knobs:
        assert sum(o.num_preemptions for o in outs) > 0
    plain = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], SamplingParams(max_tokens=24, temperature=0))
    for prompt, out, base in zip(PROMPTS, outs, plain):
        ids = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, repetition_penalty=1.8)
        assert out.outputs[0].token_ids == ids[0, len(prompt):].tolist()
    assert [o.outputs[0].token_ids for o in outs] != [b.outputs[0].token_ids for b in plain]  # the penalty bites


def test_min_tokens_delays_a_stop_token_as_transformers_does(llama):
    llm, hf = llama
    prompt = PROMPTS[0]
    free = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    stop = free[0].outputs[0].token_ids[1]  # greedy would stop at the second token
    params = SamplingParams(max_tokens=12, temperature=0, min_tokens=6, stop_token_ids=[stop], ignore_eos=True)
    out = llm.generate([{"prompt_token_ids": prompt}], params)[0].outputs[0]
    ids = hf.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=6, do_sample=False,
                      eos_token_id=stop, pad_token_id=stop)[0, len(prompt):].tolist()
    assert len(out.token_ids) >= 6 and stop not in out.token_ids[:6]
    assert out.token_ids == ids[: len(out.token_ids)]
    if out.finish_reason == "stop":
        assert out.token_ids[-1] == stop == ids[len(out.token_ids) - 1] and out.stop_reason == stop
