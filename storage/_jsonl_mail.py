"""The jsonl backend's ``MailStore``: the log ``mail.jsonl``, served by a ``MailIndex``.

Each line of ``DIR/mail.jsonl`` is one write, a ``MailChange`` as msgspec JSON
whose ``"type"`` says which (``participant``, ``post``, ``advance``, ``change``,
``space``, ``member``, ``project``, ``project_deleted``, ``locks``), so ``jq``
reads it. A write plans its change with the index (which fixes its numbers,
times and moves), appends its line with one write and an fsync (the directory
fsynced too when that created the file; cut back to what it held when the
write or the fsync fails, as a history file is), and only then applies it to the
index: applied as decoded from that line, so what reads return now is what
they return after a reopen. Writes are serialized by one lock, so msg_ids
follow the order of the lines, and are shielded from cancellation as
``Storage.append`` is. Reads come from the index alone.

Opening replays the log into a fresh index, in a worker thread. A torn or
unparsable last line (a crash mid-write) is truncated away and logged, as in
``notes.jsonl``; a bad line before it, or a line that does not follow from the
ones before (a msg_id not above the last, a reply to a message not stored), is
a ``StorageError`` naming the file and line. A store without the file (every
store from before mail) has no mail; the first write creates the file.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Generic, Protocol, TypeVar

import msgspec
import trio

from ._errors import StorageError
from ._mail import number_of
from ._mail_index import Advance, ChangeMessage, IndexedMail, MailChange, MailIndex, PostMail

_T = TypeVar("_T")
_I = TypeVar("_I")  # the index a LogBacked keeps

_encoder = msgspec.json.Encoder()
_decode_change = msgspec.json.Decoder(MailChange).decode


class LineLog(Protocol):
    """An append-only file of lines (the jsonl backend's ``_LineFile``); worker thread only."""

    path: Path

    def read(self, decode: Callable[[bytes], _T], what: str) -> list[_T]:
        """Every line decoded, a torn or unparsable last one truncated away first."""
        ...

    def append(self, data: bytes) -> None:
        """Append ``data`` durably, or raise (``OSError``, ``StorageError``) having left none."""
        ...


class LogBacked(Generic[_I]):
    """An index kept as an append-only log (``mail.jsonl``, ``outbox.jsonl``): one write at
    a time, appended durably before it is applied; reads from the index alone."""

    def __init__(self, log: LineLog, index: _I, limiter: trio.CapacityLimiter) -> None:
        """Wrap a replayed log; ``open`` is the way to get one."""
        self.index = index
        self._log = log
        self._limiter = limiter
        self._lock = trio.Lock()  # held by the write under way
        self._closed = False

    async def close(self) -> None:
        """Refuse what comes next, and wait for a write under way. Shielded."""
        self._closed = True
        with trio.CancelScope(shield=True):
            async with self._lock:  # fair: every write that began goes first
                pass

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError("The store is closed.")

    async def _ready(self) -> _I:
        await trio.lowlevel.checkpoint()
        self._check_open()
        return self.index

    @contextlib.asynccontextmanager
    async def _writing(self) -> AsyncIterator[_I]:
        """The index, to plan a change and append it; one write at a time, not cancellable.

        Once entered, the write completes or fails, and a cancellation lands at
        the caller's next checkpoint (as with ``Storage.append``).
        """
        await trio.lowlevel.cancel_shielded_checkpoint()
        self._check_open()
        with trio.CancelScope(shield=True):
            async with self._lock:
                yield self.index

    async def _append(self, line: bytes) -> None:
        """Append ``line`` durably, in a worker thread. Under ``_writing``."""
        try:
            await trio.to_thread.run_sync(self._log.append, line, limiter=self._limiter)
        except OSError as exc:
            raise StorageError(f"Writing to {self._log.path} failed: {exc}.") from exc


class JsonlMail(LogBacked[MailIndex], IndexedMail):
    """A ``MailStore`` kept as ``mail.jsonl`` and served from a ``MailIndex``."""

    @classmethod
    async def open(cls, log: LineLog, limiter: trio.CapacityLimiter) -> JsonlMail:
        """Replay ``log`` into a fresh index (none when there is no file yet)."""
        index = await trio.to_thread.run_sync(_replay, log, limiter=limiter)
        return cls(log, index, limiter)

    async def _commit(self, change: MailChange) -> None:
        """Append ``change``'s line durably, then apply it as the line says. Under ``_writing``."""
        try:
            line = _encoder.encode(change) + b"\n"
        except (UnicodeEncodeError, TypeError, OverflowError) as exc:
            raise StorageError(f"The mail could not be encoded: {exc}.") from exc
        await self._append(line)
        self.index.apply(_decode_change(line))


# --- replay (worker thread) ------------------------------------------------------------


def _replay(log: LineLog) -> MailIndex:
    """A fresh index holding every change in ``log``, in order."""
    try:
        changes = log.read(_decode_change, "a mail change")
    except OSError as exc:
        raise StorageError(f"Could not read {log.path}: {exc}.") from exc
    index = MailIndex()
    for number, change in enumerate(changes, 1):
        problem = _problem(index, change)
        if problem is not None:
            raise StorageError(f"{log.path}:{number}: {problem}; fix or remove it by hand.")
        index.apply(change)
    return index


def _problem(index: MailIndex, change: MailChange) -> str | None:
    """Why ``change`` cannot follow the changes in ``index``, or None when it can."""
    match change:
        case PostMail(message=message, parent=parent):
            number = number_of(message.msg_id)
            if number is None:
                return f"the message's msg_id {message.msg_id!r} is not one this store gives"
            if number <= index.last_number:
                return f"the message {message.msg_id} does not come after the ones before it"
            if parent is not None and index.get_message(parent.msg_id) is None:
                return f"the message it replies to, {parent.msg_id}, is not stored before it"
        case Advance(changes=moves):
            for msg_id, _, _, _ in moves:
                if number_of(msg_id) is None:
                    return f"{msg_id!r} is not a msg_id this store gives"
        case ChangeMessage(msg_id=msg_id):
            if index.get_message(msg_id) is None:
                return f"the message it changes, {msg_id}, is not stored before it"
    return None
