"""Bad input gets a clear error and loses nothing; one bad client never disturbs another."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import resource
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
import trio
from chinwag.clients import ChinwagError, connect
from chinwag.protocol import (
    JSON,
    MSGPACK,
    Attach,
    Cancel,
    End,
    Error,
    Event,
    GetHistory,
    GetStats,
    Hello,
    History,
    Ok,
    Ping,
    Pong,
    Start,
    Stats,
    Stream,
    Subscribe,
    Subscribed,
    TextDelta,
    ToolResult,
    Welcome,
)
from deadlines import FRAME_S, RUN_S, collect, deadline, describe

LIMITS_CONFIG = """
[daemon]
max_frame_bytes = 4096
max_open_requests = 2

[agents.assistant]
provider = "echo"
"""


async def assert_usable(conn) -> None:
    await conn.send(Ping(id=999))
    assert await conn.recv() == Pong(id=999)


async def test_bad_frames_close_only_their_own_connection(daemon, raw):
    async with connect(daemon.socket_path) as good:
        async with good.stream("assistant", "/slow 30 10", sender="good") as events:
            await anext(events)
            cases = [
                ((1 << 25).to_bytes(4, "big"), 413, JSON),  # larger than max_frame_bytes
                ((0).to_bytes(4, "big"), 400, JSON),  # an empty frame
                ((5).to_bytes(4, "big") + b"{bad}", 400, JSON),  # not JSON at all
                # Not MessagePack: the first byte chose MessagePack, so the error is in it.
                ((3).to_bytes(4, "big") + b"\xc1\xc1\xc1", 400, MSGPACK),
            ]
            for data, code, codec in cases:
                async with raw(daemon.socket_path, hello=False, codec=codec) as bad:
                    await bad.send_bytes(data)
                    error = await bad.recv()
                    assert isinstance(error, Error), data
                    assert (error.id, error.code) == (None, code)
                    assert error.message.endswith(".")
                    assert await bad.closed_by_peer()
            rest = await collect(events)
        assert "".join(e.delta for e in rest if isinstance(e, TextDelta)).endswith("29 30")
        assert rest[-1].status == "done"


async def test_malformed_messages_keep_the_connection_open(daemon, raw):
    async with raw(daemon.socket_path) as conn:
        bodies = [
            (b'{"type": "launch_rockets", "id": 4}', 4),
            (b'{"type": "ping"}', None),
            (b'{"type": "ping", "id": "7"}', None),
            (b'{"type": "ping", "id": 1.5}', None),
            (b'{"type": "stream", "id": 5, "agent": 3, "content": "x"}', 5),
            (
                b'{"type": "stream", "id": 6, "agent": "a", "content": "x", "queue": "jump"}',
                6,
            ),
            (b"[1, 2, 3]", None),
            (b'{"id": 8}', 8),
        ]
        for body, rid in bodies:
            await conn.send_bytes(len(body).to_bytes(4, "big") + body)
            error = await conn.recv()
            assert isinstance(error, Error) and error.code == 400, body
            assert error.id == rid, body
            await assert_usable(conn)
        # Unknown fields are ignored.
        body = b'{"type": "ping", "id": 10, "colour": "red"}'
        await conn.send_bytes(len(body).to_bytes(4, "big") + body)
        assert await conn.recv() == Pong(id=10)


async def test_requests_before_hello_and_unsupported_versions(daemon, raw):
    async with raw(daemon.socket_path, hello=False) as conn:
        await conn.send(Ping(id=1))
        error = await conn.recv()
        assert isinstance(error, Error) and (error.id, error.code) == (1, 400)
        await conn.send(Hello(protocol=1, client="late"))
        await conn.recv()
        await assert_usable(conn)
    async with raw(daemon.socket_path, hello=False) as conn:
        await conn.send(Hello(protocol=2, client="future"))
        error = await conn.recv()
        assert isinstance(error, Error) and error.code == 426 and "version 1" in error.message
        assert await conn.closed_by_peer()


async def test_limits_413_and_429(daemon_factory, raw):
    daemon = daemon_factory(LIMITS_CONFIG)
    async with raw(daemon.socket_path) as conn:
        await conn.send(Stream(id=1, agent="assistant", sender="a", content="/slow 50 20"))
        await conn.send(Stream(id=2, agent="assistant", sender="b", content="/slow 50 20"))
        await conn.send(Stream(id=3, agent="assistant", sender="c", content="/slow 50 20"))
        frames = await conn.recv_until(lambda f: isinstance(f, Error))
        assert frames[-1].id == 3 and frames[-1].code == 429
        await conn.send(Stream(id=1, agent="assistant", sender="d", content="dup"))
        frames = await conn.recv_until(lambda f: isinstance(f, Error))
        assert frames[-1].id == 1 and frames[-1].code == 400 and "still open" in frames[-1].message
    async with raw(daemon.socket_path) as conn:
        await conn.send(Stream(id=1, agent="assistant", content="x" * 5000))
        error = await conn.recv()
        assert isinstance(error, Error) and error.code == 413 and "4096" in error.message
        assert await conn.closed_by_peer()


async def test_msgpack_connections_get_msgpack_answers(daemon, raw):
    async with raw(daemon.socket_path, codec=MSGPACK) as conn:
        await conn.send(Stream(id=1, agent="assistant", content="packed words"))
        frames = await conn.recv_until(lambda f: isinstance(f, End))
        assert isinstance(frames[0], Start)
        assert "".join(f.delta for f in frames if isinstance(f, TextDelta)) == "packed words"
        await conn.send(GetStats(id=2))
        stats = await conn.recv()
        assert isinstance(stats, Stats) and stats.runs_total >= 1
        raw_body = msgspec.msgpack.encode({"type": "ping", "id": 3})
        assert raw_body[:1] != b"{"
        await conn.send_bytes(len(raw_body).to_bytes(4, "big") + raw_body)
        assert await conn.recv() == Pong(id=3)


def test_socket_is_private_and_a_live_daemon_is_not_replaced(daemon):
    mode = daemon.socket_path.stat().st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    second = subprocess.run(
        [
            sys.executable,
            "-m",
            "chinwag.clients.cli",
            "serve",
            "--socket",
            str(daemon.socket_path),
            "--config",
            str(daemon.config_path),
            "--storage",
            "memory:",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert second.returncode == 1
    assert "already listening" in second.stderr and "Traceback" not in second.stderr
    assert daemon.accepting()


def test_a_stale_socket_is_replaced(daemon):
    daemon.kill9()
    assert daemon.socket_path.exists()
    daemon.start()
    assert daemon.accepting()
    assert daemon.stop() == 0


def test_sigint_stops_cleanly(daemon):
    daemon.proc.send_signal(signal.SIGINT)
    assert daemon.proc.wait(15) == 0
    assert not daemon.socket_path.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another uid")
def test_peers_of_another_uid_are_refused(daemon):
    # Open the socket's permissions so that only SO_PEERCRED stands in the way.
    for path, mode in (
        (daemon.socket_path.parent.parent, 0o755),
        (daemon.socket_path.parent, 0o755),
        (daemon.socket_path, 0o666),
    ):
        os.chmod(path, mode)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: become nobody, say hello, hand back what the daemon said
        try:
            os.setgid(65534)
            os.setuid(65534)
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(FRAME_S)  # a daemon that serves it fails the test, not hangs it
                s.connect(str(daemon.socket_path))
                hello = msgspec.json.encode(Hello(protocol=1, client="intruder"))
                with contextlib.suppress(BrokenPipeError):  # refused before the hello landed
                    s.sendall(len(hello).to_bytes(4, "big") + hello)
                data = b""
                while chunk := s.recv(4096):
                    data += chunk
            os.write(write_end, data)
        except BaseException as exc:
            os.write(write_end, repr(exc).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    assert data[:4] == (len(data) - 4).to_bytes(4, "big"), data
    error = msgspec.json.decode(data[4:])
    assert error["type"] == "error" and error["code"] == 401 and error["id"] is None


async def test_a_stalled_reader_is_dropped_without_stalling_others(daemon_factory):
    daemon = daemon_factory(
        "[daemon]\noutgoing_frames = 64\nsubscription_events = 30000\n"
        '[agents.assistant]\nprovider = "echo"\n'
    )
    words = " ".join(["word"] * 20000)
    stored = trio.Event()

    async def watch_until_stored(watch) -> None:
        frames = []
        # Read as it comes: this client is not the stalled one.
        with deadline(RUN_S, "the stalled client's run to end", lambda: describe(frames)):
            async for frame in watch:
                frames.append(frame.event)
                if isinstance(frame.event, End):
                    assert frame.event.status == "done"
                    stored.set()
                    return

    async with connect(daemon.socket_path) as c:
        async with c.subscribe(sender="stalled") as watch, trio.open_nursery() as nursery:
            nursery.start_soon(watch_until_stored, watch)
            stalled = socket.socket(socket.AF_UNIX)
            stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            stalled.connect(str(daemon.socket_path))
            for msg in (
                Hello(protocol=1, client="stalled"),
                Stream(id=1, agent="assistant", sender="stalled", content=words),
            ):
                body = msgspec.json.encode(msg)
                stalled.sendall(len(body).to_bytes(4, "big") + body)
            # The stalled client never reads; others are served meanwhile.
            async with c.stream("assistant", "/slow 3 1", sender="other") as events:
                assert (await collect(events))[-1].status == "done"
            with deadline(RUN_S, "the stalled client's run to be stored"):
                await stored.wait()
        history = await c.history("assistant", "stalled")
        assert [e.content for e in history.entries] == [words, words]

    def drain() -> int:
        stalled.settimeout(30)  # EOF, not a timeout, proves the daemon hung up
        received = 0
        while chunk := stalled.recv(1 << 16):
            received += len(chunk)
        return received

    received = await trio.to_thread.run_sync(drain)
    stalled.close()
    assert received < 20000 * 30, "the stalled client was cut off, not fed the whole run"


async def test_a_slow_subscriber_loses_only_its_subscription(daemon_factory, raw):
    daemon = daemon_factory(
        '[daemon]\nsubscription_events = 2\n[agents.assistant]\nprovider = "echo"\n'
    )
    async with raw(daemon.socket_path) as watcher, connect(daemon.socket_path) as c:
        await watcher.send(Subscribe(id=1))
        assert await watcher.recv() == Subscribed(id=1)
        # The watcher reads nothing while a run publishes far more than 2 events at once.
        async with c.stream("assistant", " ".join(["w"] * 50)) as events:
            got = await collect(events)
        assert got[-1].status == "done"
        assert len((await c.history("assistant")).entries) == 2
        frames = await watcher.recv_until(lambda f: isinstance(f, End) and f.id == 1)
        end = frames[-1]
        assert end.status == "error" and end.error.code == 429
        assert all(isinstance(f, Event) for f in frames[:-1])
        await assert_usable(watcher)


async def test_cancel_sends_the_targets_end_before_ok(daemon, raw):
    async with raw(daemon.socket_path) as conn:
        await conn.send(Subscribe(id=1))
        assert await conn.recv() == Subscribed(id=1)
        await conn.send(Cancel(id=2, target=1))
        end, ok = await conn.recv(), await conn.recv()
        assert end == End(id=1, status="detached", error=None, last_seq=None)
        assert ok == Ok(id=2)
        # An attach cancelled before it resolves ends once, detached, and never errors later.
        await conn.send_bytes(
            JSON.encode_frame(Attach(id=3, agent="assistant", sender="ghost"))
            + JSON.encode_frame(Cancel(id=4, target=3))
        )
        end, ok = await conn.recv(), await conn.recv()
        assert isinstance(end, End) and end.id == 3 and end.status == "detached"
        assert ok == Ok(id=4)
        await assert_usable(conn)


async def test_a_history_larger_than_a_frame_is_sent_in_pages(daemon_factory, raw):
    daemon = daemon_factory(
        '[daemon]\nmax_frame_bytes = 4096\n[agents.assistant]\nprovider = "echo"\n'
    )
    async with connect(daemon.socket_path) as c:
        for n in range(20):
            async with c.stream("assistant", f"turn {n} " + "x" * 200) as events:
                await collect(events)
    async with raw(daemon.socket_path) as conn:
        seen = []
        after = 0
        for _ in range(40):  # a page holds one entry at least
            await conn.send(GetHistory(id=1, agent="assistant", after_seq=after))
            history = await conn.recv()
            assert isinstance(history, History) and history.entries, history
            assert len(JSON.encode(history)) <= 4096
            seen += [e.seq for e in history.entries]
            after = history.entries[-1].seq
            if after == history.last_seq:
                break
        assert seen == list(range(1, 41))


async def test_list_conversations_checks_its_filters(daemon):
    async with connect(daemon.socket_path) as c:
        with pytest.raises(ChinwagError) as err:
            await c.list_conversations(agent="nobody")
        assert err.value.code == 404
        with pytest.raises(ChinwagError) as err:
            await c.list_conversations(sender="bad\x00")
        assert err.value.code == 400


TIMEOUTS_CONFIG = """
[daemon]
hello_timeout_s = 0.5
idle_timeout_s = 0.5
max_connections = 3
max_content_bytes = 100

