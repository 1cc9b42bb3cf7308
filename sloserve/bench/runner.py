"""Plays a workload against a server: arrivals on schedule, a concurrency cap, warm-ups, a time limit."""
from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable

import httpx

from sloserve.bench.client import ClientConfig, send
from sloserve.bench.records import RequestRecord
from sloserve.bench.results import Run
from sloserve.bench.tokens import Tokenizer
from sloserve.bench.workload import RequestSpec, Workload
from sloserve.startup_heap import freeze_startup_heap

_IDLE_CONNECTION_S = 2.0  # below the 5 s keep-alive timeout common servers use


async def play(workload: Workload, cfg: ClientConfig, *, num_warmups: int = 0, label: str = "",
               tokenizer: Tokenizer | None = None,
               on_start: Callable[[int], None] | None = None,
               on_record: Callable[[RequestRecord], None] | None = None) -> Run:
    """Send the workload's requests and return their records.

    First one untimed test request (like vLLM's initial test run; capped at
    4 tokens) pays the client's one-off costs (imports, connection setup,
    about 50 ms) that would otherwise land on the first measured TTFT. Then
    `num_warmups` warm-ups (all at once, under the same concurrency cap).
    All are discarded. The clock starts after them: t=0 is the first scheduled
    arrival. With a duration, no request is *sent* at or after it (requests
    in flight finish and count). The run's duration ends when the last
    request ends, as in vLLM.
    """
    specs = workload.requests(tokenizer)
    warmups = workload.warmup_requests(num_warmups + 1, tokenizer)
    test, warmups = dataclasses.replace(warmups[0], output_len=min(4, warmups[0].output_len)), warmups[1:]
    if on_start is not None:
        on_start(len(specs))
    cap = workload.max_concurrency
    # Servers close idle connections after 5 s (uvicorn's default, llama-server's cpp-httplib), httpx after 5 s too:
    # at that tie a request goes out on a connection the server is closing ("Server disconnected without sending a
    # response": a failed request the server never saw). Retiring idle connections sooner avoids the race.
    limits = httpx.Limits(max_connections=cap, max_keepalive_connections=cap or 256, keepalive_expiry=_IDLE_CONNECTION_S)
    async with httpx.AsyncClient(base_url=cfg.base_url, limits=limits, timeout=cfg.timeout_s) as http:
        await send(http, cfg, test, time.perf_counter(), tokenizer)
        if warmups:
            gate = asyncio.Semaphore(cap or len(warmups))
            await asyncio.gather(*(_gated(http, cfg, s, time.perf_counter(), gate, None, tokenizer) for s in warmups))
        # A full collection of a large heap (a process that imported torch, a test session) pauses the loop for a
        # tenth of a second or more: sends and token timestamps would stall with it, mid-run.
        freeze_startup_heap()
        started_unix = time.time()
        t0 = time.perf_counter()
        records = await _issue(http, cfg, specs, t0, cap, workload.duration_s, tokenizer, on_record)
        duration = time.perf_counter() - t0
    return Run(
        label=label or _label(workload),
        arrivals=workload.arrivals.to_dict(),
        max_concurrency=cap,
        num_warmups=len(warmups),
        started_unix=started_unix,
        duration_s=duration,
        records=sorted(records, key=lambda r: r.index),
    )


async def _issue(http, cfg, specs: list[RequestSpec], t0: float, cap: int | None, duration_s: float | None,
                 tokenizer, on_record) -> list[RequestRecord]:
    gate = asyncio.Semaphore(cap) if cap else None
    tasks = []
    for spec in specs:
        delay = t0 + spec.arrival_s - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(_gated(http, cfg, spec, t0, gate, duration_s, tokenizer, on_record)))
    results = await asyncio.gather(*tasks)
    return [r for r in results if r is not None]


async def _gated(http, cfg, spec, t0, gate, duration_s, tokenizer, on_record=None) -> RequestRecord | None:
    if gate is None:
        return _done(await send(http, cfg, spec, t0, tokenizer), on_record)
    async with gate:
        # Past the time limit, a request still queued for a slot is dropped:
        # it was never sent, so it is not part of the run.
        if duration_s is not None and time.perf_counter() - t0 >= duration_s:
            return None
        return _done(await send(http, cfg, spec, t0, tokenizer), on_record)


def _done(rec: RequestRecord, on_record) -> RequestRecord:
    if on_record is not None:
        on_record(rec)
    return rec


def _label(w: Workload) -> str:
    rate = w.arrivals.rate
    parts = ["trace" if w.arrivals.kind == "trace" else f"rate={rate:g}"]
    if w.max_concurrency:
        parts.append(f"concurrency={w.max_concurrency}")
    return ",".join(parts)
