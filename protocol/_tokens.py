"""How a TCP client's token is kept in the daemon's config: never itself, its digest."""

from __future__ import annotations

import hashlib


def token_digest(token: str) -> str:
    """The ``[tokens]`` key of ``token``: ``sha256:`` and its SHA-256 in hex."""
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()
