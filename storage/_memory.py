"""The memory backend: everything in dicts, gone with the process. For tests.

Its semantics are sqlite's: entries are encoded when appended (so an entry
sqlite could not store fails here too), reads return fresh copies, seqs start
at 1 and are never reused, and cursors page on ``(updated_at DESC, id DESC)``.
Like every backend, ``append`` takes the given entries over (their ``seq`` and
``created_at`` set in place) and keeps only their encoding.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime

import msgspec
import trio
from chinwag.protocol import ConversationItem, Entry, MemoryHit, TokenUsage, UsageTotal

from ._base import Archive, NewConversation, check_archive
from ._bus import Bus
from ._claims import LocalClaims
from ._conversation_search import folded_query, matches
from ._cursor import decode_cursor, encode_cursor
from ._errors import ConversationNotFound, StorageError
from ._mail import MailStore
from ._mail_index import MemoryMail
from ._outbox import Outbox
from ._outbox_index import MemoryOutbox
from ._search import MemoryIndex, archive_text, note_text
from ._timestamps import from_text, to_text, utc
from ._usage import DailyUsage, add_daily, daily_usage, tokens_of, usage_totals, with_tokens

_CURSOR_TAG = "memory"

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Entry)
_archive_encoder = msgspec.msgpack.Encoder()
_archive_decoder = msgspec.msgpack.Decoder(Archive)


@dataclass(eq=False)
class _Conversation:
    id: int
    item: ConversationItem
    entries: list[bytes] = field(default_factory=list)  # entry seq N at index N - 1
    marker_seq: int = 0  # seq of the latest compact marker, 0 when none
    archives: dict[str, bytes] = field(default_factory=dict)
    usage: DailyUsage = field(default_factory=dict)


class MemoryStorage:
    """A ``Storage`` held in memory; ``open_store("memory:")`` makes one."""

    shared = False
    bus: Bus | None = None  # alone on its store: no other daemon to hear

    def __init__(self) -> None:
        self._conversations: dict[tuple[str, str], _Conversation] = {}
        self._next_id = 1
        self._claims = LocalClaims()
        self._closed = False
        self._memory = MemoryIndex()
        self.mail: MailStore = MemoryMail(lambda: self._closed)
        self.outbox: Outbox = MemoryOutbox(lambda: self._closed)

    def _get(self, agent: str, sender: str) -> _Conversation:
        if self._closed:
            raise StorageError("The store is closed.")
        conv = self._conversations.get((agent, sender))
        if conv is None:
            raise ConversationNotFound(f"No conversation is stored for ({agent}, {sender}).")
        return conv

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
        await trio.lowlevel.checkpoint()
        try:
            conv = self._get(agent, sender)
        except ConversationNotFound:
            created_at = utc(created_at)
            item = ConversationItem(
                agent=agent, sender=sender, cwd=cwd, created_at=created_at, updated_at=created_at
            )
            conv = self._conversations[agent, sender] = _Conversation(id=self._next_id, item=item)
            self._next_id += 1
        return with_tokens(conv.item, conv.usage)

    async def append(
        self,
        agent: str,
        sender: str,
        entries: Sequence[Entry],
        *,
        create: NewConversation | None = None,
    ) -> list[Entry]:
        """Not cancellable, like sqlite's: once called it completes or fails."""
        await trio.lowlevel.cancel_shielded_checkpoint()
        if self._closed:
            raise StorageError("The store is closed.")
        conv = self._conversations.get((agent, sender))
        if conv is None and create is None:
            raise ConversationNotFound(f"No conversation is stored for ({agent}, {sender}).")
        return self._append(agent, sender, conv, entries, create)

    def _append(
        self,
        agent: str,
        sender: str,
        conv: _Conversation | None,
        entries: Sequence[Entry],
        create: NewConversation | None = None,
    ) -> list[Entry]:
        """Encode every entry, then store them all, creating ``conv`` when it is None."""
        now = datetime.now(UTC)
        last_seq = 0 if conv is None else conv.item.last_seq
        encoded: list[bytes] = []
        for seq, entry in enumerate(entries, last_seq + 1):
            entry.created_at = now if entry.created_at is None else utc(entry.created_at)
            entry.seq = seq
            try:
                encoded.append(_encoder.encode(entry))
            except (UnicodeEncodeError, TypeError) as exc:
                raise StorageError(f"Entry {seq} could not be encoded: {exc}.") from exc
        # Every entry encoded: now commit.
        if conv is None:
            assert create is not None
            created_at = entries[0].created_at if entries else now
            item = ConversationItem(
                agent=agent,
                sender=sender,
                cwd=create.cwd,
                created_at=created_at,
                updated_at=created_at,
            )
            conv = self._conversations[agent, sender] = _Conversation(id=self._next_id, item=item)
            self._next_id += 1
        for entry in entries:
            if entry.kind == "compact":
                conv.marker_seq = entry.seq
        conv.entries.extend(encoded)
        add_daily(conv.usage, daily_usage(entries))
        if entries:
            conv.item.last_seq = entries[-1].seq
            conv.item.updated_at = entries[-1].created_at
        return list(entries)

    async def load_context(
        self, agent: str, sender: str
    ) -> tuple[ConversationItem, list[Entry]] | None:
        """The metadata and the entries from the latest marker on; see ``Storage.load_context``."""
        await trio.lowlevel.checkpoint()
        try:
            conv = self._get(agent, sender)
        except ConversationNotFound:
            return None
        context = [_decoder.decode(raw) for raw in conv.entries[max(conv.marker_seq, 1) - 1 :]]
        return with_tokens(conv.item, conv.usage), context

    async def set_title(self, agent: str, sender: str, title: str) -> None:
        await trio.lowlevel.checkpoint()
        self._get(agent, sender).item.title = title

    async def set_cwd(self, agent: str, sender: str, cwd: str | None) -> None:
        await trio.lowlevel.checkpoint()
        self._get(agent, sender).item.cwd = cwd

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
        visible: list[Entry] = []
        for raw in conv.entries[max(after_seq, 0) :]:
            if limit is not None and len(visible) >= limit:
                break
            entry = _decoder.decode(raw)
            if include_archived or entry.seq >= conv.marker_seq or entry.kind == "compact":
                visible.append(entry)
        return visible

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
        if self._closed:
            raise StorageError("The store is closed.")
        position = None
        if cursor is not None:
            text, id_ = decode_cursor(_CURSOR_TAG, cursor)
            position = (from_text(text), id_)
        matching = [
            conv
            for conv in self._conversations.values()
            if (agent is None or conv.item.agent == agent)
            and (sender is None or conv.item.sender == sender)
            and (folded is None or matches(folded, conv.item.title, conv.item.sender))
        ]
        if position is not None:
            matching = [conv for conv in matching if _key(conv) < position]
        matching.sort(key=_key, reverse=True)
        page = [with_tokens(conv.item, conv.usage) for conv in matching[:limit]]
        next_cursor = None
        if len(matching) > limit:
            updated_at, id_ = _key(matching[limit - 1])
            next_cursor = encode_cursor(_CURSOR_TAG, to_text(updated_at), id_)
        return page, next_cursor

    # --- archives and notes -------------------------------------------------

    async def compact(
        self, agent: str, sender: str, archive: Archive, *, usage: TokenUsage | None = None
    ) -> Entry:
        """Store the archive and append its marker; see ``Storage.compact``."""
        await trio.lowlevel.cancel_shielded_checkpoint()
        conv = self._get(agent, sender)
        check_archive(
            archive, marker_seq=conv.marker_seq, last_seq=conv.item.last_seq, names=conv.archives
        )
        archived = [_decoder.decode(raw) for raw in conv.entries[archive.first_seq - 1 :]]
        (marker,) = self._append(agent, sender, conv, [archive.marker(usage)])
        conv.archives[archive.name] = _archive_encoder.encode(archive)
        text = archive_text(archive.summary, archived)
        index = functools.partial(self._memory.put, agent, "archive", archive.name, sender=sender)
        await trio.to_thread.run_sync(
            functools.partial(index, text=text, created_at=utc(archive.created_at))
        )
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
        if self._closed:
            raise StorageError("The store is closed.")
        conversations = ((a, s, conv.usage) for (a, s), conv in self._conversations.items())
        return usage_totals(conversations, agent=agent, sender=sender, since=since)

    async def total_tokens(self) -> tuple[int, int]:
        """Every stored call's tokens; see ``Storage.total_tokens``."""
        await trio.lowlevel.checkpoint()
        if self._closed:
            raise StorageError("The store is closed.")
        return tokens_of(conv.usage for conv in self._conversations.values())

    async def get_archive(self, agent: str, sender: str, name: str) -> Archive | None:
        await trio.lowlevel.checkpoint()
        raw = self._get(agent, sender).archives.get(name)
        return None if raw is None else _archive_decoder.decode(raw)

    async def put_note(self, agent: str, name: str, content: str, *, updated_at: datetime) -> None:
        await trio.lowlevel.cancel_shielded_checkpoint()
        if self._closed:
            raise StorageError("The store is closed.")
        text = note_text(name, content)
        index = functools.partial(self._memory.put, agent, "note", name, sender=None)
        await trio.to_thread.run_sync(
            functools.partial(index, text=text, created_at=utc(updated_at))
        )

    async def search_memory(
        self, agent: str, query: str, *, limit: int = 10, sender: str | None = None
    ) -> list[MemoryHit]:
        await trio.lowlevel.checkpoint()
        if self._closed:
            raise StorageError("The store is closed.")
        return await trio.to_thread.run_sync(self._memory.search, agent, query, limit, sender)

    # --- claims: one process, so only this store's own claims refuse ------

    async def claim(self, agent: str, sender: str) -> bool:
        """Take the conversation for this store's runs; see ``Storage.claim``."""
        return await self._claims.claim(agent, sender)

    async def release(self, agent: str, sender: str) -> None:
        """Give up a claim; see ``Storage.release``."""
        await self._claims.release(agent, sender)

    async def close(self) -> None:
        self._closed = True
        self._claims.close()
        await trio.lowlevel.cancel_shielded_checkpoint()


def _key(conv: _Conversation) -> tuple[datetime, int]:
    assert conv.item.updated_at is not None
    return conv.item.updated_at, conv.id
