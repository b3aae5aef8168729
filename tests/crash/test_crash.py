"""Crash safety, proven: the real daemon is killed with SIGKILL mid-run, again and again.

Each round, several client tasks (one conversation each, one of them pipelining
runs so that some wait queued) stream plain messages, ``/slow`` runs that are
still streaming when the kill lands, ``/title`` and ``/tool set_title`` calls,
and ``/ask`` questions answered from another connection. After a seeded random
delay the daemon is killed with SIGKILL and started again on the same storage,
and the whole history of every conversation used so far is checked:

- every entry decodes and has the fields its role calls for (nothing torn);
- seqs run 1, 2, 3... with no gap, and ``last_seq`` is the newest;
- a run's entries are contiguous and begin with its user entry; an assistant
  tool call is followed by exactly its results, and no result lacks its call;
- every assistant text is exactly what echo says for its user entry, so no
  message is half-streamed, and a run is a step-prefix of echo's full answer;
- every ``start`` the client saw has its user entry at that seq, every
  ``end done`` has its whole run stored with the text the client streamed;
- what one check saw is still there, unchanged, at every later check;
- the title is one a stored title run could have set.

The schedule (messages, kill delays) comes from one seed, printed in every
failure; see conftest.py for the knobs. A storage failure mid-run (issue 3,
item 6) is tested at the end, by triggers injected into sqlite and postgres.
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AsyncExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import anyio
import msgspec
import pytest
import trio
import worker_database
from chinwag.clients import ChinwagError, Client, EventStream, connect
from chinwag.protocol import (
    AskUser,
    End,
    Entry,
    History,
    Queued,
    Start,
    TextDelta,
    Title,
    ToolCall,
    ToolCallInfo,
    ToolResult,
)
from chinwag.storage import open_store
from deadlines import collect, next_event, next_of

AGENT = "assistant"

CONFIG = f"""
[daemon]
shutdown_grace_s = 2.0

[agents.{AGENT}]
provider = "echo"
description = "Echoes the user; calls the tools the crash harness names"
tools = ["set_title", "ask_user"]
"""

CLIENTS = 4  # conversations driven at once; the last one pipelines its runs
MAX_KILL_DELAY_S = 0.5
START_TIMEOUT_S = 10.0  # from the clients' start to the first `start` of a round
ROUND_TIMEOUT_S = 30.0

# fmt: off
WORDS = [
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
    "juliet", "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo",
    "sierra", "tango", "uniform", "victor", "whiskey", "xray", "yankee", "zulu",
]
# fmt: on


# --- backends ---------------------------------------------------------------------


@dataclass(frozen=True)
class Backend:
    name: str
    url: Callable[[Path], str]  # the store's URL, given a fresh directory
    needs_server: bool = False


def _postgres_url(root: Path) -> str:
    """The worker's test database, in a fresh schema (``?schema=``) the fixture drops after."""
    if worker_database.unreachable() is not None:
        return worker_database.SERVER_URL + "?schema=unreachable"  # for _probe to say so
    database = worker_database.database_url()
    separator = "&" if "?" in database else "?"
    return f"{database}{separator}schema=chinwag_crash_{uuid.uuid4().hex[:16]}"


def _postgres_connect(url: str) -> Any:
    """An autocommit psycopg connection into the schema of a postgres store URL."""
    import psycopg  # only the postgres tests need it, and it may not be installed

    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    schema = next(value for name, value in query if name == "schema")
    rest = [(name, value) for name, value in query if name not in ("schema", "pool_size")]
    conninfo = urlunsplit(parts._replace(query=urlencode(rest)))
    return psycopg.connect(conninfo, autocommit=True, options=f"-c search_path={schema}")


def _postgres_drop(url: str) -> None:
    with _postgres_connect(url) as conn:
        (schema,) = conn.execute("SELECT current_schema()").fetchone()
        if schema.startswith("chinwag_crash_"):
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


BACKENDS = {
    backend.name: backend
    for backend in [
        Backend("sqlite", lambda root: f"sqlite:///{root / 'data' / 'chinwag.db'}"),  # 4 slashes
        # Under synchronous=normal the store writes inline on the loop: its own way to the file.
        Backend(
            "sqlite-normal",
            lambda root: f"sqlite:///{root / 'data' / 'chinwag.db'}?synchronous=normal",
        ),
        Backend("jsonl", lambda root: f"jsonl:///{root / 'jsonl'}"),  # 4 slashes
        Backend("postgres", _postgres_url, needs_server=True),
    ]
}


