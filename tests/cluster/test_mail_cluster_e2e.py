"""Mail across daemons on one store: what is posted or changed on one daemon is pushed
to watchers on the others, as it is to its own, in msg_id order; participants, their
presence and the spaces are the same seen from every daemon; mail to a hosted agent
starts one run, on the daemon it was posted to when that one hosts the agent, else on
one of those that do."""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager

import psycopg
import pytest
import trio
from chinwag.clients import ChinwagError, connect
from chinwag.protocol import MailMessage, MailRead, MailUpdate
from chinwag.storage._postgres import parse_postgres_url
from psycopg import sql

# Nothing delivers mail by polling now; the webhooks look for other daemons' mail every
# SHARED_POLL_S (2 s) besides being woken: a push well under a second is no poll's.
PUSHED_WITHIN_S = 0.5


@pytest.fixture
def two(cluster):  # type: ignore[no-untyped-def]
    print(f"two daemons as {cluster.mode}")
    return [cluster.start(name) for name in "ab"]


@pytest.fixture
def three(cluster):  # type: ignore[no-untyped-def]
    print(f"three daemons as {cluster.mode}")
    return [cluster.start(name) for name in "abc"]


async def until(what: str, holds: Callable[[], Awaitable[bool]]) -> None:
    """Another process's news, seen through requests: nothing to await but the answer."""
    with trio.fail_after(10):
        while not await holds():  # noqa: ASYNC110
            await trio.sleep(0.05)
    print(f"{what}: seen")


async def test_a_post_on_one_daemon_is_pushed_to_a_watch_on_another(two):
    a, b = two
    async with connect(a.socket_path) as on_a, connect(b.socket_path) as on_b:
        await on_a.register("ana")
        await on_b.register("bo")
        async with on_b.watch("bo", updates=True) as mail:
            sent = time.monotonic()
            posted = await on_a.post("ana", "hello from a", to="bo")
            with trio.fail_after(5):
                got = await anext(mail)
            took = time.monotonic() - sent
            assert isinstance(got, MailMessage)
            assert got.msg_id == posted.msg_id and got.content == "hello from a"
            assert took < PUSHED_WITHIN_S, f"the post reached b's watch {took:.3f} s after"
            await on_a.react("ana", posted.msg_id, "👍")
            await on_a.edit("ana", posted.msg_id, "hello again from a")
            with trio.fail_after(5):
                updates = [await anext(mail), await anext(mail)]
            assert all(isinstance(u, MailUpdate) for u in updates), updates
            assert [(u.change, u.msg_id) for u in updates] == [  # type: ignore[union-attr]
                ("react", posted.msg_id),
                ("edit", posted.msg_id),
            ]
            assert updates[1].message.content == "hello again from a"  # type: ignore[union-attr]
            for n in range(20):
                await on_a.post("ana", f"burst {n}", to="bo")
            with trio.fail_after(10):
                burst = [await anext(mail) for _ in range(20)]
        assert [m.content for m in burst] == [f"burst {n}" for n in range(20)]  # type: ignore[union-attr]
        first = next(i for i in (await on_b.inbox("bo")).items if i.message.msg_id == posted.msg_id)
        assert first.state in ("delivered", "read"), "pushed on b: delivered"


async def test_mail_read_on_one_daemon_is_told_to_a_watch_on_another(two):
    """bo reads through a (get_message, then mark_read of all): b's watch of bo is told."""
    a, b = two
    async with connect(a.socket_path) as on_a, connect(b.socket_path) as on_b:
        async with on_b.watch("bo", reads=True) as mail:
            sent = [(await on_a.post("ana", f"n{n}", to="bo")).msg_id for n in range(3)]
            with trio.fail_after(5):
                assert [(await anext(mail)).msg_id for _ in sent] == sent  # type: ignore[union-attr]
            began = time.monotonic()
            opened = await on_a.get_message("bo", sent[1])
            assert opened.state == "read"
            with trio.fail_after(5):
                first = await anext(mail)
            took = time.monotonic() - began
            assert isinstance(first, MailRead) and first.msg_ids == [sent[1]]
            assert took < PUSHED_WITHIN_S, f"the read reached b's watch {took:.3f} s after"
            await on_a.mark_read("bo", all=True)
            with trio.fail_after(5):
                rest = await anext(mail)
            assert isinstance(rest, MailRead) and rest.msg_ids == [sent[0], sent[2]]
        assert (await on_b.inbox("bo", unread_only=True)).items == []


