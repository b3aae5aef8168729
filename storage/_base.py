"""The Storage protocol every backend implements."""

from __future__ import annotations

import re
from collections.abc import Container, Sequence
from datetime import date, datetime
from typing import Protocol

import msgspec
from chinwag.protocol import ConversationItem, Entry, MemoryHit, TokenUsage, UsageTotal

from ._bus import Bus
from ._errors import StorageError
from ._mail import MailStore
from ._outbox import Outbox


class NewConversation(msgspec.Struct, kw_only=True, frozen=True):
    """What ``append(..., create=...)`` gives a conversation it creates.

    Its ``created_at`` is the first appended entry's; only the rest is given here.
    """

    cwd: str | None = None


class Archive(msgspec.Struct, kw_only=True, frozen=True):
    """What one compaction archived: the entries ``first_seq..last_seq``, summarized.

    ``speakers`` holds each archived entry's ``agent`` in seq order (empty for
    the primary agent), so who said what survives the compaction.
    """

    name: str
    first_seq: int
    last_seq: int
    summary: str
    speakers: list[str]
    created_at: datetime

    def marker(self, usage: TokenUsage | None = None) -> Entry:
        """The compact marker entry that stands for this archive in the history, carrying
        ``usage``, the tokens of the model calls that wrote the summary."""
        return Entry(
            seq=0,
            kind="compact",
            content=self.summary,
            archive=self.name,
            created_at=self.created_at,
            usage=usage,
        )


def check_archive(
    archive: Archive, *, marker_seq: int, last_seq: int, names: Container[str]
) -> None:
    """Raise ``StorageError`` unless ``archive`` covers exactly ``marker_seq + 1..last_seq``.

    ``marker_seq`` is the seq of the conversation's latest compact marker (0
    when none), ``names`` the archive names it already used.
    """
    if archive.name in names:
        raise StorageError(f"The conversation already has an archive named {archive.name!r}.")
    if archive.first_seq != marker_seq + 1 or archive.last_seq != last_seq:
        raise StorageError(
            f"An archive must cover seq {marker_seq + 1} to {last_seq}, the entries after the "
            f"latest compact marker; this one covers {archive.first_seq} to {archive.last_seq}."
        )
    if archive.first_seq > archive.last_seq:
        raise StorageError("An archive must cover at least one entry.")
    if len(archive.speakers) != archive.last_seq - archive.first_seq + 1:
        raise StorageError("An archive needs one speaker per archived entry.")


MAX_SEARCH_LIMIT = 100


def search_words(query: str) -> list[str]:
    """The words a memory search looks for: letters and digits, deduplicated, lowercased.

    Lowercased, not casefolded: FTS5 and postgres fold case that way ("Straße"
    stays "straße"), and every backend must find the same words.
    """
    return list(dict.fromkeys(re.findall(r"\w+", query.lower())))


