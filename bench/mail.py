"""(m) Mail: delivery latency, @everyone fan-out, and inbox over 100,000 stored messages.

Every client here is a plain blocking (or, for the watchers, epoll) socket that
writes frames encoded beforehand and reads frame bodies, so that the client costs
as little as it can; times are `time.perf_counter` in the client process, taken
when the `recv` that completed a frame returned. While figures are taken, the
client process is pinned to one CPU and every server (all its threads) to
another, chinwag and baselines alike (`split_cores`): on the 2-vCPU VM these
were measured on, a round trip across two CPUs costs about 65 us more than on
one, and the kernel's
placement, which changes from one process to the next, moved the delivery p50
between 0.20 and 0.34 ms while its floor stayed put.

- **Delivery.** Client A registers `poster`, client B registers `watcher` and
  sends `watch`. Then, one after another, A posts a short DM to `watcher`; each
  is timed from A's write of `post` to B's read of the `mail` frame (A's `posted`
  is read after it, before the next post). p50 and p99 over the posts, on sqlite
  with `synchronous=full` and with `synchronous=normal` (by default; else on the
  store `--storage` names). Beside each, the floor, in the same run, with the
  same client, its servers running beside the daemon and measured in alternate
  blocks of 100 with it (so that a change of the machine's load falls on all
  alike): raw-durable (`bench._bare_server durable`, the same
  `synchronous`), timed from writing a one-word `stream` to reading its `start`:
  a bare trio round trip plus one sqlite commit inline on its loop (its second
  commit, before `end`, is made before the next request is written); and the
  bare trio round trip alone (`bench._bare_server echo`, a `ping` frame echoed).
  For scale, @hasna/conversations delivers by polling SQLite every 200 ms, 107 to
  119 ms a message as measured on this machine: 110 ms is printed beside the
  p50, not measured here. Target: p50 <= 2x the floor.
- **Fan-out.** 100 participants `w000`..`w099`, each registered and watching on
  a connection of its own, and `announcer`; the daemon also knows its two echo
  agents, so `@everyone` reaches 102 (the agents start no run: @everyone asks
  none). Per post: from the write of an `@everyone` post to the arrival of the
  last of the 100 watchers' `mail` frames (read by one epoll loop that only
  splits frames; they are decoded and checked after the timing). Baseline, same
  daemon, same loop, alternating post by post with the fan-out: a DM to `w000`
  alone, to its `mail` frame; 20 of each first as a warm-up (the first posts
  after the watchers connect are slow). The note gives the daemon's CPU (all its threads,
  from /proc schedstat) per post of each kind, from the write to `posted`.
  Target: p99 <= 10 ms.
- **Inbox.** One participant, `reader`, with 100,000 messages: the store is
  filled over the socket by 4 connections, each writing its posts in batches of
  128 (one `sendall`) and reading the 128 `posted` before writing its next
  batch, the connections taking turns so that the daemon always has requests
  waiting; the fill rate is posts/s over the whole fill. Then `inbox {as:
  reader, limit: 50}` (the first page, newest first: 50 messages and the unread
  count) over the socket, timed write to read, alternating with a `ping` on the
  same connection (the baseline). The first calls mark the page `delivered` (a
  write); the warm-up takes them. By default the inbox daemon runs on sqlite
  with `synchronous=normal`: its reads are the same as under `full`, and the
  fill, one commit per post, takes about 20 s there against about 50 s.

    python -m bench.mail [--posts 1000] [--watchers 100] [--fanout-posts 50]
        [--stored 100000] [--inbox-calls 200] [--storage URL]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import socket
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import msgspec
from chinwag.protocol import (
    MSGPACK,
    End,
    Error,
    FrameDecoder,
    Hello,
    Inbox,
    Mail,
    Messages,
    Ping,
    Pong,
    Post,
    Posted,
    Register,
    Registered,
    ServerMsg,
    Start,
    Stream,
    Watch,
    Watching,
    Welcome,
)

from ._processes import (
    Server,
    bare_server,
    chinwag_serve,
    echo_config,
    raw_durable,
    run_alone,
    storage_label,
    storage_short,
    storage_tag,
    synchronous_of,
)
from ._report import Baseline, Figure, Target, percentile
from .first_event import ROUND_TRIP, raw_durable_label

TIMEOUT_S = 60.0  # for any one frame: a daemon that stalls fails the benchmark, not hangs it
HASNA_MS = 110.0  # @hasna/conversations, p50 per message, measured on this machine (107-119)
HASNA = "@hasna/conversations p50 (their figure, not this run)"
ONE_WATCHER = "one watcher (a DM), same daemon, same run"
PING = "ping round trip, same connection, same run"
FILL_CONNECTIONS = 4
FILL_BATCH = 128  # posts per write; under max_open_requests (256)
PAGE = 50
BLOCK = 100  # delivery: samples of one probe before the next probe's
FANOUT_WARMUP = 20  # pairs of posts: the first few after the watchers connect are slow


class Conn:
    """One blocking connection: frames out, decoded frames in, each with when it arrived."""

    def __init__(self, path: Path, *, hello: bool = True) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(TIMEOUT_S)
        self.sock.connect(str(path))
        self.decoder = FrameDecoder(1 << 30)
        self.arrived = 0.0
        if hello:
            self.sock.sendall(
                MSGPACK.encode_frame(Hello(protocol=1, client="bench-mail", features=["mail"]))
            )
            welcome = self.recv()
            assert isinstance(welcome, Welcome), welcome

    def recv_body(self) -> bytes:
        while (body := self.decoder.next_frame()) is None:
            data = self.sock.recv(1 << 16)
            if not data:
                raise EOFError("the server closed the connection")
            self.arrived = time.perf_counter()
            self.decoder.feed(data)
        return body

    def recv(self) -> ServerMsg:
        return MSGPACK.decode_server(self.recv_body())

    def call(self, msg: msgspec.Struct) -> ServerMsg:
        self.sock.sendall(MSGPACK.encode_frame(msg))
        reply = self.recv()
        if isinstance(reply, Error):
            raise RuntimeError(f"{type(msg).__name__} refused: {reply.code} {reply.message}")
        return reply

    def close(self) -> None:
        self.sock.close()


def register(conn: Conn, name: str, watch: bool = False) -> None:
    reply = conn.call(Register(id=1, name=name, info={"session": f"bench-{name}"}))
    assert isinstance(reply, Registered), reply
    if watch:
        reply = conn.call(Watch(id=2, reader=name))
        assert isinstance(reply, Watching), reply


# --- delivery ---------------------------------------------------------------------


class Delivery:
    """A posts DMs to B, who watches; `once` times one from A's write to B's read."""

    def __init__(self, path: Path) -> None:
        self.a, self.b = Conn(path), Conn(path)
        register(self.a, "poster")
        register(self.b, "watcher", watch=True)
        self.rid = 10

    def once(self) -> float:
        self.rid += 1
        frame = MSGPACK.encode_frame(
            Post(id=self.rid, sender="poster", to=["watcher"], content=f"hello {self.rid}")
        )
        t0 = time.perf_counter()
        self.a.sock.sendall(frame)
        mail = self.b.recv()
        t1 = self.b.arrived
        posted = self.a.recv()
        assert isinstance(posted, Posted), posted
        assert isinstance(mail, Mail) and mail.msg_id == posted.msg_id, (mail, posted)
        return t1 - t0

    def close(self) -> None:
        self.a.close()
        self.b.close()


class DurableFloor:
    """raw-durable: `once` times a one-word `stream` from its write to its `start` (a round
    trip and one commit), then reads its `end` (after a second commit)."""

    def __init__(self, path: Path) -> None:
        self.conn = Conn(path)
        self.frame = MSGPACK.encode_frame(
            Stream(id=1, agent="assistant", sender="bench", content="hello")
        )

    def once(self) -> float:
        conn = self.conn
        t0 = time.perf_counter()
        conn.sock.sendall(self.frame)
        start = conn.recv()
        t1 = conn.arrived
        assert isinstance(start, Start), start
        while not isinstance(event := conn.recv(), End):
            pass
        assert event.status == "done", event
        return t1 - t0

    def close(self) -> None:
        self.conn.close()


class RoundTrip:
    """The bare echo server: `once` times a `ping` frame from its write to its echo."""

    def __init__(self, path: Path) -> None:
        self.conn = Conn(path, hello=False)
        self.frame = MSGPACK.encode_frame(Ping(id=1))

    def once(self) -> float:
        t0 = time.perf_counter()
        self.conn.sock.sendall(self.frame)
        self.conn.recv_body()
        return self.conn.arrived - t0

    def close(self) -> None:
        self.conn.close()


class Probe(Protocol):
    """What `alternate` samples: `once` takes one sample, in seconds."""

    def once(self) -> float: ...

    def close(self) -> None: ...


def alternate(probes: dict[str, Probe], count: int, warmup: int) -> dict[str, list[float]]:
    """``count`` samples of each probe after ``warmup``, taken in alternate blocks of BLOCK,
    so that a change of the machine's load falls on all of them alike."""
    for probe in probes.values():
        for _ in range(warmup):
            probe.once()
    found: dict[str, list[float]] = {name: [] for name in probes}
    while (done := len(next(iter(found.values())))) < count:
        for name, probe in probes.items():
            found[name] += [probe.once() for _ in range(min(BLOCK, count - done))]
    for probe in probes.values():
        probe.close()
    return found