def _probe(backend: Backend, url: str) -> None:
    """Skip unless ``open_store(url)`` works: a backend still to be written, or no server."""

    async def open_and_close() -> None:
        async with open_store(url):
            pass

    try:
        trio.run(open_and_close)
    except ValueError as exc:
        if "not implemented" in str(exc):
            pytest.skip(f"{backend.name}: open_store says {exc}")
        raise
    except Exception as exc:
        if not backend.needs_server:
            raise
        server = worker_database.SERVER_URL
        reason = f"{backend.name} at {server} is unusable: {type(exc).__name__}: {exc}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason} (under CI=true a missing server is a failure)")
        pytest.skip(reason)


@pytest.fixture(params=sorted(BACKENDS))
def storage_url(request: pytest.FixtureRequest, short_tmp: Path) -> Iterator[str]:
    """The URL of a fresh store of each durable backend that can be opened here."""
    backend = BACKENDS[request.param]
    if not backend.needs_server:
        _probe(backend, backend.url(short_tmp / "probe"))
    url = backend.url(short_tmp / "store")
    if backend.needs_server:
        _probe(backend, url)
    yield url
    if backend.needs_server:
        _postgres_drop(url)


# --- what echo says -------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One model step as stored: the assistant entry, and its tool call and result if any."""

    text: str
    call: tuple[str, str] | None = None  # (name, arguments)
    result: str | None = None


def echo(text: str) -> str:
    return " ".join(text.split())


def answer_for(question: str) -> str:
    return f"answer to {question}"


def title_result(title: str) -> str:
    return f"Title set to {' '.join(title.split())[:200]!r}."


def title_of(content: str) -> str | None:
    """The title a run of ``content`` sets, None if it sets none."""
    directive, _, rest = content.strip().partition(" ")
    if directive == "/title":
        return echo(rest)[:200]
    if directive == "/tool":
        name, _, arguments = rest.strip().partition(" ")
        if name == "set_title":
            return echo(json.loads(arguments)["title"])[:200]
    return None


def expected_steps(content: str) -> list[Step]:
    """Every step echo takes for a user entry of ``content``, in order."""
    text = content.strip()
    directive, _, rest = text.partition(" ")
    rest = rest.strip()
    if directive == "/slow":
        count, _ms = rest.split()
        return [Step(" ".join(str(i) for i in range(1, int(count) + 1)))]
    if directive == "/title":
        call = ("set_title", json.dumps({"title": rest}))
        result = title_result(rest)
    elif directive == "/tool":
        name, _, arguments = rest.partition(" ")
        assert name == "set_title", "the harness only sends /tool set_title"
        call = (name, arguments.strip())
        result = title_result(json.loads(arguments)["title"])
    elif directive == "/ask":
        question = {"question": rest, "header": "", "options": []}
        call = ("ask_user", json.dumps({"questions": [question]}))
        result = answer_for(rest)
    else:
        return [Step(echo(text))]
    return [Step("", call, result), Step(echo(result))]


def make_message(rng: random.Random, tag: str) -> str:
    words = " ".join(rng.choices(WORDS, k=rng.randint(1, 8)))
    kind = rng.choices(["plain", "slow", "title", "tool", "ask"], weights=[3, 3, 1, 1, 1])[0]
    if kind == "slow":
        return f"/slow {rng.randint(3, 40)} {rng.randint(2, 15)}"
    if kind == "title":
        return f"/title {tag} {words}"
    if kind == "tool":
        return "/tool set_title " + json.dumps({"title": f"{tag} {words}"})
    if kind == "ask":
        return f"/ask {tag} {words}?"
    spaced = words.replace(" ", "  ", 1) if rng.random() < 0.3 else words
    return f"{tag} {spaced}"


# --- what the clients saw -------------------------------------------------------


@dataclass
class Attempt:
    """One `stream` a client sent, and what it saw of its run."""

    content: str
    round: int
    queued: bool = False
    run_id: str | None = None
    start_seq: int | None = None
    deltas: list[str] = field(default_factory=list)
    call_ids: list[str] = field(default_factory=list)
    result_ids: list[str] = field(default_factory=list)
    titles: list[str] = field(default_factory=list)
    end: End | None = None

    def see(self, event: object) -> None:
        match event:
            case Queued():
                self.queued = True
            case Start(run_id=run_id, seq=seq):
                self.run_id, self.start_seq = run_id, seq
            case TextDelta(delta=delta):
                self.deltas.append(delta)
            case ToolCall(call_id=call_id):
                self.call_ids.append(call_id)
            case ToolResult(call_id=call_id):
                self.result_ids.append(call_id)
            case Title(title=title):
                self.titles.append(title)
            case End():
                self.end = event

    def describe(self) -> str:
        end = None if self.end is None else (self.end.status, self.end.last_seq, self.end.error)
        return (
            f"round {self.round} {self.content!r}: queued={self.queued} run_id={self.run_id}"
            f" start_seq={self.start_seq} end={end}"
        )


@dataclass
class Conversation:
    sender: str
    pipelined: bool = False
    attempts: list[Attempt] = field(default_factory=list)
    checked: list[Entry] = field(default_factory=list)  # the history at the last check


