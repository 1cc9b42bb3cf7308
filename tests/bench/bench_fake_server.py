"""A scripted fake OpenAI server with known per-token timing: raw asyncio HTTP on loopback, in a child process."""
# A child process, not a thread: in one process the server and the client under
# test would take turns on the GIL, adding milliseconds to what we measure.
from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field

import httpx


@dataclass(slots=True)
class Behaviour:
    """How the server answers one request. Token i (0-based) is written at
    start + ttft_s + i * gap_s, on absolute deadlines so delays never drift;
    `start` is when the request was read (serial server: when it got the server)."""

    status: int = 200
    ttft_s: float = 0.1
    gap_s: float = 0.02
    n_tokens: int | None = None  # None: the request's max_tokens
    usage: bool = True  # final usage chunk, as with stream_options.include_usage
    hang_s: float = 0.0  # sleep before answering (client timeouts)
    drop_after: int | None = None  # abort the connection after this many tokens
    error_event_after: int | None = None  # send an SSE error object after this many chunks
    tokens_per_chunk: int = 1  # > 1: chunk i (of ceil(n / k)) is written at start + ttft_s + i * gap_s
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens in the final usage (OpenAI's field)


@dataclass(slots=True)
class Script:
    """`default` for every request, unless a key of `by_prompt` occurs in its prompt text.
    `serial`: one request at a time (a server with a fixed service rate)."""

    default: Behaviour = field(default_factory=Behaviour)
    by_prompt: dict[str, Behaviour] = field(default_factory=dict)
    serial: bool = False

    def pick(self, body: dict) -> Behaviour:
        text = str(body.get("prompt", "")) + str(body.get("messages", ""))
        return next((b for k, b in self.by_prompt.items() if k in text), self.default)


class FakeOpenAIServer:
    """`with FakeOpenAIServer(script) as srv:` serves on srv.base_url; srv.bodies() lists what it got."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.port = 0
        self._proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> FakeOpenAIServer:
        arg = json.dumps(dataclasses.asdict(self.script))
        self._proc = subprocess.Popen([sys.executable, __file__, arg], stdout=subprocess.PIPE, text=True)
        self.port = int(self._proc.stdout.readline().split()[1])
        return self

    def __exit__(self, *exc) -> None:
        self._proc.terminate()
        self._proc.wait(5)

    def bodies(self) -> list[dict]:
        return [entry["body"] for entry in self.log()]

    def log(self) -> list[dict]:
        """Per request, in order: {"body", "recv", "writes"}: when it was read and when each token
        was written, in time.monotonic() seconds (the clock perf_counter() reads on Linux)."""
        return httpx.get(self.base_url + "/_log").json()


class _Server:
    def __init__(self, script: Script) -> None:
        self.script, self.log, self.lock = script, [], asyncio.Lock()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Keep-alive, like real servers: a client's pooled connections are reused.
        try:
            while await self._one(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        method, path = head.split(" ", 2)[:2]
        length = next((int(h.split(":")[1]) for h in head.split("\r\n") if h.lower().startswith("content-length")), 0)
        body = json.loads(await reader.readexactly(length)) if length else {}
        if method == "GET":
            data = self.log if path == "/_log" else {"object": "list", "data": [{"id": "fake-model"}]}
            return await _send_json(writer, 200, data)
        entry = {"body": body, "recv": time.monotonic(), "writes": []}
        self.log.append(entry)
        b = self.script.pick(body)
        if self.script.serial:
            async with self.lock:
                return await self._answer(writer, body, b, path, entry["writes"])
        return await self._answer(writer, body, b, path, entry["writes"])

    async def _answer(self, writer: asyncio.StreamWriter, body: dict, b: Behaviour, path: str,
                      writes: list[float]) -> bool:
        """Write the response; True when the connection can serve another request."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        if b.hang_s:
            await asyncio.sleep(b.hang_s)
        if b.status != 200:
            return await _send_json(writer, b.status, {"error": {"message": f"scripted {b.status}", "code": b.status}})
        chat = path.endswith("chat/completions")
        n = b.n_tokens if b.n_tokens is not None else body.get("max_tokens", body.get("max_completion_tokens", 16))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        continuous = bool((body.get("stream_options") or {}).get("continuous_usage_stats"))
        chunks = -(-n // b.tokens_per_chunk)
        for i in range(chunks):
            await asyncio.sleep(max(0.0, start + b.ttft_s + i * b.gap_s - loop.time()))
            if b.drop_after is not None and i == b.drop_after:
                writer.transport.abort()
                return False
            if b.error_event_after is not None and i == b.error_event_after:
                await _event(writer, {"error": {"message": "scripted stream error"}})
                break
            done = min(n, (i + 1) * b.tokens_per_chunk)
            text = "".join(f" t{k}" for k in range(i * b.tokens_per_chunk, done))
            choice = {"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text}
            choice["finish_reason"] = "length" if i == chunks - 1 else None
            event = {"id": "x", "object": "chunk", "choices": [choice]}
            if continuous:
                event["usage"] = {"prompt_tokens": _prompt_len(body), "completion_tokens": done}
            await _event(writer, event)
            writes.append(time.monotonic())
        else:
            if b.usage:
                usage = {"prompt_tokens": _prompt_len(body), "completion_tokens": n}
                if b.cached_tokens is not None:
                    usage["prompt_tokens_details"] = {"cached_tokens": b.cached_tokens}
                await _event(writer, {"id": "x", "choices": [], "usage": usage})
        await _chunk(writer, b"data: [DONE]\n\n")
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True


def _prompt_len(body: dict) -> int:
    p = body.get("prompt")
    return len(p) if isinstance(p, list) else len(str(p or body.get("messages", "")).split())


async def _event(writer: asyncio.StreamWriter, obj: dict) -> None:
    await _chunk(writer, f"data: {json.dumps(obj)}\n\n".encode())


async def _chunk(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
    await writer.drain()


async def _send_json(writer: asyncio.StreamWriter, status: int, obj) -> bool:
    data = json.dumps(obj).encode()
    writer.write(f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
                 .encode() + data)
    await writer.drain()
    return True


def _script_from_json(text: str) -> Script:
    d = json.loads(text)
    return Script(Behaviour(**d["default"]), {k: Behaviour(**v) for k, v in d["by_prompt"].items()}, d["serial"])


async def _main(script: Script) -> None:
    server = await asyncio.start_server(_Server(script).handle, "127.0.0.1", 0)
    print("PORT", server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(_main(_script_from_json(sys.argv[1])))
