"""Mail webhooks end to end: the real `chinwag serve` on sqlite POSTs to a real HTTP server
of the test's own on loopback, which verifies each request with the `standardwebhooks`
library and keeps what came by its `webhook-id`.

A receiver that fails, then recovers, gets every delivery; and the issue's own
criterion: a daemon killed with -9 while its receiver is down, then restarted once the
receiver is up, makes every delivery exactly once by its `webhook-id`.
"""

from __future__ import annotations

import base64
import http.server
import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio
from chinwag.clients import connect
from chinwag.protocol import WebhookBacklog
from standardwebhooks import Webhook

SECRET = "whsec_" + base64.b64encode(b"e2e-secret-e2e-secret-e2e-secre").decode()
WAIT_S = 45.0  # retries come 5 s (then 10 s) after a failure, jittered


@dataclass
class Request:
    webhook_id: str
    msg_id: str
    content: str
    status: int  # what the receiver answered
    verified: bool
    body: bytes


class Receiver:
    """An HTTP server on loopback, in a thread of its own, that verifies each delivery and
    answers 500 to the first ``failures`` requests, then 200. Stopped and started again on
    the same port, it plays a receiver that is down."""

    def __init__(self, port: int, failures: int = 0) -> None:
        self.port = port
        self.failures = failures
        self.requests: list[Request] = []
        self.changed = threading.Condition()
        self._server: http.server.ThreadingHTTPServer | None = None

    def start(self) -> None:
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                try:
                    payload = Webhook(SECRET).verify(body, dict(self.headers.items()))
                    verified = True
                except Exception:
                    payload, verified = json.loads(body), False
                with receiver.changed:
                    status = 500 if len(receiver.requests) < receiver.failures else 200
                    message = payload["data"]["message"]
                    receiver.requests.append(
                        Request(
                            webhook_id=self.headers["webhook-id"],
                            msg_id=message["msg_id"],
                            content=message["content"],
                            status=status,
                            verified=verified,
                            body=body,
                        )
                    )
                    receiver.changed.notify_all()
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass  # the test shows what came; stderr stays quiet

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def delivered(self) -> dict[str, list[Request]]:
        """The requests answered 200, by webhook-id."""
        with self.changed:
            done: dict[str, list[Request]] = {}
            for request in self.requests:
                if request.status == 200:
                    done.setdefault(request.webhook_id, []).append(request)
            return done

    async def wait_for(self, done: Callable[[], bool], what: str) -> None:
        def wait() -> bool:
            with self.changed:
                return self.changed.wait_for(done, WAIT_S)

        if not await trio.to_thread.run_sync(wait):
            raise AssertionError(f"waited {WAIT_S:g} s for {what}, in vain: {self.requests}")


def free_port() -> int:
    with socket.socket() as probe:  # freed at once: nothing listens there until started
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def config(port: int) -> str:
    return f"""
[daemon]
shutdown_grace_s = 2.0

[agents.assistant]
provider = "echo"

[[webhooks]]
name = "e2e"
url = "http://127.0.0.1:{port}/hooks/chinwag"
events = ["dm"]
secret = "{SECRET}"
"""


async def post_dms(socket_path: Any, *contents: str) -> dict[str, str]:
    """Post each as a DM from ana to bob; their msg_ids, by content."""
    async with connect(socket_path) as client:
        return {
            content: (await client.post("ana", content, to="bob")).msg_id for content in contents
        }


async def backlog_becomes(socket_path: Any, expected: list[WebhookBacklog], what: str) -> None:
    """Ask the daemon for its outboxes until they are ``expected``: its record of its tries
    is in another process, which tells of it only when asked."""
    deadline = time.monotonic() + WAIT_S
    while True:
        async with connect(socket_path) as client:
            seen = (await client.stats()).webhooks
        if seen == expected:
            return
        assert time.monotonic() < deadline, f"waited {WAIT_S:g} s for {what}, in vain: {seen}"
        await trio.sleep(0.05)


def check_every_delivery(receiver: Receiver, posted: dict[str, str]) -> None:
    """Every posted message delivered, signed, once, under a webhook-id of its own."""
    assert all(request.verified for request in receiver.requests), receiver.requests
    for request in receiver.requests:  # a webhook-id always carries the same message
        assert request.webhook_id == f"e2e.{request.msg_id}"
        assert posted[request.content] == request.msg_id
    done = receiver.delivered()
    assert sorted(done) == sorted(f"e2e.{msg_id}" for msg_id in posted.values())
    assert {webhook_id: len(times) for webhook_id, times in done.items()} == dict.fromkeys(done, 1)


async def test_a_receiver_that_fails_then_recovers_gets_every_delivery_once(daemon_factory):
    port = free_port()
    receiver = Receiver(port, failures=3)
    receiver.start()
    try:
        d = daemon_factory(config(port))
        posted = await post_dms(d.socket_path, "one", "two", "three")
        await receiver.wait_for(
            lambda: len(receiver.delivered()) == 3, "three deliveries after three failures"
        )
        check_every_delivery(receiver, posted)
        assert [r.status for r in receiver.requests[:3]] == [500, 500, 500]
        assert len(receiver.requests) == 6  # each failed once, then was delivered once
        await backlog_becomes(d.socket_path, [WebhookBacklog(name="e2e")], "an empty outbox")
        assert d.stop() == 0
    finally:
        receiver.stop()
    log = d.log_path.read_text()
    assert "webhook_retry_scheduled" in log and "webhook_delivered" in log
    assert SECRET.removeprefix("whsec_") not in log


async def test_a_daemon_killed_with_deliveries_pending_makes_each_once_after_a_restart(
    daemon_factory,
):
    port = free_port()
    receiver = Receiver(port)  # down: nothing listens on the port yet
    d = daemon_factory(config(port))
    posted = await post_dms(d.socket_path, "one", "two", "three")
    refused = [WebhookBacklog(name="e2e", pending=3, retrying=3)]
    await backlog_becomes(d.socket_path, refused, "the refused tries to be recorded")
    d.kill9()

    receiver.start()
    try:
        d.start()
        posted |= await post_dms(d.socket_path, "four, after the restart")
        await receiver.wait_for(
            lambda: len(receiver.delivered()) == 4, "every delivery after the restart"
        )
        check_every_delivery(receiver, posted)
        assert len(receiver.requests) == 4  # the receiver was down for every earlier try
        await backlog_becomes(d.socket_path, [WebhookBacklog(name="e2e")], "an empty outbox")
    finally:
        receiver.stop()
