"""The spool: messages for the agent that Telegram was told the bridge received but
whose answer the chat does not show yet, kept on disk so that stopping the bridge
loses none (nor their answers).

One file per bot, JSON lines, each appended before the bridge goes on:
``message`` before Telegram learns the update was received (the Updater's next
getUpdates, the webhook's 200), ``sent`` before the message's first `stream`
request, both fsynced; ``done`` once its answer is shown in the chat (its
run's `end` handled), not fsynced: only a crash of the machine can lose a line
written, and a `done` lost shows the answer again (the message is found in its
conversation), it loses nothing. Not at `queued`: the daemon keeps its queue in
memory, and drops it when it shuts down; nor at `start`: a bridge stopped while
the run streams would not show its answer. ``answer`` each time the answer
streaming into the chat takes one more Telegram message, with the ids of them
all, so that a restarted bridge completes those messages by editing them
rather than leave them stale beside new ones; not fsynced either: lost, the
answer is shown in new messages.
Only the last line can be cut short, by a crash while it was written, and
opening drops it: an update not confirmed comes again from Telegram, a message
not marked sent was not sent, and one not marked done is looked for in its
conversation before it is sent again. Any other line that does not parse stops
the bridge, naming the file and line, rather than dropping the messages it holds.

A bridge holds the file's lock, ``spool-<bot id>.lock`` beside it, for as long
as the spool is open: a second bridge for the same bot and state directory
would send the messages of the first again; it stops instead.

A write that fails (a full disk) is logged and the bridge goes on: the message
is still handled, it only loses its protection against a stop.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
from collections import deque
from datetime import datetime
from pathlib import Path

import anyio
import msgspec
import structlog

log = structlog.get_logger()

#: How many ids of done messages are remembered, so that an update Telegram
#: sends again (its confirmation lost in a crash) is not taken twice; a
#: getUpdates batch is at most 100 updates.
_REMEMBERED = 256
#: The size past which the file is rewritten with only what it must keep.
_COMPACT_BYTES = 1 << 20


class SpoolError(Exception):
    """The spool cannot be used; the message says why, in one sentence."""


class SpoolCorrupt(SpoolError):
    """A line of the spool, other than a torn last one, does not parse."""


class _Record(msgspec.Struct, tag_field="op", kw_only=True, frozen=True):
    update_id: int


class Spooled(_Record, tag="message", kw_only=True, frozen=True):
    """A message for the agent from one chat (or forum topic): a turn, or a question's answer."""

    chat_id: int
    thread_id: int | None = None
    text: str
    guest: str | None = None  # `/guest NAME text`: the agent who answers
    #: When its `stream` request was first sent: since then, the daemon may have it.
    sent_at: datetime | None = None
    #: The Telegram message it came in, when its answer goes as a reply to it (in a group).
    reply_to: int | None = None
    #: The Telegram messages its answer is being shown in, edited as it streams.
    answer_ids: tuple[int, ...] = ()


class _Sent(_Record, tag="sent", kw_only=True, frozen=True):
    at: datetime


class _Done(_Record, tag="done", frozen=True):
    pass


class _Answer(_Record, tag="answer", kw_only=True, frozen=True):
    message_ids: tuple[int, ...]


_Line = Spooled | _Sent | _Done | _Answer
_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(_Line).decode


