"""Serving one generation: admit it, hand it to the engine, answer in full or as server-sent events."""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask

from sloserve.engine.async_engine import AsyncLLMEngine, EngineStepError, EngineStoppedError, RequestStream, StreamOutput
from sloserve.router.router import RouteRefused
from sloserve.server.admission import Admission
from sloserve.server.errors import APIError
from sloserve.server.guard import api_key_of
from sloserve.server.inputs import EngineInputs
from sloserve.server.logprobs import ChoiceLogprobs, choice_logprobs, prompt_logprobs_json
from sloserve.server.metrics import ServerMetrics
from sloserve.server.output_budget import Lease, OutputBudget
from sloserve.server.protocol import SamplingFields
from sloserve.server.responses import ChatFormat, CompletionFormat, Envelope, Usage


class Serving:
    def __init__(self, engine: AsyncLLMEngine, admission: Admission, metrics: ServerMetrics, model_name: str,
                 budget: OutputBudget) -> None:
        self.engine = engine
        self.budget = budget
        self.admission = admission
        self.metrics = metrics
        self.model_name = model_name

    def now(self) -> float:
        """The engine's clock: a request's arrival is stamped on it before its body is parsed and tokenized,
        so the server's TTFT holds what a client's does (vLLM's histograms and `sloserve bench` agree)."""
        return self.engine.engine.clock.now()

    async def generate(
        self, raw: Request, fmt: CompletionFormat | ChatFormat, inputs: EngineInputs, body: SamplingFields, *,
        id_prefix: str, arrival_time: float,
    ):
        request_id = f"{id_prefix}-{uuid.uuid4().hex}"
        try:
            self.admission.check(len(inputs.prompt_token_ids))
            predicted_ttft = self.admission.predict_ttft(inputs.prompt_token_ids, inputs.params, inputs.priority, inputs.slo)
            lease = self.budget.reserve(api_key_of(raw.scope), inputs.params.max_tokens * inputs.params.n)
        except APIError as error:
            self.metrics.rejected(error.code or str(error.status))
            raise
        try:
            outputs = await self.engine.add_request(
                request_id, inputs.prompt_token_ids, inputs.params, priority=inputs.priority, slo=inputs.slo,
                arrival_time=arrival_time,
            )
        except BaseException as error:
            lease.release()
            if isinstance(error, ValueError):
                self.metrics.rejected("invalid")
                raise APIError(400, str(error)) from None
            if isinstance(error, RouteRefused):
                self.metrics.rejected("slo_unattainable")
                raise APIError(429, f"the request would miss its latency objective: {error.route.reject}; retry later",
                               code="slo_unattainable",
                               headers={"Retry-After": str(error.route.retry_after_s)}) from None
            if isinstance(error, EngineStoppedError):
                self.metrics.rejected("engine_stopped")
                raise APIError(503, "the engine is not running", code="engine_stopped") from None
            raise
        if predicted_ttft is not None:
            self.metrics.predicted_ttft(request_id, predicted_ttft)
        env = Envelope(request_id, int(time.time()), self.model_name)
        text_available = self.engine.engine.tokenizer is not None
        # Without a tokenizer there is no text: token ids always travel, so clients can count tokens.
        reply = _Reply(fmt, env, inputs, body.return_token_ids or not text_available, body.continuous_usage,
                       text_available=text_available,
                       logprobs=choice_logprobs(body, inputs.prompt_token_ids, self.engine.engine.tokenizer),
                       prompt_logprobs=body.prompt_logprobs is not None)
        if body.stream:
            async def abort_if_unfinished() -> None:
                # Covers a client gone before the body iterator ever ran (its finally never runs).
                self.engine.abort(request_id)
                lease.release()

            return StreamingResponse(
                self._events(raw, request_id, outputs, reply, body.include_usage, lease),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                background=BackgroundTask(abort_if_unfinished),
            )
        final = None
        try:
            async with self._abort_on_disconnect(raw, request_id):
                async for out in outputs:
                    final = out
        except (EngineStepError, EngineStoppedError) as error:
            raise _engine_failure(error) from None
        finally:
            lease.release()
        cut = _cut_short(final)
        if cut is not None:
            raise cut
        return JSONResponse(reply.full(final))

    async def _events(self, raw: Request, request_id: str, outputs: RequestStream, reply: _Reply, include_usage: bool,
                      lease: Lease):
        done = False
        try:
            async with self._abort_on_disconnect(raw, request_id):
                first = reply.first_chunk()
                if first is not None:
                    yield _sse(first)
                last: StreamOutput | None = None
                failure: APIError | None = None
                try:
                    async for out in outputs:
                        last = out
                        failure = _cut_short(out)
                        if failure is not None:
                            break
                        for chunk in reply.chunks(out):
                            yield _sse(chunk)
                except (EngineStepError, EngineStoppedError) as error:
                    failure = _engine_failure(error)
                if failure is not None:
                    # Headers are gone already: the error travels in the stream, as vLLM does, and
                    # the stream never carries a finish_reason that would make it look complete.
                    yield _sse(failure.body())
                elif include_usage:
                    yield _sse(reply.fmt.usage_chunk(reply.env, reply.usage(last)))
                yield "data: [DONE]\n\n"
                done = True
        finally:
            lease.release()
            if not done:  # the client left (or the response was cancelled): free the request's blocks now
                self.engine.abort(request_id)

    @contextlib.asynccontextmanager
    async def _abort_on_disconnect(self, raw: Request, request_id: str):
        """Abort the request as soon as its client disconnects, even while no token is flowing."""

        async def watch() -> None:
            while (await raw.receive())["type"] != "http.disconnect":
                pass
            self.engine.abort(request_id)

        watcher = asyncio.create_task(watch())
        try:
            yield
        except asyncio.CancelledError:
            self.engine.abort(request_id)
            raise
        finally:
            watcher.cancel()


