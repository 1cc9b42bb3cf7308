"""vLLM's endpoints beyond OpenAI's: /tokenize, /detokenize, /version and /ping, with vLLM's bodies."""
from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict

import sloserve
from sloserve.server.errors import APIError
from sloserve.server.protocol import ChatMessage, parse_body


class TokenizeRequest(BaseModel):
    """Either a completion prompt or chat messages, as vLLM's TokenizeCompletionRequest / TokenizeChatRequest."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    # vLLM's template and special-token controls: only their defaults are supported (checked below).
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    tokens: list[int]


def register_vllm_routes(app: FastAPI, ctx, health: Callable[[], Awaitable]) -> None:
    """Add the routes to `app`; `ctx` is the app's ServerContext (tokenizer, limits, model check)."""
    def need_tokens():
        if ctx.tokens is None:
            raise APIError(400, "this server has no tokenizer (--skip-tokenizer-init)")
        return ctx.tokens

    @app.post("/tokenize")
    async def tokenize(raw: Request):
        body = parse_body(await raw.body(), TokenizeRequest)
        ctx.check_model(body.model)
        tokens_of = need_tokens()
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give either prompt or messages", param="prompt")
        chat = body.messages is not None
        # Tokenized exactly as the completion endpoints do; other template settings are refused.
        for name, supported in (("add_generation_prompt", True), ("continue_final_message", False),
                                ("add_special_tokens", not chat)):
            if getattr(body, name) not in (None, supported):
                raise APIError(400, f"{name}={getattr(body, name)} is not supported by this server", param=name)
        if chat:
            if not getattr(tokens_of.tokenizer, "chat_template", None):
                raise APIError(400, "this model's tokenizer has no chat template", param="messages")
            tokens = await tokens_of.chat([{"role": m.role, "content": m.text()} for m in body.messages])
        else:
            tokens = await tokens_of.prompt(body.prompt)
        strs = tokens_of.tokenizer.convert_ids_to_tokens(tokens) if body.return_token_strs else None
        return {"count": len(tokens), "max_model_len": ctx.limits.max_model_len, "tokens": tokens, "token_strs": strs}

    @app.post("/detokenize")
    async def detokenize(raw: Request):
        body = parse_body(await raw.body(), DetokenizeRequest)
        ctx.check_model(body.model)
        tok = need_tokens().tokenizer
        vocab = ctx.engine.engine.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token ids must lie in [0, {vocab}); got {bad[0]}", param="tokens")
        return {"prompt": tok.decode(body.tokens)}

    @app.get("/version")
    async def version():
        return {"version": sloserve.__version__}

    # SageMaker's liveness probe, as vLLM serves it: the same answer as /health.
    @app.get("/ping")
    async def ping():
        return await health()

    @app.post("/ping")
    async def ping_post():
        return await health()
