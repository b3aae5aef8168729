"""Mail, part 2, end to end: the real `chinwag serve` on its default sqlite storage, over
its real socket: spaces pushed to their members, a private space, edits and reactions
pushed as `mail_update`, search, and locks that survive a restart (their expiry is
tested under the autojump clock, in tests/daemon/test_mail_spaces.py)."""

from __future__ import annotations

from typing import Any

from chinwag.protocol import (
    Edit,
    End,
    Error,
    GetMessage,
    ListSpaces,
    Lock,
    LockResult,
    Mail,
    MailUpdate,
    MessageReply,
    Messages,
    Ok,
    React,
    SearchMail,
    SpaceCreate,
    SpaceInvite,
    SpaceJoin,
    SpaceReply,
    Spaces,
    Unlock,
)
from test_mail_e2e import _id, peer


async def test_a_space_fans_out_to_its_watching_members_and_edits_follow(daemon):
    path = daemon.socket_path
    async with peer(path, "ana") as ana, peer(path, "bob") as bob, peer(path, "cy") as cy:
        created = await ana.ask(SpaceCreate, sender="ana", name="staging")
        assert isinstance(created, SpaceReply) and created.space.members == 1
        for who in (bob, cy):
            assert isinstance(await who.ask(SpaceJoin, sender=who.name, space="staging"), Ok)
        watches = {who.name: (await who.watch(updates=who is bob))[0] for who in (bob, cy)}

        posted = await ana.post(["#staging"], "v1.2 deployed to staging")
        assert sorted(posted.recipients) == ["bob", "cy"]
        for who in (bob, cy):
            (mail,) = await who.mails(watches[who.name], 1)
            assert (mail.msg_id, mail.message.space) == (posted.msg_id, "staging")

        edited = await ana.ask(Edit, sender="ana", msg_id=posted.msg_id, content="v1.2.1 deployed")
        assert isinstance(edited, MessageReply) and edited.message.version == 2
        reacted = await bob.ask(React, sender="bob", msg_id=posted.msg_id, emoji="🚀")
        assert isinstance(reacted, MessageReply)
        changes = []
        for _ in range(2):
            frame = await bob.frame(
                lambda m: _id(m) == watches["bob"] and isinstance(m, (Mail, MailUpdate, End))
            )
            assert isinstance(frame, MailUpdate), frame
            changes.append((frame.change, frame.message.content))
        assert changes == [("edit", "v1.2.1 deployed"), ("react", "v1.2.1 deployed")]
        # cy's watch asked for no updates: its next frame is the next message.
        later = await ana.post(["#staging"], "v1.3 tomorrow")
        (mail,) = await cy.mails(watches["cy"], 1)
        assert mail.msg_id == later.msg_id

        found = await cy.ask(SearchMail, reader="cy", query="deployed")
        assert isinstance(found, Messages)
        assert [i.message.msg_id for i in found.items] == [posted.msg_id]
        history = await cy.ask(GetMessage, reader="cy", msg_id=posted.msg_id, history=True)
        assert [v.content for v in history.versions] == ["v1.2 deployed to staging"]


async def test_a_private_space_stays_private_across_a_restart(daemon):
    path = daemon.socket_path
    async with peer(path, "ana") as ana, peer(path, "eve") as eve:
        await ana.ask(SpaceCreate, sender="ana", name="council", private=True)
        await ana.ask(SpaceInvite, sender="ana", space="council", name="bob")
        await ana.post(["#council"], "the vote is on tuesday")
        listed = await eve.ask(ListSpaces, reader="eve")
        assert isinstance(listed, Spaces) and listed.items == []
    daemon.restart()
    async with peer(path, "bob") as bob, peer(path, "eve") as eve:
        refused = await eve.ask(SearchMail, reader="eve", query="tuesday")
        assert isinstance(refused, Messages) and refused.items == []
        error = await eve.refused(SpaceJoin, sender="eve", space="council")
        assert error.code == 404
        page = await bob.ask(SearchMail, reader="bob", query="tuesday")
        assert [i.message.content for i in page.items] == ["the vote is on tuesday"]
        listed = await bob.ask(ListSpaces, reader="bob")
        assert [(s.name, s.members, s.messages) for s in listed.items] == [("council", 2, 1)]


async def lock(who: Any, resource: str, **fields: Any) -> LockResult:
    reply = await who.ask(Lock, sender=who.name, resource=resource, **fields)
    assert isinstance(reply, LockResult), reply
    return reply


async def test_locks_survive_a_restart(daemon):
    path = daemon.socket_path
    async with peer(path, "ana") as ana:
        assert (await lock(ana, "paths.py", ttl_s=3600)).acquired
    daemon.restart()
    async with peer(path, "bob") as bob:
        refused = await lock(bob, "paths.py")
        assert not refused.acquired
        assert [(h.holder, h.mode) for h in refused.holders] == [("ana", "exclusive")]
        error = await bob.ask(Unlock, sender="bob", resource="paths.py")
        assert isinstance(error, Error) and error.code == 403 and "bob" in error.message