[agents.assistant]
provider = "echo"
"""


async def test_a_connection_that_never_says_hello_is_closed_408(daemon_factory, raw):
    daemon = daemon_factory(TIMEOUTS_CONFIG)
    async with raw(daemon.socket_path, hello=False) as silent:
        error = await silent.recv()
        assert isinstance(error, Error) and (error.id, error.code) == (None, 408)
        assert "hello" in error.message
        assert await silent.closed_by_peer()


async def test_an_idle_connection_is_closed_but_not_while_a_request_is_open(daemon_factory, raw):
    daemon = daemon_factory(TIMEOUTS_CONFIG)
    async with raw(daemon.socket_path) as conn:
        # A run three times longer than the idle timeout: the connection is busy, not idle.
        await conn.send(Stream(id=1, agent="assistant", content="/slow 3 500"))
        frames = await conn.recv_until(lambda f: isinstance(f, End), what="the run's end")
        assert frames[-1].status == "done"
        error = await conn.recv()
        assert isinstance(error, Error) and (error.id, error.code) == (None, 408)
        assert "nothing for 0.5 s" in error.message
        assert await conn.closed_by_peer()


async def test_connections_past_max_connections_are_refused_503(daemon_factory, raw):
    daemon = daemon_factory(TIMEOUTS_CONFIG)
    async with raw(daemon.socket_path) as first, raw(daemon.socket_path), raw(daemon.socket_path):
        async with raw(daemon.socket_path, hello=False) as fourth:
            error = await fourth.recv()
            assert isinstance(error, Error) and (error.id, error.code) == (None, 503)
            assert "max_connections" in error.message
            assert await fourth.closed_by_peer()
        await assert_usable(first)
    # Room again once they closed (the daemon sees each close as it happens).
    with deadline(FRAME_S, "room for a connection once three closed"):
        while True:
            async with raw(daemon.socket_path, hello=False) as again:
                await again.send(Hello(protocol=1, client="again"))
                if isinstance(await again.recv(), Welcome):
                    break


async def test_text_over_max_content_bytes_is_refused_413_and_the_connection_lives(
    daemon_factory, raw
):
    daemon = daemon_factory(TIMEOUTS_CONFIG)
    async with raw(daemon.socket_path) as conn:
        await conn.send(Stream(id=1, agent="assistant", content="é" * 51))  # 102 bytes
        error = await conn.recv()
        assert isinstance(error, Error) and (error.id, error.code) == (1, 413)
        assert "102 bytes" in error.message and "max_content_bytes of 100" in error.message
        await conn.send(Stream(id=2, agent="assistant", content="x" * 100))
        frames = await conn.recv_until(lambda f: isinstance(f, End))
        assert frames[-1].status == "done"


# --- open files ----------------------------------------------------------------------

FD_CONFIG = """
[daemon]
allowed_roots = ["/tmp"]

