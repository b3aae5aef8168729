"""Mail, part 2, through the whole daemon in process: spaces, projects and focus, edits,
deletes, reactions and pins pushed as `mail_update`, search, and locks
(docs/protocol.md section 14). Parties and the daemon are those of test_post_office.py;
time is the autojump clock's.
"""

from __future__ import annotations

from typing import Any

import trio
from chinwag.protocol import (
    Delete,
    Edit,
    End,
    Error,
    Focus,
    GetContext,
    GetHistory,
    GetMessage,
    History,
    ListLocks,
    ListProjects,
    ListSpaces,
    Lock,
    LockResult,
    Locks,
    Mail,
    MailContext,
    MailUpdate,
    MarkRead,
    Members,
    MessageReply,
    Messages,
    Pin,
    Post,
    ProjectCreate,
    ProjectDelete,
    ProjectReply,
    Projects,
    ProjectUpdate,
    React,
    SearchMail,
    SpaceArchive,
    SpaceCreate,
    SpaceInvite,
    SpaceJoin,
    SpaceLeave,
    SpaceMembers,
    SpaceReply,
    Spaces,
    Unlock,
)
from test_connection import open_daemon
from test_post_office import Party, _id, party


async def space(who: Party, name: str, **fields: Any) -> SpaceReply:
    reply = await who.ask(SpaceCreate, sender=who.name, name=name, **fields)
    assert isinstance(reply, SpaceReply), reply
    return reply


async def spaces(who: Party, **fields: Any) -> dict[str, Any]:
    reply = await who.ask(ListSpaces, reader=who.name, **fields)
    assert isinstance(reply, Spaces), reply
    return {s.name: s for s in reply.items}


async def members(who: Party, name: str) -> list[str]:
    reply = await who.ask(SpaceMembers, space=name, reader=who.name)
    assert isinstance(reply, Members), reply
    return [m.name for m in reply.items]


async def message(who: Party, kind: type, /, **fields: Any) -> Any:
    reply = await who.ask(kind, sender=who.name, **fields)
    assert isinstance(reply, MessageReply), reply
    return reply.message


async def update(who: Party, rid: int) -> MailUpdate:
    frame = await who.frame(lambda m: _id(m) == rid and isinstance(m, (Mail, MailUpdate, End)))
    assert isinstance(frame, MailUpdate), frame
    return frame


async def search(who: Party, query: str, **fields: Any) -> list[str]:
    reply = await who.ask(SearchMail, reader=who.name, query=query, **fields)
    assert isinstance(reply, Messages), reply
    return [i.message.content for i in reply.items]


async def lock(who: Party, resource: str, **fields: Any) -> LockResult:
    reply = await who.ask(Lock, sender=who.name, resource=resource, **fields)
    assert isinstance(reply, LockResult), reply
    return reply


# --- spaces ---------------------------------------------------------------------------------


async def test_space_mail_reaches_every_member_but_the_author(autojump_clock):
    async with open_daemon() as daemon:
        ana, bob, cy, dee = [await party(daemon, n) for n in ("ana", "bob", "cy", "dee")]
        created = (await space(ana, "eng", description="engineering")).space
        assert (created.name, created.created_by, created.members) == ("eng", "ana", 1)
        await bob.ok(SpaceJoin, sender="bob", space="eng")
        await cy.ok(SpaceJoin, sender="cy", space="#ENG")
        assert await members(dee, "eng") == ["ana", "bob", "cy"]
        rid, _ = await bob.watch()

        posted = await ana.post(["#eng"], "v1.2 deployed to staging")
        assert sorted(posted.recipients) == ["bob", "cy"]
        pushed = (await bob.mail(rid)).message
        assert (pushed.space, pushed.content) == ("eng", "v1.2 deployed to staging")

        # A non-member may post; it receives nothing of the space's mail.
        from_outside = await dee.post(["#eng"], "hello from outside")
        assert sorted(from_outside.recipients) == ["ana", "bob", "cy"]
        assert (await dee.inbox()).items == []
        listed = await spaces(dee)
        assert (listed["eng"].members, listed["eng"].messages) == (3, 2)

        # Leaving stops the mail.
        await cy.ok(SpaceLeave, sender="cy", space="eng")
        assert (await ana.post(["#eng"], "after cy left")).recipients == ["bob"]
        await bob.ok(SpaceLeave, sender="bob", space="eng")
        alone = await ana.post(["#eng"], "anyone?")
        assert alone.warnings == ["It reaches nobody: #eng has no member but its author."]


