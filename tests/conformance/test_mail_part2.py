"""The MailStore conformance suite, part 2: message changes and versions, search, space
mail, spaces and members, projects, locks. Every backend passes it unchanged; the
contract is the docstrings of storage/_mail.py. Helpers are test_mail.py's.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import msgspec
import pytest
import trio
from chinwag.protocol import Delivery, LockHolder, MessageVersion, Project, Space, SpaceMember
from chinwag.storage import (
    DeleteChange,
    EditChange,
    FromSpace,
    InboxQuery,
    MessageChange,
    NotAMember,
    PinChange,
    ReactChange,
    StateChange,
    Storage,
    StorageError,
    msg_id_of,
)
from test_mail import AUTH, MANY, STORE_CLOSED, T0, Reopen, at, ids, mail, post


def space(name: str, **fields: object) -> Space:
    return Space(name=name, created_by="alice", created_at=T0, **fields)  # type: ignore[arg-type]


def project(name: str, **fields: object) -> Project:
    return Project(
        name=name,
        created_by="alice",
        created_at=T0,
        updated_at=T0,
        **fields,  # type: ignore[arg-type]
    )


def holder(resource: str, name: str, mode: str = "exclusive", *, ttl: float = 60) -> LockHolder:
    return LockHolder(
        resource=resource,
        holder=name,
        mode=mode,  # type: ignore[arg-type]
        acquired_at=T0,
        expires_at=T0 + timedelta(seconds=ttl),
    )


async def search(store: Storage, name: str, *words: str, **fields: object) -> list[str]:
    fields.setdefault("readable_spaces", [])
    fields.setdefault("limit", MANY)
    found = await store.mail.search(name, list(words), **fields)  # type: ignore[arg-type]
    return [m.content for m in found]


# --- changes to messages ----------------------------------------------------------------


async def test_an_edit_keeps_the_version_it_replaced_and_changes_what_search_finds(
    store: Storage,
) -> None:
    posted = await post(store, content="the first wombat", structured={"n": 1})
    edited = await store.mail.change_message(
        posted.msg_id, EditChange(content="the second koala", structured={"n": 2}, at=at(10))
    )
    assert edited is not None
    assert (edited.content, edited.structured, edited.version, edited.edited_at) == (
        "the second koala",
        {"n": 2},
        2,
        at(10),
    )
    await store.mail.change_message(posted.msg_id, EditChange(content="a third", at=at(20)))
    versions = await store.mail.versions(posted.msg_id)
    assert [(v.version, v.content, v.structured) for v in versions] == [
        (1, "the first wombat", {"n": 1}),
        (2, "the second koala", {"n": 2}),
    ]
    assert [(v.created_at, v.replaced_at) for v in versions] == [(T0, at(10)), (at(10), at(20))]
    now = await store.mail.get_message(posted.msg_id)
    assert now is not None and (now.content, now.version) == ("a third", 3)
    assert await search(store, "bob", "wombat") == []
    assert await search(store, "bob", "koala") == []
    assert await search(store, "bob", "third") == ["a third"]
    assert await store.mail.versions(msg_id_of(99)) == []
    assert await store.mail.change_message(msg_id_of(99), DeleteChange(at=T0)) is None
    assert await store.mail.change_message("nonsense", DeleteChange(at=T0)) is None


async def test_a_delete_is_soft_and_leaves_inbox_and_search_unless_asked(store: Storage) -> None:
    kept = await post(store, content="keep this apple")
    gone = await post(store, content="drop this apple")
    deleted = await store.mail.change_message(
        gone.msg_id, DeleteChange(reason="wrong chat", at=at(5))
    )
    assert deleted is not None and (deleted.deleted, deleted.delete_reason) == (True, "wrong chat")
    assert deleted.content == "drop this apple"
    rows = await store.mail.inbox("bob", InboxQuery(), limit=MANY)
    assert [m.msg_id for m, _ in rows] == [kept.msg_id]
    rows = await store.mail.inbox("bob", InboxQuery(include_deleted=True), limit=MANY)
    assert [m.msg_id for m, _ in rows] == [gone.msg_id, kept.msg_id]
    assert await search(store, "bob", "apple") == ["keep this apple"]
    assert [m.msg_id for m in await store.mail.thread(gone.msg_id)] == []  # no thread: none


async def test_reactions_add_once_remove_and_keep_their_order(store: Storage) -> None:
    posted = await post(store)
    for by, emoji in [("bob", "👍"), ("carol", "🎉"), ("carol", "👍"), ("bob", "👍")]:
        await store.mail.change_message(posted.msg_id, ReactChange(emoji=emoji, by=by))
    now = await store.mail.get_message(posted.msg_id)
    assert now is not None
    assert [(r.emoji, r.by) for r in now.reactions] == [("👍", ["bob", "carol"]), ("🎉", ["carol"])]
    await store.mail.change_message(posted.msg_id, ReactChange(emoji="🎉", by="carol", remove=True))
    await store.mail.change_message(posted.msg_id, ReactChange(emoji="👀", by="dan", remove=True))
    now = await store.mail.get_message(posted.msg_id)
    assert now is not None and [(r.emoji, r.by) for r in now.reactions] == [
        ("👍", ["bob", "carol"])
    ]


async def test_changes_at_once_are_each_made(store: Storage) -> None:
    posted = await post(store)
    names = [f"r{n}" for n in range(8)]
    async with trio.open_nursery() as nursery:
        for name in names:
            nursery.start_soon(
                store.mail.change_message, posted.msg_id, ReactChange(emoji="👍", by=name)
            )
    now = await store.mail.get_message(posted.msg_id)
    assert now is not None and [(r.emoji, sorted(r.by)) for r in now.reactions] == [("👍", names)]


async def test_pins_are_kept_with_who_and_when_and_filter_the_inbox(store: Storage) -> None:
    first = await post(store, content="one")
    await post(store, content="two")
    pinned = await store.mail.change_message(first.msg_id, PinChange(by="bob", at=at(3)))
    assert pinned is not None and (pinned.pinned, pinned.pinned_by, pinned.pinned_at) == (
        True,
        "bob",
        at(3),
    )
    rows = await store.mail.inbox("bob", InboxQuery(pinned_only=True), limit=MANY)
    assert [m.msg_id for m, _ in rows] == [first.msg_id]
    unpinned = await store.mail.change_message(
        first.msg_id, PinChange(by="bob", at=at(4), unpin=True)
    )
    assert unpinned is not None
    assert (unpinned.pinned, unpinned.pinned_by, unpinned.pinned_at) == (False, None, None)
    assert await store.mail.inbox("bob", InboxQuery(pinned_only=True), limit=MANY) == []


async def test_changes_survive_a_reopen(store: Storage, reopen: Reopen) -> None:
    posted = await post(store, content="before")
    await store.mail.change_message(posted.msg_id, EditChange(content="after", at=at(1)))
    await store.mail.change_message(posted.msg_id, ReactChange(emoji="👍", by="bob"))
    await store.mail.change_message(posted.msg_id, PinChange(by="bob", at=at(2)))
    other = await post(store, content="to delete")
    await store.mail.change_message(other.msg_id, DeleteChange(at=at(3)))
    before = [await store.mail.get_message(m) for m in (posted.msg_id, other.msg_id)]
    store = await reopen(store)
    assert [await store.mail.get_message(m) for m in (posted.msg_id, other.msg_id)] == before
    assert [v.content for v in await store.mail.versions(posted.msg_id)] == ["before"]
    assert await search(store, "bob", "after") == ["after"]
    assert await search(store, "bob", "delete") == []


async def test_what_is_given_or_read_back_stays_the_callers(store: Storage) -> None:
    posted = await post(store, structured={"n": [1]})
    edit = EditChange(content="new", structured={"n": [2]}, at=at(1))
    await store.mail.change_message(posted.msg_id, edit)
    edit.structured["n"].append(3)  # type: ignore[index]
    (version,) = await store.mail.versions(posted.msg_id)
    version.structured["n"].append(4)
    assert await store.mail.versions(posted.msg_id) == [
        MessageVersion(
            version=1, content="hello", structured={"n": [1]}, created_at=T0, replaced_at=at(1)
        )
    ]
    now = await store.mail.get_message(posted.msg_id)
    assert now is not None and now.structured == {"n": [2]}

    given = project("web", tags=["ui"], settings={"a": [1]})
    await store.mail.put_project(given)
    given.tags.append("given")
    given.settings["a"].append(2)
    (read,) = await store.mail.projects()
    read.settings["a"].append(3)
    assert await store.mail.projects() == [project("web", tags=["ui"], settings={"a": [1]})]

    eng = space("eng")
    await store.mail.put_space(eng)
    eng.description = "given"
    (listed,) = await store.mail.spaces()
    listed.description = "read"
    assert await store.mail.spaces() == [space("eng")]

    await store.mail.set_member("eng", "bob", at(1), member=True)
    (members,) = (await store.mail.members()).values()
    members.clear()
    assert [m.name for m in (await store.mail.members())["eng"]] == ["bob"]

    lock = holder("db", "bob")
    _, (held,) = await store.mail.take_lock(lock, T0)
    lock.expires_at = at(1)
    held.mode = "advisory"
    (live,) = await store.mail.locks(T0)
    live.holder = "mallory"
    taken, (refused_by,) = await store.mail.take_lock(holder("db", "carol"), T0)
    assert not taken
    refused_by.expires_at = at(1)
    assert await store.mail.locks(at(30)) == [holder("db", "bob")]


# --- search -------------------------------------------------------------------------------


async def test_search_finds_only_what_the_name_may_read(store: Storage) -> None:
    await post(store, "alice", ["bob"], "auth to bob")
    await post(store, "bob", ["carol"], "auth from bob")
    await post(store, "alice", ["carol"], "auth to carol")
    await post(store, "alice", ["dan"], "auth in eng", space="eng")
    await post(store, "alice", ["dan"], "auth in ops", space="ops")
    assert sorted(await search(store, "bob", "auth")) == ["auth from bob", "auth to bob"]
    assert sorted(await search(store, "bob", "auth", readable_spaces=["eng"])) == [
        "auth from bob",
        "auth in eng",
        "auth to bob",
    ]
    assert sorted(await search(store, "dan", "auth", only_spaces=["ops"])) == ["auth in ops"]
    assert sorted(await search(store, "alice", "auth", only_spaces=[])) == [
        "auth to bob",
        "auth to carol",
    ]
    assert await search(store, "bob") == []
    assert await search(store, "nobody", "auth") == []


async def test_search_ranks_best_first_newer_first_on_a_tie_and_keeps_its_limit(
    store: Storage,
) -> None:
    await post(store, content="deploy")
    await post(store, content="the deploy of the staging cluster")
    both = await post(store, content="deploy the staging cluster")
    tie = await post(store, content="deploy")
    found = await store.mail.search("bob", ["staging", "deploy"], readable_spaces=[], limit=MANY)
    # Both words, the shorter text first; then the rarer word's absence puts the rest behind.
    assert ids(found) == [both.msg_id, msg_id_of(2), tie.msg_id, msg_id_of(1)], [
        m.content for m in found
    ]
    only = await store.mail.search("bob", ["deploy"], readable_spaces=[], limit=2)
    assert only[0].msg_id == tie.msg_id and len(only) == 2  # shortest first, the newer of two


async def test_search_matches_any_word_in_any_case_and_each_message_once(store: Storage) -> None:
    await post(store, "alice", ["bob"], "Deploy the API", space="eng")
    await post(store, "bob", ["alice"], "ROLLBACK now", space="eng")
    await post(store, "alice", ["bob"], "nothing to see")
    # bob may read both twice over (recipient or author, and the space's reader).
    found = await search(store, "bob", "deploy", "rollback", readable_spaces=["eng", "eng"])
    assert sorted(found) == ["Deploy the API", "ROLLBACK now"]
    assert await search(store, "bob", "absent") == []


async def test_search_of_a_space_reader_follows_edits_and_deletes(store: Storage) -> None:
    first = await post(store, "alice", ["bob"], "rotate the keys", space="sec")
    await post(store, "alice", ["bob"], "rotate the logs", space="sec")
    assert sorted(await search(store, "carol", "rotate", readable_spaces=["sec"])) == [
        "rotate the keys",
        "rotate the logs",
    ]
    await store.mail.change_message(first.msg_id, EditChange(content="renew the keys", at=at(1)))
    assert await search(store, "carol", "rotate", readable_spaces=["sec"]) == ["rotate the logs"]
    assert await search(store, "carol", "renew", readable_spaces=["sec"]) == ["renew the keys"]
    await store.mail.change_message(first.msg_id, DeleteChange(at=at(2)))
    assert await search(store, "carol", "renew", "keys", readable_spaces=["sec"]) == []
    assert await search(store, "alice", "renew") == []  # not even for its author


# --- space mail and new mail -------------------------------------------------------------------


async def test_space_mail_lists_the_space_with_the_readers_delivery_or_none(
    store: Storage,
) -> None:
    old = await post(store, "alice", ["bob"], "before carol", space="eng")
    await post(store, "alice", ["bob"], "elsewhere", space="ops")
    new = await post(
        store,
        "alice",
        ["bob", "carol"],
        "for carol",
        space="eng",
        deliveries=[Delivery(name="bob"), Delivery(name="carol", mentioned=True)],
    )
    rows = await store.mail.space_mail("eng", "carol", InboxQuery(), limit=MANY)
    assert [(m.msg_id, d is None) for m, d in rows] == [(new.msg_id, False), (old.msg_id, True)]
    rows = await store.mail.space_mail("eng", "carol", InboxQuery(unread_only=True), limit=MANY)
    assert [m.msg_id for m, _ in rows] == [new.msg_id]
    rows = await store.mail.space_mail("eng", "carol", InboxQuery(mentions_only=True), limit=MANY)
    assert [m.msg_id for m, _ in rows] == [new.msg_id]
    rows = await store.mail.space_mail("eng", "bob", InboxQuery(), limit=1, before=new.msg_id)
    assert [m.msg_id for m, _ in rows] == [old.msg_id]
    assert await store.mail.space_mail("nowhere", "bob", InboxQuery(), limit=MANY) == []


async def test_space_mail_filters_as_inbox_does_and_pages_every_match_once(
    store: Storage,
) -> None:
    posted = [
        (
            await post(
                store,
                "alice",
                ["bob"],
                f"n{n}",
                when=at(10 * n),
                space="eng",
                priority=n % 2,
                channel="ops" if n % 3 == 0 else None,
                scopes=[AUTH] if n % 2 == 0 else [],
                thread_id="t" if n >= 4 else None,
            )
        ).msg_id
        for n in range(6)
    ]
    await post(store, "alice", ["bob"], "not in eng")
    await store.mail.advance([StateChange(posted[1], "bob", "read", at(1))])
    await store.mail.change_message(posted[2], DeleteChange(at=at(2)))
    await store.mail.change_message(posted[3], PinChange(by="bob", at=at(3)))

    async def listed(query: InboxQuery, limit: int = MANY) -> list[str]:
        return [m.msg_id for m, _ in await store.mail.space_mail("eng", "bob", query, limit=limit)]

    n0, n1, n2, n3, n4, n5 = posted
    assert await listed(InboxQuery()) == [n5, n4, n3, n1, n0]
    assert await listed(InboxQuery(include_deleted=True)) == [n5, n4, n3, n2, n1, n0]
    assert await listed(InboxQuery(unread_only=True)) == [n5, n4, n3, n0]
    assert await listed(InboxQuery(pinned_only=True)) == [n3]
    assert await listed(InboxQuery(priority_min=1)) == [n5, n3, n1]
    assert await listed(InboxQuery(channel="ops")) == [n3, n0]
    assert await listed(InboxQuery(scope=AUTH)) == [n4, n0]
    assert await listed(InboxQuery(thread_id="t")) == [n5, n4]
    assert await listed(InboxQuery(since=at(30))) == [n5, n4, n3]
    assert await listed(InboxQuery(unread_only=True), limit=2) == [n5, n4]
    pages: list[str] = []
    before: str | None = None
    while page := [
        m.msg_id
        for m, _ in await store.mail.space_mail("eng", "bob", InboxQuery(), limit=2, before=before)
    ]:
        pages += page
        before = page[-1]
    assert pages == [n5, n4, n3, n1, n0]


async def test_only_spaces_narrows_space_mail_and_lets_other_mail_pass(store: Storage) -> None:
    direct = await post(store, content="direct")
    web = await post(store, content="web", space="web")
    await post(store, content="db", space="db")
    rows = await store.mail.inbox("bob", InboxQuery(only_spaces=("web",)), limit=MANY)
    assert [m.msg_id for m, _ in rows] == [web.msg_id, direct.msg_id]


async def test_messages_after_pages_every_message_in_order(store: Storage) -> None:
    posted = [(await post(store, "alice", [f"r{n}"], f"m{n}")).msg_id for n in range(5)]
    assert [m.msg_id for m in await store.mail.messages_after(None, limit=MANY)] == posted
    assert [m.msg_id for m in await store.mail.messages_after(posted[1], limit=2)] == posted[2:4]
    assert await store.mail.messages_after(posted[-1], limit=MANY) == []
    await store.mail.change_message(posted[2], DeleteChange(at=at(1)))
    after = await store.mail.messages_after(posted[1], limit=1)
    assert [(m.msg_id, m.deleted) for m in after] == [(posted[2], True)]  # deleted ones too


# --- spaces, members, projects ----------------------------------------------------------------


async def test_spaces_are_created_replaced_and_read_back_without_counts(store: Storage) -> None:
    await store.mail.put_space(space("eng", description="engineering"))
    await store.mail.put_space(space("api", parent="eng", project="web", private=True))
    await store.mail.put_space(space("eng", description="renamed", members=7, messages=9))
    spaces = await store.mail.spaces()
    assert [(s.name, s.description, s.members, s.messages) for s in spaces] == [
        ("api", "", 0, 0),
        ("eng", "renamed", 0, 0),
    ]
    assert (spaces[0].parent, spaces[0].project, spaces[0].private) == ("eng", "web", True)


async def test_replacing_a_space_keeps_its_members(store: Storage) -> None:
    await store.mail.put_space(space("eng"))
    await store.mail.set_member("eng", "bob", at(1), member=True)
    await store.mail.put_space(space("eng", description="renamed", archived=True))
    members = await store.mail.members()
    assert {s: [(m.name, m.joined_at) for m in ms] for s, ms in members.items()} == {
        "eng": [("bob", at(1))]
    }
    (eng,) = await store.mail.spaces()
    assert (eng.description, eng.archived, eng.members) == ("renamed", True, 0)


async def test_members_join_once_keep_their_time_and_leave(store: Storage) -> None:
    assert await store.mail.set_member("eng", "bob", at(1), member=True)
    assert await store.mail.set_member("eng", "alice", at(2), member=True)
    assert not await store.mail.set_member("eng", "bob", at(3), member=True)
    assert await store.mail.set_member("ops", "bob", at(4), member=True)
    members = await store.mail.members()
    assert {s: [(m.name, m.joined_at) for m in ms] for s, ms in members.items()} == {
        "eng": [("alice", at(2)), ("bob", at(1))],
        "ops": [("bob", at(4))],
    }
    assert await store.mail.set_member("ops", "bob", at(5), member=False)
    assert not await store.mail.set_member("ops", "bob", at(6), member=False)
    assert set(await store.mail.members()) == {"eng"}
    assert await store.mail.set_member("ops", "bob", at(7), member=True)  # back: since now
    assert [(m.name, m.joined_at) for m in (await store.mail.members())["ops"]] == [("bob", at(7))]


async def test_a_post_from_its_space_reaches_the_members_stored_as_it_is(
    store: Storage,
) -> None:
    """The post office's list of members said bob and cy; the store says ana (the
    author), bob and dee: cy left and dee joined."""
    for name in ("ana", "bob", "cy"):
        await store.mail.set_member("eng", name, at(1), member=True)
    await store.mail.set_member("eng", "cy", at(2), member=False)
    await store.mail.set_member("eng", "dee", at(2), member=True)
    message = msgspec.structs.replace(
        mail("ana", ["#eng", "erin"], space="eng"), recipients=["bob", "cy", "erin"]
    )
    given = [
        Delivery(name="bob", state="delivered", delivered_at=at(0)),
        Delivery(name="cy"),
        Delivery(name="erin", mentioned=True),
    ]
    from_space = FromSpace(named=frozenset({"erin"}), live=frozenset({"dee", "cy"}))
    stored, created = await store.mail.post(message, given, from_space=from_space)
    assert created and stored.recipients == ["bob", "erin", "dee"]
    found = {d.name: d for d in (await store.mail.deliveries([stored.msg_id]))[stored.msg_id]}
    assert found == {
        "bob": given[0],
        "erin": given[2],
        "dee": Delivery(name="dee", state="delivered", delivered_at=message.created_at),
    }
    assert await store.mail.received("cy", after=None, limit=MANY) == []
    assert (await store.mail.get_message(stored.msg_id)) == stored


async def test_a_post_to_a_private_space_from_one_no_member_as_stored_stores_nothing(
    store: Storage,
) -> None:
    """cy left the private den (on another daemon, as the post office has yet to hear):
    its post raises NotAMember and takes no number; a member's post is stored."""
    for name in ("ana", "bob", "cy"):
        await store.mail.set_member("den", name, at(1), member=True)
    await store.mail.set_member("den", "cy", at(2), member=False)
    private = FromSpace(members_only=True)
    left = msgspec.structs.replace(mail("cy", ["#den"], space="den"), recipients=["ana", "bob"])
    given = [Delivery(name="ana"), Delivery(name="bob")]
    with pytest.raises(NotAMember, match="cy is no member of #den"):
        await store.mail.post(left, given, from_space=private)
    assert await store.mail.received("ana", after=None, limit=MANY) == []
    member = msgspec.structs.replace(
        mail("bob", ["#den"], space="den", idempotency_key="k"), recipients=["ana", "cy"]
    )
    stored, created = await store.mail.post(member, [Delivery(name="ana")], from_space=private)
    assert created and stored.msg_id == msg_id_of(1) and stored.recipients == ["ana"]
    # bob leaves, and its retry of the post it made as a member answers with that post.
    await store.mail.set_member("den", "bob", at(3), member=False)
    again, created = await store.mail.post(member, [Delivery(name="ana")], from_space=private)
    assert (again, created) == (stored, False)


