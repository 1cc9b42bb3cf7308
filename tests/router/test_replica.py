"""The replica actor without Ray: its one output stream (batches with the load), and a step loop that dies while
the process lives."""
from __future__ import annotations

import asyncio

import pytest

from sloserve.config import EngineConfig
from sloserve.engine.async_engine import EngineStoppedError
from sloserve.request import SamplingParams
from sloserve.router.replica import EngineReplica


def _config(tiny_model_dir) -> EngineConfig:
    return EngineConfig(model=str(tiny_model_dir("llama")), load_format="dummy", num_kv_blocks=64, use_kernels=False)


async def _drain(outputs, request_ids: set[str]) -> dict:
    """Read batches until every request in `request_ids` ended; returns {id: (last output, error)} and the batches."""
    ended, batches = {}, []
    while set(ended) != request_ids:
        batch = await anext(outputs)
        batches.append(batch)
        for u in batch.updates:
            if u.error is not None or (u.output is not None and u.output.finished):
                ended[u.request_id] = (u.output, u.error)
    return ended, batches


def test_one_stream_carries_every_request_s_outputs_in_batches_with_the_replica_s_load(tiny_model_dir):
    async def scenario() -> None:
        replica = EngineReplica(0, _config(tiny_model_dir))
        await replica.info()
        outputs = replica.outputs()
        params = SamplingParams(max_tokens=6, ignore_eos=True)
        await asyncio.gather(*(replica.add(f"r{i}", list(range(3, 12 + i)), params) for i in range(3)))
        ended, batches = await _drain(outputs, {"r0", "r1", "r2"})
        assert all(error is None and out.num_tokens == 6 for out, error in ended.values())
        # One step moves all three: they share batches (one Ray item), not one item each per step.
        assert any(len(b.updates) == 3 for b in batches)
        assert len(batches) < 3 * 6
        # The load rides along (taken after the step whose outputs the batch carries): the last shows an idle replica.
        assert all(b.load.num_received == 3 and b.load.ready for b in batches)
        assert batches[-1].load.num_running == batches[-1].load.num_waiting == 0
        # The copies sent are frozen at their step (the engine's live lists keep growing in later steps).
        assert all(len(u.output.token_ids) == u.output.num_tokens for b in batches for u in b.updates)
        with pytest.raises(ValueError):  # bad input is refused by the add itself
            await replica.add("bad", [], params)
        await outputs.aclose()
        await replica.engine.shutdown()

    asyncio.run(scenario())


def test_an_update_waiting_in_the_outbox_is_replaced_by_the_request_s_newer_output(tiny_model_dir):
    """A slow reader gets each request once per batch, with its newest tokens (latest wins)."""
    async def scenario() -> None:
        replica = EngineReplica(0, _config(tiny_model_dir))
        await replica.info()
        await replica.add("a", list(range(3, 20)), SamplingParams(max_tokens=8, ignore_eos=True))
        while replica.engine.has_request("a"):  # nobody reads meanwhile
            await asyncio.sleep(0.01)
        batch = await anext(replica.outputs())
        assert [u.request_id for u in batch.updates] == ["a"]
        assert batch.updates[0].output.num_tokens == 8 and batch.updates[0].output.finished
        await replica.engine.shutdown()

    asyncio.run(scenario())


def test_a_request_aborted_before_its_add_arrives_ends_at_once(tiny_model_dir):
    async def scenario() -> None:
        replica = EngineReplica(0, _config(tiny_model_dir))
        await replica.info()
        await replica.abort("x")  # the front's abort overtook its add
        await replica.add("x", [3, 4, 5], SamplingParams(max_tokens=4))
        batch = await anext(replica.outputs())
        assert batch.updates[0].request_id == "x" and isinstance(batch.updates[0].error, EngineStoppedError)
        assert not replica.engine.has_request("x")
        await replica.engine.shutdown()

    asyncio.run(scenario())


def test_a_replica_whose_step_loop_dies_fails_its_requests_and_ends_its_process_for_ray_to_restart(tiny_model_dir):
    exits: list[int] = []

    async def scenario() -> None:
        replica = EngineReplica(0, _config(tiny_model_dir), exit_process=exits.append, drain_s=30.0)
        await replica.info()
        await replica.add("a", list(range(3, 20)), SamplingParams(max_tokens=400, ignore_eos=True))
        outputs = replica.outputs()
        await anext(outputs)  # tokens flow

        take = replica.engine._take_pending

        def broken(loop) -> None:
            if replica.engine._pending_adds:
                raise RuntimeError("loop machinery fault")
            take(loop)

        # The front's own bookkeeping fails when it next takes new work: the loop dies.
        replica.engine._take_pending = broken
        with pytest.raises(EngineStoppedError, match="before taking this request"):
            await replica.add("b", [5, 6, 7], SamplingParams(max_tokens=4))
        assert replica.engine.dead_error is not None
        assert (await replica.load()).ready is False  # the router routes around it from this report on
        for _ in range(10):
            await asyncio.sleep(0.02)
        assert exits == []  # its request's failure has not been carried out yet
        ended, _ = await _drain(outputs, {"a"})
        assert "engine loop died" in str(ended["a"][1])
        for _ in range(50):
            if exits:
                break
            await asyncio.sleep(0.02)
        assert exits == [1]  # the process ends (exit status 1): Ray restarts a dead actor, not a live one
        await replica.load()
        assert exits == [1]  # once
        await replica.engine.shutdown()

    asyncio.run(scenario())


def test_a_replica_freezes_its_startup_heap_when_it_starts_serving(tiny_model_dir):
    import gc

    async def scenario() -> None:
        replica = EngineReplica(0, _config(tiny_model_dir))
        gc.unfreeze()
        await replica.info()  # its first call starts the engine
        assert gc.get_freeze_count() > 100_000  # as the front does: no full collection walks the model again

    asyncio.run(scenario())
