"""`chinwag top`'s model of the daemon, fed events and stats, and its drawing at 80x24.

No terminal and no daemon: events go in, rows and lines come out, at the times the
test gives. The real command on a pseudo-terminal is in test_cli_top.py.
"""

from __future__ import annotations

import io

from chinwag.clients._top import DaemonState, RunFailure, TopView
from chinwag.protocol import (
    AskQuestion,
    AskUser,
    End,
    ErrorInfo,
    Event,
    Start,
    Stats,
    StreamEventMsg,
    TextDelta,
    ThinkingDelta,
    Title,
    ToolCall,
    ToolResult,
    Usage,
)
from rich.console import Console

T0 = 1_700_000_000.0  # when the runs start, in time.time() seconds


def frame(event: StreamEventMsg, run_id: str = "r1", sender: str = "alice") -> Event:
    return Event(id=1, agent="assistant", sender=sender, run_id=run_id, event=event)


def start(state: DaemonState, run_id: str = "r1", sender: str = "alice", at: float = T0) -> None:
    state.feed(frame(Start(run_id=run_id, agent="assistant", seq=1), run_id, sender), at)


def end(
    state: DaemonState,
    run_id: str = "r1",
    *,
    status: str = "done",
    error: ErrorInfo | None = None,
    sender: str = "alice",
    at: float = T0,
) -> None:
    event = End(status=status, error=error, last_seq=2)  # type: ignore[arg-type]
    state.feed(frame(event, run_id, sender), at)


def usage(completion_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=10,
        completion_tokens=completion_tokens,
        context_tokens=10,
        context_window=1000,
    )


def stats(**fields: int) -> Stats:
    return Stats(id=1, uptime_s=3725.0, connections=2, conversations=1, runs_in_flight=1, **fields)


def test_a_started_run_is_listed_with_its_agent_sender_and_elapsed_time() -> None:
    state = DaemonState()
    start(state, at=T0)
    [row] = state.rows(T0 + 12.5)
    assert (row.run_id, row.agent, row.sender, row.state) == ("r1", "assistant", "alice", "waiting")
    assert row.elapsed_s == 12.5
    assert row.tokens_per_s is None  # nothing streamed yet: nothing to measure


def test_the_state_follows_the_events() -> None:
    state = DaemonState()
    start(state)
    steps: list[tuple[StreamEventMsg, str]] = [
        (ThinkingDelta(delta="hmm"), "thinking"),
        (TextDelta(delta="Let me look"), "writing"),
        (ToolCall(call_id="c1", name="read_file", arguments="{}"), "tool read_file"),
        (ToolCall(call_id="c2", name="list_dir", arguments="{}"), "tool read_file +1"),
        (ToolResult(call_id="c1", output="", is_error=False, duration_ms=1.0), "tool list_dir"),
        (ToolResult(call_id="c2", output="", is_error=False, duration_ms=1.0), "waiting"),
        (Title(title="a title"), "waiting"),
        (ToolCall(call_id="c3", name="ask_user", arguments="{}"), "tool ask_user"),
        (AskUser(ask_id="a1", questions=[AskQuestion(question="Which?")]), "asking"),
        (ToolCall(call_id="c4", name="read_file", arguments="{}"), "asking"),
        # Another tool's result does not answer the question; the ask's own does.
        (ToolResult(call_id="c4", output="", is_error=False, duration_ms=1.0), "asking"),
        (ToolResult(call_id="c3", output="teal", is_error=False, duration_ms=1.0), "waiting"),
        (TextDelta(delta="teal"), "writing"),
    ]
    for event, expected in steps:
        state.feed(frame(event), T0 + 1)
        [row] = state.rows(T0 + 1)
        assert row.state == expected, event


def test_tokens_per_second_come_from_usage_when_the_model_reports_it() -> None:
    state = DaemonState()
    start(state, at=T0)
    state.feed(frame(TextDelta(delta="x" * 400)), T0 + 1)  # a guess of 100 tokens, replaced
    state.feed(frame(usage(30)), T0 + 3)
    [row] = state.rows(T0 + 3)
    assert (row.tokens_per_s, row.estimated) == (10.0, False)
    assert state.rows(T0 + 6)[0].tokens_per_s == 5.0  # over the run: a pause lowers it
    # Text streamed since the report is guessed, until the next report counts it.
    state.feed(frame(TextDelta(delta="y" * 40)), T0 + 6)
    [row] = state.rows(T0 + 8)
    assert (row.tokens_per_s, row.estimated) == (40 / 8, True)
    state.feed(frame(usage(18)), T0 + 8)
    [row] = state.rows(T0 + 8)
    assert (row.tokens_per_s, row.estimated) == (48 / 8, False)


