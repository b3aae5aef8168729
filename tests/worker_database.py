"""This test process's own PostgreSQL database, so that parallel workers never meet.

``CHINWAG_TEST_POSTGRES`` names the server (default
``postgresql://postgres@127.0.0.1:5432/test``, a database that must exist). Each
pytest process (each xdist worker, or the one process of a serial run) creates
a fresh database of its own on that server the first time a test needs one,
``chinwag_test_<worker>_<pid>``, and drops it when the session ends
(tests/conftest.py's ``pytest_sessionfinish``). Inside it each test still takes
a fresh schema (``?schema=``), dropped after the test.

A database left behind by a process that was killed is dropped by the next
process that creates its own: the pid in its name no longer runs.
"""

from __future__ import annotations

import functools
import os
import re
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

SERVER_URL = os.environ.get("CHINWAG_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
PREFIX = "chinwag_test_"
_NAME = re.compile(rf"{PREFIX}(?:gw\d+|main)_(\d+)")
_created: list[str] = []  # the database this process made, once it has


@functools.cache
def unreachable() -> str | None:
    """Why the test server cannot be used, or None when it can; asked once per process."""
    try:
        import psycopg

        psycopg.connect(SERVER_URL, connect_timeout=5).close()
    except Exception as exc:  # ImportError or any connection failure
        return " ".join(str(exc).split())
    return None


def _with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


def pid_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _drop(conn: Any, name: str) -> None:
    from psycopg import sql

    # FORCE: a killed process's daemons may have left sessions on it.
    conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@functools.cache
def database_url() -> str:
    """The URL of this process's database (created on first call) on the test server."""
    import psycopg
    from psycopg import sql

    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    name = f"{PREFIX}{worker}_{os.getpid()}"
    with psycopg.connect(SERVER_URL, autocommit=True, connect_timeout=5) as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE %s", (PREFIX + "%",)
        ).fetchall()
        for (stale,) in rows:
            found = _NAME.fullmatch(stale)
            if stale == name or (found and not pid_runs(int(found.group(1)))):
                _drop(conn, stale)
        for attempt in range(10):
            try:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
                break
            except psycopg.errors.ObjectInUse:  # the template copied by another at once
                if attempt == 9:
                    raise
                time.sleep(0.1 * (attempt + 1))
    _created.append(name)
    return _with_database(SERVER_URL, name)


def drop() -> None:
    """Drop this process's database, if it made one; what fails is left for the next run."""
    if not _created:
        return
    import psycopg

    try:
        with psycopg.connect(SERVER_URL, autocommit=True, connect_timeout=5) as conn:
            for name in _created:
                _drop(conn, name)
    except psycopg.Error:
        pass  # the next process that makes its own drops it, its pid gone
    _created.clear()
    database_url.cache_clear()
