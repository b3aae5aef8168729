"""Who a peer on the socket is: `descends_from` over real processes and /proc."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from chinwag.daemon._server import descends_from
from deadlines import killed_after

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")


@contextmanager
def child(*argv: str) -> Iterator[subprocess.Popen[bytes]]:
    """A child process that waits for its stdin to close (then ends)."""
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        with killed_after(proc, 15, "the child to say it runs"):
            assert proc.stdout.readline() == b"\n"  # it is running what it was told
        yield proc
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(10)


WAIT = "import sys; print(flush=True); sys.stdin.read()"
# A grandchild: the child starts one, says so once it runs, then both wait.
GRANDCHILD = (
    "import subprocess, sys; "
    "p = subprocess.Popen([sys.executable, '-c', sys.argv[1]], stdin=sys.stdin, stdout=sys.stdout);"
    " p.wait()"
)


def test_a_child_and_a_grandchild_descend_and_a_parent_does_not() -> None:
    me = os.getpid()
    with child(sys.executable, "-c", WAIT) as proc:
        assert descends_from(proc.pid, me)
    with child(sys.executable, "-c", GRANDCHILD, WAIT) as proc:
        (grandchild,) = _children(proc.pid)
        assert descends_from(grandchild, me)
        assert descends_from(grandchild, proc.pid)
        assert not descends_from(proc.pid, grandchild)
    assert not descends_from(me, me)  # itself: not its own descendant
    assert not descends_from(os.getppid(), me)  # its parent is not


def test_a_name_made_to_look_like_more_fields_fools_nothing() -> None:
    # /proc/PID/stat puts the command's name in parentheses, and the name may hold
    # ") S 1 (": the parent's pid is read after the last ")".
    rename = "open('/proc/self/comm', 'w').write(') S 1 ('); " + WAIT
    with child(sys.executable, "-c", rename) as proc:
        with open(f"/proc/{proc.pid}/comm") as comm:
            assert comm.read().strip() == ") S 1 ("
        assert descends_from(proc.pid, os.getpid())


def test_what_cannot_be_told_counts_as_a_descendant() -> None:
    with child(sys.executable, "-c", WAIT) as proc:
        gone = proc.pid
    assert descends_from(gone, os.getpid()), "a peer gone since it connected"


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as children:
        return [int(p) for p in children.read().split()]
