"""End to end: conversation limits on the real `chinwag serve`, and `chinwag ls` showing them."""

from __future__ import annotations

import os
import sys

import msgspec
import trio
from chinwag.clients import connect
from chinwag.protocol import ConversationItem, ConversationLimits, End, Start
from deadlines import collect

CONFIG = """
[daemon]
shutdown_grace_s = 0.5

[agents.assistant]
provider = "echo"
max_messages = 4
max_tokens = 100000
expires_after = "7d"

[agents.helper]
provider = "echo"
"""


async def streamed(client, content: str, agent: str = "assistant") -> list:
    async with client.stream(agent, content) as events:
        return await collect(events, within=20)


async def chinwag_ls(socket_path, *args: str) -> str:
    """`chinwag ls` as a user runs it, on a terminal wide enough for every column."""
    done = await trio.run_process(
        [sys.executable, "-m", "chinwag.clients.cli", "--socket", str(socket_path), "ls", *args],
        capture_stdout=True,
        capture_stderr=True,
        env=dict(os.environ, COLUMNS="200"),
    )
    return done.stdout.decode()


async def test_a_stream_past_max_messages_ends_409_and_ls_shows_the_usage(daemon_factory):
    daemon = daemon_factory(CONFIG)
    async with connect(daemon.socket_path) as client:
        for content in ("first", "second"):
            assert (await streamed(client, content))[-1].status == "done"
        events = await streamed(client, "third")
        end = events[-1]
        assert isinstance(end, End) and end.status == "error" and end.error is not None
        assert end.error.code == 409
        assert end.error.message == (
            'This conversation has 4 messages, the limit for agent "assistant" (max_messages = 4):'
            " compact it (chinwag compact assistant --sender user) or start a new one with another"
            " sender."
        )
        assert not any(isinstance(e, Start) for e in events)
        history = await client.history("assistant")
        assert history.last_seq == end.last_seq == 4, "the refused stream stored nothing"
        assert (await streamed(client, "no limits", agent="helper"))[-1].status == "done"

    table = await chinwag_ls(daemon.socket_path)
    (row,) = [line for line in table.splitlines() if line.strip().startswith("assistant")]
    assert "4/4 msgs, 4/100k tok, expires in 6d" in row
    (free,) = [line for line in table.splitlines() if line.strip().startswith("helper")]
    assert "msgs" not in free and "tok" not in free

    listed = await chinwag_ls(daemon.socket_path, "--json")
    items = {
        item.agent: item
        for item in (
            msgspec.json.decode(line, type=ConversationItem) for line in listed.splitlines()
        )
    }
    assistant = items["assistant"]
    assert (assistant.messages, assistant.tokens) == (4, 4)
    assert assistant.limits == ConversationLimits(
        max_messages=4, max_tokens=100000, expires_after="7d"
    )
    assert assistant.expires_at is not None and items["helper"].limits is None
