"""A uvicorn Server whose first SIGTERM/SIGINT drains the engine before the usual shutdown, then exits 0."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import uvicorn

logger = logging.getLogger(__name__)


class GracefulServer(uvicorn.Server):
    """uvicorn stops listening at once on a signal, so clients would see refused connections.

    Here the first signal keeps the socket open while `drain` runs (new requests get 503 and a
    load balancer moves on; in-flight ones finish), then shuts down as usual. A second signal
    forces the exit. The signal is not re-raised afterwards, so the process exits 0.
    """

    def __init__(self, config: uvicorn.Config, drain: Callable[[], Awaitable[None]]) -> None:
        super().__init__(config)
        self._drain = drain
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining: asyncio.Task | None = None
        self._signalled = False

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig, frame) -> None:
        if self._signalled or not self.started or self._loop is None:
            # Second signal, or a signal during startup: stop now.
            self.should_exit = True
            self.force_exit = self._signalled
            return
        self._signalled = True
        # A signal handler interrupts the loop at an arbitrary point; only this call is safe there.
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        logger.info("signal received: draining before shutdown (signal again to force)")
        self._draining = asyncio.get_running_loop().create_task(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            await self._drain()
        except Exception:  # noqa: BLE001 - a failed drain must still let the server exit
            logger.exception("draining failed")
        finally:
            self.should_exit = True
