"""Mail through the client library, against a real `chinwag serve`, on asyncio and on trio.

What a real daemon rarely does (drop a watch that fell behind) is scripted with
the fake daemon of test_client_fake_daemon.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import pytest
from chinwag.clients import ChinwagError, Client, MailWatch, connect
from chinwag.protocol import (
    Cancel,
    End,
    ErrorInfo,
    Hello,
    Mail,
    MailItem,
    MailMessage,
    MailRead,
    Ok,
    Ref,
    Watch,
    Watching,
)
from test_client_fake_daemon import FakeConnection, fake_daemon

Runner = Callable[[Callable[[], Awaitable[object]]], object]


async def next_mail(watch: MailWatch) -> MailMessage:
    async for message in watch:
        return message
    raise AssertionError("the watch ended before a message came")


def test_register_heartbeat_and_participants(daemon, run: Runner) -> None:
    async def main() -> None:
        async with connect(daemon.socket_path) as ana, connect(daemon.socket_path) as other:
            me = await ana.register(
                "Ana", kind="person", roles=["reviewer"], info={"session": "s1", "pid": 7}
            )
            assert (me.name, me.kind, me.roles, me.online) == ("ana", "person", ["reviewer"], True)
            assert me.info == {"session": "s1", "pid": 7}
            await ana.heartbeat("ana", "reviewing auth")

            everyone = {p.name: p for p in await other.participants()}
            # The configured agents are participants too, always online.
            assert {"ana", "assistant", "helper"} <= set(everyone)
            assert everyone["assistant"].kind == "agent" and everyone["assistant"].online
            assert everyone["ana"].status == "reviewing auth"
            assert everyone["ana"].last_seen is not None
            reviewers = await other.participants(role="reviewer")
            assert [p.name for p in reviewers] == ["ana"]

            await other.post("bob", "hi ana", to="ana")  # bob is known, never registered
            online = [p.name for p in await other.participants(online_only=True)]
            assert "ana" in online and "bob" not in online
            assert {p.name: p.unread for p in await other.participants()}["ana"] == 1

        async with connect(daemon.socket_path) as later:
            # The registration ended with its connection; the participant stays.
            ana_now = {p.name: p for p in await later.participants()}["ana"]
            assert ana_now.online is False
            assert ana_now.status == "reviewing auth"

    run(main)


def test_a_live_registration_is_refused_to_another_session_unless_taken_over(
    daemon, run: Runner
) -> None:
    async def main() -> None:
        async with connect(daemon.socket_path) as first, connect(daemon.socket_path) as second:
            await first.register("codex-1", info={"session": "a", "vendor": "openai"})
            with pytest.raises(ChinwagError) as info:
                await second.register("codex-1", info={"session": "b"})
            assert info.value.code == 409
            assert "codex-1" in info.value.message
            taken = await second.register("codex-1", info={"session": "b"}, takeover=True)
            assert taken.info == {"session": "b"}

    run(main)


def test_post_reaches_a_watch_on_another_connection(daemon, run: Runner) -> None:
    async def main() -> None:
        async with (
            connect(daemon.socket_path) as reader,
            connect(daemon.socket_path) as writer,
            reader.watch("ana") as mail,
        ):
            assert mail.cursor is None  # ana had received nothing
            posted = await writer.post(
                "bob",
                "the build is green",
                to=["ana"],
                priority=2,
                channel="ci",
                scopes=["module:auth"],
                refs=[Ref(type="pr", value="7")],
                metadata={"branch": "main"},
                structured={"ok": True},
            )
            message = await next_mail(mail)
            assert mail.last_msg_id == posted.msg_id
        assert posted.recipients == ["ana"]
        assert posted.warnings == ["ana is not registered: it will get this when it does."]
        assert message.msg_id == posted.msg_id
        assert (message.sender, message.to, message.content) == (
            "bob",
            ["ana"],
            "the build is green",
        )
        assert (message.priority, message.channel) == (2, "ci")
        assert message.scopes == [Ref(type="module", value="auth")]
        assert message.refs == [Ref(type="pr", value="7")]
        assert message.metadata == {"branch": "main"}
        assert message.structured == {"ok": True}
        assert message.created_at == posted.created_at

    run(main)


def test_inbox_and_sent_follow_each_delivery_state(daemon, run: Runner) -> None:
    async def main() -> None:
        async with connect(daemon.socket_path) as c:
            first = await c.post("ana", "one", to=["bob", "carol"])
            second = await c.post("ana", "two", to=["bob"])

            def states(page_items: list[MailItem]) -> dict[str, dict[str, str]]:
                return {
                    item.message.content: {d.name: d.state for d in item.deliveries}
                    for item in page_items
                    if item.deliveries is not None
                }

            sent = await c.sent("ana")
            assert [item.message.msg_id for item in sent.items] == [second.msg_id, first.msg_id]
            assert states(sent.items) == {
                "one": {"bob": "pending", "carol": "pending"},
                "two": {"bob": "pending"},
            }

            unread_only = await c.inbox("bob", unread_only=True)
            assert [item.message.content for item in unread_only.items] == ["two", "one"]
            assert [item.state for item in unread_only.items] == ["delivered", "delivered"]
            assert unread_only.unread == 2
            assert states((await c.sent("ana")).items)["one"] == {
                "bob": "delivered",
                "carol": "pending",
            }

            opened = await c.get_message("bob", first.msg_id)
            assert (opened.message.content, opened.state) == ("one", "read")
            inbox = await c.inbox("bob")
            assert [(i.message.content, i.state) for i in inbox.items] == [
                ("two", "delivered"),
                ("one", "read"),
            ]
            assert inbox.unread == 1
            assert inbox.items[1].read_at is not None
            assert [i.message.content for i in (await c.inbox("bob", unread_only=True)).items] == [
                "two"
            ]
            assert states((await c.sent("ana")).items)["one"] == {"bob": "read", "carol": "pending"}

            # The author may open what it wrote, and has no state of its own in it.
            assert (await c.get_message("ana", first.msg_id)).state is None

            await c.inbox("carol", mark_read=True)
            assert states((await c.sent("ana")).items)["one"]["carol"] == "read"

    run(main)


def test_inbox_filters(daemon, run: Runner) -> None:
    async def main() -> None:
        async with connect(daemon.socket_path) as c:
            await c.register("bob", roles=["ops"])
            await c.post("ana", "routine", to="bob", priority=0, channel="chatter")
            await c.post("ana", "page ops", to="@ops", priority=3, scopes=["module:db"])
            await c.post("ana", "for you", to="bob", mentions=["@bob"])

            async def contents(**filters: Any) -> list[str]:
                page = await c.inbox("bob", **filters)
                return [item.message.content for item in page.items]

            assert await contents() == ["for you", "page ops", "routine"]
            assert await contents(channel="chatter") == ["routine"]
            assert await contents(priority_min=3) == ["page ops"]
            assert await contents(scope="module:db") == ["page ops"]
            assert await contents(mentions_only=True) == ["for you", "page ops"]
            assert await contents(since="1h") == ["for you", "page ops", "routine"]
            assert await contents(limit=1) == ["for you"]

    run(main)


def test_iter_inbox_follows_next_cursor(daemon, run: Runner) -> None:
    async def main() -> None:
        async with connect(daemon.socket_path) as c:
            posted = [(await c.post("ana", f"note {n}", to="bob")).msg_id for n in range(5)]
            first = await c.inbox("bob", limit=2)
            assert len(first.items) == 2 and first.next_cursor is not None
            seen = [item.message.msg_id async for item in c.iter_inbox("bob", page_size=2)]
        assert seen == posted[::-1]

    run(main)


def test_replies_thread_and_mark_read(daemon, run: Runner) -> None:
    async def main() -> None:
        async with connect(daemon.socket_path) as c:
            question = await c.post("ana", "lunch?", to="bob")
            assert question.thread_id is None
            answer = await c.post("bob", "yes", reply_to=question.msg_id)
            # A reply with no `to` goes to the parent's author, and starts a thread
            # whose id is the parent's msg_id.
            assert answer.recipients == ["ana"]
            assert answer.thread_id == question.msg_id
            again = await c.post("ana", "noon then", reply_to=answer.msg_id)
            other = await c.post("carol", "unrelated", to="ana")

            thread = await c.thread("ana", question.msg_id)
            assert [item.message.content for item in thread.items] == ["lunch?", "yes", "noon then"]
            assert [item.state for item in thread.items] == [None, "read", None]
            # Replying marked the parent read for the replier.
            assert (await c.get_message("bob", question.msg_id)).state == "read"

            context = await c.mail_context("ana")
            assert context.name == "ana"
            assert context.unread == 1
            assert context.unread_by_priority.get(1) == 1
            assert [(t.thread_id, t.last_from) for t in context.threads] == [
                (other.msg_id, "carol")
            ]

            await c.mark_read("ana", msg_ids=[other.msg_id])
            assert (await c.inbox("ana", unread_only=True)).items == []
            await c.post("carol", "more", to="ana")
            await c.post("carol", "and more", to="ana")
            await c.mark_read("ana", all=True)
            assert (await c.mail_context("ana")).unread == 0
            await c.post("ana", "ping", to="bob", reply_to=again.msg_id)
            await c.mark_read("bob", thread_id=question.msg_id)
            assert (await c.inbox("bob", unread_only=True)).unread == 0

    run(main)


def test_idempotent_post_returns_the_first(daemon, run: Runner) -> None:
    async def main() -> None:
        async with connect(daemon.socket_path) as c:
            first = await c.post("ana", "once", to="bob", idempotency_key="k-1")
            second = await c.post("ana", "once", to="bob", idempotency_key="k-1")
            inbox = await c.inbox("bob")
        assert second.msg_id == first.msg_id
        assert len(inbox.items) == 1

    run(main)


def test_a_watch_resumed_after_a_reconnect_gets_exactly_what_it_missed(daemon, run: Runner) -> None:
    async def main() -> None:
        async with connect(daemon.socket_path) as writer:
            before = await writer.post("bob", "before any watch", to="ana")
            async with connect(daemon.socket_path) as reader, reader.watch("ana") as mail:
                assert mail.cursor == before.msg_id
                assert mail.last_msg_id == before.msg_id
                first = await writer.post("bob", "first", to="ana")
                assert (await next_mail(mail)).msg_id == first.msg_id
                resume = mail.last_msg_id
            assert resume == first.msg_id

            missed = [(await writer.post("bob", f"missed {n}", to="ana")).msg_id for n in range(3)]
            await writer.post("bob", "not for ana", to="carol")

            async with (
                connect(daemon.socket_path) as reader,
                reader.watch("ana", after=resume) as mail,
            ):
                assert mail.cursor == missed[-1]
                got = [(await next_mail(mail)).msg_id for _ in missed]
                live = await writer.post("bob", "live", to="ana")
                got.append((await next_mail(mail)).msg_id)
            assert got == [*missed, live.msg_id]

            # The replay marked what it pushed delivered.
            sent = await writer.sent("bob")
            states = {
                item.message.msg_id: item.deliveries[0].state
                for item in sent.items
                if item.deliveries
            }
            assert all(states[msg_id] == "delivered" for msg_id in missed)

    run(main)


def test_leaving_a_watch_cancels_it(daemon, run: Runner) -> None:
    async def main() -> None:
        async with connect(daemon.socket_path) as c:
            async with c.watch("ana") as mail:
                assert (await c.stats()).watches == 1
                await c.post("bob", "seen", to="ana")
                await next_mail(mail)
            assert (await c.stats()).watches == 0
            # Left early: the iterator is over.
            assert [m async for m in mail] == []
            await c.ping()

    run(main)


def test_a_watch_with_reads_yields_what_another_client_read(daemon, run: Runner) -> None:
    async def main() -> None:
        async with (
            connect(daemon.socket_path) as c,
            connect(daemon.socket_path) as elsewhere,
            c.watch("ana", reads=True) as mail,
        ):
            assert "mail_read" in c.welcome.features
            first = await c.post("bob", "one", to="ana")
            second = await c.post("bob", "two", to="ana")
            assert [(await next_mail(mail)).msg_id for _ in range(2)] == [
                first.msg_id,
                second.msg_id,
            ]
            await elsewhere.mark_read("ana", all=True)
            read = await anext(mail)
            assert isinstance(read, MailRead) and read.msg_ids == [first.msg_id, second.msg_id]

    run(main)


def test_mail_to_a_hosted_agent_is_answered_in_its_thread(daemon, run: Runner) -> None:
    async def main() -> None:
        async with (
            connect(daemon.socket_path) as c,
            c.watch("ana") as mail,
        ):
            asked = await c.post("ana", "echo this back", to="assistant")
            answer = await next_mail(mail)
        assert answer.sender == "assistant"
        assert answer.content == "echo this back"
        assert answer.reply_to == asked.msg_id
        assert answer.thread_id == asked.msg_id

    run(main)


@pytest.mark.parametrize(
    ("call", "code"),
    [
        (lambda c: c.post("ana", "to nobody"), 400),
        (lambda c: c.post("ana", "x", to="bob", priority=9), 400),
        (lambda c: c.post("ana", "not json", to="bob", format="json"), 400),
        (lambda c: c.post("ana", "x", to="@no-such-role"), 404),
        (lambda c: c.post("everyone", "x", to="bob"), 400),
        (lambda c: c.register("assistant"), 409),
        (lambda c: c.register("system"), 400),
        (lambda c: c.heartbeat("never-seen"), 404),
        (lambda c: c.get_message("ana", "m000000999999"), 404),
        (lambda c: c.thread("ana", "m000000999999"), 404),
        (lambda c: c.mark_read("ana"), 400),
        (lambda c: c.inbox("ana", scope="no-colon"), 400),
        (lambda c: c.inbox("ana", cursor="not-a-msg-id"), 400),
    ],
)
def test_refusals_raise_chinwag_error_with_the_daemons_code(
    daemon, run: Runner, call: Callable[[Client], Awaitable[object]], code: int
) -> None:
    async def main() -> None:
        async with connect(daemon.socket_path) as c:
            with pytest.raises(ChinwagError) as info:
                await call(c)
            assert info.value.code == code
            assert info.value.message.endswith(".")
            await c.ping()  # the connection survives

    run(main)


def test_a_watch_refused_raises_on_entering(daemon, run: Runner) -> None:
    async def main() -> None:
        async with connect(daemon.socket_path) as c:
            with pytest.raises(ChinwagError) as info:
                async with c.watch("ana", after="not-a-msg-id"):
                    raise AssertionError("the watch stood")
            assert info.value.code == 400
            with pytest.raises(ChinwagError) as info:
                async with c.watch("Not A Name!"):
                    raise AssertionError("the watch stood")
            assert info.value.code == 400
            assert (await c.stats()).watches == 0

    run(main)


def test_a_bad_scope_fails_before_anything_is_sent(daemon, run: Runner) -> None:
    async def main() -> None:
        async with connect(daemon.socket_path) as c:
            with pytest.raises(ValueError, match="type:value"):
                await c.post("ana", "x", to="bob", scopes=["nocolon"])
            assert (await c.inbox("bob")).items == []

    run(main)


# --- against the fake daemon ------------------------------------------------------------


@pytest.fixture
def sock(short_tmp: Path) -> Path:
    return short_tmp / "fake.sock"


def test_hello_asks_for_mail(run: Runner, sock: Path) -> None:
    hellos: list[Hello] = []

    async def handler(conn: FakeConnection) -> None:
        hellos.append(await conn.handshake())
        await anyio.sleep_forever()

    async def main() -> None:
        async with fake_daemon(sock, handler), connect(sock):
            pass

    run(main)
    assert "mail" in hellos[0].features


def _message(msg_id: str) -> MailMessage:
    return MailMessage(
        msg_id=msg_id,
        sender="bob",
        to=["ana"],
        recipients=["ana"],
        content=msg_id,
        created_at=datetime(2025, 1, 1, tzinfo=UTC),
    )


def test_a_watch_dropped_by_the_daemon_raises_429_after_what_came(run: Runner, sock: Path) -> None:
    async def handler(conn: FakeConnection) -> None:
        await conn.handshake()
        watch = await conn.recv()
        assert isinstance(watch, Watch)
        assert (watch.reader, watch.after) == ("ana", "m000000000001")
        await conn.send(Watching(id=watch.id, cursor="m000000000002"))
        await conn.send(Mail(id=watch.id, msg_id="m000000000002", message=_message("m2")))
        await conn.send(
            End(
                id=watch.id,
                status="error",
                error=ErrorInfo(code=429, message="The watch fell too far behind."),
                last_seq=None,
            )
        )
        await anyio.sleep_forever()

    async def main() -> None:
        async with fake_daemon(sock, handler), connect(sock) as c:
            got: list[str] = []
            with pytest.raises(ChinwagError) as info:
                async with c.watch("ana", after="m000000000001") as mail:
                    assert mail.cursor == "m000000000002"
                    # Nothing yielded yet: resuming starts again after `after`.
                    assert mail.last_msg_id == "m000000000001"
                    async for message in mail:
                        got.append(message.content)
            assert (info.value.code, info.value.message) == (429, "The watch fell too far behind.")
            assert got == ["m2"]
            assert mail.last_msg_id == "m000000000002"

    run(main)


def test_leaving_a_watch_sends_cancel(run: Runner, sock: Path) -> None:
    cancelled: list[int] = []

    async def handler(conn: FakeConnection) -> None:
        await conn.handshake()
        watch = await conn.recv()
        assert isinstance(watch, Watch)
        await conn.send(Watching(id=watch.id, cursor=None))
        cancel = await conn.recv()
        assert isinstance(cancel, Cancel)
        cancelled.append(cancel.target)
        await conn.send(End(id=watch.id, status="detached", error=None, last_seq=None))
        await conn.send(Ok(id=cancel.id))
        await anyio.sleep_forever()

    async def main() -> None:
        async with fake_daemon(sock, handler), connect(sock) as c:
            async with c.watch("ana") as mail:
                watch_id = mail.id
            assert cancelled == [watch_id]

    run(main)
