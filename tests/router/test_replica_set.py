"""The front's side of a replica's output stream (ReplicaLinks), without Ray: a batch's load moves the router, its outputs reach
their requests, and a replica whose reports come with its outputs is not polled."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

from sloserve.engine.async_engine import RequestStream, StreamOutput
from sloserve.engine.scheduler import SchedulerConfig
from sloserve.request import CompletionOutput, RequestOutput, SamplingParams
from sloserve.router.load import ReplicaLoad
from sloserve.router.outbox import OutputBatch, RequestUpdate
from sloserve.router.policies import make_routing_policy
from sloserve.router.replica import ModelInfo
from sloserve.router.replica_set import ReplicaSet, _InFlight
from sloserve.router.router import Router


class PolledActor:
    """Counts load polls; answers an idle, ready report."""

    def __init__(self, replica: int) -> None:
        self.polls = 0
        self.load = SimpleNamespace(remote=self._load)
        self.replica = replica

    async def _load(self) -> ReplicaLoad:
        self.polls += 1
        return ReplicaLoad(self.replica)


def _front(policy: str = "least_loaded", actors=None) -> ReplicaSet:
    actors = actors or [PolledActor(0), PolledActor(1)]
    router = Router(make_routing_policy(policy), len(actors))
    for i in range(len(actors)):
        router.update(ReplicaLoad(i))
    return ReplicaSet(actors, ModelInfo(256, 100, None, SchedulerConfig()), router, poll_s=0.02)


def _output(request_id: str, tokens: list[int], finished: bool = False) -> StreamOutput:
    completion = CompletionOutput(0, "", tokens, None, "length" if finished else None, [0.0] * len(tokens))
    return StreamOutput.of(RequestOutput(request_id, None, [1, 2, 3], [completion], finished, 0.0, 0.0, None, 0))


def test_a_load_report_carried_with_outputs_moves_the_next_routing_decision():
    async def scenario() -> None:
        front = _front()
        assert front.router.route([1, 2, 3]).replica == 0  # both idle: the first
        front.router.update(ReplicaLoad(0, num_received=1))  # replica 0 took that one and finished it
        # Replica 0's output batch says it is busy now: the next request goes to replica 1, with no poll.
        front.links.deliver(0, OutputBatch([], ReplicaLoad(0, num_running=4, num_received=1)))
        assert front.router.loads[0].num_running == 4
        assert front.router.route([1, 2, 3]).replica == 1

    asyncio.run(scenario())


def test_a_batch_s_outputs_reach_their_requests_and_end_them():
    async def scenario() -> None:
        front = _front()
        loop = asyncio.get_running_loop()
        flights = {}
        for rid, replica in (("a", 0), ("b", 1)):
            flights[rid] = _InFlight(rid, [1, 2, 3], SamplingParams(), 0, None, replica, 0.0, RequestStream(rid),
                                     loop.create_future(), ended=loop.create_future())
            front._tracked[rid] = flights[rid]
        failure = RuntimeError("step failed")
        front.links.deliver(0, OutputBatch([RequestUpdate("a", _output("a", [7, 8], finished=True)),
                                       RequestUpdate("b", _output("b", [9]))], ReplicaLoad(0)))
        a = flights["a"]
        assert a.ended.done() and a.ended.result() is None and a.last.token_ids == [7, 8]
        assert (await anext(a.stream)).token_ids == [7, 8]
        # "b" runs on replica 1: an update for it from replica 0 (where it ran before a retry) is not its own.
        assert not flights["b"].ended.done() and flights["b"].last is None
        front.links.deliver(1, OutputBatch([RequestUpdate("b", _output("b", [9]), failure)], ReplicaLoad(1)))
        assert flights["b"].ended.result() is failure and flights["b"].last.token_ids == [9]

    asyncio.run(scenario())


def test_a_replica_whose_reports_come_with_its_outputs_is_not_polled():
    async def scenario() -> None:
        actors = [PolledActor(0), PolledActor(1)]
        front = _front(actors=actors)
        watchers = [asyncio.ensure_future(front.links.watch(i)) for i in range(2)]
        for _ in range(20):  # replica 0 streams a batch every 5 ms; replica 1 is idle
            front.links.deliver(0, OutputBatch([], ReplicaLoad(0)))
            await asyncio.sleep(0.005)
        front.links.stopping = True
        await asyncio.gather(*watchers)
        assert actors[0].polls <= 2  # the first poll, before any batch (and one racing it at most)
        assert actors[1].polls > actors[0].polls  # the idle one is polled as before

    asyncio.run(scenario())


def test_a_report_older_than_one_already_applied_is_dropped_and_a_restarted_replica_s_first_is_not():
    """A poll's answer can arrive after a batch built later: it must not take the replica's state back (a lower
    num_received reads as a restart: routed around, its in-flight count and cache record lost)."""
    async def scenario() -> None:
        front = _front()
        front.links.deliver(0, OutputBatch([], ReplicaLoad(0, num_running=2, num_received=5, incarnation="a", seq=9)))
        front.links.report(0, ReplicaLoad(0, num_running=0, num_received=4, incarnation="a", seq=7))  # the late poll
        assert front.router.loads[0].ready and front.router.loads[0].num_received == 5
        assert front.router.loads[0].num_running == 2
        front.links.report(0, ReplicaLoad(0, num_received=0, incarnation="b", seq=1))  # Ray restarted it
        assert front.router.loads[0].incarnation == "b" and front.router.loads[0].num_received == 0

    asyncio.run(scenario())
