"""Mail end to end: the real `chinwag serve` process on its default sqlite storage,
driven over its real socket by raw framed connections, each frame checked by a
client-side `Session` (docs/protocol.md section 14)."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio
from chinwag.protocol import (
    JSON,
    Cancel,
    Delivery,
    End,
    Error,
    FrameDecoder,
    GetHistory,
    GetMessage,
    GetThread,
    Hello,
    History,
    Inbox,
    ListParticipants,
    Mail,
    MessageReply,
    Messages,
    Participant,
    Participants,
    Ping,
    Pong,
    Post,
    Posted,
    Register,
    Registered,
    Request,
    Sent,
    ServerMsg,
    Session,
    Watch,
    Watching,
    Welcome,
)
from deadlines import FRAME_S, RUN_S, deadline, describe

BEFORE_ANY = "m000000000000"  # below every msg_id: a watch `after` it replays everything

MAIL_CONFIG = """
[daemon]
max_content_bytes = 100

[agents.assistant]
provider = "echo"
"""


def _id(msg: ServerMsg) -> int | None:
    return getattr(msg, "id", None)


class Peer:
    """One connection to the daemon's socket speaking as ``name``; frames a call is not
    waiting for (a watch's mail while a post is answered) are kept for the one that is."""

    def __init__(self, stream: trio.SocketStream, name: str) -> None:
        self.stream = stream
        self.name = name
        self.session = Session()
        self._decoder = FrameDecoder(1 << 30)
        self._ids = itertools.count(1)
        self._kept: list[ServerMsg] = []

    async def send(self, msg: Hello | Request) -> None:
        self.session.send_request(msg)
        await self.stream.send_all(JSON.encode_frame(msg))

    async def _next(self) -> ServerMsg:
        while (body := self._decoder.next_frame()) is None:
            data = await self.stream.receive_some(65536)
            if not data:
                raise AssertionError(f"the daemon closed {self.name}'s connection")
            self._decoder.feed(data)
        msg = JSON.decode_server(body)
        self.session.receive_reply(msg)
        return msg

    async def frame(self, wanted: Callable[[ServerMsg], bool], *, within: float = FRAME_S) -> Any:
        for at, msg in enumerate(self._kept):
            if wanted(msg):
                return self._kept.pop(at)
        with deadline(within, f"a frame for {self.name}", lambda: describe(self._kept)):
            while True:
                msg = await self._next()
                if wanted(msg):
                    return msg
                self._kept.append(msg)

    async def ask(self, kind: type[Request], /, **fields: Any) -> Any:
        msg = kind(id=next(self._ids), **fields)
        await self.send(msg)
        return await self.frame(lambda m: _id(m) == msg.id and not isinstance(m, (Mail, Watching)))

    async def register(self, **fields: Any) -> Participant:
        reply = await self.ask(Register, name=self.name, **fields)
        assert isinstance(reply, Registered), reply
        return reply.participant

    async def post(self, to: list[str], content: str, **fields: Any) -> Posted:
        reply = await self.ask(Post, sender=self.name, to=to, content=content, **fields)
        assert isinstance(reply, Posted), reply
        return reply

    async def refused(self, kind: type[Request], /, **fields: Any) -> Error:
        reply = await self.ask(kind, **fields)
        assert isinstance(reply, Error), reply
        return reply

    async def deliveries(self, msg_id: str) -> dict[str, Delivery]:
        reply = await self.ask(Sent, reader=self.name, limit=500)
        assert isinstance(reply, Messages), reply
        for item in reply.items:
            if item.message.msg_id == msg_id:
                return {d.name: d for d in item.deliveries}
        raise AssertionError(f"{msg_id} is not among {self.name}'s sent mail")

    async def watch(self, after: str | None = None, updates: bool = False) -> tuple[int, Watching]:
        rid = next(self._ids)
        await self.send(Watch(id=rid, reader=self.name, after=after, updates=updates))
        watching = await self.frame(lambda m: _id(m) == rid and isinstance(m, Watching))
        return rid, watching

    async def mails(self, rid: int, count: int, *, within: float = FRAME_S) -> list[Mail]:
        got = []
        for _ in range(count):
            msg = await self.frame(
                lambda m: _id(m) == rid and isinstance(m, (Mail, End, Error)), within=within
            )
            assert isinstance(msg, Mail), msg
            got.append(msg)
        return got


@asynccontextmanager
async def peer(socket_path: Path, name: str, *, register: bool = True) -> AsyncIterator[Peer]:
    stream = await trio.open_unix_socket(str(socket_path))
    async with stream:
        member = Peer(stream, name)
        await member.send(Hello(protocol=1, client="mail-e2e", features=["mail"]))
        welcome = await member.frame(lambda m: isinstance(m, Welcome))
        assert "mail" in welcome.features
        if register:
            await member.register(info={"session": f"{name}-session", "vendor": "test"})
        yield member


def ids(mails: list[Mail]) -> list[str]:
    return [m.msg_id for m in mails]


async def test_two_sessions_register_and_a_dm_is_pushed_then_read(daemon):
    async with peer(daemon.socket_path, "ana") as ana, peer(daemon.socket_path, "bob") as bob:
        listing = await ana.ask(ListParticipants, online_only=True)
        assert isinstance(listing, Participants)
        assert {p.name: p.kind for p in listing.items} == {
            "ana": "session",
            "assistant": "agent",
            "bob": "session",
            "helper": "agent",
        }
        # A third session may not take bob's name while bob's lives.
        async with peer(daemon.socket_path, "bob", register=False) as impostor:
            error = await impostor.refused(Register, name="bob", info={"session": "other"})
            assert error.code == 409 and "bob-session" in error.message

        rid, watching = await bob.watch()
        assert watching.cursor is None
        posted = await ana.post(["bob"], "the build is green", priority=2)
        (pushed,) = await bob.mails(rid, 1)
        assert pushed.msg_id == posted.msg_id
        assert (pushed.message.sender, pushed.message.content) == ("ana", "the build is green")
        delivered = (await ana.deliveries(posted.msg_id))["bob"]
        assert delivered.state == "delivered" and delivered.delivered_at is not None

        reply = await bob.ask(GetMessage, reader="bob", msg_id=posted.msg_id)
        assert isinstance(reply, MessageReply) and reply.state == "read"
        read = (await ana.deliveries(posted.msg_id))["bob"]
        assert read.state == "read" and read.read_at is not None
        assert read.delivered_at == delivered.delivered_at


async def test_mail_to_an_unregistered_name_waits_until_it_registers(daemon):
    async with peer(daemon.socket_path, "ana") as ana:
        posted = await ana.post(["carol"], "are you there?")
        assert posted.warnings == ["carol is not registered: it will get this when it does."]
        assert (await ana.deliveries(posted.msg_id))["carol"].state == "pending"
        async with peer(daemon.socket_path, "carol") as carol:
            rid, watching = await carol.watch(after=BEFORE_ANY)
            assert watching.cursor == posted.msg_id
            (waiting,) = await carol.mails(rid, 1)
            assert (waiting.msg_id, waiting.message.content) == (posted.msg_id, "are you there?")
            assert (await ana.deliveries(posted.msg_id))["carol"].state == "delivered"
            live = await ana.post(["carol"], "welcome")
            assert live.warnings == []
            assert ids(await carol.mails(rid, 1)) == [live.msg_id]


async def test_role_and_everyone_fan_out_to_every_watcher_but_the_author(daemon):
    path = daemon.socket_path
    async with (
        peer(path, "ana") as ana,
        peer(path, "bob") as bob,
        peer(path, "carol") as carol,
    ):
        await ana.register(roles=["reviewer"], info={"session": "ana-session"})
        await bob.register(roles=["reviewer"], info={"session": "bob-session"})
        watches = [(p, (await p.watch())[0]) for p in (ana, bob, carol)]
        review = await ana.post(["@reviewer"], "please review #42")
        assert review.recipients == ["bob"]
        standup = await carol.post(["@everyone"], "standup in 5")
        assert sorted(standup.recipients) == ["ana", "assistant", "bob", "helper"]
        control = await bob.post(["carol"], "control")
        (ana_watch, bob_watch, carol_watch) = watches
        assert ids(await bob_watch[0].mails(bob_watch[1], 2)) == [review.msg_id, standup.msg_id]
        assert ids(await ana_watch[0].mails(ana_watch[1], 1)) == [standup.msg_id]
        assert ids(await carol_watch[0].mails(carol_watch[1], 1)) == [control.msg_id]
        # The hosted agents got it in their inboxes, and no run started for it.
        listing = await ana.ask(GetHistory, agent="assistant", sender="carol")
        assert isinstance(listing, Error) and listing.code == 404


async def test_replies_thread_and_read_their_parent(daemon):
    async with peer(daemon.socket_path, "ana") as ana, peer(daemon.socket_path, "bob") as bob:
        parent = await ana.post(["bob"], "shall we ship?")
        answer = await bob.post([], "yes", reply_to=parent.msg_id)
        assert (answer.thread_id, answer.recipients) == (parent.msg_id, ["ana"])
        again = await ana.post([], "shipping", reply_to=answer.msg_id)
        assert (again.thread_id, again.recipients) == (parent.msg_id, ["bob"])
        assert (await ana.deliveries(parent.msg_id))["bob"].state == "read"
        thread = await bob.ask(GetThread, reader="bob", thread_id=parent.msg_id)
        assert isinstance(thread, Messages)
        assert [i.message.msg_id for i in thread.items] == [
            parent.msg_id,
            answer.msg_id,
            again.msg_id,
        ]
        assert all(i.message.thread_id == parent.msg_id for i in thread.items)


async def test_a_watcher_that_reconnects_with_after_gets_exactly_what_it_missed(daemon):
    path = daemon.socket_path
    async with peer(path, "bob") as bob, peer(path, "ana") as ana:
        rid, _ = await bob.watch()
        seen = [(await ana.post(["bob"], f"seen {n}")).msg_id for n in range(2)]
        assert ids(await bob.mails(rid, 2)) == seen
        await bob.send(Cancel(id=99, target=rid))
        await bob.frame(lambda m: _id(m) == rid and isinstance(m, End))
    async with peer(path, "ana") as ana:
        missed = []
        for n in range(3):
            missed.append((await ana.post(["bob"], f"missed {n}")).msg_id)
            await ana.post(["carol"], "not for bob")
    # What was missed is durable: it survives a restart of the daemon.
    daemon.restart()
    async with peer(path, "bob") as bob, peer(path, "ana") as ana:
        rid, watching = await bob.watch(after=seen[-1])
        assert watching.cursor == missed[-1]
        assert ids(await bob.mails(rid, 3)) == missed
        live = await ana.post(["bob"], "live")
        assert ids(await bob.mails(rid, 1)) == [live.msg_id], "nothing twice, nothing between"


async def test_a_dm_to_the_echo_agent_gets_its_threaded_reply(daemon):
    async with peer(daemon.socket_path, "ana") as ana:
        rid, _ = await ana.watch()
        asked = await ana.post(["assistant"], "the sky is teal today")
        (answer,) = await ana.mails(rid, 1, within=RUN_S)
        message = answer.message
        assert (message.sender, message.content) == ("assistant", "the sky is teal today")
        assert (message.reply_to, message.thread_id) == (asked.msg_id, asked.msg_id)
        assert message.run_id is not None
        reply = await ana.ask(Sent, reader="ana")
        assert isinstance(reply, Messages)
        (item,) = [i for i in reply.items if i.message.msg_id == asked.msg_id]
        assert item.message.answered_by == answer.msg_id
        assert [(d.name, d.state) for d in item.deliveries] == [("assistant", "read")]
        history = await ana.ask(GetHistory, agent="assistant", sender="ana")
        assert isinstance(history, History)
        assert [e.content for e in history.entries] == ["the sky is teal today"] * 2


async def test_bad_mail_gets_400_or_413_and_other_connections_keep_working(daemon_factory):
    daemon = daemon_factory(MAIL_CONFIG)
    path = daemon.socket_path
    async with peer(path, "bob") as bob, peer(path, "ana") as ana:
        rid, _ = await bob.watch()
        cases: list[tuple[dict[str, Any], int]] = [
            ({"to": []}, 400),
            ({"format": "json", "content": "{not json"}, 400),
            ({"priority": 7}, 400),
            ({"content": "é" * 51}, 413),  # 102 bytes, over max_content_bytes of 100
        ]
        for fields, code in cases:
            post = {"sender": "ana", "to": ["bob"], "content": "hi", **fields}
            error = await ana.refused(Post, **post)
            assert error.code == code, (fields, error)
            assert error.message.endswith("."), error.message
            assert isinstance(await bob.ask(Ping), Pong)
        # A body that is no message at all: its own connection gets 400 and is closed.
        async with peer(path, "mallory", register=False) as mallory:
            body = b'{"type": "post", "id": 1, "from": "mallory", "to": ["bob"], "content": '
            await mallory.stream.send_all(len(body).to_bytes(4, "big") + body)
            error = await mallory.frame(lambda m: isinstance(m, Error))
            assert (error.id, error.code) == (None, 400)
            assert await mallory.stream.receive_some(65536) == b""
        # A post whose priority is not a number: 400 with its id, the connection lives.
        ana.session.send_request(Post(id=50, sender="ana", to=["bob"], content="x"))
        body = (
            b'{"type": "post", "id": 50, "from": "ana", "to": ["bob"], "content": "x",'
            b' "priority": "high"}'
        )
        await ana.stream.send_all(len(body).to_bytes(4, "big") + body)
        error = await ana.frame(lambda m: isinstance(m, Error) and m.id == 50)
        assert error.code == 400
        # Nothing of it was stored, and the watch still gets good mail at once.
        good = await ana.post(["bob"], "x" * 100)
        (pushed,) = await bob.mails(rid, 1)
        assert pushed.msg_id == good.msg_id
        inbox = await bob.ask(Inbox, reader="bob")
        assert isinstance(inbox, Messages)
        assert [i.message.msg_id for i in inbox.items] == [good.msg_id]
