"""The bridge's spool on its own: what it writes, what it reads back, what it refuses.

The spool is written against anyio, so these run under trio (pytest-trio).
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from datetime import UTC, datetime
from pathlib import Path

import anyio
import pytest
from chinwag.clients.telegram import _spool
from chinwag.clients.telegram._spool import Spool, SpoolCorrupt, Spooled, SpoolError
from structlog.testing import capture_logs


def message(update_id: int, text: str = "hello", **fields: object) -> Spooled:
    return Spooled(update_id=update_id, chat_id=5000, text=text, **fields)  # type: ignore[arg-type]


async def test_what_is_written_reads_back(tmp_path: Path) -> None:
    path = tmp_path / "state" / "spool-1.jsonl"
    at = datetime(2025, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    spool = Spool.open(path)
    await spool.add(message(10, "first"))
    await spool.add(message(11, "in a topic, to a guest", thread_id=7, guest="helper"))
    await spool.add(message(12, "third", reply_to=99))
    await spool.sent(10, at)
    await spool.sent(10, datetime.now(UTC))  # only the first sending counts
    await spool.answer(10, (500,))
    await spool.answer(10, (500,))  # the same messages: nothing to write
    await spool.answer(10, (500, 501))
    await spool.done(11)
    await spool.done(11)  # nothing more to write
    spool.close()

    lines = [json.loads(line) for line in path.read_text().splitlines()]
    ops = ["message"] * 3 + ["sent", "answer", "answer", "done"]
    assert [line["op"] for line in lines] == ops
    assert lines[1] == {
        "op": "message",
        "update_id": 11,
        "chat_id": 5000,
        "thread_id": 7,
        "text": "in a topic, to a guest",
        "guest": "helper",
        "sent_at": None,
        "reply_to": None,
        "answer_ids": [],
    }
    assert lines[5] == {"op": "answer", "update_id": 10, "message_ids": [500, 501]}
    again = Spool.open(path)
    assert again.pending == [
        message(10, "first", sent_at=at, answer_ids=(500, 501)),
        message(12, "third", reply_to=99),
    ]
    assert again.knows(11) and again.knows(12) and not again.knows(13)
    again.close()
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700


async def test_a_torn_last_line_is_dropped_and_the_next_line_starts_a_line(
    tmp_path: Path,
) -> None:
    path = tmp_path / "spool-1.jsonl"
    spool = Spool.open(path)
    await spool.add(message(10, "kept"))
    spool.close()
    with path.open("ab") as file:
        file.write(b'{"op":"message","update_id":11,"chat_id":5000,"thr')  # a crash mid-write

    with capture_logs() as logs:
        spool = Spool.open(path)
    (dropped,) = logs
    assert (dropped["event"], dropped["line"]) == ("telegram_spool_torn_line_dropped", 2)
    assert spool.pending == [message(10, "kept")]
    await spool.add(message(12, "after"))
    spool.close()
    spool = Spool.open(path)
    assert spool.pending == [message(10, "kept"), message(12, "after")]
    spool.close()


@pytest.mark.parametrize(
    ("content", "line"),
    [
        (b'{"op":"message","update_id":10,"chat_id":5000,"text":"a"}\nnot json\n{"op":"done",', 2),
        (b'{"op":"message","update_id":10,"chat_id":5000}\n', 1),  # no text
        (b'{"op":"message","update_id":10,"chat_id":5000,"text":"a"}\n{"op":"lost"}\n', 2),
        (b'{"op":"done","update_id":10}\n\n', 2),  # an empty line is not a torn one
    ],
)
def test_any_other_line_that_does_not_parse_is_reported_with_file_and_line(
    tmp_path: Path, content: bytes, line: int
) -> None:
    path = tmp_path / "spool-1.jsonl"
    path.write_bytes(content)
    with pytest.raises(SpoolCorrupt, match=f"^{path}:{line}: ") as raised:
        Spool.open(path)
    assert "have not reached the agent" in str(raised.value)
    assert path.read_bytes() == content  # left as it was, for whoever mends it


async def test_the_file_is_rewritten_once_it_grows_keeping_what_is_pending(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_spool, "_COMPACT_BYTES", 2000)
    monkeypatch.setattr(_spool, "_REMEMBERED", 8)
    path = tmp_path / "spool-1.jsonl"
    spool = Spool.open(path)
    await spool.add(message(1, "still pending"))
    await spool.answer(1, (7, 8))
    for update_id in range(2, 300):
        await spool.add(message(update_id))
        await spool.done(update_id)
    assert path.stat().st_size < 2000 + 200  # 300 messages: 40 kB were it never rewritten
    spool.close()
    spool = Spool.open(path)
    assert spool.pending == [message(1, "still pending", answer_ids=(7, 8))]
    # Those done most recently are remembered, so that Telegram sending one again is noticed.
    assert spool.knows(299) and spool.knows(292) and not spool.knows(291)
    spool.close()


async def test_message_and_sent_lines_are_fsynced_answer_and_done_lines_only_appended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "spool-1.jsonl"
    spool = Spool.open(path)
    synced: list[int] = []
    fsync = os.fsync

    def counted(fd: int) -> None:
        synced.append(fd)
        fsync(fd)

    monkeypatch.setattr(os, "fsync", counted)
    await spool.add(message(10))
    await spool.sent(10, datetime.now(UTC))
    assert len(synced) == 2
    await spool.answer(10, (500,))
    await spool.done(10)
    # A lost `done` is harmless: replay finds the message; a lost `answer` shows
    # the answer in a new message.
    assert len(synced) == 2
    spool.close()
    assert [json.loads(line)["op"] for line in path.read_text().splitlines()] == [
        "message",
        "sent",
        "answer",
        "done",
    ]


def test_a_second_opening_is_refused_naming_the_lock_file(tmp_path: Path) -> None:
    path = tmp_path / "spool-1.jsonl"
    first = Spool.open(path)
    # flock: the lock of another open file description, as another process's.
    with pytest.raises(SpoolError) as raised:
        Spool.open(path)
    assert not isinstance(raised.value, SpoolCorrupt)
    assert str(tmp_path / "spool-1.lock") in str(raised.value)
    assert "\n" not in str(raised.value)
    first.close()
    Spool.open(path).close()  # released by close


def test_close_waits_for_a_write_its_cancelled_task_abandoned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """python-telegram-bot cancels its polling task directly (asyncio), possibly
    while `Inbox.put` waits for the spool's worker thread: the thread goes on
    writing, and closing the spool must not pull the file from under it."""
    path = tmp_path / "spool-1.jsonl"
    spool = Spool.open(path)
    writing, finish = threading.Event(), threading.Event()
    failed: list[OSError] = []
    fsync = os.fsync

    def held(fd: int) -> None:
        writing.set()
        finish.wait(10)
        try:
            fsync(fd)
        except OSError as exc:
            failed.append(exc)
            raise

    monkeypatch.setattr(os, "fsync", held)

    async def main() -> None:
        task = asyncio.ensure_future(spool.add(message(10, "in flight")))
        await anyio.to_thread.run_sync(writing.wait)
        task.cancel()  # as python-telegram-bot stops polling
        with anyio.fail_after(5):
            await asyncio.wait([task])
        assert task.cancelled()  # ended by the cancellation, not by an error of its own
        assert not finish.is_set()  # the worker thread still writes

    anyio.run(main, backend="asyncio")
    closing = threading.Thread(target=spool.close)
    closing.start()
    closing.join(0.2)  # not a synchronisation: close must not end before the write does
    assert closing.is_alive()
    finish.set()
    closing.join(10)
    assert not closing.is_alive() and not failed
    monkeypatch.undo()
    again = Spool.open(path)
    assert again.pending == [message(10, "in flight")]
    again.close()
