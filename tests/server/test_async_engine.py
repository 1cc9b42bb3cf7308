"""AsyncLLMEngine: one step loop, streams per request; every accepted request ends and frees its blocks."""
from __future__ import annotations

import asyncio
import threading

import httpx
import pytest

from sloserve.config import EngineConfig
from sloserve.engine.async_engine import AsyncLLMEngine, EngineStepError, EngineStoppedError
from sloserve.llm import build_engine
from sloserve.request import SamplingParams


@pytest.fixture(scope="module")
def llm_engine(tiny_model_dir):
    return build_engine(EngineConfig(model=str(tiny_model_dir("llama")), load_format="dummy", num_kv_blocks=64))


def _params(n: int = 8) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


async def _collect(stream):
    last = None
    async for out in stream:
        last = out
    return last


def _run(llm_engine, body):
    """Run `body(front)` against a started front; afterwards the engine must hold nothing."""
    finished = []

    async def main():
        front = AsyncLLMEngine(llm_engine, on_finished=lambda out, error: finished.append((out.outputs[0].finish_reason, error)))
        front.start()
        try:
            return await body(front)
        finally:
            await front.shutdown()

    result = asyncio.run(main())
    assert llm_engine.block_manager.num_used_blocks == 0 and not llm_engine.has_unfinished_requests()
    return result, finished


def test_concurrent_streams_match_the_offline_engine(llm_engine):
    async def body(front):
        streams = [await front.add_request(f"r{i}", [5 + i, 6, 7], _params(6 + i)) for i in range(4)]
        return await asyncio.gather(*(_collect(s) for s in streams))

    outs, finished = _run(llm_engine, body)
    assert [len(o.token_ids) for o in outs] == [6, 7, 8, 9]
    assert all(o.finished and o.output.outputs[0].finish_reason == "length" for o in outs)
    assert sorted(f[0] for f in finished) == ["length"] * 4
    # Same tokens as the engine run on its own (greedy; lone requests).
    for i, out in enumerate(outs):
        llm_engine.add_request("solo", [5 + i, 6, 7], _params(6 + i))
        solo = None
        while llm_engine.has_unfinished_requests():
            solo = (llm_engine.step() or [solo])[-1]
        assert solo.outputs[0].token_ids == out.token_ids


def test_bad_request_raises_value_error_and_loop_keeps_going(llm_engine):
    async def body(front):
        with pytest.raises(ValueError, match="token ids"):
            await front.add_request("bad", [10**6], _params())
        with pytest.raises(ValueError, match="empty"):
            await front.add_request("empty", [], _params())
        return await _collect(await front.add_request("good", [3, 4], _params(3)))

    out, _ = _run(llm_engine, body)
    assert len(out.token_ids) == 3


def test_abort_ends_the_stream_and_frees_blocks(llm_engine):
    async def body(front):
        stream = await front.add_request("long", [3, 4, 5], _params(200))
        first = await stream.__anext__()
        assert first.num_tokens >= 1
        front.abort("long")
        last = await _collect(stream)
        assert front.stats.num_used_blocks == 0
        return last

    out, finished = _run(llm_engine, body)
    assert out.output.outputs[0].finish_reason == "abort" and len(out.token_ids) < 200
    assert finished == [("abort", None)]


def test_caller_cancelled_before_the_engine_took_it(llm_engine):
    async def body(front):
        task = asyncio.ensure_future(front.add_request("c", [3, 4], _params()))
        await asyncio.sleep(0)  # queued, not yet applied
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await front.wait_until_idle()
        return front.num_unfinished

    assert _run(llm_engine, body)[0] == 0


def test_adds_and_aborts_while_stepping_never_stop_the_step_loop(llm_engine):
    """Arrivals and aborts are taken by the step thread between its steps: the step loop runs on (one run on the
    worker from the first request until the engine is idle) and nothing waits for the event loop between steps."""
    async def body(front):
        runs = []
        submit = front._worker.submit
        front._worker.submit = lambda fn, *args: runs.append(fn) or submit(fn, *args)
        long = await front.add_request("long", [3, 4, 5], _params(400))
        await long.__anext__()
        streams = [await front.add_request(f"a{i}", [6 + i, 7], _params(3 + i)) for i in range(5)]
        outs = await asyncio.gather(*(_collect(s) for s in streams))
        front.abort("long")
        last = await _collect(long)
        await front.wait_until_idle()
        return runs, outs, last

    (runs, outs, last), finished = _run(llm_engine, body)
    assert len(runs) == 1
    assert [len(o.token_ids) for o in outs] == [3, 4, 5, 6, 7]
    assert last.output.outputs[0].finish_reason == "abort" and len(last.token_ids) < 400
    assert sorted(f[0] for f in finished) == ["abort"] + ["length"] * 5