# --- the checks -------------------------------------------------------------------


def _entry_problems(entry: Entry) -> list[str]:
    """What is wrong with one entry's fields, given its role."""
    where = f"seq {entry.seq} ({entry.role or 'no role'})"
    problems = []
    if entry.kind != "message":
        problems.append(f"{where}: kind {entry.kind!r}, but nothing compacts here")
    if entry.role not in ("user", "assistant", "tool"):
        problems.append(f"{where}: role {entry.role!r}")
    if not entry.run_id:
        problems.append(f"{where}: no run_id")
    if entry.created_at is None:
        problems.append(f"{where}: no created_at")
    if entry.agent != "" or entry.archive is not None:
        problems.append(f"{where}: agent {entry.agent!r} / archive {entry.archive!r}")
    if entry.role != "assistant" and entry.tool_calls:
        problems.append(f"{where}: tool_calls on a {entry.role} entry")
    if (entry.role == "tool") != (entry.tool_call_id is not None):
        problems.append(f"{where}: tool_call_id {entry.tool_call_id!r}")
    if entry.is_error:
        problems.append(f"{where}: is_error, but every tool call here succeeds")
    for call in entry.tool_calls:
        if not (call.call_id and call.name and isinstance(call.arguments, str)):
            problems.append(f"{where}: torn tool call {call!r}")
    return problems


def _runs(entries: list[Entry], problems: list[str]) -> list[list[Entry]]:
    """Split the history into runs: a user entry and the entries of its run after it."""
    runs: list[list[Entry]] = []
    seen_run_ids: set[str | None] = set()
    for entry in entries:
        if entry.role == "user":
            if entry.run_id in seen_run_ids:
                problems.append(f"seq {entry.seq}: run_id {entry.run_id} begins a second run")
            seen_run_ids.add(entry.run_id)
            runs.append([entry])
        elif not runs or runs[-1][0].run_id != entry.run_id:
            problems.append(
                f"seq {entry.seq} ({entry.role}): run_id {entry.run_id} is not that of the"
                " user entry before it"
            )
        else:
            runs[-1].append(entry)
    return runs


def _steps(run: list[Entry], problems: list[str]) -> list[Step]:
    """A run's stored steps; reports tool calls without results and results without calls."""
    steps: list[Step] = []
    i = 1
    while i < len(run):
        entry = run[i]
        if entry.role != "assistant":
            problems.append(f"seq {entry.seq}: a tool result with no tool call before it")
            i += 1
            continue
        if not entry.tool_calls:
            steps.append(Step(entry.content))
            i += 1
            continue
        results = []
        for call in entry.tool_calls:
            i += 1
            if i >= len(run) or run[i].role != "tool" or run[i].tool_call_id != call.call_id:
                problems.append(
                    f"seq {entry.seq}: the tool call {call.call_id} ({call.name}) has no result"
                    " right after it"
                )
                break
            results.append(run[i].content)
        i += 1
        if len(entry.tool_calls) != 1 or len(results) != 1:
            problems.append(f"seq {entry.seq}: {len(entry.tool_calls)} calls, echo makes one")
            continue
        call = entry.tool_calls[0]
        steps.append(Step(entry.content, (call.name, call.arguments), results[0]))
    return steps


