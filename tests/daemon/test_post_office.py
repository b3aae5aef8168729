"""Mail through the whole daemon in process: clients on memory streams speaking framed
JSON to a `Server` whose post office is started (docs/protocol.md section 14).

Each test's participants speak through their own connections (`Party`), checked
frame by frame by a client-side `Session`. Time is the autojump clock's: the
memory store and the echo model use no worker thread, so a wait that never ends
fails at once at its deadline. Nothing waits by sleeping: a test waits for the
frame that shows what it awaits (a `mail` on a watch, a `posted`, an `end`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
import trio
import trio.testing
from chinwag.daemon import _post_office
from chinwag.daemon._config import AgentConfig
from chinwag.protocol import (
    Cancel,
    Delivery,
    End,
    Error,
    GetContext,
    GetHistory,
    GetMessage,
    GetThread,
    Heartbeat,
    History,
    Inbox,
    ListParticipants,
    Mail,
    MailContext,
    MailItem,
    MailMessage,
    MarkRead,
    MessageReply,
    Messages,
    Ok,
    Participant,
    Participants,
    Ping,
    Pong,
    Post,
    Posted,
    Ref,
    Register,
    Registered,
    Request,
    Sent,
    ServerMsg,
    Watch,
    Watching,
)
from deadlines import deadline
from structlog.testing import capture_logs
from test_connection import Client, Closed, Daemon, open_daemon, served_within

BEFORE_ANY = "m000000000000"  # a msg_id below every message: `after` it replays everything


def _id(msg: ServerMsg) -> int | None:
    return getattr(msg, "id", None)


class Party:
    """One connection speaking as ``name``. Frames it is not awaiting yet (a watch's mail
    while a post is answered) are kept for the call that wants them."""

    def __init__(self, client: Client, name: str) -> None:
        self.client = client
        self.name = name
        self._ids = itertools.count(1)
        self._kept: list[ServerMsg] = []

    def rid(self) -> int:
        return next(self._ids)

    async def frame(self, wanted: Callable[[ServerMsg], bool]) -> ServerMsg:
        for at, msg in enumerate(self._kept):
            if wanted(msg):
                return self._kept.pop(at)
        while True:
            msg = await self.client.next()
            if msg is None:
                raise Closed(f"closed while {self.name} waited; kept {self._kept}")
            if wanted(msg):
                return msg
            self._kept.append(msg)

    async def ask(self, kind: type[Request], /, **fields: Any) -> ServerMsg:
        """Send one request; its terminal frame."""
        msg = kind(id=self.rid(), **fields)
        await self.client.send(msg)
        return await self.frame(lambda m: _id(m) == msg.id and not isinstance(m, (Mail, Watching)))

    async def register(self, **fields: Any) -> Participant:
        reply = await self.ask(Register, name=fields.pop("name", self.name), **fields)
        assert isinstance(reply, Registered), reply
        return reply.participant

    async def post(self, to: list[str], content: str = "hello", **fields: Any) -> Posted:
        fields.setdefault("sender", self.name)
        reply = await self.ask(Post, to=to, content=content, **fields)
        assert isinstance(reply, Posted), reply
        return reply

    async def refused(self, kind: type[Request], /, **fields: Any) -> Error:
        reply = await self.ask(kind, **fields)
        assert isinstance(reply, Error), reply
        return reply

    async def inbox(self, **fields: Any) -> Messages:
        reply = await self.ask(Inbox, reader=fields.pop("reader", self.name), **fields)
        assert isinstance(reply, Messages), reply
        return reply

    async def sent(self, **fields: Any) -> list[MailItem]:
        reply = await self.ask(Sent, reader=self.name, **fields)
        assert isinstance(reply, Messages), reply
        return reply.items

    async def deliveries(self, msg_id: str) -> dict[str, Delivery]:
        """The recipients' deliveries of a message this party wrote, by name."""
        for item in await self.sent(limit=500):
            if item.message.msg_id == msg_id:
                assert item.deliveries is not None
                return {d.name: d for d in item.deliveries}
        raise AssertionError(f"{msg_id} is not among {self.name}'s sent mail")

    async def participants(self, **fields: Any) -> dict[str, Participant]:
        reply = await self.ask(ListParticipants, **fields)
        assert isinstance(reply, Participants), reply
        return {p.name: p for p in reply.items}

    async def ok(self, kind: type[Request], /, **fields: Any) -> None:
        reply = await self.ask(kind, **fields)
        assert isinstance(reply, Ok), reply

    async def watch(self, after: str | None = None, updates: bool = False) -> tuple[int, Watching]:
        rid = await self.start_watch(after, updates)
        watching = await self.frame(lambda m: _id(m) == rid and isinstance(m, Watching))
        assert isinstance(watching, Watching)
        return rid, watching

    async def start_watch(self, after: str | None = None, updates: bool = False) -> int:
        rid = self.rid()
        await self.client.send(Watch(id=rid, reader=self.name, after=after, updates=updates))
        return rid

    async def mail(self, rid: int) -> Mail:
        """The next message pushed to the watch ``rid``."""
        msg = await self.frame(lambda m: _id(m) == rid and isinstance(m, (Mail, End, Error)))
        assert isinstance(msg, Mail), msg
        return msg

    async def mails(self, rid: int, count: int) -> list[str]:
        return [(await self.mail(rid)).msg_id for _ in range(count)]

    async def unwatch(self, rid: int) -> End:
        await self.client.send(Cancel(id=self.rid(), target=rid))
        end = await self.frame(lambda m: _id(m) == rid and isinstance(m, End))
        assert isinstance(end, End) and end.status == "detached", end
        return end

    async def close(self) -> None:
        await self.client.stream.aclose()
        await served_within(self.client, 5)


async def party(daemon: Daemon, name: str, *, register: bool = True, **fields: Any) -> Party:
    """A new connection speaking as ``name``, registered unless told otherwise."""
    member = Party(await daemon.connected("mail"), name)
    if register:
        await member.register(**fields)
    return member


def msg_number(n: int) -> str:
    return f"m{n:012d}"


# --- register, heartbeat, participants -----------------------------------------------------


