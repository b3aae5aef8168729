"""Usage totals from the client's side: the library's `usage` against a real
`chinwag serve` (on asyncio and trio), and how `chinwag usage` and `chinwag ls`
add them up and show them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import date

import pytest
from chinwag.clients import ChinwagError, connect
from chinwag.clients._render import tokens_used
from chinwag.clients._usage_cli import Tally, by_conversation
from chinwag.protocol import ConversationItem, End, Usage, UsageTotal

Runner = Callable[[Callable[[], Awaitable[object]]], object]


def test_usage_returns_the_stored_totals_filtered(daemon, run: Runner) -> None:
    async def main() -> None:
        reported: dict[tuple[str, str], list[Usage]] = {}
        async with connect(daemon.socket_path) as c:
            assert await c.usage() == []
            for agent, sender, text in [
                ("assistant", "ana", "red and blue"),
                ("assistant", "ana", "green"),
                ("helper", "bob", "one two three four"),
            ]:
                async with c.stream(agent, text, sender=sender) as events:
                    got = await events.collect()
                assert isinstance(got[-1], End) and got[-1].status == "done", got[-1]
                reported.setdefault((agent, sender), []).extend(
                    e for e in got if isinstance(e, Usage)
                )

            rows = await c.usage()
            assert [(r.agent, r.sender) for r in rows] == [("assistant", "ana"), ("helper", "bob")]
            for row in rows:
                calls = reported[(row.agent, row.sender)]
                assert row.calls == len(calls)
                assert row.input_tokens == sum(u.prompt_tokens for u in calls)
                assert row.output_tokens == sum(u.completion_tokens for u in calls)
            assert rows[0].output_tokens == 3 + 1  # echo: a token per word echoed
            assert await c.usage("helper") == rows[1:]
            assert await c.usage(sender="ana", since="1d") == rows[:1]
            assert await c.usage(since=date.max.isoformat()) == []

            stats = await c.stats()
            assert stats.tokens_in == sum(r.input_tokens for r in rows)
            assert stats.tokens_out == sum(r.output_tokens for r in rows)
            page = await c.list_conversations()
            assert {(i.agent, i.tokens_in, i.tokens_out) for i in page.items} == {
                (r.agent, r.input_tokens, r.output_tokens) for r in rows
            }

            with pytest.raises(ChinwagError) as refused:
                await c.usage(since="last week")
            assert refused.value.code == 400
            assert "'last week'" in refused.value.message

    run(main)


def total(agent: str, sender: str, day: int, tokens_in: int, tokens_out: int) -> UsageTotal:
    return UsageTotal(
        agent=agent,
        sender=sender,
        day=date(2026, 3, day),
        input_tokens=tokens_in,
        output_tokens=tokens_out,
        calls=1,
    )


def test_the_table_adds_each_conversation_up_over_its_days_the_most_tokens_first() -> None:
    rows = by_conversation(
        [
            total("assistant", "ana", 1, 100, 10),
            total("helper", "bob", 2, 5, 5),
            total("assistant", "ana", 4, 300, 30),
            total("assistant", "zed", 3, 400, 40),
        ]
    )
    assert rows == [
        ("assistant", "ana", Tally(2, 400, 40, date(2026, 3, 1), date(2026, 3, 4))),
        ("assistant", "zed", Tally(1, 400, 40, date(2026, 3, 3), date(2026, 3, 3))),
        ("helper", "bob", Tally(1, 5, 5, date(2026, 3, 2), date(2026, 3, 2))),
    ]
    assert rows[0][2].cells() == ("2", "400", "40", "440")
    assert Tally(3, 12_345, 1_000_000, date.min, date.max).cells() == (
        "3",
        "12,345",
        "1,000,000",
        "1,012,345",
    )


@pytest.mark.parametrize(
    ("tokens_in", "tokens_out", "shown"),
    [(0, 0, ""), (950, 12, "950 in, 12 out"), (30_412, 1_599, "30k in, 1.5k out")],
)
def test_ls_shows_a_conversations_tokens_short(tokens_in: int, tokens_out: int, shown: str) -> None:
    item = ConversationItem(agent="a", sender="s", tokens_in=tokens_in, tokens_out=tokens_out)
    assert tokens_used(item) == shown