async def test_space_mail_fans_out_to_watchers_on_two_other_daemons(three):
    """The space is made on a and joined on b and c: a knows its members from them."""
    a, b, c = three
    async with (
        connect(a.socket_path) as on_a,
        connect(b.socket_path) as on_b,
        connect(c.socket_path) as on_c,
    ):
        await on_a.space_create("ana", "ops")
        await until("the space on b", lambda: _has_space(on_b, "ops"))
        await until("the space on c", lambda: _has_space(on_c, "ops"))
        await on_b.space_join("bo", "#ops")
        await on_c.space_join("cy", "#ops")
        await until("the members on a", lambda: _members(on_a, "ops", {"ana", "bo", "cy"}))
        async with on_b.watch("bo") as b_mail, on_c.watch("cy") as c_mail:
            sent = time.monotonic()
            posted = await on_a.post("ana", "to everyone in ops", to="#ops")
            assert sorted(posted.recipients) == ["bo", "cy"]
            with trio.fail_after(5):
                got = [await anext(b_mail), await anext(c_mail)]
            took = time.monotonic() - sent
        assert [m.msg_id for m in got] == [posted.msg_id] * 2
        assert took < PUSHED_WITHIN_S, f"both had it {took:.3f} s after it was posted"


@contextmanager
def spaces_news_held(storage_url: str) -> Iterator[None]:
    """While in it, no daemon takes in another's news of spaces: reading them again
    (``Spaces.load``) ends by reading the projects, locked here, and keeps nothing read
    until then. Nothing else a post or a join does touches the projects."""
    conninfo, schema, _ = parse_postgres_url(storage_url)
    with psycopg.connect(conninfo) as conn, conn.transaction():
        conn.execute(
            sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(
                sql.Identifier(schema or "public", "projects")
            )
        )
        yield


async def test_a_space_post_reaches_the_members_the_store_has_as_it_is_posted(cluster, two):
    """Joins, invitations and leaves acknowledged on a count at once for a post on b, in
    a public and a private space, though b has yet to hear of them: one who left the
    private space posts to it no more."""
    a, b = two
    async with connect(a.socket_path) as on_a, connect(b.socket_path) as on_b:
        await on_a.register("bo")
        await on_a.space_create("ana", "ops")
        await on_a.space_join("cy", "#ops")
        await on_a.space_create("ana", "den", private=True)
        await on_a.space_invite("ana", "#den", "cy")
        await until("ops on b", lambda: _members(on_b, "ops", {"ana", "cy"}))
        await until("den on b", lambda: _members(on_b, "den", {"ana", "cy"}, reader="ana"))
        with spaces_news_held(cluster.storage_url):
            await on_a.space_join("bo", "#ops")
            await on_a.space_leave("cy", "#ops")
            await on_a.space_invite("ana", "#den", "bo")
            await on_a.space_leave("cy", "#den")
            async with on_a.watch("bo") as mail:
                to_ops = await on_b.post("ana", "to ops", to="#ops")
                to_den = await on_b.post("ana", "to den", to=["#den", "dee"])
                assert to_ops.recipients == ["bo"]
                assert sorted(to_den.recipients) == ["bo", "dee"], "dee is named, no member"
                with trio.fail_after(5):
                    got = [await anext(mail), await anext(mail)]
                with pytest.raises(ChinwagError, match="No space is named #den") as refused:
                    await on_b.post("cy", "still in den?", to="#den")  # cy left it on a
                assert refused.value.code == 404
                await on_b.post("cy", "to ops still", to="#ops")  # public: anyone posts
                with trio.fail_after(5):
                    assert (await anext(mail)).content == "to ops still"  # type: ignore[union-attr]
            assert await _members(on_b, "ops", {"ana", "cy"}), "b has yet to hear of them"
        assert [m.msg_id for m in got] == [to_ops.msg_id, to_den.msg_id]  # type: ignore[union-attr]
        assert (await on_b.inbox("cy")).items == [], "cy left both before they were posted"
        assert [i.message.content for i in (await on_b.inbox("ana")).items] == ["to ops still"]
        await until("the members on b", lambda: _members(on_b, "ops", {"ana", "bo"}))


async def _has_space(client, name: str) -> bool:  # type: ignore[no-untyped-def]
    return name in [space.name for space in await client.spaces()]


async def _members(client, space: str, names: set[str], reader: str | None = None) -> bool:  # type: ignore[no-untyped-def]
    try:
        members = await client.space_members(space, reader=reader)
    except ChinwagError as exc:
        if exc.code != 404:
            raise
        return False  # made on another daemon: its news has yet to come
    return {m.name for m in members} == names


