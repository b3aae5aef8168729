"""Pacing at the default interval, on trio's virtual clock: a second per call takes no time.

The outbox and the live reply are written against anyio, so they run here
under trio with `autojump_clock`, against a stand-in for python-telegram-bot's
`Bot` that records when each call starts.
"""

from __future__ import annotations

import itertools
from collections import deque
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio
from chinwag.clients.telegram._bridge import BridgeConfig
from chinwag.clients.telegram._outbox import Edit, Outbox, Pacer
from chinwag.clients.telegram._reply import LiveReply
from telegram.error import BadRequest, NetworkError, RetryAfter, TimedOut

DEFAULT_INTERVAL = BridgeConfig(
    token="t", agent="a", socket_path=Path("s"), state_dir=Path("state")
).edit_interval_s


class StandInBot:
    """Records (virtual time, method, text) of each call; raises scripted errors first."""

    def __init__(self, *errors: Exception) -> None:
        self.calls: list[tuple[float, str, str]] = []
        self.errors = deque(errors)
        self._ids = itertools.count(1)

    def _record(self, method: str, text: str) -> None:
        self.calls.append((trio.current_time(), method, text))
        if self.errors:
            raise self.errors.popleft()

    async def send_message(self, chat_id: int, text: str, **options: Any) -> Any:
        self._record("send", text)
        return SimpleNamespace(message_id=next(self._ids))

    async def edit_message_text(self, text: str, **options: Any) -> bool:
        self._record("edit", text)
        return True

    def gaps(self) -> list[float]:
        return [b[0] - a[0] for a, b in itertools.pairwise(self.calls)]


def test_the_default_is_one_call_per_second() -> None:
    assert DEFAULT_INTERVAL == 1.0


async def test_the_pacer_spaces_calls_and_holds_them_for_a_flood_wait(autojump_clock) -> None:
    pacer = Pacer(DEFAULT_INTERVAL)
    starts: list[float] = []

    async def call() -> None:
        await pacer.wait()
        starts.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(call)
    assert [b - a for a, b in itertools.pairwise(starts)] == pytest.approx([1.0, 1.0])
    pacer.hold(5)
    before = trio.current_time()
    await call()
    assert starts[-1] - before == pytest.approx(5.0)


async def test_a_fast_stream_is_shown_with_one_call_a_second(autojump_clock) -> None:
    bot = StandInBot()
    reply = LiveReply(Outbox(bot, 1, DEFAULT_INTERVAL), None)  # type: ignore[arg-type]
    words = [str(n) for n in range(1, 51)]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reply.paint)
        for index, word in enumerate(words):
            reply.add(word if index == 0 else f" {word}")
            await trio.sleep(0.1)  # virtual time: the model's pace, 10 words a second
        await reply.finish(reply.text)
    assert bot.calls[0][1] == "send"
    assert all(method == "edit" for _, method, _ in bot.calls[1:])
    assert min(bot.gaps()) == pytest.approx(1.0)
    assert 5 <= len(bot.calls) <= 7  # 5 s of words
    assert bot.calls[-1][2] == " ".join(words)


async def test_the_final_text_is_retried_until_telegram_has_it(autojump_clock) -> None:
    bot = StandInBot(RetryAfter(3), TimedOut(), NetworkError("connection reset"))
    outbox = Outbox(bot, 1, DEFAULT_INTERVAL)  # type: ignore[arg-type]
    assert await outbox.send("the answer", thread_id=None) == 1
    assert [method for _, method, _ in bot.calls] == ["send"] * 4
    assert bot.gaps()[0] == pytest.approx(3.0)  # the flood wait
    assert bot.gaps()[1:] == pytest.approx([1.0, 2.0])  # network errors back off


async def test_a_streaming_edit_gives_up_at_once_on_a_flood_wait(autojump_clock) -> None:
    bot = StandInBot(RetryAfter(3))
    outbox = Outbox(bot, 1, DEFAULT_INTERVAL)  # type: ignore[arg-type]
    assert await outbox.edit(7, "partial", insist=False) is Edit.SKIPPED
    assert await outbox.edit(7, "partial", insist=False) is Edit.DONE
    assert bot.gaps() == pytest.approx([3.0])


async def test_text_telegram_cannot_parse_goes_again_as_plain_text(autojump_clock) -> None:
    bot = StandInBot(BadRequest("Can't parse entities: unsupported start tag"))
    outbox = Outbox(bot, 1, DEFAULT_INTERVAL)  # type: ignore[arg-type]
    assert await outbox.send("1 + 1 = **2**", thread_id=None) == 1
    assert [text for _, _, text in bot.calls] == ["1 \\+ 1 \\= *2*", "1 + 1 = **2**"]