async def test_space_counts_count_each_spaces_messages(store: Storage) -> None:
    assert await store.mail.space_counts() == {}
    for name in ("eng", "eng", "ops"):
        await post(store, space=name)
    await post(store)
    gone = await post(store, space="ops")
    await store.mail.change_message(gone.msg_id, DeleteChange(at=at(1)))
    assert await store.mail.space_counts() == {"eng": 2, "ops": 2}  # deleted ones included


async def test_projects_are_put_listed_and_deleted(store: Storage) -> None:
    await store.mail.put_project(project("web", tags=["ui"], settings={"a": [1]}))
    await store.mail.put_project(project("db"))
    await store.mail.put_project(project("web", status="paused"))
    projects = await store.mail.projects()
    assert [(p.name, p.status, p.tags) for p in projects] == [
        ("db", "active", []),
        ("web", "paused", []),
    ]
    projects[0].tags.append("changed")  # the caller's copy
    assert (await store.mail.projects())[0].tags == []
    assert await store.mail.delete_project("db")
    assert not await store.mail.delete_project("db")
    assert [p.name for p in await store.mail.projects()] == ["web"]


async def test_spaces_members_and_projects_survive_a_reopen(store: Storage, reopen: Reopen) -> None:
    await store.mail.put_space(space("eng", private=True))
    await store.mail.set_member("eng", "bob", at(1), member=True)
    await store.mail.put_project(project("web", metadata={"k": {"v": 1}}))
    before = (await store.mail.spaces(), await store.mail.members(), await store.mail.projects())
    store = await reopen(store)
    after = (await store.mail.spaces(), await store.mail.members(), await store.mail.projects())
    assert after == before


