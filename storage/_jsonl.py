"""The jsonl backend: a directory of human-readable files, one history file per conversation.

Layout of ``jsonl:///DIR``::

    DIR/store.json                    {"format": "chinwag-jsonl", "version": 1}
    DIR/lock                          flock()ed by the one process that has the store open
    DIR/cache.msgpack                 what opening would read, as of the last close
    DIR/notes.jsonl                   every agent's notes: one put_note per line
    DIR/mail.jsonl                    the mail: one write per line (storage/_jsonl_mail.py)
    DIR/outbox.jsonl                  webhook deliveries: one write per line (_jsonl_outbox.py)
    DIR/conversations/<id>.meta.json  id, agent, sender, title, cwd, created_at
    DIR/conversations/<id>.jsonl      the history: one entry per line, seq N on line N

``<id>`` is an integer given at creation and never changed, so neither a title
nor an agent's name is in a file name. A meta file is replaced atomically
(written to a temporary file, fsynced, renamed over, directory fsynced) on
creation and when the title or cwd changes, never on an append. A history file
is only ever appended to: each line is an ``Entry`` as msgspec JSON, so ``jq``
reads it. Every line of an append but its last also carries ``"more": true``:
that is how a load tells an append cut short by a crash (its lines so far end
in one with ``more``) from a whole one.

An append encodes all its lines, writes them with one ``write`` on the file
opened ``O_APPEND``, and fsyncs it before returning. If the write or the fsync
fails, the file is truncated back to what it held before, so a failed append
leaves nothing and consumes no seq. Appends to one conversation are serialized
and grouped: the ones that arrive while a write is under way go out together in
the next write, with one fsync. Appends to different conversations run
concurrently. All file I/O runs in worker threads (``trio.to_thread``) under
one ``CapacityLimiter``.

Opening indexes every conversation in memory (``list_conversations`` pages over
that index) without reading any history but its last line: a conversation's meta
file and the last line of its history file give its ``last_seq`` and
``updated_at``. Closing writes all of that to ``cache.msgpack``, with the inode,
size and mtime of each file it came from, and the next opening takes from the
cache every conversation whose two files still stat the same, reading the files
of the others (those a crashed session changed, or someone edited). So a clean
restart costs one read and a stat per file; the cache is never the only copy of
anything and is ignored when unreadable. A history file is read whole only when
its history is asked for.

An append that creates its conversation (``create=``) writes the meta file
first (made durable, name and all), then the history file with the append's
lines; if those cannot be written, it removes both again, so a failed append
creates nothing. A crash between the two leaves the conversation created with
no entries, as ``create_conversation`` would have, never a history without its
meta file. Appends (and creations) of a conversation being created wait for it.

``load_context`` reads the history file from the line of its latest compact
marker on: a marker's line is the last holding the bytes ``"kind":"compact"``
outside a string (a string escapes its quotes), so it is found without
decoding the lines before it.

On load, a last line that is torn (no newline) or unparsable, and the lines of an
append cut short before it, are truncated away on disk and logged
(``torn_line_dropped``). A bad line anywhere else is corruption and raises
``StorageError`` naming the file and line.

**Archives and notes.** A compaction is an append of one line: its marker
entry, which also carries the rest of its archive (``first_seq``,
``last_seq``, ``speakers``; the summary is the marker's content, the name its
``archive``), so archive and marker are stored, or not, together; a marker
appended without those fields is a marker with no archive. ``compact`` holds
the conversation's append lock while it reads the history to check the
archive (``check_archive``) and writes that line. ``notes.jsonl`` is
append-only too: each ``put_note`` adds one line (agent, name, content,
updated_at), fsynced before it returns, and a later line for an ``(agent,
name)`` replaces the earlier ones. It is read whole on the first ``put_note``
or search, and repaired like a history file: a torn or unparsable last line is
truncated away and logged, a bad line elsewhere is a ``StorageError``.

Search runs on a ``MemoryIndex`` (BM25, in memory), filled for an agent on its
first search: from the marker lines of its conversations' history files (each
read whole, once) and the archived entries before them, and from its notes.
``compact`` and ``put_note`` keep it current from then on. Opening reads
neither notes nor histories for it.

**Usage totals** need no file of their own: a history file keeps every line
ever appended (a compaction only appends its marker), so the ``usage`` its
entries carry is the conversation's totals, per UTC day of their
``created_at`` (``daily_usage``). The store holds them in memory: an append
adds what its lines carry once they are durable, and ``cache.msgpack`` keeps
them with the rest, so a clean restart reads no history for them. A
conversation the cache cannot vouch for has its history file read whole on
opening, decoding only the lines that hold ``"usage":{`` (a key only an entry
with usage has; a string escapes its quotes).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import heapq
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import msgspec
import structlog
import trio
from chinwag.protocol import ConversationItem, Entry, MemoryHit, TokenUsage, UsageTotal

from ._base import Archive, NewConversation, check_archive, search_words
from ._bus import Bus
from ._claims import LocalClaims
from ._conversation_search import folded_query, matches
from ._cursor import decode_cursor, encode_cursor
from ._errors import ConversationNotFound, StorageError
from ._jsonl_mail import JsonlMail
from ._jsonl_outbox import JsonlOutbox
from ._mail import MailStore
from ._outbox import Outbox
from ._search import MemoryIndex, archive_text, check_search_limit, note_text
from ._timestamps import from_text, to_text, utc
from ._usage import DailyUsage, add_daily, daily_usage, tokens_of, usage_totals, with_tokens

FORMAT = "chinwag-jsonl"
VERSION = 1

_T = TypeVar("_T")
_U = TypeVar("_U")
_CURSOR_TAG = "jsonl"
_MARKER = "store.json"
_LOCK = "lock"
_CACHE = "cache.msgpack"
_CACHE_VERSION = 2  # 2: with each conversation's usage totals
_NOTES = "notes.jsonl"
_MAIL = "mail.jsonl"
_OUTBOX = "outbox.jsonl"
_CONVERSATIONS = "conversations"
_META_SUFFIX = ".meta.json"
_HISTORY_SUFFIX = ".jsonl"
_TMP_SUFFIX = ".tmp"
_THREADS = 16  # worker threads doing file I/O at once
# notes.jsonl is rewritten with only the latest of each note when it loads with more
# lines than this and than twice its notes (put_note appends; a name can recur).
_NOTES_REWRITE_LINES = 256
_LOAD_CHUNK = 256  # conversations read per worker-thread call when opening or indexing
_TAIL_READ = 8192  # bytes read from the end of a history file to find its last line
_MORE = b',"more":true}'  # how a line that is not its append's last one ends
_ARCHIVED = b'"first_seq":'  # a key only a compaction's line has (a string escapes its ")
_COMPACT_KIND = b'"kind":"compact"'  # in a marker's line only, for the same reason
_USAGE = b'"usage":{'  # in the line of an entry with usage only, for the same reason


class _Meta(msgspec.Struct, kw_only=True):
    """The content of ``<id>.meta.json``."""

    id: int
    agent: str
    sender: str
    title: str = ""
    cwd: str | None = None
    created_at: datetime


class _Marker(msgspec.Struct, kw_only=True):
    """The content of ``store.json``."""

    format: str
    version: int


_Stat = tuple[int, int, int]  # a file's st_ino, st_size, st_mtime_ns


def _stat_of(result: os.stat_result) -> _Stat:
    return result.st_ino, result.st_size, result.st_mtime_ns


class _Cached(msgspec.Struct, array_like=True):
    """One conversation in ``cache.msgpack``, and the stat of the files it was read from."""

    id: int
    agent: str
    sender: str
    title: str
    cwd: str | None
    created_at: datetime
    updated_at: datetime
    last_seq: int
    size: int
    meta: _Stat
    history: _Stat | None  # None: there was no history file
    usage: DailyUsage


class _Cache(msgspec.Struct):
    """The content of ``cache.msgpack``: what opening would read, as of the last close."""

    version: int
    conversations: list[_Cached]


class _Line(Entry, kw_only=True):
    """A history line: an entry, and whether more lines of its append follow."""

    more: bool = False


class _CompactLine(Entry, kw_only=True):
    """A compaction's line: its marker entry, and the rest of its archive."""

    first_seq: int
    last_seq: int
    speakers: list[str]


