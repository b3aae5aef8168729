"""Conversation limits (max_messages, max_tokens, expires_after): a run past one is refused
409 before it stores anything, a compaction lifts them, and list_conversations shows them.

Runs on the echo model over memory storage, on trio's autojump clock. Expiry is
told by the time the live history began: the history is stored already old (its
entries' `created_at` a week back), or the moment is given to the check itself.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from chinwag.daemon import ConfigError, load_config
from chinwag.daemon._config import AgentConfig, Config, parse_duration
from chinwag.daemon._limits import LiveUsage, refusal
from chinwag.daemon._runtime import Runtime
from chinwag.daemon._tools import TOOL_NAMES
from chinwag.protocol import (
    ConversationLimits,
    End,
    Entry,
    Queued,
    Start,
    ToolCallInfo,
)
from chinwag.storage import NewConversation
from runtime_harness import open_runtime, submit
from test_connection import open_daemon
from test_post_office import party


def config(**limits: object) -> Config:
    return Config(
        agents={
            "assistant": AgentConfig(provider="echo", tools=["set_title"], **limits),  # type: ignore[arg-type]
            "free": AgentConfig(provider="echo"),
        }
    )


async def ran(rt: Runtime, content: str, *, sender: str = "user") -> End:
    end = await submit(rt, content, sender=sender).finished()
    assert end.status == "done", end
    return end


async def refused(rt: Runtime, content: str = "one more", *, sender: str = "user") -> str:
    """The 409 message of a run refused by a limit; fails unless it stored nothing."""
    before = await rt.storage.get_conversation("assistant", sender)
    sink = submit(rt, content, sender=sender)
    end = await sink.finished()
    assert end.status == "error" and end.error is not None and end.error.code == 409, end
    assert not any(isinstance(e, Start) for e in sink.events), "a refused run never starts"
    after = await rt.storage.get_conversation("assistant", sender)
    assert before is not None and after is not None
    assert after.last_seq == before.last_seq == end.last_seq, "a refused run stores nothing"
    return end.error.message


async def compact(rt: Runtime, sender: str = "user") -> None:
    await rt.compacted(rt.compact("assistant", sender, None))


async def store_old_history(rt: Runtime, age: timedelta, *, sender: str = "user") -> None:
    """A conversation of two messages that began ``age`` ago."""
    began = datetime.now(UTC) - age
    await rt.storage.append(
        "assistant",
        sender,
        [
            Entry(seq=0, role="user", content="long ago", created_at=began),
            Entry(seq=0, role="assistant", content="long ago", created_at=began),
        ],
        create=NewConversation(cwd=None),
    )


# --- each limit refuses 409, stores nothing, and says how to lift it ------------------------


async def test_max_messages_refuses_the_run_that_would_pass_it(autojump_clock):
    async with open_runtime(config(max_messages=4)) as rt:
        await ran(rt, "first")
        await ran(rt, "second")  # 4 messages: user, assistant, user, assistant
        message = await refused(rt)
        assert message == (
            'This conversation has 4 messages, the limit for agent "assistant" (max_messages = 4):'
            " compact it (chinwag compact assistant --sender user) or start a new one with another"
            " sender."
        )
        await ran(rt, "another sender's conversation is a new one", sender="other")


async def test_tool_results_and_markers_are_not_messages(autojump_clock):
    async with open_runtime(config(max_messages=4)) as rt:
        await ran(rt, "/title Cats")  # user, assistant (its call), tool, assistant: 3 messages
        await ran(rt, "three messages, so this run starts")
        await compact(rt)  # the marker alone: 0 messages
        await ran(rt, "after the compaction")
        await ran(rt, "and again")
        assert "has 4 messages" in await refused(rt)


async def test_max_tokens_refuses_once_the_estimate_reaches_it(autojump_clock):
    async with open_runtime(config(max_tokens=20)) as rt:
        await ran(rt, "x" * 39)  # 9 tokens asked, 9 echoed: 18
        await ran(rt, "abcdefgh")  # 2 more each way: 22
        message = await refused(rt)
        assert message.startswith(
            'This conversation holds about 22 tokens, over the limit for agent "assistant"'
            " (max_tokens = 20): compact it (chinwag compact assistant --sender user)"
        )


async def test_an_expired_conversation_is_refused_until_compacted(autojump_clock):
    async with open_runtime(config(expires_after="7d")) as rt:
        await store_old_history(rt, timedelta(days=6, hours=23), sender="recent")
        await ran(rt, "still within the week", sender="recent")

        await store_old_history(rt, timedelta(days=8))
        message = await refused(rt)
        began = (await rt.storage.history("assistant", "user", after_seq=0, limit=1))[0]
        assert began.created_at is not None
        expired = (began.created_at + timedelta(days=7)).astimezone(UTC)
        assert message == (
            f"This conversation expired at {expired:%Y-%m-%d %H:%M:%S} UTC, 7d after it began or"
            ' was last compacted, the limit for agent "assistant" (expires_after = "7d"): compact'
            " it (chinwag compact assistant --sender user) or start a new one with another sender."
        )
        await compact(rt)  # the live history now begins at the marker, just stored
        await ran(rt, "a fresh week")


async def test_compaction_lifts_max_messages(autojump_clock):
    async with open_runtime(config(max_messages=2)) as rt:
        await ran(rt, "first")
        await refused(rt)
        await compact(rt)
        await ran(rt, "after the compaction")
        await refused(rt)


async def test_a_sender_with_spaces_is_quoted_in_the_remedy(autojump_clock):
    async with open_runtime(config(max_messages=2)) as rt:
        await ran(rt, "first", sender="ana maria")
        message = await refused(rt, sender="ana maria")
        assert "(chinwag compact assistant --sender 'ana maria')" in message


async def test_an_agent_without_limits_is_never_refused(autojump_clock):
    async with open_runtime(config()) as rt:
        for n in range(30):
            await ran(rt, f"turn {n} " + "word " * 200)


# --- when the check happens -----------------------------------------------------------------


async def test_a_queued_stream_is_checked_when_its_turn_comes(autojump_clock):
    async with open_runtime(config(max_messages=2)) as rt:
        first = submit(rt, "/slow 3 100")
        waiting = submit(rt, "queued while the history was empty")
        assert (await first.finished()).status == "done"
        end = await waiting.finished()
        assert isinstance(waiting.events[0], Queued)
        assert end.error is not None and end.error.code == 409
        assert "has 2 messages" in end.error.message
        assert not any(isinstance(e, Start) for e in waiting.events)


async def test_a_compaction_queued_ahead_lifts_the_limit_for_the_streams_behind_it(
    autojump_clock,
):
    async with open_runtime(config(max_messages=2)) as rt:
        first = submit(rt, "/slow 3 100")
        compaction = rt.compact("assistant", "user", None)
        behind = submit(rt, "after the compaction")
        await first.finished()
        await rt.compacted(compaction)
        assert (await behind.finished()).status == "done"


async def test_a_mail_run_past_a_limit_is_answered_could_not_answer(autojump_clock):
    agents = {"assistant": AgentConfig(provider="echo", max_messages=2)}
    async with open_daemon(agents=agents) as daemon:
        ana = await party(daemon, "ana")
        rid, _ = await ana.watch()
        await ana.post(["assistant"], "first")
        first = (await ana.mail(rid)).message
        assert first.content == "first"
        asked = await ana.post(["assistant"], "second")
        answer = (await ana.mail(rid)).message
        assert answer.reply_to == asked.msg_id
        assert answer.content == (
            "assistant could not answer (error): This conversation has 2 messages, the limit for"
            ' agent "assistant" (max_messages = 2): compact it (chinwag compact assistant'
            " --sender ana) or start a new one with another sender."
        )
        (item,) = [i for i in await ana.sent() if i.message.msg_id == asked.msg_id]
        assert item.message.answered_by == answer.msg_id
        assert item.deliveries is not None
        (agent_copy,) = item.deliveries
        assert agent_copy.state == "read", "answered, as every reply reads what it answers"


# --- list_conversations ---------------------------------------------------------------------


async def test_list_conversations_shows_the_usage_against_each_limit(autojump_clock):
    limits = {"max_messages": 200, "max_tokens": 1000, "expires_after": "12h"}
    async with open_runtime(config(**limits)) as rt:
        await ran(rt, "/title Cats")  # 3 messages and a tool result
        await ran(rt, "hello")
        assert (await submit(rt, "no limits", agent="free").finished()).status == "done"
        items, _ = await rt.list_conversations(agent=None, sender=None, limit=10, cursor=None)
        by_agent = {item.agent: item for item in items}
        free = by_agent["free"]
        assert (free.messages, free.tokens, free.expires_at, free.limits) == (None,) * 4

        item = by_agent["assistant"]
        entries = await rt.storage.history("assistant", "user")
        roles = [e.role for e in entries]
        assert roles == ["user", "assistant", "tool", "assistant", "user", "assistant"]
        assert item.messages == 5
        assert item.tokens == LiveUsage.of(entries).tokens > 0
        assert entries[0].created_at is not None
        assert item.expires_at == entries[0].created_at + timedelta(hours=12)
        assert item.limits == ConversationLimits(**limits)

        # Read back from storage, once the daemon no longer holds it: the same.
        rt.conversations.clear()
        again, _ = await rt.list_conversations(
            agent="assistant", sender=None, limit=10, cursor=None
        )
        assert again == [item]

        await compact(rt)
        (compacted,), _ = await rt.list_conversations(
            agent="assistant", sender=None, limit=10, cursor=None
        )
        (marker,) = await rt.storage.history("assistant", "user", after_seq=item.last_seq)
        assert marker.kind == "compact" and marker.created_at is not None
        assert compacted.messages == 0
        assert compacted.tokens == LiveUsage.of([marker]).tokens > 0
        assert compacted.expires_at == marker.created_at + timedelta(hours=12)


# --- the check itself, at a given moment ----------------------------------------------------


def entries_at(began: datetime, *roles: str) -> list[Entry]:
    return [
        Entry(seq=n, role=role, content="word " * 4, created_at=began + timedelta(minutes=n - 1))
        for n, role in enumerate(roles, 1)
    ]


def test_expiry_starts_exactly_at_the_moment_it_names():
    agent = AgentConfig(provider="echo", expires_after="12h")
    began = datetime(2026, 1, 1, 8, 0, tzinfo=UTC)
    entries = entries_at(began, "user", "assistant")
    expires = began + timedelta(hours=12)
    assert refusal("a", "s", agent, entries, expires - timedelta(microseconds=1)) is None
    problem = refusal("a", "s", agent, entries, expires)
    assert problem is not None and "expired at 2026-01-01 20:00:00 UTC, 12h after" in problem
    assert refusal("a", "s", agent, [], expires + timedelta(days=365)) is None, "nothing yet"


def test_usage_counts_user_and_assistant_entries_and_every_entry_s_tokens():
    began = datetime(2026, 1, 1, tzinfo=UTC)
    marker = Entry(seq=5, kind="compact", content="s" * 40, created_at=began, archive="a-1-4")
    call = ToolCallInfo(call_id="c", name="set_title", arguments='{"title": "Cats"}')  # 17
    entries = [
        marker,
        Entry(seq=6, role="user", content="u" * 8),
        Entry(seq=7, role="assistant", content="", tool_calls=[call]),
        Entry(seq=8, role="tool", content="t" * 12),
        Entry(seq=9, role="assistant", content="a" * 4),
    ]
    usage = LiveUsage.of(entries)
    assert (usage.messages, usage.tokens, usage.began_at) == (3, 10 + 2 + 4 + 3 + 1, began)


def test_max_messages_and_max_tokens_are_checked_before_expiry():
    agent = AgentConfig(provider="echo", max_messages=2, max_tokens=1, expires_after="1s")
    late = datetime(2030, 1, 1, tzinfo=UTC)
    entries = entries_at(datetime(2026, 1, 1, tzinfo=UTC), "user", "assistant", "user")
    problem = refusal("a", "s", agent, entries, late)
    assert problem is not None and problem.startswith("This conversation has 3 messages, over")


# --- the config -------------------------------------------------------------------------


def test_durations_in_every_unit():
    assert parse_duration("30s") == timedelta(seconds=30)
    assert parse_duration("45m") == timedelta(minutes=45)
    assert parse_duration(" 12h ") == timedelta(hours=12)
    assert parse_duration("7d") == timedelta(days=7)
    assert parse_duration("2w") == timedelta(weeks=2)
    for text in ("7", "d", "7 days", "1.5h", "-1d", "7D", "99999999999999999999w"):
        assert parse_duration(text) is None, text


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ("max_messages = 0", "max_messages must be at least 1"),
        ("max_tokens = -5", "max_tokens must be at least 1"),
        ('expires_after = "7 days"', "expires_after must be a duration"),
        ('expires_after = "0s"', "expires_after must be a duration"),
        ('expires_after = "36501d"', "from 1s to 36500d"),
        ("expires_after = 7", "Expected `str | null`"),
        ('max_messages = "200"', "Expected `int | null`"),
    ],
)
def test_limits_are_checked_when_the_config_is_read(tmp_path: Path, line: str, says: str):
    path = tmp_path / "config.toml"
    path.write_text(f'[agents.a]\nprovider = "echo"\n{line}\n')
    with pytest.raises(ConfigError) as err:
        load_config(path, tool_names=TOOL_NAMES)
    assert says in str(err.value)


def test_limits_are_read_from_the_config(tmp_path: Path):
    path = tmp_path / "config.toml"
    path.write_text(
        '[agents.a]\nprovider = "echo"\nmax_messages = 200\nmax_tokens = 100000\n'
        'expires_after = "7d"\n'
    )
    agent = load_config(path, tool_names=TOOL_NAMES).agents["a"]
    assert (agent.max_messages, agent.max_tokens, agent.expiry) == (200, 100000, timedelta(days=7))
    assert agent.limited and not AgentConfig(provider="echo").limited