async def test_register_answers_the_participant_folded_and_online(autojump_clock):
    async with open_daemon() as daemon:
        ana = Party(await daemon.connected("mail"), "ana")
        info = {"session": "s-1", "vendor": "claude-code", "pid": 4242, "cwd": "/home/ana"}
        participant = await ana.register(
            name="Ana", kind="person", roles=["Reviewer", "ops", "ops"], info=info
        )
        assert (participant.name, participant.kind, participant.roles) == (
            "ana",
            "person",
            ["ops", "reviewer"],
        )
        assert participant.online and participant.info == info and participant.unread == 0
        assert participant.last_seen is not None
        # A second register on the same connection is a refresh, not a conflict.
        again = await ana.register(name="ana", info={"session": "s-9"})
        assert again.info == {"session": "s-9"} and again.roles == []


async def test_a_name_held_by_another_live_session_is_409_naming_it_until_taken_over(
    autojump_clock,
):
    async with open_daemon() as daemon:
        first = await party(
            daemon,
            "ana",
            info={"session": "s-1", "vendor": "claude-code", "pid": 4242, "cwd": "/home/ana"},
        )
        second = Party(await daemon.connected("mail"), "ana")
        error = await second.refused(Register, name="ana", info={"session": "s-2"})
        assert error.code == 409
        for detail in ("ana", "s-1", "claude-code", "4242", "/home/ana", "takeover"):
            assert detail in error.message, error.message
        # Nothing changed for the holder.
        assert (await first.participants())["ana"].info["session"] == "s-1"

        taken = await second.register(info={"session": "s-2"}, takeover=True)
        assert taken.online and taken.info == {"session": "s-2"}
        # The first connection closing no longer ends the registration: it moved.
        await first.close()
        assert (await second.participants(online_only=True))["ana"].online

        # The same info.session (a reconnect of the holder) takes it over without asking.
        third = Party(await daemon.connected("mail"), "ana")
        assert (await third.register(info={"session": "s-2", "pid": 7})).info["pid"] == 7
        await third.close()
        # ...and the registration went with it.
        assert not (await second.participants())["ana"].online


async def test_a_registration_silent_for_30_minutes_is_taken_without_asking(autojump_clock):
    async with open_daemon() as daemon:
        holder = await party(daemon, "ana", info={"session": "s-1"})
        other = Party(await daemon.connected("mail"), "ana")
        await trio.sleep(29 * 60)
        await holder.ok(Heartbeat, name="ana")  # refreshes it: 30 minutes from now
        await trio.sleep(29 * 60)
        assert (await other.refused(Register, name="ana", info={"session": "s-2"})).code == 409
        await trio.sleep(2 * 60)
        assert (await other.register(info={"session": "s-2"})).info == {"session": "s-2"}


@pytest.mark.parametrize(
    "name",
    ["everyone", "All", "daemon", "SYSTEM", "chinwag", "", "-ana", "a" * 65, "ana bob", "ána"],
)
async def test_reserved_and_malformed_names_are_400(name, autojump_clock):
    async with open_daemon() as daemon:
        someone = Party(await daemon.connected("mail"), "x")
        assert (await someone.refused(Register, name=name)).code == 400
        assert (await someone.refused(Register, name="bob", roles=[name])).code == 400
        assert (await someone.refused(Post, sender=name, to=["bob"], content="hi")).code == 400
        assert (await someone.refused(Inbox, reader=name)).code == 400
        assert set(await someone.participants()) == {"assistant"}, "nothing was registered"


async def test_a_role_may_not_be_a_name_nor_a_name_a_role(autojump_clock):
    async with open_daemon() as daemon:
        ana = await party(daemon, "ana", roles=["reviewer"])
        bob = Party(await daemon.connected("mail"), "bob")
        error = await bob.refused(Register, name="bob", roles=["ana"])
        assert error.code == 409 and "ana" in error.message
        assert (await bob.refused(Register, name="bob", roles=["bob"])).code == 409
        error = await bob.refused(Register, name="reviewer")
        assert error.code == 409 and "role" in error.message
        # A hosted agent's name is its own; kind agent is for hosted agents only.
        assert (await bob.refused(Register, name="assistant")).code == 409
        assert (await bob.refused(Register, name="bob", kind="agent")).code == 400
        # Nor does mail to a role written without its @ make a participant of that name.
        error = await bob.refused(Post, sender="bob", to=["Reviewer"], content="hi")
        assert error.code == 409 and "@reviewer" in error.message
        assert set(await ana.participants()) == {"ana", "assistant"}
        assert (await bob.register(roles=["reviewer"])).roles == ["reviewer"]
        assert (await bob.post(["@reviewer"], "hi")).recipients == ["ana"]


async def test_heartbeat_sets_the_status_line_and_last_seen(autojump_clock):
    async with open_daemon() as daemon:
        ana = await party(daemon, "ana")
        before = (await ana.participants())["ana"]
        await ana.ok(Heartbeat, name="ana", status="reviewing auth module")
        after = (await ana.participants())["ana"]
        assert after.status == "reviewing auth module"
        assert before.last_seen is not None and after.last_seen is not None
        assert after.last_seen >= before.last_seen
        await ana.ok(Heartbeat, name="ANA")  # no status: the line stays
        assert (await ana.participants())["ana"].status == "reviewing auth module"
        await ana.ok(Heartbeat, name="ana", status="")
        assert (await ana.participants())["ana"].status == ""
        assert (await ana.refused(Heartbeat, name="nobody")).code == 404
        assert (await ana.refused(Heartbeat, name="ana", status="x" * 501)).code == 400