class _Note(msgspec.Struct, kw_only=True):
    """A line of ``notes.jsonl``: one ``put_note``."""

    agent: str
    name: str
    content: str
    updated_at: datetime


_encoder = msgspec.json.Encoder()
_entry_decoder = msgspec.json.Decoder(Entry)
_line_decoder = msgspec.json.Decoder(_Line)
_meta_decoder = msgspec.json.Decoder(_Meta)
_marker_decoder = msgspec.json.Decoder(_Marker)
_cache_decoder = msgspec.msgpack.Decoder(_Cache)
_compact_decoder = msgspec.json.Decoder(_CompactLine)
_note_decoder = msgspec.json.Decoder(_Note)


def _log() -> Any:
    # Looked up at each use, not cached at import: structlog may be configured later
    # (or captured by a test), and these events are rare.
    return structlog.get_logger("chinwag.storage")


def parse_jsonl_url(url: str) -> Path:
    """``jsonl:///relative/dir`` or ``jsonl:////absolute/dir``; raises ``ValueError``."""
    parts = urlsplit(url, allow_fragments=False)
    if parts.scheme != "jsonl" or parts.netloc or not parts.path.startswith("/"):
        raise ValueError(
            f"{url!r} is not a jsonl URL; write jsonl:///relative/dir or jsonl:////absolute/dir."
        )
    path = parts.path[1:]
    if not path.strip("/"):
        raise ValueError(f"The jsonl URL {url!r} names no directory.")
    if parts.query:
        raise ValueError(f"The jsonl URL {url!r} takes no options, got {parts.query!r}.")
    return Path(path)


# --- the seams that write and sync (tests replace them to inject failures) ---------------


def _write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd``: one write, more only if one falls short."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:  # pragma: no cover - a regular file does not do this
            raise OSError(errno.EIO, "write wrote nothing")
        view = view[written:]


_fdatasync: Callable[[int], None] = getattr(os, "fdatasync", os.fsync)


def _sync(fd: int) -> None:
    """Make what was written to ``fd`` durable (its data and its size)."""
    _fdatasync(fd)


def _sync_dir(path: Path) -> None:
    """Make the names in directory ``path`` durable (a creation, a rename)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- state ------------------------------------------------------------------------------


class _PendingAppend:
    """One caller's append, waiting for the write of its conversation's group."""

    __slots__ = ("entries", "error", "result")

    def __init__(self, entries: list[Entry]) -> None:
        self.entries = entries  # the caller's, created_at stamped, seq still to assign
        self.result: list[Entry] | None = None
        self.error: StorageError | None = None


class _Conversation:
    """One conversation's state; its locks are made on first use (opening makes 10,000)."""

    __slots__ = (
        "_lock",
        "_meta_lock",
        "dirty",
        "exists",
        "history_stat",
        "id",
        "item",
        "meta_stat",
        "queue",
        "size",
        "usage",
    )

    def __init__(
        self,
        id: int,
        item: ConversationItem,
        *,
        size: int = 0,
        exists: bool = False,
        meta_stat: _Stat | None = None,
        history_stat: _Stat | None = None,
        usage: DailyUsage | None = None,
    ) -> None:
        self.id = id
        self.item = item  # last_seq and updated_at kept current
        self.usage: DailyUsage = {} if usage is None else usage  # what the history file holds
        self.size = size  # bytes of the history file that hold acknowledged appends
        self.exists = exists  # the history file exists and its name is durable
        self.dirty = False  # a failed append may have left bytes after ``size``
        # The stat of the files as this store last left them (None: not known), so
        # that the cache written on close is trusted only while they are unchanged.
        self.meta_stat = meta_stat
        self.history_stat = history_stat
        self.queue: list[_PendingAppend] = []  # appends waiting for the next write
        self._lock: trio.Lock | None = None
        self._meta_lock: trio.Lock | None = None

    @property
    def lock(self) -> trio.Lock:
        """Held by the task writing this conversation's queued appends."""
        if self._lock is None:
            self._lock = trio.Lock()
        return self._lock

    @property
    def meta_lock(self) -> trio.Lock:
        """Held while the meta file is replaced."""
        if self._meta_lock is None:
            self._meta_lock = trio.Lock()
        return self._meta_lock


@dataclass(frozen=True)
class _Tail:
    """What the end of a history file says: its size, last seq and newest created_at."""

    size: int
    last_seq: int
    updated_at: datetime | None  # None when the file holds no entry
    stat: _Stat | None = None  # the file's, when known to match the rest


@dataclass(frozen=True)
class _Written:
    """What a group write did, for the trio side to apply."""

    tail: _Tail | None  # the conversation's state now, None if unchanged
    exists: bool
    dirty: bool
    stat: _Stat | None  # the history file's now, None if not known
    added: DailyUsage = field(default_factory=dict)  # the usage of the lines written
    recounted: DailyUsage | None = None  # the file was read again: all the usage it holds


class _ChangedOutside(StorageError):
    """A ``_LineFile`` is not as this store left it: someone else wrote to it."""


class _LineFile:
    """An append-only file of JSON lines, such as ``notes.jsonl`` and ``mail.jsonl``.

    ``read`` loads it whole, truncating a torn or unparsable last line away (and
    logging it); ``append`` adds lines with one write and an fsync, cutting the
    file back when that fails. Both run in a worker thread, one at a time: the
    caller holds a lock.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = 0  # bytes of the file that hold acknowledged lines
        self.exists = False  # the file exists and its name is durable
        self.dirty = False  # a failed append may have left bytes after ``size``

    def read(self, decode: Callable[[bytes], _T], what: str) -> list[_T]:
        """Every line ``decode``d, after truncating a torn or unparsable last line.

        ``decode`` raises ``msgspec.DecodeError`` or ``ValueError`` for a line that
        is not ``what`` (say "a note"); such a line before the last is a
        ``StorageError`` naming the file and line. No file reads as no lines.
        """
        try:
            data, _ = _read_file(str(self.path))
        except FileNotFoundError:
            self.size, self.exists, self.dirty = 0, False, False
            return []
        lines = data.split(b"\n")
        end = len(data)
        reason = "torn (no newline)" if lines[-1] else ""
        lines.pop()  # what follows the last newline: nothing, or a torn line
        items: list[_T] = []
        for number, line in enumerate(lines, 1):
            try:
                items.append(decode(line))
            except (msgspec.DecodeError, ValueError) as exc:
                if number < len(lines) or reason:
                    raise StorageError(
                        f"{self.path}:{number}: the line is not {what} ({exc}), and it is not"
                        " the last line; fix or remove it by hand."
                    ) from exc
                reason = "unparsable"
                lines.pop()
                break
        if reason:
            good = sum(len(line) + 1 for line in lines)
            _log().warning(
                "torn_line_dropped",
                file=str(self.path),
                line=len(lines) + 1,
                lines=1,
                bytes=end - good,
                reason=reason,
            )
            _truncate(self.path, good)
            end = good
        self.size, self.exists, self.dirty = end, True, False
        return items

    def append(self, data: bytes) -> None:
        """Append ``data`` (whole lines) and fsync; on failure cut the file back. Read first.

        Raises ``_ChangedOutside`` when the file is not as this store left it.
        """
        flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC | (0 if self.exists else os.O_CREAT)
        fd = os.open(self.path, flags, 0o644)
        try:
            on_disk = os.fstat(fd).st_size
            if on_disk != self.size:
                if not (self.dirty and on_disk > self.size):
                    raise _ChangedOutside(f"{self.path} changed outside the store.")
                os.ftruncate(fd, self.size)  # what a failed append of ours left
            try:
                _write_all(fd, data)
                _sync(fd)
                if not self.exists:
                    _sync_dir(self.path.parent)
            except OSError:
                try:
                    os.ftruncate(fd, self.size)
                    _sync(fd)
                except OSError:
                    self.dirty = True  # the next append truncates first
                else:
                    self.dirty = False
                raise
        finally:
            os.close(fd)
        self.exists, self.dirty = True, False
        self.size += len(data)


def _decode_note(line: bytes) -> _Note:
    note = _note_decoder.decode(line)
    note.updated_at = utc(note.updated_at)
    return note


class _Notes(_LineFile):
    """``notes.jsonl`` and the notes it holds; loaded on first use.

    ``load`` and ``append`` run in a worker thread, one at a time: the caller
    holds ``lock``.
    """

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.lock = trio.Lock()
        self.notes: dict[tuple[str, str], _Note] | None = None  # None until loaded

    def load(self) -> dict[tuple[str, str], _Note]:
        """Read the file, truncating a torn or unparsable last line; every note by key."""
        read = self.read(_decode_note, "a note")
        notes = {(note.agent, note.name): note for note in read}
        self.notes = notes
        if len(read) > max(_NOTES_REWRITE_LINES, 2 * len(notes)):
            self._rewrite(len(read))
        return notes

    def _rewrite(self, lines: int) -> None:
        """Replace the file with one line per note, dropping the lines later ones replaced.

        Only to keep loading quick: a failure is logged and the file left as it is.
        """
        assert self.notes is not None
        data = b"".join(_encoder.encode(note) + b"\n" for note in self.notes.values())
        try:
            _replace_atomically(self.path, data)
        except OSError as exc:
            _log().warning("notes_not_compacted", file=str(self.path), error=str(exc))
            return
        self.size = len(data)
        _log().info("notes_compacted", file=str(self.path), lines=lines, notes=len(self.notes))

    def append_note(self, note: _Note) -> None:
        """Append ``note``'s line and fsync; on failure cut the file back. Loaded first."""
        assert self.notes is not None
        try:
            data = _encoder.encode(note) + b"\n"
        except (UnicodeEncodeError, TypeError) as exc:
            raise StorageError(f"The note could not be encoded: {exc}.") from exc
        try:
            self.append(data)
        except _ChangedOutside:
            self.notes = None  # read it again next time
            raise
        self.notes[note.agent, note.name] = note


