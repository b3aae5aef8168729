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
from pathlib import Path

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
    """The TLS context the TCP listener serves with (TLS 1.2 at least); ``ValueError``
    says which of the PEM files ``cert`` and ``key`` is wrong, and how."""
    pem = {}
    for role, path in (("tls_cert", cert), ("tls_key", key)):
        try:
            pem[role] = Path(path).read_bytes()
        except OSError as exc:
            raise ValueError(f"{role} {path} cannot be read: {exc.strerror or exc}") from exc
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        # Without a password callback OpenSSL would ask for an encrypted key's passphrase on
        # the terminal, and the daemon would hang at start.
        context.load_cert_chain(cert, key, password=_refuse_passphrase)
    except _EncryptedKey:
        raise ValueError(
            f"tls_key {key} is encrypted; the daemon reads an unencrypted key (mode 0600)"
        ) from None
    except ssl.SSLError as exc:
        if b"-----BEGIN CERTIFICATE-----" not in pem["tls_cert"]:
            raise ValueError(f"tls_cert {cert} holds no PEM certificate") from exc
        raise ValueError(
            f"tls_key {key} is not the PEM private key of tls_cert {cert} ({exc})"
        ) from exc
    return context


class _EncryptedKey(Exception):
    pass


def _refuse_passphrase() -> bytes:
    raise _EncryptedKey
