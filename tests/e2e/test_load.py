"""Load: many clients, each running several turns at once on one daemon, lose nothing.

100 clients x 10 runs in the default suite; CHINWAG_LOAD_CLIENTS=1000 gives the
full figure (bench/ reports its timings). Every run must end `done` with the
right text, and every turn must be stored.
"""

from __future__ import annotations

import os

import pytest
import trio
from chinwag.clients import connect
from chinwag.protocol import End, TextDelta
from deadlines import deadline

CLIENTS = int(os.environ.get("CHINWAG_LOAD_CLIENTS", "100"))
RUNS = int(os.environ.get("CHINWAG_LOAD_RUNS", "10"))
LOAD_S = 300

CONFIG = f"""
[daemon]
max_connections = {CLIENTS + 16}

[agents.assistant]
provider = "echo"
"""


@pytest.mark.timeout(LOAD_S + 60)  # past the suite's default; its own deadline says more
async def test_many_clients_many_runs_zero_errors_every_turn_stored(daemon_factory):
    daemon = daemon_factory(CONFIG)
    failures: list[str] = []

    async def client(n: int) -> None:
        async with connect(daemon.socket_path) as c:
            for run in range(RUNS):
                words = f"client {n} run {run}"
                async with c.stream("assistant", words, sender=f"load-{n}") as events:
                    got = await events.collect()
                end = got[-1]
                text = "".join(e.delta for e in got if isinstance(e, TextDelta))
                if not isinstance(end, End) or end.status != "done" or text != words:
                    failures.append(f"client {n} run {run}: {end} {text!r}")

    with deadline(LOAD_S, f"{CLIENTS} clients' {RUNS} runs each to end"):
        async with trio.open_nursery() as nursery:
            for n in range(CLIENTS):
                nursery.start_soon(client, n)
    assert failures == []
    async with connect(daemon.socket_path) as c:
        stored = 0
        async for item in c.iter_conversations(agent="assistant"):
            assert item.last_seq == 2 * RUNS, item
            stored += 1
        stats = await c.stats()
    assert stored == CLIENTS
    assert stats.runs_total == CLIENTS * RUNS
