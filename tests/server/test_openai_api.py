"""The official `openai` client against a live server: completions and chat, streamed and not."""
from __future__ import annotations

import json

import httpx
import openai
import pytest

from serverkit import MODEL_NAME


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]
    assert httpx.get(server.url + "/health").status_code == 200


def test_completion_text_prompt(client):
    out = client.completions.create(model=MODEL_NAME, prompt="The quick brown fox", max_tokens=12, seed=3,
                                    extra_body={"ignore_eos": True})
    assert out.object == "text_completion" and out.model == MODEL_NAME
    choice = out.choices[0]
    assert choice.finish_reason == "length"
    assert out.usage.completion_tokens == 12
    assert out.usage.total_tokens == out.usage.prompt_tokens + 12
    assert isinstance(choice.text, str)


def test_completion_default_max_tokens_is_16(client):
    out = client.completions.create(model=MODEL_NAME, prompt="Latency", extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 16


@pytest.mark.parametrize("prompt", ["Shall I compare thee", [[5, 6, 7, 8]], [9, 10, 11]])
def test_streamed_completion_equals_unstreamed(client, prompt):
    kwargs = dict(model=MODEL_NAME, prompt=prompt, max_tokens=24, temperature=0.9, top_p=0.95, seed=1234,
                  extra_body={"ignore_eos": True, "top_k": 50})
    full = client.completions.create(**kwargs)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens == 24
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_chat_completion_streamed_equals_unstreamed(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Compare thee to a summer's day"}]
    kwargs = dict(model=MODEL_NAME, messages=messages, max_completion_tokens=20, temperature=1.0, seed=7)
    full = client.chat.completions.create(**kwargs)
    assert full.object == "chat.completion"
    assert full.choices[0].message.role == "assistant"
    assert full.choices[0].finish_reason in ("stop", "length")
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason


def test_chat_default_max_tokens_fills_the_context(server, client):
    out = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}],
                                         temperature=0, extra_body={"ignore_eos": True})
    # No max_tokens: the rest of the context, up to the server's cap.
    room = server.engine.max_model_len - out.usage.prompt_tokens
    assert out.usage.completion_tokens == min(room, server.ctx.limits.max_tokens_cap) == 200
    assert out.choices[0].finish_reason == "length"


def test_stop_string_streamed_equals_unstreamed(client):
    # Find text the model will produce, then stop on a piece of it spanning a token boundary.
    base = dict(model=MODEL_NAME, prompt="Rough winds do shake", max_tokens=30, temperature=0, extra_body={"ignore_eos": True})
    text = client.completions.create(**base).choices[0].text
    stop = text[8:11]
    assume = stop and stop.strip()
    if not assume:
        pytest.skip("the random model produced no usable text")
    full = client.completions.create(stop=[stop], **base)
    streamed = "".join(c.choices[0].text for c in client.completions.create(stop=[stop], stream=True, **base))
    assert full.choices[0].finish_reason == "stop"
    assert stop not in full.choices[0].text
    assert streamed == full.choices[0].text == text[: text.index(stop)]


def test_extensions_priority_slo_and_token_ids(server):
    body = {"model": MODEL_NAME, "prompt": [3, 4, 5], "max_tokens": 5, "priority": -1, "return_token_ids": True,
            "slo": {"ttft_ms": 500, "tpot_ms": 100}, "temperature": 0}
    out = httpx.post(server.url + "/v1/completions", json=body).json()
    assert out["prompt_token_ids"] == [3, 4, 5]
    assert len(out["choices"][0]["token_ids"]) == out["usage"]["completion_tokens"]


def test_model_without_tokenizer_serves_token_ids(tiny_model_dir, start_server):
    s = start_server(tiny_model_dir("llama"))
    body = {"prompt": [1, 2, 3, 4], "max_tokens": 6, "ignore_eos": True, "return_token_ids": True, "temperature": 0}
    full = httpx.post(s.url + "/v1/completions", json=body).json()
    assert full["choices"][0]["text"] == "" and len(full["choices"][0]["token_ids"]) == 6
    ids = []
    with httpx.stream("POST", s.url + "/v1/completions", json=body | {"stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                for choice in chunk["choices"]:
                    ids += choice.get("token_ids", [])
    assert ids == full["choices"][0]["token_ids"]
    chat = httpx.post(s.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 400 and "tokenizer" in chat.json()["error"]["message"]


def test_continuous_usage_stats_count_tokens_per_chunk(server):
    body = {"model": MODEL_NAME, "prompt": "Numbers 0 1 2", "max_tokens": 10, "ignore_eos": True, "stream": True,
            "stream_options": {"continuous_usage_stats": True}, "temperature": 0}
    counts = []
    with httpx.stream("POST", server.url + "/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                counts.append(json.loads(line[6:])["usage"]["completion_tokens"])
    assert counts == sorted(counts) and counts[-1] == 10
