"""Mail addresses: what a participant's, a role's, a space's or a project's name may be."""

from __future__ import annotations

import re

from ._errors import RequestError

NAME = re.compile(r"[a-z0-9][a-z0-9_.:-]{0,63}")
RESERVED = frozenset({"everyone", "all", "daemon", "system", "chinwag"})


def participant_name(raw: str, what: str = "A participant's name") -> str:
    """``raw`` case-folded, if it is a valid name that is not reserved; else 400."""
    name = raw.casefold()
    if not NAME.fullmatch(name):
        raise RequestError(
            400,
            f"{what} must be 1-64 characters of a-z, 0-9, _ . : -, starting with a letter or "
            f"digit; {raw!r} is not.",
        )
    if name in RESERVED:
        raise RequestError(400, f"{name!r} is reserved and cannot be a participant's name.")
    return name
