"""Usage totals through the whole daemon in process: `usage`, `stats` and
`list_conversations` count exactly the tokens the echo model reported, a
compaction's summary included, and a daemon that starts on a store already
holding some takes them up.

The real clock, not the autojump one: compaction indexes its archive in a
worker thread, which an autojump clock would jump past to a read's deadline.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import trio
from chinwag.daemon._compaction import summary_request
from chinwag.daemon._config import AgentConfig, Config
from chinwag.daemon._providers import word_count
from chinwag.daemon._runtime import Runtime
from chinwag.daemon._serve import build_agents, make_providers
from chinwag.daemon._server import Server
from chinwag.protocol import (
    Compact,
    Compacted,
    Conversations,
    End,
    Error,
    GetHistory,
    GetStats,
    GetUsage,
    History,
    ListConversations,
    Stats,
    Stream,
    Usage,
    UsageTotal,
    UsageTotals,
)
from chinwag.storage import MemoryStorage, Storage, open_store
from test_connection import Client, Daemon

AGENTS = {"assistant": AgentConfig(provider="echo")}
WAIT_S = 10.0


@asynccontextmanager
async def serving(storage: Storage) -> AsyncIterator[Daemon]:
    """A daemon over ``storage``, started as `chinwag serve` starts one."""
    config = Config(agents=AGENTS)
    agents = build_agents(config, make_providers(config))
    async with trio.open_nursery() as nursery:
        runtime = Runtime(config, storage, agents, nursery)
        server = Server(runtime)
        await runtime.count_stored_usage()
        await server.post_office.start()
        yield Daemon(runtime, server, nursery)
        nursery.cancel_scope.cancel()


@dataclass
class Reported:
    """What the echo model reported in one conversation's `usage` events."""

    tokens_in: int = 0
    tokens_out: int = 0
    calls: int = 0

    def add(self, events: list[Usage]) -> None:
        for event in events:
            self.tokens_in += event.prompt_tokens
            self.tokens_out += event.completion_tokens
            self.calls += 1


_ids = iter(range(1, 1_000_000))


async def ask(client: Client, request_type: type, **fields: object) -> object:
    return await client.ask(request_type(id=next(_ids), **fields))


async def turn(client: Client, content: str, *, sender: str = "user") -> list[Usage]:
    """One run to its `end done`; the `usage` events it sent."""
    rid = next(_ids)
    await client.send(Stream(id=rid, agent="assistant", sender=sender, content=content))
    frames = await client.answer(rid)
    end = frames[-1]
    assert isinstance(end, End) and end.status == "done", end
    return [f for f in frames if isinstance(f, Usage)]


async def usage(client: Client, **filters: object) -> list[UsageTotal]:
    reply = await ask(client, GetUsage, **filters)
    assert isinstance(reply, UsageTotals), reply
    return reply.items


async def stats(client: Client) -> Stats:
    reply = await ask(client, GetStats)
    assert isinstance(reply, Stats), reply
    return reply


async def listed(client: Client) -> dict[str, tuple[int, int]]:
    """Each conversation's (tokens_in, tokens_out) as `list_conversations` shows them, by sender."""
    reply = await ask(client, ListConversations)
    assert isinstance(reply, Conversations), reply
    return {item.sender: (item.tokens_in, item.tokens_out) for item in reply.items}


def by_sender(rows: list[UsageTotal]) -> dict[str, Reported]:
    """The rows of conversations with `assistant`, added up per sender."""
    sums: dict[str, Reported] = {}
    for row in rows:
        assert row.agent == "assistant"
        total = sums.setdefault(row.sender, Reported())
        total.tokens_in += row.input_tokens
        total.tokens_out += row.output_tokens
        total.calls += row.calls
    return sums


async def two_conversations(client: Client) -> dict[str, Reported]:
    """Two runs for `user` and one for `bob`; what echo reported for each."""
    reported = {"user": Reported(), "bob": Reported()}
    reported["user"].add(await turn(client, "red and blue"))
    reported["user"].add(await turn(client, "one two three four five"))
    reported["bob"].add(await turn(client, "hello", sender="bob"))
    return reported


async def test_usage_stats_and_listing_count_what_the_model_reported():
    async with serving(MemoryStorage()) as daemon:
        client = await daemon.connected(wait_s=WAIT_S)
        before = await stats(client)
        assert (before.tokens_in, before.tokens_out) == (0, 0)
        began = datetime.now(UTC).date()
        reported = await two_conversations(client)
        # Echo answers with the user's words, one output token each.
        assert reported["user"].tokens_out == 3 + 5
        assert reported["bob"].tokens_out == 1
        assert reported["user"].calls == 2 and reported["user"].tokens_in > 0

        rows = await usage(client)
        # A row per conversation and UTC day of the test (two, if it spans midnight).
        assert {row.day for row in rows} <= {began, datetime.now(UTC).date()}
        assert by_sender(rows) == reported

        total_in = sum(r.tokens_in for r in reported.values())
        total_out = sum(r.tokens_out for r in reported.values())
        after = await stats(client)
        assert (after.tokens_in, after.tokens_out) == (total_in, total_out)

        assert await listed(client) == {
            sender: (r.tokens_in, r.tokens_out) for sender, r in reported.items()
        }

        assert by_sender(await usage(client, sender="bob")) == {"bob": reported["bob"]}
        assert by_sender(await usage(client, agent="assistant", sender="user")) == {
            "user": reported["user"]
        }
        assert await usage(client, agent="nobody") == []