# --- locks -----------------------------------------------------------------------------------


async def test_an_exclusive_lock_refuses_everyone_else_until_released(store: Storage) -> None:
    taken, holders = await store.mail.take_lock(holder("db", "alice"), T0)
    assert taken and [h.holder for h in holders] == ["alice"]
    for mode in ("exclusive", "advisory"):
        taken, holders = await store.mail.take_lock(holder("db", "bob", mode), at(1))
        assert not taken and [(h.holder, h.mode) for h in holders] == [("alice", "exclusive")]
    assert not await store.mail.release_lock("db", "bob", at(2))
    assert await store.mail.release_lock("db", "alice", at(2))
    assert not await store.mail.release_lock("db", "alice", at(2))
    assert (await store.mail.take_lock(holder("db", "bob"), at(3)))[0]


async def test_advisory_locks_share_and_keep_an_exclusive_one_out(store: Storage) -> None:
    assert (await store.mail.take_lock(holder("db", "bob", "advisory"), T0))[0]
    taken, holders = await store.mail.take_lock(holder("db", "alice", "advisory"), T0)
    assert taken and [h.holder for h in holders] == ["alice", "bob"]
    assert not (await store.mail.take_lock(holder("db", "carol"), T0))[0]
    # The only holder may make its lock exclusive; with another beside it, not.
    assert not (await store.mail.take_lock(holder("db", "bob"), T0))[0]
    await store.mail.release_lock("db", "alice", T0)
    taken, holders = await store.mail.take_lock(holder("db", "bob"), T0)
    assert taken and [(h.holder, h.mode) for h in holders] == [("bob", "exclusive")]


