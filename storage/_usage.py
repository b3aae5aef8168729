"""Usage totals as every backend keeps them: a conversation's model tokens per UTC day.

An append adds the ``usage`` of each of its entries (a model call's tokens) to
its conversation's total for the UTC day of the entry's ``created_at``, one
call per entry that has any, in the same atomic write as the entries.
``daily_usage`` is what one write adds; the memory and jsonl backends keep the
sums in dicts and answer ``usage`` with ``usage_totals`` and ``total_tokens``
with ``tokens_of``, and hand out each conversation's metadata ``with_tokens``;
the SQL backends upsert the same sums into a table, sort the same way and sum
with ``SUM``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import date, datetime

import msgspec
from chinwag.protocol import ConversationItem, Entry, TokenUsage, UsageTotal

from ._timestamps import utc


class DayTotal(msgspec.Struct, array_like=True):
    """One conversation's tokens and model calls on one day, as they add up."""

    input_tokens: int = 0
    output_tokens: int = 0
    calls: int = 0

    def add(self, usage: TokenUsage) -> None:
        self.input_tokens += usage.input_tokens
        self.output_tokens += usage.output_tokens
        self.calls += 1


DailyUsage = dict[date, DayTotal]
"""A conversation's totals (or what one write adds to them), by UTC day."""


def usage_day(moment: datetime) -> date:
    """The UTC day a usage stamped ``moment`` counts on."""
    return utc(moment).date()


def daily_usage(entries: Iterable[Entry]) -> DailyUsage:
    """What storing ``entries`` adds to their conversation's totals.

    Their ``created_at`` must be stamped already (every backend stamps before it writes).
    """
    days: DailyUsage = {}
    for entry in entries:
        if entry.usage is not None:
            assert entry.created_at is not None  # stamped by the append
            days.setdefault(usage_day(entry.created_at), DayTotal()).add(entry.usage)
    return days


def add_daily(totals: DailyUsage, more: Mapping[date, DayTotal]) -> None:
    """Add ``more`` into ``totals``, day by day."""
    for day, extra in more.items():
        total = totals.setdefault(day, DayTotal())
        total.input_tokens += extra.input_tokens
        total.output_tokens += extra.output_tokens
        total.calls += extra.calls


def tokens_of(totals: Iterable[Mapping[date, DayTotal]]) -> tuple[int, int]:
    """The input and output tokens of every day of ``totals``, added up."""
    tokens_in = tokens_out = 0
    for days in totals:
        for total in days.values():
            tokens_in += total.input_tokens
            tokens_out += total.output_tokens
    return tokens_in, tokens_out


def with_tokens(item: ConversationItem, totals: Mapping[date, DayTotal]) -> ConversationItem:
    """A copy of ``item`` with its conversation's ``totals`` in ``tokens_in``/``tokens_out``."""
    tokens_in, tokens_out = tokens_of([totals])
    return msgspec.structs.replace(item, tokens_in=tokens_in, tokens_out=tokens_out)


def usage_totals(
    conversations: Iterable[tuple[str, str, Mapping[date, DayTotal]]],
    *,
    agent: str | None,
    sender: str | None,
    since: date | None,
) -> list[UsageTotal]:
    """``Storage.usage`` over ``(agent, sender, totals)`` held in memory: the rows that
    match, by day, then agent, then sender (code point order, as the SQL backends sort)."""
    rows = [
        UsageTotal(
            agent=conv_agent,
            sender=conv_sender,
            day=day,
            input_tokens=total.input_tokens,
            output_tokens=total.output_tokens,
            calls=total.calls,
        )
        for conv_agent, conv_sender, totals in conversations
        if (agent is None or conv_agent == agent) and (sender is None or conv_sender == sender)
        for day, total in totals.items()
        if since is None or day >= since
    ]
    rows.sort(key=lambda row: (row.day, row.agent, row.sender))
    return rows
