"""Conversation search on a SQL database from before it: the migration casefolds the
conversations already stored, so ``list_conversations(query=...)`` finds them as it finds
new ones (the shared tests of the query are in test_storage.py, on every backend).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from chinwag.storage import _postgres as postgres_storage
from chinwag.storage import _sqlite as sqlite_storage
from chinwag.storage import open_store
from chinwag.storage._timestamps import to_text
from test_postgres import query
from test_storage import AGENT, T0

BEFORE_SEARCH = {"sqlite": 6, "postgres": 7}  # each schema's version before the folded columns
OLD = [("ana", "Die Straße bauen"), ("Ünal", "")]  # (sender, title) stored before

on_sqlite = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
on_postgres = pytest.mark.parametrize("backend", ["postgres"], indirect=True)


async def found(store_url: str, text: str) -> list[str]:
    async with open_store(store_url) as store:
        items, _ = await store.list_conversations(query=text)
    return sorted(item.sender for item in items)


@on_sqlite
async def test_a_sqlite_database_from_before_search_is_searchable_on_open(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as old_code:
        old = sqlite_storage.MIGRATIONS[: BEFORE_SEARCH["sqlite"]]
        old_code.setattr(sqlite_storage, "MIGRATIONS", old)
        async with open_store(store_url):
            pass
    conn = sqlite3.connect(Path(store_url.removeprefix("sqlite:///")), isolation_level=None)
    try:
        conn.executemany(
            "INSERT INTO conversations (agent, sender, title, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?)",
            [(AGENT, sender, title, to_text(T0), to_text(T0)) for sender, title in OLD],
        )
    finally:
        conn.close()

    assert await found(store_url, "STRASSE") == ["ana"]
    assert await found(store_url, "üNAL") == ["Ünal"]
    assert await found(store_url, "") == ["ana", "Ünal"]


@on_postgres
async def test_a_postgres_database_from_before_search_is_searchable_on_open(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as old_code:
        old = postgres_storage.MIGRATIONS[: BEFORE_SEARCH["postgres"]]
        old_code.setattr(postgres_storage, "MIGRATIONS", old)
        async with open_store(store_url):
            pass
    for sender, title in OLD:
        query(
            store_url,
            "INSERT INTO conversations (agent, sender, title, created_at, updated_at)"
            " VALUES (%s, %s, %s, %s, %s)",
            AGENT,
            sender,
            title,
            T0,
            T0,
        )

    assert await found(store_url, "STRASSE") == ["ana"]
    assert await found(store_url, "üNAL") == ["Ünal"]
    assert await found(store_url, "") == ["ana", "Ünal"]
