"""`python -m bench._event_streams URL TOKEN COUNT REPORT [ENDS]`: COUNT browsers' worth of
open dashboard event streams, each read as an `EventSource` reads it.

Logs in with the token (its cookie, as a browser keeps it), opens COUNT `/events` streams
(every run, as the live feed asks), and writes `ready` to REPORT once each has said the
daemon is up; a stream the dashboard ends (its page fell behind) is opened again after
RECONNECT_S, as `EventSource` does.

Without ENDS the streams are read until SIGTERM, and REPORT then gets the fewest and the
most `run` events a stream read, and how many times streams were opened again. With
ENDS, each stream also notes when each of its text deltas arrived, and is done once it
has read ENDS runs' `end`; once every stream is done (or at SIGTERM, whichever is first)
REPORT gets JSON: ``{"arrivals": [per stream: [[run_id, n-th delta, when], ...]],
"reopened": N}``, ``when`` on `time.perf_counter`'s clock (the system's monotonic clock,
the same in every process).
"""

from __future__ import annotations

import json
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import trio

#: EventSource's wait before it connects again, in Chromium and Firefox.
RECONNECT_S = 3.0

Arrival = tuple[str, int, float]


class Streams:
    def __init__(self, count: int, ends: int | None) -> None:
        self.counts = [0] * count
        self.reopened = [0] * count
        self.ends = ends
        self.arrivals: list[list[Arrival]] = [[] for _ in range(count)]
        self.ups = [trio.Event() for _ in range(count)]
        self.done = [trio.Event() for _ in range(count)]

    async def read(self, client: httpx.AsyncClient, index: int) -> None:
        deltas: dict[str, int] = {}
        ended = 0
        while True:
            async with client.stream("GET", "/events") as response:
                response.raise_for_status()
                kind = ""
                async for line in response.aiter_lines():
                    if line.startswith("event:"):
                        kind = line[6:].strip()
                        if kind == "daemon":
                            self.ups[index].set()
                        elif kind == "run":
                            self.counts[index] += 1
                    elif self.ends is not None and kind == "run" and line.startswith("data:"):
                        at = time.perf_counter()
                        item = json.loads(line[5:])
                        if item["event"]["type"] == "text_delta":
                            n = deltas.get(item["run_id"], 0)
                            deltas[item["run_id"]] = n + 1
                            self.arrivals[index].append((item["run_id"], n, at))
                        elif item["event"]["type"] == "end":
                            ended += 1
                            if ended == self.ends:
                                self.done[index].set()
                                return
            await trio.sleep(RECONNECT_S)
            self.reopened[index] += 1

    def summary(self) -> str:
        if self.ends is None:
            return f"{min(self.counts)} {max(self.counts)} {sum(self.reopened)}\n"
        return json.dumps({"arrivals": self.arrivals, "reopened": sum(self.reopened)})


async def main(url: str, token: str, count: int, report: Path, ends: int | None) -> None:
    streams = Streams(count, ends)
    limits = httpx.Limits(max_connections=count + 1, max_keepalive_connections=count + 1)
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=limits) as client:
        (
            await client.get("/feed", params={"token": token}, follow_redirects=True)
        ).raise_for_status()
        async with trio.open_nursery() as nursery:
            for index in range(count):
                nursery.start_soon(streams.read, client, index)
            with trio.open_signal_receiver(signal.SIGTERM) as signals:
                for up in streams.ups:
                    await up.wait()
                await trio.Path(report).write_text("ready\n")
                async with trio.open_nursery() as waiting:
                    waiting.start_soon(until_signal, signals, waiting.cancel_scope)
                    if ends is not None:
                        waiting.start_soon(until_done, streams, waiting.cancel_scope)
            await trio.Path(report).write_text(streams.summary())
            nursery.cancel_scope.cancel()


async def until_signal(signals: AsyncIterator[int], scope: trio.CancelScope) -> None:
    async for _ in signals:
        break
    scope.cancel()


async def until_done(streams: Streams, scope: trio.CancelScope) -> None:
    for done in streams.done:
        await done.wait()
    scope.cancel()


if __name__ == "__main__":
    ends = int(sys.argv[5]) if len(sys.argv) > 5 else None
    trio.run(main, sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]), ends)
