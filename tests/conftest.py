"""Shared fixtures: a real `chinwag serve` process on a short temporary socket path."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import worker_database

DEFAULT_CONFIG = """
[daemon]
shutdown_grace_s = 2.0
allowed_roots = ["/tmp"]  # where short_tmp makes the directories tests use as a cwd

[agents.assistant]
provider = "echo"
description = "Echoes the user"
tools = ["set_title", "ask_user"]

[agents.helper]
provider = "echo"
description = "A second agent"
tools = []
"""


class DaemonProcess:
    """A `chinwag serve` child process; restartable on the same socket and storage.

    ``prefix`` runs it through another command, e.g. ``ip netns exec NS`` for another
    network namespace; the prefix must exec the daemon, so that signals reach it.
    """

    def __init__(
        self,
        root: Path,
        config: str,
        storage_url: str | None = None,
        prefix: Sequence[str] = (),
    ) -> None:
        self.root = root
        self.socket_path = root / "chinwag.sock"
        self.config_path = root / "config.toml"
        self.config_path.write_text(config)
        self.storage_url = storage_url or f"sqlite:///{root / 'chinwag.db'}"
        self.log_path = root / "daemon.log"
        self.prefix = list(prefix)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> None:
        env = dict(os.environ, CHINWAG_SOCKET=str(self.socket_path))
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    *self.prefix,
                    sys.executable,
                    "-m",
                    "chinwag.clients.cli",
                    "serve",
                    "--config",
                    str(self.config_path),
                    "--socket",
                    str(self.socket_path),
                    "--storage",
                    self.storage_url,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chinwag serve exited early:\n{self.log_path.read_text()}")
            if self.accepting():
                return
            time.sleep(0.02)  # polling a child process's socket: no event to await
        raise RuntimeError(f"chinwag serve did not listen in time:\n{self.log_path.read_text()}")

    def accepting(self) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(self.socket_path))
            except OSError:
                return False
            return True

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    # AF_UNIX paths are limited to ~107 bytes; pytest's tmp_path can exceed that.
    with tempfile.TemporaryDirectory(prefix="cw-", dir="/tmp") as d:
        yield Path(d)


@pytest.fixture
def daemon_factory(short_tmp: Path) -> Iterator[object]:
    started: list[DaemonProcess] = []

    def make(
        config: str = DEFAULT_CONFIG,
        storage_url: str | None = None,
        name: str = "d",
        prefix: Sequence[str] = (),
    ) -> DaemonProcess:
        root = short_tmp / name
        root.mkdir()
        d = DaemonProcess(root, config, storage_url, prefix)
        d.start()
        started.append(d)
        return d

    yield make
    for d in started:
        if d.proc is not None and d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait(10)


@pytest.fixture
def daemon(daemon_factory) -> DaemonProcess:  # type: ignore[no-untyped-def]
    """A running `chinwag serve` on sqlite with the agents `assistant` and `helper`."""
    return daemon_factory()  # type: ignore[operator,no-any-return]


def pytest_sessionfinish(session: pytest.Session) -> None:
    worker_database.drop()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A storage URL on this worker's own PostgreSQL database, in a fresh schema dropped
    afterwards (tests/worker_database.py).

    Skips when the server is unreachable, except under CI=true, where it fails.
    """
    problem = worker_database.unreachable()
    if problem is not None:
        reason = f"no PostgreSQL at CHINWAG_TEST_POSTGRES={worker_database.SERVER_URL}: {problem}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    import psycopg
    from psycopg import sql

    database = worker_database.database_url()
    schema = f"chinwag_test_{secrets.token_hex(8)}"
    separator = "&" if "?" in database else "?"
    yield f"{database}{separator}schema={schema}"
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


@pytest.fixture(params=["sqlite", "jsonl", "postgres", "memory"])
def store_url(request: pytest.FixtureRequest, short_tmp: Path) -> str:
    """A storage URL on each backend in turn, for tests that must hold on every one."""
    match request.param:
        case "sqlite":
            return f"sqlite:///{short_tmp / 'store.db'}"
        case "jsonl":
            return f"jsonl:///{short_tmp / 'store'}"
        case "postgres":
            return str(request.getfixturevalue("postgres_url"))
    return "memory:"