@contextlib.contextmanager
def split_cores(pids: list[int]) -> Iterator[str]:
    """Pin this (single-threaded) client to one CPU and every thread of ``pids`` to another
    while inside; says where. A round trip across two CPUs costs about 65 us more than on
    one on the 2-vCPU VM these figures were measured on, so the kernel's placement, which
    differs from one process to the next, would decide the ratio; pinned, chinwag and its
    floors pay the same."""
    cpus = os.sched_getaffinity(0)
    if len(cpus) < 2:
        yield "not pinned (one CPU)"
        return
    client, server = sorted(cpus)[:2]
    os.sched_setaffinity(0, {client})
    try:
        for pid in pids:  # threads started later inherit their starter's CPU
            for task in Path(f"/proc/{pid}/task").iterdir():
                with contextlib.suppress(ProcessLookupError):
                    os.sched_setaffinity(int(task.name), {server})
        yield f"client pinned to CPU {client}, servers to CPU {server}"
    finally:
        os.sched_setaffinity(0, cpus)


def against_floors(
    root: Path,
    daemon_root: Path,
    storage: str | None,
    probe: Callable[[Path], Probe],
    count: int,
    warmup: int,
) -> tuple[list[float], dict[str, list[float]], str | None, str]:
    """``probe`` (made on the socket of a daemon in ``daemon_root`` on ``storage``) taken by
    `alternate` with the floors: raw-durable (on sqlite, the same `synchronous`) and the bare
    round trip. Returns chinwag's samples, the floors' by name, raw-durable's name (None off
    sqlite) and where the processes ran."""
    floor = None
    with contextlib.ExitStack() as servers:
        daemon = servers.enter_context(chinwag_serve(daemon_root, echo_config(), storage))
        probes: dict[str, Probe] = {"chinwag": probe(daemon.socket_path)}
        if (synchronous := synchronous_of(storage)) is not None:
            floor = raw_durable_label(synchronous)
            durable = servers.enter_context(raw_durable(root, synchronous))
            probes[floor] = DurableFloor(durable.socket_path)
        bare = servers.enter_context(bare_server(root, "echo"))
        probes[ROUND_TRIP] = RoundTrip(bare.socket_path)
        pids = [daemon.pid, bare.pid] + ([durable.pid] if floor is not None else [])
        with split_cores(pids) as placement:
            found = alternate(probes, count, warmup)
    return found.pop("chinwag"), found, floor, placement


