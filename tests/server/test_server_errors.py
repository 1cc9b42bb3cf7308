"""Every invalid request gets an OpenAI-style error body and a fitting status; the server keeps serving."""
from __future__ import annotations

import httpx
import pytest

from serverkit import MODEL_NAME

OK = {"model": MODEL_NAME, "prompt": "hello", "max_tokens": 2}
JSON = {"content-type": "application/json"}
CHAT = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def _post(server, path: str, **kwargs) -> httpx.Response:
    return httpx.post(server.url + path, timeout=30, **kwargs)


CASES = [
    # (id, path, request kwargs, status, substring of the message, param)
    ("malformed-json", "/v1/completions", {"content": b'{"prompt": "x",', "headers": JSON}, 400, "not valid JSON", None),
    ("not-an-object", "/v1/completions", {"json": [1, 2]}, 400, "JSON object", None),
    ("json-content-type-with-charset", "/v1/completions",
     {"content": b'{"prompt": 5}', "headers": {"content-type": "application/json; charset=utf-8"}}, 400, "prompt", "prompt"),
    # Without a JSON Content-Type a browser page could post cross-site with no CORS preflight.
    ("no-content-type-refused", "/v1/completions", {"content": b'{"prompt": "hi"}'}, 415, "application/json", None),
    ("text-plain-refused", "/v1/completions",
     {"content": b'{"prompt": "hi"}', "headers": {"content-type": "text/plain"}}, 415, "application/json", None),
    ("missing-prompt", "/v1/completions", {"json": {"model": MODEL_NAME}}, 400, "Field required", "prompt"),
    ("wrong-type", "/v1/completions", {"json": OK | {"max_tokens": "many"}}, 400, "valid integer", "max_tokens"),
    ("negative-max-tokens", "/v1/completions", {"json": OK | {"max_tokens": -3}}, 400, "greater than", "max_tokens"),
    ("bad-temperature", "/v1/completions", {"json": OK | {"temperature": -1}}, 400, "temperature", "temperature"),
    ("bad-top-p", "/v1/completions", {"json": OK | {"top_p": 1.5}}, 400, "top_p", "top_p"),
    ("bad-slo", "/v1/completions", {"json": OK | {"slo": {"ttft_ms": -5}}}, 400, "slo.ttft_ms", "slo.ttft_ms"),
    ("n-zero", "/v1/completions", {"json": OK | {"n": 0}}, 400, "n must be", "n"),
    ("n-over-seats", "/v1/completions", {"json": OK | {"n": 17}}, 400, "at most 16", "n"),
    ("best-of-over-n", "/v1/completions", {"json": OK | {"n": 2, "best_of": 3}}, 400, "best_of=3", "best_of"),
    ("unknown-model", "/v1/completions", {"json": OK | {"model": "gpt-9"}}, 404, "gpt-9", "model"),
    ("batch-of-prompts", "/v1/completions", {"json": OK | {"prompt": ["a", "b"]}}, 400, "one prompt", "prompt"),
    ("empty-prompt", "/v1/completions", {"json": OK | {"prompt": ""}}, 400, "empty", None),
    ("token-out-of-vocab", "/v1/completions", {"json": OK | {"prompt": [1, 99999]}}, 400, "token ids", None),
    ("too-long", "/v1/completions", {"json": OK | {"prompt": [5] * 200, "max_tokens": 100}}, 400, "300 tokens", "max_tokens"),
    ("prompt-fills-context", "/v1/completions", {"json": OK | {"prompt": [5] * 256, "max_tokens": None}}, 400, "256", "prompt"),
    ("over-cap", "/v1/completions", {"json": OK | {"prompt": [5], "max_tokens": 250}}, 400, "at most 200", "max_tokens"),
    ("empty-stop", "/v1/completions", {"json": OK | {"stop": [""]}}, 400, "stop", None),
    ("logprobs-over-cap", "/v1/completions", {"json": OK | {"logprobs": 21}}, 400, "logprobs", "logprobs"),
    ("body-too-large", "/v1/completions", {"json": OK | {"prompt": "x" * 70_000}}, 413, "limit", None),
    ("chat-no-messages", "/v1/chat/completions", {"json": CHAT | {"messages": []}}, 400, "messages", "messages"),
    ("chat-image-part", "/v1/chat/completions",
     {"json": CHAT | {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}},
     400, "messages", None),
    ("n-with-logprobs", "/v1/completions", {"json": OK | {"n": 2, "logprobs": 1}}, 400, "n > 1", "n"),
    ("n-with-echo", "/v1/completions", {"json": OK | {"n": 2, "echo": True}}, 400, "n > 1", "n"),
    ("chat-best-of-over-n", "/v1/chat/completions", {"json": CHAT | {"best_of": 2}}, 400, "best_of=2", "best_of"),
    ("chat-tools", "/v1/chat/completions", {"json": CHAT | {"tools": [{"type": "function"}]}}, 400, "tool", "tools"),
    ("unknown-route", "/v1/embeddings", {"json": {}}, 404, "Not Found", None),
]


@pytest.mark.parametrize("path,kwargs,status,needle,param", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_invalid_request_gets_its_status_and_an_error_body(server, path, kwargs, status, needle, param):
    r = _post(server, path, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert needle in error["message"]
    if param is not None:
        assert error["param"] == param
    assert error["type"] == ("invalid_request_error" if status in (400, 404, 413, 415) else error["type"])
    # ...and the server keeps serving.
    assert _post(server, "/v1/completions", json=OK).status_code == 200


def test_chunked_body_over_the_limit_gets_413(server):
    def body():
        for _ in range(20):
            yield b" " * 4096

    r = _post(server, "/v1/completions", content=body(), headers=JSON)
    assert r.status_code == 413
    assert _post(server, "/v1/chat/completions", json=CHAT).status_code == 200


def test_error_messages_name_both_lengths(server):
    r = _post(server, "/v1/chat/completions", json=CHAT | {"max_tokens": 200, "messages": [{"role": "user", "content": "hi " * 60}]})
    message = r.json()["error"]["message"]
    assert r.status_code == 400 and "256" in message and "200 for the completion" in message
