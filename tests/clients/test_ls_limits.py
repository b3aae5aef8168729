"""How `chinwag ls` shows a conversation's usage against its agent's limits."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from chinwag.clients._render import limits_usage
from chinwag.protocol import ConversationItem, ConversationLimits

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def item(limits: ConversationLimits | None, **usage: object) -> ConversationItem:
    return ConversationItem(agent="a", sender="s", limits=limits, **usage)  # type: ignore[arg-type]


def test_every_limit_set_shows_its_usage():
    limits = ConversationLimits(max_messages=200, max_tokens=100_000, expires_after="7d")
    listed = item(limits, messages=12, tokens=30_412, expires_at=NOW + timedelta(days=3, hours=20))
    assert limits_usage(listed, NOW) == "12/200 msgs, 30k/100k tok, expires in 3d"


def test_only_the_limits_set_are_shown():
    assert limits_usage(item(ConversationLimits(max_messages=50), messages=0), NOW) == "0/50 msgs"
    only_tokens = item(ConversationLimits(max_tokens=8000), messages=3, tokens=950)
    assert limits_usage(only_tokens, NOW) == "950/8k tok"
    expiring = item(ConversationLimits(expires_after="12h"), expires_at=NOW + timedelta(hours=5))
    assert limits_usage(expiring, NOW) == "expires in 5h"


def test_no_limits_show_nothing():
    assert limits_usage(item(None, messages=4, tokens=10), NOW) == ""


@pytest.mark.parametrize(
    ("left", "shown"),
    [
        (timedelta(days=6, hours=23), "expires in 6d"),
        (timedelta(minutes=90), "expires in 1h"),
        (timedelta(minutes=59, seconds=59), "expires in 59m"),
        (timedelta(seconds=40), "expires in 40s"),
        (timedelta(milliseconds=300), "expires in 1s"),
        (timedelta(0), "expired"),
        (-timedelta(days=2), "expired"),
    ],
)
def test_expiry_is_shown_in_its_largest_whole_unit(left: timedelta, shown: str):
    listed = item(ConversationLimits(expires_after="7d"), expires_at=NOW + left)
    assert limits_usage(listed, NOW) == shown


@pytest.mark.parametrize(
    ("tokens", "shown"),
    [
        (0, "0"),
        (999, "999"),
        (1000, "1k"),
        (1599, "1.5k"),
        (9999, "9.9k"),
        (10_500, "10k"),
        (999_999, "999k"),
        (2_150_000, "2.1M"),
        (12_000_000, "12M"),
    ],
)
def test_token_counts_are_short_and_never_rounded_up(tokens: int, shown: str):
    listed = item(ConversationLimits(max_tokens=1000), tokens=tokens)
    assert limits_usage(listed, NOW) == f"{shown}/1k tok"
