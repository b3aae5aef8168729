"""Claims on a store that only its own process uses: the memory, sqlite and jsonl backends."""

from __future__ import annotations

import trio

from ._errors import StorageError


class LocalClaims:
    """The conversations a store has claimed, when no other process can claim them.

    A sqlite file or a jsonl directory has one daemon at a time (a memory store,
    one process), so only this store's own claims can refuse one: a set of keys
    is all it takes. Implements ``Storage.claim`` and ``Storage.release`` for the
    store that delegates to it; ``close`` drops every claim and refuses new ones.
    """

    def __init__(self) -> None:
        self._held: set[tuple[str, str]] = set()
        self._closed = False

    async def claim(self, agent: str, sender: str) -> bool:
        """See ``Storage.claim``: True if taken; ``StorageError`` once closed."""
        await trio.lowlevel.checkpoint()
        if self._closed:
            raise StorageError("The store is closed.")
        key = (agent, sender)
        if key in self._held:
            return False
        self._held.add(key)
        return True

    async def release(self, agent: str, sender: str) -> None:
        """See ``Storage.release``: never raises, and done before any cancellation lands."""
        self._held.discard((agent, sender))
        await trio.lowlevel.cancel_shielded_checkpoint()

    def close(self) -> None:
        self._closed = True
        self._held.clear()
