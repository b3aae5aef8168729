"""The jsonl backend's ``Outbox``: the log ``outbox.jsonl``, replayed into an ``OutboxIndex``.

Each line of ``DIR/outbox.jsonl`` is one write, an ``OutboxChange`` as msgspec
JSON whose ``"type"`` says which (``enqueue``, ``delivered``, ``retry``,
``give_up``), so ``jq`` reads it. A write appends its line with one write and
an fsync (through the backend's ``_LineFile``, as ``mail.jsonl`` is written),
then applies it to the index as decoded from that line; writes are serialized
by one lock and shielded from cancellation as ``Storage.append`` is. Reads
come from the index. Opening replays the log in a worker thread; a torn or
unparsable last line (a crash mid-write) is truncated away and logged, as in
``mail.jsonl``. The log is never rewritten: a delivery adds a line when it is
enqueued and one for each try.
"""

from __future__ import annotations

import trio

from ._base import StorageError
from ._jsonl_mail import LineLog
from ._outbox_index import IndexedOutbox, OutboxChange, OutboxIndex, decode_change, encode_change


def _replay(log: LineLog) -> OutboxIndex:
    """The index every line of ``log`` leaves, in order. Worker thread."""
    try:
        changes = log.read(decode_change, "an outbox change")
    except OSError as exc:
        raise StorageError(f"Could not read {log.path}: {exc}.") from exc
    index = OutboxIndex()
    for change in changes:
        index.apply(change)
    return index


class JsonlOutbox(IndexedOutbox):
    """An ``Outbox`` kept as ``outbox.jsonl``; ``open`` is the way to get one."""

    def __init__(self, log: LineLog, index: OutboxIndex, limiter: trio.CapacityLimiter) -> None:
        self.index = index
        self._log = log
        self._limiter = limiter
        self._lock = trio.Lock()  # held by the write under way
        self._closed = False

    @classmethod
    async def open(cls, log: LineLog, limiter: trio.CapacityLimiter) -> JsonlOutbox:
        """Replay ``log`` (nothing when there is no file yet)."""
        index = await trio.to_thread.run_sync(_replay, log, limiter=limiter)
        return cls(log, index, limiter)

    async def close(self) -> None:
        """Refuse what comes next, and wait for a write under way. Shielded."""
        self._closed = True
        with trio.CancelScope(shield=True):
            async with self._lock:  # fair: every write that began goes first
                pass

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError("The store is closed.")

    async def _ready(self) -> OutboxIndex:
        await trio.lowlevel.checkpoint()
        self._check_open()
        return self.index

    async def _commit(self, change: OutboxChange) -> None:
        line = encode_change(change)
        await trio.lowlevel.cancel_shielded_checkpoint()
        self._check_open()
        with trio.CancelScope(shield=True):
            async with self._lock:
                try:
                    await trio.to_thread.run_sync(self._log.append, line, limiter=self._limiter)
                except OSError as exc:
                    raise StorageError(f"Writing to {self._log.path} failed: {exc}.") from exc
                self.index.apply(decode_change(line))
