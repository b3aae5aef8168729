"""Waits with a deadline, each saying what it waited for when the deadline passes.

A test that waits for a frame, a run's end, a close or another process must
fail when that never comes, not hang until pytest-timeout (or CI's budget)
ends it with a stack dump. Every wait here raises an ``AssertionError`` that
names what was awaited, how long, and what came instead.

On trio's autojump clock a deadline costs no real time: a run that ignores its
own timeout fails at once instead of blocking forever.

The folder holding this module is on ``sys.path`` (pytest puts the rootdir
conftest's folder there), so any test imports it as ``from deadlines import ...``.
"""

from __future__ import annotations

import subprocess
import threading
from collections.abc import AsyncIterable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import trio
from chinwag.protocol import End

FRAME_S = 10.0  # one frame, answer or close from a daemon that is up
RUN_S = 30.0  # the rest of one run (the suite's /slow runs take a few seconds)
PROCESS_S = 10.0  # another process's state: a pid file, an exit, a reap

T = TypeVar("T")


@contextmanager
def deadline(seconds: float, what: str, seen: Callable[[], str] | None = None) -> Iterator[None]:
    """``trio.fail_after(seconds)`` that fails naming ``what`` (and ``seen()``, if given)."""
    try:
        with trio.fail_after(seconds):
            yield
    except trio.TooSlowError:
        detail = f"; meanwhile: {seen()}" if seen is not None else ""
        raise AssertionError(f"waited {seconds:g} s for {what}, in vain{detail}") from None


def describe(events: list[Any]) -> str:
    """What came, briefly: the types in order, a run of one type counted."""
    if not events:
        return "nothing"
    names: list[list[Any]] = []
    for event in events:
        name = type(event).__name__
        if names and names[-1][0] == name:
            names[-1][1] += 1
        else:
            names.append([name, 1])
    return ", ".join(name if n == 1 else f"{name} x{n}" for name, n in names)


async def collect(events: AsyncIterable[T], *, within: float = RUN_S, what: str = "") -> list[T]:
    """Every remaining event of a stream up to its end, within ``within`` seconds."""
    got: list[T] = []
    with deadline(within, what or "the end of the stream", lambda: describe(got)):
        async for event in events:
            got.append(event)
    return got


async def next_of(events: AsyncIterable[Any], kind: type[T], *, within: float = FRAME_S) -> T:
    """The next event of type ``kind`` (those before it are dropped), within ``within`` s."""
    skipped: list[Any] = []
    with deadline(within, f"a {kind.__name__} event", lambda: describe(skipped)):
        async for event in events:
            if isinstance(event, kind):
                return event
            skipped.append(event)
    raise AssertionError(f"the stream ended without a {kind.__name__}: {describe(skipped)}")


async def until(condition: Callable[[], bool], what: str, *, within: float = PROCESS_S) -> None:
    """Poll ``condition`` until it holds: for another process's state, which sends no event."""
    with deadline(within, what):
        while not condition():  # noqa: ASYNC110 -- another process's state: no event to await
            await trio.sleep(0.01)


async def next_event(events: AsyncIterable[T], *, within: float = FRAME_S) -> T:
    """The very next event of a stream, within ``within`` seconds."""
    with deadline(within, "the next event"):
        async for event in events:
            return event
    raise AssertionError("the stream ended where an event was awaited")


async def watch_until_end(subscription: AsyncIterable[Any], *, within: float = RUN_S) -> list[Any]:
    """A subscription's ``Event`` frames up to the first whose event ends a run."""
    seen: list[Any] = []
    what = "a run's end on the subscription"
    with deadline(within, what, lambda: describe([f.event for f in seen])):
        async for frame in subscription:
            seen.append(frame)
            if isinstance(frame.event, End):
                return seen
    raise AssertionError(f"the subscription ended before {what}")


@contextmanager
def killed_after(proc: subprocess.Popen[Any], seconds: float, what: str) -> Iterator[None]:
    """For a blocking read from a child process: kill it if the block is not done within
    ``seconds``, so that the read ends, and fail naming ``what`` the block waited for."""
    fired = threading.Event()

    def kill() -> None:
        fired.set()
        proc.kill()

    timer = threading.Timer(seconds, kill)
    timer.start()
    failure = AssertionError(f"waited {seconds:g} s for {what}, in vain; the process was killed")
    try:
        yield
    except Exception:
        if fired.is_set():
            raise failure from None
        raise
    finally:
        timer.cancel()
    if fired.is_set():
        raise failure
