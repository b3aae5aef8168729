"""`run_command`'s processes: what a command sees, where it may write, and how it ends.

On Linux a command runs under a reaper of its own (``_reaper.py``): what the
command leaves behind, in any session or process group, is killed when it ends,
is killed or times out, and when the daemon dies, even by kill -9. The daemon is
a child subreaper too, so that a reaper killed outright hands what it kept to
the daemon, which ends it. Elsewhere the command gets a session of its own, and
that session's process group is what is killed.

A command sees a scrubbed environment: an allowlist of the daemon's variables
(`PATH`, `HOME`, the locale, ...) plus the agent's `env`; never a provider's key,
`CHINWAG_*`, `XDG_RUNTIME_DIR` or `LISTEN_*`. With ``sandbox = "bwrap"`` it runs
in bubblewrap: the cwd read-write, the system read-only, the homes, `/tmp` and
the runtime directories (where the daemon's socket lives) hidden, and no
network unless the agent's `sandbox_network` asks for it.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import trio

from . import _reaper

KILL_GRACE_S = 2.0  # between SIGTERM and SIGKILL when a command is cancelled
_DRAIN_S = 1.0  # how long output is read after the command exits
_REAPER = Path(_reaper.__file__)

# What a command inherits from the daemon's environment: what programs need to
# find themselves, their user and their locale, and nothing that holds a secret.
INHERITED = frozenset(
    {"PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TERM", "TZ", "TMPDIR"}
)
# What the agent's `env` may not set: the daemon's own settings and socket, systemd's
# socket activation, and the variables the providers take their keys from by default.
_KEPT_PREFIXES = ("CHINWAG_", "LISTEN_")
_KEPT = frozenset({"XDG_RUNTIME_DIR", "OPENAI_API_KEY", "ANTHROPIC_API_KEY"})


def command_env(extra: Mapping[str, str]) -> dict[str, str]:
    """A command's environment: the allowlisted variables of the daemon's, then ``extra``."""
    env = {
        name: value
        for name, value in os.environ.items()
        if name in INHERITED or name.startswith("LC_")
    }
    env.update(extra)
    return env


def env_problem(name: str, provider_keys: set[str]) -> str | None:
    """Why an agent's `env` may not set ``name`` (the end of a sentence), or None."""
    if not name or "=" in name or "\0" in name:
        return "which is not a variable name"
    if name.startswith(_KEPT_PREFIXES) or name in _KEPT:
        return "which the daemon keeps from commands"
    if name in provider_keys:
        return "which holds a provider's key"
    return None


# --- the sandbox -----------------------------------------------------------------


@dataclass(frozen=True)
class Sandbox:
    """bubblewrap around a command: its cwd read-write, the system read-only."""

    network: bool = False
    read_only: tuple[str, ...] = ()  # more paths it may read (a toolchain in a home)


def sandbox_problem(kind: str) -> str | None:
    """Why ``kind`` cannot confine commands on this machine (the end of a sentence), or None.

    Blocks: it runs bubblewrap once, as a command would, to see that it works here
    (it needs user namespaces, which some systems restrict).
    """
    assert kind == "bwrap"
    path = shutil.which("bwrap")
    if path is None:
        return (
            "bubblewrap (bwrap) is not on the daemon's PATH; install it "
            "(e.g. apt install bubblewrap) or remove the key"
        )
    return _bwrap_problem(path)