async def test_participants_show_presence_roles_and_unread(autojump_clock):
    async with open_daemon() as daemon:
        ana = await party(daemon, "ana", roles=["reviewer"])
        bob = await party(daemon, "bob", roles=["reviewer", "ops"])
        carol = await party(daemon, "carol")
        await carol.post(["ana"], "one")
        await carol.post(["ana", "bob"], "two")

        everyone = await carol.participants()
        assert sorted(everyone) == ["ana", "assistant", "bob", "carol"]
        assert {n: p.online for n, p in everyone.items()} == dict.fromkeys(everyone, True)
        assert {n: p.unread for n, p in everyone.items()} == {
            "ana": 2,
            "assistant": 0,
            "bob": 1,
            "carol": 0,
        }
        assert everyone["assistant"].kind == "agent"
        assert sorted(await carol.participants(role="reviewer")) == ["ana", "bob"]
        assert sorted(await carol.participants(role="@OPS")) == ["bob"]
        assert await carol.participants(role="nobody") == {}

        await ana.close()  # her registration ends; she and her mail stay
        after = await carol.participants()
        assert not after["ana"].online and after["ana"].unread == 2
        assert after["assistant"].online, "a hosted agent is always online"
        assert sorted(await carol.participants(online_only=True)) == ["assistant", "bob", "carol"]
        assert sorted(await carol.participants(online_only=True, role="reviewer")) == ["bob"]

        # Reading as ana needs no registration; her unread count follows.
        await bob.ok(MarkRead, reader="ana", all=True)
        assert (await carol.participants())["ana"].unread == 0


# --- posting ----------------------------------------------------------------------------------

BAD_POSTS: list[tuple[dict[str, Any], int]] = [
    ({"to": []}, 400),
    ({"priority": 7}, 400),
    ({"priority": -1}, 400),
    ({"format": "json", "content": "{not json"}, 400),
    ({"content": "   "}, 400),
    ({"to": ["bob", "@nosuchrole"]}, 404),
    ({"to": ["bob", "#general"]}, 404),
    ({"to": ["bob", "everyone"]}, 400),  # reserved: @everyone is the broadcast
    ({"mentions": ["@everyone"]}, 400),
    ({"mentions": ["@ghost"]}, 404),
    ({"reply_to": "m000000000099"}, 404),
    ({"channel": "c" * 65}, 400),
    ({"idempotency_key": "k" * 201}, 400),
    ({"scopes": [Ref(type="", value="auth")]}, 400),
    ({"refs": [Ref(type="pr", value="")]}, 400),
    ({"to": ["bob"] * 257}, 400),
]


@pytest.mark.parametrize(
    ("fields", "code"), BAD_POSTS, ids=[",".join(f) + f"-{c}" for f, c in BAD_POSTS]
)
async def test_a_post_that_fails_a_check_stores_nothing(fields, code, autojump_clock):
    async with open_daemon() as daemon:
        ana = await party(daemon, "ana")
        post = {"sender": "ana", "to": ["bob", "carol"], "content": "hello", **fields}
        error = await ana.refused(Post, **post)
        assert error.code == code, error
        assert await ana.sent() == []
        assert (await ana.inbox(reader="bob")).items == []
        assert set(await ana.participants()) == {"ana", "assistant"}, "no name became one"
        # The same post without the fault goes through.
        assert (await ana.post(["bob"], "hello")).recipients == ["bob"]


async def test_content_over_max_content_bytes_is_413_and_the_connection_goes_on(autojump_clock):
    async with open_daemon(max_content_bytes=16) as daemon:
        ana = await party(daemon, "ana")
        error = await ana.refused(Post, sender="ana", to=["bob"], content="é" * 9)  # 18 bytes
        assert error.code == 413
        assert await ana.sent() == []
        assert (await ana.post(["bob"], "é" * 8)).recipients == ["bob"]


async def test_a_json_body_and_every_field_are_stored_as_given(autojump_clock):
    async with open_daemon() as daemon:
        ana = await party(daemon, "ana")
        bob = await party(daemon, "bob")
        rid, _ = await bob.watch()
        fields: dict[str, Any] = {
            "format": "json",
            "structured": {"build": 12, "ok": True},
            "priority": 3,
            "channel": "ci",
            "scopes": [Ref(type="module", value="auth")],
            "refs": [Ref(type="pr", value="7")],
            "metadata": {"branch": "main"},
        }
        posted = await ana.post(["bob"], '{"build": 12}', **fields)
        message = (await bob.mail(rid)).message
        assert (message.msg_id, message.created_at) == (posted.msg_id, posted.created_at)
        assert (message.sender, message.to, message.recipients) == ("ana", ["bob"], ["bob"])
        assert message.content == '{"build": 12}'
        for name, value in fields.items():
            assert getattr(message, name) == value, name
        assert (message.thread_id, message.reply_to, message.version) == (None, None, 1)


# --- delivery ---------------------------------------------------------------------------------


async def test_a_dm_is_pushed_to_its_watcher_and_stored_delivered(autojump_clock):
    async with open_daemon() as daemon:
        ana = await party(daemon, "ana")
        bob = await party(daemon, "bob")
        rid, watching = await bob.watch()
        assert watching.cursor is None
        posted = await ana.post(["Bob"], "the build is green")
        assert (posted.recipients, posted.warnings, posted.thread_id) == (["bob"], [], None)
        pushed = await bob.mail(rid)
        assert pushed.msg_id == posted.msg_id == pushed.message.msg_id
        assert (pushed.message.sender, pushed.message.content) == ("ana", "the build is green")
        bob_copy = (await ana.deliveries(posted.msg_id))["bob"]
        assert bob_copy.state == "delivered" and bob_copy.delivered_at is not None
        assert bob_copy.delivered_at == pushed.message.created_at, "stored delivered"
        # Watching is independent of registering: an unregistered name watches too,
        # and stays offline.
        carol = await party(daemon, "carol", register=False)
        carol_rid, _ = await carol.watch()
        to_carol = await ana.post(["carol"], "hi carol")
        assert to_carol.warnings  # not registered
        assert (await carol.mail(carol_rid)).msg_id == to_carol.msg_id
        assert not (await ana.participants())["carol"].online


