"""The daemon over TCP: TLS from trustme certificates, tokens that fix who a client is,
and clients that take URLs (several, tried in order)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import trio
from chinwag.clients import ChinwagError, connect
from chinwag.protocol import End, TextDelta, token_digest
from deadlines import collect, next_of
from tcp_daemons import (  # noqa: F401  (tls_certificates: the fixture `tls`)
    ALICE,
    BRIDGE,
    OPERATOR,
    Tls,
    closed_port,
    tcp_config,
    tcp_port,
    tls_certificates,
)


@pytest.fixture
def tls_daemon(daemon_factory, tls: Tls):  # type: ignore[no-untyped-def]
    daemon = daemon_factory(tcp_config(tls))
    daemon.url = f"chinwag+tls://127.0.0.1:{tcp_port(daemon.log_path)}"
    return daemon


async def test_a_wrong_token_is_refused_401_and_the_right_one_gets_a_welcome_over_tls(
    tls_daemon, tls
):
    with pytest.raises(ChinwagError, match="unknown token") as refused:
        async with connect(tls_daemon.url, token="not-a-token", ca=str(tls.ca)):
            pass
    assert refused.value.code == 401
    with pytest.raises(ChinwagError, match="no token"):
        async with connect(tls_daemon.url, token="", ca=str(tls.ca)):
            pass
    async with connect(tls_daemon.url, token=ALICE, ca=str(tls.ca)) as client:
        assert {"daemons", "tcp", "speaks_as"} <= set(client.welcome.features)
        assert client.welcome.speaks_as == "alice"
        async with client.stream("assistant", "over the network") as events:
            got = await collect(events)
    assert "".join(e.delta for e in got if isinstance(e, TextDelta)) == "over the network"
    assert isinstance(got[-1], End) and got[-1].status == "done"
    async with connect(tls_daemon.socket_path) as local:
        assert local.welcome.speaks_as is None, "the socket holds no client to a name"
        (item,) = (await local.list_conversations(sender="alice")).items
    assert item.sender == "alice", "a request without sender spoke as the token's name"


async def test_a_token_holds_its_client_to_its_name(tls_daemon, tls):
    async with connect(tls_daemon.url, token=ALICE, ca=str(tls.ca)) as client:
        with pytest.raises(ChinwagError, match="speaks as 'alice', not 'bob'") as refused:
            async with client.stream("assistant", "hi", sender="bob") as events:
                await collect(events)
        assert refused.value.code == 401
        with pytest.raises(ChinwagError, match="not 'bob'"):
            await client.history("assistant", sender="bob")
        with pytest.raises(ChinwagError, match="not 'bob'"):
            await client.register("bob")
        with pytest.raises(ChinwagError, match=r"needs a `\*` token"):
            await client.search_memory("assistant", "anything")
        # Still usable, and its reads are confined to its name.
        async with client.stream("assistant", "mine") as events:
            await collect(events)
        conversations = (await client.list_conversations()).items
        assert [c.sender for c in conversations] == ["alice"]


async def test_a_prefix_token_speaks_for_every_name_under_it(tls_daemon, tls):
    async with connect(tls_daemon.url, token=BRIDGE, ca=str(tls.ca)) as bridge:
        async with bridge.stream("assistant", "from a chat", sender="tg:42") as events:
            assert (await collect(events))[-1].status == "done"
        with pytest.raises(ChinwagError, match="not 'user'") as outside:
            await bridge.kill("assistant", sender="user")
        assert outside.value.code == 401
        with pytest.raises(ChinwagError, match="name one in `sender`") as unnamed:
            async with bridge.stream("assistant", "who am I") as events:
                await collect(events)
        assert unnamed.value.code == 400
    async with connect(tls_daemon.url, token=OPERATOR, ca=str(tls.ca)) as operator:
        senders = {c.sender for c in (await operator.list_conversations()).items}
    assert senders == {"tg:42"}


async def test_a_client_that_speaks_no_tls_disturbs_no_other(tls_daemon, tls):
    port = int(tls_daemon.url.rsplit(":", 1)[1])
    async with (
        connect(tls_daemon.url, token=ALICE, ca=str(tls.ca)) as client,
        client.stream("assistant", "/slow 5 50") as events,
    ):
        await next_of(events, TextDelta)
        raw = await trio.open_tcp_stream("127.0.0.1", port)
        await raw.send_all(b"\x00\x00\x00\x05hello not tls")
        with trio.fail_after(10):
            while await raw.receive_some(1024):  # the daemon closes it
                pass
        await raw.aclose()
        assert (await collect(events))[-1].status == "done"


async def test_plain_tcp_is_served_on_loopback_only(daemon_factory):
    loopback = daemon_factory(tcp_config(None), name="loopback")
    port = tcp_port(loopback.log_path)
    async with connect(f"chinwag+tcp://127.0.0.1:{port}", token=ALICE) as client:
        assert client.welcome.agents == ["assistant", "helper"]
    loopback.stop()
    with pytest.raises(RuntimeError, match="needs tls_cert and tls_key"):
        daemon_factory(tcp_config(None, host="0.0.0.0"), name="everywhere")
    with pytest.raises(ValueError, match="plain TCP only to this machine"):
        async with connect("chinwag+tcp://192.0.2.1:7433", token=ALICE):
            pass


async def test_several_addresses_are_tried_in_order(tls_daemon, tls):
    dead = f"chinwag+tls://127.0.0.1:{closed_port()}"
    async with connect(f"{dead},{tls_daemon.url}", token=ALICE, ca=str(tls.ca)) as client:
        assert client.welcome.agents == ["assistant", "helper"]
    with pytest.raises(OSError, match=r"No daemon answered: chinwag\+tls://127\.0\.0\.1"):
        async with connect(f"{dead},{dead}", token=ALICE, ca=str(tls.ca)):
            pass


def test_the_cli_talks_over_tls_from_its_environment(tls_daemon, tls):
    env = dict(
        os.environ,
        CHINWAG_URL=f"chinwag+tls://127.0.0.1:{closed_port()},{tls_daemon.url}",
        CHINWAG_TOKEN=ALICE,
        CHINWAG_CA=str(tls.ca),
        CHINWAG_SOCKET="/nonexistent/chinwag.sock",
    )
    sent = subprocess.run(
        [sys.executable, "-m", "chinwag.clients.cli", "send", "assistant", "hello there"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert sent.returncode == 0, sent.stderr
    assert "hello there" in sent.stdout
    made = subprocess.run(
        [sys.executable, "-m", "chinwag.clients.cli", "token", "carol"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    token = made.stdout.split()[1]
    assert f'"{token_digest(token)}" = "carol"' in made.stdout


async def test_tail_given_several_daemons_goes_on_with_the_next_when_one_dies(
    daemon_factory, postgres_url
):
    """`chinwag tail` with two daemons' URLs: the first is killed -9, tail says so,
    connects to the second and shows the runs there."""
    first, second = (
        daemon_factory(tcp_config(None), storage_url=postgres_url, name=name)
        for name in ("first", "second")
    )
    ports = [tcp_port(first.log_path), tcp_port(second.log_path)]
    urls = ",".join(f"chinwag+tcp://127.0.0.1:{port}" for port in ports)
    env = dict(os.environ, CHINWAG_URL=urls, CHINWAG_TOKEN=OPERATOR, NO_COLOR="1")
    command = [sys.executable, "-m", "chinwag.clients.cli", "tail"]
    tail = await trio.lowlevel.open_process(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert tail.stdout is not None
    seen = b""

    async def until_shown(text: bytes) -> None:
        nonlocal seen
        with trio.fail_after(20):
            while text not in seen:
                seen += await tail.stdout.receive_some(4096)  # type: ignore[union-attr]

    try:
        async with connect(first.socket_path) as on_first:
            while b"on the first" not in seen:  # tail's subscription may come later
                async with on_first.stream("assistant", "on the first") as events:
                    await collect(events)
                with trio.move_on_after(1):
                    await until_shown(b"on the first")
        first.kill9()
        await until_shown(b"connecting again")
        async with connect(second.socket_path) as on_second:
            while b"on the second" not in seen:
                async with on_second.stream("assistant", "on the second") as events:
                    await collect(events)
                with trio.move_on_after(1):
                    await until_shown(b"on the second")
    finally:
        tail.kill()
        await tail.wait()
