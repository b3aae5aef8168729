"""Conversation limits: what an agent's max_messages, max_tokens and expires_after count.

Each counts the conversation's live history, its entries from the latest
compact marker on, so a compaction lifts them all: `max_messages` its user
and assistant entries; `max_tokens` all of it (the marker's summary and the
tool results too, which the model reads), estimated as compaction estimates
text; `expires_after` runs from the moment it began (the marker's time, or
the first entry's). The estimate rather than the usage a provider reports:
that is known only after a run, only in the daemon that ran it, and counts
the system prompt and tools as well; the estimate is the same for any model,
on every daemon, and for a conversation just read back from storage.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from chinwag.protocol import ConversationItem, ConversationLimits, Entry

from ._compaction import estimated_tokens
from ._config import AgentConfig


@dataclass(frozen=True)
class LiveUsage:
    """What the limits count in a conversation's live history."""

    messages: int  # user and assistant entries
    tokens: int  # estimated, over every entry
    began_at: datetime | None  # the first entry's time; None for an empty history

    @classmethod
    def of(cls, entries: Sequence[Entry]) -> LiveUsage:
        """The usage of ``entries``, a working context (the latest marker first, if any)."""
        return cls(
            messages=sum(1 for e in entries if e.kind == "message" and e.role != "tool"),
            tokens=sum(estimated_tokens(e) for e in entries),
            began_at=entries[0].created_at if entries else None,
        )

    def expires_at(self, config: AgentConfig) -> datetime | None:
        """When runs stop being accepted under ``config.expires_after``; None without it."""
        expiry = config.expiry
        if expiry is None or self.began_at is None:
            return None
        return self.began_at + expiry


def refusal(
    agent: str, sender: str, config: AgentConfig, entries: Sequence[Entry], moment: datetime
) -> str | None:
    """Why a run of ``(agent, sender)`` may not start at ``moment``, in one sentence;
    None when it may. ``entries`` is its working context; ``config`` its agent's."""
    if not config.limited:
        return None
    usage = LiveUsage.of(entries)
    remedy = (
        f"compact it (chinwag compact {shlex.quote(agent)} --sender {shlex.quote(sender)}) "
        "or start a new one with another sender."
    )
    if (limit := config.max_messages) is not None and usage.messages >= limit:
        return (
            f"This conversation has {usage.messages} messages, {_reached(usage.messages, limit)} "
            f'for agent "{agent}" (max_messages = {limit}): {remedy}'
        )
    if (limit := config.max_tokens) is not None and usage.tokens >= limit:
        return (
            f"This conversation holds about {usage.tokens:,} tokens, "
            f'{_reached(usage.tokens, limit)} for agent "{agent}" (max_tokens = {limit}): {remedy}'
        )
    if (expires_at := usage.expires_at(config)) is not None and moment >= expires_at:
        return (
            f"This conversation expired at {expires_at.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC, "
            f"{config.expires_after} after it began or was last compacted, the limit for agent "
            f'"{agent}" (expires_after = "{config.expires_after}"): {remedy}'
        )
    return None


def show_usage(item: ConversationItem, config: AgentConfig, entries: Sequence[Entry]) -> None:
    """Set ``item``'s usage and limits from its working context ``entries``."""
    usage = LiveUsage.of(entries)
    item.messages = usage.messages
    item.tokens = usage.tokens
    item.expires_at = usage.expires_at(config)
    item.limits = ConversationLimits(
        max_messages=config.max_messages,
        max_tokens=config.max_tokens,
        expires_after=config.expires_after,
    )


def _reached(count: int, limit: int) -> str:
    return "the limit" if count == limit else "over the limit"