async def test_sent_shows_each_copy_pending_then_delivered_then_read(autojump_clock):
    async with open_daemon() as daemon:
        ana = await party(daemon, "ana")
        bob = await party(daemon, "bob")
        first = await ana.post(["bob"], "first")
        second = await ana.post(["bob"], "second")
        for posted in (first, second):
            copy = (await ana.deliveries(posted.msg_id))["bob"]
            assert (copy.state, copy.delivered_at, copy.read_at) == ("pending", None, None)

        page = await bob.inbox()
        assert [(i.message.msg_id, i.state) for i in page.items] == [
            (second.msg_id, "delivered"),
            (first.msg_id, "delivered"),
        ]
        assert page.unread == 2
        copy = (await ana.deliveries(first.msg_id))["bob"]
        assert copy.state == "delivered" and copy.delivered_at is not None and copy.read_at is None

        reply = await bob.ask(GetMessage, reader="bob", msg_id=first.msg_id)
        assert isinstance(reply, MessageReply) and reply.state == "read"
        read = (await ana.deliveries(first.msg_id))["bob"]
        assert read.state == "read" and read.read_at is not None
        assert read.delivered_at == copy.delivered_at, "a step's time is never rewritten"

        await bob.ok(MarkRead, reader="bob", msg_ids=[second.msg_id])
        assert (await ana.deliveries(second.msg_id))["bob"].state == "read"
        # Never back: reading the inbox again leaves both read.
        assert {i.state for i in (await bob.inbox()).items} == {"read"}
        assert (await bob.inbox()).unread == 0
        # The author reads it too, without becoming a recipient.
        mine = await ana.ask(GetMessage, reader="ana", msg_id=first.msg_id)
        assert isinstance(mine, MessageReply) and mine.state is None
        # Someone else may not.
        assert (await ana.refused(GetMessage, reader="carol", msg_id=first.msg_id)).code == 404


async def test_mark_read_takes_exactly_one_selection(autojump_clock):
    async with open_daemon() as daemon:
        ana = await party(daemon, "ana")
        first = await ana.post(["bob"], "first")
        await ana.post(["bob"], "second", reply_to=first.msg_id)
        for fields in ({}, {"all": True, "msg_ids": [first.msg_id]}):
            assert (await ana.refused(MarkRead, reader="bob", **fields)).code == 400
        await ana.ok(MarkRead, reader="bob", thread_id=first.msg_id)
        assert (await ana.inbox(reader="bob", unread_only=True)).items == []


async def test_mail_to_a_name_never_seen_waits_then_reaches_its_watch(autojump_clock):
    async with open_daemon() as daemon:
        ana = await party(daemon, "ana")
        posted = await ana.post(["Carol"], "are you there?")
        assert posted.recipients == ["carol"]
        assert posted.warnings == ["carol is not registered: it will get this when it does."]
        carol_now = (await ana.participants())["carol"]
        assert (carol_now.kind, carol_now.online, carol_now.unread) == ("session", False, 1)
        assert (await ana.deliveries(posted.msg_id))["carol"].state == "pending"
        # Known now: no warning the second time.
        assert (await ana.post(["carol"], "still there?")).warnings == []

        carol = await party(daemon, "carol")
        rid, watching = await carol.watch(after=BEFORE_ANY)
        assert watching.cursor == msg_number(2)
        assert await carol.mails(rid, 2) == [posted.msg_id, msg_number(2)]
        assert (await ana.deliveries(posted.msg_id))["carol"].state == "delivered"
        live = await ana.post(["carol"], "welcome")
        assert await carol.mails(rid, 1) == [live.msg_id]


async def test_role_and_everyone_fan_out_without_the_author(autojump_clock):
    async with open_daemon() as daemon:
        ana = await party(daemon, "ana", roles=["reviewer"])
        bob = await party(daemon, "bob", roles=["reviewer"])
        carol = await party(daemon, "carol")
        await ana.post(["dave"], "a name written to is a participant")
        watches = {p.name: (p, (await p.watch())[0]) for p in (ana, bob, carol)}

        to_role = await ana.post(["@Reviewer"], "please review")
        assert to_role.recipients == ["bob"]
        assert (await ana.deliveries(to_role.msg_id))["bob"].mentioned

        everyone = await carol.post(["@everyone"], "standup in 5")
        assert sorted(everyone.recipients) == ["ana", "assistant", "bob", "dave"]
        copies = await carol.deliveries(everyone.msg_id)
        assert not any(d.mentioned for d in copies.values())
        assert copies["dave"].state == "pending" and copies["ana"].state == "delivered"

        # A role in `mentions` adds its holders, mentioned; a name is reached once.
        mixed = await carol.post(["bob", "@reviewer"], "both", mentions=["@reviewer"])
        assert mixed.recipients == ["bob", "ana"]

        member, rid = watches["bob"]
        assert await member.mails(rid, 3) == [to_role.msg_id, everyone.msg_id, mixed.msg_id]
        member, rid = watches["ana"]
        assert await member.mails(rid, 2) == [everyone.msg_id, mixed.msg_id]
        member, rid = watches["carol"]
        # Carol wrote the last two: her watch gets nothing until mail for her comes.
        control = await ana.post(["carol"], "control")
        assert await member.mails(rid, 1) == [control.msg_id]

        mentioned = await bob.inbox(mentions_only=True)
        assert [i.message.msg_id for i in mentioned.items] == [mixed.msg_id, to_role.msg_id]


