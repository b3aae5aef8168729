"""``open_store``: a storage URL in, an open ``Storage`` out."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from ._base import Storage
from ._jsonl import JsonlStorage, parse_jsonl_url
from ._memory import MemoryStorage
from ._sqlite import SqliteStorage, parse_sqlite_url

SUPPORTED = (
    "memory:, sqlite:///relative/path.db, sqlite:////absolute/path.db,"
    " jsonl:///relative/dir or jsonl:////absolute/dir"
)


@asynccontextmanager
async def open_store(url: str) -> AsyncIterator[Storage]:
    """Open the store ``url`` names and close it on exit, even when cancelled.

    ``memory:``; ``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db``,
    optionally with ``?synchronous=normal`` (the default ``full`` makes every
    acknowledged append survive a power loss, ``normal`` only a process crash);
    ``jsonl:///relative/dir`` or ``jsonl:////absolute/dir`` (a directory of
    JSON-lines files, created if missing, open in one process at a time).
    Raises ``ValueError`` for a URL no backend takes.
    """
    scheme, colon, rest = url.partition(":")
    store: Storage
    if not colon:
        raise ValueError(f"{url!r} is not a storage URL; use {SUPPORTED}.")
    if scheme == "memory":
        if rest not in ("", "//"):
            raise ValueError(f"The memory store takes no path or options, got {url!r}.")
        store = MemoryStorage()
    elif scheme == "sqlite":
        path, synchronous = parse_sqlite_url(url)
        store = await SqliteStorage.open(path, synchronous=synchronous)
    elif scheme == "jsonl":
        store = await JsonlStorage.open(parse_jsonl_url(url))
    elif scheme in ("postgresql", "postgres"):
        raise ValueError(f"The {scheme} storage backend is not implemented yet; use {SUPPORTED}.")
    else:
        raise ValueError(f"Unknown storage URL scheme {scheme!r}; use {SUPPORTED}.")
    try:
        yield store
    finally:
        await store.close()
