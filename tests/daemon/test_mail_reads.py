"""A `watch` with `reads` is told, in `mail_read` frames, which of its reader's mail became
`read`, by whichever path and client (docs/protocol.md section 14, "Push"); a watch
without it never is. Parties and the daemon are those of test_post_office.py, the other
daemon that of test_mail_news.py; time is the autojump clock's.
"""

from __future__ import annotations

import trio
from chinwag.daemon._mail_news import Read
from chinwag.protocol import (
    End,
    GetMessage,
    Mail,
    MailRead,
    MarkRead,
    MessageReply,
    Post,
    Posted,
    ServerMsg,
    Watch,
    Watching,
)
from test_connection import open_daemon
from test_mail_news import hear, open_shared
from test_post_office import Party, _id, party


async def watch(who: Party, *, reads: bool = True, updates: bool = False) -> int:
    rid = who.rid()
    await who.client.send(Watch(id=rid, reader=who.name, reads=reads, updates=updates))
    await who.frame(lambda m: _id(m) == rid and isinstance(m, Watching))
    return rid


async def pushed(who: Party, rid: int) -> ServerMsg:
    """The next frame of the watch ``rid``, whatever it is."""
    return await who.frame(lambda m: _id(m) == rid and isinstance(m, Mail | MailRead | End))


async def read(who: Party, rid: int) -> list[str]:
    frame = await pushed(who, rid)
    assert isinstance(frame, MailRead), frame
    return frame.msg_ids


async def reply(who: Party, msg_id: str, content: str) -> str:
    answer = await who.ask(Post, sender=who.name, to=[], content=content, reply_to=msg_id)
    assert isinstance(answer, Posted), answer
    return answer.msg_id


async def test_each_read_path_tells_a_watch_with_reads_which_msg_ids(autojump_clock):
    async with open_daemon() as daemon:
        ana = await party(daemon, "ana")
        bob = await party(daemon, "bob")
        elsewhere = await party(daemon, "bob", register=False)  # bob's other client
        rid = await watch(bob)
        sent = [(await ana.post(["bob"], f"n{n}")).msg_id for n in range(6)]
        assert [(await bob.mail(rid)).msg_id for _ in sent] == sent
        m1, m2, m3, m4, m5, m6 = sent

        # get_message by the recipient reads it; again, nothing moves and nothing is told.
        for _ in range(2):
            opened = await elsewhere.ask(GetMessage, reader="bob", msg_id=m1)
            assert isinstance(opened, MessageReply) and opened.state == "read"
        assert await read(bob, rid) == [m1]

        # inbox with mark_read: the page read (the newest), not what was read before.
        await elsewhere.inbox(reader="bob", limit=2, mark_read=True)
        assert await read(bob, rid) == [m5, m6]

        # mark_read of msg_ids: those that moved, in msg_id order, each once.
        await elsewhere.ok(MarkRead, reader="bob", msg_ids=[m2, m1, m2, "m000000000999"])
        assert await read(bob, rid) == [m2]

        # A reply reads its parent for the replier.
        await reply(elsewhere, m3, "on it")
        assert await read(bob, rid) == [m3]

        # mark_read of a thread: ana answers her own m3 to bob, in m3's thread.
        in_thread = await reply(ana, m3, "and one more thing")
        assert (await bob.mail(rid)).msg_id == in_thread
        await elsewhere.ok(MarkRead, reader="bob", thread_id=m3)
        assert await read(bob, rid) == [in_thread]

        # mark_read of everything: what was left.
        await elsewhere.ok(MarkRead, reader="bob", all=True)
        assert await read(bob, rid) == [m4]
        await elsewhere.ok(MarkRead, reader="bob", all=True)  # nothing left: nothing told

        # Nothing else was told: the next frame is the next message.
        last = (await ana.post(["bob"], "last")).msg_id
        assert (await bob.mail(rid)).msg_id == last