async def test_replies_thread_under_their_parent(autojump_clock):
    async with open_daemon() as daemon:
        ana = await party(daemon, "ana")
        bob = await party(daemon, "bob")
        carol = await party(daemon, "carol")
        parent = await ana.post(["bob", "carol"], "shall we ship?")
        assert parent.thread_id is None

        answer = await bob.post([], "yes", reply_to=parent.msg_id)
        assert (answer.thread_id, answer.recipients) == (parent.msg_id, ["ana"])
        got = await ana.ask(GetMessage, reader="ana", msg_id=parent.msg_id)
        assert isinstance(got, MessageReply) and got.message.thread_id == parent.msg_id
        copies = await ana.deliveries(parent.msg_id)
        assert copies["bob"].state == "read", "replying reads the parent"
        assert copies["carol"].state == "pending"

        deeper = await ana.post([], "good", reply_to=answer.msg_id)
        assert (deeper.thread_id, deeper.recipients) == (parent.msg_id, ["bob"])
        # The author replying to her own message writes to its recipients.
        own = await ana.post([], "carol?", reply_to=parent.msg_id)
        assert (own.thread_id, own.recipients) == (parent.msg_id, ["bob", "carol"])
        # A `to` given wins over the parent's author.
        aside = await carol.post(["bob"], "aside", reply_to=parent.msg_id)
        assert (aside.thread_id, aside.recipients) == (parent.msg_id, ["bob"])

        thread = await bob.ask(GetThread, reader="bob", thread_id=parent.msg_id)
        assert isinstance(thread, Messages)
        ids = [parent, answer, deeper, own, aside]
        assert [i.message.msg_id for i in thread.items] == [p.msg_id for p in ids]
        assert [i.state for i in thread.items] == ["read", None, "pending", "pending", "pending"]
        # Carol sees the thread's messages she wrote or received, and nothing else.
        mine = await carol.ask(GetThread, reader="carol", thread_id=parent.msg_id)
        assert isinstance(mine, Messages)
        assert [i.message.msg_id for i in mine.items] == [parent.msg_id, own.msg_id, aside.msg_id]
        dave = await party(daemon, "dave")
        assert (await dave.refused(GetThread, reader="dave", thread_id=parent.msg_id)).code == 404
        refused = await dave.refused(
            Post, sender="dave", to=[], content="me", reply_to=answer.msg_id
        )
        assert refused.code == 404


async def test_a_retry_with_the_same_idempotency_key_returns_the_first_posted(autojump_clock):
    async with open_daemon() as daemon:
        ana = await party(daemon, "ana")
        first = await ana.post(["bob"], "deploying", idempotency_key="deploy-7")
        assert first.warnings  # bob is not registered
        retry = await ana.post(["bob", "carol"], "deploying!", idempotency_key="deploy-7")
        assert (retry.msg_id, retry.created_at, retry.recipients) == (
            first.msg_id,
            first.created_at,
            ["bob"],
        )
        assert retry.warnings == []
        assert [i.message.content for i in await ana.sent()] == ["deploying"]
        assert set(await ana.participants()) == {"ana", "assistant", "bob"}
        # The key is the author's own: another author's is another message.
        other = await party(daemon, "zed")
        assert (await other.post(["bob"], "hi", idempotency_key="deploy-7")).msg_id != first.msg_id


async def test_the_inbox_filters_and_pages_newest_first(autojump_clock):
    async with open_daemon() as daemon:
        ana = await party(daemon, "ana", roles=["lead"])
        bob = await party(daemon, "bob", roles=["dev"])
        plain = [(await ana.post(["bob"], f"note {n}")).msg_id for n in range(4)]
        urgent = (await ana.post(["bob"], "prod is down", priority=3, channel="ops")).msg_id
        scoped = (
            await ana.post(["bob"], "auth", scopes=[Ref(type="module", value="auth")], priority=2)
        ).msg_id
        mention = (await ana.post(["@dev"], "dev, look")).msg_id
        reply = (await ana.post([], "more", reply_to=plain[0])).msg_id
        everything = [*plain, urgent, scoped, mention, reply][::-1]

        pages: list[str] = []
        cursor = None
        while True:
            page = await bob.inbox(limit=3, cursor=cursor)
            assert len(page.items) <= 3 and page.unread == 8
            pages.extend(i.message.msg_id for i in page.items)
            cursor = page.next_cursor
            if cursor is None:
                break
            assert cursor == page.items[-1].message.msg_id
        assert pages == everything

        async def ids(**query: Any) -> list[str]:
            return [i.message.msg_id for i in (await bob.inbox(**query)).items]

        assert await ids(priority_min=2) == [scoped, urgent]
        assert await ids(channel="ops") == [urgent]
        assert await ids(scope="module:auth") == [scoped]
        assert await ids(mentions_only=True) == [mention]
        assert await ids(thread_id=plain[0]) == [reply, plain[0]]
        assert await ids(since="1h") == everything
        assert await ids(since="2999-01-01T00:00:00Z") == []
        assert await ids(priority_min=2, channel="ops") == [urgent]

        page = await bob.inbox(limit=2, mark_read=True)
        assert [i.state for i in page.items] == ["read", "read"]
        assert page.unread == 6
        assert await ids(unread_only=True) == everything[2:]

        for fields in (
            {"cursor": "not-a-cursor"},
            {"limit": 0},
            {"limit": 501},
            {"scope": "auth"},
            {"since": "yesterday"},
            {"since": "2024-05-01T12:00:00"},  # no zone
        ):
            error = await bob.refused(Inbox, reader="bob", **fields)
            assert error.code == 400, fields


async def test_context_counts_unread_by_priority_and_lists_open_threads(autojump_clock):
    async with open_daemon() as daemon:
        ana = await party(daemon, "ana")
        bob = await party(daemon, "bob")
        parent = await ana.post(["bob"], "topic")
        await ana.post([], "more on it", reply_to=parent.msg_id, priority=3)
        alone = await ana.post(["bob"], "alone", priority=0)
        context = await bob.ask(GetContext, reader="bob")
        assert isinstance(context, MailContext)
        assert (context.name, context.unread, context.unread_by_priority) == (
            "bob",
            3,
            {0: 1, 1: 1, 3: 1},
        )
        threads = {t.thread_id: t.unread for t in context.threads}
        assert threads == {parent.msg_id: 2, alone.msg_id: 1}
        assert context.participant is not None and context.participant.unread == 3
        nobody = await bob.ask(GetContext, reader="nobody")
        assert isinstance(nobody, MailContext) and nobody.participant is None


# --- watching ----------------------------------------------------------------------------------


