"""logprobs, top_logprobs and echo over HTTP: OpenAI's shapes, with the values the offline engine computes."""
from __future__ import annotations

import json

import httpx
import pytest

from serverkit import MODEL_NAME
from sloserve import LLM, SamplingParams

PROMPT = [5, 17, 99, 42, 8, 120, 33]
TEXT = "Shall I compare thee"


@pytest.fixture(scope="module")
def offline(chat_model_dir):
    """The server's engine, offline: the same dummy weights (same seed) and tokenizer."""
    return LLM(str(chat_model_dir), load_format="dummy", max_num_seqs=16, num_kv_blocks=128)


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json={"model": MODEL_NAME} | body, timeout=30)


def stream(server, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", server.url + path, json={"model": MODEL_NAME, "stream": True} | body, timeout=30) as r:
        assert r.status_code == 200
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def expected_completion(out, echo: bool) -> tuple[list, list]:
    """(token_logprobs, sets of top-k token ids) the offline output gives, prompt first when echoing."""
    completion = out.outputs[0]
    ids = (out.prompt_token_ids if echo else []) + completion.token_ids
    entries = (out.prompt_logprobs if echo else []) + completion.logprobs
    return [None if e is None else e[t].logprob for t, e in zip(ids, entries)], entries


def test_completion_logprobs_equal_the_offline_ones(server, offline):
    r = post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "logprobs": 3,
                                          "ignore_eos": True})
    assert r.status_code == 200, r.text
    logprobs = r.json()["choices"][0]["logprobs"]
    assert set(logprobs) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    out = offline.generate(prompt_token_ids=[PROMPT], sampling_params=SamplingParams(
        max_tokens=6, temperature=0, logprobs=3, ignore_eos=True))[0]
    want, entries = expected_completion(out, echo=False)
    assert logprobs["token_logprobs"] == pytest.approx(want, abs=1e-6)
    assert logprobs["tokens"] == [e[t].decoded_token for t, e in zip(out.outputs[0].token_ids, entries)]
    for top, entry in zip(logprobs["top_logprobs"], entries):
        assert top == pytest.approx({lp.decoded_token: lp.logprob for lp in entry.values()}, abs=1e-6)
        assert 1 <= len(top) <= 4  # the top 3, and the chosen token when it is not among them
    lengths = [len(t) for t in logprobs["tokens"]]
    assert logprobs["text_offset"] == [sum(lengths[:i]) for i in range(len(lengths))]


def test_echo_with_logprobs_scores_the_prompt(server, offline):
    r = post(server, "/v1/completions", {"prompt": TEXT, "max_tokens": 4, "temperature": 0, "logprobs": 2,
                                          "echo": True, "ignore_eos": True})
    assert r.status_code == 200, r.text
    body = r.json()
    choice, usage = body["choices"][0], body["usage"]
    assert choice["text"].startswith(TEXT)
    assert len(choice["logprobs"]["tokens"]) == usage["prompt_tokens"] + 4
    assert choice["logprobs"]["token_logprobs"][0] is None and choice["logprobs"]["top_logprobs"][0] is None
    out = offline.generate(TEXT, SamplingParams(max_tokens=4, temperature=0, logprobs=2, prompt_logprobs=2,
                                                ignore_eos=True))[0]
    want, _ = expected_completion(out, echo=True)
    assert choice["logprobs"]["token_logprobs"] == pytest.approx(want, abs=1e-6)
    assert choice["text"] == TEXT + out.outputs[0].text


