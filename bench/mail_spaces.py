"""(s) Mail, part 2: search over 100,000 messages, fan-out to a space, a lock's round trip.

The clients, the pinning and the floors are bench/mail.py's (its docstring says how
each is timed); only what is new is here.

- **Search.** One participant, `reader`, and 100,000 messages of chat-like text: 4 to
  30 words each, drawn from a vocabulary of 4,000 made-up words with Zipf-like
  frequencies (the word of rank r is drawn with weight 1 / r**1.07), so that the
  word of rank 1 is in 86% of the messages, of rank 10 in 18%, of rank 100 in 1.7%,
  of rank 1,000 in 0.15%, of rank 4,000 in 0.04%. They are posted over the socket as bench/mail.py's
  inbox is filled (4 connections, batches of 128), addressed in turn: 6 in 10 DMs to
  `reader`, 1 in 10 to `#team` (`reader` is a member), 1 in 10 to `#lobby` (public,
  `reader` is not a member: it may read it), 2 in 10 DMs to `bystander` (`reader`
  may not read them). Then `search_mail {as: reader, query, limit: 20}`, timed write
  to read, alternating with a `ping` on the same connection (the baseline), the
  query cycling through 30: five each of one rare word (rank 1,000 to 4,000), one
  middling (200 to 1,000), one frequent (20 to 200), a frequent and a rare, a
  middling and a rare, and a common word (rank 1 to 20) with a middling and a rare
  one (a search matches any of its words: the common word brings most of the store).
  Each reply is checked after the timing: 1 to 20 messages `reader` may read, each
  with a word of the query. On sqlite `synchronous=normal` (its reads are the same as
  under `full`; the fill is faster) and on `memory:` (the in-process index).
  Target: p50 <= 10 ms.
- **Space fan-out.** As bench/mail.py's @everyone fan-out, to `#crowd`, a public
  space whose 100 members are the 100 watchers (its creator, `host`, left it; the
  author, `announcer`, is not a member): from the write of a `post` to `#crowd` to
  the last of the 100 `mail` frames, alternating with a DM to one watcher. On sqlite
  `synchronous=full`. Target: p99 <= 10 ms.
- **Lock.** `lock {from: locker, resource}` then `unlock` of it, each awaited (both
  written to the store), 1,000 times, in alternate blocks of 100 with the floors of
  bench/mail.py's delivery: raw-durable (a bare trio round trip plus one sqlite commit,
  the same `synchronous`) and the bare round trip. Each request is timed from its
  write to the read of its reply, and the pair from the lock's write to the unlock's
  `ok`. On sqlite `full` and `normal`. Target: the p50 of each of `lock` and `unlock`
  (a round trip with one commit, as raw-durable is) <= 2x raw-durable.

    python -m bench.mail_spaces [--stored 100000] [--searches 300] [--watchers 100]
        [--fanout-posts 50] [--locks 1000] [--storage URL]
"""

from __future__ import annotations

import argparse
import itertools
import random
import re
import statistics
import time
from pathlib import Path

from chinwag.protocol import (
    MSGPACK,
    LockResult,
    Messages,
    Ok,
    Ping,
    Pong,
    SearchMail,
    SpaceCreate,
    SpaceJoin,
    SpaceLeave,
    SpaceReply,
    Unlock,
)
from chinwag.protocol import Lock as LockRequest

from ._processes import (
    chinwag_serve,
    echo_config,
    run_alone,
    storage_label,
    storage_short,
    storage_tag,
)
from ._report import Baseline, Figure, Target, percentile
from .first_event import ROUND_TRIP
from .mail import (
    FANOUT_WARMUP,
    ONE_WATCHER,
    PING,
    Conn,
    against_floors,
    fan_out,
    fill,
    register,
    split_cores,
    stores,
)