async def test_a_watch_after_replays_exactly_what_was_missed_then_live_mail(
    monkeypatch, autojump_clock
):
    monkeypatch.setattr(_post_office, "REPLAY_PAGE", 2)  # the replay takes several pages
    async with open_daemon() as daemon:
        ana = await party(daemon, "ana")
        bob = await party(daemon, "bob")
        rid, _ = await bob.watch()
        seen = [(await ana.post(["bob"], f"seen {n}")).msg_id for n in range(2)]
        assert await bob.mails(rid, 2) == seen
        await bob.unwatch(rid)

        missed = []
        for n in range(5):
            missed.append((await ana.post(["bob"], f"missed {n}")).msg_id)
            await ana.post(["carol"], "not bob's")
        # Watch again after the last one seen; a post races the watch's start: it is
        # either replayed or pushed, once.
        rid = await bob.start_watch(after=seen[-1])
        racing = await ana.post(["bob"], "while the watch starts")
        watching_again = await bob.frame(lambda m: _id(m) == rid and isinstance(m, Watching))
        assert isinstance(watching_again, Watching)
        assert watching_again.cursor in (missed[-1], racing.msg_id)
        assert await bob.mails(rid, 6) == [*missed, racing.msg_id]
        live = await ana.post(["bob"], "live")
        assert await bob.mails(rid, 1) == [live.msg_id], "nothing twice, nothing between"
        for msg_id in missed:
            assert (await ana.deliveries(msg_id))["bob"].state == "delivered"

        # A watch without `after` starts at its cursor: only new mail.
        other = await party(daemon, "bob", register=False)
        fresh_rid, fresh = await other.watch()
        assert fresh.cursor == live.msg_id
        newest = await ana.post(["bob"], "newest")
        assert await other.mails(fresh_rid, 1) == [newest.msg_id]
        assert await bob.mails(rid, 1) == [newest.msg_id], "every watch of a name gets it"


async def test_a_watch_with_a_bad_after_is_400_and_watches_nothing(autojump_clock):
    async with open_daemon() as daemon:
        bob = await party(daemon, "bob")
        rid = await bob.start_watch(after="yesterday")
        error = await bob.frame(lambda m: _id(m) == rid)
        assert isinstance(error, Error) and error.code == 400, error
        ana = await party(daemon, "ana")
        await ana.post(["bob"], "hello")
        assert daemon.server.post_office.stats() == (2, 0)
        assert (await bob.refused(Watch, reader="Not A Name")).code == 400


async def test_a_watch_cancelled_during_its_replay_stops_replaying(monkeypatch, autojump_clock):
    monkeypatch.setattr(_post_office, "REPLAY_PAGE", 2)
    async with open_daemon() as daemon:
        ana = await party(daemon, "ana")
        backlog = [(await ana.post(["bob"], f"n{n}")).msg_id for n in range(10)]
        office = daemon.server.post_office
        # The replay's second page waits until the watch has been cancelled.
        replay = office.replay
        cancelled = trio.Event()
        pages = 0

        async def held_replay(name: str, after: str, until: str | None) -> list[MailMessage]:
            nonlocal pages
            pages += 1
            if pages == 2:
                await cancelled.wait()
            return await replay(name, after, until)

        monkeypatch.setattr(office, "replay", held_replay)
        bob = await party(daemon, "bob")
        with capture_logs() as logs:
            rid, _ = await bob.watch(after=BEFORE_ANY)
            assert await bob.mails(rid, 2) == backlog[:2]
            await bob.unwatch(rid)
            cancelled.set()
            await trio.testing.wait_all_tasks_blocked()
            assert isinstance(await bob.ask(Ping), Pong)
        assert [e for e in logs if e["event"] == "frame_refused"] == []
        assert pages <= 2, "the replay went on for a watch that had ended"
        # Pushing marks delivered: what the watch never sent is still pending.
        states = [(await ana.deliveries(m))["bob"].state for m in backlog]
        assert states == ["delivered"] * 2 + ["pending"] * 8


async def test_a_watch_dropped_during_its_replay_still_gets_mail_without_a_gap(
    monkeypatch, autojump_clock
):
    monkeypatch.setattr(_post_office, "REPLAY_PAGE", 2)
    async with open_daemon(subscription_events=2) as daemon:
        ana = await party(daemon, "ana")
        backlog = [(await ana.post(["bob"], f"old {n}")).msg_id for n in range(6)]
        office = daemon.server.post_office
        replay = office.replay
        flooded = trio.Event()
        pages = 0

        async def held_replay(name: str, after: str, until: str | None) -> Any:
            nonlocal pages
            pages += 1
            if pages == 2:
                await flooded.wait()
            return await replay(name, after, until)

        monkeypatch.setattr(office, "replay", held_replay)
        bob = await party(daemon, "bob")
        rid, watching = await bob.watch(after=BEFORE_ANY)
        assert watching.cursor == backlog[-1]
        # While the replay waits, more live mail comes than the watch may buffer.
        live = [(await ana.post(["bob"], f"new {n}")).msg_id for n in range(5)]
        flooded.set()
        frames = await bob.client.until(lambda m: isinstance(m, End) and m.id == rid)
        got = [m.msg_id for m in frames if isinstance(m, Mail)]
        end = frames[-1]
        assert isinstance(end, End) and end.error is not None and end.error.code == 429
        # The whole replay, then what was buffered: a prefix of bob's mail, no gap.
        everything = backlog + live
        assert got == everything[: len(got)] and len(got) >= len(backlog)
        again, _ = await bob.watch(after=got[-1])
        assert await bob.mails(again, len(everything) - len(got)) == everything[len(got) :]


async def test_a_watcher_that_never_reads_is_dropped_with_429_and_slows_nobody(autojump_clock):
    async with open_daemon(subscription_events=4, outgoing_frames=8) as daemon:
        # lockstep: each write waits for the client to read it all, as a full socket
        # would (see test_connection.py). This watcher reads `watching`, then nothing.
        stalled = Party(daemon.connect(trio.testing.lockstep_stream_pair), "bob")
        await stalled.client.greet("mail")
        stalled_rid, _ = await stalled.watch()
        keen = await party(daemon, "bob", register=False)
        keen_rid, _ = await keen.watch()
        ana = await party(daemon, "ana")
        with capture_logs() as logs:
            posted = []
            for n in range(40):
                with deadline(1, f"post {n} while a watcher of bob reads nothing"):
                    posted.append((await ana.post(["bob"], f"n{n}")).msg_id)
        assert [e["event"] for e in logs].count("watcher_too_slow") == 1
        assert await keen.mails(keen_rid, 40) == posted, "the other watch kept up"

        # The stalled watcher reads at last: a prefix of its mail in order, then 429.
        frames = await stalled.client.until(lambda m: isinstance(m, End))
        got = [m.msg_id for m in frames if isinstance(m, Mail)]
        assert got == posted[: len(got)] and 0 < len(got) < 40
        end = frames[-1]
        assert isinstance(end, End) and end.id == stalled_rid and end.status == "error"
        assert end.error is not None and end.error.code == 429
        # The connection lives on, and a watch `after` the last one got misses nothing.
        assert isinstance(await stalled.ask(Ping), Pong)
        again, _ = await stalled.watch(after=got[-1])
        assert await stalled.mails(again, 40 - len(got)) == posted[len(got) :]


