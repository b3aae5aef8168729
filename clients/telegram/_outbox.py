"""What the bridge sends to one Telegram chat, paced, with retries and a plain-text fallback.

Telegram allows about one message (or edit) per second in a chat and answers
faster senders with 429 and a ``retry_after``. Every call to a chat goes
through its ``Pacer``, which spaces the calls and holds them back for as long
as a 429 said. Text goes as MarkdownV2 and, if Telegram cannot parse it,
again as the plain Markdown it came from.
"""

from __future__ import annotations

import datetime as dt
import enum
import math
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
import structlog
from telegram import Bot, InlineKeyboardMarkup, ReplyParameters
from telegram.constants import ChatAction, ParseMode
from telegram.error import BadRequest, NetworkError, RetryAfter, TelegramError

from ._formatting import to_markdown_v2
from ._link import Backoff

log = structlog.get_logger()

_T = TypeVar("_T")


class Pacer:
    """Spaces the calls to one chat: each starts at least ``interval`` seconds
    after the one before, and none before a flood wait Telegram asked for is over."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._next = -math.inf
        self._lock = anyio.Lock()

    async def ready(self) -> None:
        """Return once a call could start now, without claiming the slot."""
        # A deadline that `hold` may push back while we sleep, not a flag to wait for.
        while (delay := self._next - anyio.current_time()) > 0:  # noqa: ASYNC110
            await anyio.sleep(delay)

    async def wait(self) -> None:
        """Return when the next call may start, and claim that start.

        Callers go one at a time, in order. A wait cancelled claims nothing.
        """
        async with self._lock:
            await self.ready()
            self._next = anyio.current_time() + self.interval

    def hold(self, seconds: float) -> None:
        """Telegram said to wait: no call starts for ``seconds`` from now."""
        self._next = max(self._next, anyio.current_time() + seconds)


class Edit(enum.Enum):
    """How an edit went."""

    DONE = "done"  # the message shows the text (it may have already)
    SKIPPED = "skipped"  # a flood wait or a network error, and the caller does not insist
    REFUSED = "refused"  # Telegram will not edit this message (deleted, too old, ...)


class Outbox:
    """Sends and edits the messages of one Telegram chat (all its topics)."""

    def __init__(self, bot: Bot, chat_id: int, interval: float) -> None:
        self.bot = bot
        self.chat_id = chat_id
        self.pacer = Pacer(interval)

    async def send(
        self,
        text: str,
        *,
        thread_id: int | None,
        markup: InlineKeyboardMarkup | None = None,
        insist: bool = True,
        reply_to: int | None = None,
    ) -> int | None:
        """Send Markdown ``text`` as a new message; its id, or None if it was not sent.

        With ``insist`` it retries through flood waits and network errors until
        Telegram has it; without, those give up at once (a streaming edit that
        a later one will supersede). With ``reply_to``, it goes as a reply to
        that message, or as a plain message once that one is deleted.
        """
        reply = (
            None
            if reply_to is None
            else ReplyParameters(reply_to, allow_sending_without_reply=True)
        )

        async def call(formatted: str, parse_mode: str | None) -> int:
            message = await self.bot.send_message(
                self.chat_id,
                formatted,
                parse_mode=parse_mode,
                message_thread_id=thread_id,
                reply_markup=markup,
                reply_parameters=reply,
            )
            return message.message_id

        try:
            return await self._deliver(text, call, insist)
        except TelegramError as exc:
            log.warning("telegram_send_refused", chat_id=self.chat_id, error=str(exc))
            return None

    async def edit(
        self,
        message_id: int,
        text: str,
        *,
        markup: InlineKeyboardMarkup | None = None,
        insist: bool = True,
    ) -> Edit:
        """Make message ``message_id`` show Markdown ``text`` (and ``markup``, else no keyboard)."""

        async def call(formatted: str, parse_mode: str | None) -> Edit:
            await self.bot.edit_message_text(
                formatted,
                chat_id=self.chat_id,
                message_id=message_id,
                parse_mode=parse_mode,
                reply_markup=markup,
            )
            return Edit.DONE

        try:
            outcome = await self._deliver(text, call, insist)
        except BadRequest as exc:
            if "message is not modified" in exc.message.lower():
                return Edit.DONE
            log.info("telegram_edit_refused", chat_id=self.chat_id, error=exc.message)
            return Edit.REFUSED
        except TelegramError as exc:
            log.warning("telegram_edit_refused", chat_id=self.chat_id, error=str(exc))
            return Edit.REFUSED
        return Edit.SKIPPED if outcome is None else outcome

    async def delete(self, message_id: int) -> None:
        """Delete a message, if Telegram lets us (best effort)."""
        await self.pacer.wait()
        try:
            await self.bot.delete_message(self.chat_id, message_id)
        except TelegramError as exc:
            log.info("telegram_delete_failed", chat_id=self.chat_id, error=str(exc))

    async def typing(self, thread_id: int | None) -> None:
        """Show "typing…" (best effort: not paced, since it is not a message)."""
        try:
            await self.bot.send_chat_action(
                self.chat_id, ChatAction.TYPING, message_thread_id=thread_id
            )
        except TelegramError as exc:
            log.info("telegram_chat_action_failed", chat_id=self.chat_id, error=str(exc))

    async def _deliver(
        self,
        text: str,
        call: Callable[[str, str | None], Awaitable[_T]],
        insist: bool,
    ) -> _T | None:
        """One paced Bot API call with ``text`` as MarkdownV2, then as plain text if
        Telegram cannot parse that. None when it gave up on a flood wait or a
        network error (only without ``insist``); a refusal raises ``TelegramError``."""
        formatted: str = to_markdown_v2(text)
        parse_mode: str | None = ParseMode.MARKDOWN_V2
        if not formatted.strip():
            formatted, parse_mode = text, None  # Markdown that renders as nothing
        delays = Backoff(first=1.0, ceiling=30.0)
        while True:
            await self.pacer.wait()
            try:
                return await call(formatted, parse_mode)
            except RetryAfter as exc:
                seconds = _retry_after(exc)
                self.pacer.hold(seconds)
                log.info("telegram_flood_wait", chat_id=self.chat_id, seconds=seconds)
                if not insist:
                    return None
            except BadRequest as exc:
                if parse_mode is None or "can't parse entities" not in exc.message.lower():
                    raise
                log.warning("telegram_markdown_rejected", chat_id=self.chat_id, error=exc.message)
                formatted, parse_mode = text, None
            except NetworkError as exc:  # includes TimedOut; BadRequest is handled above
                if not insist:
                    return None
                # A send that timed out may have arrived all the same: sending
                # again risks a duplicate, which beats losing the final text.
                delay = delays.next()
                log.warning(
                    "telegram_unreachable", chat_id=self.chat_id, error=str(exc), retry_in_s=delay
                )
                await anyio.sleep(delay)


def _retry_after(exc: RetryAfter) -> float:
    # python-telegram-bot 22 gives a timedelta under PTB_TIMEDELTA (which
    # `chinwag telegram` sets), else an int and a deprecation warning.
    value = exc.retry_after
    return value.total_seconds() if isinstance(value, dt.timedelta) else float(value)
