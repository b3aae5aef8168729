"""The reaper: the small process each `run_command` runs under, on Linux.

    python -I -S _reaper.py DAEMON_PID GRACE_S ARGV...

It makes itself a child subreaper, so whatever the command starts stays its
descendant: an orphan (a child started with `setsid`, say, whose parent has
exited) comes to it, not to init. It runs ARGV as its child with a parent-death
signal, and watches the daemon through a pidfd. When the command exits, what it
left is killed; on SIGTERM (the daemon's timeout or kill) the whole tree gets
SIGTERM, then SIGKILL after GRACE_S; when the daemon dies, even by kill -9, the
tree is killed at once. Then it exits as the command did.

Why a process of its own rather than a ``preexec_fn`` in the daemon: trio starts
a process from a worker thread, and the parent-death signal fires when the
*thread* that forked exits (trio retires idle workers after 10 s), not the
process; ``preexec_fn`` is also unsafe in a process with threads; and only a
process that outlives the daemon can clean up after a kill -9.

It runs as a script with ``-I -S``, so it imports the standard library only (and
starts in about 15 ms); the daemon imports it for `descendants`.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import sys
import time

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_CHILD_SUBREAPER = 36
# How long killed processes may take to be reaped before the reaper leaves them
# to the daemon (which is a subreaper too): only a process stuck in the kernel
# (uninterruptible sleep) takes longer.
REAP_S = 10.0


def prctl(option: int, value: int) -> bool:
    """``prctl(option, value)``; False where it failed (or there is no prctl: not Linux)."""
    try:
        call = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return False
    call.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    return int(call(option, value, 0, 0, 0)) == 0


def stat_fields(pid: int | str) -> list[bytes]:
    """The fields of ``/proc/PID/stat`` after the command name, the state first (so
    the parent's pid is ``[1]``); OSError once the process is gone."""
    with open(f"/proc/{pid}/stat", "rb") as file:
        stat = file.read()
    # The command name, in parentheses, may hold anything: the fields follow the last ')'.
    return stat.rpartition(b")")[2].split()


def process_table() -> dict[int, tuple[int, int]]:
    """Every process's ``(parent pid, start time in clock ticks since boot)``, from /proc."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            fields = stat_fields(name)
        except OSError:  # it has just exited
            continue
        table[int(name)] = (int(fields[1]), int(fields[19]))
    return table


def descendants(pid: int, table: dict[int, tuple[int, int]] | None = None) -> list[int]:
    """The processes below ``pid``, parents before their children."""
    children: dict[int, list[int]] = {}
    for child, (parent, _) in (process_table() if table is None else table).items():
        children.setdefault(parent, []).append(child)
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def signal_all(pids: list[int], signum: int) -> None:
    for pid in pids:
        try:  # noqa: SIM105 -- contextlib costs the reaper's start 2 ms of imports
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


class Reaper:
    def __init__(self, daemon_pid: int, grace_s: float, argv: list[str]) -> None:
        self.daemon_pid, self.grace_s, self.argv = daemon_pid, grace_s, argv
        self.me = os.getpid()
        self.command = 0  # the command's pid
        self.status: int | None = None  # its wait status, once reaped
        self.stop: int | None = None  # the signal that asked the reaper to stop
        self.wake, wake_w = os.pipe()
        os.set_blocking(self.wake, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._asked_to_stop)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # so that SIGCHLD wakes the poll
        self.poll = select.poll()
        self.poll.register(self.wake, select.POLLIN)
        self.lifeline: int | None = None
        try:
            self.lifeline = os.pidfd_open(daemon_pid)
            self.poll.register(self.lifeline, select.POLLIN)
        except (AttributeError, OSError):  # no pidfd (Linux < 5.3): getppid every second
            pass

    def _asked_to_stop(self, signum: int, _frame: object) -> None:
        self.stop = signum

    def daemon_gone(self) -> bool:
        # Reparenting happens as the parent exits, before anything else can see it gone.
        return os.getppid() != self.daemon_pid

    def run(self) -> int:
        if self.daemon_gone():
            return 128 + signal.SIGKILL
        self.command = os.fork()
        if self.command == 0:
            self._become_the_command()
        try:
            if self._wait_for_an_end() == "stopped":
                self._terminate()
        finally:
            self._end_everything()
        return self._exit_as_the_command()

    def _become_the_command(self) -> None:
        try:
            signal.set_wakeup_fd(-1)
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
                signal.signal(signum, signal.SIG_DFL)
            for name in ("SIGPIPE", "SIGXFSZ"):  # what Python ignores, a command expects
                if hasattr(signal, name):
                    signal.signal(getattr(signal, name), signal.SIG_DFL)
            prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != self.me:  # the reaper died before the line above
                os._exit(128 + signal.SIGKILL)
            os.execvp(self.argv[0], self.argv)
        except OSError as exc:
            os.write(2, f"chinwag: cannot run {self.argv[0]}: {exc.strerror}\n".encode())
        finally:
            os._exit(127)

    def _reap(self) -> bool:
        """Reap every child that has exited; True when there is no child left."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return True
            if pid == 0:
                return False
            if pid == self.command:
                self.status = status

    def _drain_wake(self) -> None:
        try:
            while os.read(self.wake, 512):
                pass
        except BlockingIOError:
            pass

    def _wait_for_an_end(self) -> str:
        while True:
            self._reap()
            if self.status is not None:
                return "exited"
            if self.stop is not None:
                return "stopped"
            if self.daemon_gone():
                return "orphaned"
            self.poll.poll(None if self.lifeline is not None else 1000)
            self._drain_wake()

    def _terminate(self) -> None:
        """SIGTERM to the whole tree; wait until it is gone, at most the grace period."""
        signal_all(descendants(self.me), signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        while not self._reap() and (left := deadline - time.monotonic()) > 0:
            if self.daemon_gone():
                return
            self.poll.poll(min(left, 0.05) * 1000)
            self._drain_wake()

    def _end_everything(self) -> None:
        """SIGKILL every descendant, and reap them as they come, until none is left."""
        deadline = time.monotonic() + REAP_S
        # A subreaper without children has no descendants: most commands leave none.
        while not self._reap() and time.monotonic() < deadline:
            signal_all(descendants(self.me), signal.SIGKILL)
            self.poll.poll(20)
            self._drain_wake()

    def _exit_as_the_command(self) -> int:
        status = self.status
        if status is None:
            return 128 + signal.SIGKILL
        if os.WIFSIGNALED(status):
            signum = os.WTERMSIG(status)
            prctl(PR_SET_DUMPABLE, 0)  # no core file of the reaper for a command's crash
            signal.signal(signum, signal.SIG_DFL)
            os.kill(self.me, signum)
            return 128 + signum  # a signal that does not end a process
        return os.waitstatus_to_exitcode(status)


def main(args: list[str]) -> int:
    daemon_pid, grace_s, *argv = args
    if not argv or not prctl(PR_SET_CHILD_SUBREAPER, 1):
        os.write(2, b"chinwag: the reaper needs Linux's child subreapers and a command\n")
        return 127
    return Reaper(int(daemon_pid), float(grace_s), argv).run()


if __name__ == "__main__":
    # Nothing is buffered (only os.write): skip the interpreter's teardown, a few ms a command.
    os._exit(main(sys.argv[1:]))