VOCABULARY = 4000
ZIPF = 1.07  # the exponent of the words' frequencies by rank
WORDS_PER_MESSAGE = (4, 30)
SEED = 14  # the corpus and the queries are the same in every run
LIMIT = 20
# Ranks (1-based, inclusive) each query word is drawn from.
COMMON, FREQUENT, MIDDLING, RARE = (1, 20), (20, 200), (200, 1000), (1000, VOCABULARY)
QUERY_KINDS: dict[str, tuple[tuple[int, int], ...]] = {
    "rare": (RARE,),
    "middling": (MIDDLING,),
    "frequent": (FREQUENT,),
    "frequent+rare": (FREQUENT, RARE),
    "middling+rare": (MIDDLING, RARE),
    "common+middling+rare": (COMMON, MIDDLING, RARE),
}
QUERIES_PER_KIND = 5
# Who each message goes to, in turn: what `reader` receives, reads as a space's, or may not.
ADDRESSES = [["reader"]] * 6 + [["#team"], ["#lobby"]] + [["bystander"]] * 2
READABLE_SPACES = {"team", "lobby"}
CROWD = "crowd"
RESOURCE = "file:src/app.py"


# --- search -----------------------------------------------------------------------


def vocabulary(rng: random.Random) -> list[str]:
    """VOCABULARY distinct made-up words of 2 to 4 syllables, the most frequent first."""
    onsets, vowels = [*"bcdfghklmnprstvwz", "br", "st", "pl", "tr"], "aeiou"
    words: dict[str, None] = {}
    while len(words) < VOCABULARY:
        syllables = rng.randint(2, 4)
        words["".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(syllables))] = None
    return list(words)


def corpus(stored: int, words: list[str], rng: random.Random) -> list[str]:
    """``stored`` messages of Zipf-distributed ``words``."""
    weights = list(itertools.accumulate(1 / rank**ZIPF for rank in range(1, len(words) + 1)))
    texts = []
    for _ in range(stored):
        count = rng.randint(*WORDS_PER_MESSAGE)
        texts.append(" ".join(rng.choices(words, cum_weights=weights, k=count)))
    return texts


def queries(words: list[str], rng: random.Random) -> list[tuple[str, str]]:
    """(kind, query) for QUERIES_PER_KIND queries of each kind, the kinds interleaved."""
    found = []
    for _ in range(QUERIES_PER_KIND):
        for kind, bands in QUERY_KINDS.items():
            found.append((kind, " ".join(words[rng.randint(lo, hi) - 1] for lo, hi in bands)))
    return found


def postings(texts: list[str], asked: list[tuple[str, str]]) -> dict[str, set[int]]:
    """Each word of the queries ``asked``, and the indexes of the ``texts`` that have it."""
    found: dict[str, set[int]] = {word: set() for _, query in asked for word in query.split()}
    for i, text in enumerate(texts):
        for word in found.keys() & set(text.split()):
            found[word].add(i)
    return found


def expected(held: dict[str, set[int]], asked: list[tuple[str, str]]) -> dict[str, int]:
    """How many messages each query of ``asked`` finds: those `reader` may read with any of
    its words (``held`` are the words' postings), at most LIMIT."""
    readable = {i for i, to in enumerate(ADDRESSES) if to != ["bystander"]}
    found = {}
    for _, query in asked:
        having = set().union(*(held[word] for word in query.split()))
        found[query] = min(LIMIT, sum(i % len(ADDRESSES) in readable for i in having))
    return found


def make_spaces(path: Path, reader: Conn) -> None:
    """`bystander` creates `#team` and `#lobby` (so each has a member besides any author);
    ``reader`` joins `#team`. `bystander`, offline, is a participant the fill's DMs go to."""
    bystander = Conn(path)
    register(bystander, "bystander")
    for rid, space in enumerate(("team", "lobby"), 3):
        reply = bystander.call(SpaceCreate(id=rid, sender="bystander", name=space))
        assert isinstance(reply, SpaceReply), reply
    reply = reader.call(SpaceJoin(id=5, sender="reader", space="team"))
    assert isinstance(reply, Ok), reply
    bystander.close()


