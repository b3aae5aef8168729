"""What the jsonl backend promises about its files, beyond the suite every backend passes.

Its layout (one history file per conversation, named by id, beside a meta file),
lines that ``json.loads`` and ``jq`` read, the repair of a torn last append on
load (truncated on disk and logged), corruption reported with file and line,
meta files replaced atomically, and the directory's lock.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
from chinwag.protocol import Delivery, Entry, MailMessage, Participant, ToolCallInfo
from chinwag.storage import Archive, JsonlStorage, StorageError, open_store
from deadlines import deadline
from structlog.testing import capture_logs

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
AGENT, SENDER = "assistant", "user"


def message(content: str, role: str = "user", seconds: float = 0) -> Entry:
    return Entry(seq=0, role=role, content=content, created_at=T0 + timedelta(seconds=seconds))


def step(n: int) -> list[Entry]:
    """An assistant tool call and its result: one append of two lines."""
    call = ToolCallInfo(call_id=f"c{n}", name="set_title", arguments='{"title": "x"}')
    return [
        Entry(seq=0, role="assistant", tool_calls=[call], created_at=T0),
        Entry(seq=0, role="tool", content="Title set.", tool_call_id=f"c{n}", created_at=T0),
    ]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def url(root: Path) -> str:
    return f"jsonl:///{root}"


def history_file(root: Path, id_: int = 1) -> Path:
    return root / "conversations" / f"{id_}.jsonl"


def lines_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text("utf-8").splitlines()]


async def fill(url: str) -> None:
    """One conversation: a user message (seq 1), then a step (seqs 2 and 3)."""
    async with open_store(url) as store:
        await store.create_conversation(AGENT, SENDER, cwd="/work", created_at=T0)
        await store.append(AGENT, SENDER, [message("hello")])
        await store.append(AGENT, SENDER, step(1))


async def contents(url: str) -> list[str]:
    async with open_store(url) as store:
        return [entry.content for entry in await store.history(AGENT, SENDER)]


def torn_events(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [event for event in logs if event["event"] == "torn_line_dropped"]


# --- layout and format -----------------------------------------------------------------


async def test_files_are_named_by_id_and_lines_are_plain_json(url: str, root: Path) -> None:
    async with open_store(url) as store:
        assert isinstance(store, JsonlStorage)
        await store.create_conversation(AGENT, SENDER, cwd="/work", created_at=T0)
        await store.create_conversation("helper", "tg:42", cwd=None, created_at=T0)
        await store.set_title(AGENT, SENDER, "Trip to Lisbon")
        await store.append(AGENT, SENDER, [message("hello ✈\nsecond line")])
        returned = await store.append(AGENT, SENDER, step(1))

    assert sorted(os.listdir(root)) == ["cache.msgpack", "conversations", "lock", "store.json"]
    assert sorted(os.listdir(root / "conversations")) == ["1.jsonl", "1.meta.json", "2.meta.json"]
    assert json.loads((root / "store.json").read_text()) == {
        "format": "chinwag-jsonl",
        "version": 1,
    }
    meta = json.loads((root / "conversations" / "1.meta.json").read_text())
    assert meta == {
        "id": 1,
        "agent": AGENT,
        "sender": SENDER,
        "title": "Trip to Lisbon",
        "cwd": "/work",
        "created_at": "2024-05-01T12:00:00Z",
    }

    lines = lines_of(history_file(root))
    assert [line["seq"] for line in lines] == [1, 2, 3]  # seq N on line N
    assert lines[0]["content"] == "hello ✈\nsecond line"
    # Every Entry field is there, by name, so jq can select on any of them; the
    # lines of an append but its last say that more follow.
    fields = set(Entry.__struct_fields__)
    assert set(lines[0]) == fields
    assert set(lines[1]) == fields | {"more"} and lines[1]["more"] is True
    assert set(lines[2]) == fields
    assert lines[1]["tool_calls"] == [
        {"call_id": "c1", "name": "set_title", "arguments": '{"title": "x"}'}
    ]
    decoded = [msgspec.json.decode(json.dumps(line), type=Entry) for line in lines[1:]]
    assert decoded == returned


async def test_an_append_is_one_write_of_whole_lines(
    url: str, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from chinwag.storage import _jsonl

    writes: list[bytes] = []
    real = _jsonl._write_all

    def spy(fd: int, data: bytes) -> None:
        writes.append(data)
        real(fd, data)

    async with open_store(url) as store:
        await store.create_conversation(AGENT, SENDER, cwd=None, created_at=T0)
        monkeypatch.setattr(_jsonl, "_write_all", spy)
        await store.append(AGENT, SENDER, [message("a"), message("b"), message("c")])
        monkeypatch.undo()
    assert len(writes) == 1
    assert writes[0].endswith(b"\n") and writes[0].count(b"\n") == 3


# --- torn appends ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "tail",
    [
        b'{"seq":4,"kind":"message","role":"user","cont',  # cut mid-line
        b'{"seq":4,"kind":"message","role":"user","content":"x","created_at":"2024',
        b"\x00\x00\x00\x00",  # a block that never got its data
        b"garbage\n",  # a whole line, but not an entry
        b"\n",  # an empty line
    ],
)
async def test_a_torn_last_line_is_truncated_on_disk_and_logged(
    url: str, root: Path, tail: bytes
) -> None:
    await fill(url)
    path = history_file(root)
    good = path.read_bytes()
    with path.open("ab") as f:
        f.write(tail)

    with capture_logs() as logs:
        assert await contents(url) == ["hello", "", "Title set."]
    (event,) = torn_events(logs)
    assert event["file"] == str(path) and event["line"] == 4
    assert event["lines"] == 1 and event["bytes"] == len(tail)
    assert event["log_level"] == "warning"
    assert path.read_bytes() == good  # written back, not only dropped in memory

    with capture_logs() as logs:  # and so it is not dropped again
        assert await contents(url) == ["hello", "", "Title set."]
    assert torn_events(logs) == []


async def test_an_append_cut_short_between_its_lines_is_dropped_whole(url: str, root: Path) -> None:
    await fill(url)
    path = history_file(root)
    good = path.read_bytes()
    async with open_store(url) as store:  # a three-line step, to cut
        call = ToolCallInfo(call_id="c2", name="set_title", arguments="{}")
        await store.append(
            AGENT,
            SENDER,
            [
                Entry(seq=0, role="assistant", tool_calls=[call, call], created_at=T0),
                Entry(seq=0, role="tool", content="one", tool_call_id="c2", created_at=T0),
                Entry(seq=0, role="tool", content="two", tool_call_id="c2", created_at=T0),
            ],
        )
    whole = path.read_bytes()
    step_lines = whole[len(good) :].splitlines(keepends=True)
    assert len(step_lines) == 3

    for cut in [
        len(step_lines[0]),  # the first line whole, nothing after it
        len(step_lines[0]) + 5,  # the first line, and a bit of the second
        len(step_lines[0]) + len(step_lines[1]),  # two whole lines of three
    ]:
        path.write_bytes(whole[: len(good) + cut])
        with capture_logs() as logs:
            assert await contents(url) == ["hello", "", "Title set."]
        (event,) = torn_events(logs)
        assert event["file"] == str(path) and event["line"] == 4
        assert event["lines"] == (2 if cut > len(step_lines[0]) else 1)
        assert path.read_bytes() == good


async def test_seqs_continue_after_a_torn_line_is_dropped(url: str, root: Path) -> None:
    await fill(url)
    path = history_file(root)
    with path.open("ab") as f:
        f.write(b'{"seq":4,"role":"us')
    async with open_store(url) as store:
        stored = await store.append(AGENT, SENDER, [message("again")])
        assert [entry.seq for entry in stored] == [4]
        item = await store.get_conversation(AGENT, SENDER)
        assert item is not None and item.last_seq == 4
    assert [line["seq"] for line in lines_of(path)] == [1, 2, 3, 4]
    assert await contents(url) == ["hello", "", "Title set.", "again"]


async def test_a_torn_line_after_long_lines_is_found(url: str, root: Path) -> None:
    big = "x" * 300_000  # far more than the tail the loader reads first
    async with open_store(url) as store:
        await store.create_conversation(AGENT, SENDER, cwd=None, created_at=T0)
        await store.append(AGENT, SENDER, [message(big)])
        await store.append(AGENT, SENDER, [message(big, "assistant"), message(big, "tool")])
    path = history_file(root)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100_000])  # the step's second line, torn

    with capture_logs() as logs:
        async with open_store(url) as store:
            item = await store.get_conversation(AGENT, SENDER)
            assert item is not None and item.last_seq == 1
            assert [e.content for e in await store.history(AGENT, SENDER)] == [big]
    (event,) = torn_events(logs)
    assert event["line"] == 2 and event["lines"] == 2


async def test_a_torn_first_append_leaves_an_empty_conversation(url: str, root: Path) -> None:
    async with open_store(url) as store:
        await store.create_conversation(AGENT, SENDER, cwd=None, created_at=T0)
        await store.append(AGENT, SENDER, step(1))
    path = history_file(root)
    path.write_bytes(path.read_bytes()[:-10])
    with capture_logs() as logs:
        async with open_store(url) as store:
            item = await store.get_conversation(AGENT, SENDER)
            assert item is not None and (item.last_seq, item.updated_at) == (0, T0)
            assert await store.history(AGENT, SENDER) == []
            (stored,) = await store.append(AGENT, SENDER, [message("first")])
            assert stored.seq == 1
    (event,) = torn_events(logs)
    assert event["line"] == 1 and event["lines"] == 2


# --- corruption -------------------------------------------------------------------------


async def test_corruption_in_the_middle_names_the_file_and_line(url: str, root: Path) -> None:
    await fill(url)
    path = history_file(root)
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(lines[0] + b'{"seq": 2, "oops\n' + lines[2])

    async with open_store(url) as store:  # the tail is fine: the store opens
        with pytest.raises(StorageError, match=rf"{path}:2: "):
            await store.history(AGENT, SENDER)
    assert path.read_bytes() == lines[0] + b'{"seq": 2, "oops\n' + lines[2]  # left as it was


async def test_a_line_out_of_place_is_corruption(url: str, root: Path) -> None:
    await fill(url)
    path = history_file(root)
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(lines[0] + lines[2])  # line 2 lost: seq 3 on line 2
    async with open_store(url) as store:
        with pytest.raises(StorageError, match=rf"{path}:2: .*seq 3"):
            await store.history(AGENT, SENDER)


async def test_a_bad_line_before_a_torn_one_refuses_to_open(url: str, root: Path) -> None:
    await fill(url)
    path = history_file(root)
    lines = path.read_bytes().splitlines(keepends=True)
    damaged = lines[0] + lines[1] + b"not json\n" + b'{"seq":4,"ro'
    path.write_bytes(damaged)
    with pytest.raises(StorageError, match=rf"{path}:3: "):
        async with open_store(url):
            pass
    assert path.read_bytes() == damaged  # nothing truncated: a human decides


async def test_a_history_without_its_meta_refuses_to_open(url: str, root: Path) -> None:
    await fill(url)
    (root / "conversations" / "1.meta.json").unlink()
    with pytest.raises(StorageError, match=r"1\.jsonl has no 1\.meta\.json"):
        async with open_store(url):
            pass


async def test_a_damaged_meta_file_is_named(url: str, root: Path) -> None:
    await fill(url)
    (root / "conversations" / "1.meta.json").write_text('{"id": 1, "agent": ')
    with pytest.raises(StorageError, match=r"1\.meta\.json"):
        async with open_store(url):
            pass


# --- meta files -------------------------------------------------------------------------


async def test_meta_files_are_replaced_atomically(
    url: str, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from chinwag.storage import _jsonl

    replaced: list[tuple[str, str]] = []
    synced: list[str] = []
    real_replace, real_sync_dir = os.replace, _jsonl._sync_dir

    def spy_replace(src: Any, dst: Any) -> None:
        replaced.append((Path(src).name, Path(dst).name))
        real_replace(src, dst)

    def spy_sync_dir(path: Path) -> None:
        synced.append(path.name)
        real_sync_dir(path)

    monkeypatch.setattr(_jsonl.os, "replace", spy_replace)
    monkeypatch.setattr(_jsonl, "_sync_dir", spy_sync_dir)
    async with open_store(url) as store:
        await store.create_conversation(AGENT, SENDER, cwd=None, created_at=T0)
        async with trio.open_nursery() as nursery:  # one conversation's meta, many writers
            for n in range(20):
                nursery.start_soon(store.set_title, AGENT, SENDER, f"title {n}")
        await store.set_cwd(AGENT, SENDER, "/final")
        await store.append(AGENT, SENDER, [message("appends leave the meta file alone")])
        item = await store.get_conversation(AGENT, SENDER)
    monkeypatch.undo()

    assert replaced[0] == ("store.json.tmp", "store.json")
    assert replaced[1:-1] == [("1.meta.json.tmp", "1.meta.json")] * 22  # create, 20 titles, cwd
    assert replaced[-1] == ("cache.msgpack.tmp", "cache.msgpack")  # on close
    assert synced.count("conversations") >= 22 + 1  # each rename, and the first append's file
    assert sorted(os.listdir(root / "conversations")) == ["1.jsonl", "1.meta.json"]  # no temps
    assert sorted(os.listdir(root)) == ["cache.msgpack", "conversations", "lock", "store.json"]
    meta = json.loads((root / "conversations" / "1.meta.json").read_text())
    assert item is not None and meta["title"] == item.title and meta["cwd"] == "/final"


async def test_a_temporary_file_left_by_a_crash_is_removed(url: str, root: Path) -> None:
    await fill(url)
    stale = root / "conversations" / "1.meta.json.tmp"
    stale.write_text('{"id": 1, "agent": "half wr')
    someone_elses = root / "conversations" / "notes.tmp"
    someone_elses.write_text("not the store's")
    async with open_store(url) as store:
        item = await store.get_conversation(AGENT, SENDER)
        assert item is not None and item.cwd == "/work"
    assert not stale.exists()
    assert someone_elses.exists()


# --- the cache of what opening reads --------------------------------------------------------


@pytest.fixture
def file_loads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The ids of the conversations that opening reads from their files, not the cache."""
    from chinwag.storage import _jsonl

    loads: list[int] = []
    real = _jsonl._load_conversation

    def spy(id_: int, meta_path: str, history: str) -> Any:
        loads.append(id_)
        return real(id_, meta_path, history)

    monkeypatch.setattr(_jsonl, "_load_conversation", spy)
    return loads


