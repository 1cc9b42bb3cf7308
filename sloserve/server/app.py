"""The FastAPI app: OpenAI routes, /health and /metrics over one AsyncLLMEngine."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response

from sloserve.engine.async_engine import AsyncLLMEngine
from sloserve.engine.engine import LLMEngine
from sloserve.server.admission import Admission
from sloserve.server.body_limit import BodySizeLimit
from sloserve.server.errors import APIError, error_body, install_error_handlers
from sloserve.server.guard import RequestGuard
from sloserve.server.inputs import OPENAI_DEFAULT_MAX_TOKENS, ModelLimits, chat_prompt, completion_prompt, engine_inputs
from sloserve.server.metrics import CONTENT_TYPE, ServerMetrics
from sloserve.server.openapi import install_openapi
from sloserve.server.output_budget import OutputBudget
from sloserve.server.protocol import ChatCompletionRequest, CompletionRequest, parse_body
from sloserve.server.responses import ChatFormat, CompletionFormat
from sloserve.server.serving import Serving
from sloserve.server.settings import ServerSettings
from sloserve.startup_heap import freeze_startup_heap
from sloserve.server.tokenizing import PromptTokenizer
from sloserve.server.vllm_routes import register_vllm_routes

logger = logging.getLogger(__name__)

# After the grace period, aborted requests still need one step to end; a wedged step gets this long.
_ABORT_WAIT_S = 10.0


class ServerContext:
    """Everything one app serves with; kept on `app.state.server` (no module-level state)."""

    def __init__(self, engine: LLMEngine | None, settings: ServerSettings, replicas=None) -> None:
        """One in-process engine, or (`replicas`, a router.ReplicaSet) several behind a router."""
        self.settings = settings
        self.model_name = settings.served_model_names[0]
        self.engine = AsyncLLMEngine(engine) if replicas is None else replicas
        engine = self.engine.engine  # the LLMEngine, or the replicas' ModelInfo
        self.metrics = ServerMetrics(self.engine, self.model_name, max_model_len=engine.max_model_len,
                                     block_size=engine.config.block_size, compat=settings.metrics_compat,
                                     engine_label="0" if replicas is None else "total")
        if replicas is None:
            engine.executor = self.metrics.observe_steps(engine.executor)
        self.engine.on_finished = self.metrics.on_finished
        # Behind a router, TTFT admission is the router's: it refuses only what no replica can serve in time.
        limits = settings.admission if replicas is None else dataclasses.replace(
            settings.admission, mode="queue" if settings.admission.mode == "slo" else settings.admission.mode)
        self.admission = Admission(self.engine, limits)
        self.limits = ModelLimits(engine.max_model_len, settings.tokens_cap(engine.max_model_len),
                                  max_n=engine.config.max_num_seqs)
        self.budget = OutputBudget(settings.max_output_tokens_per_key, settings.admission.retry_after_s)
        self.serving = Serving(self.engine, self.admission, self.metrics, self.model_name, self.budget)
        self.tokens = None if engine.tokenizer is None else PromptTokenizer(engine.tokenizer, engine.max_model_len)
        self.created = int(time.time())

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.settings.served_model_names:
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{self.model_name}`.",
                           param="model", code="model_not_found")

    async def drain(self, grace_s: float | None = None) -> None:
        """Stop admitting (503), let in-flight requests finish for the grace period, abort the rest."""
        grace_s = self.settings.shutdown_grace_s if grace_s is None else grace_s
        self.admission.draining = True
        logger.info("draining: %d requests in flight, grace period %.1f s", self.engine.num_unfinished, grace_s)
        try:
            await asyncio.wait_for(self.engine.wait_until_idle(), grace_s)
            return
        except TimeoutError:
            logger.warning("grace period over: aborting %d requests", self.engine.num_unfinished)
        self.engine.abort_all()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.engine.wait_until_idle(), _ABORT_WAIT_S)


def build_app(engine: LLMEngine | None, settings: ServerSettings, replicas=None) -> FastAPI:
    ctx = ServerContext(engine, settings, replicas)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        ctx.engine.start()
        freeze_startup_heap()
        try:
            yield
        finally:
            await ctx.engine.shutdown()
            if ctx.tokens is not None:
                ctx.tokens.close()

    app = FastAPI(title="sloserve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = ctx
    install_error_handlers(app)
    # Outermost last: CORS answers preflights, then the guard (host, key, content type), then the body reader.
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s)
    app.add_middleware(RequestGuard, settings=settings.guard)
    if settings.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.allowed_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "X-SLO-Class"])
    cap = {"maximum": ctx.limits.max_tokens_cap}
    install_openapi(app, {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest},
                    {"model": {"enum": list(settings.served_model_names)}, "n": {"minimum": 1, "maximum": 1},
                     "max_tokens": cap, "max_completion_tokens": cap}
                    | ({"role": {"enum": sorted(ctx.tokens.roles)}} if ctx.tokens is not None else {}))

    def generation_route(body_type, make_prompt, fmt, id_prefix: str, default_max_tokens: int | None):
        """One handler shape for both generation endpoints: parse, check, tokenize, admit, generate."""

        async def handler(raw: Request):
            arrived = ctx.serving.now()
            body = parse_body(await raw.body(), body_type)
            ctx.check_model(body.model)
            prompt = await make_prompt(body, ctx.tokens)
            inputs = engine_inputs(body, prompt, ctx.limits, requested_max_tokens=body.requested_max_tokens,
                                   default_max_tokens=default_max_tokens, slo_classes=settings.slo_classes,
                                   slo_class_header=raw.headers.get("x-slo-class"))
            return await ctx.serving.generate(raw, fmt, inputs, body, id_prefix=id_prefix, arrival_time=arrived)

        return handler

    # OpenAI gives legacy completions a default of 16 tokens; chat runs to the context's end.
    app.post("/v1/completions")(generation_route(CompletionRequest, completion_prompt, CompletionFormat(), "cmpl",
                                                 OPENAI_DEFAULT_MAX_TOKENS))
    app.post("/v1/chat/completions")(generation_route(ChatCompletionRequest, chat_prompt, ChatFormat(), "chatcmpl",
                                                      None))

    @app.get("/v1/models")
    async def models():
        data = [{"id": name, "object": "model", "created": ctx.created, "owned_by": "sloserve",
                 "max_model_len": ctx.limits.max_model_len} for name in settings.served_model_names]
        return {"object": "list", "data": data}

    @app.get("/health")
    async def health():
        if ctx.admission.draining:
            return JSONResponse(error_body(503, "shutting down", code="shutting_down"), status_code=503)
        if not ctx.engine.is_running:
            return JSONResponse(error_body(503, "the engine is not running", code="engine_stopped"), status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(ctx.metrics.render(), media_type=CONTENT_TYPE)

    register_vllm_routes(app, ctx, health)

    return app