async def test_a_renewal_keeps_when_the_lock_was_taken_and_moves_its_expiry(
    store: Storage,
) -> None:
    await store.mail.take_lock(holder("db", "bob", ttl=60), T0)
    renewal = msgspec.structs.replace(
        holder("db", "bob", ttl=60), acquired_at=at(50), expires_at=at(110)
    )
    taken, (held,) = await store.mail.take_lock(renewal, at(50))
    assert taken and (held.acquired_at, held.expires_at) == (T0, at(110))
    (listed,) = await store.mail.locks(at(100))
    assert (listed.acquired_at, listed.expires_at) == (T0, at(110))
    # A renewal may change the mode too; the lock was still taken at T0.
    advisory = msgspec.structs.replace(
        holder("db", "bob", "advisory"), acquired_at=at(100), expires_at=at(200)
    )
    taken, (held,) = await store.mail.take_lock(advisory, at(100))
    assert taken and (held.mode, held.acquired_at, held.expires_at) == ("advisory", T0, at(200))
    assert await store.mail.locks(at(150)) == [held]
    # Once its lock expired, taking it again is a new lock.
    again = msgspec.structs.replace(holder("db", "bob"), acquired_at=at(300), expires_at=at(400))
    taken, (held,) = await store.mail.take_lock(again, at(300))
    assert taken and (held.mode, held.acquired_at, held.expires_at) == (
        "exclusive",
        at(300),
        at(400),
    )