@functools.cache
def _bwrap_problem(path: str) -> str | None:
    try:
        done = subprocess.run(
            [path, "--ro-bind", "/", "/", "--unshare-all", "--die-with-parent", "--", "true"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"bubblewrap cannot make a sandbox here ({exc})"
    if done.returncode != 0:
        said = done.stderr.decode(errors="replace").strip().splitlines() or [
            f"exit status {done.returncode}"
        ]
        return f"bubblewrap cannot make a sandbox here ({said[0].rstrip('.')})"
    return None


def bwrap_argv(cwd: str, *, network: bool, read_only: Sequence[str]) -> list[str]:
    """bubblewrap's command line, up to ``--``, for a command in ``cwd``.

    Everything is mounted read-only, then what holds other people's and the
    daemon's data is hidden under empty tmpfs: the homes, /tmp and the runtime
    directories (the daemon's socket, a desktop's). ``read_only`` paths come back
    readable, and the cwd writable, after those, so they show through.
    """
    hidden: list[str] = []
    for path in ("/home", "/root", os.environ.get("HOME"), "/tmp", "/var/tmp", "/run/user",
                 os.environ.get("XDG_RUNTIME_DIR")):  # fmt: skip
        if path and path != "/" and path not in hidden and os.path.isdir(path):
            hidden.append(path)
    argv = [shutil.which("bwrap") or "bwrap", "--ro-bind", "/", "/", "--dev", "/dev"]
    argv += ["--proc", "/proc"]
    for path in hidden:
        argv += ["--tmpfs", path]
    for path in read_only:
        argv += ["--ro-bind-try", path, path]
    argv += ["--bind", cwd, cwd, "--chdir", cwd, "--unshare-all"]
    if network:
        argv.append("--share-net")
    return [*argv, "--die-with-parent", "--new-session", "--"]


# --- the daemon's side of the reapers ----------------------------------------------


class _Keeper:
    """The daemon's reapers, and what a killed one left to the daemon.

    One per daemon process: being a subreaper is a property of the process.
    """

    def __init__(self) -> None:
        self.subreaper: bool | None = None  # None: not asked yet
        self.reapers: set[int] = set()
        # A reaper just started is the daemon's child before it is in `reapers`:
        # no sweep may run in between, or it would take the reaper for a stray.
        self.lock = trio.Lock()

    def reaping(self) -> bool:
        """Whether commands run under a reaper: Linux, with child subreapers."""
        if self.subreaper is None:
            self.subreaper = sys.platform == "linux" and _reaper.prctl(
                _reaper.PR_SET_CHILD_SUBREAPER, 1
            )
        return self.subreaper

    def sweep(self, since: int) -> None:
        """Kill and reap the daemon's children that no reaper owns, started at ``since`` or after.

        They can only be what a reaper killed outright kept (the daemon starts no
        other process); the start time spares anything older a host process has.
        Blocks: run it in a thread, holding ``lock``.
        """
        me = os.getpid()
        deadline = time.monotonic() + _reaper.REAP_S
        while time.monotonic() < deadline:
            table = _reaper.process_table()
            strays = [
                pid
                for pid, (parent, started) in table.items()
                if parent == me and pid not in self.reapers and started >= since
            ]
            if not strays:
                return
            for pid in strays:
                _reaper.signal_all([pid, *_reaper.descendants(pid, table)], signal.SIGKILL)
            for pid in strays:
                with suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
            time.sleep(0.01)  # in a worker thread: killed processes take a moment to die


_keeper = _Keeper()


def _boot_ticks() -> int:
    """Now, in /proc's start-time unit (clock ticks since boot), rounded down a tick."""
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * os.sysconf("SC_CLK_TCK")) - 1


# --- running a command --------------------------------------------------------------


class Tail:
    """The last ``cap`` bytes of a stream, and how many came in all."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.data = bytearray()
        self.total = 0

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        self.data += chunk
        if len(self.data) > self.cap:
            del self.data[: len(self.data) - self.cap]


async def _drain(stream: trio.lowlevel.FdStream, tail: Tail, scope: trio.CancelScope) -> None:
    with scope:
        async with stream:
            while chunk := await stream.receive_some(65536):
                tail.add(chunk)


def _signal_group(pgid: int, signum: int) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


async def _stop_reaper(proc: trio.Process) -> None:
    """run_process's deliver_cancel under a reaper: it ends the tree itself, given the grace."""
    proc.terminate()
    with trio.move_on_after(KILL_GRACE_S + 1.0):
        await proc.wait()
    proc.kill()


async def _stop_group(proc: trio.Process) -> None:
    """run_process's deliver_cancel without one: SIGTERM the group, SIGKILL after a grace."""
    _signal_group(proc.pid, signal.SIGTERM)
    await trio.sleep(KILL_GRACE_S)
    _signal_group(proc.pid, signal.SIGKILL)


async def run_contained(argv: list[str], *, cwd: str, env: Mapping[str, str], tail: Tail) -> int:
    """Run ``argv`` in ``cwd``, its output into ``tail``; its return code.

    When it ends, what it started dies with it. Cancelled (a timeout, a killed
    run), the command and everything it started are killed before this returns.
    """
    reaping = _keeper.reaping()
    if reaping:
        argv = [sys.executable, "-I", "-S", str(_REAPER), str(os.getpid()),
                f"{KILL_GRACE_S:g}", *argv]  # fmt: skip
    read_fd, write_fd = os.pipe()
    stream = trio.lowlevel.FdStream(read_fd)
    proc: trio.Process | None = None
    since = _boot_ticks() if reaping else 0
    try:
        async with trio.open_nursery() as nursery:
            drain = trio.CancelScope()
            nursery.start_soon(_drain, stream, tail, drain)
            async with _keeper.lock:
                proc = await nursery.start(
                    partial(
                        trio.run_process,
                        argv,
                        cwd=cwd,
                        env=dict(env),
                        stdin=subprocess.DEVNULL,
                        stdout=write_fd,
                        stderr=write_fd,
                        check=False,
                        # A terminal's Ctrl-C at the daemon is not the command's.
                        start_new_session=True,
                        deliver_cancel=_stop_reaper if reaping else _stop_group,
                    )
                )
                _keeper.reapers.add(proc.pid)
            os.close(write_fd)
            write_fd = -1
            await proc.wait()
            if not reaping:
                _signal_group(proc.pid, signal.SIGKILL)  # what it left in the background
            drain.deadline = trio.current_time() + _DRAIN_S
    finally:
        if write_fd >= 0:
            os.close(write_fd)
        if proc is not None:
            _keeper.reapers.discard(proc.pid)
            if not reaping:
                _signal_group(proc.pid, signal.SIGKILL)
            elif proc.returncode is None or proc.returncode < 0:
                # Killed outright, a reaper may have left its tree to the daemon.
                with trio.CancelScope(shield=True):
                    async with _keeper.lock:
                        await trio.to_thread.run_sync(_keeper.sweep, since)
    assert proc is not None and proc.returncode is not None
    return proc.returncode