def test_tokens_per_second_are_estimated_from_the_text_without_usage() -> None:
    state = DaemonState()
    start(state, at=T0)
    state.feed(frame(ThinkingDelta(delta="a" * 40)), T0 + 0.5)
    state.feed(frame(TextDelta(delta="b" * 40)), T0 + 0.8)
    # Not in the run's first second: a rate over less is noise.
    assert state.rows(T0 + 0.9)[0].tokens_per_s is None
    [row] = state.rows(T0 + 2)
    # 80 characters at 4 a token, over the 2 s since the start.
    assert (row.tokens_per_s, row.estimated) == (10.0, True)
    assert state.rows(T0 + 4)[0].tokens_per_s == 5.0


def test_a_tool_call_reported_at_once_is_no_burst_of_tokens() -> None:
    state = DaemonState()
    start(state, at=T0)
    state.feed(frame(usage(1)), T0 + 0.001)
    state.feed(frame(ToolCall(call_id="c1", name="ask_user", arguments="{}")), T0 + 0.001)
    assert state.rows(T0 + 0.2)[0].tokens_per_s is None
    assert state.rows(T0 + 2)[0].tokens_per_s == 0.5


def test_a_run_that_ends_leaves_the_table_and_an_error_is_remembered() -> None:
    state = DaemonState()
    start(state, "r1", "alice", at=T0)
    start(state, "r2", "bob", at=T0 + 1)
    start(state, "r3", "carol", at=T0 + 2)
    assert [row.sender for row in state.rows(T0 + 3)] == ["alice", "bob", "carol"]
    end(state, "r2", sender="bob", at=T0 + 4)
    end(state, "r1", status="killed", sender="alice", at=T0 + 4)
    assert [row.sender for row in state.rows(T0 + 5)] == ["carol"]
    assert list(state.errors) == []  # done and killed are no errors
    failure = ErrorInfo(code=502, message="the provider failed")
    end(state, "r3", status="error", error=failure, sender="carol", at=T0 + 6)
    assert state.rows(T0 + 7) == []
    assert list(state.errors) == [
        RunFailure("assistant", "carol", 502, "the provider failed", T0 + 6)
    ]


def test_the_recent_errors_are_capped_newest_first() -> None:
    state = DaemonState(recent_errors=3)
    for number in range(5):
        run_id = f"r{number}"
        start(state, run_id, f"s{number}")
        end(state, run_id, status="error", error=ErrorInfo(code=500, message=f"failure {number}"),
            sender=f"s{number}", at=T0 + number)  # fmt: skip
    assert [failure.message for failure in state.errors] == ["failure 4", "failure 3", "failure 2"]


def test_a_guest_turn_names_the_guest_beside_the_agent() -> None:
    state = DaemonState()
    state.feed(frame(Start(run_id="r1", agent="helper", seq=1)), T0)
    assert state.rows(T0)[0].agent == "assistant (helper)"


def test_a_new_connection_forgets_the_runs_and_keeps_the_errors() -> None:
    state = DaemonState()
    state.connected(stats())
    start(state, "r1")
    end(state, "r0", status="error", error=ErrorInfo(code=500, message="m"))
    state.disconnected("no daemon is listening", T0 + 5)
    assert state.stats is None and state.rows(T0 + 5) == []
    state.disconnected("still nobody", T0 + 6)
    assert (state.lost, state.lost_at) == ("still nobody", T0 + 5)  # away since the first
    # Its end was lost with the connection: a run seen before does not come back.
    state.connected(stats(runs_total=3))
    assert state.rows(T0 + 7) == [] and state.lost is None and state.lost_at is None
    assert state.stats is not None and state.stats.runs_total == 3
    assert [failure.message for failure in state.errors] == ["m"]


def draw(view: TopView, width: int = 80, height: int = 24) -> list[str]:
    console = Console(file=io.StringIO(), width=width, height=height, color_system=None)
    console.print(view)
    text = console.file.getvalue()  # type: ignore[attr-defined]
    return [line.rstrip() for line in text.splitlines()]


