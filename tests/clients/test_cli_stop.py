"""`chinwag stop`: the daemon on the socket gets SIGTERM and is waited for."""

from __future__ import annotations

import os
import subprocess
import sys

from deadlines import killed_after
from test_cli import assert_clean_failure, chinwag


def test_stop_ends_the_daemon_and_a_send_starts_a_new_one(daemon_factory, tmp_path) -> None:
    daemon = daemon_factory()
    result = chinwag(daemon.socket_path, "stop")
    assert result.returncode == 0, result.stderr
    assert result.stderr == f"chinwag: stopped the daemon (pid {daemon.proc.pid})\n"
    assert daemon.proc.wait(5) == 0  # SIGTERM's clean exit, already done when stop returned
    assert not daemon.socket_path.exists()
    # With none listening, `stop` fails cleanly and `send` starts a daemon again.
    assert_clean_failure(again := chinwag(daemon.socket_path, "stop"))
    assert "no daemon is listening" in again.stderr
    env = dict(os.environ, HOME=str(tmp_path), XDG_DATA_HOME=str(tmp_path / "data"))
    env["CHINWAG_CONFIG"] = str(tmp_path / "no-config.toml")
    sent = chinwag(daemon.socket_path, "send", "assistant", "back again", env=env)
    assert sent.returncode == 0, sent.stderr
    assert sent.stdout == "back again\n"
    assert "started a daemon in the background" in sent.stderr
    stopped = chinwag(daemon.socket_path, "stop")
    assert stopped.returncode == 0, stopped.stderr
    assert chinwag(daemon.socket_path, "ls").returncode == 1


def test_stop_refuses_a_socket_held_by_another_program(tmp_path) -> None:
    path = tmp_path / "other.sock"
    # Another program listens on the socket: `stop` names it and signals nothing.
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import socket, sys, time; s = socket.socket(socket.AF_UNIX);"
            " s.bind(sys.argv[1]); s.listen(); print(flush=True); time.sleep(60)",
            str(path),
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None
        with killed_after(holder, 15, "the other program to listen"):
            assert holder.stdout.readline() == b"\n"
        result = chinwag(path, "stop")
        assert_clean_failure(result)
        assert f"is held by pid {holder.pid} (python" in result.stderr
        assert holder.poll() is None
    finally:
        holder.kill()
        holder.wait()