async def test_exclusive_takers_at_once_one_wins(store: Storage) -> None:
    results: dict[str, bool] = {}

    async def take(name: str) -> None:
        results[name], _ = await store.mail.take_lock(holder("db", name), T0)

    async with trio.open_nursery() as nursery:
        for n in range(8):
            nursery.start_soon(take, f"t{n}")
    (winner,) = [name for name, taken in results.items() if taken]
    assert len(results) == 8
    assert [h.holder for h in await store.mail.locks(T0)] == [winner]


async def test_a_refusal_names_only_the_live_holders(store: Storage) -> None:
    await store.mail.take_lock(holder("db", "alice", "advisory", ttl=10), T0)
    await store.mail.take_lock(holder("db", "bob", "advisory", ttl=100), T0)
    late = msgspec.structs.replace(holder("db", "carol"), acquired_at=at(20), expires_at=at(80))
    taken, holders = await store.mail.take_lock(late, at(20))
    assert not taken and holders == [holder("db", "bob", "advisory", ttl=100)]
    assert [h.holder for h in await store.mail.locks(at(20))] == ["bob"]
    # The refused taker holds nothing: once bob's lock expires, the resource is free.
    assert await store.mail.locks(at(100)) == []
    assert not await store.mail.release_lock("db", "carol", at(20))


