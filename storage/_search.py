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
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

import msgspec
from chinwag.protocol import Entry, MemoryHit

from ._base import MAX_SEARCH_LIMIT, search_words

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
    """Notes and archives by agent; `put` adds or replaces, `search` ranks by BM25."""

    def __init__(self) -> None:
        self._agents: dict[str, _AgentIndex] = {}

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
        index = self._agents.setdefault(agent, _AgentIndex())
        key: DocKey = (kind, sender, name)
        self._remove(index, key)
        words = [word.lower() for word in WORD.findall(text)]
        terms = Counter(words)
        index.documents[key] = _Document(
            hit=MemoryHit(kind=kind, name=name, sender=sender, snippet="", created_at=created_at),
            text=text,
            terms=terms,
            length=len(words),
        )
        index.total_length += len(words)
        for term in terms:
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

    def search(self, agent: str, query: str, limit: int) -> list[MemoryHit]:
        check_search_limit(limit)
        index = self._agents.get(agent)
        words = search_words(query)
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
                doc = index.documents[key]
                tf = doc.terms[word]
                norm = tf + _K1 * (1 - _B + _B * doc.length / average)
                scores[key] += idf * tf * (_K1 + 1) / norm
        best = sorted(scores, key=lambda key: (-scores[key], key[0], key[1] or "", key[2]))
        hits = []
        for key in best[:limit]:
            doc = index.documents[key]
            snippet = make_snippet(doc.text, set(words))
            hits.append(msgspec.structs.replace(doc.hit, snippet=snippet))
        return hits


def check_search_limit(limit: int) -> None:
    """Raise ``ValueError`` unless ``limit`` is one a memory search takes."""
    if not 1 <= limit <= MAX_SEARCH_LIMIT:
        raise ValueError(f"limit must be between 1 and {MAX_SEARCH_LIMIT}, got {limit}.")


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


def make_snippet(text: str, words: set[str]) -> str:
    """About `SNIPPET_WORDS` words of ``text`` where most of ``words`` meet, each in [brackets]."""
    spans = list(WORD.finditer(text))
    if not spans:
        return ""
    hits = [i for i, m in enumerate(spans) if m.group().lower() in words]

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
    parts.append("…" if stop < len(spans) else text[cursor:])
    return one_line("".join(parts))