def search(
    conn: Conn, asked: list[tuple[str, str]], calls: int, found: dict[str, int]
) -> tuple[list[tuple[str, float]], list[float]]:
    """(kind, seconds) per `search_mail`, cycling through ``asked`` (once first, untimed),
    and seconds per `ping`, alternating; each reply checked after its timing against
    ``found``, how many messages each query finds."""
    frames = [
        (kind, query, MSGPACK.encode_frame(SearchMail(id=1, reader="reader", query=query)))
        for kind, query in asked
    ]
    ping_frame = MSGPACK.encode_frame(Ping(id=2))
    searches: list[tuple[str, float]] = []
    pings: list[float] = []
    warmup = len(frames)
    for i, (kind, query, frame) in zip(range(warmup + calls), itertools.cycle(frames)):
        t0 = time.perf_counter()
        conn.sock.sendall(frame)
        page = conn.recv()
        t1 = conn.arrived
        t2 = time.perf_counter()
        conn.sock.sendall(ping_frame)
        pong = conn.recv()
        t3 = conn.arrived
        assert isinstance(pong, Pong), pong
        check_found(page, query, found[query])
        if i >= warmup:
            searches.append((kind, t1 - t0))
            pings.append(t3 - t2)
    return searches, pings


def check_found(page: object, query: str, count: int) -> None:
    """``page`` holds ``count`` messages `reader` may read, each with a word of ``query``."""
    assert isinstance(page, Messages), page
    assert len(page.items) == count, (query, len(page.items), count)
    wanted = set(query.split())
    for item in page.items:
        message = item.message
        assert message.space in READABLE_SPACES or "reader" in message.recipients, message
        assert wanted & set(re.findall(r"\w+", message.content)), (query, message.content)


def search_stores(root: Path, storage: str | None) -> list[str]:
    """Where search is measured: sqlite normal and memory: by default, else ``storage``."""
    if storage is not None:
        return [storage]
    return [f"sqlite:///{root / 'mail-search' / 'bench.db'}?synchronous=normal", "memory:"]


def search_figures(root: Path, stored: int, calls: int, storage: str) -> list[Figure]:
    rng = random.Random(SEED)
    words = vocabulary(rng)
    texts = corpus(stored, words, rng)
    asked = queries(words, rng)
    held = postings(texts, asked)
    letters = zip(itertools.cycle(ADDRESSES), texts, strict=False)
    tag = storage_tag(storage)
    with chinwag_serve(root / f"mail-search-{tag or 'full'}", echo_config(), storage) as daemon:
        reader = Conn(daemon.socket_path)  # registered for the whole fill and the searches
        register(reader, "reader")
        make_spaces(daemon.socket_path, reader)
        with split_cores([daemon.pid]) as placement:
            rate = fill(daemon.socket_path, stored, iter(letters))
            searched, pings = search(reader, asked, calls, expected(held, asked))
        reader.close()
    times = [t for _, t in searched]
    by_kind = {
        kind: statistics.median(t for k, t in searched if k == kind) * 1e3 for kind in QUERY_KINDS
    }
    sizes = sorted(len(held[word]) for _, query in asked for word in query.split())
    key = f"_{tag}" if tag else ""
    where = f" [{storage_short(storage)}]"
    kinds = ", ".join(f"{kind} {ms:.2f}" for kind, ms in by_kind.items())
    return [
        Figure(
            f"mail_search_p50{key}",
            "s",
            f"search_mail over {stored:,} messages p50{where}",
            "ms",
            percentile(times, 0.5) * 1e3,
            "lower",
            [Baseline(PING, percentile(pings, 0.5) * 1e3)],
            Target("<=", 10),
            note=f"`search_mail {{as: reader, query, limit: {LIMIT}}}`, write -> read, {calls} "
            f"calls alternating with a ping, cycling through {len(asked)} queries of 1 to 3 "
            f"words; p50 by kind, ms: {kinds}; a query word is in {sizes[0]:,} to "
            f"{sizes[-1]:,} of the messages (median {statistics.median(sizes):,.0f}); "
            f"{placement}",
        ),
        Figure(
            f"mail_search_p99{key}",
            "s",
            f"search_mail over {stored:,} messages p99{where}",
            "ms",
            percentile(times, 0.99) * 1e3,
            "lower",
            [Baseline(PING, percentile(pings, 0.99) * 1e3)],
        ),
        Figure(
            f"mail_search_fill_rate{key}",
            "s",
            f"filling: {stored:,} posts of varied text (indexed for search){where}",
            "posts/s",
            rate,
            "higher",
            note="as bench/mail.py's inbox fill; 6 in 10 DMs to `reader`, 2 in 10 to spaces, "
            f"2 in 10 DMs to another; {statistics.mean(len(t.split()) for t in texts):.1f} "
            "words a message",
        ),
    ]


