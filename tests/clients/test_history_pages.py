"""Reading a history in pages: `Client.iter_history` and `chinwag history` against a
fake daemon that answers `get_history` as the daemon does, a page at a time.

The daemon sends at most `DEFAULT_PAGE` entries for a `get_history` with no
limit, and never more than fits its frame; `last_seq` says what remains.
Entries before the latest compact marker are left out unless asked for, so a
client compares seqs, never counts.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import msgspec
import pytest
from chinwag.clients import connect
from chinwag.protocol import Entry, GetHistory, History
from test_cli import CHINWAG
from test_client_fake_daemon import FakeConnection, Runner, fake_daemon

#: What the daemon sends for a `get_history` with no limit, at most.
DEFAULT_PAGE = 200


@dataclass
class PagedConversation:
    """A conversation of ``count`` entries, a compact marker at seq ``marker``; each
    reply carries at most ``fits`` entries (what fits the daemon's frame)."""

    count: int
    marker: int | None = None
    fits: int = 1_000_000
    asked: list[GetHistory] = field(default_factory=list)

    def entry(self, seq: int) -> Entry:
        if seq == self.marker:
            return Entry(seq=seq, kind="compact", role="system", content="summary", archive="a1")
        return Entry(seq=seq, role="user" if seq % 2 else "assistant", content=f"entry {seq}")

    def answer(self, msg: GetHistory) -> History:
        first = msg.after_seq + 1
        if not msg.include_archived and self.marker is not None:
            first = max(first, self.marker)
        size = min(DEFAULT_PAGE if msg.limit is None else msg.limit, self.fits)
        seqs = range(first, min(first + size, self.count + 1))
        return History(
            id=msg.id,
            agent=msg.agent,
            sender=msg.sender or "user",
            title="Paged",
            cwd=None,
            entries=[self.entry(seq) for seq in seqs],
            last_seq=self.count,
        )

    async def serve(self, conn: FakeConnection) -> None:
        await conn.handshake()
        while True:
            msg = await conn.recv()
            assert isinstance(msg, GetHistory), msg
            self.asked.append(msg)
            await conn.send(self.answer(msg))


@pytest.fixture
def sock(short_tmp: Path) -> Path:
    return short_tmp / "fake.sock"


@pytest.mark.parametrize(("include_archived", "first"), [(False, 120), (True, 1)])
def test_iter_history_reads_every_page_up_to_last_seq(
    run: Runner, sock: Path, include_archived: bool, first: int
) -> None:
    # 64 entries a page, fewer than the 200 asked for: the pages are followed by
    # seq, from the last entry of each, whatever their length.
    conversation = PagedConversation(450, marker=120, fits=64)

    async def main() -> list[int]:
        async with fake_daemon(sock, conversation.serve), connect(sock) as c:
            history = c.iter_history("assistant", include_archived=include_archived)
            return [entry.seq async for entry in history]

    assert run(main) == list(range(first, 451))
    seen = range(first, 451)
    starts = [0, *(seen[index - 1] for index in range(64, len(seen), 64))]
    assert [(m.after_seq, m.limit) for m in conversation.asked] == [(s, 200) for s in starts]
    assert {m.include_archived for m in conversation.asked} == {include_archived}


def test_iter_history_asks_page_size_at_a_time_after_after_seq(run: Runner, sock: Path) -> None:
    conversation = PagedConversation(450)

    async def main() -> list[int]:
        async with fake_daemon(sock, conversation.serve), connect(sock) as c:
            history = c.iter_history("assistant", "bob", after_seq=400, page_size=20)
            return [entry.seq async for entry in history]

    assert run(main) == list(range(401, 451))
    # The third page ends at last_seq: no fourth request.
    assert [(m.sender, m.after_seq, m.limit) for m in conversation.asked] == [
        ("bob", 400, 20),
        ("bob", 420, 20),
        ("bob", 440, 20),
    ]


def test_iter_history_with_nothing_after_after_seq_asks_once(run: Runner, sock: Path) -> None:
    conversation = PagedConversation(30)

    async def main() -> list[Entry]:
        async with fake_daemon(sock, conversation.serve), connect(sock) as c:
            return [entry async for entry in c.iter_history("assistant", after_seq=30)]

    assert run(main) == []
    assert len(conversation.asked) == 1


def test_iter_history_refuses_an_empty_page(run: Runner, sock: Path) -> None:
    conversation = PagedConversation(3)

    async def main() -> None:
        async with fake_daemon(sock, conversation.serve), connect(sock) as c:
            with pytest.raises(ValueError, match="page_size"):
                async for _ in c.iter_history("assistant", page_size=0):
                    pass

    run(main)
    assert conversation.asked == []


@pytest.mark.parametrize("backend", ["trio"])
def test_cli_history_prints_every_page_of_the_daemons_default_page(run: Runner, sock: Path) -> None:
    # No --limit on the command line: the daemon answers 200 entries at a time.
    conversation = PagedConversation(450)

    async def history(*options: str) -> list[str]:
        async with fake_daemon(sock, conversation.serve):
            done = await anyio.run_process(
                [CHINWAG, "--socket", str(sock), "history", *options, "assistant"],
                stdin=subprocess.DEVNULL,
                check=False,
            )
        assert done.returncode == 0, done.stderr.decode()
        return done.stdout.decode().splitlines()

    lines = run(lambda: history("--json"))
    assert [msgspec.json.decode(line, type=Entry).seq for line in lines] == list(range(1, 451))
    assert len(conversation.asked) == 3

    heading, *shown = run(history)
    assert heading == "assistant/user — Paged"
    assert shown[0] == "#1 user: entry 1"
    assert shown[-1] == "#450 assistant: entry 450"
    assert len(shown) == 450