async def test_an_expired_lock_is_no_holder(store: Storage) -> None:
    await store.mail.take_lock(holder("db", "alice", ttl=10), T0)
    await store.mail.take_lock(holder("api", "alice", ttl=100), T0)
    assert [h.resource for h in await store.mail.locks(at(9))] == ["api", "db"]
    assert [h.resource for h in await store.mail.locks(at(10))] == ["api"]
    assert not await store.mail.release_lock("db", "alice", at(10))
    late = msgspec.structs.replace(holder("db", "bob"), acquired_at=at(10), expires_at=at(70))
    taken, holders = await store.mail.take_lock(late, at(10))
    assert taken and [h.holder for h in holders] == ["bob"]


async def test_locks_filter_by_resource_and_holder(store: Storage) -> None:
    await store.mail.take_lock(holder("a", "bob", "advisory"), T0)
    await store.mail.take_lock(holder("a", "carol", "advisory"), T0)
    await store.mail.take_lock(holder("b", "bob"), T0)
    every = await store.mail.locks(T0)
    assert [(h.resource, h.holder) for h in every] == [("a", "bob"), ("a", "carol"), ("b", "bob")]
    assert [h.holder for h in await store.mail.locks(T0, resource="a")] == ["bob", "carol"]
    assert [h.resource for h in await store.mail.locks(T0, holder="bob")] == ["a", "b"]
    assert await store.mail.locks(T0, resource="a", holder="dan") == []