# --- space fan-out ----------------------------------------------------------------


def join_crowd(conn: Conn, name: str) -> None:
    reply = conn.call(SpaceJoin(id=3, sender=name, space=CROWD))
    assert isinstance(reply, Ok), reply


def space_fan_out_figures(
    root: Path, watchers: int, posts: int, warmup: int, storage: str | None
) -> list[Figure]:
    with chinwag_serve(root / "mail-space-fan-out", echo_config(), storage) as daemon:
        host = Conn(daemon.socket_path)
        register(host, "host")
        reply = host.call(SpaceCreate(id=3, sender="host", name=CROWD))
        assert isinstance(reply, SpaceReply), reply
        reply = host.call(SpaceLeave(id=4, sender="host", space=CROWD))
        assert isinstance(reply, Ok), reply
        host.close()
        with split_cores([daemon.pid]) as placement:
            found = fan_out(daemon, watchers, posts, warmup, f"#{CROWD}", join_crowd)
    tag = storage_tag(storage)
    key = f"_{tag}" if tag else ""
    where = f" [{storage_short(storage)}]" if tag else ""
    space_cpu = statistics.median(found.everyone_cpu) * 1e3
    one_cpu = statistics.median(found.one_cpu) * 1e3
    return [
        Figure(
            f"mail_space_fanout_p50{key}",
            "s",
            f"post to a {watchers}-member space: last `mail` p50{where}",
            "ms",
            percentile(found.everyone, 0.5) * 1e3,
            "lower",
            [Baseline(ONE_WATCHER, percentile(found.one, 0.5) * 1e3)],
            note=f"`#{CROWD}`, public, its {watchers} members each watching on a connection of "
            f"its own; the author not a member; post write -> the last of the {watchers} "
            f"`mail` frames; {posts} posts on {storage_label(storage)}; {placement}; daemon "
            f"CPU (all threads) per post, median: {space_cpu:.2f} ms, a DM {one_cpu:.2f} ms",
        ),
        Figure(
            f"mail_space_fanout_p99{key}",
            "s",
            f"post to a {watchers}-member space: last `mail` p99{where}",
            "ms",
            percentile(found.everyone, 0.99) * 1e3,
            "lower",
            [Baseline(ONE_WATCHER, percentile(found.one, 0.99) * 1e3)],
            Target("<=", 10),
        ),
    ]


# --- locks ------------------------------------------------------------------------


class LockRoundTrip:
    """`locker` takes a lock and gives it back: `once` times the `lock`'s write to the read
    of the `unlock`'s `ok`, and keeps each request's own round trip (its write to the read
    of its reply) in `acquired` and `released`; both replies are decoded and checked after
    the timing."""

    def __init__(self, path: Path) -> None:
        self.conn = Conn(path)
        register(self.conn, "locker")
        self.lock = MSGPACK.encode_frame(LockRequest(id=1, sender="locker", resource=RESOURCE))
        self.unlock = MSGPACK.encode_frame(Unlock(id=2, sender="locker", resource=RESOURCE))
        self.acquired: list[float] = []
        self.released: list[float] = []

    def once(self) -> float:
        conn = self.conn
        t0 = time.perf_counter()
        conn.sock.sendall(self.lock)
        taken = conn.recv_body()
        t1 = conn.arrived
        t2 = time.perf_counter()
        conn.sock.sendall(self.unlock)
        given_back = conn.recv_body()
        t3 = conn.arrived
        result = MSGPACK.decode_server(taken)
        assert isinstance(result, LockResult) and result.acquired, result
        ok = MSGPACK.decode_server(given_back)
        assert isinstance(ok, Ok), ok
        self.acquired.append(t1 - t0)
        self.released.append(t3 - t2)
        return t3 - t0

    def close(self) -> None:
        self.conn.close()