[agents.assistant]
provider = "echo"
tools = ["run_command", "read_file"]
"""


def logged(daemon, event: str) -> list[dict]:
    """The daemon's log lines (JSON, since its stderr is no terminal) for ``event``."""
    lines = daemon.log_path.read_text().splitlines()
    found = [json.loads(line) for line in lines if line.startswith("{")]
    return [line for line in found if line.get("event") == event]


def open_files_limit(pid: int) -> tuple[int, int]:
    """A process's (soft, hard) limit of open files, as /proc shows it."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError(f"no open files limit for {pid}")


async def test_under_a_low_open_file_limit_extra_clients_get_503_and_tools_still_work(
    daemon_factory, raw, monkeypatch, short_tmp
):
    # The daemon starts with 48 open files allowed (a hard limit of 160), and the
    # default max_connections of 1024, far more than it could hold.
    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (48, 160))

    monkeypatch.setattr(
        subprocess, "Popen", functools.partial(subprocess.Popen, preexec_fn=low_limit)
    )
    daemon = daemon_factory(FD_CONFIG)
    monkeypatch.undo()
    assert open_files_limit(daemon.proc.pid) == (160, 160), "the soft limit is raised to the hard"
    (lowered,) = logged(daemon, "max_connections_lowered")
    assert lowered["configured"] == 1024 and lowered["open_files"] == 160
    effective = lowered["effective"]
    assert 0 < effective < 160
    ws = short_tmp / "ws"
    ws.mkdir()
    (ws / "note.txt").write_text("kept\n")
    async with contextlib.AsyncExitStack() as stack:
        c = await stack.enter_async_context(connect(daemon.socket_path))
        held = 1
        while True:
            conn = await stack.enter_async_context(raw(daemon.socket_path, hello=False))
            await conn.send(Hello(protocol=1, client="many"))
            # At once: an accept that fails would leave it hanging.
            reply = await conn.recv(within=5)
            if not isinstance(reply, Welcome):
                break
            held += 1
            assert held <= effective, "served past the effective max_connections"
        assert held == effective
        assert isinstance(reply, Error) and (reply.id, reply.code) == (None, 503), reply
        assert "max_connections" in reply.message
        # What is kept for tools is still there.
        async with c.stream(
            "assistant", '/tool run_command {"command": "cat note.txt"}', cwd=str(ws)
        ) as events:
            got = await collect(events)
        (result,) = [e for e in got if isinstance(e, ToolResult)]
        assert (result.output, result.is_error) == ("kept\n[exit code 0]", False)
    assert logged(daemon, "accept_failed") == []


# --- the daemon's own descendants ---------------------------------------------------------

DESCENDANTS_CONFIG = """
[daemon]
allowed_roots = ["/tmp"]
{setting}

