"""uvicorn's h11 protocol with a deadline for request headers: a half-sent request cannot hold a connection."""
from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


def protocol_with_header_timeout(timeout_s: float) -> type[H11Protocol]:
    """An H11Protocol class whose connections close when a request's headers take over `timeout_s`.

    uvicorn only times out idle keep-alive connections, and only between requests: a client that
    connects and sends nothing, or sends half its headers, keeps the connection (and a slot of
    --limit-concurrency) forever. The deadline runs from the first byte of each request (or from
    the connection, for the first one) to its last header.
    """

    class H11WithHeaderTimeout(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._header_timer is None and self.conn.their_state is h11.IDLE:
                self._arm()
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:
                self._disarm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._header_timer = self.loop.call_later(timeout_s, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return H11WithHeaderTimeout