async def test_locks_survive_a_reopen(store: Storage, reopen: Reopen) -> None:
    await store.mail.take_lock(holder("db", "alice", ttl=3600), T0)
    store = await reopen(store)
    taken, holders = await store.mail.take_lock(holder("db", "bob"), at(1))
    assert not taken and [h.holder for h in holders] == ["alice"]


async def fill_part_two(store: Storage) -> dict[str, str]:
    """Every kind of part-two write; returns the msg_ids it posted, by name."""
    posted = {
        "edited": (await post(store, "alice", ["bob"], "alpha deploy", space="eng")).msg_id,
        "reacted": (await post(store, "bob", ["alice"], "beta rollback")).msg_id,
        "pinned": (
            await post(store, "alice", ["bob", "carol"], "gamma deploy", space="ops")
        ).msg_id,
        "deleted": (await post(store, "carol", ["bob"], "delta deploy", space="eng")).msg_id,
    }
    changes: list[tuple[str, MessageChange]] = [
        ("edited", EditChange(content="alpha again", structured={"k": [1]}, at=at(1))),
        ("edited", EditChange(content="alpha final deploy", at=at(2))),
        ("reacted", ReactChange(emoji="👍", by="alice")),
        ("reacted", ReactChange(emoji="👀", by="carol")),
        ("reacted", ReactChange(emoji="👀", by="alice")),
        ("reacted", ReactChange(emoji="👍", by="alice", remove=True)),
        ("pinned", PinChange(by="carol", at=at(3))),
        ("reacted", PinChange(by="bob", at=at(3))),
        ("reacted", PinChange(by="bob", at=at(4), unpin=True)),
        ("deleted", DeleteChange(reason="oops", at=at(5))),
    ]
    for key, change in changes:
        assert await store.mail.change_message(posted[key], change) is not None
    await store.mail.put_space(space("eng", description="first"))
    await store.mail.put_space(space("ops", private=True, project="web"))
    await store.mail.put_space(space("eng", description="second"))
    for name, joined, member in [("bob", 1, True), ("alice", 2, True), ("carol", 3, True)]:
        await store.mail.set_member("eng", name, at(joined), member=member)
    await store.mail.set_member("eng", "alice", at(4), member=False)
    await store.mail.set_member("ops", "carol", at(5), member=True)
    await store.mail.put_project(project("web", tags=["ui"]))
    await store.mail.put_project(project("db"))
    await store.mail.put_project(project("web", status="paused", settings={"a": {"b": 1}}))
    await store.mail.delete_project("db")
    await store.mail.take_lock(holder("db", "alice", ttl=3600), T0)
    for name in ("bob", "carol", "dan"):
        await store.mail.take_lock(holder("api", name, "advisory", ttl=3600), T0)
    await store.mail.release_lock("api", "carol", at(1))
    await store.mail.take_lock(holder("old", "bob", ttl=1), T0)
    renewal = msgspec.structs.replace(holder("api", "dan", "advisory"), expires_at=at(7200))
    await store.mail.take_lock(renewal, at(2))
    return posted


