"""`python -m bench._event_streams URL TOKEN COUNT REPORT`: COUNT browsers' worth of open
dashboard event streams, each read as an `EventSource` reads it, until SIGTERM.

Logs in with the token (its cookie, as a browser keeps it), opens COUNT `/events` streams
(every run, as the live feed asks), and writes `ready` to REPORT once each has said the
daemon is up; a stream the dashboard ends (its page fell behind) is opened again after
RECONNECT_S, as `EventSource` does. On SIGTERM it writes the fewest and the most `run`
events a stream read, and how many times streams were opened again.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import httpx
import trio

#: EventSource's wait before it connects again, in Chromium and Firefox.
RECONNECT_S = 3.0


async def read(
    client: httpx.AsyncClient, counts: list[int], reopened: list[int], index: int, up: trio.Event
) -> None:
    while True:
        async with client.stream("GET", "/events") as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if line == "event: daemon":
                    up.set()
                elif line == "event: run":
                    counts[index] += 1
        await trio.sleep(RECONNECT_S)
        reopened[index] += 1


async def main(url: str, token: str, count: int, report: Path) -> None:
    counts = [0] * count
    reopened = [0] * count
    limits = httpx.Limits(max_connections=count + 1, max_keepalive_connections=count + 1)
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=limits) as client:
        (
            await client.get("/feed", params={"token": token}, follow_redirects=True)
        ).raise_for_status()
        async with trio.open_nursery() as nursery:
            ups = [trio.Event() for _ in range(count)]
            for index, up in enumerate(ups):
                nursery.start_soon(read, client, counts, reopened, index, up)
            with trio.open_signal_receiver(signal.SIGTERM) as signals:
                for up in ups:
                    await up.wait()
                await trio.Path(report).write_text("ready\n")
                async for _ in signals:
                    break
            await trio.Path(report).write_text(f"{min(counts)} {max(counts)} {sum(reopened)}\n")
            nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main, sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]))
