"""`chinwag usage`: the model tokens the daemon's store has counted, as a table or JSON.

Loaded only once named (cli.py's `_Commands`). The daemon keeps a total per
conversation and UTC day (the `usage` request); this command adds them up per
conversation over the period asked for, or shows them day by day.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date

import click
from chinwag.protocol import JSON, UsageTotal

from ._settings import connect_or_fail, run_command, settings_of


@dataclass
class Tally:
    """Some usage totals added up: what one row of the table shows."""

    calls: int
    tokens_in: int
    tokens_out: int
    first_day: date
    last_day: date

    @classmethod
    def of(cls, totals: Sequence[UsageTotal]) -> Tally:
        """``totals`` (at least one) added up."""
        return cls(
            calls=sum(t.calls for t in totals),
            tokens_in=sum(t.input_tokens for t in totals),
            tokens_out=sum(t.output_tokens for t in totals),
            first_day=min(t.day for t in totals),
            last_day=max(t.day for t in totals),
        )

    @property
    def tokens(self) -> int:
        return self.tokens_in + self.tokens_out

    def cells(self) -> tuple[str, ...]:
        """Calls, tokens in, out and both, as the table shows them."""
        return tuple(f"{n:,}" for n in (self.calls, self.tokens_in, self.tokens_out, self.tokens))


def by_conversation(totals: Iterable[UsageTotal]) -> list[tuple[str, str, Tally]]:
    """One tally per (agent, sender), the most tokens first."""
    grouped: dict[tuple[str, str], list[UsageTotal]] = {}
    for total in totals:
        grouped.setdefault((total.agent, total.sender), []).append(total)
    rows = [(agent, sender, Tally.of(days)) for (agent, sender), days in grouped.items()]
    return sorted(rows, key=lambda row: (-row[2].tokens, row[0], row[1]))


def _print_table(
    columns: Sequence[str], rows: Sequence[Sequence[str]], total: Sequence[str]
) -> None:
    """The rows under their columns, numbers right-aligned, then the total row."""
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for column in columns:
        numeric = column in ("calls", "tokens in", "tokens out", "total")
        table.add_column(column, justify="right" if numeric else "left", overflow="fold")
    for row in rows:
        table.add_row(*row)
    table.add_section()
    table.add_row(*total, style="bold")
    Console(highlight=False).print(table)


@click.command()
@click.option("--agent", help="Only this agent's conversations.")
@click.option("--sender", help="Only this sender's conversations.")
@click.option(
    "--since",
    help="Only the days from this one on: a duration back from now (12h, 7d, 2w) "
    "or a day (2026-12-01). Days are UTC. Default: every day.",
)
@click.option("--daily", is_flag=True, help="A row per day and conversation.")
@click.option("--json", "as_json", is_flag=True, help="Print every daily total as one JSON line.")
@click.pass_context
def usage(
    ctx: click.Context,
    agent: str | None,
    sender: str | None,
    since: str | None,
    daily: bool,
    as_json: bool,
) -> None:
    """Show the model tokens used, per conversation (agent and sender) over the period.

    Counted by the daemon's store for every model call it stored, compactions'
    included; they survive restarts and compaction.
    """
    settings = settings_of(ctx)

    async def body() -> list[UsageTotal]:
        async with connect_or_fail(settings) as client:
            return await client.usage(agent, sender, since=since)

    totals = run_command(body)
    if as_json:
        for total in totals:
            sys.stdout.buffer.write(JSON.encode(total) + b"\n")
        sys.stdout.buffer.flush()
        return
    if not totals:
        print("no usage")
        return
    overall = Tally.of(totals)
    if daily:
        _print_table(
            ("day", "agent", "sender", "calls", "tokens in", "tokens out", "total"),
            [(t.day.isoformat(), t.agent, t.sender, *Tally.of([t]).cells()) for t in totals],
            ("total", "", "", *overall.cells()),
        )
        return
    _print_table(
        ("agent", "sender", "calls", "tokens in", "tokens out", "total", "first day", "last day"),
        [
            (agent, sender, *tally.cells(), str(tally.first_day), str(tally.last_day))
            for agent, sender, tally in by_conversation(totals)
        ],
        ("total", "", *overall.cells(), str(overall.first_day), str(overall.last_day)),
    )