async def test_an_unknown_space_is_404_and_nothing_is_stored(autojump_clock):
    async with open_daemon() as daemon:
        ana = await party(daemon, "ana")
        error = await ana.refused(
            Post,
            sender="ana",
            to=["bob", "#nowhere"],
            content="x",
        )
        assert error.code == 404 and "#nowhere" in error.message
        assert await ana.sent() == []
        assert (await ana.refused(SpaceJoin, sender="ana", space="nowhere")).code == 404


async def test_spaces_nest_three_deep_and_a_fourth_level_is_400(autojump_clock):
    async with open_daemon() as daemon:
        ana = await party(daemon, "ana")
        await space(ana, "org")
        await space(ana, "eng", parent="org")
        await space(ana, "backend", parent="#eng")
        error = await ana.refused(SpaceCreate, sender="ana", name="db", parent="backend")
        assert error.code == 400 and "3" in error.message
        assert (await ana.refused(SpaceCreate, sender="ana", name="eng")).code == 409
        assert (await ana.refused(SpaceCreate, sender="ana", name="x", parent="no")).code == 404
        assert list(await spaces(ana, top_level=True)) == ["org"]
        assert list(await spaces(ana, parent="eng")) == ["backend"]


async def test_a_private_space_is_for_its_members_and_those_they_invite(autojump_clock):
    async with open_daemon() as daemon:
        ana, bob, eve = [await party(daemon, n) for n in ("ana", "bob", "eve")]
        await space(ana, "secret", private=True)
        await ana.post(["#secret"], "the launch code is kiwi")
        # To eve it does not exist: not listed, no members, no posting, no joining.
        assert "secret" not in await spaces(eve)
        assert (await eve.refused(SpaceMembers, space="secret", reader="eve")).code == 404
        assert (await eve.refused(SpaceJoin, sender="eve", space="secret")).code == 404
        assert (await eve.refused(Post, sender="eve", to=["#secret"], content="hi")).code == 404
        assert await search(eve, "kiwi") == []
        assert (
            await eve.refused(SpaceInvite, sender="eve", space="secret", name="eve")
        ).code == 404

        await ana.ok(SpaceInvite, sender="ana", space="secret", name="bob")
        assert "secret" in await spaces(bob)
        page = await bob.inbox(space="secret")
        # Mail from before bob joined is readable, though bob is no recipient of it.
        assert [(i.message.content, i.state) for i in page.items] == [
            ("the launch code is kiwi", None)
        ]
        assert await search(bob, "kiwi") == ["the launch code is kiwi"]
        assert (await bob.post(["#secret"], "got it")).recipients == ["ana"]


async def test_an_archived_space_takes_no_more_mail_and_is_listed_on_request(autojump_clock):
    async with open_daemon() as daemon:
        ana, bob = await party(daemon, "ana"), await party(daemon, "bob")
        await space(ana, "old")
        assert (await bob.refused(SpaceArchive, sender="bob", space="old")).code == 403
        await ana.ok(SpaceArchive, sender="ana", space="old")
        assert (await ana.refused(Post, sender="ana", to=["#old"], content="x")).code == 409
        assert "old" not in await spaces(ana)
        assert (await spaces(ana, include_archived=True))["old"].archived


async def test_a_hosted_agent_mentioned_in_a_space_answers_into_the_space(autojump_clock):
    async with open_daemon() as daemon:
        ana, bob = await party(daemon, "ana"), await party(daemon, "bob")
        await space(ana, "eng")
        await bob.ok(SpaceJoin, sender="bob", space="eng")
        await ana.ok(SpaceJoin, sender="assistant", space="eng")
        rid, _ = await bob.watch()
        # Plain space mail does not ask the agent (a member) anything.
        await ana.post(["#eng"], "just news")
        assert (await bob.mail(rid)).message.content == "just news"
        assert daemon.runtime.stats().runs_total == 0

        asked = await ana.post(["#eng"], "what is two and two", mentions=["assistant"])
        assert (await bob.mail(rid)).msg_id == asked.msg_id
        answer = (await bob.mail(rid)).message
        assert (answer.sender, answer.space, answer.reply_to) == ("assistant", "eng", asked.msg_id)
        assert sorted(answer.recipients) == ["ana", "bob"]
        history = await ana.ask(GetHistory, agent="assistant", sender="#eng")
        assert isinstance(history, History)
        assert [e.content for e in history.entries] == ["what is two and two"] * 2