class JsonlStorage:
    """A ``Storage`` in a directory of JSON-lines files; ``await JsonlStorage.open`` makes one."""

    shared = False  # the directory's lock keeps every other process out
    bus: Bus | None = None  # alone on its store: no other daemon to hear

    def __init__(
        self,
        path: Path,
        lock_fd: int,
        conversations: list[_Conversation],
        limiter: trio.CapacityLimiter,
        mail: JsonlMail,
        outbox: JsonlOutbox,
    ) -> None:
        """Wrap a loaded store; ``open`` is the way to get one."""
        self.path = path
        self.mail: MailStore = mail
        self._mail = mail  # the same, for close
        self.outbox: Outbox = outbox
        self._outbox = outbox  # the same, for close
        self._dir = path / _CONVERSATIONS
        self._lock_fd = lock_fd
        self._limiter = limiter
        self._by_key = {(c.item.agent, c.item.sender): c for c in conversations}
        self._next_id = max((c.id for c in conversations), default=0) + 1
        self._creating: dict[tuple[str, str], trio.Event] = {}
        self._claims = LocalClaims()
        self._writers = 0  # mutations under way; close waits for them
        self._idle: trio.Event | None = None
        self._closed = False
        self._notes = _Notes(path / _NOTES)
        self._memory = MemoryIndex()  # the agents in _indexed, and what was written since
        self._indexed: set[str] = set()
        self._indexing: dict[str, trio.Event] = {}

    @classmethod
    async def open(cls, path: Path | str) -> JsonlStorage:
        """Open the store in directory ``path``, creating it if missing, and index it."""
        path = Path(path)
        limiter = trio.CapacityLimiter(_THREADS)
        lock_fd, ids, cached = await trio.to_thread.run_sync(
            _prepare_directory, path, limiter=limiter
        )
        try:
            load = functools.partial(_load_conversations, path / _CONVERSATIONS, cached=cached)
            # A conversation the cache knows costs two stats to check: faster in one
            # thread than spread over many, where they only contend for the GIL.
            # Reading a conversation's files is I/O: that goes out in parallel.
            known = [id_ for id_ in ids if id_ in cached]
            conversations = await trio.to_thread.run_sync(load, known, limiter=limiter)
            unknown = [id_ for id_ in ids if id_ not in cached]
            conversations += await _in_chunks(load, unknown, limiter)
            seen: dict[tuple[str, str], int] = {}
            for conv in conversations:
                key = (conv.item.agent, conv.item.sender)
                if key in seen:
                    raise StorageError(
                        f"Conversations {seen[key]} and {conv.id} in {path / _CONVERSATIONS}"
                        f" are both ({key[0]}, {key[1]}); remove one."
                    )
                seen[key] = conv.id
            mail = await JsonlMail.open(_LineFile(path / _MAIL), limiter)
            outbox = await JsonlOutbox.open(_LineFile(path / _OUTBOX), limiter)
        except BaseException:
            os.close(lock_fd)
            raise
        return cls(path, lock_fd, conversations, limiter, mail, outbox)

    # --- plumbing ---------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError("The store is closed.")

    def _get(self, agent: str, sender: str) -> _Conversation:
        self._check_open()
        conv = self._by_key.get((agent, sender))
        if conv is None:
            raise ConversationNotFound(f"No conversation is stored for ({agent}, {sender}).")
        return conv

    async def _run(self, what: str, fn: Callable[..., _T], *args: Any) -> _T:
        """``fn(*args)`` in a worker thread; an ``OSError`` becomes a ``StorageError``."""
        try:
            return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)
        except OSError as exc:
            raise StorageError(f"{what} failed: {exc}.") from exc

    def _history_path(self, conv: _Conversation) -> Path:
        return self._dir / f"{conv.id}{_HISTORY_SUFFIX}"

    def _begin_write(self) -> None:
        self._check_open()
        self._writers += 1

    def _end_write(self) -> None:
        self._writers -= 1
        if not self._writers and self._idle is not None:
            self._idle.set()

    # --- conversations ----------------------------------------------------------

    async def get_conversation(self, agent: str, sender: str) -> ConversationItem | None:
        await trio.lowlevel.checkpoint()
        try:
            conv = self._get(agent, sender)
        except ConversationNotFound:
            return None
        return with_tokens(conv.item, conv.usage)

    async def create_conversation(
        self, agent: str, sender: str, *, cwd: str | None, created_at: datetime
    ) -> ConversationItem:
        created_at = utc(created_at)
        await trio.lowlevel.checkpoint()
        self._begin_write()  # from here on, close waits for it
        try:
            return await self._create((agent, sender), cwd, created_at)
        finally:
            self._end_write()

    async def _create(
        self, key: tuple[str, str], cwd: str | None, created_at: datetime
    ) -> ConversationItem:
        """``create_conversation``, for a caller that counts as a writer."""
        conv = await self._settled(key)
        if conv is not None:
            return with_tokens(conv.item, conv.usage)
        agent, sender = key
        done = self._creating[key] = trio.Event()
        try:
            meta = _Meta(
                id=self._next_id, agent=agent, sender=sender, cwd=cwd, created_at=created_at
            )
            self._next_id += 1  # taken even if the write fails: never two pairs for one id
            meta_stat = await self._run(
                f"Creating the conversation ({agent}, {sender})", _write_meta, self._dir, meta
            )
            item = ConversationItem(
                agent=agent, sender=sender, cwd=cwd, created_at=created_at, updated_at=created_at
            )
            self._by_key[key] = _Conversation(meta.id, item, meta_stat=meta_stat)
        finally:
            del self._creating[key]
            done.set()
        return msgspec.structs.replace(item)

    async def _settled(self, key: tuple[str, str]) -> _Conversation | None:
        """The conversation, or None; first waits for a creation of it under way to end."""
        while True:
            conv = self._by_key.get(key)
            if conv is not None:
                return conv
            creating = self._creating.get(key)
            if creating is None:
                return None
            await creating.wait()  # another task is creating it; then it exists, or not

    async def set_title(self, agent: str, sender: str, title: str) -> None:
        await self._set_meta(agent, sender, "title", title)

    async def set_cwd(self, agent: str, sender: str, cwd: str | None) -> None:
        await self._set_meta(agent, sender, "cwd", cwd)

    async def _set_meta(self, agent: str, sender: str, name: str, value: str | None) -> None:
        await trio.lowlevel.checkpoint()
        conv = self._get(agent, sender)
        async with conv.meta_lock:
            item = conv.item
            assert item.created_at is not None  # every stored conversation has one
            meta = _Meta(
                id=conv.id,
                agent=agent,
                sender=sender,
                title=item.title,
                cwd=item.cwd,
                created_at=item.created_at,
            )
            setattr(meta, name, value)
            self._begin_write()
            conv.meta_stat = None  # until the replacement is known to be done
            try:
                conv.meta_stat = await self._run(
                    f"Setting the {name} of ({agent}, {sender})", _write_meta, self._dir, meta
                )
            finally:
                self._end_write()
            setattr(conv.item, name, value)

    async def list_conversations(
        self,
        *,
        agent: str | None = None,
        sender: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
        query: str | None = None,
    ) -> tuple[list[ConversationItem], str | None]:
        await trio.lowlevel.checkpoint()
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}.")
        folded = None if query is None else folded_query(query)
        self._check_open()
        position = None
        if cursor is not None:
            text, id_ = decode_cursor(_CURSOR_TAG, cursor)
            position = (from_text(text), id_)
        matching = (
            conv
            for conv in self._by_key.values()
            if (agent is None or conv.item.agent == agent)
            and (sender is None or conv.item.sender == sender)
            and (folded is None or matches(folded, conv.item.title, conv.item.sender))
            and (position is None or _key(conv) < position)
        )
        top = heapq.nlargest(limit + 1, matching, key=_key)
        page = [with_tokens(conv.item, conv.usage) for conv in top[:limit]]
        next_cursor = None
        if len(top) > limit:
            updated_at, id_ = _key(top[limit - 1])
            next_cursor = encode_cursor(_CURSOR_TAG, to_text(updated_at), id_)
        return page, next_cursor

    # --- entries ----------------------------------------------------------------

    async def append(
        self,
        agent: str,
        sender: str,
        entries: Sequence[Entry],
        *,
        create: NewConversation | None = None,
    ) -> list[Entry]:
        """Append atomically and durably; see ``Storage.append``.

        Not cancellable: once called, the append completes or fails, and a
        cancellation lands at the caller's next checkpoint.
        """
        await trio.lowlevel.cancel_shielded_checkpoint()
        self._begin_write()  # from here on, close waits for it
        try:
            pending = _PendingAppend(_prepare(entries))
            key = (agent, sender)
            with trio.CancelScope(shield=True):
                conv = await self._settled(key)
                if conv is None:
                    if create is None:
                        raise ConversationNotFound(
                            f"No conversation is stored for ({agent}, {sender})."
                        )
                    if not entries:
                        await self._create(key, create.cwd, datetime.now(UTC))
                        return []
                    await self._create_with(key, create, pending)
                elif entries:
                    await self._append_to(conv, pending)
                else:
                    return []
        finally:
            self._end_write()
        if pending.error is not None:
            raise pending.error
        assert pending.result is not None
        return pending.result

    async def _append_to(self, conv: _Conversation, pending: _PendingAppend) -> None:
        """Queue ``pending`` for the conversation's next group and wait until it is written."""
        conv.queue.append(pending)
        async with conv.lock:  # fair: groups go out in arrival order
            if pending.result is None and pending.error is None:
                group, conv.queue = conv.queue, []
                try:
                    await self._write_group(conv, group)
                finally:
                    for other in group:
                        if other.result is None and other.error is None:
                            other.error = StorageError("The append was not written.")

    async def _create_with(
        self, key: tuple[str, str], create: NewConversation, pending: _PendingAppend
    ) -> None:
        """Create the conversation ``key`` with ``pending`` as its first append, or neither.

        For a conversation neither stored nor being created, by a caller that
        counts as a writer; sets ``pending``'s result or error.
        """
        agent, sender = key
        first = pending.entries[0].created_at
        assert first is not None  # _prepare stamped it
        done = self._creating[key] = trio.Event()
        try:
            meta = _Meta(
                id=self._next_id, agent=agent, sender=sender, cwd=create.cwd, created_at=first
            )
            self._next_id += 1  # taken even if the write fails: never two pairs for one id
            item = ConversationItem(
                agent=agent, sender=sender, cwd=create.cwd, created_at=first, updated_at=first
            )
            conv = _Conversation(meta.id, item)
            path = self._history_path(conv)
            written, meta_stat = await trio.to_thread.run_sync(
                _create_with_history,
                self._dir,
                meta,
                f"({agent}, {sender}) in {path}",
                path,
                pending,
                limiter=self._limiter,
            )
            if meta_stat is not None:  # created, or could not be taken back
                conv.meta_stat = meta_stat
                self._apply(conv, written)
                self._by_key[key] = conv
        finally:
            del self._creating[key]
            done.set()

    async def _write_group(self, conv: _Conversation, group: list[_PendingAppend]) -> None:
        """Write ``group`` with one write and one fsync; sets each one's result or error."""
        path = self._history_path(conv)
        item = conv.item
        written = await trio.to_thread.run_sync(
            _write_group,
            f"({item.agent}, {item.sender}) in {path}",
            path,
            group,
            conv.size,
            item.last_seq,
            conv.exists,
            conv.dirty,
            conv.history_stat,
            limiter=self._limiter,
        )
        # Back on the trio side, with no checkpoint until the state is updated.
        self._apply(conv, written)

    def _apply(self, conv: _Conversation, written: _Written) -> None:
        """Make ``conv`` say what a write of its history did."""
        conv.exists, conv.dirty, conv.history_stat = written.exists, written.dirty, written.stat
        if written.recounted is not None:
            conv.usage = written.recounted
        add_daily(conv.usage, written.added)
        if written.tail is not None:
            conv.size = written.tail.size
            conv.item.last_seq = written.tail.last_seq
            conv.item.updated_at = written.tail.updated_at or conv.item.created_at

    async def load_context(
        self, agent: str, sender: str
    ) -> tuple[ConversationItem, list[Entry]] | None:
        """The metadata and the entries from the latest marker on; see ``Storage.load_context``."""
        await trio.lowlevel.checkpoint()
        self._check_open()
        conv = self._by_key.get((agent, sender))
        if conv is None:
            return None
        item = with_tokens(conv.item, conv.usage)  # as of conv.size: no checkpoint between
        if conv.size == 0:
            return item, []
        path = self._history_path(conv)
        entries = await self._run(f"Reading {path}", _read_context, path, conv.size)
        return item, entries

    async def history(
        self,
        agent: str,
        sender: str,
        *,
        after_seq: int = 0,
        limit: int | None = None,
        include_archived: bool = False,
    ) -> list[Entry]:
        await trio.lowlevel.checkpoint()
        if limit is not None and limit < 0:
            raise ValueError(f"limit must not be negative, got {limit}.")
        conv = self._get(agent, sender)
        if conv.size == 0:
            return []
        path = self._history_path(conv)
        entries = await self._run(f"Reading {path}", _read_history, path, conv.size)
        marker_seq = 0
        if not include_archived:
            marker_seq = max((e.seq for e in entries if e.kind == "compact"), default=0)
        visible: list[Entry] = []
        for entry in entries[max(after_seq, 0) :]:
            if limit is not None and len(visible) >= limit:
                break
            if entry.seq >= marker_seq or entry.kind == "compact":
                visible.append(entry)
        return visible

    # --- archives and notes -------------------------------------------------------

    async def compact(
        self, agent: str, sender: str, archive: Archive, *, usage: TokenUsage | None = None
    ) -> Entry:
        """Store the archive and append its marker as one line; see ``Storage.compact``.

        Not cancellable, like ``append``.
        """
        (marker,) = _prepare([archive.marker(usage)])
        line = _CompactLine(
            **msgspec.structs.asdict(marker),
            first_seq=archive.first_seq,
            last_seq=archive.last_seq,
            speakers=list(archive.speakers),
        )
        await trio.lowlevel.cancel_shielded_checkpoint()
        conv = self._get(agent, sender)
        pending = _PendingAppend([line])
        self._begin_write()
        try:
            with trio.CancelScope(shield=True):
                async with conv.lock:  # no append between the check and the write
                    entries, archives = await self._read_archives(conv)
                    check_archive(
                        archive,
                        marker_seq=max((e.seq for e in entries if e.kind == "compact"), default=0),
                        last_seq=conv.item.last_seq,
                        names=archives,
                    )
                    await self._write_group(conv, [pending])
        finally:
            self._end_write()
        if pending.error is not None:
            raise pending.error
        text = archive_text(archive.summary, entries[archive.first_seq - 1 :])
        await trio.to_thread.run_sync(
            functools.partial(
                self._memory.put,
                agent,
                "archive",
                archive.name,
                sender=sender,
                text=text,
                created_at=marker.created_at,
            )
        )
        marker.seq = line.seq
        return marker

    async def usage(
        self,
        *,
        agent: str | None = None,
        sender: str | None = None,
        since: date | None = None,
    ) -> list[UsageTotal]:
        """The usage totals by day, agent and sender; see ``Storage.usage``."""
        await trio.lowlevel.checkpoint()
        self._check_open()
        conversations = ((a, s, conv.usage) for (a, s), conv in self._by_key.items())
        return usage_totals(conversations, agent=agent, sender=sender, since=since)

    async def total_tokens(self) -> tuple[int, int]:
        """Every stored call's tokens; see ``Storage.total_tokens``."""
        await trio.lowlevel.checkpoint()
        self._check_open()
        return tokens_of(conv.usage for conv in self._by_key.values())

    async def get_archive(self, agent: str, sender: str, name: str) -> Archive | None:
        await trio.lowlevel.checkpoint()
        _, archives = await self._read_archives(self._get(agent, sender))
        return archives.get(name)

    async def _read_archives(self, conv: _Conversation) -> tuple[list[Entry], dict[str, Archive]]:
        """The conversation's history, and the archives its marker lines carry, by name."""
        archives: dict[str, Archive] = {}
        if not conv.size:
            return [], archives
        path = self._history_path(conv)
        entries = await self._run(f"Reading {path}", _read_history, path, conv.size, archives)
        return entries, archives

    async def put_note(self, agent: str, name: str, content: str, *, updated_at: datetime) -> None:
        """Create or replace the note; see ``Storage.put_note``. Not cancellable."""
        note = _Note(agent=agent, name=name, content=content, updated_at=utc(updated_at))
        await trio.lowlevel.cancel_shielded_checkpoint()
        self._begin_write()
        try:
            with trio.CancelScope(shield=True):
                async with self._notes.lock:
                    await self._load_notes()
                    await self._run(
                        f"Writing a note to {self._notes.path}", self._notes.append_note, note
                    )
                    # Under the lock, so an index being built reads notes and index alike.
                    await trio.to_thread.run_sync(
                        functools.partial(
                            self._memory.put,
                            agent,
                            "note",
                            name,
                            sender=None,
                            text=note_text(name, content),
                            created_at=note.updated_at,
                        )
                    )
        finally:
            self._end_write()

    async def _load_notes(self) -> dict[tuple[str, str], _Note]:
        """Every note, read from ``notes.jsonl`` on first use. Holding ``self._notes.lock``."""
        if self._notes.notes is None:
            return await self._run(f"Reading {self._notes.path}", self._notes.load)
        return self._notes.notes

    async def search_memory(
        self, agent: str, query: str, *, limit: int = 10, sender: str | None = None
    ) -> list[MemoryHit]:
        """The agent's notes and archives matching any word of ``query``, best BM25 first."""
        check_search_limit(limit)
        await trio.lowlevel.checkpoint()
        self._check_open()
        if search_words(query):
            await self._index(agent)
        return await trio.to_thread.run_sync(self._memory.search, agent, query, limit, sender)

    async def _index(self, agent: str) -> None:
        """Fill the index with the agent's archives and notes, once; concurrent calls wait."""
        while agent not in self._indexed:
            building = self._indexing.get(agent)
            if building is not None:
                await building.wait()  # then it is built, or it failed and we try again
                continue
            building = self._indexing[agent] = trio.Event()
            try:
                conversations = [
                    (conv.id, conv.item.sender, conv.size)
                    for conv in self._by_key.values()
                    if conv.item.agent == agent and conv.size
                ]
                read = functools.partial(_archives_in, self._dir, self._memory, agent)
                # Each chunk's archives go into the index in its worker thread.
                await _in_chunks(read, conversations, self._limiter)
                # A compaction since those reads has put its archive already: the same one.
                async with self._notes.lock:
                    notes = [n for n in (await self._load_notes()).values() if n.agent == agent]
                    await trio.to_thread.run_sync(_index_notes, self._memory, agent, notes)
                self._indexed.add(agent)
            finally:
                del self._indexing[agent]
                building.set()

    # --- claims: one process per directory, so only this store's own claims refuse ------

    async def claim(self, agent: str, sender: str) -> bool:
        """Take the conversation for this store's runs; see ``Storage.claim``."""
        return await self._claims.claim(agent, sender)

    async def release(self, agent: str, sender: str) -> None:
        """Give up a claim; see ``Storage.release``."""
        await self._claims.release(agent, sender)

    # --- lifetime -----------------------------------------------------------------

    async def close(self) -> None:
        """Let mutations under way finish, then release the directory. Idempotent; shielded."""
        if self._closed:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        self._closed = True
        self._claims.close()
        with trio.CancelScope(shield=True):
            await self._mail.close()
            await self._outbox.close()
            while self._writers:
                self._idle = trio.Event()
                await self._idle.wait()
            cache = _Cache(
                version=_CACHE_VERSION,
                conversations=[
                    _cached(conv)
                    for conv in self._by_key.values()
                    if conv.meta_stat is not None and (conv.history_stat or not conv.exists)
                ],
            )
            try:
                await trio.to_thread.run_sync(_write_cache, self.path, cache, limiter=self._limiter)
            finally:
                os.close(self._lock_fd)  # releases the flock