class _Reply:
    """Turns cumulative outputs into one response body or a sequence of stream deltas."""

    def __init__(self, fmt, env: Envelope, inputs: EngineInputs, return_token_ids: bool, continuous_usage: bool,
                 text_available: bool, logprobs: ChoiceLogprobs, prompt_logprobs: bool = False) -> None:
        self.fmt = fmt
        self.logprobs = logprobs
        self.prompt_logprobs = prompt_logprobs  # vLLM's field asked for (whole replies only: refused when streaming)
        self.env = env
        self.prompt_token_ids = inputs.prompt_token_ids
        self.return_token_ids = return_token_ids
        self.continuous_usage = continuous_usage
        self.text_available = text_available
        # A stop string may be completed by a later token, and the engine then cuts the text where
        # it began: hold back as many characters as could still turn out to be its start.
        self.holdback = max((len(s) for s in inputs.params.stop), default=1) - 1
        self.n = inputs.params.n
        self.sent_chars = [0] * self.n  # per choice (index)
        self.sent_tokens = [0] * self.n
        self.ended = [False] * self.n  # whose finish_reason went out (a choice that ended early stays in later outputs)

    def usage(self, out: StreamOutput | None) -> Usage:
        # Completion tokens of every choice together, as OpenAI and vLLM count them for n > 1.
        return Usage(len(self.prompt_token_ids), 0 if out is None or self.logprobs.echo_only else out.num_tokens)

    def _shown(self, out: StreamOutput, i: int) -> int:
        """How many of choice i's tokens the client sees (none when echo with max_tokens 0 only scores the prompt)."""
        return 0 if self.logprobs.echo_only else out.counts[i]

    def full(self, out: StreamOutput) -> dict:
        choices = []
        for i, c in enumerate(out.output.outputs):
            shown = self._shown(out, i)
            choice = self.fmt.choice(i, c.text if shown else "", c.finish_reason,
                                     out.choice_token_ids(i)[:shown] if self.return_token_ids else None)
            if i == 0:  # logprobs and echo come with n = 1 only (n > 1 with them is refused)
                self.logprobs.fill(choice, out.output, 0, shown)
            choices.append(choice)
        body = self.fmt.full(self.env, choices, self.usage(out), self.prompt_token_ids if self.return_token_ids else None)
        if self.prompt_logprobs:  # vLLM puts it on a completion's choice, and at the top of a chat completion
            (body if isinstance(self.fmt, ChatFormat) else choices[0])["prompt_logprobs"] = \
                prompt_logprobs_json(out.output.prompt_logprobs or [])
        return body

    def first_chunk(self) -> dict | None:
        return self.fmt.first_chunk(self.env, self.prompt_token_ids if self.return_token_ids else None, self.n)

    def chunks(self, out: StreamOutput) -> list[dict]:
        """The deltas since the last call, one chunk per choice that moved (each carries its `index`)."""
        chunks = []
        for i, completion in enumerate(out.output.outputs):
            chunk = self._chunk(out, i, completion)
            if chunk is not None:
                chunks.append(chunk)
        return chunks

    def _chunk(self, out: StreamOutput, i: int, completion) -> dict | None:
        text, done = (completion.text if not self.logprobs.echo_only else ""), completion.finish_reason is not None
        if self.ended[i]:
            return None
        self.ended[i] = done
        visible = len(text) if done else max(self.sent_chars[i], len(text) - self.holdback)
        delta = text[self.sent_chars[i] : visible]
        self.sent_chars[i] = visible
        start, end = self.sent_tokens[i], self._shown(out, i)
        new_ids = completion.token_ids[start:end]
        self.sent_tokens[i] = end
        # Without a tokenizer there is no text: a chunk per step still shows progress (and TTFT).
        wanted = delta or done or (new_ids and (self.return_token_ids or not self.text_available or self.logprobs.wanted))
        if not wanted:
            return None
        chunk = self.fmt.chunk(self.env, i, delta, completion.finish_reason, new_ids if self.return_token_ids else None)
        if i == 0:
            self.logprobs.fill(chunk["choices"][0], out.output, start, end)
        if self.continuous_usage:
            chunk["usage"] = self.usage(out).as_dict()
        return chunk


def _cut_short(out: StreamOutput | None) -> APIError | None:
    """The error a client gets for a request the server ended, not the model: never a 200 that looks complete.

    An abort reaches a reader only when the server cut the request (a client that left reads nothing).
    """
    reasons = set() if out is None else {c.finish_reason for c in out.output.outputs}
    if "error" in reasons:
        return APIError(500, "the engine failed while running this request; other requests were not affected",
                        code="engine_error")
    if "abort" in reasons:
        return APIError(503, "the server stopped this request before it finished (it is shutting down); retry",
                        code="request_aborted")
    return None


def _engine_failure(error: EngineStepError | EngineStoppedError) -> APIError:
    # The exception's text stays in the log: it describes the server, not the request.
    if isinstance(error, EngineStoppedError):
        return APIError(503, "the engine stopped before this request finished; retry", code="engine_stopped")
    return APIError(500, "the engine failed while running this request", code="engine_error")


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
