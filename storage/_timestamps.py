"""Timestamps as every backend stores them: UTC, microseconds, RFC 3339 text.

The text form is fixed-width (``0005-01-01T00:00:00.000000Z``), so comparing
two texts orders them like the instants they name; sqlite sorts and pages on it.
"""

from __future__ import annotations

from datetime import UTC, datetime


def utc(moment: datetime) -> datetime:
    """The same instant with ``tzinfo=UTC``; a naive datetime raises ``ValueError``."""
    if moment.tzinfo is UTC:  # what the daemon gives: every append takes this path
        return moment
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"Timestamps must be timezone-aware, got the naive {moment!r}.")
    return moment.astimezone(UTC)


def to_text(moment: datetime) -> str:
    """RFC 3339 in UTC with exactly six fractional digits and a ``Z``."""
    # isoformat of a UTC datetime ends "+00:00": swap that for "Z".
    return utc(moment).isoformat(timespec="microseconds")[:-6] + "Z"


def from_text(text: str) -> datetime:
    """The inverse of ``to_text``: a tz-aware UTC datetime."""
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise ValueError(f"{text!r} names no timezone.")
    return moment.astimezone(UTC)