async def part_two(store: Storage) -> dict[str, Any]:
    """What every part-two read returns, for comparing a store before and after a reopen."""
    reads: dict[str, Any] = {}
    messages = await store.mail.messages_after(None, limit=MANY)
    reads["messages"] = messages
    reads["versions"] = [await store.mail.versions(m.msg_id) for m in messages]
    words = ["alpha", "again", "final", "deploy", "rollback", "gamma", "delta"]
    for name in ("alice", "bob", "carol", "dan"):
        for query in (InboxQuery(include_deleted=True), InboxQuery(pinned_only=True)):
            reads[f"inbox {name} {query}"] = await store.mail.inbox(name, query, limit=MANY)
        reads[f"search {name}"] = await store.mail.search(
            name, words, readable_spaces=["eng"], limit=MANY
        )
        for space_name in ("eng", "ops"):
            reads[f"space {space_name} {name}"] = await store.mail.space_mail(
                space_name, name, InboxQuery(include_deleted=True), limit=MANY
            )
    reads["spaces"] = await store.mail.spaces()
    reads["members"] = await store.mail.members()
    reads["space counts"] = await store.mail.space_counts()
    reads["projects"] = await store.mail.projects()
    reads["locks"] = await store.mail.locks(at(60))
    return reads


async def test_part_two_reads_back_the_same_after_reopening(store: Storage, reopen: Reopen) -> None:
    posted = await fill_part_two(store)
    before = await part_two(store)
    # The fill did what it says, so the comparison below is of something.
    assert [len(v) for v in before["versions"]] == [2, 0, 0, 0]
    assert before["space counts"] == {"eng": 2, "ops": 1}
    assert [(h.resource, h.holder) for h in before["locks"]] == [
        ("api", "bob"),
        ("api", "dan"),
        ("db", "alice"),
    ]
    assert before["members"] == {
        "eng": [
            SpaceMember(name="bob", joined_at=at(1)),
            SpaceMember(name="carol", joined_at=at(3)),
        ],
        "ops": [SpaceMember(name="carol", joined_at=at(5))],
    }
    edited, reacted, pinned, deleted = before["messages"]
    assert (edited.content, edited.version) == ("alpha final deploy", 3)
    assert ([(r.emoji, r.by) for r in reacted.reactions], reacted.pinned) == (
        [("👀", ["carol", "alice"])],
        False,
    )
    assert (pinned.pinned_by, deleted.delete_reason) == ("carol", "oops")

    store = await reopen(store)
    assert await part_two(store) == before

    # And it carries on from there.
    edited = posted["edited"]
    await store.mail.change_message(edited, EditChange(content="alpha last", at=at(9)))
    assert [v.version for v in await store.mail.versions(edited)] == [1, 2, 3]
    assert await search(store, "bob", "last") == ["alpha last"]
    assert not (await store.mail.take_lock(holder("db", "bob"), at(9)))[0]
    assert (await post(store, "alice", ["bob"], "next")).msg_id == msg_id_of(len(posted) + 1)


async def test_a_closed_store_refuses_part_two(store: Storage) -> None:
    posted = await post(store)
    await store.close()
    mail_store = store.mail
    m = posted.msg_id
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: mail_store.messages_after(None, limit=5),
        lambda: mail_store.space_mail("eng", "bob", InboxQuery(), limit=5),
        lambda: mail_store.change_message(m, EditChange(content="x", at=T0)),
        lambda: mail_store.change_message(m, DeleteChange(at=T0)),
        lambda: mail_store.change_message(m, ReactChange(emoji="👍", by="bob")),
        lambda: mail_store.change_message(m, PinChange(by="bob", at=T0)),
        lambda: mail_store.versions(m),
        lambda: mail_store.search("bob", ["hello"], readable_spaces=[], limit=5),
        lambda: mail_store.put_space(space("eng")),
        mail_store.spaces,
        lambda: mail_store.set_member("eng", "bob", T0, member=True),
        mail_store.members,
        mail_store.space_counts,
        lambda: mail_store.put_project(project("web")),
        mail_store.projects,
        lambda: mail_store.delete_project("web"),
        lambda: mail_store.take_lock(holder("db", "alice"), T0),
        lambda: mail_store.release_lock("db", "alice", T0),
        lambda: mail_store.locks(T0),
    ]
    for call in calls:
        with pytest.raises(StorageError, match=STORE_CLOSED):
            await call()