def test_echo_with_max_tokens_0_returns_just_the_prompt(server, offline):
    r = post(server, "/v1/completions", {"prompt": TEXT, "max_tokens": 0, "echo": True, "logprobs": 1})
    assert r.status_code == 200, r.text
    choice, usage = r.json()["choices"][0], r.json()["usage"]
    assert choice["text"] == TEXT
    assert usage["completion_tokens"] == 0
    out = offline.generate(TEXT, SamplingParams(max_tokens=1, prompt_logprobs=1))[0]
    assert choice["logprobs"]["token_logprobs"] == pytest.approx(
        [None] + [e[t].logprob for t, e in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:])], abs=1e-6)
    chunks = stream(server, "/v1/completions", {"prompt": TEXT, "max_tokens": 0, "echo": True})
    assert "".join(c["choices"][0]["text"] for c in chunks) == TEXT


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"prompt": "hi", "logprobs": 21}, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "logprobs": -1}, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21},
     "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
])
def test_logprobs_out_of_range_are_refused(server, path, body, param):
    r = post(server, path, body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_chat_logprobs_equal_the_offline_ones(server, offline):
    messages = [{"role": "user", "content": "Compare thee to a summer's day"}]
    r = post(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 5, "temperature": 0,
                                               "logprobs": True, "top_logprobs": 3, "ignore_eos": True,
                                               "return_token_ids": True})
    assert r.status_code == 200, r.text
    body = r.json()
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"] == 5
    out = offline.generate(prompt_token_ids=[body["prompt_token_ids"]], sampling_params=SamplingParams(
        max_tokens=5, temperature=0, logprobs=3, ignore_eos=True))[0]
    for item, token, entry in zip(content, out.outputs[0].token_ids, out.outputs[0].logprobs):
        assert set(item) == {"token", "logprob", "bytes", "top_logprobs"}
        assert item["token"] == entry[token].decoded_token
        assert item["bytes"] == list(item["token"].encode())
        assert item["logprob"] == pytest.approx(entry[token].logprob, abs=1e-6)
        top = [t["logprob"] for t in item["top_logprobs"]]
        assert len(top) == 3 and top == sorted(top, reverse=True)
        assert top[0] == pytest.approx(item["logprob"], abs=1e-6)  # greedy: the chosen token is the most likely


def test_streamed_logprobs_equal_unstreamed(server):
    body = {"prompt": TEXT, "max_tokens": 8, "temperature": 0.8, "seed": 11, "logprobs": 2, "echo": True,
            "ignore_eos": True}
    full = post(server, "/v1/completions", body).json()["choices"][0]
    chunks = [c["choices"][0] for c in stream(server, "/v1/completions", body) if c["choices"]]
    assert "".join(c["text"] for c in chunks) == full["text"]
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert sum((c["logprobs"][key] for c in chunks if c["logprobs"]), []) == full["logprobs"][key]
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 0, "logprobs": True,
            "top_logprobs": 1, "ignore_eos": True}
    full = post(server, "/v1/chat/completions", chat).json()["choices"][0]["logprobs"]["content"]
    chunks = [c["choices"][0] for c in stream(server, "/v1/chat/completions", chat) if c["choices"]]
    assert sum((c["logprobs"]["content"] for c in chunks if c["logprobs"]), []) == full


def _prompt_logprobs_json(entries) -> list:
    return [None if e is None else {str(t): {"logprob": pytest.approx(lp.logprob, abs=1e-6), "rank": lp.rank,
                                             "decoded_token": lp.decoded_token} for t, lp in e.items()}
            for e in entries]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_prompt_logprobs_are_vllms_field_with_the_offline_values(server, offline, path):
    """vLLM's `prompt_logprobs` extension: on the completion choice, or top-level for chat (vLLM's places)."""
    chat = path.endswith("chat/completions")
    body = {"messages": [{"role": "user", "content": TEXT}]} if chat else {"prompt": PROMPT}
    r = post(server, path, body | {"max_tokens": 2, "temperature": 0, "prompt_logprobs": 2})
    assert r.status_code == 200, r.text
    got = r.json()["prompt_logprobs"] if chat else r.json()["choices"][0]["prompt_logprobs"]
    prompt = server.call(server.ctx.tokens.chat(body["messages"])) if chat else PROMPT  # the server's own tokens
    out = offline.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(
        max_tokens=2, temperature=0, prompt_logprobs=2))[0]
    assert len(got) == len(prompt) and got[0] is None
    assert got == _prompt_logprobs_json(out.prompt_logprobs)


def test_prompt_logprobs_are_refused_when_streaming(server):
    r = post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2, "prompt_logprobs": 1, "stream": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs"
