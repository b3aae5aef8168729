"""What the dashboard's tests share: logging in, a real `chinwag dashboard` process,
and reading its event stream."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
from anyio.from_thread import BlockingPortal, start_blocking_portal
from chinwag.clients import connect
from starlette.testclient import TestClient

TOKEN = "test-token-4f1c2a"
#: How long the dashboard process has to print its address.
START_S = 15.0
#: How long one wait on the dashboard's event stream may take.
EVENT_S = 15.0


def logged_in(client: TestClient | httpx.Client) -> str:
    """Log ``client`` in with the token; the session's CSRF token."""
    page = client.get("/feed", params={"token": TOKEN}, follow_redirects=True)
    assert page.status_code == 200, page.text
    found = re.search(r'name="csrf-token" content="([^"]+)"', page.text)
    assert found is not None, page.text
    return found.group(1)


# --- a real process -------------------------------------------------------------------


@dataclass
class DashboardProcess:
    """A running `chinwag dashboard`; ``url`` is its address without the token."""

    proc: subprocess.Popen[str]
    url: str
    token: str = TOKEN
    log: list[str] = field(default_factory=list)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def start_dashboard(socket_path: Path, *args: str) -> DashboardProcess:
    env = dict(os.environ)
    env.pop("CHINWAG_DASHBOARD_TOKEN", None)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "chinwag.clients.cli",
            "--socket",
            str(socket_path),
            "dashboard",
            "--port",
            "0",
            "--token",
            TOKEN,
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    output = proc.stdout
    seen: list[str] = []
    address: queue.Queue[str] = queue.Queue()

    def read() -> None:
        # Read to the end, so that the process never blocks on a full pipe.
        for line in output:
            seen.append(line)
            found = re.search(r"chinwag dashboard on (\S+)", line)
            if found:
                address.put(found.group(1).rstrip("/"))

    threading.Thread(target=read, daemon=True).start()
    try:
        url = address.get(timeout=START_S)
    except queue.Empty:
        proc.kill()
        proc.wait(10)
        raise AssertionError(
            f"chinwag dashboard printed no address within {START_S:g} s: {seen}"
        ) from None
    return DashboardProcess(proc, url, log=seen)


class EventStream:
    """The dashboard's server-sent events, read one at a time, each within ``EVENT_S``."""

    def __init__(self, response: httpx.Response) -> None:
        self._lines = response.iter_lines()

    def next(self) -> tuple[str, str]:
        kind, data = "message", ""
        for line in self._lines:
            if line.startswith("event:"):
                kind = line.partition(":")[2].strip()
            elif line.startswith("data:"):
                data = line.partition(":")[2].strip()
            elif not line and data:
                return kind, data
        raise AssertionError("the dashboard's event stream ended")

    def until(self, done: Callable[[str, str], bool], what: str) -> list[tuple[str, str]]:
        """Events up to and including the first that is ``done``."""
        seen: list[tuple[str, str]] = []
        try:
            while True:
                seen.append(self.next())
                if done(*seen[-1]):
                    return seen
        except httpx.ReadTimeout:
            raise AssertionError(f"waited {EVENT_S:g} s for {what}, in vain; saw {seen}") from None


def on_daemon(daemon: Any, body: Callable[[Any], Awaitable[None]]) -> None:
    """Run ``body(client)`` against the daemon through the client library (on trio:
    Playwright's sync API holds an asyncio loop in this thread)."""

    async def main() -> None:
        with anyio.fail_after(30):
            async with connect(daemon.socket_path) as client:
                await body(client)

    anyio.run(main, backend="trio")


@contextmanager
def held_client(daemon: Any) -> Iterator[tuple[BlockingPortal, Any]]:
    """A connection to the daemon held open in a portal (presence lasts as long)."""
    with (
        start_blocking_portal(backend="trio") as portal,
        portal.wrap_async_context_manager(connect(daemon.socket_path)) as client,
    ):
        yield portal, client


async def talk(client: Any, sender: str, *lines: str, guest: str | None = None) -> None:
    for line in lines:
        async with client.stream("assistant", line, sender=sender, guest=guest) as events:
            await events.collect()


async def begin_slow_run(client: Any, sender: str, words: int, delay_ms: int) -> None:
    """Start ``/slow words delay_ms`` with ``sender`` and leave once it has written its
    first two words: the run goes on in the daemon, followed by nobody."""
    async with client.stream("assistant", f"/slow {words} {delay_ms}", sender=sender) as events:
        async for event in events:
            if getattr(event, "delta", None) == " 2":
                return
    raise AssertionError(f"/slow {words} {delay_ms} ended before its second word")
