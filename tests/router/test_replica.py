"""The replica actor's own fault path, without Ray: a step loop that dies while the process lives."""
from __future__ import annotations

import asyncio

import pytest

from sloserve.config import EngineConfig
from sloserve.engine.async_engine import EngineStoppedError
from sloserve.request import SamplingParams
from sloserve.router.replica import ACCEPTED, EngineReplica


def test_a_replica_whose_step_loop_dies_fails_its_requests_and_ends_its_process_for_ray_to_restart(tiny_model_dir):
    config = EngineConfig(model=str(tiny_model_dir("llama")), load_format="dummy", num_kv_blocks=64, use_kernels=False)
    exits: list[int] = []

    async def scenario() -> None:
        replica = EngineReplica(0, config, exit_process=exits.append, drain_s=30.0)
        await replica.info()
        stream = replica.generate("a", list(range(3, 20)), SamplingParams(max_tokens=400, ignore_eos=True))
        assert await anext(stream) == ACCEPTED
        await anext(stream)  # tokens flow

        def broken() -> None:
            raise RuntimeError("loop machinery fault")

        # The loop's own bookkeeping fails when it next takes new work: the loop dies.
        replica.engine._apply_pending = broken
        second = asyncio.ensure_future(anext(replica.generate("b", [5, 6, 7], SamplingParams(max_tokens=4))))
        for _ in range(500):
            if replica.engine.dead_error is not None:
                break
            await asyncio.sleep(0.01)
        with pytest.raises(EngineStoppedError, match="before taking this request"):
            await second
        assert (await replica.load()).ready is False  # the router routes around it from this report on
        for _ in range(10):
            await asyncio.sleep(0.02)
        assert exits == []  # its request's stream is still carrying the error out
        with pytest.raises(EngineStoppedError, match="engine loop died"):
            async for _ in stream:
                pass
        for _ in range(50):
            if exits:
                break
            await asyncio.sleep(0.02)
        assert exits == [1]  # the process ends (exit status 1): Ray restarts a dead actor, not a live one
        await replica.load()
        assert exits == [1]  # once
        await replica.engine.shutdown()

    asyncio.run(scenario())