async def test_a_hosted_agents_mail_is_told_read_when_its_run_starts(autojump_clock):
    async with open_daemon() as daemon:
        ana = await party(daemon, "ana")
        assistant = await party(daemon, "assistant", register=False)
        rid = await watch(assistant)
        question = (await ana.post(["assistant"], "hello there")).msg_id
        assert (await assistant.mail(rid)).msg_id == question
        assert await read(assistant, rid) == [question]


async def test_a_watch_without_reads_is_never_told(autojump_clock):
    async with open_daemon() as daemon:
        ana = await party(daemon, "ana")
        bob = await party(daemon, "bob")
        rid = await watch(bob, reads=False, updates=True)
        sent = [(await ana.post(["bob"], f"n{n}")).msg_id for n in range(4)]
        await bob.ask(GetMessage, reader="bob", msg_id=sent[0])
        await bob.inbox(limit=1, mark_read=True)
        await reply(bob, sent[1], "ok")
        await bob.ok(MarkRead, reader="bob", all=True)
        last = (await ana.post(["bob"], "last")).msg_id
        frames = [await pushed(bob, rid) for _ in range(5)]
        assert [type(f) for f in frames] == [Mail] * 5
        assert [f.msg_id for f in frames if isinstance(f, Mail)] == [*sent, last]


async def test_a_read_of_many_comes_in_frames_within_max_frame_bytes(autojump_clock):
    async with open_daemon(max_frame_bytes=1024) as daemon:
        ana = await party(daemon, "ana")
        bob = await party(daemon, "bob")
        rid = await watch(bob)
        sent = [(await ana.post(["bob"], f"n{n}")).msg_id for n in range(40)]
        assert [(await bob.mail(rid)).msg_id for _ in sent] == sent
        await bob.ok(MarkRead, reader="bob", all=True)
        batches = [await read(bob, rid), await read(bob, rid)]
        assert [len(b) for b in batches] == [24, 16]  # (1024 - 256) // 32 msg_ids a frame
        assert [*batches[0], *batches[1]] == sent


async def test_a_read_beyond_the_watchs_buffer_drops_it_with_429(autojump_clock):
    """Its frames share the watch's buffer (``subscription_events``): one read of 80
    messages is four frames of at most 24, and a buffer of 2 (with the frame its
    sender waits for) takes three of them."""
    async with open_daemon(max_frame_bytes=1024, subscription_events=2) as daemon:
        ana = await party(daemon, "ana")
        bob = await party(daemon, "bob")
        rid = await watch(bob)
        for n in range(80):
            await ana.post(["bob"], f"n{n}")
            await bob.mail(rid)
        await bob.ok(MarkRead, reader="bob", all=True)
        assert [len(await read(bob, rid)) for _ in range(3)] == [24, 24, 24]
        end = await pushed(bob, rid)
        assert isinstance(end, End) and end.error is not None and end.error.code == 429, end


async def test_reads_are_news_told_to_and_heard_from_the_other_daemons(autojump_clock):
    async with open_shared() as (daemon, cluster, _):
        ana = await party(daemon, "ana")
        bob = await party(daemon, "bob")
        rid = await watch(bob)
        first = (await ana.post(["bob"], "first")).msg_id
        second = (await ana.post(["bob"], "second")).msg_id
        await bob.mails(rid, 2)

        cluster.told.clear()
        await bob.ok(MarkRead, reader="bob", msg_ids=[second, first])
        assert (Read("bob", [first, second]), None) in cluster.told
        assert await read(bob, rid) == [first, second]

        # Read on the other daemon: pushed here as told; another reader's, to nobody here.
        hear(daemon, Read("ana", [first]))
        hear(daemon, Read("bob", [second]))
        assert await read(bob, rid) == [second]
        with trio.move_on_after(5) as waited:
            frame = await pushed(bob, rid)
            raise AssertionError(f"told more: {frame}")
        assert waited.cancelled_caught
