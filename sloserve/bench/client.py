"""One streamed request to an OpenAI-compatible endpoint, timed chunk by chunk, never raising."""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import httpx

from sloserve.bench.records import RequestRecord
from sloserve.bench.tokens import Tokenizer
from sloserve.bench.workload import RequestSpec


@dataclass(slots=True)
class ClientConfig:
    base_url: str = "http://127.0.0.1:8000"
    endpoint: str = "/v1/completions"
    model: str = ""
    api_key: str | None = None
    timeout_s: float = 600.0  # whole request, send to last byte
    temperature: float = 0.0
    ignore_eos: bool = False  # vLLM/sloserve extension; only sent when set, strict servers reject it
    continuous_usage: bool = False  # vLLM/sloserve extension: usage in every chunk, so tokens per chunk are known
    extra_body: dict = field(default_factory=dict)

    @property
    def chat(self) -> bool:
        return self.endpoint.rstrip("/").endswith("chat/completions")

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def payload(self, spec: RequestSpec) -> dict:
        options = {"include_usage": True} | ({"continuous_usage_stats": True} if self.continuous_usage else {})
        body: dict = {"model": self.model, "stream": True, "stream_options": options, "temperature": self.temperature}
        if self.chat:
            if not isinstance(spec.prompt, str) and not spec.messages:
                raise ValueError("chat endpoints need text prompts (use words or a tokenizer)")
            body["messages"] = spec.messages or [{"role": "user", "content": spec.prompt}]
            body["max_completion_tokens"] = spec.output_len
        else:
            body["prompt"] = spec.prompt
            body["max_tokens"] = spec.output_len
        if self.ignore_eos:
            body["ignore_eos"] = True
        body.update(self.extra_body)
        return body

    def to_dict(self) -> dict:
        # The API key is a secret: never written to results.
        return {"base_url": self.base_url, "endpoint": self.endpoint, "model": self.model,
                "timeout_s": self.timeout_s, "temperature": self.temperature,
                "ignore_eos": self.ignore_eos, "continuous_usage": self.continuous_usage, "extra_body": self.extra_body}


async def send(http: httpx.AsyncClient, cfg: ClientConfig, spec: RequestSpec, t0: float,
               tokenizer: Tokenizer | None = None) -> RequestRecord:
    """Stream `spec` and record it; times are perf_counter() - t0."""
    rec = RequestRecord(spec.index, spec.arrival_s, time.perf_counter() - t0, spec.prompt_len, spec.output_len)
    text: list[str] = []

    async def trace(event: str, info: dict) -> None:
        # When the request's last byte left: wire_s - send_s is the client's own
        # overhead, reported so a user can tell a slow client from a slow server.
        if event == "http11.send_request_body.complete":
            rec.wire_s = time.perf_counter() - t0

    try:
        async with asyncio.timeout(cfg.timeout_s):
            async with http.stream("POST", cfg.endpoint, json=cfg.payload(spec), headers=cfg.headers(),
                                   extensions={"trace": trace}) as resp:
                rec.status = resp.status_code
                if resp.status_code != 200:
                    body = (await resp.aread()).decode(errors="replace")
                    rec.error_kind, rec.error = f"http_{resp.status_code}", body[:500]
                else:
                    await _read_stream(resp, rec, text, t0)
    except (TimeoutError, httpx.TimeoutException) as e:
        rec.error_kind, rec.error = "timeout", f"no complete response within {cfg.timeout_s:g} s ({type(e).__name__})"
    except (httpx.ConnectError, httpx.NetworkError, httpx.RemoteProtocolError) as e:
        rec.error_kind, rec.error = "connection", f"{type(e).__name__}: {e}"
    except json.JSONDecodeError as e:
        rec.error_kind, rec.error = "protocol", f"bad JSON in stream: {e}"
    except Exception as e:  # noqa: BLE001 - the instrument records every failure, it never crashes
        rec.error_kind, rec.error = "other", f"{type(e).__name__}: {e}"
    rec.end_s = time.perf_counter() - t0
    if rec.error_kind is None and not rec.token_times_s:
        rec.error_kind, rec.error = "empty", "stream ended without any token"
    _count_output(rec, "".join(text), tokenizer)
    return rec


async def _read_stream(resp: httpx.Response, rec: RequestRecord, text: list[str], t0: float) -> None:
    last_usage, finished = 0, False
    async for line in resp.aiter_lines():
        now = time.perf_counter() - t0
        if finished or not line.startswith("data:"):
            continue  # blank separators, comments, event names; after [DONE], drain so the connection is reused
        data = line[5:].strip()
        if data == "[DONE]":
            finished = True
            continue
        obj = json.loads(data)
        if "error" in obj:
            err = obj["error"]
            rec.error_kind, rec.error = "stream_error", str(err.get("message", err) if isinstance(err, dict) else err)
            break
        usage = obj.get("usage") or {}
        if usage.get("prompt_tokens") is not None:
            rec.prompt_tokens = usage["prompt_tokens"]
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")  # OpenAI's; llama-server, vLLM send it
        if cached is not None:
            rec.cached_tokens = cached
        if obj.get("choices"):
            choice = obj["choices"][0]
            piece = _piece(choice)
            rec.finish_reason = choice.get("finish_reason") or rec.finish_reason
            so_far = usage.get("completion_tokens")  # with continuous_usage_stats
            ids = len(choice.get("token_ids") or ())  # vLLM's return_token_ids; always sent without a tokenizer
            # A chunk counts as a token arrival only if it carries text, or (a server without a
            # tokenizer streams no text) token ids or a grown usage count: role-only and finish-only
            # chunks would add fake zero-length gaps to ITL.
            if piece or ids or (so_far is not None and so_far > last_usage):
                rec.token_times_s.append(now)
                rec.chunk_tokens.append(so_far - last_usage if so_far is not None else (ids or None))
                last_usage = so_far if so_far is not None else last_usage
                text.append(piece)
        if usage.get("completion_tokens") is not None:
            rec.output_tokens, rec.output_tokens_source = usage["completion_tokens"], "usage"


def _piece(choice: dict) -> str:
    if "text" in choice:
        return choice.get("text") or ""
    delta = choice.get("delta") or {}
    return (delta.get("content") or "") + (delta.get("reasoning_content") or "")


def _count_output(rec: RequestRecord, text: str, tokenizer: Tokenizer | None) -> None:
    """Prefer the server's usage, then a local tokenizer, then one token per chunk."""
    if rec.output_tokens_source == "usage":
        return
    if tokenizer is not None and text:
        rec.output_tokens, rec.output_tokens_source = len(tokenizer.encode(text)), "tokenizer"
    else:
        rec.output_tokens, rec.output_tokens_source = len(rec.token_times_s), "chunks"


async def fetch_first_model(base_url: str, api_key: str | None = None, timeout_s: float = 10.0) -> str:
    """The first model the server lists (what `vllm bench serve` does without --model)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s) as http:
        resp = await http.get("/v1/models", headers=headers)
        resp.raise_for_status()
        return resp.json()["data"][0]["id"]