async def test_bursts_from_two_daemons_reach_a_watcher_on_a_third_in_msg_id_order(three):
    """a and c post at once: their msg_ids interleave, and may be stored out of their
    order; b's watcher gets every message once, in msg_id order."""
    a, b, c = three
    async with (
        connect(a.socket_path) as on_a,
        connect(b.socket_path) as on_b,
        connect(c.socket_path) as on_c,
    ):
        posted: list[str] = []

        async def burst(client, sender: str) -> None:  # type: ignore[no-untyped-def]
            for n in range(40):
                posted.append((await client.post(sender, f"{sender} {n}", to="bo")).msg_id)

        async with on_b.watch("bo") as mail:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(burst, on_a, "ana")
                nursery.start_soon(burst, on_c, "cy")
            with trio.fail_after(10):
                got = [(await anext(mail)).msg_id for _ in range(80)]
    assert got == sorted(got), "pushed in msg_id order"
    assert sorted(got) == sorted(posted), "each message once"


async def test_a_watch_begun_on_another_daemon_replays_without_repeats(two):
    """Posts on a go on while b's watch begins: each message comes once, replayed or
    pushed, in order."""
    a, b = two
    async with connect(a.socket_path) as on_a, connect(b.socket_path) as on_b:
        await on_a.register("ana")
        first = await on_a.post("ana", "before the watch", to="cy")
        posted = [first.msg_id]

        async def keep_posting() -> None:
            for n in range(30):
                posted.append((await on_a.post("ana", f"meanwhile {n}", to="cy")).msg_id)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(keep_posting)
            await trio.sleep(0.01)  # the watch begins among the posts, not before them
            async with on_b.watch("cy", after="m000000000000") as mail:
                with trio.fail_after(10):
                    got = [await anext(mail) for _ in range(31)]
    assert got[0].content == "before the watch"
    assert [m.msg_id for m in got] == posted


async def test_participants_and_presence_are_the_same_on_every_daemon(two):
    a, b = two
    async with connect(a.socket_path) as on_a, connect(b.socket_path) as on_b:
        async with connect(a.socket_path) as ana_on_a:
            info = {"session": "s-ana", "vendor": "claude-code"}
            await ana_on_a.register("ana", roles=["reviewer"], info=info)
            await until("ana online on b", lambda: _online(on_b, "ana", True))
            (seen,) = [p for p in await on_b.participants(role="reviewer")]
            assert (seen.name, seen.info) == ("ana", info)
            with pytest.raises(ChinwagError, match="registered by another live session") as held:
                await on_b.register("ana", info={"session": "s-other"})
            assert held.value.code == 409 and "s-ana" in held.value.message
            async with ana_on_a.watch("ana") as mail:
                posted = await on_b.post("bo", "for the reviewers", to="@reviewer")
                with trio.fail_after(5):
                    got = await anext(mail)
            assert got.msg_id == posted.msg_id and posted.recipients == ["ana"]
            await ana_on_a.heartbeat("ana", "reviewing auth")
            await until("the status on b", lambda: _status(on_b, "ana", "reviewing auth"))
        await until("ana offline on b", lambda: _online(on_b, "ana", False))
        assert "ana" not in [p.name for p in await on_a.participants(online_only=True)]
        await on_b.register("ana", info={"session": "s-other"})  # free now


async def _online(client, name: str, online: bool) -> bool:  # type: ignore[no-untyped-def]
    return any(p.name == name and p.online == online for p in await client.participants())


async def _status(client, name: str, status: str) -> bool:  # type: ignore[no-untyped-def]
    return any(p.name == name and p.status == status for p in await client.participants())


async def test_a_daemon_starting_while_mail_is_answered_elsewhere_runs_it_not_again(cluster, two):
    """The daemon a message was posted to answers it; one that starts meanwhile (and
    answers the mail left unanswered at its start) leaves it to that one."""
    a, b = two
    async with connect(a.socket_path) as on_a, connect(b.socket_path) as on_b:
        async with on_b.watch("ana") as mail:
            posted = await on_a.post("ana", "/slow 30 100", to="assistant")
            await until("the run on a", lambda: _running(on_b, "assistant", "ana"))
            c = cluster.start("c")
            with trio.fail_after(30):
                answer = await anext(mail)
        assert answer.reply_to == posted.msg_id and answer.sender == "assistant"
        async with connect(c.socket_path) as on_c:
            stats = [await client.stats() for client in (on_a, on_b, on_c)]
            history = await on_c.history("assistant", "ana")
    assert [s.runs_total for s in stats] == [1, 0, 0]
    assert [e.content for e in history.entries if e.role == "user"] == ["/slow 30 100"]