def _cached(conv: _Conversation) -> _Cached:
    item = conv.item
    assert item.created_at is not None and item.updated_at is not None
    assert conv.meta_stat is not None
    return _Cached(
        id=conv.id,
        agent=item.agent,
        sender=item.sender,
        title=item.title,
        cwd=item.cwd,
        created_at=item.created_at,
        updated_at=item.updated_at,
        last_seq=item.last_seq,
        size=conv.size,
        meta=conv.meta_stat,
        history=conv.history_stat if conv.exists else None,
        usage=conv.usage,
    )


def _key(conv: _Conversation) -> tuple[datetime, int]:
    assert conv.item.updated_at is not None
    return conv.item.updated_at, conv.id


def _prepare(entries: Sequence[Entry]) -> list[Entry]:
    """The entries to store, ``created_at`` stamped in place (UTC); a naive time raises first."""
    now = datetime.now(UTC)
    for entry in entries:
        entry.created_at = now if entry.created_at is None else utc(entry.created_at)
    return list(entries)


async def _in_chunks(
    fn: Callable[[list[_T]], list[_U]], items: list[_T], limiter: trio.CapacityLimiter
) -> list[_U]:
    """``fn`` over ``items``, ``_LOAD_CHUNK`` at a time in concurrent worker threads.

    The results come in no particular order; the first error is raised as itself.
    """
    results: list[_U] = []
    errors: list[Exception] = []

    async def run(chunk: list[_T]) -> None:
        try:
            done = await trio.to_thread.run_sync(fn, chunk, limiter=limiter)
        except Exception as exc:  # raised as itself below, not in an ExceptionGroup
            errors.append(exc)
            nursery.cancel_scope.cancel()
        else:
            results.extend(done)

    async with trio.open_nursery() as nursery:
        for start in range(0, len(items), _LOAD_CHUNK):
            nursery.start_soon(run, items[start : start + _LOAD_CHUNK])
    if errors:
        raise errors[0]
    return results