class Storage(Protocol):
    """Durable home of conversations and their history.

    Every method is async and safe to call from many trio tasks at once.
    An ``append`` is all or nothing and is durable when it returns; backends
    never leave a half-written append behind, even when the process dies.
    ``append`` and ``compact`` are not cancelled once under way: cancelled
    before it begins, a write stores nothing and raises ``trio.Cancelled``;
    once it has begun, it returns what it stored (or raises its error) and the
    cancellation lands at the caller's next checkpoint. So a caller never
    loses track of what it wrote, and needs no shield of its own.

    Every ``ConversationItem`` a store returns (``get_conversation``,
    ``create_conversation``, ``load_context``, ``list_conversations``) carries
    the conversation's usage totals (see ``usage``) summed over all its days in
    ``tokens_in`` and ``tokens_out``, as of the same read as the rest of it; the
    fields the daemon fills (``running``, ``messages``, ``tokens``,
    ``expires_at``, ``limits``) keep their defaults.
    """

    mail: MailStore
    """Participants, messages and deliveries (storage/_mail.py), kept with the conversations."""

    outbox: Outbox
    """The webhooks' deliveries and cursors (storage/_outbox.py), kept with the mail."""

    bus: Bus | None
    """How daemons sharing this store reach each other (storage/_bus.py); None when no
    other daemon can share it (every backend but postgres)."""

    shared: bool
    """True when other processes may append to this store's conversations (postgres).

    A daemon on a shared store re-reads a conversation before running it,
    and runs it only while it holds the conversation's claim.
    """

    async def get_conversation(self, agent: str, sender: str) -> ConversationItem | None:
        """The conversation's metadata, or None when it was never created."""
        ...

    async def create_conversation(
        self, agent: str, sender: str, *, cwd: str | None, created_at: datetime
    ) -> ConversationItem:
        """Create the conversation if it does not exist; return it either way."""
        ...

    async def append(
        self,
        agent: str,
        sender: str,
        entries: Sequence[Entry],
        *,
        create: NewConversation | None = None,
    ) -> list[Entry]:
        """Append entries atomically, assigning consecutive seqs after the last one.

        The store takes the given entries over instead of copying them: it sets
        each one's ``seq`` (whatever it held), stamps a missing ``created_at``
        with the time of the call, gives every ``created_at`` in UTC, and returns
        the same objects. It keeps no reference to them once it returns, so a
        change made to them afterwards changes nothing stored; until it returns
        the caller must not touch them. When it raises, their ``seq`` means nothing.

        Updates the conversation's ``last_seq`` and ``updated_at`` (the newest
        entry's ``created_at``). Without ``create``, a conversation that does not
        exist raises ``ConversationNotFound``. With it, such a conversation is
        created in the same atomic write as the entries (so an append that fails
        creates nothing), with ``create.cwd`` and the first entry's
        ``created_at`` (the time of the call when there is no entry); one that
        exists is left as it is, its cwd unchanged.

        Each entry's ``usage`` (a model call's tokens) is added to the
        conversation's usage total for the UTC day of the entry's ``created_at``,
        in the same atomic write, so a total counts exactly the calls stored.
        """
        ...

    async def load_context(
        self, agent: str, sender: str
    ) -> tuple[ConversationItem, list[Entry]] | None:
        """The conversation's metadata and its working context, read together in one step.

        The working context is every entry from the latest compact marker on (the
        marker first), or every entry when there is no marker; the metadata's
        ``last_seq`` is that of the last of them. None when the conversation was
        never created. What a run needs to begin, at the cost of one read.
        """
        ...

    async def set_title(self, agent: str, sender: str, title: str) -> None:
        """Raises ``ConversationNotFound``."""
        ...

    async def set_cwd(self, agent: str, sender: str, cwd: str | None) -> None:
        """Raises ``ConversationNotFound``."""
        ...

    async def history(
        self,
        agent: str,
        sender: str,
        *,
        after_seq: int = 0,
        limit: int | None = None,
        include_archived: bool = False,
    ) -> list[Entry]:
        """Entries with ``seq > after_seq`` in seq order, at most ``limit`` from the oldest.

        Without ``include_archived``, entries before the latest compact marker
        are left out; compact markers themselves are always included.
        Raises ``ConversationNotFound``.
        """
        ...

    async def list_conversations(
        self,
        *,
        agent: str | None = None,
        sender: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
        query: str | None = None,
    ) -> tuple[list[ConversationItem], str | None]:
        """A page of conversations, most recently updated first, and the next cursor.

        With ``query``, only the conversations whose title or sender contains it,
        casefolded (storage/_conversation_search.py says exactly what matches), in
        the same order and pages; a query longer than ``MAX_QUERY_CHARS`` raises
        ``ValueError``. The SQL backends filter in SQL, page by page.

        The cursor is opaque; None when this is the last page. A cursor that
        this backend did not produce raises ``ValueError``. Each item carries its
        conversation's usage totals in ``tokens_in``/``tokens_out``, read with the
        page at a cost that grows with the page, not with the store (the SQL
        backends sum each listed conversation's days by its key).
        """
        ...

    async def compact(
        self, agent: str, sender: str, archive: Archive, *, usage: TokenUsage | None = None
    ) -> Entry:
        """Store ``archive`` and append its marker (``archive.marker(usage)``) in one atomic step.

        The archive must cover exactly the entries after the latest marker up
        to the newest one (``first_seq`` = the marker's seq + 1, ``last_seq`` =
        the conversation's ``last_seq``, one speaker per entry): anything else,
        or a name this conversation already used, raises ``StorageError`` and
        stores nothing. Returns the stored marker. Raises ``ConversationNotFound``.
        The marker carries ``usage`` (the summary's model calls), which counts as an
        append's does.
        """
        ...

    async def usage(
        self,
        *,
        agent: str | None = None,
        sender: str | None = None,
        since: date | None = None,
    ) -> list[UsageTotal]:
        """The usage totals, one per conversation and UTC day with any, by day, then
        agent, then sender; only ``agent``'s, ``sender``'s, and days from ``since`` on
        when given. Totals only grow: compaction does not lower them, and they are
        as durable as the appends that made them."""
        ...

    async def total_tokens(self) -> tuple[int, int]:
        """Every stored model call's tokens, ``(input, output)``: what the rows of
        ``usage()`` add up to, summed by the store (``SUM`` in SQL) without handing
        each row over. Costs a read of every total, not of every entry."""
        ...

    async def get_archive(self, agent: str, sender: str, name: str) -> Archive | None:
        """The conversation's archive named ``name``, or None. Raises ``ConversationNotFound``."""
        ...

    async def put_note(self, agent: str, name: str, content: str, *, updated_at: datetime) -> None:
        """Create or replace the agent's note ``name``; durable when it returns."""
        ...

    async def search_memory(
        self, agent: str, query: str, *, limit: int = 10, sender: str | None = None
    ) -> list[MemoryHit]:
        """The agent's notes and archives matching ``query``, best first.

        The archives of all the agent's conversations, or with ``sender`` only
        those of its conversation with that sender (notes are the agent's own,
        found either way).

        A document matches when it holds any of the query's ``search_words``;
        archives match on their summary and the text of the entries they
        archived, notes on their name and content. Ranked by relevance (BM25 or
        the backend's full-text rank), at most ``limit`` (1 to
        ``MAX_SEARCH_LIMIT``, else ``ValueError``); a query without words finds
        nothing.
        """
        ...

    async def claim(self, agent: str, sender: str) -> bool:
        """Take the conversation for this store's runs, without waiting; True if taken.

        False while any store holds it, this one included: a claim is not
        re-entrant. The conversation need not exist. On a store that is not
        ``shared`` only this store's own claims can refuse. Claims end with
        ``release`` or ``close``, or with the process (a postgres session lock).
        Raises ``StorageError`` on a closed store.
        """
        ...

    async def release(self, agent: str, sender: str) -> None:
        """Give up this store's claim on the conversation.

        A no-op when this store does not hold it, or is closed. Never raises,
        and completes even when cancelled, so it belongs in a ``finally``.
        """
        ...

    async def close(self) -> None:
        """Release connections, files and claims; the store is unusable afterwards."""
        ...
