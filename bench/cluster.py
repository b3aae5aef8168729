"""(x) Several daemons on one PostgreSQL: what crossing from one daemon to another costs.

Three real `chinwag serve` (echo agent) on one fresh schema of the machine's
PostgreSQL (``$CHINWAG_BENCH_POSTGRES``, default the test server), A, B and C;
each figure's baseline is the same work on one daemon, in the same run.

- **Kill**: a run streams on A (``/slow 1000 20``); ``kill`` is sent through B,
  or, for the baseline, through A; from the kill's write to the ``end killed``
  on A's stream, p50 and p99, the two kinds interleaved.
- **First event**: a subscriber on B and one on A; a client of A streams "hello
  world"; from the stream's write to its ``start`` at each subscriber, p50.
- **Relay rate**: 10 runs on A at once stream as fast as they can (``/slow
  WORDS 0``); the events per second a subscriber on B receives, against one on A
  (from each one's first event of the block to its last), and whether B's got all.
- **Mail**: a DM posted on A to a participant watching on B, from the post's
  write to the ``mail`` at the watch, p50 and p99 (target: p50 <= 5 ms); baseline:
  the same to a participant watching on A.
- **Load**: CLIENTS clients spread over the three daemons, each RUNS runs of
  "hi" one after the other in a conversation of its own, and SHARED clients more
  on SHARED_CONVERSATIONS conversations that clients of every daemon share; runs
  done, errors (target 0), and runs/s, against the same load on A alone.

    python -m bench.cluster [--samples 200] [--clients 300] [--runs 10]
"""

from __future__ import annotations

import argparse
import os
import secrets
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
import trio
from chinwag.clients import ChinwagError, Client, connect
from chinwag.protocol import End, Start, TextDelta
from psycopg import sql

from ._processes import chinwag_serve, run_alone
from ._report import Baseline, Figure, Target, percentile

