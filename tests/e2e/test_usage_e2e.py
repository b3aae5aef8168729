"""End to end: usage totals on the real `chinwag serve`, kept across a restart,
and `chinwag usage` (and `chinwag ls`) showing them.

The echo model reports usage (words as tokens) after every model call, a
compaction's summary call included; the totals must add up to exactly what it
reported, before and after the daemon restarts on the same store.
"""

from __future__ import annotations

import os
import subprocess
import sys

import msgspec
import pytest
import trio
from chinwag.clients import connect
from chinwag.protocol import End, Usage, UsageTotal
from deadlines import collect

CONFIG = """
[daemon]
shutdown_grace_s = 0.5

[agents.assistant]
provider = "echo"

[agents.helper]
provider = "echo"
"""


async def chinwag(
    socket_path, *args: str, check: bool = True
) -> subprocess.CompletedProcess[bytes]:
    """A `chinwag` command as a user runs it, on a terminal wide enough for every column."""
    return await trio.run_process(
        [sys.executable, "-m", "chinwag.clients.cli", "--socket", str(socket_path), *args],
        capture_stdout=True,
        capture_stderr=True,
        check=check,
        env=dict(os.environ, COLUMNS="200"),
    )


async def usage_rows(socket_path, *args: str) -> list[UsageTotal]:
    done = await chinwag(socket_path, "usage", "--json", *args)
    return [msgspec.json.decode(line, type=UsageTotal) for line in done.stdout.splitlines()]


async def reported_turn(client, agent: str, content: str, sender: str) -> tuple[int, int]:
    """One run; the (input, output) tokens of the `usage` events it sent."""
    async with client.stream(agent, content, sender=sender) as events:
        got = await collect(events, within=20)
    assert isinstance(got[-1], End) and got[-1].status == "done", got[-1]
    calls = [e for e in got if isinstance(e, Usage)]
    assert calls
    return sum(u.prompt_tokens for u in calls), sum(u.completion_tokens for u in calls)


@pytest.mark.parametrize("backend", ["sqlite", "jsonl", "postgres"])
async def test_usage_totals_survive_a_restart_and_chinwag_usage_shows_them(
    daemon_factory, short_tmp, request, backend
):
    match backend:
        case "sqlite":
            url = f"sqlite:///{short_tmp / 'store.db'}"
        case "jsonl":
            url = f"jsonl:///{short_tmp / 'store'}"
        case _:
            url = request.getfixturevalue("postgres_url")
    daemon = daemon_factory(CONFIG, url)
    expected: dict[tuple[str, str], list[int]] = {}  # (agent, sender) -> [in, out, calls]
    async with connect(daemon.socket_path) as client:
        for agent, sender, content in [
            ("assistant", "ana", "the cat sat on the mat"),
            ("assistant", "ana", "and then it left"),
            ("helper", "bob", "hello there"),
        ]:
            tokens_in, tokens_out = await reported_turn(client, agent, content, sender)
            counts = expected.setdefault((agent, sender), [0, 0, 0])
            counts[0] += tokens_in
            counts[1] += tokens_out
            counts[2] += 1
        await client.compact("assistant", "ana")
        history = await client.history("assistant", "ana")
        marker = history.entries[0]
        assert marker.kind == "compact" and marker.usage is not None, marker
        counts = expected[("assistant", "ana")]
        counts[0] += marker.usage.input_tokens
        counts[1] += marker.usage.output_tokens
        counts[2] += 1
        stats = await client.stats()

    rows = await usage_rows(daemon.socket_path)
    # A row per conversation and UTC day: one a conversation, unless the test spans midnight.
    stored: dict[tuple[str, str], list[int]] = {}
    for r in rows:
        counts = stored.setdefault((r.agent, r.sender), [0, 0, 0])
        counts[0] += r.input_tokens
        counts[1] += r.output_tokens
        counts[2] += r.calls
    assert stored == expected
    assert (stats.tokens_in, stats.tokens_out) == (
        sum(c[0] for c in expected.values()),
        sum(c[1] for c in expected.values()),
    )

    daemon.restart()

    assert await usage_rows(daemon.socket_path) == rows
    async with connect(daemon.socket_path) as client:
        again = await client.stats()
    assert (again.tokens_in, again.tokens_out) == (stats.tokens_in, stats.tokens_out)
    assert await usage_rows(daemon.socket_path, "--agent", "helper") == [
        r for r in rows if r.agent == "helper"
    ]

    ana_in, ana_out, ana_calls = expected[("assistant", "ana")]
    table = (await chinwag(daemon.socket_path, "usage")).stdout.decode()
    lines = table.splitlines()
    header = lines[0].split()
    assert header[:3] == ["agent", "sender", "calls"], table
    (ana,) = [line.split() for line in lines if line.split()[:2] == ["assistant", "ana"]]
    ana_days = [str(r.day) for r in rows if (r.agent, r.sender) == ("assistant", "ana")]
    assert ana == [
        "assistant",
        "ana",
        str(ana_calls),
        f"{ana_in:,}",
        f"{ana_out:,}",
        f"{ana_in + ana_out:,}",
        ana_days[0],
        ana_days[-1],
    ], table
    (last,) = [line.split() for line in lines if line.split()[:1] == ["total"]]
    assert last[1:4] == [str(4), f"{stats.tokens_in:,}", f"{stats.tokens_out:,}"], table

    daily = (await chinwag(daemon.socket_path, "usage", "--daily", "--sender", "bob")).stdout
    (bob,) = [line.split() for line in daily.decode().splitlines() if "bob" in line.split()]
    (bob_row,) = [r for r in rows if r.sender == "bob"]  # one call: one day
    assert bob[:4] == [str(bob_row.day), "helper", "bob", "1"], daily

    listed = (await chinwag(daemon.socket_path, "ls")).stdout.decode()
    assert "tokens" in listed.splitlines()[0], listed

    bad = await chinwag(daemon.socket_path, "usage", "--since", "ages", check=False)
    assert bad.returncode == 1
    assert bad.stderr.decode().startswith("chinwag: error 400: since must be"), bad.stderr