# --- worker-thread functions -------------------------------------------------------------


def _archives_in(
    directory: Path, memory: MemoryIndex, agent: str, conversations: list[tuple[int, str, int]]
) -> list[str]:
    """Put the archives in each ``(id, sender, size)`` into ``memory``; their names.

    Runs in a worker thread: reading and tokenizing is the slow part.
    """
    indexed: list[str] = []
    for id_, sender, size in conversations:
        path = directory / f"{id_}{_HISTORY_SUFFIX}"
        archives: dict[str, Archive] = {}
        try:
            entries = _read_history(path, size, archives)
        except OSError as exc:
            raise StorageError(f"Could not read {path}: {exc}.") from exc
        for archive in archives.values():
            archived = entries[archive.first_seq - 1 : archive.last_seq]
            memory.put(
                agent,
                "archive",
                archive.name,
                sender=sender,
                text=archive_text(archive.summary, archived),
                created_at=archive.created_at,
            )
            indexed.append(archive.name)
    return indexed


def _index_notes(memory: MemoryIndex, agent: str, notes: list[_Note]) -> None:
    for note in notes:
        memory.put(
            agent,
            "note",
            note.name,
            sender=None,
            text=note_text(note.name, note.content),
            created_at=note.updated_at,
        )


def _prepare_directory(path: Path) -> tuple[int, list[int], dict[int, _Cached]]:
    """Create or check the store's directory and lock it.

    Returns the lock's fd, the conversations' ids, and what the cache says of them.
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"Could not create the jsonl store directory {path}: {exc}.") from exc
    try:
        lock_fd = os.open(path / _LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise StorageError(f"Could not open the jsonl store {path}: {exc}.") from exc
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StorageError(
                f"The jsonl store {path} is in use by another process (it holds {path / _LOCK})."
            ) from None
        _check_marker(path)
        conversations = path / _CONVERSATIONS
        if not conversations.is_dir():
            conversations.mkdir()
            _sync_dir(path)
        metas: set[str] = set()
        histories: set[str] = set()
        for name in os.listdir(conversations):  # names only: 20,000 of them in a few ms
            if name.endswith(_META_SUFFIX):
                metas.add(name[: -len(_META_SUFFIX)])
            elif name.endswith(_HISTORY_SUFFIX):
                histories.add(name[: -len(_HISTORY_SUFFIX)])
            elif name.endswith(_META_SUFFIX + _TMP_SUFFIX):  # a crash cut a replacement short
                os.unlink(conversations / name)
        # Other names (an editor's backup, a note, 12.jsonl.orig) are not the store's.
        ids = sorted(int(stem) for stem in metas if _is_id(stem))
        orphans = sorted(int(stem) for stem in histories.difference(metas) if _is_id(stem))
        if orphans:
            orphan = conversations / f"{orphans[0]}{_HISTORY_SUFFIX}"
            raise StorageError(
                f"{orphan} has no {orphans[0]}{_META_SUFFIX} beside it: the store is"
                f" damaged ({len(orphans)} such history files)."
            )
    except OSError as exc:
        os.close(lock_fd)
        raise StorageError(f"Could not open the jsonl store {path}: {exc}.") from exc
    except BaseException:
        os.close(lock_fd)
        raise
    return lock_fd, ids, _read_cache(path)


def _is_id(stem: str) -> bool:
    """Whether a file name's stem is an id this store gives: digits, no leading zero."""
    return stem.isdigit() and stem.isascii() and (stem == "0" or stem[0] != "0")