def check_history(conv: Conversation, history: History | None) -> list[str]:
    """Everything wrong with a conversation's history, given what its client saw."""
    problems: list[str] = []
    entries = history.entries if history is not None else []
    for entry in entries:
        problems += _entry_problems(entry)

    seqs = [e.seq for e in entries]
    if seqs != list(range(1, len(entries) + 1)):
        problems.append(f"seqs are not 1..{len(entries)} without gaps: {seqs}")
    if history is not None and history.last_seq != (seqs[-1] if seqs else 0):
        problems.append(f"last_seq {history.last_seq}, but the newest entry is {seqs[-1:]}")
    if entries[: len(conv.checked)] != conv.checked:
        problems.append(
            f"the {len(conv.checked)} entries the previous check saw changed or went away"
        )

    runs = _runs(entries, problems)
    steps_of: dict[str | None, list[Step]] = {}
    for run in runs:
        user = run[0]
        steps = steps_of[user.run_id] = _steps(run, problems)
        try:
            expected = expected_steps(user.content)
        except (ValueError, KeyError, AssertionError) as exc:  # JSONDecodeError is a ValueError
            problems.append(f"seq {user.seq}: the harness sent no {user.content!r} ({exc!r})")
            continue
        if steps != expected[: len(steps)] or len(steps) > len(expected):
            problems.append(
                f"run at seq {user.seq} ({user.content!r}): stored steps {steps}"
                f" are no prefix of what echo says, {expected}"
            )

    # Match every stored run to the attempt that sent it, in order.
    attempts = conv.attempts
    matched: dict[int, list[Entry]] = {}
    next_attempt = 0
    for run in runs:
        user = run[0]
        by_id = [i for i, a in enumerate(attempts) if a.run_id == user.run_id]
        if by_id:
            index = by_id[0]
        else:
            index = next(
                (
                    i
                    for i in range(next_attempt, len(attempts))
                    if attempts[i].run_id is None and attempts[i].content == user.content
                ),
                -1,
            )
        if index < next_attempt:
            problems.append(
                f"run at seq {user.seq} ({user.content!r}, run_id {user.run_id}) matches no"
                " stream the clients sent, in order"
            )
            continue
        matched[index] = run
        next_attempt = index + 1

    for index, attempt in enumerate(attempts):
        found = matched.get(index)
        if attempt.end is not None and attempt.end.status != "done":
            problems.append(f"a run ended {attempt.end.status}: {attempt.describe()}")
        if attempt.run_id is None:
            continue
        if found is None:
            problems.append(f"the client saw `start`, the user entry is gone: {attempt.describe()}")
            continue
        run = found
        if run[0].content != attempt.content:
            problems.append(f"seq {run[0].seq} holds {run[0].content!r}: {attempt.describe()}")
        if run[0].seq != attempt.start_seq:
            problems.append(f"`start` said seq {attempt.start_seq}, stored at {run[0].seq}")
        if attempt.end is None or attempt.end.status != "done":
            continue
        steps = steps_of[run[0].run_id]
        if steps != expected_steps(attempt.content):
            problems.append(
                f"the client saw `end done`, the run is not whole: {attempt.describe()}; stored"
                f" {steps}"
            )
        streamed = "".join(attempt.deltas)
        stored = "".join(e.content for e in run if e.role == "assistant")
        if streamed != stored:
            problems.append(f"streamed {streamed!r}, stored {stored!r}: {attempt.describe()}")
        if attempt.end.last_seq != run[-1].seq:
            problems.append(
                f"`end` said last_seq {attempt.end.last_seq}, run ends at {run[-1].seq}"
            )
        stored_calls = [c.call_id for e in run for c in e.tool_calls]
        if attempt.call_ids != stored_calls or attempt.result_ids != stored_calls:
            problems.append(
                f"streamed calls {attempt.call_ids} and results {attempt.result_ids}, stored"
                f" {stored_calls}: {attempt.describe()}"
            )

    # set_title is its own write: it may outlive a step the crash dropped, so the title
    # is that of the latest run whose set_title step is stored, or of a later title run.
    title = history.title if history is not None else ""
    titled = [(run, t) for run in runs if (t := _title_of(run[0].content)) is not None]
    done = [i for i, (run, _) in enumerate(titled) if len(run) > 1]
    allowed = {t for _, t in titled[done[-1] if done else 0 :]}
    if not done:
        allowed.add("")
    if title not in allowed:
        problems.append(f"the title is {title!r}, not one of {sorted(allowed)}")
    return problems


def _title_of(content: str) -> str | None:
    try:
        return title_of(content)
    except (ValueError, KeyError):
        return None  # reported as content the harness never sent


def _tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(no daemon log: {exc})"


@dataclass
class Harness:
    daemon: Any  # tests/conftest.py's DaemonProcess
    seed: int
    label: str
    conversations: list[Conversation]

    def context(self, round_no: int) -> str:
        return (
            f"{self.label}, seed {self.seed}, round {round_no} (replay: CHINWAG_CRASH_SEED="
            f"{self.seed} pytest tests/crash -k 'kill9 and {self.label}')"
        )

    @contextmanager
    def failing(self, round_no: int) -> Iterator[None]:
        """Whatever fails in here says the seed and round, and shows the daemon's log."""
        try:
            yield
        except AssertionError as exc:
            if self.context(round_no) not in str(exc):
                exc.add_note(f"{self.context(round_no)}\n{self.log()}")
            raise
        except BaseException as exc:  # a hang (TooSlowError), a daemon that would not start
            if not isinstance(exc, KeyboardInterrupt):
                exc.add_note(f"{self.context(round_no)}\n{self.log()}")
            raise

    def log(self) -> str:
        return f"daemon log, last lines:\n{_tail(self.daemon.log_path)}"

    async def check(self, round_no: int) -> None:
        """Read every conversation back from the daemon and check it whole."""
        report: list[str] = []
        async with connect(self.daemon.socket_path, client="crash-check") as c:
            for conv in self.conversations:
                history = await _history(c, conv.sender)
                problems = check_history(conv, history)
                if problems:
                    entries = history.entries if history else []
                    report.append(
                        f"conversation {conv.sender}:\n  "
                        + "\n  ".join(problems[:20])
                        + "\n  history:\n    "
                        + "\n    ".join(_show(e) for e in entries[-40:])
                        + "\n  attempts:\n    "
                        + "\n    ".join(a.describe() for a in conv.attempts[-10:])
                    )
                elif history is not None:
                    conv.checked = history.entries
        if report:
            raise AssertionError(
                f"{self.context(round_no)}:\n" + "\n".join(report) + f"\n{self.log()}"
            )


