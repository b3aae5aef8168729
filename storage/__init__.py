"""Pluggable durable storage: the ``Storage`` protocol and its backends.

``open_store(url)`` opens the backend a storage URL names and closes it on
exit: ``memory:`` (``MemoryStorage``, for tests) or ``sqlite:///relative/path.db``
/ ``sqlite:////absolute/path.db`` (``SqliteStorage``, the default; add
``?synchronous=normal`` to trade power-loss durability for speed), or
``postgresql://user@host:port/dbname`` (``PostgresStorage``, one database shared
by several daemons; ``?schema=NAME`` keeps its tables in that schema), or
``jsonl:///relative/dir`` / ``jsonl:////absolute/dir`` (``JsonlStorage``: one
JSON-lines history file per conversation, readable with ``jq``). Every backend
passes tests/conformance.
"""

from typing import TYPE_CHECKING

from ._base import MAX_SEARCH_LIMIT, Archive, NewConversation, Storage, search_words
from ._bus import Bus, Node, Peer
from ._conversation_search import MAX_QUERY_CHARS
from ._errors import ConversationNotFound, StorageError
from ._jsonl import JsonlStorage
from ._mail import (
    DeleteChange,
    EditChange,
    FromSpace,
    InboxQuery,
    MailStore,
    MessageChange,
    NotAMember,
    ParentChange,
    PinChange,
    ReactChange,
    StateChange,
    changed,
    lock_allows,
    msg_id_of,
    number_of,
)
from ._memory import MemoryStorage
from ._outbox import Outbox, OutboxDelivery
from ._sqlite import SqliteStorage
from ._url import open_store

if TYPE_CHECKING:
    from ._postgres import PostgresStorage

__all__ = [
    "MAX_QUERY_CHARS",
    "MAX_SEARCH_LIMIT",
    "Archive",
    "Bus",
    "ConversationNotFound",
    "DeleteChange",
    "EditChange",
    "FromSpace",
    "InboxQuery",
    "JsonlStorage",
    "MailStore",
    "MemoryStorage",
    "MessageChange",
    "NewConversation",
    "Node",
    "NotAMember",
    "Outbox",
    "OutboxDelivery",
    "ParentChange",
    "Peer",
    "PinChange",
    "PostgresStorage",
    "ReactChange",
    "SqliteStorage",
    "StateChange",
    "Storage",
    "StorageError",
    "changed",
    "lock_allows",
    "msg_id_of",
    "number_of",
    "open_store",
    "search_words",
]


def __getattr__(name: str) -> object:
    # psycopg takes 0.15 s to import: only a daemon that uses postgres pays it.
    if name == "PostgresStorage":
        from ._postgres import PostgresStorage

        return PostgresStorage
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