class Spool:
    """The spool file at ``path`` and what it holds.

    ``open`` (blocking) locks and reads it. ``add``, ``sent`` and ``done``
    change what it holds at once, then append their line in a worker thread,
    one line at a time and in order (a `message` or `sent` line fsynced)
    before they return. What it holds is only read and changed on the event
    loop. ``close`` waits for a write in progress: a task cancelled while it
    waited for its write (python-telegram-bot cancels its polling task
    directly) leaves the worker thread writing.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock_path = path.with_suffix(".lock")
        self._pending: dict[int, Spooled] = {}
        self._done: deque[int] = deque(maxlen=_REMEMBERED)
        self._size = 0
        self._compacted = 0  # the size of the file when it was last rewritten
        self._fd = -1
        self._lock_fd = -1
        self._lock = anyio.Lock()  # one write at a time, in order
        self._file_lock = threading.Lock()  # held by the worker thread writing, and by close

    @classmethod
    def open(cls, path: Path) -> Spool:
        """Read the spool at ``path``, creating it (and its directory) if need be.

        Raises ``SpoolCorrupt`` for a line, other than a torn last one, that
        does not parse, and ``SpoolError`` when another process holds its lock
        or the file cannot be read or written.
        """
        spool = cls(path)
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            spool._take_lock()
            data = path.read_bytes() if path.exists() else b""
            spool._open(data)
        except OSError as exc:
            spool.close()
            raise SpoolError(f"cannot use the spool {path}: {exc.strerror or exc}") from exc
        except SpoolError:
            spool.close()
            raise
        return spool

    def _take_lock(self) -> None:
        # A file of its own: the spool itself is replaced when it is rewritten.
        self._lock_fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise SpoolError(
                f"another bridge holds the spool's lock {self.lock_path}: stop it first, "
                "or give this one another --state-dir"
            ) from exc

    def _open(self, data: bytes) -> None:
        *lines, torn = data.split(b"\n")  # each complete line ends with a newline
        for number, line in enumerate(lines, 1):
            try:
                self._apply(_decode(line))
            except msgspec.DecodeError as exc:
                raise SpoolCorrupt(
                    f"{self.path}:{number}: the spool does not parse ({exc}); mend or move "
                    "the file: the messages it holds have not reached the agent"
                ) from exc
        self._size = len(data) - len(torn)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        if torn:
            number = len(lines) + 1
            log.warning("telegram_spool_torn_line_dropped", path=str(self.path), line=number)
            os.ftruncate(self._fd, self._size)  # so that the next line starts a line
            os.fsync(self._fd)
        _sync_directory(self.path.parent)  # the file's name is durable too

    def close(self) -> None:
        """Close the file, once a write in progress has ended, and release its lock."""
        with self._file_lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            if self._lock_fd >= 0:
                os.close(self._lock_fd)  # releases the lock
                self._lock_fd = -1

    @property
    def pending(self) -> list[Spooled]:
        """The messages not done, in the order they came."""
        return list(self._pending.values())

    def knows(self, update_id: int) -> bool:
        """Whether the update ``update_id`` was taken before (its message pending or done)."""
        return update_id in self._pending or update_id in self._done

    async def add(self, message: Spooled) -> None:
        """Keep ``message`` until it is ``done``."""
        await self._record(message)

    async def sent(self, update_id: int, at: datetime) -> None:
        """The message's `stream` request goes out (first time only): the daemon may take it."""
        message = self._pending.get(update_id)
        if message is not None and message.sent_at is None:
            await self._record(_Sent(update_id=update_id, at=at))

    async def answer(self, update_id: int, message_ids: tuple[int, ...]) -> None:
        """The message's answer streams into the Telegram messages ``message_ids``."""
        message = self._pending.get(update_id)
        if message is not None and message.answer_ids != message_ids:
            await self._record(_Answer(update_id=update_id, message_ids=message_ids))

    async def done(self, update_id: int) -> None:
        """The message's answer is shown in its chat: nothing is left to do for it."""
        if update_id in self._pending:
            await self._record(_Done(update_id=update_id))

    async def _record(self, record: _Line) -> None:
        # Memory first: a write that fails or is cancelled leaves it ahead of
        # the file, never behind (a line appended after a rewrite that already
        # has its effect changes nothing: applying a line is idempotent).
        self._apply(record)
        try:
            async with self._lock:
                if self._size > max(_COMPACT_BYTES, 2 * self._compacted):
                    kept = [*self._pending.values(), *(_Done(update_id=i) for i in self._done)]
                    data = b"".join(_encode(line) + b"\n" for line in kept)
                    await anyio.to_thread.run_sync(self._rewrite, data)
                else:
                    # A `done` lost in a crash is harmless: the message is found
                    # in its conversation; an `answer`, the answer is shown anew.
                    # The others, lost, lose the message.
                    line = _encode(record) + b"\n"
                    sync = isinstance(record, Spooled | _Sent)
                    await anyio.to_thread.run_sync(self._append, line, sync)
        except OSError as exc:
            log.error("telegram_spool_write_failed", path=str(self.path), error=str(exc))

    def _apply(self, record: _Line) -> None:
        match record:
            case Spooled():
                self._pending[record.update_id] = record
            case _Sent(update_id=update_id, at=at):
                message = self._pending.get(update_id)
                if message is not None:
                    self._pending[update_id] = msgspec.structs.replace(message, sent_at=at)
            case _Answer(update_id=update_id, message_ids=message_ids):
                message = self._pending.get(update_id)
                if message is not None:
                    self._pending[update_id] = msgspec.structs.replace(
                        message, answer_ids=message_ids
                    )
            case _Done(update_id=update_id):
                self._pending.pop(update_id, None)
                self._done.append(update_id)

    def _append(self, line: bytes, sync: bool = True) -> None:
        with self._file_lock:
            self._check_open()
            try:
                written = 0
                while written < len(line):
                    written += os.write(self._fd, line[written:])
                if sync:
                    os.fsync(self._fd)
            except OSError:
                os.ftruncate(self._fd, self._size)  # no torn line before the next one
                raise
            self._size += len(line)

    def _rewrite(self, data: bytes) -> None:
        """Replace the file with ``data`` (what it must keep), atomically."""
        with self._file_lock:
            self._check_open()
            temporary = self.path.with_name(self.path.name + ".tmp")
            with open(temporary, "wb", opener=lambda p, flags: os.open(p, flags, 0o600)) as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, self.path)
            _sync_directory(self.path.parent)
            os.close(self._fd)
            self._fd = -1  # closed, should it not reopen
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
            self._size = self._compacted = len(data)

    def _check_open(self) -> None:
        if self._fd < 0:  # closed: its lock may be another bridge's by now
            raise OSError(errno.EBADF, "the spool is closed")


def _sync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