async def test_since_takes_in_whole_days_and_a_bad_one_is_refused_400():
    async with serving(MemoryStorage()) as daemon:
        client = await daemon.connected(wait_s=WAIT_S)
        await turn(client, "red and blue")
        (row,) = await usage(client)
        assert await usage(client, since=row.day.isoformat()) == [row]
        assert await usage(client, since="2d") == [row]
        assert await usage(client, since=(row.day + timedelta(days=1)).isoformat()) == []
        assert await usage(client, since="99999999d") == [row]  # before any date: every day

        for bad in ("yesterday", "7x", "2026-13-01", ""):
            reply = await ask(client, GetUsage, since=bad)
            assert isinstance(reply, Error) and reply.code == 400, (bad, reply)
            assert reply.message.startswith("since must be a duration"), reply.message
            assert repr(bad) in reply.message
        reply = await ask(client, GetUsage, sender="")
        assert isinstance(reply, Error) and reply.code == 400, reply


async def test_usage_refuses_an_agent_or_sender_that_is_no_name_400(postgres_url: str):
    """On postgres, where a NUL in a query parameter fails the statement (was 500)."""
    async with open_store(postgres_url) as storage, serving(storage) as daemon:
        client = await daemon.connected(wait_s=WAIT_S)
        await turn(client, "red and blue")
        refused = [
            ({"agent": "a\x00b"}, "An agent must not contain control characters."),
            ({"agent": "x" * 257}, "An agent must be 1 to 256 bytes of UTF-8."),
            ({"agent": ""}, "An agent must be 1 to 256 bytes of UTF-8."),
            ({"sender": "u\x00"}, "A sender must not contain control characters."),
            ({"agent": "assistant", "sender": "\n"}, "A sender must not contain control"),
        ]
        for filters, message in refused:
            reply = await ask(client, GetUsage, **filters)
            assert isinstance(reply, Error) and reply.code == 400, (filters, reply)
            assert reply.message.startswith(message), (filters, reply.message)
        # Any name is taken, configured or not.
        (row,) = await usage(client, agent="assistant")
        assert await usage(client, agent="gone-now é" + "x" * 244) == []
        assert await usage(client, agent=row.agent, sender=row.sender) == [row]


async def test_a_compactions_summary_call_is_counted_on_its_marker():
    async with serving(MemoryStorage()) as daemon:
        client = await daemon.connected(wait_s=WAIT_S)
        reported = await two_conversations(client)
        done = await ask(client, Compact, agent="assistant")
        assert isinstance(done, Compacted), done

        history = await ask(client, GetHistory, agent="assistant", include_archived=True)
        assert isinstance(history, History), history
        *archived, marker = history.entries
        assert marker.kind == "compact" and marker.usage is not None, marker
        # What echo reports for a summary: the request's words in, the summary's out.
        request = summary_request(
            agent="assistant",
            model=AGENTS["assistant"].model,
            entries=archived,
            previous_summary=None,
            instructions=None,
        )
        assert marker.usage.input_tokens == sum(word_count(m) for m in request.messages)
        assert marker.usage.output_tokens == len(done.summary.split())

        user = reported["user"]
        expected = Reported(
            user.tokens_in + marker.usage.input_tokens,
            user.tokens_out + marker.usage.output_tokens,
            user.calls + 1,
        )
        assert by_sender(await usage(client, sender="user")) == {"user": expected}
        assert (await listed(client))["user"] == (expected.tokens_in, expected.tokens_out)
        everything = await stats(client)
        bob = reported["bob"]
        assert (everything.tokens_in, everything.tokens_out) == (
            expected.tokens_in + bob.tokens_in,
            expected.tokens_out + bob.tokens_out,
        )


async def test_a_daemon_started_on_a_store_with_usage_takes_its_totals_up():
    storage = MemoryStorage()
    async with serving(storage) as first:
        client = await first.connected(wait_s=WAIT_S)
        reported = await two_conversations(client)
        counted = await stats(client)
        rows = await usage(client)
    async with serving(storage) as second:
        client = await second.connected(wait_s=WAIT_S)
        again = await stats(client)
        assert (again.tokens_in, again.tokens_out) == (counted.tokens_in, counted.tokens_out)
        assert await usage(client) == rows
        # And it counts on from there.
        more = Reported()
        more.add(await turn(client, "green"))
        grown = await stats(client)
        assert (grown.tokens_in, grown.tokens_out) == (
            counted.tokens_in + more.tokens_in,
            counted.tokens_out + more.tokens_out,
        )
        assert by_sender(await usage(client))["bob"] == reported["bob"]


async def test_on_a_shared_store_stats_count_the_other_daemons_calls():
    storage = MemoryStorage()
    storage.shared = True  # as two daemons on one postgres database see it
    async with serving(storage) as one, serving(storage) as other:
        here = await one.connected(wait_s=WAIT_S)
        there = await other.connected(wait_s=WAIT_S)
        reported = Reported()
        reported.add(await turn(here, "red and blue"))
        seen = await stats(there)
        assert (seen.tokens_in, seen.tokens_out) == (reported.tokens_in, reported.tokens_out)
        assert await listed(there) == {"user": (reported.tokens_in, reported.tokens_out)}