DATABASE = os.environ.get("CHINWAG_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
CONFIG = """
[daemon]
max_connections = 4096

[agents.assistant]
provider = "echo"
tools = []
"""
RELAY_RUNS, RELAY_WORDS = 10, 300
SHARED, SHARED_CONVERSATIONS = 30, 10
WAIT_S = 60.0


@contextmanager
def fresh_schema() -> Iterator[str]:
    schema = f"chinwag_bench_{secrets.token_hex(6)}"
    try:
        yield f"{DATABASE}?schema={schema}"
    finally:
        with psycopg.connect(DATABASE, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


async def _until_daemons(client: Client, count: int) -> None:
    """Every daemon's row of liveness is up (their beats: nothing to await but them)."""
    with trio.fail_after(WAIT_S):
        while len((await client.stats()).daemons) < count:  # noqa: ASYNC110
            await trio.sleep(0.1)


async def _kill_ms(on_a: Client, killer: Client, sender: str) -> float:
    async with on_a.stream("assistant", "/slow 1000 20", sender=sender) as events:
        with trio.fail_after(WAIT_S):
            async for event in events:
                if isinstance(event, TextDelta):
                    break
            began = time.perf_counter()
            await killer.kill("assistant", sender=sender)
            end = [e async for e in events][-1]
    assert isinstance(end, End) and end.status == "killed", end
    return (time.perf_counter() - began) * 1000


async def _first_events(
    on_a: Client, sub_a: Client, sub_b: Client, samples: int
) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"here": [], "there": []}
    async with sub_a.subscribe("assistant") as here, sub_b.subscribe("assistant") as there:
        for n in range(samples):
            began = time.perf_counter()
            async with on_a.stream("assistant", "hello world", sender=f"first{n % 50}") as events:
                seen = {}
                with trio.fail_after(WAIT_S):
                    for key, feed in (("here", here), ("there", there)):
                        async for frame in feed:
                            if isinstance(frame.event, Start):
                                seen[key] = (time.perf_counter() - began) * 1000
                                break
                    for key in ("here", "there"):
                        times[key].append(seen[key])
                    [e async for e in events]
                    for feed in (here, there):  # the rest of this run's events
                        async for frame in feed:
                            if isinstance(frame.event, End):
                                break
    return times


async def _relay(on_a: Client, sub_a: Client, sub_b: Client) -> dict[str, tuple[int, float]]:
    """(events, events/s) at each subscriber, for RELAY_RUNS runs streaming at once."""
    got: dict[str, tuple[int, float]] = {}

    async def count(key: str, client: Client, ready: trio.Event) -> None:
        async with client.subscribe("assistant") as feed:
            ready.set()
            first = last = 0.0
            events = ends = 0
            with trio.fail_after(WAIT_S):
                async for frame in feed:
                    last = time.perf_counter()
                    first = first or last
                    events += 1
                    ends += isinstance(frame.event, End)
                    if ends == RELAY_RUNS:
                        break
            got[key] = (events, events / (last - first))

    async def run(n: int) -> None:
        async with on_a.stream("assistant", f"/slow {RELAY_WORDS} 0", sender=f"relay{n}") as ev:
            [e async for e in ev]

    async with trio.open_nursery() as nursery:
        ready = [trio.Event(), trio.Event()]
        nursery.start_soon(count, "here", sub_a, ready[0])
        nursery.start_soon(count, "there", sub_b, ready[1])
        for event in ready:
            await event.wait()
        async with trio.open_nursery() as runs:
            for n in range(RELAY_RUNS):
                runs.start_soon(run, n)
    return got


async def _mail_ms(on_a: Client, on_b: Client, samples: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"here": [], "there": []}
    await on_a.register("ana")
    await on_a.register("near")
    await on_b.register("far")
    async with on_a.watch("near") as near, on_b.watch("far") as far:
        for n in range(samples):
            for key, to, feed in (("here", "near", near), ("there", "far", far)):
                began = time.perf_counter()
                await on_a.post("ana", f"note {n}", to=to)
                with trio.fail_after(WAIT_S):
                    await anext(feed)
                times[key].append((time.perf_counter() - began) * 1000)
    return times


async def _load(sockets: list[Path], clients: int, runs: int) -> tuple[int, Counter[str], float]:
    done = 0
    errors: Counter[str] = Counter()

    async def client(n: int, sender: str) -> None:
        nonlocal done
        try:
            async with connect(sockets[n % len(sockets)]) as c:
                for _ in range(runs):
                    async with c.stream("assistant", "hi", sender=sender) as events:
                        end = [e async for e in events][-1]
                    if isinstance(end, End) and end.status == "done":
                        done += 1
                    else:
                        errors[f"end {end}"] += 1
        except (ChinwagError, OSError) as exc:
            errors[f"{type(exc).__name__}: {exc}"] += 1

    began = time.perf_counter()
    with trio.fail_after(WAIT_S * 10):
        async with trio.open_nursery() as nursery:
            for n in range(clients):
                nursery.start_soon(client, n, f"load{n}")
            for n in range(SHARED):
                nursery.start_soon(client, n, f"shared{n % SHARED_CONVERSATIONS}")
    return done, errors, time.perf_counter() - began


@dataclass
class Found:
    kill: dict[str, list[float]]
    first: dict[str, list[float]]
    relay: dict[str, tuple[int, float]]
    mail: dict[str, list[float]]
    load_all: tuple[int, Counter[str], float]
    load_one: tuple[int, Counter[str], float]


async def _measure(sockets: list[Path], samples: int, clients: int, runs: int) -> Found:
    a, b, _ = sockets
    async with connect(a) as on_a, connect(b) as on_b, connect(a) as sub_a, connect(b) as sub_b:
        await _until_daemons(on_b, 3)
        kill: dict[str, list[float]] = {"here": [], "there": []}
        for n in range(samples):
            kill["there"].append(await _kill_ms(on_a, on_b, f"kill{n}"))
            kill["here"].append(await _kill_ms(on_a, sub_a, f"kill{n}"))
        first = await _first_events(on_a, sub_a, sub_b, samples)
        relay = await _relay(on_a, sub_a, sub_b)
        mail = await _mail_ms(on_a, on_b, samples)
    load_all = await _load(sockets, clients, runs)
    load_one = await _load([a], clients, runs)
    return Found(kill, first, relay, mail, load_all, load_one)


def figures(root: Path, samples: int, clients: int, runs: int) -> list[Figure]:
    with fresh_schema() as url, ExitStack() as stack:
        servers = [
            stack.enter_context(chinwag_serve(root / name, CONFIG, storage=url))
            for name in ("a", "b", "c")
        ]
        found = trio.run(_measure, [s.socket_path for s in servers], samples, clients, runs)
    kill, first, mail, relay = found.kill, found.first, found.mail, found.relay
    done_all, errors_all, wall_all = found.load_all
    done_one, errors_one, wall_one = found.load_one
    total = (clients + SHARED) * runs
    same = "the same on one daemon, same run"
    here_kill = f"kill through the daemon running it ({same})"
    figs = [
        Figure(
            "cluster_kill_p50_ms", "x", "kill through another daemon -> end killed, p50", "ms",
            percentile(kill["there"], 0.5), "lower",
            [Baseline(here_kill, percentile(kill["here"], 0.5))],
            None, f"{samples} kills of each kind, interleaved",
        ),
        Figure(
            "cluster_kill_p99_ms", "x", "kill through another daemon -> end killed, p99", "ms",
            percentile(kill["there"], 0.99), "lower",
            [Baseline(here_kill, percentile(kill["here"], 0.99))],
        ),
        Figure(
            "cluster_first_event_p50_ms", "x", "stream on A -> start at a subscriber on B, p50",
            "ms", percentile(first["there"], 0.5), "lower",
            [Baseline(f"a subscriber on A ({same})", percentile(first["here"], 0.5))],
            None, f"{samples} runs",
        ),
        Figure(
            "cluster_relay_events_per_s", "x",
            f"events/s at a subscriber on B, {RELAY_RUNS} runs on A at once", "events/s",
            relay["there"][1], "higher",
            [Baseline(f"a subscriber on A ({same})", relay["here"][1])],
            None, f"B got {relay['there'][0]} events, A's subscriber {relay['here'][0]}",
        ),
        Figure(
            "cluster_mail_p50_ms", "x", "post on A -> mail at a watch on B, p50", "ms",
            percentile(mail["there"], 0.5), "lower",
            [Baseline(f"a watch on A ({same})", percentile(mail["here"], 0.5))],
            Target("<=", 5.0), f"{samples} posts of each kind",
        ),
        Figure(
            "cluster_mail_p99_ms", "x", "post on A -> mail at a watch on B, p99", "ms",
            percentile(mail["there"], 0.99), "lower",
            [Baseline(f"a watch on A ({same})", percentile(mail["here"], 0.99))],
        ),
        Figure(
            "cluster_load_errors", "x",
            f"errors, 3 daemons x {clients + SHARED} clients x {runs} runs", "errors",
            float(sum(errors_all.values())), "lower",
            [Baseline("one daemon, same load, same run", float(sum(errors_one.values())))],
            Target("<=", 0),
            "; ".join(f"{n} x {what}" for what, n in errors_all.most_common(5))
            or f"{done_all} of {total} runs done",
        ),
        Figure(
            "cluster_load_runs_per_s", "x",
            f"runs/s, 3 daemons x {clients + SHARED} clients x {runs} runs", "runs/s",
            done_all / wall_all, "higher",
            [Baseline("one daemon, same load, same run", done_one / wall_one)],
            None, f"{done_all} runs in {wall_all:.1f} s; one daemon {done_one} in {wall_one:.1f} s",
        ),
    ]  # fmt: skip
    return figs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200, help="kills, runs, posts (200)")
    parser.add_argument("--clients", type=int, default=300, help="load clients (300)")
    parser.add_argument("--runs", type=int, default=10, help="runs per load client (10)")
    run_alone(parser, lambda root, args: figures(root, args.samples, args.clients, args.runs))


if __name__ == "__main__":
    main()