def _read_cache(path: Path) -> dict[int, _Cached]:
    """What ``cache.msgpack`` says, by id; nothing if it is missing or unreadable."""
    try:
        cache = _cache_decoder.decode((path / _CACHE).read_bytes())
    except FileNotFoundError:
        return {}
    except (OSError, msgspec.DecodeError) as exc:  # only a cache: the files say it all
        _log().info("jsonl_cache_ignored", file=str(path / _CACHE), error=str(exc))
        return {}
    if cache.version != _CACHE_VERSION:
        return {}
    return {conv.id: conv for conv in cache.conversations}


def _write_cache(path: Path, cache: _Cache) -> None:
    """Replace ``cache.msgpack``; a failure is logged, not raised (it is only a cache)."""
    try:
        _replace_atomically(path / _CACHE, msgspec.msgpack.encode(cache))
    except OSError as exc:
        _log().warning("jsonl_cache_not_written", file=str(path / _CACHE), error=str(exc))


def _check_marker(path: Path) -> None:
    """Refuse a directory that is not a jsonl store (or a newer one); mark a new one."""
    marker = path / _MARKER
    try:
        raw = marker.read_bytes()
    except FileNotFoundError:
        strangers = sorted(
            name
            for name in os.listdir(path)
            if name not in (_LOCK, _CONVERSATIONS, _MARKER + _TMP_SUFFIX)
        )
        if strangers or any((path / _CONVERSATIONS).glob("*")):
            raise StorageError(
                f"{path} is not empty and not a chinwag jsonl store (it has no {_MARKER});"
                " point the jsonl URL at an empty or new directory."
            ) from None
        _replace_atomically(marker, _encoder.encode(_Marker(format=FORMAT, version=VERSION)))
        _sync_dir(path.absolute().parent)  # the store's own name, if this made it
        return
    try:
        found = _marker_decoder.decode(raw)
    except msgspec.DecodeError as exc:
        raise StorageError(f"{marker} is not a chinwag jsonl store marker: {exc}.") from exc
    if found.format != FORMAT:
        raise StorageError(f"{marker} names the format {found.format!r}, not {FORMAT!r}.")
    if found.version > VERSION:
        raise StorageError(
            f"The jsonl store {path} has format version {found.version}, newer than this"
            f" chinwag knows ({VERSION}); upgrade chinwag."
        )


