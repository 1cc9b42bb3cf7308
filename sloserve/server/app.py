"""The FastAPI app: OpenAI routes, /health and /metrics over one AsyncLLMEngine."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from sloserve.engine.async_engine import AsyncLLMEngine
from sloserve.engine.engine import LLMEngine
from sloserve.server.admission import Admission
from sloserve.server.body_limit import BodySizeLimit
from sloserve.server.errors import APIError, error_body, install_error_handlers
from sloserve.server.inputs import OPENAI_DEFAULT_MAX_TOKENS, ModelLimits, chat_prompt, completion_prompt, engine_inputs
from sloserve.server.metrics import CONTENT_TYPE, ServerMetrics
from sloserve.server.protocol import ChatCompletionRequest, CompletionRequest, parse_body
from sloserve.server.responses import ChatFormat, CompletionFormat
from sloserve.server.serving import Serving
from sloserve.server.settings import ServerSettings
from sloserve.server.vllm_routes import register_vllm_routes

logger = logging.getLogger(__name__)

# After the grace period, aborted requests still need one step to end; a wedged step gets this long.
_ABORT_WAIT_S = 10.0


class ServerContext:
    """Everything one app serves with; kept on `app.state.server` (no module-level state)."""

    def __init__(self, engine: LLMEngine, settings: ServerSettings) -> None:
        self.settings = settings
        self.model_name = settings.served_model_names[0]
        self.engine = AsyncLLMEngine(engine)
        self.metrics = ServerMetrics(self.engine, self.model_name, max_model_len=engine.max_model_len,
                                     block_size=engine.block_manager.block_size, compat=settings.metrics_compat)
        engine.executor = self.metrics.observe_steps(engine.executor)
        self.engine.on_finished = self.metrics.on_finished
        self.admission = Admission(self.engine, settings.admission)
        self.limits = ModelLimits(engine.max_model_len, settings.tokens_cap(engine.max_model_len))
        self.serving = Serving(self.engine, self.admission, self.metrics, self.model_name)
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


def build_app(engine: LLMEngine, settings: ServerSettings) -> FastAPI:
    ctx = ServerContext(engine, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        ctx.engine.start()
        try:
            yield
        finally:
            await ctx.engine.shutdown()

    app = FastAPI(title="sloserve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = ctx
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    tokenizer = engine.tokenizer

    @app.post("/v1/completions")
    async def completions(raw: Request):
        body = parse_body(await raw.body(), CompletionRequest)
        ctx.check_model(body.model)
        prompt = completion_prompt(body, tokenizer)
        inputs = engine_inputs(body, prompt, ctx.limits, requested_max_tokens=body.max_tokens,
                               default_max_tokens=OPENAI_DEFAULT_MAX_TOKENS, slo_classes=settings.slo_classes,
                               slo_class_header=raw.headers.get("x-slo-class"))
        return await ctx.serving.generate(
            raw, CompletionFormat(), inputs, body, id_prefix="cmpl",
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(raw: Request):
        body = parse_body(await raw.body(), ChatCompletionRequest)
        ctx.check_model(body.model)
        prompt = chat_prompt(body, tokenizer)
        inputs = engine_inputs(body, prompt, ctx.limits, requested_max_tokens=body.requested_max_tokens,
                               default_max_tokens=None, slo_classes=settings.slo_classes,
                               slo_class_header=raw.headers.get("x-slo-class"))
        return await ctx.serving.generate(
            raw, ChatFormat(), inputs, body, id_prefix="chatcmpl",
        )

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
            return JSONResponse(error_body(503, f"the engine is not running: {ctx.engine.dead_error!r}"), status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(ctx.metrics.render(), media_type=CONTENT_TYPE)

    register_vllm_routes(app, ctx, health)

    return app