def delivery_figures(root: Path, posts: int, warmup: int, storage: str | None) -> list[Figure]:
    daemon_root = root / f"mail-delivery-{storage_tag(storage) or 'full'}"
    ours, found, floor, placement = against_floors(
        root, daemon_root, storage, Delivery, posts, warmup
    )
    tag = storage_tag(storage)
    key = f"_{tag}" if tag else ""
    where = f" [{storage_short(storage)}]"
    p50 = percentile(ours, 0.5) * 1e3
    p50s = [Baseline(name, percentile(s, 0.5) * 1e3) for name, s in found.items()]
    p99s = [Baseline(name, percentile(s, 0.99) * 1e3) for name, s in found.items()]
    return [
        Figure(
            f"mail_delivery_p50{key}",
            "m",
            f"post -> watcher's `mail` p50{where}",
            "ms",
            p50,
            "lower",
            [*p50s, Baseline(HASNA, HASNA_MS)],
            None if floor is None else Target("<=", 2, of=floor),
            note=f"A posts a DM to B, B watching; A's write -> B's read; {posts} sequential posts "
            f"on {storage_label(storage)}; {placement}; {HASNA_MS:g} ms / p50 = "
            f"{HASNA_MS / p50:,.0f}x faster than @hasna/conversations' polling",
        ),
        Figure(
            f"mail_delivery_p99{key}",
            "m",
            f"post -> watcher's `mail` p99{where}",
            "ms",
            percentile(ours, 0.99) * 1e3,
            "lower",
            p99s,
        ),
    ]