def lock_figures(root: Path, rounds: int, warmup: int, storage: str | None) -> list[Figure]:
    daemon_root = root / f"mail-lock-{storage_tag(storage) or 'full'}"
    made: list[LockRoundTrip] = []

    def probe(path: Path) -> LockRoundTrip:
        made.append(LockRoundTrip(path))
        return made[-1]

    ours, found, floor, placement = against_floors(
        root, daemon_root, storage, probe, rounds, warmup
    )
    tag = storage_tag(storage)
    key = f"_{tag}" if tag else ""
    where = f" [{storage_short(storage)}]"
    target = None if floor is None else Target("<=", 2, of=floor)
    p50s = [Baseline(name, percentile(s, 0.5) * 1e3) for name, s in found.items()]
    each = {
        ("lock", "acquire"): made[0].acquired[warmup:],
        ("unlock", "release"): made[0].released[warmup:],
    }
    return [
        *(
            Figure(
                f"mail_lock_{step}_p50{key}",
                "s",
                f"`{request}` round trip, p50{where}",
                "ms",
                percentile(samples, 0.5) * 1e3,
                "lower",
                p50s,
                target,
                note=f"`{request}`'s write -> its reply, one request and one commit, as "
                f"raw-durable; {rounds} rounds of lock + unlock on {storage_label(storage)}, "
                f"in blocks of 100 alternating with the floors ({ROUND_TRIP} and, on sqlite, "
                f"raw-durable); {placement}",
            )
            for (request, step), samples in each.items()
        ),
        Figure(
            f"mail_lock_p50{key}",
            "s",
            f"lock + unlock, each awaited, p50{where}",
            "ms",
            percentile(ours, 0.5) * 1e3,
            "lower",
            p50s,
            note="the lock's write -> the unlock's `ok`: two requests, two commits",
        ),
        Figure(
            f"mail_lock_p99{key}",
            "s",
            f"lock + unlock, each awaited, p99{where}",
            "ms",
            percentile(ours, 0.99) * 1e3,
            "lower",
            [Baseline(name, percentile(s, 0.99) * 1e3) for name, s in found.items()],
        ),
    ]


# --- the benchmark --------------------------------------------------------------------


def figures(
    root: Path,
    stored: int = 100_000,
    searches: int = 300,
    watchers: int = 100,
    fanout_posts: int = 50,
    locks: int = 1000,
    storage: str | None = None,
) -> list[Figure]:
    found: list[Figure] = []
    for searched in search_stores(root, storage):
        found += search_figures(root, stored, searches, searched)
    found += space_fan_out_figures(root, watchers, fanout_posts, FANOUT_WARMUP, storage)
    for store in stores(storage, root):
        found += lock_figures(root, locks, max(50, locks // 10), store)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stored", type=int, default=100_000, help="messages searched")
    parser.add_argument("--searches", type=int, default=300, help="search_mail calls")
    parser.add_argument("--watchers", type=int, default=100, help="the space's members")
    parser.add_argument("--fanout-posts", type=int, default=50, help="posts to the space")
    parser.add_argument("--locks", type=int, default=1000, help="lock + unlock rounds")
    run_alone(
        parser,
        lambda root, args: figures(
            root,
            args.stored,
            args.searches,
            args.watchers,
            args.fanout_posts,
            args.locks,
            args.storage,
        ),
    )


if __name__ == "__main__":
    main()
