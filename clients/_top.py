"""`chinwag top`: a live view of the daemon, from what the daemon says, never from storage.

Two sources feed it: one `subscribe` request (every run's events, from its
`start` to its `end`) and a `stats` request every `--refresh` seconds.
`DaemonState` is the model they feed: runs in flight, the last runs that
ended `error`, the latest `stats`, and whether the daemon is reachable; it
knows nothing of terminals. `TopView` draws it with rich, `show_top` runs
the lot in a `rich.live.Live` on the alternate screen.

A subscription sees only the runs that start after it, so a run begun before
top connected is counted in `stats` (runs in flight) but not listed.

When the daemon goes away (stopped, restarted, crashed) top says so on the
screen and connects again every `--refresh` seconds, as a monitor left open
is expected to; `q` or Ctrl-C quits, with status 0. Only the first connection
failing (no daemon, an unknown `--agent`) fails the command, in one line.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import termios
import time
import tty
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime

import anyio
import anyio.abc
from chinwag.protocol import (
    AskUser,
    End,
    Event,
    Start,
    Stats,
    TextDelta,
    ThinkingDelta,
    ToolCall,
    ToolResult,
    Usage,
)
from rich.console import Console, ConsoleOptions, JustifyMethod, RenderableType, RenderResult
from rich.live import Live
from rich.table import Table
from rich.text import Text

from ._client import ChinwagError, Client, ConnectionLost, connect_explained, leaves
from ._render import _amount, _duration
from ._settings import CLIENT_NAME, Failure, Settings, describe

#: The runs that ended `error` that top keeps, newest first.
RECENT_ERRORS = 5
# Output not (yet) counted by a `usage` report is guessed from the text's length,
# with the daemon's own guess for compaction (daemon/_compaction.py).
_CHARS_PER_TOKEN = 4
# A run's tokens/s are shown from its first second on: over less, a model call
# reported at once (a tool call's single token) reads as thousands a second.
_RATE_AFTER_S = 1.0
# On a short screen the runs in flight keep this many lines (or all of them, if fewer)
# before the recent errors take any: what is running now matters more than what failed.
_RUNS_KEPT = 3


# --- the model --------------------------------------------------------------------------


@dataclass
class _Run:
    """A run in flight, as its events tell it."""

    agent: str  # the conversation's
    sender: str
    speaker: str  # who answers: the agent, or the guest of a guest turn
    started: float
    phase: str = "waiting"  # for the model; "thinking" or "writing" once it streams
    tools: dict[str, str] = field(default_factory=dict)  # open calls: call_id -> tool
    asking: bool = False
    reported_tokens: int = 0  # output tokens the model's `usage` events reported
    streamed_chars: int = 0  # text and thinking streamed since the last report

    @property
    def state(self) -> str:
        if self.asking:
            return "asking"
        if self.tools:
            first, *others = self.tools.values()
            return f"tool {first}" + (f" +{len(others)}" if others else "")
        return self.phase


@dataclass(frozen=True)
class RunRow:
    """A run in flight, as top lists it."""

    run_id: str
    agent: str  # "agent (guest)" on a guest turn
    sender: str
    state: str  # waiting, thinking, writing, tool NAME, asking
    elapsed_s: float
    # Output tokens a second over the run so far: the model's `usage` reports,
    # plus a guess for the text streamed since the last one (then ``estimated``).
    # None in the run's first second, and while it has no output.
    tokens_per_s: float | None
    estimated: bool


@dataclass(frozen=True)
class RunFailure:
    """A run that ended `error`."""

    agent: str
    sender: str
    code: int | None
    message: str
    at: float  # time.time() when its `end` came


class DaemonState:
    """What top knows of the daemon: fed `subscribe`'s events and `stats` replies.

    Times are ``time.time()`` seconds, passed in, so that tests set them.
    """

    def __init__(self, recent_errors: int = RECENT_ERRORS) -> None:
        self._runs: dict[str, _Run] = {}
        self.errors: deque[RunFailure] = deque(maxlen=recent_errors)  # newest first
        self.stats: Stats | None = None  # the latest reply; None while the daemon is away
        self.lost: str | None = None  # why it is away: the last attempt's failure
        self.lost_at: float | None = None  # since when
        self.gone = True  # the daemon went away; else it ended the subscription (a slow one)

    def connected(self, stats: Stats) -> None:
        """A new subscription stands: the runs followed before it may have ended unseen."""
        self._runs.clear()
        self.stats = stats
        self.lost = self.lost_at = None

    def disconnected(self, reason: str, now: float, *, gone: bool = True) -> None:
        """The daemon went away (or is still away: ``reason`` is the latest attempt's);
        not ``gone``, it is there but refused or ended the subscription (dropped as slow)."""
        self._runs.clear()
        self.stats = None
        if self.lost_at is None:
            self.lost_at = now
        self.lost = reason
        self.gone = gone

    def feed(self, frame: Event, now: float) -> None:
        """One event of a run, as the subscription brought it."""
        event = frame.event
        if isinstance(event, Start):
            self._runs[frame.run_id] = _Run(frame.agent, frame.sender, event.agent, now)
            return
        if isinstance(event, End):
            self._runs.pop(frame.run_id, None)
            if event.status == "error":
                error = event.error
                self.errors.appendleft(
                    RunFailure(
                        frame.agent,
                        frame.sender,
                        error.code if error else None,
                        error.message if error else "",
                        now,
                    )
                )
            return
        run = self._runs.get(frame.run_id)
        if run is None:
            return
        match event:
            case TextDelta(delta=delta):
                run.phase = "writing"
                run.streamed_chars += len(delta)
            case ThinkingDelta(delta=delta):
                run.phase = "thinking"
                run.streamed_chars += len(delta)
            case ToolCall(call_id=call_id, name=name):
                run.tools[call_id] = name
            case ToolResult(call_id=call_id):
                if run.tools.pop(call_id, None) == "ask_user":
                    run.asking = False
                if not run.tools:
                    run.phase = "waiting"  # the results go back to the model
            case AskUser():
                run.asking = True
            case Usage(completion_tokens=tokens):
                run.reported_tokens += tokens
                run.streamed_chars = 0  # counted now
            case _:
                pass  # a title: nothing top shows

    def rows(self, now: float) -> list[RunRow]:
        """The runs in flight, oldest first."""
        return [self._row(run_id, run, now) for run_id, run in self._runs.items()]

    @staticmethod
    def _row(run_id: str, run: _Run, now: float) -> RunRow:
        elapsed = max(0.0, now - run.started)
        tokens = run.reported_tokens + run.streamed_chars / _CHARS_PER_TOKEN
        rate = tokens / elapsed if tokens and elapsed >= _RATE_AFTER_S else None
        agent = run.agent if run.speaker == run.agent else f"{run.agent} ({run.speaker})"
        return RunRow(
            run_id,
            agent,
            run.sender,
            run.state,
            elapsed,
            rate,
            estimated=run.streamed_chars > 0,
        )


# --- the view ---------------------------------------------------------------------------


class TopView:
    """`DaemonState` drawn to fit the console's width and height, at each redraw."""

    def __init__(
        self,
        state: DaemonState,
        *,
        agent: str | None = None,
        refresh: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.state = state
        self.agent = agent
        self.refresh = refresh
        self.clock = clock

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        now = self.clock()
        # Below the heading (3 lines), above the footer (a blank line and "q quits").
        left = (options.height or console.height) - 5
        state = self.state
        stats = state.stats
        errors = list(state.errors)
        yield _line(self._heading(stats))
        if stats is None:
            since = _clock_time(state.lost_at or now)
            what = "the daemon went away" if state.gone else "the daemon ended the subscription"
            again = f"trying again every {self.refresh:g} s"
            yield _line(Text(f"{what} at {since}; {again}", style="bold red"))
            yield Text()
            why = Text(state.lost or "", style="red")  # wrapped: it names the socket
            yield why
            errors = _fitting(errors, left - len(why.wrap(console, options.max_width)))
        else:
            yield _line(_counts(stats))
            yield Text()
            # The runs' header and their first few come before the errors, which take
            # what is left of the screen; the runs then take the rest, at least one line.
            rows = state.rows(now)
            kept = 1 + min(len(rows), _RUNS_KEPT) if rows else 1  # "no run ..." alone
            errors = _fitting(errors, left - kept)
            room = max(1, left - 1 - (len(errors) + 2 if errors else 0))
            yield from _runs(rows, room)
        if errors:
            yield Text()
            yield _line(Text("recent errors", style="bold red"))
            yield _errors_table(errors)
        yield Text()
        yield _line(Text("q quits", style="dim"))

    def _heading(self, stats: Stats | None) -> Text:
        text = Text("chinwag top", style="bold")
        if self.agent is not None:
            text.append(f" · agent {self.agent}")
        if stats is not None:
            text.append(f" · up {_duration(stats.uptime_s)}")
            text.append(f" · connections {stats.connections} · subscriptions {stats.subscriptions}")
        return text


def _fitting(errors: list[RunFailure], lines: int) -> list[RunFailure]:
    """The newest of ``errors`` that fit in ``lines``, their block's blank line and title
    included: none when not even one does."""
    return errors[: max(0, lines - 2)]


def _counts(stats: Stats) -> Text:
    return Text(
        f"runs {stats.runs_in_flight} in flight · {stats.runs_queued} queued · "
        f"{_amount(stats.runs_total)} total · tokens {_amount(stats.tokens_in)} in, "
        f"{_amount(stats.tokens_out)} out"
    )


def _runs(rows: list[RunRow], room: int) -> Iterator[RenderableType]:
    """The runs in flight in ``room`` lines at most (their header aside)."""
    if not rows:
        yield _line(Text("no run started since top connected is in flight", style="dim"))
        return
    shown = rows if len(rows) <= room else rows[: room - 1]
    yield _runs_table(shown)
    if len(shown) < len(rows):
        yield _line(Text(f"+{len(rows) - len(shown)} more", style="dim"))


def _line(text: Text) -> Text:
    """One line, cut with an ellipsis at the screen's edge."""
    text.no_wrap = True
    text.overflow = "ellipsis"
    return text


def _table() -> Table:
    return Table(box=None, expand=True, pad_edge=False, header_style="bold")


def _column(
    table: Table,
    name: str,
    *,
    ratio: int | None = None,
    width: int | None = None,
    min_width: int | None = None,
    justify: JustifyMethod = "left",
) -> None:
    """A column of one-line cells, cut with an ellipsis."""
    table.add_column(
        name,
        ratio=ratio,
        width=width,
        min_width=min_width,
        justify=justify,
        no_wrap=True,
        overflow="ellipsis",
    )


def _runs_table(rows: list[RunRow]) -> Table:
    table = _table()
    _column(table, "agent", ratio=2, min_width=5)
    _column(table, "sender", ratio=3, min_width=6)
    _column(table, "state", ratio=2, min_width=7)
    _column(table, "elapsed", justify="right", width=7)
    _column(table, "tok/s", justify="right", width=6)
    for row in rows:
        if row.tokens_per_s is None:
            rate = Text("-", style="dim")
        else:
            rate = Text(f"{'~' if row.estimated else ''}{row.tokens_per_s:.1f}")
        table.add_row(row.agent, row.sender, row.state, _elapsed(row.elapsed_s), rate)
    return table


def _errors_table(errors: list[RunFailure]) -> Table:
    table = _table()
    table.show_header = False
    _column(table, "when", width=8)
    _column(table, "agent", ratio=2, min_width=5)
    _column(table, "sender", ratio=2, min_width=6)
    _column(table, "code", width=3)
    _column(table, "message", ratio=5, min_width=10)
    for failure in errors:
        code = "" if failure.code is None else str(failure.code)
        message = " ".join(failure.message.split())  # one line
        table.add_row(_clock_time(failure.at), failure.agent, failure.sender, code, message)
    return table


def _elapsed(seconds: float) -> str:
    """m:ss, or h:mm:ss from an hour on."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02}:{secs:02}" if hours else f"{minutes}:{secs:02}"


def _clock_time(moment: float) -> str:
    return datetime.fromtimestamp(moment).strftime("%H:%M:%S")


# --- running it ---------------------------------------------------------------------------


async def show_top(settings: Settings, *, agent: str | None, refresh: float) -> None:
    """Draw the daemon live until `q`, Ctrl-C or SIGTERM.

    Raises ``Failure`` when stdout is not a terminal, or when the first
    connection or subscription fails.
    """
    console = Console(highlight=False)
    if not console.is_terminal:
        raise Failure("top draws on a terminal, and stdout is not one")
    state = DaemonState()
    follower = _Follower(settings, state, agent, refresh)
    async with anyio.create_task_group() as tasks:
        await tasks.start(follower.follow)
        view = TopView(state, agent=agent, refresh=refresh)
        with (
            anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals,
            _keys_unbuffered() as keys_fd,
            Live(
                view,
                console=console,
                screen=True,
                auto_refresh=False,
                redirect_stdout=False,
                redirect_stderr=False,
            ) as live,
        ):
            tasks.start_soon(_redraw, live, refresh)
            if keys_fd is not None:
                tasks.start_soon(_quit_on_q, keys_fd, tasks.cancel_scope)
            async for _ in signals:
                break
            tasks.cancel_scope.cancel()


class _Follower:
    """The daemon's events and stats into ``state``, over one connection after another."""

    def __init__(
        self, settings: Settings, state: DaemonState, agent: str | None, refresh: float
    ) -> None:
        self.settings = settings
        self.state = state
        self.agent = agent
        self.refresh = refresh

    async def follow(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Follow for good; started once the first subscription stands.

        Raises ``Failure`` if that first one fails: top then never draws.
        """
        started = False

        def subscribed(stats: Stats) -> None:
            nonlocal started
            self.state.connected(stats)
            if not started:
                started = True
                task_status.started()

        while True:
            lost = await self._connection(subscribed)
            if not started:
                raise Failure(describe(lost))
            gone = isinstance(lost, ConnectionLost)
            self.state.disconnected(describe(lost), time.time(), gone=gone)
            await anyio.sleep(self.refresh)  # then try again

    async def _connection(self, subscribed: Callable[[Stats], None]) -> ChinwagError:
        """Follow over one connection until it fails; returns what failed."""
        lost: ChinwagError | None = None
        try:
            async with (
                connect_explained(self.settings.target, client=CLIENT_NAME) as client,
                client.subscribe(self.agent) as events,
                anyio.create_task_group() as tasks,
            ):
                # Subscribed first: no run starts unseen between the two.
                subscribed(await client.stats())
                tasks.start_soon(self._poll_stats, client)
                async for frame in events:
                    self.state.feed(frame, time.time())
                tasks.cancel_scope.cancel()
        except* ChinwagError as group:
            lost = next(leaf for leaf in leaves(group) if isinstance(leaf, ChinwagError))
        return lost or ConnectionLost("The daemon ended the subscription.")

    async def _poll_stats(self, client: Client) -> None:
        while True:
            await anyio.sleep(self.refresh)
            self.state.stats = await client.stats()


async def _redraw(live: Live, refresh: float) -> None:
    while True:
        await anyio.sleep(refresh)
        live.refresh()


@contextlib.contextmanager
def _keys_unbuffered() -> Iterator[int | None]:
    """stdin's terminal in cbreak mode (a key arrives when pressed, unechoed; Ctrl-C and
    Ctrl-Z still signal), restored on the way out; yields its fd, None when stdin is
    not a terminal (then only a signal quits)."""
    fd = sys.stdin.fileno() if sys.stdin is not None else -1
    if fd < 0 or not os.isatty(fd):
        yield None
        return
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)
    try:
        yield fd
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


async def _quit_on_q(fd: int, scope: anyio.CancelScope) -> None:
    while True:
        await anyio.wait_readable(fd)
        keys = os.read(fd, 64)
        if not keys:
            return  # input ended: only a signal quits now
        if b"q" in keys.lower():
            scope.cancel()
            return
