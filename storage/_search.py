"""Memory search: what every backend matches on, and an in-process index for two of them.

Every backend searches the same text (``archive_text``, ``note_text``) and
checks a search's ``limit`` and shapes its snippets the same way
(``check_search_limit``, ``one_line``). sqlite has FTS5 and postgres its own
full-text search; the two backends that keep no database index notes and
archives in a ``MemoryIndex`` instead: an inverted index per agent (a
``TextIndex``, which their mail search uses too), ranked by BM25 (the function
FTS5 uses), with a snippet cut around the first matching word.
"""

from __future__ import annotations

import heapq
import math
import re
import threading
from collections import Counter
from collections.abc import Callable, Hashable, Iterable
from collections.abc import Set as AbstractSet
from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

import msgspec
import trio
from chinwag.protocol import Entry, MemoryHit

from ._base import MAX_SEARCH_LIMIT, search_words
from ._errors import StorageError

WORD = re.compile(r"\w+")  # what a snippet counts as a word
_K1 = 1.2
_B = 0.75
SNIPPET_WORDS = 24  # words shown around the first match
_BEFORE = 6  # of which before it

DocKey = tuple[Literal["archive", "note"], str | None, str]  # kind, sender, name
K = TypeVar("K", bound=Hashable)


class TextIndex(Generic[K]):
    """An inverted index of texts by key, ranked by BM25: what every in-process search uses.

    Not thread-safe: its owner locks it, or keeps it to one thread.
    """

    def __init__(self) -> None:
        self._terms: dict[K, tuple[str, ...]] = {}  # each text's distinct words
        self._lengths: dict[K, int] = {}  # each text's number of words
        self._postings: dict[str, dict[K, int]] = {}  # word -> key -> times in that text
        self._total_length = 0

    def put(self, key: K, text: str) -> None:
        """Index ``text`` under ``key``, in place of what it held."""
        self.remove(key)
        words = [word.lower() for word in WORD.findall(text)]
        counts = Counter(words)
        self._terms[key] = tuple(counts)
        self._lengths[key] = len(words)
        self._total_length += len(words)
        for term, times in counts.items():
            self._postings.setdefault(term, {})[key] = times

    def remove(self, key: K) -> None:
        terms = self._terms.pop(key, None)
        if terms is None:
            return
        self._total_length -= self._lengths.pop(key)
        for term in terms:
            keys = self._postings[term]
            del keys[key]
            if not keys:
                del self._postings[term]

    def best(
        self,
        words: Iterable[str],
        limit: int,
        *,
        order: Callable[[K], Any],
        among: AbstractSet[K] | None = None,
        keep: Callable[[K], bool] | None = None,
    ) -> list[K]:
        """The ``limit`` keys with the highest BM25 score for ``words``, among equal scores
        by ``order``; only keys in ``among`` and that ``keep`` keeps, when given."""
        count = len(self._lengths)
        if not count:
            return []
        average = self._total_length / count or 1.0
        lengths = self._lengths
        scores: dict[K, float] = {}
        for word in words:
            posting = self._postings.get(word)
            if not posting:
                continue
            idf = math.log(1 + (count - len(posting) + 0.5) / (len(posting) + 0.5))
            pairs: Iterable[tuple[K, int]] = posting.items()
            if among is not None:
                # Walk the shorter of the two: a reader's few messages, or a rare word's.
                if len(among) < len(posting):
                    pairs = ((key, posting[key]) for key in among if key in posting)
                else:
                    pairs = ((key, tf) for key, tf in posting.items() if key in among)
            for key, tf in pairs:
                if keep is not None and not keep(key):
                    continue
                norm = tf + _K1 * (1 - _B + _B * lengths[key] / average)
                scores[key] = scores.get(key, 0.0) + idf * tf * (_K1 + 1) / norm
        if len(scores) > limit:  # only keys that tie with the last one kept need sorting
            last = heapq.nlargest(limit, scores.values())[-1]
            scores = {key: score for key, score in scores.items() if score >= last}
        return sorted(scores, key=lambda key: (-scores[key], order(key)))[:limit]


class MemoryIndex:
    """Notes and archives by agent; `put` adds or replaces, `search` ranks by BM25.

    Thread-safe, and meant to be called in worker threads: tokenizing an
    archive or scoring a search can take long enough to stall an event loop.
    """

    def __init__(self) -> None:
        self._agents: dict[str, TextIndex[DocKey]] = {}
        self._hits: dict[tuple[str, DocKey], tuple[MemoryHit, str]] = {}  # hit, text
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
        key: DocKey = (kind, sender, name)
        hit = MemoryHit(kind=kind, name=name, sender=sender, snippet="", created_at=created_at)
        with self._lock:
            self._agents.setdefault(agent, TextIndex()).put(key, text)
            self._hits[(agent, key)] = (hit, text)

    def search(
        self, agent: str, query: str, limit: int, sender: str | None = None
    ) -> list[MemoryHit]:
        """The best ``limit`` matches; with ``sender``, of archives only that conversation's."""
        check_search_limit(limit)
        words = search_words(query)
        with self._lock:
            index = self._agents.get(agent)
            found = (
                index.best(
                    words,
                    limit,
                    keep=lambda key: sender is None or key[0] != "archive" or key[1] == sender,
                    order=lambda key: (key[0], key[1] or "", key[2]),
                )
                if index is not None
                else []
            )
            hits = [self._hits[(agent, key)] for key in found]
        return [
            msgspec.structs.replace(hit, snippet=make_snippet(text, set(words)))
            for hit, text in hits
        ]


def fts5_match(words: Iterable[str]) -> str:
    """An FTS5 query for any of ``words``: each one a string ("" escapes a quote), so that
    no user text is FTS5 syntax."""
    return " OR ".join('"{}"'.format(word.replace('"', '""')) for word in words)


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