# --- projects and focus ------------------------------------------------------------------------


async def test_projects_group_spaces_and_cannot_be_deleted_while_used(autojump_clock):
    async with open_daemon() as daemon:
        ana = await party(daemon, "ana")
        created = await ana.ask(
            ProjectCreate,
            sender="ana",
            name="Web",
            description="the site",
            tags=["frontend"],
            settings={"review": True},
        )
        assert isinstance(created, ProjectReply) and created.project.name == "web"
        assert (await ana.refused(ProjectCreate, sender="ana", name="web")).code == 409
        updated = await ana.ask(ProjectUpdate, sender="ana", project="web", status="paused")
        assert isinstance(updated, ProjectReply)
        assert (updated.project.status, updated.project.tags) == ("paused", ["frontend"])
        listed = await ana.ask(ListProjects, status="paused")
        assert isinstance(listed, Projects) and [p.name for p in listed.items] == ["web"]

        await space(ana, "site", project="web")
        error = await ana.refused(ProjectDelete, sender="ana", project="web")
        assert error.code == 409 and "#site" in error.message
        assert (await ana.refused(SpaceCreate, sender="ana", name="x", project="nope")).code == 404
        await ana.ok(SpaceArchive, sender="ana", space="site")
        assert (await ana.refused(ProjectDelete, sender="ana", project="web")).code == 409
        await ana.ask(ProjectCreate, sender="ana", name="empty")
        await ana.ok(Focus, reader="ana", project="empty")
        await ana.ok(ProjectDelete, sender="ana", project="empty")
        # Whoever focused on it focuses on nothing: its inbox still reads.
        assert (await ana.inbox()).items == []
        context = await ana.ask(GetContext, reader="ana")
        assert isinstance(context, MailContext) and context.focus is None
        listed = await ana.ask(ListProjects)
        assert isinstance(listed, Projects) and [p.name for p in listed.items] == ["web"]


async def test_focus_narrows_inbox_spaces_and_search_to_a_project(autojump_clock):
    async with open_daemon() as daemon:
        ana, bob = await party(daemon, "ana"), await party(daemon, "bob")
        for project in ("web", "db"):
            await ana.ask(ProjectCreate, sender="ana", name=project)
        await space(ana, "site", project="web")
        await space(ana, "tables", project="db")
        for name in ("site", "tables"):
            await bob.ok(SpaceJoin, sender="bob", space=name)
        await ana.post(["#site"], "release the site banana")
        await ana.post(["#tables"], "migrate the tables banana")
        await ana.post(["bob"], "a direct banana")

        await bob.ok(Focus, reader="bob", project="web")
        assert [i.message.content for i in (await bob.inbox()).items] == [
            "a direct banana",
            "release the site banana",
        ]
        assert list(await spaces(bob)) == ["site"]
        assert sorted(await search(bob, "banana")) == [
            "a direct banana",
            "release the site banana",
        ]
        # A request naming another project overrides the focus.
        assert list(await spaces(bob, project="db")) == ["tables"]
        context = await bob.ask(GetContext, reader="bob")
        assert isinstance(context, MailContext) and context.focus == "web"
        assert context.spaces == ["site", "tables"]

        await bob.ok(Focus, reader="bob", project=None)
        assert len((await bob.inbox()).items) == 3
        assert (await bob.refused(Focus, reader="bob", project="nope")).code == 404


# --- edits, deletes, reactions, pins --------------------------------------------------------


async def test_an_edit_is_the_authors_keeps_every_version_and_reaches_watchers(autojump_clock):
    async with open_daemon() as daemon:
        ana, bob = await party(daemon, "ana"), await party(daemon, "bob")
        rid, _ = await bob.watch(updates=True)
        posted = await ana.post(["bob"], "first draft")
        await bob.mail(rid)
        assert (
            await bob.refused(Edit, sender="bob", msg_id=posted.msg_id, content="x")
        ).code == 403

        await trio.sleep(5)
        edited = await message(ana, Edit, msg_id=posted.msg_id, content="second draft")
        assert (edited.content, edited.version) == ("second draft", 2)
        assert edited.edited_at is not None and edited.edited_at > edited.created_at
        pushed = await update(bob, rid)
        assert (pushed.change, pushed.msg_id, pushed.message.content) == (
            "edit",
            posted.msg_id,
            "second draft",
        )
        await message(ana, Edit, msg_id=posted.msg_id, content="final")
        await update(bob, rid)

        reply = await bob.ask(GetMessage, reader="bob", msg_id=posted.msg_id, history=True)
        assert isinstance(reply, MessageReply) and reply.versions is not None
        assert [(v.version, v.content) for v in reply.versions] == [
            (1, "first draft"),
            (2, "second draft"),
        ]
        assert reply.message.version == 3
        assert await search(bob, "draft") == []
        assert await search(bob, "final") == ["final"]


