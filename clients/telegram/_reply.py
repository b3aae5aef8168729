"""A reply shown in Telegram while it streams: one message edited as text arrives."""

from __future__ import annotations

import enum
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import anyio
import structlog

from ._formatting import MESSAGE_LIMIT, split_message
from ._outbox import Edit, Outbox

log = structlog.get_logger()


@dataclass
class _Shown:
    message_id: int
    text: str | None  # the Markdown piece the message shows; None: not known (a restart)


class _Step(enum.Enum):
    DONE = "done"  # every piece is shown
    PROGRESS = "progress"  # one call went through; there may be more to show
    STUCK = "stuck"  # the call was skipped or refused


class LiveReply:
    """One reply as Telegram messages, edited while it streams.

    ``add`` appends text; the ``paint`` task shows it with one paced call at a
    time, each made with the newest text, so a chat sees at most one edit per
    pacing interval however fast the words come. A reply longer than a message
    continues in a second one. ``finish`` stops the painter and delivers the
    final text, retrying until Telegram has it.

    While a tool runs, a line below the text says which (``⚙ name(arguments)``,
    as the CLI shows a call); it goes once the tool is done, and the final
    text has none.

    ``reply_to``: the message the reply's first message answers (a reply in a
    group). ``shown``: the messages an earlier bridge showed this reply in,
    edited rather than sent anew. ``on_shown`` hears of each new message, with
    the ids of them all.
    """

    def __init__(
        self,
        outbox: Outbox,
        thread_id: int | None,
        heading: str = "",
        *,
        reply_to: int | None = None,
        shown: Iterable[int] = (),
        on_shown: Callable[[tuple[int, ...]], Awaitable[None]] | None = None,
    ) -> None:
        self.text = ""
        self.heading = heading  # shown above the text (who speaks, on a guest turn)
        self._outbox = outbox
        self._thread_id = thread_id
        self._reply_to = reply_to
        self._shown = [_Shown(message_id, None) for message_id in shown]
        self._on_shown = on_shown
        self._tools: dict[str, str] = {}  # the tools running: call id -> one-line summary
        self._dirty = anyio.Event()
        self._finishing = False
        self._painted = anyio.Event()

    def add(self, delta: str) -> None:
        self.text += delta
        self._dirty.set()

    def replace(self, text: str) -> None:
        self.text = text
        self._dirty.set()

    def leave_earlier(self) -> None:
        """Leave the messages an earlier bridge showed this reply in as they are: what
        they show is not known, and may be more than what is left of the run."""
        self._shown = [shown for shown in self._shown if shown.text is not None]

    def tool_started(self, call_id: str, summary: str) -> None:
        """A tool runs: show ``summary`` below the text until ``tool_ended``."""
        self._tools[call_id] = summary
        self._dirty.set()

    def tool_ended(self, call_id: str) -> None:
        if self._tools.pop(call_id, None) is not None:
            self._dirty.set()

    def _pieces(self) -> list[str]:
        text = self.text
        if self._tools and not self._finishing:
            running = "\n".join(f"⚙ {_code_span(summary)}" for summary in self._tools.values())
            text = f"{text.rstrip()}\n\n{running}" if text.strip() else running
        return split_message(self.heading + text, MESSAGE_LIMIT) if text.strip() else []

    async def paint(self) -> None:
        """Show the text as it grows until ``finish`` is called (run it as a task)."""
        try:
            while True:
                dirty = self._dirty
                await dirty.wait()
                await self._outbox.pacer.ready()
                if self._finishing:
                    return
                self._dirty = anyio.Event()
                if await self._step(self._pieces(), insist=False) is not _Step.DONE:
                    self._dirty.set()
        finally:
            self._painted.set()

    async def finish(self, text: str) -> None:
        """Stop painting and show ``text`` for good (nothing, if it is empty and
        nothing was shown)."""
        self.text = text
        self._finishing = True
        self._dirty.set()
        await self._painted.wait()
        pieces = self._pieces()
        while (step := await self._step(pieces, insist=True)) is _Step.PROGRESS:
            pass
        if step is _Step.STUCK:
            log.warning("telegram_reply_undelivered", chat_id=self._outbox.chat_id)
            return
        for extra in self._shown[len(pieces) :]:
            await self._outbox.delete(extra.message_id)
        del self._shown[len(pieces) :]

    async def _step(self, pieces: list[str], *, insist: bool) -> _Step:
        """Make the one call that brings the messages closest to ``pieces``."""
        for index, piece in enumerate(pieces):
            if index < len(self._shown):
                shown = self._shown[index]
                if shown.text == piece:
                    continue
                outcome = await self._outbox.edit(shown.message_id, piece, insist=insist)
                if outcome is Edit.DONE:
                    shown.text = piece
                    return _Step.PROGRESS
                if outcome is Edit.SKIPPED:
                    return _Step.STUCK
                # Refused (the message was deleted, say): show the piece anew.
            message_id = await self._outbox.send(
                piece,
                thread_id=self._thread_id,
                insist=insist,
                reply_to=self._reply_to if index == 0 else None,
            )
            if message_id is None:
                return _Step.STUCK
            if index < len(self._shown):
                self._shown[index] = _Shown(message_id, piece)
            else:
                self._shown.append(_Shown(message_id, piece))
            if self._on_shown is not None:
                await self._on_shown(tuple(shown.message_id for shown in self._shown))
            return _Step.PROGRESS
        return _Step.DONE


def _code_span(text: str) -> str:
    """``text`` as a Markdown code span: fenced by one backtick more than it holds in a row."""
    fence = "`" * (1 + max((len(run) for run in re.findall("`+", text)), default=0))
    padding = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{padding}{text}{padding}{fence}"
