"""Connecting while the daemon's accept backlog is full retries instead of returning a
socket that never connected (a non-blocking AF_UNIX connect fails with EAGAIN then)."""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path

import anyio.abc
import pytest
import trio
from chinwag.clients._client import _connect_unix


def full_listener(path: Path) -> tuple[socket.socket, list[socket.socket]]:
    """A listening socket nobody accepts on, and the connections that fill its backlog."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(0)
    queued: list[socket.socket] = []
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(str(path))
        except BlockingIOError:
            s.close()
            return listener, queued
        queued.append(s)


async def test_a_full_backlog_is_waited_out(short_tmp):
    path = short_tmp / "busy.sock"
    listener, queued = full_listener(path)
    connected: list[anyio.abc.SocketStream] = []

    async def connect() -> None:
        connected.append(await _connect_unix(path))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(connect)
            await trio.testing.wait_all_tasks_blocked()  # it met the full backlog: backing off
            assert not connected
            # Accept what is queued, as a daemon would: that makes room, and the
            # next attempt lands in the backlog, connected before it is accepted.
            listener.setblocking(False)
            accepted = []
            with contextlib.suppress(BlockingIOError):
                while True:
                    accepted.append(listener.accept()[0])
    raw = connected[0].extra(anyio.abc.SocketAttribute.raw_socket)
    assert raw.getpeername() == str(path)
    await connected[0].aclose()
    for s in queued + accepted:
        s.close()
    listener.close()


async def test_a_backlog_that_stays_full_is_a_clear_oserror(short_tmp, autojump_clock):
    path = short_tmp / "stuck.sock"
    listener, queued = full_listener(path)
    with pytest.raises(OSError, match="backlog stays full"):
        await _connect_unix(path)
    for s in queued:
        s.close()
    listener.close()