def _show(entry: Entry) -> str:
    calls = [(c.call_id, c.name, c.arguments) for c in entry.tool_calls]
    return (
        f"{entry.seq} {entry.role} run={entry.run_id} {entry.content!r}"
        + (f" calls={calls}" if calls else "")
        + (f" for={entry.tool_call_id}" if entry.tool_call_id else "")
    )


async def _history(c: Client, sender: str) -> History | None:
    """The whole history, every page of it: the daemon sends a page per request."""
    try:
        first = await c.history(AGENT, sender, include_archived=True)
    except ChinwagError as exc:
        if exc.code == 404:
            return None
        raise
    entries = list(first.entries)
    while entries and entries[-1].seq < first.last_seq:
        page = await c.history(AGENT, sender, after_seq=entries[-1].seq, include_archived=True)
        if not page.entries:
            break
        entries.extend(page.entries)
    return msgspec.structs.replace(first, entries=entries)


# --- the clients ------------------------------------------------------------------


@dataclass
class Round:
    number: int
    started: trio.Event = field(default_factory=trio.Event)  # some run of it started
    killed: bool = False  # set just before the SIGKILL


# What a client sees once the daemon is gone: the library's errors, and anyio's
# when the daemon dies between accepting a connection and reading its hello
# (`connect` lets the failed send of the hello escape as it is).
CONNECTION_GONE = (ChinwagError, OSError, anyio.BrokenResourceError, anyio.EndOfStream)


async def _consume(
    stream: EventStream, attempt: Attempt, sender: str, answerer: Client, round_: Round
) -> None:
    async for event in stream:
        attempt.see(event)
        if isinstance(event, Start):
            round_.started.set()
        elif isinstance(event, AskUser):
            question = event.questions[0].question
            await answerer.reply_to_ask(
                AGENT, answer_for(question), sender=sender, ask_id=event.ask_id
            )


async def _drive(
    socket_path: Path, conv: Conversation, rng: random.Random, answerer: Client, round_: Round
) -> None:
    """Stream runs on one conversation until the daemon goes away."""
    try:
        async with connect(socket_path, client=f"crash-{conv.sender}") as c:
            for k in range(1_000_000):
                batch = rng.randint(1, 3) if conv.pipelined else 1
                attempts = [
                    Attempt(make_message(rng, f"r{round_.number}.{k}.{j}"), round_.number)
                    for j in range(batch)
                ]
                async with AsyncExitStack() as stack, trio.open_nursery() as nursery:
                    for attempt in attempts:  # sent one by one: the daemon runs them in order
                        conv.attempts.append(attempt)
                        stream = c.stream(AGENT, attempt.content, sender=conv.sender)
                        await stack.enter_async_context(stream)
                        nursery.start_soon(_consume, stream, attempt, conv.sender, answerer, round_)
    except* CONNECTION_GONE:
        if not round_.killed:
            raise  # the daemon failed a client while it was up


async def _clients(
    socket_path: Path, conversations: list[Conversation], seeds: list[int], round_: Round
) -> None:
    try:
        async with (
            connect(socket_path, client="crash-answerer") as answerer,
            trio.open_nursery() as nursery,
        ):
            for conv, seed in zip(conversations, seeds, strict=True):
                rng = random.Random(seed)
                nursery.start_soon(_drive, socket_path, conv, rng, answerer, round_)
    except* CONNECTION_GONE:
        if not round_.killed:
            raise


async def crash_round(harness: Harness, rng: random.Random, round_no: int) -> None:
    """Stream on every conversation, SIGKILL the daemon at a random moment, restart it."""
    daemon = harness.daemon
    seeds = [rng.getrandbits(64) for _ in harness.conversations]
    early = rng.random() < 0.15  # from the clients' start: connecting, the first appends
    delay = rng.uniform(0, 0.03) if early else rng.uniform(0, MAX_KILL_DELAY_S)
    round_ = Round(round_no)
    with trio.fail_after(ROUND_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_clients, daemon.socket_path, harness.conversations, seeds, round_)
            if not early:
                with trio.move_on_after(START_TIMEOUT_S):
                    await round_.started.wait()
                if not round_.started.is_set():
                    raise AssertionError(f"No run started within {START_TIMEOUT_S} s.")
            await trio.sleep(delay)
            round_.killed = True
            daemon.proc.kill()
            await trio.to_thread.run_sync(daemon.proc.wait, 10)
            # The clients drain what reached them, see the connection drop, and end.
        await trio.to_thread.run_sync(daemon.start)


