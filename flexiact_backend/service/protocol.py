"""uvicorn's h11 protocol with a deadline for the request head.

Why: uvicorn times out idle keep-alive connections but waits forever for a request head that arrives
a byte at a time, so a few slow clients can hold every connection open (slowloris). The body's timeout
is the guard's (guard.py); this closes connections whose head is not complete in time.
"""

from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


def timed_h11(header_timeout_s: float) -> type[H11Protocol]:
    """An H11Protocol class that closes a connection whose request head takes longer than `header_timeout_s`."""

    class TimedH11Protocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            self._arm()  # a request head starts on this connection (first, or after a keep-alive response)
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # the head is complete (or the connection is done)
                self._disarm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._head_timer is None and self.conn.their_state is h11.IDLE:
                self._head_timer = self.loop.call_later(header_timeout_s, self._head_timeout)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timeout(self) -> None:
            self._head_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return TimedH11Protocol
