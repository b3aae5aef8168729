"""The daemon as a process, seen from the CLI: started in the background when
none listens on the socket, found by the socket's peer, and stopped.

Only `serve` runs the daemon in this process (by exec); the other commands see
it through its socket and /proc, never through its code.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

from ._client import DaemonUnreachable
from ._settings import Failure

#: How long `send` and `chat` wait for a daemon they started to listen.
START_TIMEOUT_S = 15.0
#: How long `stop` waits for the daemon to exit: its shutdown grace (10 s by default) and more.
STOP_TIMEOUT_S = 30.0


def _accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
        return True


def daemon_log_path(socket_path: Path) -> Path:
    """Where a daemon started in the background writes its logs: next to its socket."""
    return socket_path.with_name(socket_path.stem + ".log")


def ensure_daemon(socket_path: Path | str, timeout: float = START_TIMEOUT_S) -> None:
    """Start a daemon in the background unless one listens on ``socket_path``; nothing
    when the command was given daemons' URLs (on other hosts, they are not ours to start).

    Like tmux: the daemon gets its own session, so it outlives this command and
    a Ctrl-C at the terminal never reaches it.
    """
    if isinstance(socket_path, str) or _accepts(socket_path):
        return
    socket_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    log_path = daemon_log_path(socket_path)
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "chinwag.daemon", "--socket", str(socket_path)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            close_fds=True,
        )
    deadline = time.monotonic() + timeout
    while not _accepts(socket_path):
        status = proc.poll()
        if status is not None:
            if _accepts(socket_path):
                return  # another client's daemon won the race for the socket
            raise Failure(
                f"the daemon exited with status {status} before listening on {socket_path}; "
                f"see its log at {log_path}"
            )
        if time.monotonic() > deadline:
            raise Failure(
                f"the daemon did not listen on {socket_path} within {timeout:g} s; "
                f"see its log at {log_path}"
            )
        time.sleep(0.05)  # polling another process's socket: there is no event to wait on
    print(
        f"chinwag: started a daemon in the background (pid {proc.pid}, log {log_path})",
        file=sys.stderr,
        flush=True,
    )


_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def _daemon_pid(socket_path: Path) -> int:
    """The pid of the process listening on ``socket_path`` (its SO_PEERCRED)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(socket_path))
        except OSError:
            raise Failure(DaemonUnreachable.nobody_at(socket_path).message) from None
        creds = probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    pid, _uid, _gid = _PEERCRED.unpack(creds)
    return int(pid)


def _is_daemon(pid: int) -> bool:
    """Whether ``pid`` runs `chinwag serve` or `python -m chinwag.daemon`."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return False
    head = argv[:3]  # the interpreter, -m, the module; or the console script
    return "chinwag.daemon" in head or any(Path(arg).name == "chinwag" for arg in head)


def _program(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "unknown"


def _alive(pid: int) -> bool:
    """Whether ``pid`` still runs: a zombie, exited but not yet reaped, does not."""
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return status.rpartition(")")[2].split()[0] != "Z"  # the state, after "(command)"


def stop_daemon(socket_path: Path, timeout: float = STOP_TIMEOUT_S) -> int:
    """SIGTERM the daemon listening on ``socket_path`` and wait for it to exit; its pid."""
    pid = _daemon_pid(socket_path)
    if not _is_daemon(pid):
        # Under socket activation the listener is systemd's, not the daemon's.
        raise Failure(
            f"{socket_path} is held by pid {pid} ({_program(pid)}), not by a chinwag"
            " daemon; stop it with its service manager, e.g. systemctl --user stop"
            " chinwag.socket chinwag.service"
        )
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            raise Failure(
                f"the daemon (pid {pid}) is still running {timeout:g} s after SIGTERM; see its"
                f" log at {daemon_log_path(socket_path)}"
            )
        time.sleep(0.05)  # another process's exit: there is no event to wait on
    return pid
