"""(i) Hog: a client asks for history, never reads: what it costs the daemon and the others.

The daemon runs with its default `[daemon]` (so `outgoing_bytes` is 8 MiB) and
holds one conversation of 200 entries of 1,500 characters, so that a
`get_history` answer (the default page, 200 entries) is ~310 KB.

Hog trial: client H connects, says hello, then writes `get_history` requests for
that conversation (ids 1, 2, ...), 10 every 10 ms (1,000 a second: slower than
the daemon answers them, so that they never reach max_open_requests and the
429s that would drop H early), and reads nothing, for HOG_S seconds. Meanwhile client P, on its own
connection, sends pings one at a time (each once the previous `pong` is in) and
records each round trip. Then H closes.

Reported:
- the daemon's resident memory growth: its peak (VmHWM, reset through
  /proc/PID/clear_refs just before the trial) minus its RSS just before, in MiB;
- P's ping round trip, p99 (and p50 in the note), in ms;
- what became of H: held back (its writes blocked after N requests) or dropped.

Baseline, same run, same daemon, just before: the same trial with no H (P alone).
Targets (issue 12): growth at most the cap (8 MiB) plus 4 MiB of noise, and
P's ping p99 < 50 ms.

    python -m bench.hog [--seconds 3] [--storage URL]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import trio
from chinwag.protocol import MSGPACK, End, GetHistory, History, Ping, Pong, Stream

from ._processes import Server, chinwag_serve, echo_config, run_alone, storage_label
from ._report import Baseline, Figure, Target, percentile
from ._wire import Framed, connect

HOG_S = 3.0
CAP_MIB = 8  # [daemon] outgoing_bytes, the default
NOISE_MIB = 4
RUNS = 100  # each stores 2 entries: one page of history
CONTENT = ("x" * 9 + " ") * 150  # 1,500 characters, 150 words
BATCH = 10  # requests per write
PACE_S = 0.01  # between writes
SENDER = "hogged"


@dataclass
class Trial:
    growth_mib: float  # peak RSS during the trial minus RSS before it
    pings_ms: list[float]
    hog_requests: int  # what H wrote (0 with no hog)
    hog_dropped: bool  # the daemon closed H's connection
    kept_mib: float  # RSS after the trial (H closed) minus RSS before it


async def fill(path: Path) -> None:
    conn = await connect(path)
    try:
        for n in range(RUNS):
            await conn.send(Stream(id=n, agent="assistant", sender=SENDER, content=CONTENT))
            while not isinstance(await conn.recv(), End):
                pass
        # Read it once, as a client that reads would: the daemon's caches are warm.
        await conn.send(GetHistory(id=RUNS, agent="assistant", sender=SENDER))
        page = await conn.recv()
        assert isinstance(page, History) and len(page.entries) == 2 * RUNS, page
    finally:
        await conn.aclose()


def reset_peak(pid: int) -> None:
    """Make VmHWM the current RSS (Linux: 5 in clear_refs)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmHWM for {pid}")


async def ping_for(conn: Framed, seconds: float) -> list[float]:
    rtts: list[float] = []
    deadline = time.perf_counter() + seconds
    rid = 0
    while time.perf_counter() < deadline:
        rid += 1
        sent = time.perf_counter()
        await conn.send(Ping(id=rid))
        reply = await conn.recv()
        rtts.append((time.perf_counter() - sent) * 1e3)
        assert reply == Pong(id=rid), reply
    return rtts


@dataclass
class Hog:
    """H: writes requests until cancelled, reading nothing."""

    path: Path
    written: int = 0
    dropped: bool = False  # the daemon closed the connection

    async def run(self) -> None:
        conn = await connect(self.path, client="hog")
        start = trio.current_time()
        try:
            while True:
                await trio.sleep_until(start + self.written / BATCH * PACE_S)
                batch = bytearray()
                for rid in range(self.written + 1, self.written + BATCH + 1):
                    frame = GetHistory(id=rid, agent="assistant", sender=SENDER)
                    MSGPACK.append_frame(frame, batch)
                await conn.stream.send_all(batch)
                self.written += BATCH
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.dropped = True
        finally:
            await conn.aclose()


async def trial(server: Server, seconds: float, with_hog: bool) -> Trial:
    pinger = await connect(server.socket_path, client="pinger")
    await ping_for(pinger, 0.2)  # warm
    before = server.rss_kib()
    reset_peak(server.pid)
    hog = Hog(server.socket_path)
    async with trio.open_nursery() as nursery:
        if with_hog:
            nursery.start_soon(hog.run)
        pings = await ping_for(pinger, seconds)
        nursery.cancel_scope.cancel()
    peak = peak_rss_kib(server.pid)
    await pinger.aclose()
    await trio.sleep(0.5)  # let the daemon see H go and drop what it held for it
    kept = (server.rss_kib() - before) / 1024
    return Trial((peak - before) / 1024, pings, hog.written, hog.dropped, kept)


async def measure(server: Server, seconds: float) -> tuple[Trial, Trial]:
    await fill(server.socket_path)
    alone = await trial(server, seconds, with_hog=False)
    hogged = await trial(server, seconds, with_hog=True)
    return hogged, alone


def figures(root: Path, seconds: float = HOG_S, storage: str | None = None) -> list[Figure]:
    with chinwag_serve(root / "hog", echo_config(), storage) as daemon:
        hogged, alone = trio.run(measure, daemon, seconds)
    label = "same, no hog"
    paced = round(seconds / PACE_S) * BATCH
    fate = (
        f"H was dropped after writing {hogged.hog_requests:,} requests"
        if hogged.hog_dropped
        else f"H was not dropped; it wrote {hogged.hog_requests:,} of the {paced:,} requests "
        "its pace allowed"
    )
    return [
        Figure(
            "hog_rss_growth",
            "i",
            "one client writing get_history and never reading: daemon RSS growth at peak",
            "MiB",
            hogged.growth_mib,
            "lower",
            [Baseline(label, alone.growth_mib)],
            Target("<=", CAP_MIB + NOISE_MIB),
            note=f"{seconds:g} s of H, ~310 KB per answer, outgoing_bytes {CAP_MIB} MiB, echo on "
            f"{storage_label(storage)}; {fate}; RSS {hogged.kept_mib:+.1f} MiB once H closed "
            f"(no hog: {alone.kept_mib:+.1f} MiB)",
        ),
        Figure(
            "hog_ping_p99",
            "i",
            "another client's ping round trip p99 meanwhile",
            "ms",
            percentile(hogged.pings_ms, 0.99),
            "lower",
            [Baseline(label, percentile(alone.pings_ms, 0.99))],
            Target("<=", 50),
            note=f"p50 {percentile(hogged.pings_ms, 0.5):.2f} ms over {len(hogged.pings_ms):,} "
            f"pings (no hog: {percentile(alone.pings_ms, 0.5):.2f} ms over "
            f"{len(alone.pings_ms):,})",
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=HOG_S, help="how long H writes")
    run_alone(parser, lambda root, args: figures(root, args.seconds, args.storage))


if __name__ == "__main__":
    main()
