"""`chinwag serve` as a user starts it: its options, and what it says when it cannot start."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
from pathlib import Path

import pytest
from test_cli import CHINWAG, chinwag, wait_listening

CONFIG = """
[daemon]
shutdown_grace_s = 2.0

[agents.assistant]
provider = "echo"
"""


def serve_until_exit(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`chinwag serve` that is expected to exit by itself, at once."""
    config = root / "config.toml"
    config.write_text(CONFIG)
    argv = [CHINWAG, "serve", "--config", str(config), "--socket", str(root / "s.sock"), *args]
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL
    )


def not_a_database(path: Path) -> None:
    path.write_bytes(b"these bytes were never a database\n" * 200)


def damaged_header(path: Path) -> None:
    path.write_bytes(b"SQLite format 3\x00" + os.urandom(8192))


def damaged_schema(path: Path) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE t (x)")
        conn.executemany("INSERT INTO t VALUES (?)", [("x" * 500,)] * 50)
    conn.close()
    data = bytearray(path.read_bytes())
    data[100:4096] = b"\xa5" * (4096 - 100)  # page 1 after the header: the schema
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [not_a_database, damaged_header, damaged_schema])
def test_a_corrupt_sqlite_file_is_one_line_naming_it(short_tmp: Path, damage) -> None:
    db = short_tmp / "chinwag.db"
    damage(db)
    done = serve_until_exit(short_tmp, "--storage", f"sqlite:///{db}")
    assert done.returncode == 1, done
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("chinwag: ") and str(db) in lines[0], lines[0]
    assert "damaged" in lines[0], lines[0]
    assert not (short_tmp / "s.sock").exists()


def _serve_and_send(root: Path, *serve_args: str) -> str:
    """Serve with ``serve_args``, run one turn, stop; what the daemon wrote."""
    root.mkdir()
    (root / "config.toml").write_text(CONFIG)
    sock, log_path = root / "s.sock", root / "daemon.log"
    env = {k: v for k, v in os.environ.items() if k != "CHINWAG_LOG_LEVEL"}
    argv = [CHINWAG, "serve", "--config", str(root / "config.toml"), "--socket", str(sock)]
    argv += ["--storage", "memory:", *serve_args]
    with log_path.open("ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_listening(sock, proc)
        sent = chinwag(sock, "send", "assistant", "hello")
        assert sent.returncode == 0, sent
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    return log_path.read_text()


def test_serve_takes_log_level_as_the_readme_says(short_tmp: Path) -> None:
    debug = _serve_and_send(short_tmp / "debug", "--log-level", "debug")
    assert '"event":"run_ended"' in debug, debug  # a debug line
    warning = _serve_and_send(short_tmp / "warning", "--log-level", "warning")
    assert "daemon_started" not in warning, warning  # an info line


def test_serve_refuses_an_unknown_log_level_in_one_line(short_tmp: Path) -> None:
    done = serve_until_exit(short_tmp, "--log-level", "chatty")
    assert done.returncode == 2, done
    assert "Traceback" not in done.stderr
    assert "chatty" in done.stderr and "--log-level" in done.stderr, done.stderr