async def items_of(url: str) -> list[Any]:
    async with open_store(url) as store:
        items, _ = await store.list_conversations()
        return items


async def test_after_a_clean_close_opening_reads_only_the_cache(
    url: str, root: Path, file_loads: list[int]
) -> None:
    async with open_store(url) as store:
        for n in range(5):
            await store.create_conversation(AGENT, f"s{n}", cwd=f"/w{n}", created_at=T0)
            await store.append(AGENT, f"s{n}", [message(f"m{n}", seconds=n)] * (n + 1))
        await store.set_title(AGENT, "s2", "two")
        before, _ = await store.list_conversations()
    assert sorted(file_loads) == []  # a new store: nothing to load
    assert await items_of(url) == before
    assert file_loads == []
    assert before[2].title == "two" and before[0].last_seq == 5


async def test_the_cache_is_trusted_only_for_files_left_as_it_says(
    url: str, root: Path, file_loads: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    from chinwag.storage import _jsonl

    async with open_store(url) as store:  # closed cleanly: cached
        for n in range(5):
            await store.create_conversation(AGENT, f"s{n}", cwd=None, created_at=T0)
            await store.append(AGENT, f"s{n}", [message(f"m{n}")])
    # A session that dies before its close: appends, a title, a new conversation and a
    # torn line all happen after the cache was written.
    write_cache = _jsonl._write_cache
    monkeypatch.setattr(_jsonl, "_write_cache", lambda path, cache: None)
    async with open_store(url) as store:
        await store.append(AGENT, "s1", [message("later", seconds=60)])
        await store.set_title(AGENT, "s2", "retitled")
        await store.create_conversation(AGENT, "s5", cwd=None, created_at=T0)
    monkeypatch.setattr(_jsonl, "_write_cache", write_cache)
    with history_file(root, 4).open("ab") as f:
        f.write(b'{"seq":2,"con')
    file_loads.clear()

    with capture_logs() as logs:
        items = {item.sender: item for item in await items_of(url)}
    assert sorted(file_loads) == [2, 3, 4, 6]  # s1, s2, the torn s3, the new s5
    assert len(torn_events(logs)) == 1
    assert (items["s1"].last_seq, items["s1"].updated_at) == (2, T0 + timedelta(seconds=60))
    assert items["s2"].title == "retitled"
    assert items["s3"].last_seq == 1 and "s5" in items

    file_loads.clear()
    assert {item.sender: item for item in await items_of(url)} == items
    assert file_loads == []  # the close after the repair cached it all again


@pytest.mark.parametrize("content", [b"", b"\x93not a cache", b"\xc1"])
async def test_a_damaged_cache_is_ignored(url: str, root: Path, content: bytes) -> None:
    await fill(url)
    (root / "cache.msgpack").write_bytes(content)
    with capture_logs() as logs:
        assert await contents(url) == ["hello", "", "Title set."]
    assert [event["event"] for event in logs] == ["jsonl_cache_ignored"]


# --- the directory ----------------------------------------------------------------------


async def test_one_process_at_a_time(url: str) -> None:
    async with open_store(url):
        with pytest.raises(StorageError, match="in use by another process"):
            async with open_store(url):
                pass
    async with open_store(url):  # released on close
        pass


async def test_a_directory_that_is_not_a_store_is_refused(root: Path, url: str) -> None:
    os.mkdir(root)
    (root / "notes.txt").write_text("mine")
    with pytest.raises(StorageError, match="not a chinwag jsonl store"):
        async with open_store(url):
            pass
    assert sorted(os.listdir(root)) == ["lock", "notes.txt"]


async def test_a_path_that_cannot_be_created_is_a_storage_error(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    with pytest.raises(StorageError, match="a-file"):
        async with open_store(f"jsonl:///{tmp_path}/a-file/store"):
            pass


async def test_a_newer_format_is_refused(root: Path, url: str) -> None:
    async with open_store(url):
        pass
    (root / "store.json").write_text('{"format": "chinwag-jsonl", "version": 99}')
    with pytest.raises(StorageError, match="version 99"):
        async with open_store(url):
            pass


async def test_relative_and_absolute_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    async with open_store("jsonl:///nested/chats") as store:
        assert isinstance(store, JsonlStorage) and store.path == Path("nested/chats")
        await store.create_conversation(AGENT, SENDER, cwd=None, created_at=T0)
    assert (tmp_path / "nested/chats/conversations/1.meta.json").exists()
    async with open_store(f"jsonl:///{tmp_path}/abs/") as store:  # four slashes
        assert isinstance(store, JsonlStorage) and store.path == tmp_path / "abs"


@pytest.mark.parametrize(
    "bad",
    ["jsonl://host/dir", "jsonl:///", "jsonl:////", "jsonl:dir", "jsonl:///dir?fsync=off"],
)
async def test_malformed_jsonl_urls(
    bad: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="jsonl"):
        async with open_store(bad):
            pass
    assert os.listdir(tmp_path) == []


async def test_an_append_after_an_outside_writer_fails_once_then_recovers(
    url: str, root: Path
) -> None:
    async with open_store(url) as store:
        await store.create_conversation(AGENT, SENDER, cwd=None, created_at=T0)
        await store.append(AGENT, SENDER, [message("one")])
        line = msgspec.json.encode(Entry(seq=2, content="outside", created_at=T0)) + b"\n"
        with history_file(root).open("ab") as f:
            f.write(line)
        with pytest.raises(StorageError, match="changed outside"):
            await store.append(AGENT, SENDER, [message("three")])
        (stored,) = await store.append(AGENT, SENDER, [message("three")])
        assert stored.seq == 3
        assert [e.content for e in await store.history(AGENT, SENDER)] == [
            "one",
            "outside",
            "three",
        ]


# --- a killed writer --------------------------------------------------------------------

CRASHING_WRITER = """
import sys, trio
from datetime import UTC, datetime
from chinwag.protocol import Entry
from chinwag.storage import open_store

async def main():
    async with open_store(sys.argv[1]) as store:
        now = datetime.now(UTC)
        await store.create_conversation("a", "s", cwd=None, created_at=now)
        n = 0
        while True:
            n += 1
            batch = [
                Entry(seq=0, role="user", content=f"u{n}" + "x" * (n % 7) * 3000, created_at=now),
                Entry(seq=0, role="assistant", content=f"a{n}", created_at=now),
            ]
            stored = await store.append("a", "s", batch)
            print(stored[-1].seq, flush=True)  # acknowledged

trio.run(main)
"""


async def test_what_was_acknowledged_survives_a_killed_process(tmp_path: Path, url: str) -> None:
    script = tmp_path / "writer.py"
    script.write_text(textwrap.dedent(CRASHING_WRITER))
    proc = await trio.lowlevel.open_process(
        [sys.executable, str(script), url], stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        acknowledged, pending = 0, b""
        with deadline(30, "the writer to acknowledge 200 appends"):
            while acknowledged < 200:
                chunk = await proc.stdout.receive_some()
                assert chunk, "the writer died on its own"
                *lines, pending = (pending + chunk).split(b"\n")
                if lines:
                    acknowledged = int(lines[-1])
    finally:
        proc.kill()  # SIGKILL: no close, appends in flight
        await proc.wait()

    async with open_store(url) as store:
        history = await store.history("a", "s")
        item = await store.get_conversation("a", "s")
    seqs = [entry.seq for entry in history]
    assert seqs == list(range(1, len(seqs) + 1))
    assert len(seqs) >= acknowledged
    assert len(seqs) % 2 == 0  # no append is ever half there
    last = len(seqs) // 2
    assert [e.content[: len(f"u{last}")] for e in history[-2:]] == [f"u{last}", f"a{last}"]
    assert item is not None and item.last_seq == len(seqs)


# --- archives and notes -----------------------------------------------------------------


def notes_file(root: Path) -> Path:
    return root / "notes.jsonl"


async def noted(url: str) -> None:
    """Two notes, the first written twice."""
    async with open_store(url) as store:
        await store.put_note(AGENT, "pet", "a cat", updated_at=T0)
        await store.put_note("helper", "pet", "a dog", updated_at=T0)
        await store.put_note(AGENT, "pet", "a parrot", updated_at=T0 + timedelta(seconds=1))


async def note_hits(url: str, query: str, agent: str = AGENT) -> list[tuple[str, str]]:
    async with open_store(url) as store:
        return [(hit.name, hit.snippet) for hit in await store.search_memory(agent, query)]


async def test_notes_rewritten_many_times_load_as_one_line_each(url: str, root: Path) -> None:
    async with open_store(url) as store:
        for n in range(300):
            await store.put_note(AGENT, "counter", f"count {n}", updated_at=T0)
        await store.put_note(AGENT, "pet", "a cat", updated_at=T0)
    assert len(lines_of(notes_file(root))) == 301
    assert await note_hits(url, "count") == [("counter", "counter [count] 299")]  # rewritten
    assert [(line["name"], line["content"]) for line in lines_of(notes_file(root))] == [
        ("counter", "count 299"),
        ("pet", "a cat"),
    ]
    async with open_store(url) as store:  # and appends go on after the rewrite
        await store.put_note(AGENT, "pet", "a dog", updated_at=T0)
    assert await note_hits(url, "dog") == [("pet", "pet a [dog]")]
    assert len(lines_of(notes_file(root))) == 3


async def test_a_compaction_is_one_line_that_carries_its_archive(url: str, root: Path) -> None:
    archive = Archive(
        name="archive-1-3",
        first_seq=1,
        last_seq=3,
        summary="They set a title.",
        speakers=["", "helper", "helper"],
        created_at=T0,
    )
    await fill(url)
    async with open_store(url) as store:
        marker = await store.compact(AGENT, SENDER, archive)

    lines = lines_of(history_file(root))
    assert len(lines) == 4
    assert lines[3] == {
        **json.loads(msgspec.json.encode(marker)),
        "first_seq": 1,
        "last_seq": 3,
        "speakers": ["", "helper", "helper"],
    }
    assert (lines[3]["kind"], lines[3]["content"], lines[3]["archive"]) == (
        "compact",
        "They set a title.",
        "archive-1-3",
    )
    async with open_store(url) as store:
        assert await store.get_archive(AGENT, SENDER, "archive-1-3") == archive


async def test_notes_are_appended_one_line_each_and_the_last_one_wins(url: str, root: Path) -> None:
    await noted(url)
    assert lines_of(notes_file(root)) == [
        {"agent": AGENT, "name": "pet", "content": "a cat", "updated_at": "2024-05-01T12:00:00Z"},
        {
            "agent": "helper",
            "name": "pet",
            "content": "a dog",
            "updated_at": "2024-05-01T12:00:00Z",
        },
        {
            "agent": AGENT,
            "name": "pet",
            "content": "a parrot",
            "updated_at": "2024-05-01T12:00:01Z",
        },
    ]
    assert await note_hits(url, "cat parrot dog") == [("pet", "pet a [parrot]")]
    assert await note_hits(url, "cat parrot dog", "helper") == [("pet", "pet a [dog]")]


@pytest.mark.parametrize(
    ("tail", "reason"),
    [
        (b'{"agent":"assistant","name":"x","cont', "torn (no newline)"),
        (b"garbage\n", "unparsable"),
        (b"\n", "unparsable"),
    ],
)
async def test_a_torn_last_note_is_truncated_on_disk_and_logged(
    url: str, root: Path, tail: bytes, reason: str
) -> None:
    await noted(url)
    path = notes_file(root)
    good = path.read_bytes()
    with path.open("ab") as f:
        f.write(tail)

    with capture_logs() as logs:
        assert await note_hits(url, "parrot") == [("pet", "pet a [parrot]")]
    (event,) = torn_events(logs)
    assert (event["file"], event["line"], event["lines"]) == (str(path), 4, 1)
    assert (event["bytes"], event["reason"]) == (len(tail), reason)
    assert path.read_bytes() == good

    async with open_store(url) as store:  # and a new note follows the good ones
        await store.put_note(AGENT, "plant", "a fern", updated_at=T0)
    assert [line["name"] for line in lines_of(path)] == ["pet", "pet", "pet", "plant"]


async def test_a_bad_note_in_the_middle_names_the_file_and_line(url: str, root: Path) -> None:
    await noted(url)
    path = notes_file(root)
    lines = path.read_bytes().splitlines(keepends=True)
    damaged = lines[0] + b'{"agent": "oops\n' + lines[2]
    path.write_bytes(damaged)

    async with open_store(url) as store:  # opening does not read the notes
        assert await store.get_conversation(AGENT, SENDER) is None
        with pytest.raises(StorageError, match=rf"{path}:2: "):
            await store.search_memory(AGENT, "parrot")
        with pytest.raises(StorageError, match=rf"{path}:2: "):
            await store.put_note(AGENT, "plant", "a fern", updated_at=T0)
    assert path.read_bytes() == damaged  # left for a human to mend


async def test_a_failed_note_write_leaves_nothing(
    url: str, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from chinwag.storage import _jsonl

    await noted(url)
    good = notes_file(root).read_bytes()
    real = _jsonl._write_all

    def half_then_full_disk(fd: int, data: bytes) -> None:
        real(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "injected failure")

    async with open_store(url) as store:
        monkeypatch.setattr(_jsonl, "_write_all", half_then_full_disk)
        with pytest.raises(StorageError, match="injected failure"):
            await store.put_note(AGENT, "pet", "a zebra", updated_at=T0)
        monkeypatch.undo()
        assert notes_file(root).read_bytes() == good
        assert await store.search_memory(AGENT, "zebra") == []
        await store.put_note(AGENT, "plant", "a fern", updated_at=T0)
    assert [line["content"] for line in lines_of(notes_file(root))][-2:] == ["a parrot", "a fern"]


async def test_a_damaged_compaction_line_names_the_file_and_line(url: str, root: Path) -> None:
    await fill(url)
    path = history_file(root)
    line = {**lines_of(path)[0], "seq": 4, "kind": "compact", "archive": "a", "first_seq": 1}
    with path.open("a") as f:
        f.write(json.dumps(line) + "\n")  # no last_seq, no speakers
    async with open_store(url) as store:
        assert [e.seq for e in await store.history(AGENT, SENDER)] == [4]
        with pytest.raises(StorageError, match=rf"{path}:4: "):
            await store.get_archive(AGENT, SENDER, "a")


async def test_the_first_search_of_an_agent_reads_only_its_conversations(
    url: str, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from chinwag.storage import _jsonl

    async with open_store(url) as store:
        for agent in (AGENT, "helper"):
            for sender in ("a", "b"):
                await store.create_conversation(agent, sender, cwd=None, created_at=T0)
                await store.append(agent, sender, [message(f"quince of {agent} {sender}")])
                await store.compact(
                    agent,
                    sender,
                    Archive(
                        name="x", first_seq=1, last_seq=1, summary="s", speakers=[""], created_at=T0
                    ),
                )
        await store.create_conversation(AGENT, "empty", cwd=None, created_at=T0)

    reads: list[str] = []
    real = _jsonl._read_history

    def spy(path: Path, size: int, archives: Any = None) -> list[Entry]:
        reads.append(path.name)
        return real(path, size, archives)

    monkeypatch.setattr(_jsonl, "_read_history", spy)
    async with open_store(url) as store:
        assert reads == []  # opening reads no history
        hits = await store.search_memory(AGENT, "quince")
        assert sorted(hit.sender or "" for hit in hits) == ["a", "b"]
        assert sorted(reads) == ["1.jsonl", "2.jsonl"]  # not helper's, nor an empty one's
        await store.search_memory(AGENT, "quince")
        assert len(reads) == 2  # once per agent


# --- mail ---------------------------------------------------------------------------------


def mail_file(root: Path) -> Path:
    return root / "mail.jsonl"


def mail(n: int) -> tuple[MailMessage, list[Delivery]]:
    """Message ``n``, from ana to bob."""
    posted = MailMessage(
        msg_id="",
        sender="ana",
        to=["bob"],
        recipients=["bob"],
        content=f"note {n}\nsecond line",
        created_at=T0 + timedelta(seconds=n),
        idempotency_key=f"k{n}",
    )
    return posted, [Delivery(name="bob")]


async def post_mail(url: str, numbers: range) -> None:
    async with open_store(url) as store:
        for n in numbers:
            await store.mail.post(*mail(n))


async def received_contents(url: str) -> list[tuple[str, str]]:
    async with open_store(url) as store:
        page = await store.mail.received("bob", after=None, limit=100)
    return [(message.msg_id, message.content) for message, _ in page]


async def test_a_store_from_before_mail_opens_unchanged_with_no_mail(url: str, root: Path) -> None:
    await fill(url)  # today's layout: no mail.jsonl
    assert not mail_file(root).exists()
    conversations = {p.name: p.read_bytes() for p in (root / "conversations").iterdir()}

    async with open_store(url) as store:
        assert await store.mail.participants() == []
        assert await store.mail.received("bob", after=None, limit=10) == []
        assert await store.mail.newest_received("bob") is None
    assert not mail_file(root).exists()  # reading mail writes nothing
    assert {p.name: p.read_bytes() for p in (root / "conversations").iterdir()} == conversations
    assert await contents(url) == ["hello", "", "Title set."]

    await post_mail(url, range(1, 3))  # the first mail starts the log
    assert [line["type"] for line in lines_of(mail_file(root))] == ["post", "post"]
    assert await received_contents(url) == [
        ("m000000000001", "note 1\nsecond line"),
        ("m000000000002", "note 2\nsecond line"),
    ]
    assert await contents(url) == ["hello", "", "Title set."]


async def test_mail_lines_are_plain_json_one_write_each(url: str, root: Path) -> None:
    async with open_store(url) as store:
        await store.mail.put_participant(Participant(name="ana", roles=["dev"], online=True))
        first, _ = await store.mail.post(*mail(1))
        await store.mail.post(*mail(1))  # the same key again: no line
        await store.mail.mark_read("bob", T0)
    lines = lines_of(mail_file(root))
    assert [line["type"] for line in lines] == ["participant", "post", "advance"]
    assert lines[0]["participant"]["online"] is False  # not stored
    assert lines[1]["message"]["from"] == "ana"
    assert lines[1]["message"]["msg_id"] == first.msg_id == "m000000000001"
    assert lines[2]["changes"] == [["m000000000001", "bob", "read", "2024-05-01T12:00:00Z"]]


@pytest.mark.parametrize(
    "tail",
    [
        "cut",  # the first half of the line the next post would have written
        b'{"type":"post","message":{"msg_id":"m0000000',
        b"garbage\n",
        b"\n",
    ],
)
async def test_a_torn_last_mail_line_is_dropped_on_reopen(
    url: str, root: Path, tail: bytes | str
) -> None:
    await post_mail(url, range(1, 4))
    path = mail_file(root)
    good = path.read_bytes()
    if tail == "cut":
        await post_mail(url, range(4, 5))
        whole = path.read_bytes()
        tail = whole[len(good) : len(good) + (len(whole) - len(good)) // 2]
        path.write_bytes(good)
    assert isinstance(tail, bytes)
    with path.open("ab") as f:
        f.write(tail)

    with capture_logs() as logs:
        assert await received_contents(url) == [
            (f"m00000000000{n}", f"note {n}\nsecond line") for n in (1, 2, 3)
        ]
    (event,) = torn_events(logs)
    assert (event["file"], event["line"], event["lines"]) == (str(path), 4, 1)
    assert event["bytes"] == len(tail)
    assert path.read_bytes() == good  # truncated on disk

    await post_mail(url, range(4, 5))  # the next message follows the good ones
    assert [msg_id for msg_id, _ in await received_contents(url)][-1] == "m000000000004"
    assert len(lines_of(path)) == 4


async def test_a_bad_mail_line_in_the_middle_names_the_file_and_line(url: str, root: Path) -> None:
    await post_mail(url, range(1, 4))
    path = mail_file(root)
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(lines[0] + b'{"type": "post", "mess\n' + lines[2])
    with pytest.raises(StorageError, match=rf"{path}:2: "):
        async with open_store(url):
            pass

    path.write_bytes(lines[0] + lines[0])  # whole, but numbered twice
    with pytest.raises(StorageError, match=rf"{path}:2: .*m000000000001 does not come after"):
        async with open_store(url):
            pass


async def test_a_failed_mail_write_leaves_nothing(
    url: str, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from chinwag.storage import _jsonl

    await post_mail(url, range(1, 3))
    good = mail_file(root).read_bytes()
    real = _jsonl._write_all

    def half_then_full_disk(fd: int, data: bytes) -> None:
        real(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "injected failure")

    async with open_store(url) as store:
        monkeypatch.setattr(_jsonl, "_write_all", half_then_full_disk)
        with pytest.raises(StorageError, match="injected failure"):
            await store.mail.post(*mail(3))
        monkeypatch.undo()
        assert mail_file(root).read_bytes() == good
        assert await store.mail.get_message("m000000000003") is None
        posted, _ = await store.mail.post(*mail(4))
        assert posted.msg_id == "m000000000003"  # the failed write took no number
    assert [line["message"]["content"] for line in lines_of(mail_file(root))] == [
        "note 1\nsecond line",
        "note 2\nsecond line",
        "note 4\nsecond line",
    ]


async def test_a_cancelled_mail_write_completes(url: str) -> None:
    async with open_store(url) as store:
        with trio.CancelScope() as scope:
            scope.cancel()
            posted, stored = await store.mail.post(*mail(1))
            await trio.lowlevel.checkpoint()  # where the cancellation lands
        assert scope.cancelled_caught
        assert stored and posted.msg_id == "m000000000001"
    assert await received_contents(url) == [("m000000000001", "note 1\nsecond line")]
