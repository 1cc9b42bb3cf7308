"""ReplicaLinks: the front's side of each replica: its output stream read into the requests, its health watched."""
from __future__ import annotations

import asyncio
import logging
import math

from ray.exceptions import RayActorError

from sloserve.engine.clock import Clock
from sloserve.router.load import ReplicaLoad
from sloserve.router.outbox import OutputBatch
from sloserve.router.router import Router
from sloserve.router.spec_totals import ReplicaSpecTotals

logger = logging.getLogger(__name__)


class ReplicaLinks:
    """One output reader and one watch per replica.

    The reader delivers each batch to its requests (`tracked`: request id -> the front's in-flight record, with
    `replica`, `last`, `stream`, `ended`, `lost`) and hands the batch's load to the router. When a replica's stream
    breaks, the replica is marked down and its requests learn it (`lost`); the stream is opened again once Ray has
    restarted the replica and it reports ready. The watch polls a replica's load only when its outputs brought
    none for `poll_s`, and marks down one that takes `down_after_s` to answer.
    """

    def __init__(self, actors: list, router: Router, clock: Clock, tracked: dict, spec_totals: ReplicaSpecTotals, *,
                 poll_s: float, down_after_s: float) -> None:
        self.actors = actors
        self.router = router
        self.clock = clock
        self.tracked = tracked
        self.spec_totals = spec_totals
        self.poll_s = poll_s
        self.down_after_s = down_after_s
        self.stopping = False
        self._reported = [-math.inf] * len(actors)  # when each replica's last load report arrived (on `clock`)
        self._latest: list[tuple[str, int] | None] = [None] * len(actors)  # (incarnation, seq) of the last one applied

    def start(self) -> list[asyncio.Task]:
        loop = asyncio.get_running_loop()
        return ([loop.create_task(self.watch(i), name=f"sloserve-replica-{i}") for i in range(len(self.actors))]
                + [loop.create_task(self.read(i), name=f"sloserve-outputs-{i}") for i in range(len(self.actors))])

    def down(self, replica: int) -> None:
        if self.router.loads[replica].ready:
            logger.warning("replica %d is down; routing around it", replica)
        self.router.mark_down(replica)

    async def read(self, replica: int) -> None:
        while not self.stopping:
            try:
                async for ref in self.actors[replica].outputs.options(num_returns="streaming").remote():
                    self.deliver(replica, await ref)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - a dead replica (RayActorError) or a broken stream
                if not isinstance(error, RayActorError):
                    logger.exception("output stream of replica %d failed", replica)
                self.down(replica)
            for flight in list(self.tracked.values()):
                if flight.replica == replica:
                    flight.lost.set()
            await asyncio.sleep(0.2)
            while not self.stopping and not self.router.loads[replica].ready:
                await asyncio.sleep(0.05)

    def deliver(self, replica: int, batch: OutputBatch) -> None:
        self.report(replica, batch.load)
        for update in batch.updates:
            flight = self.tracked.get(update.request_id)
            if flight is None or flight.replica != replica or flight.ended is None or flight.ended.done():
                continue  # ended already, or moved to another replica
            if update.output is not None:
                flight.last = update.output
                flight.stream.put(update.output)
            if update.error is not None:
                flight.ended.set_result(update.error)
            elif update.output is not None and update.output.finished:
                flight.ended.set_result(None)

    async def watch(self, replica: int) -> None:
        """One load call in flight at a time, so a restarting actor is not flooded."""
        while not self.stopping:
            pending = asyncio.ensure_future(self.actors[replica].load.remote())
            try:
                done, _ = await asyncio.wait({pending}, timeout=self.down_after_s)
                if not done:  # a replica this slow to answer is treated as down until it reports again
                    self.down(replica)
                load = await pending
            except RayActorError:
                self.down(replica)
                await asyncio.sleep(0.2)
                continue
            except asyncio.CancelledError:
                pending.cancel()
                raise
            except Exception:  # noqa: BLE001 - a bad report must not stop the watch
                logger.exception("load report of replica %d failed", replica)
                self.down(replica)
                await asyncio.sleep(0.2)
                continue
            self.report(replica, load)
            await asyncio.sleep(self.poll_s)
            # A busy replica's reports come with its outputs: poll only one that has said nothing for poll_s.
            while not self.stopping and self.clock.now() - self._reported[replica] < self.poll_s:
                await asyncio.sleep(max(0.001, self._reported[replica] + self.poll_s - self.clock.now()))

    def report(self, replica: int, load: ReplicaLoad) -> None:
        latest = self._latest[replica]
        if latest is not None and latest[0] == load.incarnation and load.seq < latest[1]:
            # Older than a report already applied (a poll's answer overtaken by a batch): applying it would take
            # the replica's state back (num_received going down reads as a restart, spec counters as retired).
            return
        self._latest[replica] = (load.incarnation, load.seq)
        if load.ready and not self.router.loads[replica].ready:
            logger.info("replica %d is ready", replica)
        self._reported[replica] = self.clock.now()
        self.router.update(load, self._reported[replica])
        self.spec_totals.observe(replica, load.spec_decode)