# --- fan-out ----------------------------------------------------------------------


@dataclass
class Watcher:
    conn: Conn
    bodies: list[bytes] = field(default_factory=list)


def await_frames(poller: select.epoll, by_fd: dict[int, Watcher], want: set[int]) -> float:
    """Read every watcher as its bytes come until each fd of ``want`` holds a whole frame;
    when the last of them arrived. Frames are split, not decoded."""
    pending = set(want)
    last = 0.0
    while pending:
        ready = poller.poll(TIMEOUT_S)
        if not ready:
            raise TimeoutError(f"{len(pending)} watchers got nothing in {TIMEOUT_S:g} s")
        for fd, _ in ready:
            w = by_fd[fd]
            try:
                data = w.conn.sock.recv(1 << 16)
            except BlockingIOError:
                continue
            now = time.perf_counter()
            if not data:
                raise EOFError("the daemon closed a watcher's connection")
            w.conn.decoder.feed(data)
            while (body := w.conn.decoder.next_frame()) is not None:
                w.bodies.append(body)
            if fd in pending and w.bodies:
                pending.discard(fd)
                last = now
    return last


def check_mail(watchers: list[Watcher], msg_id: str) -> None:
    """Each watcher that got frames got exactly the one `mail` of ``msg_id``."""
    for w in watchers:
        if not w.bodies:
            continue
        assert len(w.bodies) == 1, f"{len(w.bodies)} frames for one post"
        mail = MSGPACK.decode_server(w.bodies.pop())
        assert isinstance(mail, Mail) and mail.msg_id == msg_id, mail


