"""The Storage protocol every backend implements, and its errors."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Protocol

from chinwag.protocol import ConversationItem, Entry


class StorageError(Exception):
    """Storage failed (disk full, database gone, corrupt data). The one error root."""


class ConversationNotFound(StorageError):
    """The `(agent, sender)` pair names no stored conversation."""


class Storage(Protocol):
    """Durable home of conversations and their history.

    Every method is async and safe to call from many trio tasks at once.
    An ``append`` is all or nothing and is durable when it returns. A caller
    that must not be interrupted mid-write shields the call; backends never
    leave a half-written append behind, even when the process dies.
    """

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

    async def append(self, agent: str, sender: str, entries: Sequence[Entry]) -> list[Entry]:
        """Append entries atomically, assigning consecutive seqs after the last one.

        The given entries' ``seq`` is ignored; the stored copies are returned.
        Updates the conversation's ``last_seq`` and ``updated_at`` (the newest
        entry's ``created_at``). Raises ``ConversationNotFound``.
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
    ) -> tuple[list[ConversationItem], str | None]:
        """A page of conversations, most recently updated first, and the next cursor.

        The cursor is opaque; None when this is the last page. A cursor that
        this backend did not produce raises ``ValueError``.
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
