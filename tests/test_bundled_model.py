"""The bundled demo model as a real-text fixture: greedy text equals transformers', stop strings cut it."""
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import sloserve
from sloserve import LLM, SamplingParams

TARGET = Path(sloserve.__file__).parent / "assets" / "demo-target"
PROMPTS = ["To be, or not to be,", "KING.\nMy lords, ", "O Romeo, Romeo"]


@pytest.fixture(scope="module")
def llm():
    return LLM(str(TARGET), dtype="float32")


@pytest.fixture(scope="module")
def hf_texts(llm):
    hf = AutoModelForCausalLM.from_pretrained(TARGET, dtype=torch.float32).eval()
    texts = []
    for prompt in PROMPTS:
        ids = llm.tokenizer.encode(prompt)
        out = hf.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False)
        texts.append(llm.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True))
    return texts


def test_greedy_text_matches_transformers(llm, hf_texts):
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=40, temperature=0))
    assert [o.outputs[0].text for o in outs] == hf_texts


def test_stop_string_cuts_the_text_where_it_starts(llm, hf_texts):
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=40, temperature=0, stop=["\n"]))
    for out, full in zip((o.outputs[0] for o in outs), hf_texts):
        if "\n" in full:
            assert (out.text, out.finish_reason, out.stop_reason) == (full[: full.index("\n")], "stop", "\n")
        else:
            assert out.text == full


def test_chat_reply_ends_with_eos(llm):
    prompt = llm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What news from the court?"}], add_generation_prompt=True, tokenize=False
    )
    out = llm.generate([prompt], SamplingParams(max_tokens=64, temperature=0))[0].outputs[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] in llm.engine.eos_token_ids
    assert out.text.strip()