async def test_kill9_at_random_moments(
    storage_url: str, daemon_factory: Any, crash_rounds: int, crash_seed: int, request: Any
) -> None:
    backend = request.node.callspec.params["storage_url"]
    token = uuid.uuid4().hex[:8]
    conversations = [
        Conversation(f"crash-{token}-{i}", pipelined=i == CLIENTS - 1) for i in range(CLIENTS)
    ]
    daemon = daemon_factory(config=CONFIG, storage_url=storage_url, name="crash")
    harness = Harness(daemon, crash_seed, backend, conversations)
    rng = random.Random(crash_seed)
    started_at = time.monotonic()
    for round_no in range(1, crash_rounds + 1):
        with harness.failing(round_no):
            await crash_round(harness, rng, round_no)
            await harness.check(round_no)
    with harness.failing(crash_rounds):
        # A clean stop and start change nothing either ...
        assert await trio.to_thread.run_sync(daemon.stop) == 0, _tail(daemon.log_path)
        await trio.to_thread.run_sync(daemon.start)
        await harness.check(crash_rounds)
        assert await trio.to_thread.run_sync(daemon.stop) == 0, _tail(daemon.log_path)
        # ... and the store, opened directly, holds what the daemon served.
        async with open_store(storage_url) as store:
            for conv in conversations:
                if conv.checked:
                    stored = await store.history(AGENT, conv.sender, include_archived=True)
                    assert stored == conv.checked, f"{conv.sender}: the store differs"
    attempts = [a for c in conversations for a in c.attempts]
    done = sum(a.end is not None for a in attempts)
    cut = sum(a.run_id is not None and a.end is None for a in attempts)
    unstarted = sum(a.run_id is None for a in attempts)
    entries = sum(len(c.checked) for c in conversations)
    runs = [run for c in conversations for run in _runs(c.checked, [])]
    half = sum(len(run) > 1 and run[-1].role == "tool" for run in runs)
    print(
        f"\n{backend}: {crash_rounds} kill -9 rounds in {time.monotonic() - started_at:.1f} s,"
        f" seed {crash_seed}: {len(attempts)} streams, {done} done, {cut} cut after their"
        f" start, {unstarted} before it; {entries} entries checked, {len(runs)} runs stored,"
        f" {sum(len(run) == 1 for run in runs)} of them the user entry alone, {half} ending"
        " in a tool step"
    )


# --- storage failures (issue 3, item 6) -------------------------------------------


# (setup, teardown) statements that make every append fail in its INSERT, or
# let the INSERT pass and make the transaction's COMMIT fail; and the cause the
# run's error message must name.
FAILURES: dict[tuple[str, str], tuple[list[str], list[str], str]] = {
    ("sqlite", "insert"): (
        [
            "CREATE TRIGGER inject_failure BEFORE INSERT ON entries"
            " BEGIN SELECT RAISE(ABORT, 'injected failure'); END"
        ],
        ["DROP TRIGGER inject_failure"],
        "injected failure",
    ),
    ("sqlite", "commit"): (  # a deferred foreign key violation
        [
            "CREATE TABLE inject_parent (id INTEGER PRIMARY KEY)",
            "CREATE TABLE inject_child (parent INTEGER"
            " REFERENCES inject_parent (id) DEFERRABLE INITIALLY DEFERRED)",
            "CREATE TRIGGER inject_failure AFTER INSERT ON entries"
            " BEGIN INSERT INTO inject_child VALUES (1); END",
        ],
        ["DROP TRIGGER inject_failure", "DROP TABLE inject_child", "DROP TABLE inject_parent"],
        "FOREIGN KEY constraint failed",
    ),
}
_PG_FUNCTION = (
    "CREATE FUNCTION inject_failure() RETURNS trigger LANGUAGE plpgsql"
    " AS $$ BEGIN RAISE EXCEPTION 'injected failure'; END $$"
)
_PG_TEARDOWN = ["DROP TRIGGER inject_failure ON entries", "DROP FUNCTION inject_failure()"]
FAILURES["postgres", "insert"] = (
    [
        _PG_FUNCTION,
        "CREATE TRIGGER inject_failure BEFORE INSERT ON entries"
        " FOR EACH ROW EXECUTE FUNCTION inject_failure()",
    ],
    _PG_TEARDOWN,
    "injected failure",
)
FAILURES["postgres", "commit"] = (  # a deferred constraint trigger raises at COMMIT
    [
        _PG_FUNCTION,
        "CREATE CONSTRAINT TRIGGER inject_failure AFTER INSERT ON entries"
        " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION inject_failure()",
    ],
    _PG_TEARDOWN,
    "injected failure",
)


# jsonl has no SQL to fail with: tests/crash/faults/sitecustomize.py, loaded by the
# daemon, fails its writes (as a full disk) or its fsyncs (a dying disk) while the
# file $CHINWAG_TEST_FAULTS names says so.
FAULTS_DIR = Path(__file__).parent / "faults"
FAILURES["jsonl", "insert"] = (["write"], [], "injected failure")
FAILURES["jsonl", "commit"] = (["sync"], [], "injected failure")