[agents.assistant]
provider = "echo"
tools = ["run_command"]
"""

# What a command could do with the daemon's socket: connect with the client library,
# and list every conversation. It prints how that went.
PEEK = """
import sys

import trio
from chinwag.clients import ChinwagError, connect


async def main() -> None:
    try:
        async with connect(sys.argv[1], client="peek") as c:
            listed = await c.list_conversations()
            print("served", len(listed.items))
    except ChinwagError as exc:
        print("refused", exc.code, exc.message)


trio.run(main)
"""


@pytest.mark.parametrize("allowed", [False, True], ids=["default", "allow_descendants"])
async def test_a_command_the_daemon_runs_cannot_use_its_socket_unless_allowed(
    daemon_factory, short_tmp, allowed
):
    setting = "allow_descendants = true" if allowed else ""
    daemon = daemon_factory(DESCENDANTS_CONFIG.format(setting=setting))
    ws = short_tmp / "ws"
    ws.mkdir()
    (ws / "peek.py").write_text(PEEK)
    command = f"{sys.executable} peek.py {daemon.socket_path}"
    # This test's own client is the daemon's parent, not its child: it is served.
    async with connect(daemon.socket_path) as c:
        content = "/tool run_command " + json.dumps({"command": command})
        async with c.stream("assistant", content, cwd=str(ws)) as events:
            got = await collect(events)
    (result,) = [e for e in got if isinstance(e, ToolResult)]
    assert result.output.endswith("[exit code 0]"), result.output
    said = result.output.splitlines()[0]
    if allowed:
        assert said == "served 1"
    else:
        assert said.startswith("refused 401 ") and said.endswith("."), said
        assert "allow_descendants" in said
        assert len(logged(daemon, "descendant_refused")) == 1
