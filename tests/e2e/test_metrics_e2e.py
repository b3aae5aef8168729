"""Prometheus metrics end to end: the real `chinwag serve` with `[daemon] metrics` set,
driven over its socket, its `/metrics` scraped over HTTP as Prometheus would."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from chinwag.clients import connect
from chinwag.protocol import End, Start, Stream, TextDelta, Usage
from deadlines import FRAME_S, collect, deadline, next_of
from prometheus_client.parser import text_string_to_metric_families

METRICS_CONFIG = """
[daemon]
metrics = "127.0.0.1:{port}"
shutdown_grace_s = 0.5
outgoing_frames = 64   # a client that reads nothing is dropped soon

[agents.assistant]
provider = "echo"
tools = ["set_title"]

[agents.helper]
provider = "echo"
"""

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def scrape(port: int) -> Samples:
    """Every sample `/metrics` shows now, by name and labels."""
    reply = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=FRAME_S)
    reply.raise_for_status()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(reply.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in samples, f"no sample {name}{labels}: {sorted(n for n, _ in samples)}"
    return samples[key]


def listening_tcp_sockets(pid: int) -> int:
    """How many listening TCP sockets process ``pid`` holds (Linux: /proc)."""
    listening: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            next(rows)  # the header
            for row in rows:
                fields = row.split()
                if fields[3] == "0A":  # TCP_LISTEN
                    listening.add(fields[9])  # the socket's inode
    held = {
        os.readlink(f"/proc/{pid}/fd/{fd}").removeprefix("socket:[").removesuffix("]")
        for fd in os.listdir(f"/proc/{pid}/fd")
        if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:[")
    }
    return len(listening & held)


async def test_metrics_count_what_real_runs_did(daemon_factory: Callable[..., Any]) -> None:
    port = free_port()
    daemon = daemon_factory(METRICS_CONFIG.format(port=port))
    assert daemon.proc is not None and listening_tcp_sockets(daemon.proc.pid) == 1
    before = scrape(port)  # every agent's series exists from the start, at zero
    assert value(before, "chinwag_runs_total", agent="helper", status="done") == 0
    assert value(before, "chinwag_runs_in_flight", agent="assistant") == 0

    usage: list[Usage] = []
    ends: list[End] = []
    async with connect(daemon.socket_path) as c:
        for content in (
            "hello there world",  # one model call
            "/title Weekly plans",  # a tool call, then the echo of its result
            "/tool no_such_tool {}",  # a tool the agent does not have: an error result
            "/fail upstream said no",  # the provider fails: the run ends `error`
        ):
            async with c.stream("assistant", content) as events:
                got = await collect(events)
            usage += [e for e in got if isinstance(e, Usage)]
            ends.append(got[-1])
        assert [end.status for end in ends] == ["done", "done", "done", "error"]
        async with c.stream("helper", "one two") as events:
            await collect(events)

        samples = scrape(port)
        assert value(samples, "chinwag_connections") == 1  # this client; the scrape is HTTP
        assert value(samples, "chinwag_open_requests") == 0

    assert value(samples, "chinwag_runs_total", agent="assistant", status="done") == 3
    assert value(samples, "chinwag_runs_total", agent="assistant", status="error") == 1
    assert value(samples, "chinwag_runs_total", agent="assistant", status="killed") == 0
    assert value(samples, "chinwag_runs_total", agent="helper", status="done") == 1
    assert value(samples, "chinwag_run_duration_seconds_count", agent="assistant") == 4
    # The failed run's model said nothing: three runs had a first output.
    assert value(samples, "chinwag_run_first_output_seconds_count", agent="assistant") == 3
    # 1 + 2 + 2 + 1 model calls, each on the agent's provider (the config's name for it).
    on_echo = {"agent": "assistant", "provider": "echo"}
    assert value(samples, "chinwag_model_call_duration_seconds_count", **on_echo) == 6
    tokens_in = value(samples, "chinwag_model_tokens_total", **on_echo, direction="input")
    tokens_out = value(samples, "chinwag_model_tokens_total", **on_echo, direction="output")
    assert (tokens_in, tokens_out) == (
        sum(u.prompt_tokens for u in usage),
        sum(u.completion_tokens for u in usage),
    )
    assert value(samples, "chinwag_tool_calls_total", tool="set_title", outcome="ok") == 1
    assert value(samples, "chinwag_tool_calls_total", tool="set_title", outcome="error") == 0
    # A name no tool has is counted under one label, not its own.
    assert value(samples, "chinwag_tool_calls_total", tool="unknown", outcome="error") == 1
    assert not any(dict(labels).get("tool") == "no_such_tool" for _, labels in samples)
    assert value(samples, "chinwag_tool_call_duration_seconds_count", tool="set_title") == 1
    # User entries (4 + 1), final answers (3 + 1) and tool steps (2), each one append.
    assert value(samples, "chinwag_storage_append_duration_seconds_count") == 11
    # Never a sender, a run id or text as a label.
    shown = {label for _, labels in samples for label, _ in labels}
    assert shown <= {"agent", "provider", "direction", "status", "tool", "outcome", "consumer"} | {
        "le",
        "version",
        "implementation",
        "major",
        "minor",
        "patchlevel",
    }


async def test_gauges_show_runs_in_flight_queued_and_open_requests(
    daemon_factory: Callable[..., Any],
) -> None:
    port = free_port()
    daemon = daemon_factory(METRICS_CONFIG.format(port=port))
    async with connect(daemon.socket_path) as c:
        async with c.stream("assistant", "/slow 100 50") as slow:
            await next_of(slow, TextDelta)  # it runs
            async with c.stream("assistant", "queued behind it") as queued:
                samples = scrape(port)
                await c.kill("assistant", all=True)
                await collect(queued)
            await collect(slow)
        after = scrape(port)
    assert value(samples, "chinwag_runs_in_flight", agent="assistant") == 1
    assert value(samples, "chinwag_runs_queued", agent="assistant") == 1
    assert value(samples, "chinwag_runs_in_flight", agent="helper") == 0
    assert value(samples, "chinwag_open_requests") == 2  # the two streams
    assert value(after, "chinwag_runs_in_flight", agent="assistant") == 0
    assert value(after, "chinwag_runs_total", agent="assistant", status="killed") == 2


async def test_mail_and_a_dropped_slow_client_are_counted(
    daemon_factory: Callable[..., Any], raw: Callable[..., Any]
) -> None:
    port = free_port()
    daemon = daemon_factory(METRICS_CONFIG.format(port=port))
    async with connect(daemon.socket_path) as c:
        async with c.watch("bob") as mail:
            posted = await c.post("ana", "the minutes are in", to="bob")
            with deadline(FRAME_S, "the mail pushed to bob's watch"):
                pushed = await anext(aiter(mail))
            assert pushed.msg_id == posted.msg_id
        # A client that asks for a long answer and reads none of it is dropped, its run
        # going on: once a run queued behind it in its conversation ends, it ended too.
        async with raw(daemon.socket_path) as reader_of_nothing:
            words = " ".join(["w"] * 20_000)
            long_answer = Stream(id=1, agent="assistant", sender="slow", content=words)
            await reader_of_nothing.send(long_answer)
            assert isinstance(await reader_of_nothing.recv(), Start)
            async with c.stream("assistant", "after it", sender="slow") as after:
                await collect(after)
            samples = scrape(port)
    assert value(samples, "chinwag_mail_posted_total") == 1
    assert value(samples, "chinwag_mail_delivery_seconds_count") == 1
    assert value(samples, "chinwag_slow_consumers_dropped_total", consumer="connection") == 1
    assert value(samples, "chinwag_slow_consumers_dropped_total", consumer="subscription") == 0


def test_metrics_are_off_by_default(daemon: Any) -> None:
    assert daemon.proc is not None
    assert listening_tcp_sockets(daemon.proc.pid) == 0


def serve_once(root: Path, config: str) -> subprocess.CompletedProcess[str]:
    """`chinwag serve` on ``config``, expected to refuse to start."""
    (root / "config.toml").write_text(config)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "chinwag.clients.cli",
            "serve",
            "--config",
            str(root / "config.toml"),
            "--socket",
            str(root / "chinwag.sock"),
            "--storage",
            "memory:",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_a_bad_metrics_address_is_a_config_error(short_tmp: Path) -> None:
    done = serve_once(short_tmp, '[daemon]\nmetrics = "9464"\n')
    assert done.returncode == 2
    assert '[daemon] metrics must be "HOST:PORT", such as "127.0.0.1:9464", not \'9464\'' in (
        done.stderr
    )


def test_a_metrics_port_in_use_stops_the_start(short_tmp: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = serve_once(short_tmp, f'[daemon]\nmetrics = "127.0.0.1:{port}"\n')
    assert done.returncode == 1
    assert f"chinwag: Cannot serve metrics on 127.0.0.1:{port}: Address already in use." in (
        done.stderr
    )