async def test_only_mail_a_watch_took_is_stored_delivered(autojump_clock):
    # The one watcher of bob reads nothing: its buffer fills, the post that finds it
    # full drops it (429). `delivered` means handed to a live watch, so exactly the
    # messages the watcher gets are delivered; the rest wait, pending, for an `after`.
    async with open_daemon(subscription_events=4, outgoing_frames=8) as daemon:
        stalled = Party(daemon.connect(trio.testing.lockstep_stream_pair), "bob")
        await stalled.client.greet("mail")
        await stalled.watch()
        ana = await party(daemon, "ana")
        posted = [(await ana.post(["bob"], f"n{n}")).msg_id for n in range(20)]
        frames = await stalled.client.until(lambda m: isinstance(m, End))
        got = [m.msg_id for m in frames if isinstance(m, Mail)]
        assert got == posted[: len(got)] and 0 < len(got) < 20
        states = [(await ana.deliveries(msg_id))["bob"].state for msg_id in posted]
        assert states == ["delivered"] * len(got) + ["pending"] * (20 - len(got))


async def test_a_name_new_in_to_may_be_mentioned_in_the_same_post(autojump_clock):
    async with open_daemon() as daemon:
        ana = await party(daemon, "ana")
        posted = await ana.post(["newcomer"], "welcome", mentions=["@newcomer"])
        assert posted.recipients == ["newcomer"]
        assert (await ana.deliveries(posted.msg_id))["newcomer"].mentioned
        refused = await ana.refused(Post, sender="ana", to=["bob"], content="x", mentions=["@zed"])
        assert refused.code == 404


async def test_watches_end_with_their_connection(autojump_clock):
    async with open_daemon() as daemon:
        bob = await party(daemon, "bob")
        await bob.watch()
        await bob.watch()
        assert daemon.server.post_office.stats() == (1, 2)
        await bob.close()
        assert daemon.server.post_office.stats() == (0, 0)
        ana = await party(daemon, "ana")
        assert (await ana.post(["bob"], "still reaches the store")).recipients == ["bob"]
        assert (await ana.participants())["bob"].unread == 1


async def test_posts_pipelined_on_one_connection_are_stored_in_the_order_sent(autojump_clock):
    async with open_daemon() as daemon:
        ana = await party(daemon, "ana")
        bob = await party(daemon, "bob")
        sent_ids = [ana.rid() for _ in range(20)]
        for n, rid in enumerate(sent_ids):
            await ana.client.send(Post(id=rid, sender="ana", to=["bob"], content=f"n{n}"))
        posted: dict[int, str] = {}
        for _ in sent_ids:
            msg = await ana.frame(lambda m: isinstance(m, Posted))
            assert isinstance(msg, Posted)
            posted[msg.id] = msg.msg_id
        in_order = [posted[rid] for rid in sent_ids]
        assert in_order == sorted(in_order), "later requests got earlier msg_ids"
        contents = [i.message.content for i in (await bob.inbox()).items][::-1]
        assert contents == [f"n{n}" for n in range(20)]


# --- hosted agents -----------------------------------------------------------------------------


async def test_a_dm_to_the_echo_agent_gets_its_threaded_answer(autojump_clock):
    async with open_daemon() as daemon:
        ana = await party(daemon, "ana")
        rid, _ = await ana.watch()
        asked = await ana.post(["assistant"], "the sky is teal today", priority=2, channel="sky")
        assert asked.recipients == ["assistant"] and asked.warnings == []
        answer = (await ana.mail(rid)).message
        assert (answer.sender, answer.recipients) == ("assistant", ["ana"])
        assert answer.content == "the sky is teal today"
        assert (answer.reply_to, answer.thread_id) == (asked.msg_id, asked.msg_id)
        assert (answer.priority, answer.channel) == (2, "sky")
        assert answer.run_id is not None

        (item,) = [i for i in await ana.sent() if i.message.msg_id == asked.msg_id]
        assert item.message.answered_by == answer.msg_id
        assert item.message.run_id == answer.run_id
        assert item.message.thread_id == asked.msg_id
        assert item.deliveries is not None
        (agent_copy,) = item.deliveries
        assert (agent_copy.name, agent_copy.state) == ("assistant", "read")
        assert agent_copy.read_at is not None

        # The run was an ordinary run of the conversation (assistant, ana); the framing
        # that told the model it was mail is not in its history.
        history = await ana.ask(GetHistory, agent="assistant", sender="ana")
        assert isinstance(history, History)
        assert [(e.role, e.content) for e in history.entries] == [
            ("user", "the sky is teal today"),
            ("assistant", "the sky is teal today"),
        ]
        thread = await ana.ask(GetThread, reader="ana", thread_id=asked.msg_id)
        assert isinstance(thread, Messages)
        assert [i.message.msg_id for i in thread.items] == [asked.msg_id, answer.msg_id]


async def test_a_failed_run_answers_its_mail_with_a_short_error(autojump_clock):
    async with open_daemon() as daemon:
        ana = await party(daemon, "ana")
        rid, _ = await ana.watch()
        asked = await ana.post(["assistant"], "/fail boom")
        answer = (await ana.mail(rid)).message
        assert answer.sender == "assistant" and answer.reply_to == asked.msg_id
        assert answer.content.startswith("assistant could not answer (error): ")
        assert "boom" in answer.content and len(answer.content) < 200
        (item,) = [i for i in await ana.sent() if i.message.msg_id == asked.msg_id]
        assert item.message.answered_by == answer.msg_id