def cpu_ns(pid: int) -> int:
    """Nanoseconds on a CPU of all the process's threads so far (/proc schedstat: finer
    than the 10 ms ticks of /proc/PID/stat)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # a thread ended
            total += int((task / "schedstat").read_text().split()[0])
    return total


@dataclass
class FanOut:
    everyone: list[float]  # s, post write -> the last watcher's `mail`
    one: list[float]  # s, DM write -> its `mail`
    everyone_cpu: list[float]  # s of daemon CPU, from the write to the `posted` read
    one_cpu: list[float]


def fan_out(
    server: Server,
    watchers: int,
    posts: int,
    warmup: int,
    address: str = "@everyone",
    enrol: Callable[[Conn, str], None] | None = None,
) -> FanOut:
    """Each post to ``address`` (which must reach every watcher) and each DM to `w000`,
    alternating; ``enrol``, when given, is called with each watcher once it watches."""
    path = server.socket_path
    crowd = []
    for i in range(watchers):
        conn = Conn(path)
        register(conn, f"w{i:03d}", watch=True)
        if enrol is not None:
            enrol(conn, f"w{i:03d}")
        conn.sock.setblocking(False)
        crowd.append(Watcher(conn))
    a = Conn(path)
    register(a, "announcer")
    poller = select.epoll()
    by_fd = {w.conn.sock.fileno(): w for w in crowd}
    for fd in by_fd:
        poller.register(fd, select.EPOLLIN)
    everyone = set(by_fd)
    first = {crowd[0].conn.sock.fileno()}
    found = FanOut([], [], [], [])
    rid = 10
    for i in range(warmup + posts):
        for to, want, samples, cpu in (
            ([address], everyone, found.everyone, found.everyone_cpu),
            (["w000"], first, found.one, found.one_cpu),
        ):
            rid += 1
            frame = MSGPACK.encode_frame(
                Post(id=rid, sender="announcer", to=to, content=f"to {to[0]}, number {i}")
            )
            cpu0 = cpu_ns(server.pid)
            t0 = time.perf_counter()
            a.sock.sendall(frame)
            last = await_frames(poller, by_fd, want)
            posted = a.recv()
            cpu1 = cpu_ns(server.pid)
            assert isinstance(posted, Posted), posted
            check_mail(crowd, posted.msg_id)
            if i >= warmup:
                samples.append(last - t0)
                cpu.append((cpu1 - cpu0) / 1e9)
    poller.close()
    a.close()
    for w in crowd:
        w.conn.close()
    return found


def fan_out_figures(
    root: Path, watchers: int, posts: int, warmup: int, storage: str | None
) -> list[Figure]:
    with (
        chinwag_serve(root / "mail-fan-out", echo_config(), storage) as daemon,
        split_cores([daemon.pid]) as placement,
    ):
        found = fan_out(daemon, watchers, posts, warmup)
    tag = storage_tag(storage)
    key = f"_{tag}" if tag else ""
    where = f" [{storage_short(storage)}]" if tag else ""
    everyone_cpu = statistics.median(found.everyone_cpu) * 1e3
    one_cpu = statistics.median(found.one_cpu) * 1e3
    return [
        Figure(
            f"mail_fanout_p50{key}",
            "m",
            f"@everyone to {watchers} watchers: last `mail` p50{where}",
            "ms",
            percentile(found.everyone, 0.5) * 1e3,
            "lower",
            [Baseline(ONE_WATCHER, percentile(found.one, 0.5) * 1e3)],
            note=f"{watchers} connections, each registered and watching; post write -> the "
            f"last of the {watchers} `mail` frames; {posts} posts on {storage_label(storage)}; "
            f"{placement}; daemon CPU (all threads) per post, median: {everyone_cpu:.2f} ms, a DM "
            f"{one_cpu:.2f} ms",
        ),
        Figure(
            f"mail_fanout_p99{key}",
            "m",
            f"@everyone to {watchers} watchers: last `mail` p99{where}",
            "ms",
            percentile(found.everyone, 0.99) * 1e3,
            "lower",
            [Baseline(ONE_WATCHER, percentile(found.one, 0.99) * 1e3)],
            Target("<=", 10),
        ),
    ]


# --- inbox ------------------------------------------------------------------------


def fill(path: Path, stored: int, letters: Iterator[tuple[list[str], str]] | None = None) -> float:
    """Post ``stored`` messages over FILL_CONNECTIONS pipelined connections: each the next
    of ``letters`` (its `to` and content), by default a DM to `reader`; posts/s."""
    conns = [Conn(path) for _ in range(FILL_CONNECTIONS)]
    for i, conn in enumerate(conns):
        register(conn, f"filler{i}")
    left = [stored // len(conns) + (i < stored % len(conns)) for i in range(len(conns))]
    in_flight = [0] * len(conns)
    rid = 10

    def send_batch(i: int) -> None:
        nonlocal rid
        count = min(FILL_BATCH, left[i])
        frames = bytearray()
        for _ in range(count):
            rid += 1
            to, content = (["reader"], f"message {rid}") if letters is None else next(letters)
            frames += MSGPACK.encode_frame(
                Post(id=rid, sender=f"filler{i}", to=to, content=content)
            )
        conns[i].sock.sendall(frames)
        left[i] -= count
        in_flight[i] = count

    t0 = time.perf_counter()
    for i in range(len(conns)):
        send_batch(i)
    while any(in_flight):
        for i, conn in enumerate(conns):
            for _ in range(in_flight[i]):
                posted = conn.recv()
                if not isinstance(posted, Posted):
                    raise RuntimeError(f"a post was refused while filling: {posted}")
            in_flight[i] = 0
            if left[i]:
                send_batch(i)
    rate = stored / (time.perf_counter() - t0)
    for conn in conns:
        conn.close()
    return rate


def inbox(path: Path, stored: int, calls: int, warmup: int) -> tuple[list[float], list[float]]:
    """Seconds per `inbox` first page of `reader`, and per `ping`, alternating."""
    conn = Conn(path)
    inbox_frame = MSGPACK.encode_frame(Inbox(id=1, reader="reader", limit=PAGE))
    ping_frame = MSGPACK.encode_frame(Ping(id=2))
    pages: list[float] = []
    pings: list[float] = []
    for i in range(warmup + calls):
        t0 = time.perf_counter()
        conn.sock.sendall(inbox_frame)
        page = conn.recv()
        t1 = conn.arrived
        assert isinstance(page, Messages), page
        assert len(page.items) == PAGE and page.unread == stored, (len(page.items), page.unread)
        t2 = time.perf_counter()
        conn.sock.sendall(ping_frame)
        pong = conn.recv()
        t3 = conn.arrived
        assert isinstance(pong, Pong), pong
        if i >= warmup:
            pages.append(t1 - t0)
            pings.append(t3 - t2)
    conn.close()
    return pages, pings


def inbox_storage(root: Path, storage: str | None) -> str:
    """The inbox daemon's store: ``storage``, by default sqlite with synchronous=normal."""
    if storage is not None:
        return storage
    return f"sqlite:///{root / 'mail-inbox' / 'bench.db'}?synchronous=normal"