# A daemon that hosts only `helper`: mail to `assistant` is for the others to answer.
WITHOUT_ASSISTANT = """
[daemon]
shutdown_grace_s = 2.0

[agents.helper]
provider = "echo"
tools = []
"""


async def test_mail_to_an_agent_only_other_daemons_host_is_answered_by_one_of_them_at_once(
    cluster,
):
    """b hosts no `assistant`, a and c do: mail posted on b to it is taken by one of them
    as soon as it hears of it (not when one next starts) and answered once, though
    someone watches the assistant's mail on b and on a and lists it on c (an agent's mail
    moves with its runs, not with watches). (Taken by both, one conversation's mail may
    be answered out of turn.)"""
    a = cluster.start("a")
    b = cluster.start("b", config=WITHOUT_ASSISTANT)
    c = cluster.start("c")
    print(f"three daemons as {cluster.mode}")
    async with (
        connect(a.socket_path) as on_a,
        connect(b.socket_path) as on_b,
        connect(c.socket_path) as on_c,
    ):
        async with (
            on_b.watch("ana") as mail,
            on_b.watch("assistant") as on_b_too,
            on_a.watch("assistant") as on_a_too,
        ):
            posted = [await on_b.post("ana", f"question {n}", to="assistant") for n in range(4)]
            with trio.fail_after(30):
                seen = [await anext(watch) for watch in (on_b_too, on_a_too) for _ in range(4)]
                await on_c.inbox("assistant")
                answers = [await anext(mail) for _ in range(4)]
        assert [m.msg_id for m in seen] == [p.msg_id for p in posted] * 2  # type: ignore[union-attr]
        assert sorted(m.reply_to for m in answers) == [p.msg_id for p in posted]  # type: ignore[union-attr]
        assert {m.sender for m in answers} == {"assistant"}
        stats = [await client.stats() for client in (on_a, on_b, on_c)]
        history = await on_a.history("assistant", "ana")
        sent = (await on_b.sent("ana")).items
    assert stats[1].runs_total == 0, "b hosts no assistant"
    assert stats[0].runs_total + stats[2].runs_total == 4, "each question answered once"
    asked = sorted(e.content for e in history.entries if e.role == "user")
    assert asked == [f"question {n}" for n in range(4)], "each asked once"
    assert {i.message.msg_id: i.message.answered_by for i in sent} == {
        m.reply_to: m.msg_id  # type: ignore[union-attr]
        for m in answers
    }


async def _running(client, agent: str, sender: str) -> bool:  # type: ignore[no-untyped-def]
    items = (await client.list_conversations(agent=agent, sender=sender)).items
    return bool(items) and items[0].running


class Receiver(http.server.ThreadingHTTPServer):
    """Webhook deliveries, on loopback: the time each came, by msg_id."""

    def __init__(self) -> None:
        self.came: dict[str, float] = {}
        self.changed = threading.Condition()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                with receiver.changed:
                    receiver.came[body["data"]["message"]["msg_id"]] = time.monotonic()
                    receiver.changed.notify_all()
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("cluster", ["processes"], indirect=True)
async def test_another_daemons_post_wakes_the_webhooks_at_once(cluster, receiver):
    """b's webhook hears of a's posts on the bus: each delivered well before b's poll
    (every SHARED_POLL_S) would find it, three times over, whenever in that poll's cycle."""
    a = cluster.start("a")
    config = (
        '[agents.assistant]\nprovider = "echo"\n\n[[webhooks]]\nname = "hook"\n'
        f'url = "http://127.0.0.1:{receiver.server_port}/hook"\nevents = ["dm"]\n'
    )
    b = cluster.start("b", config)
    async with connect(a.socket_path) as on_a, connect(b.socket_path) as on_b:
        await on_b.ping()  # answered once b serves: its webhook knows where it starts
        for n in range(3):
            sent = time.monotonic()
            posted = await on_a.post("ana", f"for the hook {n}", to="bo")

            def came(msg_id: str = posted.msg_id) -> float | None:
                with receiver.changed:
                    receiver.changed.wait_for(lambda: msg_id in receiver.came, timeout=10)
                    return receiver.came.get(msg_id)

            at = await trio.to_thread.run_sync(came)
            assert at is not None, f"the webhook was not called: {b.daemon.log_path.read_text()}"
            took = at - sent
            print(f"b's webhook was called {took:.3f} s after a's post")
            assert took < PUSHED_WITHIN_S, f"b's webhook was called {took:.2f} s after a's post"
