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

from ._errors import StorageError
from ._jsonl_mail import LineLog, LogBacked
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


class JsonlOutbox(LogBacked[OutboxIndex], IndexedOutbox):
    """An ``Outbox`` kept as ``outbox.jsonl``; ``open`` is the way to get one."""

    @classmethod
    async def open(cls, log: LineLog, limiter: trio.CapacityLimiter) -> JsonlOutbox:
        """Replay ``log`` (nothing when there is no file yet)."""
        index = await trio.to_thread.run_sync(_replay, log, limiter=limiter)
        return cls(log, index, limiter)

    async def _commit(self, change: OutboxChange) -> None:
        line = encode_change(change)
        async with self._writing():
            await self._append(line)
            self.index.apply(decode_change(line))
