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
    " jsonl:///relative/dir, jsonl:////absolute/dir or postgresql://user@host:port/dbname"
)


@asynccontextmanager
async def open_store(url: str) -> AsyncIterator[Storage]:
    """Open the store ``url`` names and close it on exit, even when cancelled.

    ``memory:``; ``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db``,
    optionally with ``?synchronous=normal`` (the default ``full`` makes every
    acknowledged append survive a power loss, ``normal`` only a process crash);
    ``jsonl:///relative/dir`` or ``jsonl:////absolute/dir`` (a directory of
    JSON-lines files, created if missing, open in one process at a time);
    ``postgresql://user:password@host:port/dbname`` (or ``postgres://``), any libpq
    URL, plus ``?schema=NAME`` to keep the tables in that schema (created if
    missing) and ``?pool_size=N`` (default 4) for the connections per store.
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
    elif scheme in ("postgresql", "postgres"):
        from ._postgres import PostgresStorage, parse_postgres_url  # psycopg: 0.15 s to import

        conninfo, schema, pool_size = parse_postgres_url(url)
        store = await PostgresStorage.open(conninfo, schema=schema, pool_size=pool_size)
    elif scheme == "jsonl":
        store = await JsonlStorage.open(parse_jsonl_url(url))
    else:
        raise ValueError(f"Unknown storage URL scheme {scheme!r}; use {SUPPORTED}.")
    try:
        yield store
    finally:
        await store.close()
