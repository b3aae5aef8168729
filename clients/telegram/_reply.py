"""A reply shown in Telegram while it streams: one message edited as text arrives."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import anyio
import structlog

from ._formatting import MESSAGE_LIMIT, split_message
from ._outbox import Edit, Outbox

log = structlog.get_logger()


@dataclass
class _Shown:
    message_id: int
    text: str  # the Markdown piece the message shows


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
    """

    def __init__(self, outbox: Outbox, thread_id: int | None, heading: str = "") -> None:
        self.text = ""
        self.heading = heading  # shown above the text (who speaks, on a guest turn)
        self._outbox = outbox
        self._thread_id = thread_id
        self._shown: list[_Shown] = []
        self._dirty = anyio.Event()
        self._finishing = False
        self._painted = anyio.Event()

    def add(self, delta: str) -> None:
        self.text += delta
        self._dirty.set()

    def replace(self, text: str) -> None:
        self.text = text
        self._dirty.set()

    def _pieces(self) -> list[str]:
        return split_message(self.heading + self.text, MESSAGE_LIMIT) if self.text.strip() else []

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
            message_id = await self._outbox.send(piece, thread_id=self._thread_id, insist=insist)
            if message_id is None:
                return _Step.STUCK
            if index < len(self._shown):
                self._shown[index] = _Shown(message_id, piece)
            else:
                self._shown.append(_Shown(message_id, piece))
            return _Step.PROGRESS
        return _Step.DONE
