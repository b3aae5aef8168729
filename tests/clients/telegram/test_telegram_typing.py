""" "typing…" and tool calls while a run works, on trio's virtual clock.

A ``Turn`` is driven here by a scripted run (events at set virtual times) in
place of the daemon, and shows it through the real outbox and live reply to a
stand-in for python-telegram-bot's ``Bot`` that records when each call starts.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest
import trio
from chinwag.clients.telegram._chat import TYPING_EVERY_S, Chat
from chinwag.clients.telegram._outbox import Outbox
from chinwag.clients.telegram._spool import Spooled
from chinwag.clients.telegram._turn import Turn
from chinwag.protocol import (
    AskOption,
    AskQuestion,
    AskUser,
    End,
    Queued,
    Start,
    StreamEventMsg,
    TextDelta,
    ThinkingDelta,
    ToolCall,
    ToolResult,
)
from fake_bot_api import visible

CHAT = 5000


class RecordingBot:
    """Records (virtual time, method, text) of each call."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, str, str]] = []  # text: as the chat shows it
        self._ids = itertools.count(1)

    async def send_message(self, chat_id: int, text: str, **options: Any) -> Any:
        self.calls.append((trio.current_time(), "send", visible(text, options["parse_mode"])))
        return SimpleNamespace(message_id=next(self._ids))

    async def edit_message_text(self, text: str, **options: Any) -> bool:
        self.calls.append((trio.current_time(), "edit", visible(text, options["parse_mode"])))
        return True

    async def delete_message(self, chat_id: int, message_id: int) -> bool:
        self.calls.append((trio.current_time(), "delete", ""))
        return True

    async def send_chat_action(self, chat_id: int, action: str, **options: Any) -> bool:
        self.calls.append((trio.current_time(), action, ""))
        return True

    def typing(self) -> list[float]:
        return [at for at, method, _ in self.calls if method == "typing"]

    def shown(self) -> list[str]:
        """Every text sent or edited in, as the chat shows it."""
        return [text for _, method, text in self.calls if method in ("send", "edit")]


class ScriptedRun:
    """What the daemon would send for a `stream` request: each event at its time,
    in seconds from the request (or as soon as it is read, if that is later)."""

    def __init__(self, script: list[tuple[float, StreamEventMsg]]) -> None:
        self.script = script

    async def __aenter__(self) -> AsyncIterator[StreamEventMsg]:
        return self._events()

    async def __aexit__(self, *exc: object) -> None:
        pass

    async def _events(self) -> AsyncIterator[StreamEventMsg]:
        start = trio.current_time()
        for at, event in self.script:
            await trio.sleep_until(start + at)
            yield event


class ScriptedClient:
    """Answers each `stream` request with the next of ``runs``."""

    def __init__(self, *runs: ScriptedRun) -> None:
        self.runs = list(runs)

    def stream(self, *args: object, **kwargs: object) -> ScriptedRun:
        return self.runs.pop(0)


class ConnectedLink:
    """A daemon link that is always connected, to ``client``."""

    def __init__(self, client: ScriptedClient) -> None:
        self._client = client

    async def client(self) -> ScriptedClient:
        return self._client

    async def outage(self) -> int:
        await trio.sleep_forever()
        raise AssertionError("unreachable")


class NoSpool:
    async def sent(self, *args: object) -> None:
        pass

    async def answer(self, *args: object) -> None:
        pass

    async def done(self, *args: object) -> None:
        pass


async def follow(*scripts: list[tuple[float, StreamEventMsg]]) -> RecordingBot:
    """Send one message to a chat for each script, and show each run (going as its
    script says) until it ends."""
    bot = RecordingBot()
    link = ConnectedLink(ScriptedClient(*(ScriptedRun(script) for script in scripts)))
    chat = Chat(Outbox(bot, CHAT, 1.0), None, link, "assistant")  # type: ignore[arg-type]
    async with trio.open_nursery() as turns:
        for update_id in range(len(scripts)):
            message = Spooled(update_id=update_id, chat_id=CHAT, text="do it")
            turn = Turn(chat, link, "assistant", message, NoSpool())  # type: ignore[arg-type]
            turns.start_soon(turn.run, chat.take_ticket())
    return bot


