"""The bridge's one connection to the daemon, made again whenever it is lost."""

from __future__ import annotations

from pathlib import Path

import anyio
import structlog

from .._client import ChinwagError, Client, connect

log = structlog.get_logger()

CLIENT_NAME = "chinwag-telegram"


class Backoff:
    """Delays that double from ``first`` up to ``ceiling``; ``reset`` after a success."""

    def __init__(self, first: float = 0.1, ceiling: float = 10.0) -> None:
        self.first = first
        self.ceiling = ceiling
        self._next = first

    def next(self) -> float:
        delay = self._next
        self._next = min(self._next * 2, self.ceiling)
        return delay

    def reset(self) -> None:
        self._next = self.first


class DaemonLink:
    """Owns the connection every chat shares, and reconnects with backoff.

    ``run`` is the owner task. ``client`` hands out the live connection,
    waiting while there is none; a caller that finds the connection closed
    (its requests raised ``ConnectionLost``) makes the owner connect again.
    ``outage`` tells when the daemon cannot be reached.
    """

    def __init__(self, socket_path: Path | str, backoff: Backoff) -> None:
        self.socket_path = socket_path
        self._backoff = backoff
        self._client: Client | None = None
        self._changed = anyio.Event()
        self._lost = anyio.Event()
        self._down = False  # the last attempt to connect failed
        self._outages = 0

    async def outage(self) -> int:
        """Wait until an attempt to connect has failed, and none succeeded since;
        the number of that outage (1 for the first, and so on)."""
        while not self._down:
            changed = self._changed
            await changed.wait()
        return self._outages

    async def client(self) -> Client:
        """The connection to the daemon, once there is a live one."""
        while True:
            current = self._client
            if current is not None:
                if not current.closed:
                    return current
                self._lost.set()
            changed = self._changed
            await changed.wait()

    def _publish(self, client: Client | None) -> None:
        self._client = client
        self._changed.set()
        self._changed = anyio.Event()

    async def run(self) -> None:
        """Connect, and connect again each time the connection is lost; never returns."""
        while True:
            self._lost = anyio.Event()
            try:
                async with connect(self.socket_path, client=CLIENT_NAME) as client:
                    log.info(
                        "daemon_connected",
                        socket=str(self.socket_path),
                        server=client.welcome.server,
                    )
                    self._backoff.reset()
                    self._down = False
                    self._publish(client)
                    await self._lost.wait()
                    # Reconnect at once; only failed attempts back off.
                    log.warning("daemon_connection_lost", socket=str(self.socket_path))
            except (OSError, ChinwagError) as exc:
                if not self._down:
                    self._down = True
                    self._outages += 1
                delay = self._backoff.next()
                log.warning(
                    "daemon_unreachable",
                    socket=str(self.socket_path),
                    error=str(exc),
                    retry_in_s=delay,
                )
                await anyio.sleep(delay)
            finally:
                self._publish(None)