async def test_a_delete_is_soft_hidden_from_inbox_and_search_unless_asked(autojump_clock):
    async with open_daemon() as daemon:
        ana, bob = await party(daemon, "ana"), await party(daemon, "bob")
        rid, _ = await bob.watch(updates=True)
        posted = await ana.post(["bob"], "oops wrong pineapple")
        await ana.post(["bob"], "right one")
        await bob.mails(rid, 2)
        assert (await bob.refused(Delete, sender="bob", msg_id=posted.msg_id)).code == 403
        deleted = await message(ana, Delete, msg_id=posted.msg_id, reason="wrong chat")
        assert (deleted.deleted, deleted.delete_reason) == (True, "wrong chat")
        assert (await update(bob, rid)).change == "delete"

        assert [i.message.content for i in (await bob.inbox()).items] == ["right one"]
        shown = (await bob.inbox(include_deleted=True)).items
        assert [i.message.deleted for i in shown] == [False, True]
        assert await search(bob, "pineapple") == []
        error = await ana.refused(Edit, sender="ana", msg_id=posted.msg_id, content="fixed")
        assert error.code == 409


async def test_reactions_are_summarised_and_pins_listed(autojump_clock):
    async with open_daemon() as daemon:
        ana, bob, cy = [await party(daemon, n) for n in ("ana", "bob", "cy")]
        await space(ana, "eng")
        for who in (bob, cy):
            await who.ok(SpaceJoin, sender=who.name, space="eng")
        rid, _ = await ana.watch(updates=True)
        posted = await ana.post(["#eng"], "ship it?")
        await ana.post(["#eng"], "unrelated")
        await message(bob, React, msg_id=posted.msg_id, emoji="👍")
        await message(cy, React, msg_id=posted.msg_id, emoji="👍")
        await message(cy, React, msg_id=posted.msg_id, emoji="🎉")
        again = await message(cy, React, msg_id=posted.msg_id, emoji="👍")
        assert [(r.emoji, r.by) for r in again.reactions] == [("👍", ["bob", "cy"]), ("🎉", ["cy"])]
        removed = await message(cy, React, msg_id=posted.msg_id, emoji="🎉", remove=True)
        assert [(r.emoji, r.by) for r in removed.reactions] == [("👍", ["bob", "cy"])]
        # The author watches its own message's reactions.
        assert [(await update(ana, rid)).change for _ in range(5)] == ["react"] * 5
        assert (
            await ana.refused(React, sender="ana", msg_id=posted.msg_id, emoji="a b")
        ).code == 400

        pinned = await message(bob, Pin, msg_id=posted.msg_id)
        assert (pinned.pinned, pinned.pinned_by) == (True, "bob")
        assert (await update(ana, rid)).change == "pin"
        page = await cy.inbox(space="eng", pinned_only=True)
        assert [i.message.msg_id for i in page.items] == [posted.msg_id]
        outsider = await party(daemon, "dee")
        assert (await outsider.refused(Pin, sender="dee", msg_id=posted.msg_id)).code == 403
        unpinned = await message(bob, Pin, msg_id=posted.msg_id, unpin=True)
        assert not unpinned.pinned and unpinned.pinned_by is None


async def test_mark_read_of_a_space_reads_its_mail_only(autojump_clock):
    async with open_daemon() as daemon:
        ana, bob = await party(daemon, "ana"), await party(daemon, "bob")
        await space(ana, "eng")
        await bob.ok(SpaceJoin, sender="bob", space="eng")
        await ana.post(["#eng"], "one")
        await ana.post(["#eng"], "two")
        await ana.post(["bob"], "direct")
        await bob.ok(MarkRead, reader="bob", space="eng")
        assert [i.message.content for i in (await bob.inbox(unread_only=True)).items] == ["direct"]


