"""The postgres store's bus: messages between daemons, their liveness, who holds what.

Two stores on one schema stand for two daemons: each joins the bus with a
node that records what it hears.
"""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio
from chinwag.storage import Bus, PostgresStorage, Storage, open_store
from chinwag.storage._postgres_bus import PIECE_BYTES
from deadlines import deadline
from test_postgres import on_postgres, query


@dataclass
class Recorder:
    """A node that keeps what the bus tells it, and lets a test wait for it."""

    heard: list[tuple[str, str]] = field(default_factory=list)
    live: list[frozenset[str]] = field(default_factory=list)
    runs: int = 0
    changed: trio.Event = field(default_factory=trio.Event)

    def received(self, sender: str, text: str) -> None:
        self.heard.append((sender, text))
        self._wake()

    def peers_changed(self, live: frozenset[str]) -> None:
        self.live.append(live)
        self._wake()

    def runs_in_flight(self) -> int:
        return self.runs

    def _wake(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def hear(self, count: int) -> list[tuple[str, str]]:
        while len(self.heard) < count:
            await self.changed.wait()
        return self.heard

    async def see(self, live: frozenset[str]) -> None:
        while not self.live or self.live[-1] != live:
            await self.changed.wait()


@asynccontextmanager
async def joined(url: str, nursery: trio.Nursery) -> AsyncIterator[tuple[Storage, Bus, Recorder]]:
    async with open_store(url) as store:
        assert store.bus is not None
        node = Recorder()
        scope = trio.CancelScope()
        left = trio.Event()

        async def serve(task_status: trio.TaskStatus[None]) -> None:
            assert store.bus is not None
            try:
                with scope:
                    await store.bus.serve(
                        node,
                        host=socket.gethostname(),
                        pid=os.getpid(),
                        address="/tmp/x.sock",
                        task_status=task_status,
                    )
            finally:
                left.set()

        await nursery.start(serve)
        try:
            yield store, store.bus, node
        finally:
            scope.cancel()
            await left.wait()  # its row is gone: the daemon has left, as on shutdown


@on_postgres
async def test_messages_reach_one_daemon_in_order_and_every_daemon_when_broadcast(
    store_url: str,
) -> None:
    url = store_url
    with deadline(20, "the bus"):
        async with trio.open_nursery() as nursery:
            async with (
                joined(url, nursery) as (_, a, _a_node),
                joined(url, nursery) as (_, b, b_node),
                joined(url, nursery) as (_, _c, c_node),
            ):
                for n in range(50):
                    a.send(b.me, f"to b {n}")
                a.send(None, "everyone")
                heard = await b_node.hear(51)
                assert heard == [(a.me, f"to b {n}") for n in range(50)] + [(a.me, "everyone")]
                assert await c_node.hear(1) == [(a.me, "everyone")]
            nursery.cancel_scope.cancel()


@on_postgres
async def test_a_message_longer_than_a_notify_payload_arrives_whole(store_url: str) -> None:
    text = "é" * PIECE_BYTES * 3 + "🙂" * 5000 + "end"  # multibyte across every cut
    with deadline(20, "the bus"):
        async with trio.open_nursery() as nursery:
            async with (
                joined(store_url, nursery) as (_, a, _a_node),
                joined(store_url, nursery) as (_, b, b_node),
            ):
                a.send(b.me, text)
                a.send(b.me, "after")
                assert await b_node.hear(2) == [(a.me, text), (a.me, "after")]
            nursery.cancel_scope.cancel()


@on_postgres
async def test_identical_messages_are_not_folded_into_one(store_url: str) -> None:
    with deadline(20, "the bus"):
        async with trio.open_nursery() as nursery:
            async with (
                joined(store_url, nursery) as (_, a, _a_node),
                joined(store_url, nursery) as (_, b, b_node),
            ):
                for _ in range(3):
                    a.send(b.me, "same")
                assert await b_node.hear(3) == [(a.me, "same")] * 3
            nursery.cancel_scope.cancel()


@on_postgres
async def test_peers_list_the_live_daemons_and_a_leaving_one_is_seen_gone(store_url: str) -> None:
    with deadline(20, "the bus"):
        async with trio.open_nursery() as nursery:
            async with joined(store_url, nursery) as (_, a, a_node):
                a_node.runs = 2
                async with joined(store_url, nursery) as (_, b, _b_node):
                    await a_node.see(frozenset({a.me, b.me}))
                    peers = await a.peers()
                    assert [p.id for p in peers] == [a.me, b.me]
                    assert peers[0].pid == os.getpid() and peers[0].address == "/tmp/x.sock"
                assert [p.id for p in await a.peers()] == [a.me], "b's row went when it left"
                await a_node.see(frozenset({a.me}))
            nursery.cancel_scope.cancel()


@on_postgres
async def test_a_daemon_whose_connections_end_is_dead_at_once(store_url: str) -> None:
    """A daemon killed outright: its sessions end; the next read of the peers omits it
    although its beat is fresh."""
    with deadline(20, "the bus"):
        async with trio.open_nursery() as nursery:
            async with (
                joined(store_url, nursery) as (_, a, _a_node),
                joined(store_url, nursery) as (_, b, _b_node),
            ):
                query(
                    store_url,
                    "SELECT pg_terminate_backend(listen_pid) FROM daemons WHERE id = %s",
                    b.me,
                )
                assert b.me not in [p.id for p in await a.peers()]
            nursery.cancel_scope.cancel()


@on_postgres
async def test_holders_name_the_daemon_that_claimed_each_conversation(store_url: str) -> None:
    with deadline(20, "the bus"):
        async with trio.open_nursery() as nursery:
            async with (
                joined(store_url, nursery) as (store_a, a, _a_node),
                joined(store_url, nursery) as (store_b, b, _b_node),
            ):
                assert await store_a.claim("assistant", "u1")
                assert await store_b.claim("assistant", "u2")
                keys = [("assistant", "u1"), ("assistant", "u2"), ("assistant", "u3")]
                assert await b.holders(keys) == {keys[0]: a.me, keys[1]: b.me}
                await store_a.release("assistant", "u1")
                assert await a.holders(keys) == {keys[1]: b.me}
            nursery.cancel_scope.cancel()


@on_postgres
async def test_stores_in_other_schemas_never_hear_each_other(
    store_url: str, postgres_url: str
) -> None:
    with deadline(20, "the bus"):
        async with trio.open_nursery() as nursery:
            async with (
                joined(store_url, nursery) as (_, a, a_node),
                joined(postgres_url, nursery) as (_, elsewhere, other_node),
            ):
                elsewhere.send(None, "not for you")
                elsewhere.send(a.me, "nor this")
                async with joined(postgres_url, nursery) as (_, _c, c_node):
                    elsewhere.send(None, "for c")
                    assert await c_node.hear(1) == [(elsewhere.me, "for c")]
                assert a_node.heard == [] and other_node.heard == []
            nursery.cancel_scope.cancel()


async def test_a_store_alone_has_no_bus(tmp_path: Path) -> None:
    async with open_store(f"sqlite:///{tmp_path / 's.db'}") as store:
        assert store.bus is None
    assert PostgresStorage.shared
