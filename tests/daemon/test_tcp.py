"""TCP in the daemon, in process: the config's checks, what a token lets a request
name (no event loop), and TLS connections on memory streams under the autojump clock
(the handshake within hello_timeout_s, max_connections over both listeners).

tests/e2e/test_tcp_e2e.py drives the real `chinwag serve` over real sockets.
"""

from __future__ import annotations

import ssl
import typing
from pathlib import Path

import msgspec
import pytest
import trio
import trio.testing
import trustme
from chinwag.daemon import ConfigError, load_config
from chinwag.daemon._server import FLUSH_TIMEOUT_S
from chinwag.daemon._tokens import Identity, Tokens, server_tls
from chinwag.daemon._tools import TOOL_NAMES
from chinwag.protocol import (
    Attach,
    ClientMsg,
    Compact,
    Edit,
    Error,
    GetHistory,
    GetUsage,
    Heartbeat,
    Inbox,
    Kill,
    ListConversations,
    ListSpaces,
    Ping,
    Pong,
    Post,
    Register,
    ReplyToAsk,
    Request,
    SearchMemory,
    SpaceMembers,
    Stream,
    Subscribe,
    Watch,
    token_digest,
)
from cryptography.hazmat.primitives import serialization
from tcp_daemons import Tls, tls_certificates  # noqa: F401  (the fixture `tls`)
from test_connection import Client, Daemon, open_daemon

# --- the config ---------------------------------------------------------------------

TOKENS = f'[tokens]\n"{token_digest("t")}" = "alice"\n'


def load(tmp_path: Path, daemon: str, tokens: str = TOKENS) -> object:
    path = tmp_path / "config.toml"
    path.write_text(f"[daemon]\n{daemon}\n{tokens}")
    return load_config(path, tool_names=TOOL_NAMES)


def tls_keys(tls: Tls, *, cert: Path | None = None, key: Path | None = None) -> str:
    return f'tls_cert = "{cert or tls.cert}"\ntls_key = "{key or tls.key}"'


@pytest.mark.parametrize(
    "listen", ["127.0.0.1:7433", "[::1]:7433", "localhost:7433", "127.0.0.2:7433"]
)
def test_plain_tcp_loads_on_a_loopback_host(tmp_path: Path, listen: str) -> None:
    config = load(tmp_path, f'listen_tcp = "{listen}"')
    assert config.daemon.tcp_address is not None  # type: ignore[attr-defined]


def test_port_0_lets_the_system_pick_a_free_port(tmp_path: Path) -> None:
    config = load(tmp_path, 'listen_tcp = "127.0.0.1:0"')
    assert config.daemon.tcp_address == ("127.0.0.1", 0)  # type: ignore[attr-defined]


def test_tls_loads_on_any_host(tmp_path: Path, tls: Tls) -> None:
    config = load(tmp_path, f'listen_tcp = "0.0.0.0:7433"\n{tls_keys(tls)}')
    assert config.daemon.tcp_address == ("0.0.0.0", 7433)  # type: ignore[attr-defined]


def test_tcp_mistakes_are_config_errors_naming_the_file(tmp_path: Path, tls: Tls) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    other_key = tmp_path / "other-key.pem"
    trustme.CA().issue_cert("127.0.0.1").private_key_pem.write_to_path(str(other_key))
    encrypted = tmp_path / "encrypted-key.pem"
    key = serialization.load_pem_private_key(tls.key.read_bytes(), None)
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    listen = 'listen_tcp = "0.0.0.0:7433"\n'
    cases = [
        ('listen_tcp = "192.0.2.7:7433"', TOKENS, "plain TCP is served only on a loopback"),
        ('listen_tcp = "7433"', TOKENS, 'listen_tcp must be "HOST:PORT"'),
        ('listen_tcp = "[::1:7433"', TOKENS, 'listen_tcp must be "HOST:PORT"'),
        (f'{listen}tls_cert = "{tls.cert}"', TOKENS, "tls_cert and tls_key go together"),
        (f'{listen}tls_key = "{tls.key}"', TOKENS, "tls_cert and tls_key go together"),
        (
            listen + tls_keys(tls, cert=tmp_path / "absent.pem"),
            TOKENS,
            f"tls_cert {tmp_path / 'absent.pem'} cannot be read: No such file",
        ),
        (
            listen + tls_keys(tls, key=tmp_path),
            TOKENS,
            f"tls_key {tmp_path} cannot be read: Is a directory",
        ),
        (listen + tls_keys(tls, cert=garbage), TOKENS, "holds no PEM certificate"),
        (listen + tls_keys(tls, key=garbage), TOKENS, "is not the PEM private key of tls_cert"),
        (listen + tls_keys(tls, key=other_key), TOKENS, "is not the PEM private key of tls_cert"),
        (listen + tls_keys(tls, key=encrypted), TOKENS, "is encrypted"),
        ('listen_tcp = "127.0.0.1:7433"', "", "needs a [tokens] table"),
        ("", '[tokens]\n"t" = "alice"\n', '[tokens] keys are "sha256:"'),
        ("", f'[tokens]\n"{token_digest("t").upper()}" = "alice"\n', "[tokens] keys are"),
        ("", f'[tokens]\n"{token_digest("t")}" = ""\n', "[tokens] names are 1 to 256 bytes"),
    ]
    for daemon, tokens, why in cases:
        with pytest.raises(ConfigError, match=r"config\.toml: ") as refused:
            load(tmp_path, daemon, tokens)
        assert why in str(refused.value), (daemon, str(refused.value))