def test_a_fault_while_the_worker_takes_adds_still_answers_their_callers(llm_engine):
    """The front's own bookkeeping fails on the worker after it took a request: the loop dies, and the caller
    hears of it (its stream ends with the loop's error) instead of waiting for ever."""
    async def body(front):
        main, snapshot = threading.current_thread(), front._snapshot_stats

        def broken() -> None:
            if threading.current_thread() is not main:
                raise RuntimeError("bookkeeping fault")
            snapshot()

        front._snapshot_stats = broken
        with pytest.raises(EngineStoppedError, match="loop died"):
            stream = await asyncio.wait_for(front.add_request("x", [3, 4], _params()), 10)
            await asyncio.wait_for(_collect(stream), 10)
        return front.dead_error

    dead, finished = _run(llm_engine, body)
    assert "bookkeeping fault" in repr(dead) and [f[1] is not None for f in finished] == [True]


def test_failing_step_fails_in_flight_requests_then_serves_on(llm_engine, monkeypatch):
    real_step = llm_engine.step
    calls = {"n": 0, "raised": False}

    def flaky_step():
        calls["n"] += 1
        # The first step after two that holds all three requests: however the adds interleave with the steps
        # (the worker steps on while the front is still adding), all three are in flight when it raises.
        if calls["n"] >= 3 and len(llm_engine.requests) == 3 and not calls["raised"]:
            calls["raised"] = True
            raise RuntimeError("boom")
        return real_step()

    monkeypatch.setattr(llm_engine, "step", flaky_step)

    async def body(front):
        streams = [await front.add_request(f"f{i}", [3, 4, i + 5], _params(50)) for i in range(3)]
        for s in streams:
            with pytest.raises(EngineStepError, match="boom"):
                await _collect(s)
        assert front.stats.num_used_blocks == 0
        return await _collect(await front.add_request("after", [3, 4], _params(4)))

    out, finished = _run(llm_engine, body)
    assert len(out.token_ids) == 4
    assert [f[1] is not None for f in finished] == [True, True, True, False]


def test_shutdown_aborts_in_flight_and_refuses_new(llm_engine):
    async def body(front):
        stream = await front.add_request("s", [3, 4], _params(200))
        await stream.__anext__()
        await front.shutdown()
        last = await _collect(stream)
        with pytest.raises(EngineStoppedError):
            await front.add_request("late", [3, 4], _params())
        return last

    out, _ = _run(llm_engine, body)
    assert out.output.outputs[0].finish_reason == "abort"


def test_http_step_failure_gives_500_and_stream_error(chat_model_dir, start_server):
    server = start_server(chat_model_dir)
    real_step = server.engine.step
    fail = {"on": True}

    def step():
        if fail["on"]:
            raise RuntimeError("device lost")
        return real_step()

    server.engine.step = step
    body = {"prompt": "hello", "max_tokens": 4}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
    # The exception's text stays in the server's log: no response carries it.
    assert r.status_code == 500 and r.json()["error"]["code"] == "engine_error"
    assert "device lost" not in r.text
    streamed = httpx.post(server.url + "/v1/completions", json=body | {"stream": True}, timeout=30).text
    assert '"engine_error"' in streamed and "device lost" not in streamed and streamed.rstrip().endswith("data: [DONE]")
    fail["on"] = False
    assert httpx.post(server.url + "/v1/completions", json=body, timeout=30).status_code == 200
    assert server.engine.block_manager.num_used_blocks == 0


def test_the_stats_carry_the_predictors_running_error_refreshed_every_few_steps(llm_engine):
    from sloserve.engine import async_engine

    async def body(front):
        await _collect(await front.add_request("e", [5, 6, 7], _params(async_engine._ERROR_EVERY + 8)))
        return front.stats.step_time_error, front._step_time_error[0]

    (error, at), _ = _run(llm_engine, body)
    predictor = llm_engine.predictor
    # Recomputed at most _ERROR_EVERY steps ago, at a step count that was current then.
    assert 0 <= predictor.num_observed - at < async_engine._ERROR_EVERY
    assert error == error and error >= 0  # a number (not NaN) once steps were measured
