"""The storage errors: one root, and the refusals a caller tells apart."""

from __future__ import annotations


class StorageError(Exception):
    """Storage failed (disk full, database gone, corrupt data). The one error root."""


class ConversationNotFound(StorageError):
    """The `(agent, sender)` pair names no stored conversation."""