async def test_everyone_and_role_mail_never_starts_a_run(autojump_clock):
    async with open_daemon() as daemon:
        ana = await party(daemon, "ana")
        bob = await party(daemon, "bob", roles=["lead"])
        rid, _ = await ana.watch()
        broadcast = await bob.post(["@everyone"], "assistant, are you there?")
        assert "assistant" in broadcast.recipients
        await bob.post(["@lead"], "leads only")
        # A run is queued before `posted` comes back: none was.
        assert daemon.runtime.stats().runs_total == 0
        control = await ana.post(["assistant"], "control")
        assert daemon.runtime.stats().runs_total == 1
        assert (await ana.mail(rid)).msg_id == broadcast.msg_id
        answer = (await ana.mail(rid)).message
        assert answer.reply_to == control.msg_id
        copies = await bob.deliveries(broadcast.msg_id)
        assert copies["assistant"].state == "pending"
        (item,) = [i for i in await bob.sent() if i.message.msg_id == broadcast.msg_id]
        assert item.message.answered_by is None
        history = await ana.ask(GetHistory, agent="assistant", sender="bob")
        assert isinstance(history, Error) and history.code == 404, "no run for bob's mail"


MAIL_SETTINGS = {
    "assistant": AgentConfig(provider="echo"),
    "mentioner": AgentConfig(provider="echo", mail="mentions"),
    "hermit": AgentConfig(provider="echo", mail="never"),
}


async def test_each_agent_answers_the_mail_its_setting_names(autojump_clock):
    async with open_daemon(agents=MAIL_SETTINGS) as daemon:
        ana = await party(daemon, "ana")
        rid, _ = await ana.watch()
        await ana.post(["mentioner"], "a plain dm")
        at_name = await ana.post(["@mentioner"], "at its name")
        in_mentions = await ana.post(["bob"], "in mentions", mentions=["mentioner"])
        await ana.post(["hermit"], "a plain dm")
        await ana.post(["@hermit"], "at its name")
        direct = await ana.post(["assistant"], "a plain dm")
        mentioned = await ana.post(["bob"], "mentioned", mentions=["@assistant"])
        assert daemon.runtime.stats().runs_total == 4
        answers: dict[str | None, str] = {}
        for _ in range(4):
            message = (await ana.mail(rid)).message
            answers[message.reply_to] = message.sender
        assert answers == {
            at_name.msg_id: "mentioner",
            in_mentions.msg_id: "mentioner",
            direct.msg_id: "assistant",
            mentioned.msg_id: "assistant",
        }
        unanswered = [i for i in await ana.sent() if i.message.msg_id not in answers]
        assert sorted(i.message.content for i in unanswered) == ["a plain dm"] * 2 + ["at its name"]
        for item in unanswered:
            assert item.deliveries is not None and item.message.answered_by is None
            assert {(d.name, d.state) for d in item.deliveries} <= {
                ("mentioner", "pending"),
                ("hermit", "pending"),
                ("assistant", "pending"),  # only the direct one, answered, is not here
            }


async def test_mail_to_an_agent_of_a_daemon_shutting_down_waits_pending(autojump_clock):
    """A daemon shutting down queues no run: its agent's copy stays `pending`, for a daemon
    hosting it (another, or this one started again) to take and answer."""
    async with open_daemon() as daemon:
        ana = await party(daemon, "ana")
        daemon.runtime.accepting = False
        asked = await ana.post(["assistant"], "answer me later")
        office = daemon.server.post_office
        deliveries = await office.store.deliveries([asked.msg_id])
        assert [(d.name, d.state) for d in deliveries[asked.msg_id]] == [("assistant", "pending")]
        assert daemon.runtime.stats().runs_total == 0
        daemon.runtime.accepting = True  # started again: it answers it
        rid, _ = await ana.watch()
        await office.start()
        answer = (await ana.mail(rid)).message
        assert (answer.sender, answer.reply_to) == ("assistant", asked.msg_id)


async def test_mail_waiting_for_an_agent_is_answered_when_the_daemon_starts(autojump_clock):
    async with open_daemon() as daemon:
        ana = await party(daemon, "ana")
        rid, _ = await ana.watch()
        office = daemon.server.post_office
        # As if the daemon had stopped between storing the mail and queueing its run:
        # stored with the agent's copy pending, and no run asked for.
        waiting = MailMessage(
            msg_id="",
            sender="ana",
            to=["assistant"],
            recipients=["assistant"],
            content="answer me after a restart",
            created_at=datetime.now(UTC),
        )
        stored, _ = await office.store.post(waiting, [Delivery(name="assistant")])
        assert daemon.runtime.stats().runs_total == 0
        await office.start()
        answer = (await ana.mail(rid)).message
        assert (answer.sender, answer.reply_to) == ("assistant", stored.msg_id)
        assert answer.content == "answer me after a restart"
        await office.start()  # answered: a second start asks for no second run
        assert daemon.runtime.stats().runs_total == 1


async def test_mail_whose_run_the_daemon_died_in_is_answered_when_it_starts(autojump_clock):
    async with open_daemon() as daemon:
        ana = await party(daemon, "ana")
        rid, _ = await ana.watch()
        office = daemon.server.post_office
        # As if the daemon had died mid-run: the agent's copy read (its run started),
        # no answer posted. Beside it, mail the agent answered and mail to everyone.
        now = datetime.now(UTC)
        cut, _ = await office.store.post(
            MailMessage(
                msg_id="",
                sender="ana",
                to=["assistant"],
                recipients=["assistant"],
                content="cut short",
                created_at=now,
            ),
            [Delivery(name="assistant", state="read", delivered_at=now, read_at=now)],
        )
        await office.store.post(
            MailMessage(
                msg_id="",
                sender="ana",
                to=["@everyone"],
                recipients=["assistant"],
                content="to all",
                created_at=now,
            ),
            [Delivery(name="assistant", state="delivered", delivered_at=now)],
        )
        await office.start()
        answer = (await ana.mail(rid)).message
        assert (answer.reply_to, answer.content) == (cut.msg_id, "cut short")
        await office.start()
        assert daemon.runtime.stats().runs_total == 1, (
            "one run: the answered and @everyone mail ask none"
        )