def _ddl(url: str, statements: list[str], faults: Path) -> None:
    """Run ``statements`` on the store at ``url`` through a connection of our own.

    For jsonl, write the fault they name to ``faults``, or with none clear it.
    """
    if url.startswith("jsonl:"):
        if statements:
            faults.write_text(statements[0])
        else:
            faults.unlink()
        return
    if url.startswith("sqlite:"):
        path = url.removeprefix("sqlite:///").partition("?")[0]
        conn = sqlite3.connect(path, isolation_level=None, timeout=10)
        try:
            for statement in statements:
                conn.execute(statement)
        finally:
            conn.close()
        return
    with _postgres_connect(url) as pg:
        for statement in statements:
            pg.execute(statement)


async def _run(c: Client, content: str, sender: str) -> list[Any]:
    async with c.stream(AGENT, content, sender=sender) as events:
        return await collect(events)


@pytest.mark.parametrize("when", ["insert", "commit"])
@pytest.mark.parametrize(
    "storage_url", ["sqlite", "sqlite-normal", "postgres", "jsonl"], indirect=True
)
async def test_a_failed_append_ends_the_run_500_and_the_daemon_serves_on(
    daemon_factory: Any,
    storage_url: str,
    when: str,
    short_tmp: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    backend = storage_url.partition(":")[0].replace("postgresql", "postgres")
    setup, teardown, cause = FAILURES[backend, when]
    faults = short_tmp / "faults"
    if backend == "jsonl":  # the daemon's environment, copied when it starts
        path = os.pathsep.join(filter(None, [str(FAULTS_DIR), os.environ.get("PYTHONPATH")]))
        monkeypatch.setenv("PYTHONPATH", path)
        monkeypatch.setenv("CHINWAG_TEST_FAULTS", str(faults))
    daemon = daemon_factory(config=CONFIG, storage_url=storage_url, name="fail")
    async with connect(daemon.socket_path) as c, connect(daemon.socket_path) as answerer:
        assert (await _run(c, "before the failure", "other"))[-1].status == "done"

        # A step (assistant tool call + its result) fails to append: nothing of it is kept.
        async with c.stream(AGENT, "/ask which one?", sender="victim") as events:
            start = await next_event(events)
            assert isinstance(start, Start)
            ask = await next_of(events, AskUser)
            await trio.to_thread.run_sync(_ddl, storage_url, setup, faults)
            await answerer.reply_to_ask(AGENT, "this one", sender="victim", ask_id=ask.ask_id)
            rest = await collect(events)
        end = rest[-1]
        assert isinstance(end, End) and end.status == "error", rest
        assert end.error is not None and end.error.code == 500, end
        assert end.error.message.startswith("Storage failed: "), end.error.message
        assert "(assistant, victim)" in end.error.message and cause in end.error.message, end
        assert end.last_seq == 1
        history = await c.history(AGENT, "victim")
        assert [(e.seq, e.role, e.content) for e in history.entries] == [
            (1, "user", "/ask which one?")
        ]
        assert history.last_seq == 1

        # The daemon serves on: reads work, and a run of another conversation fails
        # cleanly too, before its start, while the failure lasts.
        await c.ping()
        refused = await _run(c, "while it lasts", "other")
        assert [type(e) for e in refused] == [End], refused
        assert refused[0].status == "error" and refused[0].error.code == 500, refused
        assert [e.content for e in (await c.history(AGENT, "other")).entries] == [
            "before the failure",
            "before the failure",
        ]

        # Once the storage is healthy again, runs work on both, seqs carry on.
        await trio.to_thread.run_sync(_ddl, storage_url, teardown, faults)
        for sender in ("victim", "other"):
            healthy = await _run(c, "/title healthy again", sender)
            assert healthy[-1].status == "done", healthy
            history = await c.history(AGENT, sender)
            assert [e.seq for e in history.entries] == list(range(1, len(history.entries) + 1))
            assert history.entries[-1].content == echo(title_result("healthy again"))
            assert history.title == "healthy again"
        victim = await c.history(AGENT, "victim")
        assert [e.role for e in victim.entries] == [
            "user",
            "user",
            "assistant",
            "tool",
            "assistant",
        ]

    # The failure is logged with the conversation's keys.
    failures = [
        json.loads(line)
        for line in daemon.log_path.read_text().splitlines()
        if '"storage_failed"' in line
    ]
    assert any(f.get("sender") == "victim" and f.get("agent") == AGENT for f in failures), failures
    assert any(f.get("sender") == "other" for f in failures), failures


# --- the checker itself: a harness that cannot fail proves nothing ---------------


def _history_of(entries: list[Entry], title: str = "") -> History:
    last = entries[-1].seq if entries else 0
    return History(
        id=1, agent=AGENT, sender="s", title=title, cwd=None, entries=entries, last_seq=last
    )


def _sample() -> tuple[Conversation, list[Entry]]:
    """A valid conversation: a plain turn and a /title turn done, a /slow cut after start."""
    created = datetime.now(UTC)
    conv = Conversation("s")
    entries: list[Entry] = []
    for n, (content, whole) in enumerate(
        [("hello  there", True), ("/title a b", True), ("/slow 5 10", False)]
    ):
        run_id = f"run{n}"
        attempt = Attempt(content, round=1)
        attempt.see(Start(run_id=run_id, agent=AGENT, seq=len(entries) + 1))
        entries.append(Entry(seq=0, role="user", content=content, run_id=run_id))
        for k, step in enumerate(expected_steps(content) if whole else []):
            calls = []
            if step.call is not None:
                calls = [
                    ToolCallInfo(call_id=f"c{n}.{k}", name=step.call[0], arguments=step.call[1])
                ]
                attempt.see(ToolCall(call_id=f"c{n}.{k}", name=step.call[0], arguments=""))
            entries.append(Entry(seq=0, role="assistant", content=step.text, tool_calls=calls))
            if step.call is not None:
                attempt.see(
                    ToolResult(call_id=f"c{n}.{k}", output="", is_error=False, duration_ms=0)
                )
                entries.append(
                    Entry(seq=0, role="tool", content=step.result or "", tool_call_id=f"c{n}.{k}")
                )
            if step.text:
                attempt.see(TextDelta(delta=step.text))
        for entry in entries:
            entry.run_id = entry.run_id or run_id
        if whole:
            attempt.see(End(status="done", error=None, last_seq=len(entries)))
        conv.attempts.append(attempt)
    conv.attempts.append(Attempt("never started", round=1))
    for seq, entry in enumerate(entries, 1):
        entry.seq = seq
        entry.created_at = created
    return conv, entries


def _drop(entries: list[Entry], *indexes: int) -> list[Entry]:
    kept = [e for i, e in enumerate(entries) if i not in indexes]
    for seq, entry in enumerate(kept, 1):
        entry.seq = seq
    return kept


def _edit(entries: list[Entry], index: int, **changes: Any) -> list[Entry]:
    entries[index] = msgspec.structs.replace(entries[index], **changes)
    return entries


# entries of _sample: 0 user hello, 1 its answer, 2 user /title, 3 call, 4 result,
# 5 answer, 6 user /slow
VIOLATIONS: dict[str, tuple[Callable[[list[Entry]], list[Entry]], str]] = {
    "torn entry": (lambda es: _edit(es, 1, role=""), "role ''"),
    "no run id": (lambda es: _edit(es, 1, run_id=None), "no run_id"),
    "seq gap": (lambda es: _edit(es, 6, seq=8), "without gaps"),
    "seq from 0": (lambda es: [_edit([e], 0, seq=e.seq - 1)[0] for e in es], "without gaps"),
    "call without result": (lambda es: _drop(es, 4, 5), "has no result"),
    "result without call": (lambda es: _drop(es, 3), "no tool call before it"),
    "half-streamed": (lambda es: _edit(es, 1, content="hello"), "no prefix"),
    "done turn lost its answer": (lambda es: _drop(es, 5), "not whole"),
    "done turn lost": (lambda es: _drop(es, 2, 3, 4, 5), "user entry is gone"),
    "started turn lost": (lambda es: _drop(es, 6), "user entry is gone"),
    "entry of another run": (lambda es: _edit(es, 5, run_id="run0"), "not that of the user"),
    "torn user entry": (lambda es: _edit(es, 6, content="/slow 5"), "the harness sent no"),
    "torn message": (lambda es: _edit(es, 0, content="hello"), "holds 'hello'"),
    "unsent turn": (lambda es: _edit(es, 6, content="/slow 4 10", run_id="x"), "matches no"),
}


@pytest.mark.parametrize("violation", sorted(VIOLATIONS))
def test_the_checker_catches(violation: str) -> None:
    conv, entries = _sample()
    assert check_history(conv, _history_of(entries, title="a b")) == []
    mutate, expected = VIOLATIONS[violation]
    problems = check_history(conv, _history_of(mutate(entries), title="a b"))
    assert any(expected in p for p in problems), problems


def test_the_checker_catches_a_changed_past_and_a_wrong_title() -> None:
    conv, entries = _sample()
    conv.checked = [msgspec.structs.replace(e) for e in entries]
    _edit(conv.checked, 1, content="hello there too")
    problems = check_history(conv, _history_of(entries, title="a b"))
    assert any("previous check" in p for p in problems), problems
    conv.checked = []
    problems = check_history(conv, _history_of(entries, title="never set"))
    assert any("the title is" in p for p in problems), problems
