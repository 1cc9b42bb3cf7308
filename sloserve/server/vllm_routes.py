"""vLLM's endpoints beyond OpenAI's: /tokenize, /detokenize, /version and /ping, with vLLM's bodies."""
from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict

import sloserve
from sloserve.server.errors import APIError
from sloserve.server.inputs import chat_text
from sloserve.server.protocol import ChatMessage, parse_body


class TokenizeRequest(BaseModel):
    """Either a completion prompt or chat messages, as vLLM's TokenizeCompletionRequest / TokenizeChatRequest."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # vLLM's default: True for a prompt, False for messages
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    tokens: list[int]


def register_vllm_routes(app: FastAPI, ctx, health: Callable[[], Awaitable]) -> None:
    """Add the routes to `app`; `ctx` is the app's ServerContext (tokenizer, limits, model check)."""
    tokenizer = ctx.engine.engine.tokenizer

    def need_tokenizer():
        if tokenizer is None:
            raise APIError(400, "this server has no tokenizer (--skip-tokenizer-init)")
        return tokenizer

    @app.post("/tokenize")
    async def tokenize(raw: Request):
        body = parse_body(await raw.body(), TokenizeRequest)
        ctx.check_model(body.model)
        tok = need_tokenizer()
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give either prompt or messages", param="prompt")
        if body.messages is not None:
            text = chat_text(tok, body.messages, add_generation_prompt=body.add_generation_prompt,
                             continue_final_message=body.continue_final_message)
            add_special = bool(body.add_special_tokens)  # the template writes its own special tokens
        else:
            text = body.prompt
            add_special = body.add_special_tokens is not False
        tokens = tok.encode(text, add_special_tokens=add_special)
        strs = tok.convert_ids_to_tokens(tokens) if body.return_token_strs else None
        return {"count": len(tokens), "max_model_len": ctx.limits.max_model_len, "tokens": tokens, "token_strs": strs}

    @app.post("/detokenize")
    async def detokenize(raw: Request):
        body = parse_body(await raw.body(), DetokenizeRequest)
        ctx.check_model(body.model)
        tok = need_tokenizer()
        vocab = ctx.engine.engine.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token ids must lie in [0, {vocab}); got {bad[0]}", param="tokens")
        return {"prompt": tok.decode(body.tokens)}

    @app.get("/version")
    async def version():
        return {"version": sloserve.__version__}

    # SageMaker's liveness probe, as vLLM serves it: the same answer as /health.
    @app.api_route("/ping", methods=["GET", "POST"])
    async def ping():
        return await health()