async def test_typing_is_renewed_every_4_s_while_queued_thinking_or_in_a_tool(
    autojump_clock,
) -> None:
    call = ToolCall(call_id="c1", name="run_command", arguments='{"command": "make test"}')
    question = AskQuestion(question="Go on?", options=[AskOption(label="yes")])
    script: list[tuple[float, StreamEventMsg]] = [
        (0, Queued(position=1)),
        (5, Start(run_id="r1", agent="assistant", seq=3)),
        (5, ThinkingDelta(delta="hm")),
        (5, call),  # a 12.5 s tool call
        (17.5, ToolResult(call_id="c1", output="ok", is_error=False, duration_ms=12500)),
        (17.5, ToolCall(call_id="c2", name="ask_user", arguments="{}")),
        (17.5, AskUser(ask_id="a1", questions=[question])),
        (27.5, ToolResult(call_id="c2", output="yes", is_error=False, duration_ms=10000)),
        (27.5, TextDelta(delta="Tests pass.")),
        (29, End(status="done", error=None, last_seq=9)),
    ]
    start = trio.current_time()
    bot = await follow(script)
    end = trio.current_time() - start
    typing = [at - start for at in bot.typing()]
    # Queued from 0, thinking and in the tool from 5 to 17.5: every 4 s; none
    # while the question waits (17.5 to 27.5); again once it is answered.
    assert typing == pytest.approx([0, 4, 8, 12, 16, 27.5])
    assert TYPING_EVERY_S == 4
    assert len([at for at in typing if 5 <= at <= 17.5]) == 3  # renewed 3 times in the tool
    assert end < 31  # ended at 29, the final edit paced
    await trio.sleep(30)
    assert len(bot.typing()) == 6  # none after the end


async def test_a_chat_gets_one_typing_indicator_however_many_turns_it_has(
    autojump_clock,
) -> None:
    first: list[tuple[float, StreamEventMsg]] = [
        (0, Start(run_id="r1", agent="assistant", seq=1)),
        (10, TextDelta(delta="First.")),
        (10, End(status="done", error=None, last_seq=2)),
    ]
    second: list[tuple[float, StreamEventMsg]] = [
        (0, Queued(position=1)),
        (10.5, Start(run_id="r2", agent="assistant", seq=3)),
        (13, TextDelta(delta="Second.")),
        (13, End(status="done", error=None, last_seq=4)),
    ]
    start = trio.current_time()
    bot = await follow(first, second)
    # Both want it from 0 to 10, the second alone from 10 to 13: not twice each
    # time. The turn whose `run` sends first goes on while it lives (to 13, or
    # to 10 when the other sends again at once).
    typing = [at - start for at in bot.typing()]
    assert typing in (pytest.approx([0, 4, 8, 10]), pytest.approx([0, 4, 8, 12]))


async def test_a_running_tool_shows_as_one_line_until_it_is_done(autojump_clock) -> None:
    call = ToolCall(call_id="c1", name="run_command", arguments='{"command": "make `test`"}')
    script: list[tuple[float, StreamEventMsg]] = [
        (0, Start(run_id="r1", agent="assistant", seq=3)),
        (0, TextDelta(delta="Running the tests.")),
        (0, call),
        (5, ToolResult(call_id="c1", output="ok", is_error=False, duration_ms=5000)),
        (5, TextDelta(delta=" They pass.")),
        (7, End(status="done", error=None, last_seq=9)),
    ]
    shown = (await follow(script)).shown()
    # As the CLI shows the call (tool_call_summary), below the text so far.
    assert 'Running the tests.\n\n⚙ run_command({"command": "make `test`"})' in shown
    assert shown[-1] == "Running the tests. They pass."
