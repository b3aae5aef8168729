"""Mail survives kill -9: what was acknowledged is there, and no delivery went back.

Each round, writers post to each other and to the echo agent, each post with an
idempotency key, and readers read with ``mark_read``; the daemon is killed with
SIGKILL at a seeded random moment (in some rounds the instant a `posted`
arrives) and started again on the same storage. Then, read back through the
daemon:

- every acknowledged `posted` is stored under its msg_id, unchanged;
- no idempotency key holds two messages, and a retry of every post that was
  never acknowledged stores it at most once;
- no delivery state went back, and no time once set changed, since any earlier
  check; every read the daemon acknowledged is still `read`;
- msg_ids are unique and sort in the order of their numbers;
- an agent's answer names a stored message, and the message it answers names it back.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import trio
from chinwag.clients import ChinwagError, Client, connect
from chinwag.protocol import DELIVERY_ORDER, Delivery, MailMessage
from test_crash import CONNECTION_GONE, _tail, storage_url  # noqa: F401  (the fixture)

CONFIG = """
[daemon]
shutdown_grace_s = 2.0

[agents.assistant]
provider = "echo"
description = "Echoes mail back to its author"
"""

WRITERS = ["ana", "bob", "cyd"]
ROUNDS = 4
MAX_KILL_DELAY_S = 0.4
ROUND_TIMEOUT_S = 30.0


@dataclass
class Ledger:
    """What the daemon acknowledged, and what the last check saw."""

    acked: dict[str, MailMessage] = field(default_factory=dict)  # msg_id -> as posted
    keys: dict[str, tuple[str, str, list[str]]] = field(default_factory=dict)  # key -> post
    read: set[tuple[str, str]] = field(default_factory=set)  # (msg_id, reader) acked read
    seen: dict[tuple[str, str], Delivery] = field(default_factory=dict)  # last check


@dataclass
class Round:
    number: int
    posted: trio.Event = field(default_factory=trio.Event)
    killed: bool = False


async def _write(
    socket_path: Path, me: str, rng: random.Random, ledger: Ledger, round_: Round
) -> None:
    try:
        async with connect(socket_path, client=f"crash-{me}") as c:
            for n in range(1_000_000):
                key = f"{me}-{round_.number}-{n}"
                to = rng.sample([w for w in WRITERS if w != me] + ["assistant"], rng.randint(1, 2))
                content = f"{key} {'x' * rng.randint(0, 40)}"
                ledger.keys[key] = (me, content, to)
                posted = await c.post(me, content, to=to, idempotency_key=key)
                ledger.acked[posted.msg_id] = MailMessage(
                    msg_id=posted.msg_id,
                    sender=me,
                    to=to,
                    recipients=posted.recipients,
                    content=content,
                    created_at=posted.created_at,
                    idempotency_key=key,
                )
                round_.posted.set()
                page = await c.inbox(me, unread_only=True, limit=5, mark_read=True)
                for item in page.items:
                    ledger.read.add((item.message.msg_id, me))
    except* CONNECTION_GONE:
        if not round_.killed:
            raise


async def _round(daemon: Any, rng: random.Random, ledger: Ledger, number: int) -> None:
    round_ = Round(number)
    right_after_posted = rng.random() < 0.5
    delay = rng.uniform(0, MAX_KILL_DELAY_S)
    seeds = [rng.getrandbits(64) for _ in WRITERS]
    with trio.fail_after(ROUND_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            for me, seed in zip(WRITERS, seeds, strict=True):
                nursery.start_soon(
                    _write, daemon.socket_path, me, random.Random(seed), ledger, round_
                )
            await round_.posted.wait()
            if not right_after_posted:
                await trio.sleep(delay)
            round_.killed = True
            daemon.proc.kill()
            await trio.to_thread.run_sync(daemon.proc.wait, 10)
        await trio.to_thread.run_sync(daemon.start)


async def _everything(c: Client) -> dict[str, tuple[MailMessage, list[Delivery]]]:
    """Every stored message (each written by a writer or the agent), with its deliveries."""
    found: dict[str, tuple[MailMessage, list[Delivery]]] = {}
    for author in [*WRITERS, "assistant"]:
        cursor = None
        while True:
            page = await c.sent(author, limit=500, cursor=cursor)
            for item in page.items:
                assert item.message.msg_id not in found, f"{item.message.msg_id} listed twice"
                found[item.message.msg_id] = (item.message, item.deliveries or [])
            cursor = page.next_cursor
            if cursor is None:
                break
    return found


def _problems(ledger: Ledger, stored: dict[str, tuple[MailMessage, list[Delivery]]]) -> list[str]:
    problems = []
    for msg_id, posted in ledger.acked.items():
        got = stored.get(msg_id)
        if got is None:
            problems.append(f"acknowledged {msg_id} ({posted.idempotency_key}) is gone")
            continue
        message = got[0]
        for name in ("sender", "content", "to", "recipients", "idempotency_key"):
            if getattr(message, name) != getattr(posted, name):
                problems.append(f"{msg_id}: {name} {getattr(message, name)!r} != posted")
    by_key: dict[str, list[str]] = {}
    for msg_id, (message, deliveries) in stored.items():
        if message.idempotency_key is not None:
            by_key.setdefault(message.idempotency_key, []).append(msg_id)
        for delivery in deliveries:
            before = ledger.seen.get((msg_id, delivery.name))
            if before is not None:
                if DELIVERY_ORDER[delivery.state] < DELIVERY_ORDER[before.state]:
                    problems.append(
                        f"{msg_id} for {delivery.name}: {before.state} -> {delivery.state}"
                    )
                for moment in ("delivered_at", "read_at"):
                    was = getattr(before, moment)
                    if was is not None and getattr(delivery, moment) != was:
                        problems.append(f"{msg_id} for {delivery.name}: {moment} changed")
            if (msg_id, delivery.name) in ledger.read and delivery.state != "read":
                problems.append(
                    f"{msg_id} for {delivery.name}: acknowledged read, now {delivery.state}"
                )
        if message.answered_by is not None:
            answer = stored.get(message.answered_by)
            if answer is None or answer[0].reply_to != msg_id:
                problems.append(f"{msg_id}: answered_by {message.answered_by} is not its answer")
    problems += [f"key {key} holds {ids}" for key, ids in by_key.items() if len(ids) > 1]
    numbers = sorted(stored)
    if numbers != sorted(stored, key=lambda m: int(m[1:])):
        problems.append("msg_ids do not sort as their numbers")
    return problems


async def _check(daemon: Any, ledger: Ledger, label: str) -> dict[str, Any]:
    async with connect(daemon.socket_path, client="crash-check") as c:
        stored = await _everything(c)
    problems = _problems(ledger, stored)
    if problems:
        raise AssertionError(
            f"{label}:\n  " + "\n  ".join(problems[:30]) + f"\n{_tail(daemon.log_path)}"
        )
    for msg_id, (_, deliveries) in stored.items():
        for delivery in deliveries:
            ledger.seen[(msg_id, delivery.name)] = delivery
    return stored


async def test_mail_survives_kill9(
    storage_url: str,  # noqa: F811  (the fixture imported from test_crash)
    daemon_factory: Any,
    crash_seed: int,
    request: Any,
) -> None:
    backend = request.node.callspec.params["storage_url"]
    daemon = daemon_factory(config=CONFIG, storage_url=storage_url, name="mail")
    rng = random.Random(crash_seed)
    ledger = Ledger()
    started_at = time.monotonic()
    for number in range(1, ROUNDS + 1):
        label = f"{backend}, seed {crash_seed}, round {number}"
        try:
            await _round(daemon, rng, ledger, number)
        except BaseException as exc:
            exc.add_note(f"{label}\n{_tail(daemon.log_path)}")
            raise
        await _check(daemon, ledger, label)
    # Every post that was never acknowledged, retried with its key: stored at most once.
    async with connect(daemon.socket_path, client="crash-retry") as c:
        acked_keys = {m.idempotency_key for m in ledger.acked.values()}
        for key, (me, content, to) in ledger.keys.items():
            if key not in acked_keys:
                try:
                    posted = await c.post(me, content, to=to, idempotency_key=key)
                except ChinwagError as exc:
                    raise AssertionError(f"retrying {key}: {exc}") from exc
                ledger.acked[posted.msg_id] = MailMessage(
                    msg_id=posted.msg_id,
                    sender=me,
                    to=to,
                    recipients=posted.recipients,
                    content=content,
                    created_at=posted.created_at,
                    idempotency_key=key,
                )
    stored = await _check(daemon, ledger, f"{backend}, seed {crash_seed}, after the retries")
    assert await anyio.to_thread.run_sync(daemon.stop) == 0, _tail(daemon.log_path)
    print(
        f"\n{backend}: {ROUNDS} kill -9 rounds of mail in {time.monotonic() - started_at:.1f} s,"
        f" seed {crash_seed}: {len(ledger.acked)} posts acknowledged, {len(stored)} stored,"
        f" {len(ledger.read)} reads acknowledged"
    )