def _replace_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: temp file, fsync, rename over, fsync the directory."""
    tmp = path.with_name(path.name + _TMP_SUFFIX)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _sync_dir(path.parent)


def _write_meta(directory: Path, meta: _Meta) -> _Stat:
    """Replace the conversation's meta file; the new file's stat."""
    try:
        data = _encoder.encode(meta) + b"\n"
    except (UnicodeEncodeError, TypeError) as exc:
        raise StorageError(f"The conversation's metadata could not be encoded: {exc}.") from exc
    path = directory / f"{meta.id}{_META_SUFFIX}"
    _replace_atomically(path, data)
    return _stat_of(os.stat(path))


def _load_conversations(
    directory: Path, ids: list[int], *, cached: dict[int, _Cached]
) -> list[_Conversation]:
    """Load each of ``ids``: from the cache if its files are as it says, else from them."""
    prefix = f"{directory}{os.sep}"  # str paths: pathlib would double the cost of a load
    loaded: list[_Conversation] = []
    for id_ in ids:
        meta_path = f"{prefix}{id_}{_META_SUFFIX}"
        history = f"{prefix}{id_}{_HISTORY_SUFFIX}"
        record = cached.get(id_)
        if record is not None and _still_valid(record, meta_path, history):
            item = ConversationItem(
                agent=record.agent,
                sender=record.sender,
                title=record.title,
                cwd=record.cwd,
                created_at=record.created_at,
                updated_at=record.updated_at,
                last_seq=record.last_seq,
            )
            conv = _Conversation(
                id_,
                item,
                size=record.size,
                exists=record.history is not None,
                meta_stat=record.meta,
                history_stat=record.history,
                usage=record.usage,
            )
        else:
            conv = _load_conversation(id_, meta_path, history)
        loaded.append(conv)
    return loaded


def _still_valid(record: _Cached, meta_path: str, history: str) -> bool:
    """Whether the files of a cached conversation are as they were when it was cached."""
    try:
        if _stat_of(os.stat(meta_path)) != record.meta:
            return False
    except OSError:
        return False
    try:
        stat = _stat_of(os.stat(history))
    except FileNotFoundError:
        return record.history is None
    except OSError:
        return False
    return stat == record.history and stat[1] == record.size


def _load_conversation(id_: int, meta_path: str, history: str) -> _Conversation:
    """Read the meta file and the last line of the history file of conversation ``id_``,
    and the history's usage."""
    try:
        raw, meta_stat = _read_file(meta_path)
    except OSError as exc:
        raise StorageError(f"Could not read {meta_path}: {exc}.") from exc
    try:
        meta = _meta_decoder.decode(raw)
        created_at = utc(meta.created_at)
    except (msgspec.DecodeError, ValueError) as exc:
        raise StorageError(f"{meta_path} is not a conversation's metadata: {exc}.") from exc
    if meta.id != id_:
        raise StorageError(f"{meta_path} says it is conversation {meta.id}, not {id_}.")
    usage: DailyUsage = {}
    try:
        tail = _load_tail(history)
        if tail.size:
            usage = _usage_in(history, tail.size)
    except FileNotFoundError:
        tail, exists = _Tail(0, 0, None), False
    except OSError as exc:
        raise StorageError(f"Could not read {history}: {exc}.") from exc
    else:
        exists = True
    item = ConversationItem(
        agent=meta.agent,
        sender=meta.sender,
        title=meta.title,
        cwd=meta.cwd,
        created_at=created_at,
        updated_at=tail.updated_at or created_at,
        last_seq=tail.last_seq,
    )
    return _Conversation(
        id_,
        item,
        size=tail.size,
        exists=exists,
        meta_stat=meta_stat,
        history_stat=tail.stat,
        usage=usage,
    )


def _read_file(path: str) -> tuple[bytes, _Stat]:
    """The file's content and its stat."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        stat = _stat_of(os.fstat(fd))
        return (_pread(fd, stat[1], 0) if stat[1] else b""), stat
    finally:
        os.close(fd)


class _Backwards:
    """Reads a file from its end towards its start, keeping what it read."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.start = size  # file offset of data[0]
        self.data = b""
        if size:
            self._extend(_TAIL_READ)

    def _extend(self, n: int) -> None:
        begin = max(0, self.start - n)
        self.data = _pread(self.fd, self.start - begin, begin) + self.data
        self.start = begin

    def line_start(self, stop: int) -> int:
        """The offset just after the last newline before offset ``stop`` (0 if none)."""
        while True:
            found = self.data.rfind(b"\n", 0, stop - self.start)
            if found >= 0:
                return self.start + found + 1
            if self.start == 0:
                return 0
            self._extend(max(len(self.data), 65536))

    def slice(self, begin: int, end: int) -> bytes:
        return self.data[begin - self.start : end - self.start]


