"""Pluggable durable storage: the ``Storage`` protocol and its backends.

``open_store(url)`` opens the backend a storage URL names and closes it on
exit: ``memory:`` (``MemoryStorage``, for tests) or ``sqlite:///relative/path.db``
/ ``sqlite:////absolute/path.db`` (``SqliteStorage``, the default; add
``?synchronous=normal`` to trade power-loss durability for speed), or
``jsonl:///relative/dir`` / ``jsonl:////absolute/dir`` (``JsonlStorage``: one
JSON-lines history file per conversation, readable with ``jq``). A postgresql
backend comes later. Every backend passes tests/conformance.
"""

from ._base import ConversationNotFound, Storage, StorageError
from ._jsonl import JsonlStorage
from ._memory import MemoryStorage
from ._sqlite import SqliteStorage
from ._url import open_store

__all__ = [
    "ConversationNotFound",
    "JsonlStorage",
    "MemoryStorage",
    "SqliteStorage",
    "Storage",
    "StorageError",
    "open_store",
]
