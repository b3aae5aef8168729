"""Memory search: what every backend matches on, and an in-process index for two of them.

Every backend searches the same text (``archive_text``, ``note_text``) and
checks a search's ``limit`` and shapes its snippets the same way
(``check_search_limit``, ``one_line``). sqlite has FTS5 and postgres its own
full-text search; the two backends that keep no database index notes and
archives in a ``MemoryIndex`` instead: an inverted index per agent, ranked by
BM25 (the function FTS5 uses), with a snippet cut around the first matching word.
"""

from __future__ import annotations

import math
import re
import threading
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

import msgspec
import trio
from chinwag.protocol import Entry, MemoryHit

from ._base import MAX_SEARCH_LIMIT, StorageError, search_words

WORD = re.compile(r"\w+")  # what a snippet counts as a word
_K1 = 1.2
_B = 0.75
SNIPPET_WORDS = 24  # words shown around the first match
_BEFORE = 6  # of which before it

DocKey = tuple[Literal["archive", "note"], str | None, str]  # kind, sender, name


@dataclass(eq=False)
class _Document:
    hit: MemoryHit  # its snippet is filled in per search
    text: str
    terms: Counter[str]
    length: int


@dataclass(eq=False)
class _AgentIndex:
    documents: dict[DocKey, _Document] = field(default_factory=dict)
    postings: dict[str, set[DocKey]] = field(default_factory=dict)
    total_length: int = 0


class MemoryIndex:
    """Notes and archives by agent; `put` adds or replaces, `search` ranks by BM25.

    Thread-safe, and meant to be called in worker threads: tokenizing an
    archive or scoring a search can take long enough to stall an event loop.
    """

    def __init__(self) -> None:
        self._agents: dict[str, _AgentIndex] = {}
        self._lock = threading.Lock()

    def put(
        self,
        agent: str,
        kind: Literal["archive", "note"],
        name: str,
        *,
        sender: str | None,
        text: str,
        created_at: datetime | None,
    ) -> None:
        words = [word.lower() for word in WORD.findall(text)]
        document = _Document(
            hit=MemoryHit(kind=kind, name=name, sender=sender, snippet="", created_at=created_at),
            text=text,
            terms=Counter(words),
            length=len(words),
        )
        key: DocKey = (kind, sender, name)
        with self._lock:
            index = self._agents.setdefault(agent, _AgentIndex())
            self._remove(index, key)
            index.documents[key] = document
            index.total_length += document.length
            for term in document.terms:
                index.postings.setdefault(term, set()).add(key)

    def _remove(self, index: _AgentIndex, key: DocKey) -> None:
        old = index.documents.pop(key, None)
        if old is None:
            return
        index.total_length -= old.length
        for term in old.terms:
            keys = index.postings[term]
            keys.discard(key)
            if not keys:
                del index.postings[term]

    def search(
        self, agent: str, query: str, limit: int, sender: str | None = None
    ) -> list[MemoryHit]:
        """The best ``limit`` matches; with ``sender``, of archives only that conversation's."""
        check_search_limit(limit)
        words = search_words(query)
        with self._lock:
            found = self._best(agent, words, limit, sender)
        return [
            msgspec.structs.replace(doc.hit, snippet=make_snippet(doc.text, set(words)))
            for doc in found
        ]

    def _best(
        self, agent: str, words: list[str], limit: int, sender: str | None
    ) -> list[_Document]:
        index = self._agents.get(agent)
        if index is None or not index.documents or not words:
            return []
        count = len(index.documents)
        average = index.total_length / count or 1.0
        scores: defaultdict[DocKey, float] = defaultdict(float)
        for word in words:
            keys = index.postings.get(word, set())
            if not keys:
                continue
            idf = math.log(1 + (count - len(keys) + 0.5) / (len(keys) + 0.5))
            for key in keys:
                if sender is not None and key[0] == "archive" and key[1] != sender:
                    continue
                doc = index.documents[key]
                tf = doc.terms[word]
                norm = tf + _K1 * (1 - _B + _B * doc.length / average)
                scores[key] += idf * tf * (_K1 + 1) / norm
        best = sorted(scores, key=lambda key: (-scores[key], key[0], key[1] or "", key[2]))
        return [index.documents[key] for key in best[:limit]]


def check_search_limit(limit: int) -> None:
    """Raise ``ValueError`` unless ``limit`` is one a memory search takes."""
    if not 1 <= limit <= MAX_SEARCH_LIMIT:
        raise ValueError(f"limit must be between 1 and {MAX_SEARCH_LIMIT}, got {limit}.")


async def database_search_words(query: str, limit: int, *, closed: bool) -> list[str]:
    """The words a database backend searches ``query`` for: none, after a checkpoint,
    when it has no word. ``ValueError`` for a bad ``limit``, then ``StorageError``
    for a ``closed`` store."""
    check_search_limit(limit)
    if closed:
        raise StorageError("The store is closed.")
    words = search_words(query)
    if not words:
        await trio.lowlevel.checkpoint()
    return words


def archive_text(summary: str, archived: Iterable[Entry]) -> str:
    """What a search matches an archive on: its summary, then the archived messages."""
    return "\n".join([summary, archived_text(archived)])


def archived_text(archived: Iterable[Entry]) -> str:
    """The archived messages' part of ``archive_text``: their content, one per line."""
    return "\n".join(e.content for e in archived if e.kind == "message")


def note_text(name: str, content: str) -> str:
    """What a search matches a note on: its name, then its content."""
    return f"{name}\n{content}"


def one_line(text: str) -> str:
    """``text`` with every run of whitespace, line breaks included, made one space."""
    return " ".join(text.split())


_SNIPPET_CANDIDATES = 50  # matches weighed for the best window; enough to find where words meet


def make_snippet(text: str, words: set[str]) -> str:
    """About `SNIPPET_WORDS` words of ``text`` where most of ``words`` meet, each in [brackets].

    Reads the text only as far as its first `_SNIPPET_CANDIDATES` matches (and a
    window past them), so a common word in a long archive costs little.
    """
    spans: list[re.Match[str]] = []
    hits: list[int] = []
    for match in WORD.finditer(text):
        spans.append(match)
        if match.group().lower() in words:
            hits.append(len(spans) - 1)
        if len(hits) >= _SNIPPET_CANDIDATES and len(spans) > hits[-1] + SNIPPET_WORDS:
            break
    if not spans:
        return ""

    def variety(start: int) -> int:
        window = spans[start : start + SNIPPET_WORDS]
        return len({m.group().lower() for m in window} & words)

    starts = [max(0, i - _BEFORE) for i in hits] or [0]
    start = max(starts, key=variety)  # the first of the windows with the most distinct words
    stop = min(len(spans), start + SNIPPET_WORDS)
    parts = ["…" if start > 0 else ""]
    cursor = spans[start].start()
    for match in spans[start:stop]:
        parts.append(text[cursor : match.start()])
        word = match.group()
        parts.append(f"[{word}]" if word.lower() in words else word)
        cursor = match.end()
    more = stop < len(spans) or WORD.search(text, cursor) is not None
    parts.append("…" if more else text[cursor:])
    return one_line("".join(parts))