def _pread(fd: int, n: int, offset: int) -> bytes:
    chunks: list[bytes] = []
    while n > 0:
        chunk = os.pread(fd, n, offset)
        if not chunk:
            raise OSError(errno.EIO, "the file shrank while it was read")
        chunks.append(chunk)
        n -= len(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _decode_line(line: bytes) -> _Line | None:
    """The line's entry, or None if it is not one (with a timezone-aware created_at)."""
    try:
        entry = _line_decoder.decode(line)
    except msgspec.DecodeError:
        return None
    if entry.created_at is None or entry.created_at.tzinfo is None:
        return None
    return entry


def _load_tail(path: str | Path) -> _Tail:
    """The state the end of history file ``path`` gives, after dropping a torn append there.

    Raises ``FileNotFoundError`` when there is no such file, ``StorageError``
    when a line before the last is corrupt.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        stat = _stat_of(os.fstat(fd))
        size = stat[1]
        if not size:
            return _Tail(0, 0, None, stat)
        # The common case, in one read: a whole last line that ends its append.
        n = min(size, _TAIL_READ)
        data = _pread(fd, n, size - n)
        if data[-1:] == b"\n":
            newline = data.rfind(b"\n", 0, n - 1)
            if newline >= 0 or n == size:
                last = _decode_line(data[newline + 1 : -1])
                if last is not None and not last.more:
                    assert last.created_at is not None  # _decode_line checked it
                    return _Tail(size, last.seq, utc(last.created_at), stat)
        end, last, dropped, reason = _find_whole_end(str(path), fd, size)
    finally:
        os.close(fd)
    if end < size:
        _log().warning(
            "torn_line_dropped",
            file=str(path),
            line=1 if last is None else last.seq + 1,
            lines=dropped,
            bytes=size - end,
            reason=reason,
        )
        stat = _truncate(path, end)
    if last is None:
        return _Tail(end, 0, None, stat)
    assert last.created_at is not None  # _decode_line checked it
    return _Tail(end, last.seq, utc(last.created_at), stat)


def _find_whole_end(path: str, fd: int, size: int) -> tuple[int, _Line | None, int, str]:
    """Where the whole appends of history file ``fd`` end, reading backwards from its end.

    Returns that offset, the last line before it (None if none), how many lines
    come after it, and why they do not count (a torn last line, or the lines of
    an append cut short). Raises ``StorageError`` for a bad line before those.
    """
    reader = _Backwards(fd, size)
    end = size  # lines in [0, end) are kept
    reason = ""
    last: _Line | None = None
    start = 0
    if reader.slice(size - 1, size) != b"\n":
        reason = "torn (no newline)"
        end = reader.line_start(size)
    else:
        start = reader.line_start(size - 1)
        last = _decode_line(reader.slice(start, size - 1))
        if last is None:
            reason = "unparsable"
            end = start
    dropped = 1 if reason else 0
    while end:
        if last is None:
            start = reader.line_start(end - 1)
            last = _decode_line(reader.slice(start, end - 1))
            if last is None:
                line = _count_lines(fd, start) + 1
                raise StorageError(
                    f"{path}:{line}: the line is not a valid entry, and it is not the last"
                    " line; fix or remove it by hand."
                )
        if not last.more:
            break
        # The last line kept so far belongs to an append whose later lines are gone.
        reason = reason or "its append was cut short"
        dropped += 1
        end, last = start, None
    return end, last, dropped, reason


def _count_lines(fd: int, end: int) -> int:
    """Newlines in the first ``end`` bytes of ``fd``."""
    count, offset = 0, 0
    while offset < end:
        block = _pread(fd, min(1 << 20, end - offset), offset)
        count += block.count(b"\n")
        offset += len(block)
    return count


def _truncate(path: str | Path, size: int) -> _Stat:
    """Cut the file to ``size`` bytes, durably; its stat after."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        _sync(fd)
        return _stat_of(os.fstat(fd))
    finally:
        os.close(fd)


def _encode_group(group: list[_PendingAppend], last_seq: int) -> tuple[bytes, int]:
    """The lines of every append in ``group`` that encodes, seqs assigned; the new last seq.

    An append that does not encode gets its error and takes no seq.
    """
    chunks: list[bytes] = []
    for pending in group:
        lines: list[bytes] = []
        try:
            for seq, entry in enumerate(pending.entries, last_seq + 1):
                entry.seq = seq
                lines.append(_encoder.encode(entry))
        except (UnicodeEncodeError, TypeError, OverflowError) as exc:
            pending.error = StorageError(f"Entry {seq} could not be encoded: {exc}.")
            pending.error.__cause__ = exc
            continue
        for n in range(len(lines) - 1):  # every line but the append's last says more follow
            lines[n] = lines[n][:-1] + _MORE
        lines.append(b"")
        chunks.append(b"\n".join(lines))
        last_seq += len(pending.entries)
    return b"".join(chunks), last_seq


def _write_group(
    what: str,
    path: Path,
    group: list[_PendingAppend],
    size: int,
    last_seq: int,
    exists: bool,
    dirty: bool,
    stat: _Stat | None,
) -> _Written:
    """Append ``group``'s lines to ``path`` in one write, then fsync. Worker thread.

    Sets each pending append's ``result`` or ``error``, naming the conversation
    as ``what`` says; no ``OSError`` escapes.
    """
    data, new_last_seq = _encode_group(group, last_seq)
    return _write_encoded(what, path, group, data, new_last_seq, size, exists, dirty, stat)


def _write_encoded(
    what: str,
    path: Path,
    group: list[_PendingAppend],
    data: bytes,
    new_last_seq: int,
    size: int,
    exists: bool,
    dirty: bool,
    stat: _Stat | None,
) -> _Written:
    """``_write_group`` once ``_encode_group`` made ``data``, the lines of its good appends."""
    good = [pending for pending in group if pending.error is None]
    if not good:
        return _Written(None, exists, dirty, stat)

    def fail(message: str, exc: BaseException | None) -> None:
        for pending in good:
            pending.error = StorageError(message)
            pending.error.__cause__ = exc

    flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC | (0 if exists else os.O_CREAT)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        fail(f"Appending to {what} failed: {exc}.", exc)
        return _Written(None, exists, dirty, None)
    try:
        on_disk = os.fstat(fd).st_size
        if on_disk != size:
            if not (dirty and on_disk > size):
                # Someone else changed the file: read it again, and fail this once.
                tail = _load_tail(path)
                recounted = _usage_in(path, tail.size)
                fail(f"{path} changed outside the store; the append was not written.", None)
                return _Written(tail, exists, False, tail.stat, recounted=recounted)
            os.ftruncate(fd, size)  # what a failed append of ours left
        try:
            _write_all(fd, data)
            _sync(fd)
            if not exists:
                _sync_dir(path.parent)
        except OSError as exc:
            try:
                os.ftruncate(fd, size)
                _sync(fd)
            except OSError:
                dirty = True  # the next append truncates first
            else:
                dirty = False
            fail(f"Appending to {what} failed: {exc}.", exc)
            return _Written(None, exists, dirty, None)
        new_stat = _stat_of(os.fstat(fd))
    except OSError as exc:  # fstat, ftruncate, the re-read
        fail(f"Appending to {what} failed: {exc}.", exc)
        return _Written(None, exists, True, None)
    except StorageError as exc:  # the re-read found corruption
        fail(str(exc), exc)
        return _Written(None, exists, dirty, None)
    finally:
        os.close(fd)
    for pending in good:
        pending.result = pending.entries
    newest = good[-1].entries[-1].created_at
    tail = _Tail(size + len(data), new_last_seq, newest, new_stat)
    added = daily_usage(entry for pending in good for entry in pending.entries)
    return _Written(tail, True, False, new_stat, added=added)


def _create_with_history(
    directory: Path, meta: _Meta, what: str, path: Path, pending: _PendingAppend
) -> tuple[_Written, _Stat | None]:
    """Create a conversation: its meta file, then its history holding ``pending``. Worker thread.

    All or nothing: when the lines cannot be written, the meta file and the
    history file are removed again. Sets ``pending``'s result or error; returns
    what the history write did and the meta file's stat, None when nothing
    was created.
    """
    nothing = _Written(None, False, False, None)
    data, last_seq = _encode_group([pending], 0)
    if pending.error is not None:  # an entry did not encode: nothing touched the disk
        return nothing, None
    try:
        meta_stat = _write_meta(directory, meta)
    except (OSError, StorageError) as exc:
        pending.error = StorageError(f"Creating {what} failed: {exc}.")
        pending.error.__cause__ = exc
        return nothing, None
    written = _write_encoded(what, path, [pending], data, last_seq, 0, False, False, None)
    if pending.error is None:
        return written, meta_stat
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.unlink(directory / f"{meta.id}{_META_SUFFIX}")
        _sync_dir(directory)
    except OSError:
        # The disk refuses even this: the conversation stays, with what the failed
        # write left (the next append truncates it), as create_conversation leaves one.
        return written, meta_stat
    return nothing, None


def _read_context(path: Path, size: int) -> list[Entry]:
    """The entries of ``path``'s first ``size`` bytes from its latest compact marker on."""
    entries = _read_history(path, size, from_latest_marker=True)
    markers = [n for n, entry in enumerate(entries) if entry.kind == "compact"]
    return entries[markers[-1] :] if markers else entries  # a marker edited by hand, too


def _read_history(
    path: Path,
    size: int,
    archives: dict[str, Archive] | None = None,
    *,
    from_latest_marker: bool = False,
) -> list[Entry]:
    """Every entry in the first ``size`` bytes of ``path``, checked line by line.

    Given ``archives``, puts in it the archive of every compaction's line, by name.
    With ``from_latest_marker``, only the entries from the last line that holds
    ``_COMPACT_KIND`` on (all of them when none does).
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = _pread(fd, size, 0)
    finally:
        os.close(fd)
    start = 0
    if from_latest_marker and (at := data.rfind(_COMPACT_KIND)) >= 0:
        start = data.rfind(b"\n", 0, at) + 1
    lines = data[start:].split(b"\n")
    first = data.count(b"\n", 0, start) + 1
    if lines[-1]:
        raise StorageError(f"{path}:{first + len(lines) - 1}: the line has no end.")
    entries: list[Entry] = []
    for number, line in enumerate(lines[:-1], first):
        try:
            entry = _entry_decoder.decode(line)
        except msgspec.DecodeError as exc:
            raise StorageError(f"{path}:{number}: the line is not a valid entry: {exc}.") from exc
        if entry.seq != number or entry.created_at is None:
            raise StorageError(
                f"{path}:{number}: the entry has seq {entry.seq}; line N must hold seq N."
                if entry.seq != number
                else f"{path}:{number}: the entry has no created_at."
            )
        if archives is not None and entry.kind == "compact" and _ARCHIVED in line:
            archive = _archive_of(path, number, line)
            archives[archive.name] = archive
        entries.append(entry)
    return entries


def _usage_in(path: str | Path, size: int) -> DailyUsage:
    """The usage totals the first ``size`` bytes (whole lines) of history file ``path`` hold.

    Decodes only the lines that hold ``_USAGE``; raises ``StorageError`` for one
    that is not a valid entry.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = _pread(fd, size, 0)
    finally:
        os.close(fd)
    used: list[Entry] = []
    at = data.find(_USAGE)
    while at >= 0:
        start = data.rfind(b"\n", 0, at) + 1
        end = data.find(b"\n", at)
        try:
            entry = _entry_decoder.decode(data[start:end])
            if entry.created_at is None:
                raise ValueError("it has no created_at")
            entry.created_at = utc(entry.created_at)
        except (msgspec.DecodeError, ValueError) as exc:
            line = data.count(b"\n", 0, start) + 1
            raise StorageError(f"{path}:{line}: the line is not a valid entry: {exc}.") from exc
        used.append(entry)
        at = data.find(_USAGE, end)
    return daily_usage(used)


def _archive_of(path: Path, number: int, line: bytes) -> Archive:
    """The archive that compaction line ``number`` of history file ``path`` carries."""
    try:
        compaction = _compact_decoder.decode(line)
    except msgspec.DecodeError as exc:
        raise StorageError(f"{path}:{number}: the compaction's line is not valid: {exc}.") from exc
    if compaction.archive is None or compaction.created_at is None:
        raise StorageError(f"{path}:{number}: the compaction's line names no archive or time.")
    return Archive(
        name=compaction.archive,
        first_seq=compaction.first_seq,
        last_seq=compaction.last_seq,
        summary=compaction.content,
        speakers=compaction.speakers,
        created_at=utc(compaction.created_at),
    )