def test_the_view_fits_80_by_24_however_much_there_is() -> None:
    state = DaemonState()
    state.connected(stats(runs_queued=4, runs_total=12345, tokens_in=1_234_567, tokens_out=98_765))
    for number in range(30):
        sender = f"tg:{number}-a-sender-name-longer-than-any-column-could-ever-hold"
        start(state, f"r{number}", sender, at=T0)
    state.feed(frame(TextDelta(delta="x" * 149_000), "r0"), T0 + 1)
    for number in range(5):
        end(state, f"gone{number}", status="error", sender="bob", at=T0,
            error=ErrorInfo(code=502, message="a provider error " * 20))  # fmt: skip
    lines = draw(TopView(state, clock=lambda: T0 + 3725))
    assert len(lines) <= 24 and all(len(line) <= 80 for line in lines), "\n".join(lines)
    assert lines[0] == "chinwag top · up 1h · connections 2 · subscriptions 0"
    assert lines[1] == "runs 1 in flight · 4 queued · 12k total · tokens 1.2M in, 98k out"
    first = next(line for line in lines if line.startswith("assistant"))
    assert "tg:0-a-sender" in first and "…" in first  # cut, not wrapped
    assert first.split()[-3:] == ["writing", "1:02:05", "~10.0"]  # 37,250 tokens in 3725 s
    # Every error is there, one line each; the runs that do not fit are counted.
    assert sum("502" in line for line in lines) == 5
    more = [line for line in lines if line.startswith("+")]
    listed = sum(line.startswith("assistant") for line in lines)
    assert more and int(more[0].split()[0]) + listed == 30


def test_the_view_says_when_the_daemon_went_away() -> None:
    state = DaemonState()
    state.connected(stats())
    state.disconnected("no daemon is listening on /run/chinwag.sock", T0)
    lines = draw(TopView(state, agent="assistant", refresh=2.0, clock=lambda: T0 + 10))
    assert lines[0] == "chinwag top · agent assistant"
    assert lines[1].startswith("the daemon went away at ")
    assert lines[1].endswith("; trying again every 2 s")
    assert "no daemon is listening on /run/chinwag.sock" in lines


def test_the_view_says_when_the_daemon_ended_the_subscription() -> None:
    state = DaemonState()
    state.connected(stats())
    slow = "error 429: The subscription fell too far behind and was dropped."
    state.disconnected(slow, T0, gone=False)
    lines = draw(TopView(state, refresh=2.0, clock=lambda: T0 + 10))
    assert lines[1].startswith("the daemon ended the subscription at ")
    assert lines[1].endswith("; trying again every 2 s")
    assert slow in lines


def test_on_a_short_screen_the_runs_in_flight_come_before_the_recent_errors() -> None:
    state = DaemonState()
    state.connected(stats(runs_queued=1))
    for number in range(3):
        start(state, f"r{number}", f"s{number}")
    for number in range(5):
        end(state, f"gone{number}", status="error", sender="bob",
            error=ErrorInfo(code=502, message="boom"))  # fmt: skip
    lines = draw(TopView(state, clock=lambda: T0 + 5), width=40, height=10)
    assert len(lines) <= 10, "\n".join(lines)
    assert [line.split()[1] for line in lines if line.startswith("assis")] == ["s0", "s1", "s2"]
    assert lines[-1] == "q quits"
    # With room for some of the errors, they take it, the newest first.
    lines = draw(TopView(state, clock=lambda: T0 + 5), width=40, height=13)
    assert len(lines) <= 13 and lines[-1] == "q quits", "\n".join(lines)
    assert sum(line.startswith("assis") for line in lines) == 3
    assert sum("502" in line for line in lines) == 2


def test_while_the_daemon_is_away_the_errors_fit_below_why() -> None:
    state = DaemonState()
    for number in range(5):
        end(state, f"gone{number}", status="error", sender="bob",
            error=ErrorInfo(code=502, message="boom"))  # fmt: skip
    state.disconnected("no daemon is listening on /run/user/1000/chinwag/chinwag.sock", T0)
    lines = draw(TopView(state, clock=lambda: T0 + 10), width=40, height=10)
    assert len(lines) <= 10 and lines[-1] == "q quits", "\n".join(lines)
    assert "recent errors" in lines