def inbox_figures(
    root: Path, stored: int, calls: int, warmup: int, storage: str | None
) -> list[Figure]:
    store = inbox_storage(root, storage)
    with chinwag_serve(root / "mail-inbox", echo_config(), store) as daemon:
        reader = Conn(daemon.socket_path)  # registered for the whole fill and the reads
        register(reader, "reader")
        with split_cores([daemon.pid]) as placement:
            rate = fill(daemon.socket_path, stored)
            pages, pings = inbox(daemon.socket_path, stored, calls, warmup)
        reader.close()
    where = f" [{storage_short(store)}]"
    return [
        Figure(
            "mail_inbox_p50",
            "m",
            f"inbox first page (50) of {stored:,} messages p50{where}",
            "ms",
            percentile(pages, 0.5) * 1e3,
            "lower",
            [Baseline(PING, percentile(pings, 0.5) * 1e3)],
            note=f"`inbox {{as: reader, limit: {PAGE}}}`, write -> read, {calls} calls "
            f"alternating with a ping; {stored:,} DMs to `reader`, all unread; {placement}",
        ),
        Figure(
            "mail_inbox_p99",
            "m",
            f"inbox first page (50) of {stored:,} messages p99{where}",
            "ms",
            percentile(pages, 0.99) * 1e3,
            "lower",
            [Baseline(PING, percentile(pings, 0.99) * 1e3)],
        ),
        Figure(
            "mail_fill_rate",
            "m",
            f"filling: {stored:,} posts, {FILL_CONNECTIONS} connections pipelined{where}",
            "posts/s",
            rate,
            "higher",
            note=f"batches of {FILL_BATCH} posts a write, each connection's replies read "
            "before its next batch; the connections take turns",
        ),
    ]


# --- the benchmark --------------------------------------------------------------------


def stores(storage: str | None, root: Path) -> list[str | None]:
    """Where delivery is measured: sqlite full and normal by default, else ``storage``."""
    if storage is not None:
        return [storage]
    return [None, f"sqlite:///{root / 'mail-normal' / 'bench.db'}?synchronous=normal"]


def figures(
    root: Path,
    posts: int = 1000,
    watchers: int = 100,
    fanout_posts: int = 50,
    stored: int = 100_000,
    inbox_calls: int = 200,
    storage: str | None = None,
) -> list[Figure]:
    found: list[Figure] = []
    for store in stores(storage, root):
        found += delivery_figures(root, posts, max(50, posts // 10), store)
    found += fan_out_figures(root, watchers, fanout_posts, FANOUT_WARMUP, storage)
    found += inbox_figures(root, stored, inbox_calls, max(10, inbox_calls // 10), storage)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--posts", type=int, default=1000, help="sequential DMs (delivery)")
    parser.add_argument("--watchers", type=int, default=100)
    parser.add_argument("--fanout-posts", type=int, default=50, help="@everyone posts")
    parser.add_argument("--stored", type=int, default=100_000, help="messages in the inbox")
    parser.add_argument("--inbox-calls", type=int, default=200)
    run_alone(
        parser,
        lambda root, args: figures(
            root,
            args.posts,
            args.watchers,
            args.fanout_posts,
            args.stored,
            args.inbox_calls,
            args.storage,
        ),
    )


if __name__ == "__main__":
    main()
