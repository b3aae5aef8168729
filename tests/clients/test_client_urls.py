"""Where `connect` reaches a daemon: socket paths and URLs, several tried in order.

The failover tests script the daemons (test_client_fake_daemon's fake, on Unix
sockets named by ``unix://`` URLs, and a TCP listener that never answers), so
each can fail the way a real one rarely does on cue.
"""

from __future__ import annotations

import re
from pathlib import Path

import anyio
import anyio.abc
import msgspec
import pytest
from chinwag.clients import ChinwagError, connect
from chinwag.clients import _client as client_module
from chinwag.clients._client import Address, addresses
from chinwag.clients.cli import cli
from chinwag.protocol import JSON, Error, Hello, default_socket_path
from click.testing import CliRunner
from test_client_fake_daemon import WELCOME, FakeConnection, Handler, Runner, fake_daemon

# --- the addresses ------------------------------------------------------------------


def test_a_path_or_nothing_is_a_socket_as_before() -> None:
    assert addresses(None) == [Address(path=default_socket_path())]
    assert addresses("/run/chinwag.sock") == [Address(path=Path("/run/chinwag.sock"))]
    assert addresses(Path("rel/chinwag.sock")) == [Address(path=Path("rel/chinwag.sock"))]


def test_urls_separated_by_commas_are_addresses_in_their_order() -> None:
    given = "chinwag+tls://db1.example:7433, unix:///run/cw.sock,chinwag+tcp://[::1]:7434"
    assert addresses(given) == [
        Address(host="db1.example", port=7433),
        Address(path=Path("/run/cw.sock")),
        Address(host="::1", port=7434, tls=False),
    ]
    assert [str(a) for a in addresses(given)] == [
        "chinwag+tls://db1.example:7433",
        "/run/cw.sock",
        "chinwag+tcp://[::1]:7434",
    ]
    assert addresses("chinwag+tcp://localhost:1") == [Address(host="localhost", port=1, tls=False)]


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("https://db1:7433", "is not a daemon's address"),
        ("chinwag+tls://db1", "names no host and port"),
        ("chinwag+tls://db1:99999", "names no host and port"),
        ("chinwag+tls://:7433", "names no host and port"),
        ("chinwag+tcp://192.0.2.1:7433", "plain TCP only to this machine"),
        ("chinwag+tcp://db1:7433", "plain TCP only to this machine"),
    ],
)
def test_what_is_not_an_address_is_refused_before_connecting(url: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        addresses(f"unix:///run/cw.sock,{url}")


def test_the_cli_refuses_a_url_that_is_not_an_address_before_any_command() -> None:
    for given in (["--url", "chinwag+tcp://192.0.2.1:7433"], []):
        env = {"CHINWAG_URL": "https://db1:7433", "CHINWAG_SOCKET": "/nonexistent/cw.sock"}
        result = CliRunner().invoke(cli, [*given, "ls"], env=env)
        assert result.exit_code == 2, result.output
        why = "plain TCP only to this machine" if given else "is not a daemon's address"
        assert "Invalid value for '--url': " in result.output and why in result.output


def test_a_bad_url_in_the_environment_stops_only_what_would_reach_a_daemon() -> None:
    """``$CHINWAG_URL`` is the clients': a mistake in it leaves commands that reach no
    daemon working (``token``; ``serve`` likewise) and ``doctor`` says what is wrong."""
    env = {"CHINWAG_URL": "chinwag+tcp://192.0.2.1:7433", "CHINWAG_SOCKET": "/nonexistent/cw.sock"}
    made = CliRunner().invoke(cli, ["token", "ana"], env=env)
    assert made.exit_code == 0, made.output
    assert made.output.startswith("token: ")
    doctor = CliRunner().invoke(cli, ["doctor"], env=env)
    assert "✗ socket: chinwag+tcp://192.0.2.1:7433" in doctor.output, doctor.output
    assert "plain TCP only to this machine" in doctor.output


# --- several daemons, tried in order -------------------------------------------------

THIRD = msgspec.structs.replace(WELCOME, server="third")


async def welcomes(conn: FakeConnection) -> None:
    await conn.handshake()
    await anyio.sleep_forever()


async def welcomes_as_third(conn: FakeConnection) -> None:
    await conn.handshake(THIRD)
    await anyio.sleep_forever()


def refuses(code: int, why: str) -> tuple[list[Hello], Handler]:
    """A daemon that answers every hello ``code``; the hellos it read."""
    hellos: list[Hello] = []

    async def handler(conn: FakeConnection) -> None:
        hello = await conn.recv()
        assert isinstance(hello, Hello)
        hellos.append(hello)
        await conn.send_raw_body(JSON.encode(Error(id=None, code=code, message=why)))

    return hellos, handler


async def hangs_up(conn: FakeConnection) -> None:
    await conn.recv()  # the hello, unanswered


def test_a_daemon_that_hangs_up_or_goes_away_is_passed_for_the_next(
    run: Runner, short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHINWAG_TOKEN", "a-token")
    shutting, going_away = refuses(503, "The daemon is shutting down; retry later.")
    first, second, third = (short_tmp / f"{n}.sock" for n in ("1", "2", "3"))

    async def main() -> None:
        async with (
            fake_daemon(first, hangs_up),
            fake_daemon(second, going_away),
            fake_daemon(third, welcomes_as_third),
            # Each attempt says hello on a fresh session: one more on the first's fails.
            connect(f"unix://{first},unix://{second},unix://{third}") as client,
        ):
            assert client.welcome == THIRD
            assert [hello.token for hello in shutting] == [None]  # a token goes over TCP only

    run(main)


def test_a_daemon_that_refuses_for_good_is_the_answer(run: Runner, short_tmp: Path) -> None:
    hellos, refusing = refuses(401, "This hello named an unknown token.")
    later: list[Hello] = []

    async def never_reached(conn: FakeConnection) -> None:
        later.append(await conn.handshake())

    async def main() -> None:
        first, second = short_tmp / "1.sock", short_tmp / "2.sock"
        async with fake_daemon(first, refusing), fake_daemon(second, never_reached):
            with pytest.raises(ChinwagError, match="unknown token") as refused:
                async with connect(f"unix://{first},unix://{second}"):
                    pass
        assert refused.value.code == 401
        assert len(hellos) == 1 and later == []

    run(main)


def test_a_silent_daemon_on_tcp_is_given_up_after_the_answer_timeout(
    run: Runner, short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host the network lost (or a frozen daemon) accepts, or not, and never answers:
    the next address is tried once ``ANSWER_TIMEOUT_S`` has passed."""
    monkeypatch.setattr(client_module, "ANSWER_TIMEOUT_S", 0.3)
    monkeypatch.setenv("CHINWAG_TOKEN", "a-token")
    reached: list[Hello] = []

    async def listens_and_says_nothing(stream: anyio.abc.ByteStream) -> None:
        async with stream:
            hello = await FakeConnection(stream).recv()
            assert isinstance(hello, Hello)
            reached.append(hello)
            await anyio.sleep_forever()

    async def main() -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        silent = f"chinwag+tcp://127.0.0.1:{port}"
        answering = short_tmp / "answering.sock"
        async with listener, anyio.create_task_group() as tasks:
            tasks.start_soon(listener.serve, listens_and_says_nothing)
            async with fake_daemon(answering, welcomes):
                with anyio.fail_after(5):
                    async with connect(f"{silent},unix://{answering}") as client:
                        assert client.welcome == WELCOME
            gave_up = f"{silent}: no answer within 0.3 s"
            with pytest.raises(
                OSError, match=re.escape(f"No daemon answered: {gave_up}; {gave_up}.")
            ):
                async with connect(f"{silent},{silent}"):
                    pass
            tasks.cancel_scope.cancel()
        # The token goes over TCP, from $CHINWAG_TOKEN.
        assert [hello.token for hello in reached] == ["a-token"] * 3

    run(main)
