"""Who a TCP client is: its token, and what the token lets it name.

On the Unix socket the file system says who may connect (the socket's mode,
``SO_PEERCRED``) and a client names any sender. On TCP the `hello` carries a
token; the config keeps only its SHA-256 (``[tokens]``), mapped to the name
the token speaks as: one name, every name under a prefix (``"tg:*"``, for a
bridge that speaks for many chats), or any name (``"*"``, an operator's). Every
request is then held to it here, in one place, before it is dispatched: a
sender, a mail author (``from``) or reader (``as``), or a registered name the
token does not cover is refused 401; one left out is the token's own name, so
that a read cannot reach past it.
"""

from __future__ import annotations

import hmac
import ssl
from dataclasses import dataclass

from chinwag.protocol import Heartbeat, Register, Request, SearchMemory, token_digest

# Fields of a request that name who acts or reads, and what the wire calls them.
_NAMING = (("sender", "`sender` (or mail's `from`)"), ("reader", "`as`"))


@dataclass(frozen=True)
class Identity:
    """What one token speaks as."""

    name: str  # as configured: "alice", "tg:*", "*"

    @property
    def everyone(self) -> bool:
        return self.name == "*"

    @property
    def prefix(self) -> str | None:
        return self.name[:-1] if self.name.endswith("*") else None

    def covers(self, name: str) -> bool:
        prefix = self.prefix
        return name.startswith(prefix) if prefix is not None else name == self.name

    def check(self, msg: Request) -> tuple[int, str] | None:
        """What is wrong with ``msg`` from a client of this identity, or None; fills in
        the token's name where the request leaves the sender (or reader) out."""
        if isinstance(msg, SearchMemory) and not self.everyone:
            return 401, "search_memory reads every conversation's archives: it needs a `*` token."
        for field, wire in _NAMING:
            if not hasattr(msg, field):
                continue
            value = getattr(msg, field)
            if value is None:
                if self.everyone:
                    continue
                if self.prefix is not None:
                    return 400, (
                        f"This token speaks for every name starting {self.prefix!r}; "
                        f"name one in {wire}."
                    )
                setattr(msg, field, self.name)
            elif not self.covers(value):
                return 401, f"This token speaks as {self.name!r}, not {value!r} (in {wire})."
        if isinstance(msg, Register | Heartbeat) and not self.covers(msg.name):
            return 401, f"This token speaks as {self.name!r}, not {msg.name!r}."
        return None


class Tokens:
    """The configured tokens, by digest."""

    def __init__(self, names_by_digest: dict[str, str]) -> None:
        self._names = names_by_digest

    def identify(self, token: str | None) -> Identity | None:
        """The identity ``token`` has, or None for no token or one the config lacks."""
        if not token:
            return None
        digest = token_digest(token)
        for known, name in self._names.items():  # compare_digest: no timing to learn from
            if hmac.compare_digest(known, digest):
                return Identity(name)
        return None


def server_tls(cert: str, key: str) -> ssl.SSLContext:
    """The TLS context the TCP listener serves with (TLS 1.2 at least)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context
