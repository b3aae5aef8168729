"""`chinwag doctor` on webhooks, run as a subprocess against a real daemon: each receiver
connected to (one that listens on loopback, one where nothing does, one whose name does
not resolve here), and each outbox as the running daemon reports it."""

from __future__ import annotations

import base64
import socket
import time
from pathlib import Path

import trio
from chinwag.clients import connect
from chinwag.protocol import WebhookBacklog
from test_doctor import doctor, hint_after, line

SECRET = "whsec_" + base64.b64encode(b"doctor-secret-doctor-secret-doc").decode()


def closed_port() -> int:
    with socket.socket() as probe:  # freed at once: nothing listens on it
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def config(root: Path, listening: int, closed: int) -> str:
    return f"""
[daemon]
socket = "{root / "chinwag.sock"}"
storage = "sqlite:///{root / "chinwag.db"}"
shutdown_grace_s = 2.0

[agents.assistant]
provider = "echo"

[[webhooks]]
name = "up"
url = "http://user:s3cr3tpw@127.0.0.1:{listening}/hook?token=t0ken"
events = ["critical"]
secret = "{SECRET}"

[[webhooks]]
name = "down"
url = "http://127.0.0.1:{closed}/hook"
events = ["dm"]

[[webhooks]]
name = "nowhere"
url = "https://receiver.invalid/hook"
events = ["space"]
"""


async def test_doctor_reports_each_receiver_and_its_outbox(daemon_factory, short_tmp) -> None:
    listener = socket.create_server(("127.0.0.1", 0))  # accepts, in its backlog
    with listener:
        listening, closed = listener.getsockname()[1], closed_port()
        root = short_tmp / "d"
        storage = f"sqlite:///{root / 'chinwag.db'}"
        d = daemon_factory(config(root, listening, closed), storage_url=storage)
        async with connect(d.socket_path) as client:
            await client.post("ana", "the receiver is down", to="bob")
            # The daemon's record of its try is in another process: asked until it shows.
            deadline = time.monotonic() + 30
            while (await client.stats()).webhooks[1] != WebhookBacklog(
                name="down", pending=1, retrying=1
            ):
                assert time.monotonic() < deadline, "the refused try was never recorded"
                await trio.sleep(0.05)

        status, lines = await doctor(d.socket_path, "--config", str(d.config_path))

    assert status == 0, lines  # a receiver that is down is a warning: mail waits for it
    assert line(lines, "✓ webhook up: ") == (
        f"✓ webhook up: http://127.0.0.1:{listening}/hook: accepts connections at"
        f" 127.0.0.1:{listening}; outbox empty"
    )
    assert line(lines, "! webhook down: ") == (
        f"! webhook down: http://127.0.0.1:{closed}/hook: nothing accepts connections at"
        f" 127.0.0.1:{closed} (Connection refused); outbox: 1 pending (1 retrying)"
    )
    assert "retried for 24 h" in hint_after(lines, "! webhook down: ")
    assert line(lines, "! webhook nowhere: ").startswith(
        "! webhook nowhere: https://receiver.invalid/hook: receiver.invalid does not resolve"
        " from here ("
    )
    text = "\n".join(lines)
    for private in ["s3cr3tpw", "t0ken", SECRET.removeprefix("whsec_")]:
        assert private not in text
