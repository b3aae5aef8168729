"""What ``list_conversations(query=...)`` matches, the same on every backend.

A conversation matches when its title or its sender, casefolded (``str.casefold``:
Unicode full case folding, so "STRASSE" finds "Straße"), contains the query,
casefolded, as a run of code points: no normalization, no word boundaries, and
``%``, ``_`` and ``\\`` are characters like any other. The empty query matches
every conversation.

The SQL backends keep each conversation's title and sender casefolded by Python
in columns of their own (``title_folded``, ``sender_folded``), written with the
row, since neither sqlite's nor PostgreSQL's ``lower`` folds as ``casefold`` does;
they match with ``LIKE`` on those columns, the query escaped by ``like_pattern``.
"""

from __future__ import annotations

#: The longest query, in characters (sqlite refuses LIKE patterns past 50,000 bytes).
MAX_QUERY_CHARS = 1000

#: The escape character of ``like_pattern``'s patterns (``LIKE ? ESCAPE ?``).
LIKE_ESCAPE = "\\"


def folded_query(query: str) -> str:
    """``query`` as it is compared; ``ValueError`` when it is longer than ``MAX_QUERY_CHARS``."""
    if len(query) > MAX_QUERY_CHARS:
        raise ValueError(f"query must be at most {MAX_QUERY_CHARS} characters, got {len(query)}.")
    return query.casefold()


def matches(folded: str, title: str, sender: str) -> bool:
    """Whether a conversation with ``title`` and ``sender`` matches the ``folded`` query."""
    return folded in title.casefold() or folded in sender.casefold()


def like_pattern(query: str) -> str:
    """The ``LIKE`` pattern (escape ``LIKE_ESCAPE``) that finds ``query`` in a folded column."""
    escaped = folded_query(query)
    for special in (LIKE_ESCAPE, "%", "_"):  # the escape itself first
        escaped = escaped.replace(special, LIKE_ESCAPE + special)
    return f"%{escaped}%"