# --- search ---------------------------------------------------------------------------------


async def test_search_finds_best_first_only_what_the_searcher_may_read(autojump_clock):
    async with open_daemon() as daemon:
        ana, bob, eve = [await party(daemon, n) for n in ("ana", "bob", "eve")]
        await space(ana, "eng")
        await ana.post(["bob"], "the auth module leaks tokens; auth needs a fix")
        await ana.post(["bob"], "lunch at noon")
        await ana.post(["eve"], "auth is fine by me")  # bob may not read it
        await ana.post(["#eng"], "auth review friday")  # public: bob may read it
        # Best first: the one message with both words, then those with one.
        assert await search(bob, "auth tokens") == [
            "the auth module leaks tokens; auth needs a fix",
            "auth review friday",
        ]
        assert await search(bob, "TOKENS lunch", limit=1) != []
        assert len(await search(bob, "auth", limit=1)) == 1
        assert set(await search(ana, "auth")) == {
            "the auth module leaks tokens; auth needs a fix",
            "auth is fine by me",
            "auth review friday",
        }
        assert (await eve.refused(SearchMail, reader="eve", query="  ?! ")).code == 400


# --- locks ------------------------------------------------------------------------------------


async def test_an_exclusive_lock_is_refused_naming_its_holder_until_released(autojump_clock):
    async with open_daemon() as daemon:
        ana, bob = await party(daemon, "ana"), await party(daemon, "bob")
        taken = await lock(ana, "paths.py", mode="exclusive", ttl_s=60)
        assert taken.acquired and taken.expires_at is not None
        refused = await lock(bob, "paths.py", mode="advisory")
        assert not refused.acquired and refused.expires_at is None
        assert [(h.holder, h.mode) for h in refused.holders] == [("ana", "exclusive")]
        assert (await bob.refused(Unlock, sender="bob", resource="paths.py")).code == 403
        await ana.ok(Unlock, sender="ana", resource="paths.py")
        assert (await lock(bob, "paths.py", mode="exclusive")).acquired


async def test_advisory_locks_share_and_keep_out_an_exclusive_one(autojump_clock):
    async with open_daemon() as daemon:
        ana, bob, cy = [await party(daemon, n) for n in ("ana", "bob", "cy")]
        assert (await lock(ana, "db", mode="advisory")).acquired
        both = await lock(bob, "db", mode="advisory")
        assert both.acquired and [h.holder for h in both.holders] == ["ana", "bob"]
        assert not (await lock(cy, "db", mode="exclusive")).acquired
        listed = await cy.ask(ListLocks, resource="db")
        assert isinstance(listed, Locks) and [h.holder for h in listed.items] == ["ana", "bob"]
        held = await cy.ask(ListLocks, holder="bob")
        assert isinstance(held, Locks) and [h.resource for h in held.items] == ["db"]
        context = await ana.ask(GetContext, reader="ana")
        assert isinstance(context, MailContext) and [h.resource for h in context.locks] == ["db"]


async def test_a_lock_expires_at_its_ttl_unless_renewed(autojump_clock):
    async with open_daemon() as daemon:
        ana, bob = await party(daemon, "ana"), await party(daemon, "bob")
        first = await lock(ana, "deploy", ttl_s=60)
        await trio.sleep(50)
        renewed = await lock(ana, "deploy", ttl_s=60)  # taking it again renews it
        assert renewed.acquired and renewed.expires_at is not None
        assert first.expires_at is not None and renewed.expires_at > first.expires_at
        (holder,) = renewed.holders
        assert holder.acquired_at == first.holders[0].acquired_at
        await trio.sleep(50)  # 100 s after the first take: alive only thanks to the renewal
        assert not (await lock(bob, "deploy")).acquired
        await trio.sleep(11)
        assert (await lock(bob, "deploy")).acquired
        assert (await ana.refused(Unlock, sender="ana", resource="deploy")).code == 403


async def test_bad_lock_requests_are_400(autojump_clock):
    async with open_daemon() as daemon:
        ana = await party(daemon, "ana")
        for fields in ({"resource": ""}, {"resource": "x", "ttl_s": 0}, {"resource": "a\nb"}):
            error = await ana.refused(Lock, sender="ana", **fields)
            assert error.code == 400 and error.message.endswith("."), error
        assert isinstance(await ana.ask(Lock, sender="ana", resource="x" * 300), Error)
