"""ASGI middleware that reads the request body under a size limit (413) and a time limit (408)."""
from __future__ import annotations

import asyncio
import json

from sloserve.server.errors import error_body


class BodySizeLimit:
    """Buffers the body up to `max_bytes`, then replays it; larger bodies get 413 without being parsed.

    Content-Length is checked first so an honest client is refused before it uploads; a chunked
    upload is counted as it arrives, since its length is not known up front. The whole body must
    arrive within `timeout_s`: a client trickling bytes would otherwise hold its connection (and
    delay shutdown) for as long as it likes.
    """

    def __init__(self, app, max_bytes: int, timeout_s: float = 30.0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None:
            try:
                too_large = int(declared) > self.max_bytes
            except ValueError:
                await _reject(send, 400, "invalid Content-Length header")
                return
            if too_large:
                await _reject(send, 413, f"the request body has {int(declared)} bytes; the limit is {self.max_bytes}")
                return
        chunks: list[bytes] = []
        size = 0
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - asyncio.get_running_loop().time()))
            except TimeoutError:
                await _reject(send, 408, f"the request body did not arrive within {self.timeout_s:g} s")
                return
            if message["type"] != "http.request":  # the client left before sending its body
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await _reject(send, 413, f"the request body exceeds the limit of {self.max_bytes} bytes")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(b"".join(chunks), receive), send)


def _replay(body: bytes, receive):
    """The buffered body first, then the real channel (where a client disconnect shows up)."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


async def _reject(send, status: int, message: str) -> None:
    code = {413: "request_too_large", 408: "request_timeout"}.get(status)
    payload = json.dumps(error_body(status, message, code=code)).encode()
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                    (b"connection", b"close")],
    })
    await send({"type": "http.response.body", "body": payload})