# --- what a token lets a request name ------------------------------------------------

ALICE, BRIDGE, OPERATOR = Identity("alice"), Identity("tg:*"), Identity("*")


def naming(kind: type[Request], name: str | None) -> Request:
    """A request of ``kind`` whose sender (or reader, or registered name) is ``name``."""
    given: dict[str, object] = {}
    for field in msgspec.structs.fields(kind):
        if field.name in ("sender", "reader", "name"):
            given[field.encode_name] = name
        elif field.required:
            given[field.encode_name] = 1 if field.name == "id" else "x"
    return msgspec.convert(given, kind)


NAMED = [
    Stream,
    Kill,
    Attach,
    ReplyToAsk,
    Compact,
    GetHistory,
    ListConversations,
    Subscribe,
    GetUsage,
    Post,
    Edit,
    Inbox,
    Watch,
    SpaceMembers,
    ListSpaces,
    Register,
    Heartbeat,
]


@pytest.mark.parametrize("kind", NAMED, ids=lambda kind: kind.__name__)
def test_a_name_the_token_does_not_cover_is_401(kind: type[Request]) -> None:
    assert ALICE.check(naming(kind, "alice")) is None
    assert OPERATOR.check(naming(kind, "bob")) is None
    assert BRIDGE.check(naming(kind, "tg:42")) is None
    code, why = ALICE.check(naming(kind, "bob")) or (0, "")
    assert code == 401 and "speaks as 'alice', not 'bob'" in why
    code, why = BRIDGE.check(naming(kind, "tgx")) or (0, "")
    assert code == 401 and "speaks as 'tg:*', not 'tgx'" in why


# Those whose name may be left out: the others' is required.
OPTIONAL = [kind for kind in NAMED if kind not in (Post, Edit, Inbox, Watch, Register, Heartbeat)]


@pytest.mark.parametrize("kind", OPTIONAL, ids=lambda kind: kind.__name__)
def test_a_name_left_out_is_the_tokens_own(kind: type[Request]) -> None:
    mine = naming(kind, None)
    assert ALICE.check(mine) is None
    assert "alice" in msgspec.structs.astuple(mine)  # a read is confined to the token's name
    anyone = naming(kind, None)
    assert OPERATOR.check(anyone) is None
    assert anyone == naming(kind, None)  # as on the Unix socket
    code, why = BRIDGE.check(naming(kind, None)) or (0, "")
    assert code == 400 and "name one in" in why


def test_every_request_naming_who_acts_or_reads_is_checked() -> None:
    """A request type added later with a `sender`, `from` or `as` under another
    attribute would pass the check unseen; this lists them."""
    unchecked = [
        (kind.__name__, field.name)
        for kind in typing.get_args(ClientMsg)
        for field in msgspec.structs.fields(kind)
        if field.encode_name in ("sender", "from", "as") and field.name not in ("sender", "reader")
    ]
    assert unchecked == []


def test_search_memory_needs_an_operators_token() -> None:
    search = SearchMemory(id=1, agent="assistant", query="q")
    assert OPERATOR.check(search) is None
    code, why = ALICE.check(search) or (0, "")
    assert code == 401 and "needs a `*` token" in why


def test_a_token_is_known_by_its_digest_alone() -> None:
    tokens = Tokens({token_digest("secret"): "alice", token_digest("ops"): "*"})
    assert tokens.identify("secret") == Identity("alice")
    assert tokens.identify("ops") == Identity("*")
    assert tokens.identify(token_digest("secret")) is None
    assert tokens.identify("") is None and tokens.identify(None) is None


# --- TLS connections --------------------------------------------------------------------


def serve_tls(daemon: Daemon, tls: Tls) -> tuple[trio.abc.Stream, trio.Event]:
    """The client's end of a connection ``daemon`` serves as it serves one TCP listener
    accepted (TLS, a token to name), and what is set once it is done with it."""
    client_end, server_end = trio.testing.memory_stream_pair()
    served = trio.Event()
    context = server_tls(str(tls.cert), str(tls.key))

    async def serve() -> None:
        try:
            await daemon.server.handle(
                trio.SSLStream(server_end, context, server_side=True), tcp=True
            )
        finally:
            served.set()

    daemon.nursery.start_soon(serve)
    return client_end, served


async def test_a_tls_handshake_counts_against_hello_timeout(
    autojump_clock: trio.testing.MockClock, tls: Tls
) -> None:
    async with open_daemon(hello_timeout_s=5.0) as daemon:
        began = trio.current_time()
        client_end, served = serve_tls(daemon, tls)  # a client that never begins its handshake
        with trio.fail_after(5.0 + FLUSH_TIMEOUT_S + 1):
            await served.wait()
        assert trio.current_time() - began >= 5.0
        assert daemon.server.connections == set()
        await client_end.aclose()


async def test_max_connections_covers_the_socket_and_tcp(
    autojump_clock: trio.testing.MockClock, tls: Tls
) -> None:
    async with open_daemon(max_connections=1) as daemon:
        local = await daemon.connected()
        client_end, served = serve_tls(daemon, tls)
        context = ssl.create_default_context(cafile=str(tls.ca))
        remote = Client(trio.SSLStream(client_end, context, server_hostname="127.0.0.1"), served)
        refusal = await remote.next()
        assert isinstance(refusal, Error) and refusal.code == 503, refusal
        assert "max_connections" in refusal.message
        await served.wait()
        assert isinstance(await local.ask(Ping(id=1)), Pong)
