"""The MailStore conformance suite: every backend's ``store.mail`` passes it unchanged.

The contract is the docstrings of storage/_mail.py. ``store`` is parametrized over
the backends in conftest.py; a test that needs durability (``reopen``) skips on a
backend that keeps nothing once closed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest
import trio
import trio.lowlevel
from chinwag.protocol import Delivery, MailMessage, Participant, Reaction, Ref
from chinwag.storage import (
    InboxQuery,
    ParentChange,
    StateChange,
    Storage,
    StorageError,
    msg_id_of,
    number_of,
)

T0 = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)
Reopen = Callable[[Storage], Awaitable[Storage]]  # the fixture's shape, see conftest.py
STORE_CLOSED = "The store is closed"
MANY = 1000  # a limit above anything a test stores
AUTH = Ref(type="module", value="auth")
DB = Ref(type="module", value="db")


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def mail(
    sender: str = "alice",
    to: Sequence[str] = ("bob",),
    content: str = "hello",
    *,
    when: datetime | None = None,
    **fields: Any,
) -> MailMessage:
    """A message as the post office hands it to the store: every recipient resolved."""
    return MailMessage(
        msg_id="",
        sender=sender,
        to=list(to),
        recipients=list(to),
        content=content,
        created_at=when or T0,
        **fields,
    )


async def post(
    store: Storage,
    sender: str = "alice",
    to: Sequence[str] = ("bob",),
    content: str = "hello",
    *,
    when: datetime | None = None,
    deliveries: Sequence[Delivery] | None = None,
    parent: ParentChange | None = None,
    new_participants: Sequence[Participant] = (),
    **fields: Any,
) -> MailMessage:
    """Posts a new message (pending for each of ``to`` unless ``deliveries`` says) and
    returns it as stored."""
    stored, created = await store.mail.post(
        mail(sender, to, content, when=when, **fields),
        [Delivery(name=name) for name in to] if deliveries is None else deliveries,
        parent=parent,
        new_participants=new_participants,
    )
    assert created
    return stored


async def delivery_of(store: Storage, msg_id: str, name: str) -> Delivery | None:
    found = await store.mail.deliveries([msg_id])
    return next((d for d in found.get(msg_id, []) if d.name == name), None)


def ids(items: Sequence[MailMessage] | Sequence[tuple[MailMessage, Delivery]]) -> list[str]:
    return [item[0].msg_id if isinstance(item, tuple) else item.msg_id for item in items]


async def check_unread(store: Storage, names: Sequence[str]) -> dict[str, dict[int, int]]:
    """Asserts ``unread_counts`` and ``unread_totals`` agree with the deliveries each name
    reads back (``names`` holds every recipient in the store); returns the counts."""
    expected: dict[str, dict[int, int]] = {}
    for name in names:
        for message, delivery in await store.mail.received(name, after=None, limit=MANY):
            if delivery.state != "read":
                counts = expected.setdefault(name, {})
                counts[message.priority] = counts.get(message.priority, 0) + 1
    for name in names:
        assert await store.mail.unread_counts(name) == expected.get(name, {}), name
    totals = {name: sum(counts.values()) for name, counts in expected.items()}
    assert await store.mail.unread_totals() == totals
    return expected


# --- participants ----------------------------------------------------------------------


async def test_a_fresh_store_has_no_mail(store: Storage) -> None:
    assert await store.mail.participants() == []
    assert await store.mail.get_message(msg_id_of(1)) is None
    assert await store.mail.deliveries([msg_id_of(1)]) == {}
    assert await store.mail.inbox("bob", InboxQuery(), limit=10) == []
    assert await store.mail.received("bob", after=None, limit=10) == []
    assert await store.mail.newest_received("bob") is None
    assert await store.mail.unread_counts("bob") == {}
    assert await store.mail.unread_totals() == {}
    assert await store.mail.sent("alice", limit=10) == []
    assert await store.mail.thread(msg_id_of(1)) == []
    assert await store.mail.mark_read("bob", T0) == []


async def test_participants_are_listed_by_name_and_replaced_whole(store: Storage) -> None:
    bob = Participant(
        name="bob",
        kind="agent",
        roles=["reviewer", "dev"],
        online=True,
        last_seen=at(5),
        status="reviewing #7",
        info={"model": "x-1", "tools": ["shell", "git"], "depth": {"max": 3}},
        unread=4,
    )
    for participant in [Participant(name="carol", kind="person"), bob, Participant(name="Zed")]:
        await store.mail.put_participant(participant)

    stored = await store.mail.participants()
    assert [p.name for p in stored] == ["Zed", "bob", "carol"]  # by name, as code points
    assert stored[1] == msgspec.structs.replace(bob, online=False, unread=0)  # not stored
    assert stored[1].last_seen is not None and stored[1].last_seen.utcoffset() == timedelta(0)
    assert stored[2] == Participant(name="carol", kind="person")

    replacement = Participant(name="bob", kind="session", roles=["ops"], online=True, unread=1)
    await store.mail.put_participant(replacement)  # replaces every field, roles and info too
    assert await store.mail.participants() == [
        Participant(name="Zed"),
        Participant(name="bob", kind="session", roles=["ops"]),
        Participant(name="carol", kind="person"),
    ]


async def test_participants_read_back_are_copies(store: Storage) -> None:
    given = Participant(name="bob", roles=["dev"], info={"tools": ["git"]})
    await store.mail.put_participant(given)
    given.roles.append("given-later")
    given.info["tools"].append("given-later")
    (read,) = await store.mail.participants()
    read.roles.append("read-later")
    read.info["tools"].append("read-later")
    read.status = "changed"

    assert await store.mail.participants() == [
        Participant(name="bob", roles=["dev"], info={"tools": ["git"]})
    ]


# --- post: numbering, fields, copies ------------------------------------------------------


async def test_msg_ids_count_from_one_and_sort_as_they_count(store: Storage) -> None:
    assert msg_id_of(1) == "m000000000001"
    assert [number_of(msg_id_of(n)) for n in (1, 9, 10, 123456789012)] == [1, 9, 10, 123456789012]
    for text in ["", "m1", "x000000000001", "m0000000000001", "m00000000000a", " m000000000001"]:
        assert number_of(text) is None, text

    posted = []
    for n in range(12):  # past 9, where a number that is not fixed-width would sort wrong
        given = mail(content=f"n{n}", when=at(n))
        given.msg_id = "m999999999999" if n % 2 else "whatever"  # the store's to set
        stored, created = await store.mail.post(given, [Delivery(name="bob")])
        assert created
        posted.append(stored.msg_id)

    assert posted == [msg_id_of(n) for n in range(1, 13)]
    assert sorted(posted) == posted
    assert [number_of(msg_id) for msg_id in posted] == list(range(1, 13))
    assert await store.mail.get_message("m999999999999") is None


async def test_post_keeps_every_field(store: Storage) -> None:
    root = await post(store, "alice", ["bob"], "root")
    given = MailMessage(
        msg_id="m000000000077",
        sender="alice",
        to=["@reviewers", "bob", "@everyone"],
        recipients=["bob", "carol"],
        content='Ünïcode — "quotes", a\nnewline, \\ and a tab\t; 🎉',
        created_at=datetime(2024, 5, 1, 23, 59, 59, 654321, tzinfo=UTC),
        thread_id=root.msg_id,
        format="json",
        structured={"plan": [1, 2.5, None, True, "x"], "nested": {"k": [], "ü": {}}},
        priority=3,
        channel="ops",
        reply_to=root.msg_id,
        scopes=[AUTH, Ref(type="pr", value="7")],
        refs=[Ref(type="pr", value="7"), Ref(type="mention", value="carol")],
        metadata={"source": "ci", "n": 3, "deep": {"list": [1, "a", None]}, "ok": False},
        mentions=["carol"],
        idempotency_key="key-1",
        space="team",
        edited_at=at(30),
        version=2,
        deleted=True,
        delete_reason="superseded",
        reactions=[Reaction(emoji="👍", by=["bob", "carol"])],
        pinned=True,
        run_id="run-1",
        answered_by=root.msg_id,
    )
    expected = msgspec.structs.replace(given, msg_id=msg_id_of(2))

    stored, created = await store.mail.post(
        given, [Delivery(name="bob"), Delivery(name="carol", mentioned=True)]
    )
    assert created
    assert stored == expected
    assert await store.mail.get_message(stored.msg_id) == expected
    ((read, _),) = await store.mail.inbox("carol", InboxQuery(include_deleted=True), limit=10)
    assert read == expected
    for time in (stored.created_at, stored.edited_at):
        assert time is not None and time.utcoffset() == timedelta(0)
    assert stored.created_at.microsecond == 654321

    # Every shape of structured JSON, and the defaults, read back as given.
    for n, structured in enumerate([None, "text", 0, 1.5, False, [1, [2, {"a": None}]], {}]):
        plain = mail(content=f"plain {n}", structured=structured)
        stored, _ = await store.mail.post(plain, [])
        expected = msgspec.structs.replace(plain, msg_id=msg_id_of(3 + n))
        assert stored == expected
        assert await store.mail.get_message(stored.msg_id) == expected


async def test_returned_messages_are_the_callers(store: Storage) -> None:
    given = mail(
        to=["bob"],
        structured={"items": [1]},
        metadata={"tags": ["a"]},
        scopes=[AUTH],
        mentions=["bob"],
    )
    stored, _ = await store.mail.post(given, [Delivery(name="bob")])
    expected = msgspec.convert(msgspec.to_builtins(stored), MailMessage)  # a deep copy

    def spoil(message: MailMessage) -> None:
        message.to.append("mallory")
        message.recipients.append("mallory")
        message.structured["items"].append(2)
        message.metadata["tags"].append("b")
        message.scopes[0].value = "spoiled"
        message.mentions.append("mallory")
        message.content = "spoiled"

    spoil(given)  # the store kept nothing of what it was given
    spoil(stored)
    read = await store.mail.get_message(msg_id_of(1))
    assert read == expected
    assert read is not None
    spoil(read)
    for message, delivery in [
        *await store.mail.inbox("bob", InboxQuery(), limit=5),
        *await store.mail.received("bob", after=None, limit=5),
    ]:
        spoil(message)
        delivery.state = "read"
    for message in await store.mail.sent("alice", limit=5):
        spoil(message)
    for deliveries in (await store.mail.deliveries([msg_id_of(1)])).values():
        deliveries[0].state = "read"
        deliveries.clear()

    assert await store.mail.get_message(msg_id_of(1)) == expected
    assert await store.mail.deliveries([msg_id_of(1)]) == {msg_id_of(1): [Delivery(name="bob")]}
    assert await store.mail.unread_counts("bob") == {1: 1}


async def test_get_message_is_none_for_what_is_not_stored(store: Storage) -> None:
    await post(store)
    assert await store.mail.get_message(msg_id_of(1)) is not None
    for text in [msg_id_of(2), msg_id_of(0), "m1", "nonsense", ""]:
        assert await store.mail.get_message(text) is None, text


async def test_deliveries_are_kept_per_recipient_and_listed_by_name(store: Storage) -> None:
    given = [
        Delivery(name="dave"),
        Delivery(name="bob", state="delivered", delivered_at=at(1), mentioned=True),
        Delivery(name="carol", state="read", delivered_at=at(1), read_at=at(2)),
    ]
    first = await post(store, to=["dave", "bob", "carol"], deliveries=given)
    second = await post(store, to=["erin"])
    lonely = await post(store, to=[], deliveries=[])  # a message with no recipients at all

    found = await store.mail.deliveries(
        [second.msg_id, "nonsense", msg_id_of(99), first.msg_id, lonely.msg_id]
    )
    assert found == {
        first.msg_id: sorted(given, key=lambda d: d.name),
        second.msg_id: [Delivery(name="erin")],
        lonely.msg_id: [],  # stored: there, with none
    }
    assert [d.name for d in found[first.msg_id]] == ["bob", "carol", "dave"]
    for delivery in found[first.msg_id]:
        for time in (delivery.delivered_at, delivery.read_at):
            assert time is None or time.utcoffset() == timedelta(0)
    assert await store.mail.deliveries([]) == {}


async def test_posts_at_once_get_distinct_consecutive_msg_ids(store: Storage) -> None:
    returned: dict[str, MailMessage] = {}

    async def writer(n: int) -> None:
        stored = await post(store, f"w{n % 3}", ["bob"], f"n{n}", when=at(n))
        returned[stored.msg_id] = stored

    async with trio.open_nursery() as nursery:
        for n in range(30):
            nursery.start_soon(writer, n)

    assert sorted(returned) == [msg_id_of(n) for n in range(1, 31)]
    received = await store.mail.received("bob", after=None, limit=MANY)
    assert [message for message, _ in received] == [returned[m] for m in sorted(returned)]


async def test_cancelled_posts_are_whole_or_absent(store: Storage) -> None:
    returned: list[MailMessage] = []

    async def writer(n: int) -> None:
        returned.append(await post(store, "alice", ["bob", "carol"], f"n{n}"))

    async with trio.open_nursery() as nursery:
        for n in range(40):
            nursery.start_soon(writer, n)
        for _ in range(3):
            await trio.lowlevel.checkpoint()
        nursery.cancel_scope.cancel()  # lands wherever each post is

    sent = list(reversed(await store.mail.sent("alice", limit=MANY)))
    assert ids(sent) == [msg_id_of(n) for n in range(1, len(sent) + 1)]
    assert sorted(returned, key=lambda m: m.msg_id) == sent, "stored, yet not returned"
    found = await store.mail.deliveries(ids(sent))
    assert all(len(found[m.msg_id]) == 2 for m in sent)
    await check_unread(store, ["bob", "carol"])
    assert await store.mail.unread_totals() == (
        {"bob": len(sent), "carol": len(sent)} if sent else {}
    )


# --- idempotency --------------------------------------------------------------------------


async def test_a_repeated_idempotency_key_returns_the_first_message_and_stores_nothing(
    store: Storage,
) -> None:
    other = await post(store, "carol", ["alice"], "earlier")
    first = await post(store, "alice", ["bob"], "first", idempotency_key="k")

    again, created = await store.mail.post(
        mail("alice", ["carol", "dave"], "second", when=at(9), idempotency_key="k", priority=3),
        [Delivery(name="carol"), Delivery(name="dave")],
        parent=ParentChange(msg_id=other.msg_id, start_thread=True, read_by="alice", answered=True),
        new_participants=[Participant(name="dave")],
    )
    assert (again, created) == (first, False)
    assert await store.mail.participants() == []  # nothing of the repeat was stored
    assert await store.mail.get_message(other.msg_id) == other
    assert await store.mail.deliveries([other.msg_id, first.msg_id]) == {
        other.msg_id: [Delivery(name="alice")],
        first.msg_id: [Delivery(name="bob")],
    }
    assert await store.mail.received("carol", after=None, limit=10) == []
    assert ids(await store.mail.sent("alice", limit=10)) == [first.msg_id]
    assert await store.mail.thread(other.msg_id) == []
    assert await check_unread(store, ["alice", "bob", "carol", "dave"]) == {
        "alice": {1: 1},
        "bob": {1: 1},
    }

    # Another sender's key is its own; so is another key of the same sender.
    theirs = await post(store, "carol", ["bob"], "theirs", idempotency_key="k")
    assert theirs.msg_id == msg_id_of(3)  # the repeat took no number
    mine = await post(store, "alice", ["bob"], "mine", idempotency_key="k2")
    assert mine.msg_id == msg_id_of(4)
    again, created = await store.mail.post(mail("carol", ["x"], idempotency_key="k"), [])
    assert (again, created) == (theirs, False)
    unkeyed = [await post(store, "alice", ["bob"], "no key") for _ in range(2)]
    assert ids(unkeyed) == [msg_id_of(5), msg_id_of(6)]  # no key: every post is new


async def test_the_first_message_comes_back_as_it_is_now(store: Storage) -> None:
    first = await post(store, "alice", ["bob"], "first", idempotency_key="k", run_id=None)
    reply = await post(
        store,
        "bob",
        ["alice"],
        "reply",
        thread_id=first.msg_id,
        run_id="run-9",
        parent=ParentChange(msg_id=first.msg_id, start_thread=True, answered=True),
    )
    again, created = await store.mail.post(mail("alice", ["bob"], idempotency_key="k"), [])
    assert not created
    assert again == msgspec.structs.replace(
        first, thread_id=first.msg_id, answered_by=reply.msg_id, run_id="run-9"
    )


async def test_posts_at_once_with_one_key_store_one_message(store: Storage) -> None:
    outcomes: list[tuple[MailMessage, bool]] = []

    async def writer(n: int) -> None:
        given = mail("alice", ["bob"], f"attempt {n}", idempotency_key="once")
        outcomes.append(await store.mail.post(given, [Delivery(name="bob")]))

    async with trio.open_nursery() as nursery:
        for n in range(12):
            nursery.start_soon(writer, n)

    assert sorted(created for _, created in outcomes) == [False] * 11 + [True]
    (winner,) = [message for message, created in outcomes if created]
    assert all(message == winner for message, _ in outcomes)
    assert winner.msg_id == msg_id_of(1)
    assert ids(await store.mail.received("bob", after=None, limit=MANY)) == [winner.msg_id]
    assert await store.mail.unread_counts("bob") == {1: 1}
    assert ids(await store.mail.sent("alice", limit=MANY)) == [winner.msg_id]


# --- the parent change and new participants --------------------------------------------------


async def test_a_reply_starts_the_parent_thread(store: Storage) -> None:
    parent = await post(store, "alice", ["bob"], "question", when=at(1))
    unrelated = await post(store, "alice", ["bob"], "unrelated", when=at(2))
    reply = await post(
        store,
        "bob",
        ["alice"],
        "answer",
        when=at(3),
        thread_id=parent.msg_id,
        reply_to=parent.msg_id,
        parent=ParentChange(msg_id=parent.msg_id, start_thread=True),
    )

    threaded = msgspec.structs.replace(parent, thread_id=parent.msg_id)
    assert await store.mail.get_message(parent.msg_id) == threaded  # nothing else changed
    assert await store.mail.thread(parent.msg_id) == [threaded, reply]
    assert await store.mail.get_message(unrelated.msg_id) == unrelated
    in_thread = await store.mail.inbox("bob", InboxQuery(thread_id=parent.msg_id), limit=10)
    assert ids(in_thread) == [parent.msg_id]  # the filter sees the parent's new thread
    assert await store.mail.deliveries([parent.msg_id]) == {parent.msg_id: [Delivery(name="bob")]}

    later = await post(store, "alice", ["bob"], "more", when=at(4), thread_id=parent.msg_id)
    assert ids(await store.mail.thread(parent.msg_id)) == [
        parent.msg_id,
        reply.msg_id,
        later.msg_id,
    ]
    assert await store.mail.mark_read("bob", at(5), thread_id=parent.msg_id) == [
        parent.msg_id,
        later.msg_id,
    ]
    assert (await delivery_of(store, unrelated.msg_id, "bob")) == Delivery(name="bob")


async def test_a_reply_marks_the_parent_read_for_the_replier(store: Storage) -> None:
    parent = await post(store, "alice", ["bob", "carol"], "question", when=at(1), priority=2)
    reply = await post(
        store,
        "bob",
        ["alice"],
        "answer",
        when=at(7),
        parent=ParentChange(msg_id=parent.msg_id, read_by="bob"),
    )

    assert await store.mail.deliveries([parent.msg_id]) == {
        parent.msg_id: [
            Delivery(name="bob", state="read", delivered_at=reply.created_at, read_at=at(7)),
            Delivery(name="carol"),  # only the replier's
        ]
    }
    assert await store.mail.get_message(parent.msg_id) == parent  # the message itself is kept
    assert await check_unread(store, ["alice", "bob", "carol"]) == {
        "alice": {1: 1},
        "carol": {2: 1},
    }

    # A delivery already delivered keeps its time; one already read is not read again.
    await store.mail.advance([StateChange(parent.msg_id, "carol", "delivered", at(8))])
    await post(
        store,
        "carol",
        ["alice"],
        "me too",
        when=at(9),
        parent=ParentChange(msg_id=parent.msg_id, read_by="carol"),
    )
    await post(
        store,
        "bob",
        ["alice"],
        "again",
        when=at(10),
        parent=ParentChange(msg_id=parent.msg_id, read_by="bob"),
    )
    assert await store.mail.deliveries([parent.msg_id]) == {
        parent.msg_id: [
            Delivery(name="bob", state="read", delivered_at=at(7), read_at=at(7)),
            Delivery(name="carol", state="read", delivered_at=at(8), read_at=at(9)),
        ]
    }
    await check_unread(store, ["alice", "bob", "carol"])


async def test_an_answer_sets_answered_by_and_run_id(store: Storage) -> None:
    parent = await post(store, "alice", ["helper"], "please review", when=at(1), run_id=None)
    answer = await post(
        store,
        "helper",
        ["alice"],
        "done",
        when=at(2),
        run_id="run-42",
        parent=ParentChange(msg_id=parent.msg_id, answered=True, read_by="helper"),
    )

    stored = await store.mail.get_message(parent.msg_id)
    assert stored == msgspec.structs.replace(parent, answered_by=answer.msg_id, run_id="run-42")
    assert stored is not None and stored.thread_id is None  # no thread was asked for
    assert await store.mail.get_message(answer.msg_id) == answer
    assert (await delivery_of(store, parent.msg_id, "helper")) == Delivery(
        name="helper", state="read", delivered_at=at(2), read_at=at(2)
    )
    (page,) = await store.mail.inbox("helper", InboxQuery(), limit=5)
    assert page[0] == stored  # every read sees the change


async def test_new_participants_are_put_with_the_post_and_existing_ones_kept(
    store: Storage,
) -> None:
    bob = Participant(name="bob", kind="agent", roles=["dev"], status="busy", info={"a": 1})
    await store.mail.put_participant(bob)
    await post(
        store,
        "alice",
        ["bob", "carol"],
        new_participants=[
            Participant(name="carol", kind="person", roles=["ops"], online=True, unread=3),
            Participant(name="bob", kind="session", roles=["other"]),
            Participant(name="alice", last_seen=at(1)),
        ],
    )
    assert await store.mail.participants() == [
        Participant(name="alice", last_seen=at(1)),
        bob,  # left as it was
        Participant(name="carol", kind="person", roles=["ops"]),  # presence is not stored
    ]


async def test_a_missing_parent_fails_the_post_and_stores_nothing(store: Storage) -> None:
    first = await post(store, "alice", ["bob"], "first")
    for missing in [msg_id_of(5), "nonsense"]:
        with pytest.raises(StorageError, match=r"(?i)parent"):
            await store.mail.post(
                mail("bob", ["alice", "carol"], "reply", idempotency_key="k", priority=2),
                [Delivery(name="alice"), Delivery(name="carol")],
                parent=ParentChange(msg_id=missing, start_thread=True, read_by="bob"),
                new_participants=[Participant(name="carol")],
            )

    assert await store.mail.participants() == []
    assert await store.mail.get_message(msg_id_of(2)) is None
    assert await store.mail.sent("bob", limit=10) == []
    assert await store.mail.received("carol", after=None, limit=10) == []
    assert await store.mail.unread_totals() == {"bob": 1}
    assert await store.mail.get_message(first.msg_id) == first

    # The key of a post that failed was never used; the numbering goes on where it was.
    stored, created = await store.mail.post(
        mail("bob", ["alice"], "reply", idempotency_key="k"), [Delivery(name="alice")]
    )
    assert created and stored.msg_id == msg_id_of(2)


# --- advance ---------------------------------------------------------------------------------


async def test_advance_moves_deliveries_forward_only(store: Storage) -> None:
    message = await post(store, "alice", ["bob", "carol", "dave"], when=at(0))
    m = message.msg_id

    moved = await store.mail.advance(
        [
            StateChange(m, "bob", "delivered", at(1)),
            StateChange(m, "carol", "read", at(2)),  # read sets delivered_at too
            StateChange(m, "erin", "read", at(2)),  # no such delivery
            StateChange(msg_id_of(99), "bob", "read", at(2)),  # no such message
            StateChange("nonsense", "bob", "read", at(2)),
            StateChange(m, "dave", "pending", at(2)),  # where it is already
        ]
    )
    assert moved == 2
    expected = {
        m: [
            Delivery(name="bob", state="delivered", delivered_at=at(1)),
            Delivery(name="carol", state="read", delivered_at=at(2), read_at=at(2)),
            Delivery(name="dave"),
        ]
    }
    assert await store.mail.deliveries([m]) == expected

    moved = await store.mail.advance(
        [
            StateChange(m, "bob", "delivered", at(3)),  # again: its time is not rewritten
            StateChange(m, "bob", "pending", at(3)),  # back: left out
            StateChange(m, "carol", "delivered", at(3)),
            StateChange(m, "carol", "pending", at(3)),
            StateChange(m, "carol", "read", at(3)),
        ]
    )
    assert moved == 0, "nothing moved: of two moving one delivery, the second finds it moved"
    assert await store.mail.deliveries([m]) == expected

    # keeps its delivered_at
    assert await store.mail.advance([StateChange(m, "bob", "read", at(4))]) == 1
    assert await store.mail.advance([StateChange(m, "bob", "read", at(5))]) == 0
    assert await store.mail.advance([]) == 0
    assert await store.mail.deliveries([m]) == {
        m: [
            Delivery(name="bob", state="read", delivered_at=at(1), read_at=at(4)),
            Delivery(name="carol", state="read", delivered_at=at(2), read_at=at(2)),
            Delivery(name="dave"),
        ]
    }
    assert await store.mail.get_message(m) == message
    await check_unread(store, ["bob", "carol", "dave"])


async def test_one_advance_moves_a_delivery_step_by_step(store: Storage) -> None:
    first = await post(store, "alice", ["bob", "carol"])
    second = await post(store, "alice", ["bob"], deliveries=[Delivery(name="bob", mentioned=True)])
    moved = await store.mail.advance(
        [
            StateChange(first.msg_id, "bob", "delivered", at(1)),
            StateChange(first.msg_id, "bob", "read", at(2)),
            StateChange(first.msg_id, "carol", "read", at(3)),
            StateChange(first.msg_id, "carol", "delivered", at(4)),  # behind: left out
            StateChange(second.msg_id, "bob", "delivered", at(5)),
            StateChange(second.msg_id, "bob", "delivered", at(6)),  # again: left out
        ]
    )
    assert moved == 3, "each delivery that moved counts once, however many steps it took"
    assert await store.mail.deliveries([first.msg_id, second.msg_id]) == {
        first.msg_id: [
            Delivery(name="bob", state="read", delivered_at=at(1), read_at=at(2)),
            Delivery(name="carol", state="read", delivered_at=at(3), read_at=at(3)),
        ],
        second.msg_id: [
            Delivery(name="bob", state="delivered", delivered_at=at(5), mentioned=True),
        ],
    }
    assert await check_unread(store, ["bob", "carol"]) == {"bob": {1: 1}}


# --- mark_read -------------------------------------------------------------------------------


async def test_mark_read_by_msg_ids(store: Storage) -> None:
    posted = [await post(store, "alice", ["bob", "carol"], f"n{n}") for n in range(4)]
    m1, m2, m3, m4 = ids(posted)
    await store.mail.advance([StateChange(m3, "bob", "delivered", at(1))])

    # The msg_ids moved, each once, in msg_id order whatever the order asked.
    moved = await store.mail.mark_read(
        "bob", at(2), msg_ids=[m3, "nonsense", m1, msg_id_of(99), m3]
    )
    assert moved == [m1, m3]
    assert await store.mail.mark_read("bob", at(3), msg_ids=[m1, m3, m3]) == []  # already read
    assert await store.mail.mark_read("bob", at(3), msg_ids=[]) == []  # none given: none read
    assert await store.mail.mark_read("dave", at(3), msg_ids=[m1]) == []  # not a recipient

    found = await store.mail.deliveries(ids(posted))
    assert [d for d in found[m1] if d.name == "bob"] == [
        Delivery(name="bob", state="read", delivered_at=at(2), read_at=at(2))
    ]
    assert [d for d in found[m3] if d.name == "bob"] == [
        Delivery(name="bob", state="read", delivered_at=at(1), read_at=at(2))
    ]
    for m in (m2, m4):
        assert [d for d in found[m] if d.name == "bob"] == [Delivery(name="bob")]
    assert all(d == Delivery(name="carol") for m in ids(posted) for d in found[m][1:])
    assert await check_unread(store, ["bob", "carol"]) == {"bob": {1: 2}, "carol": {1: 4}}


async def test_mark_read_a_thread(store: Storage) -> None:
    root = await post(store, "alice", ["bob", "carol"], "root")
    await post(
        store,
        "bob",
        ["alice", "carol"],
        "re",
        thread_id=root.msg_id,
        parent=ParentChange(msg_id=root.msg_id, start_thread=True, read_by="bob"),
    )
    other_thread = await post(store, "alice", ["bob"], "elsewhere", thread_id="m000000000042")
    alone = await post(store, "alice", ["bob"], "alone")
    in_thread = await post(store, "alice", ["bob", "carol"], "more", thread_id=root.msg_id)

    # root was read by the reply
    assert await store.mail.mark_read("bob", at(5), thread_id=root.msg_id) == [in_thread.msg_id]
    assert await store.mail.mark_read("bob", at(6), thread_id=root.msg_id) == []
    assert await store.mail.mark_read("bob", at(6), thread_id="m000000000999") == []
    assert await store.mail.mark_read("carol", at(7), thread_id=root.msg_id) == [
        root.msg_id,
        msg_id_of(2),
        in_thread.msg_id,
    ]
    assert (await delivery_of(store, in_thread.msg_id, "bob")) == Delivery(
        name="bob", state="read", delivered_at=at(5), read_at=at(5)
    )
    for message in (other_thread, alone):
        assert (await delivery_of(store, message.msg_id, "bob")) == Delivery(name="bob")
    assert await check_unread(store, ["alice", "bob", "carol"]) == {"alice": {1: 1}, "bob": {1: 2}}


async def test_mark_read_everything_of_one_reader(store: Storage) -> None:
    for n in range(5):
        await post(store, "alice", ["bob", "carol"], f"n{n}", priority=n % 3)
    await post(store, "carol", ["alice"], "to alice")
    await store.mail.advance([StateChange(msg_id_of(2), "bob", "read", at(1))])
    await store.mail.advance([StateChange(msg_id_of(3), "bob", "delivered", at(1))])

    assert await store.mail.mark_read("bob", at(9)) == [msg_id_of(n) for n in (1, 3, 4, 5)]
    assert await store.mail.mark_read("bob", at(10)) == []
    found = await store.mail.deliveries([msg_id_of(n) for n in range(1, 6)])
    bobs = [d for m in sorted(found) for d in found[m] if d.name == "bob"]
    assert [(d.state, d.delivered_at, d.read_at) for d in bobs] == [
        ("read", at(9), at(9)),
        ("read", at(1), at(1)),  # read before: untouched
        ("read", at(1), at(9)),  # delivered before: its delivered_at kept
        ("read", at(9), at(9)),
        ("read", at(9), at(9)),
    ]
    assert await check_unread(store, ["alice", "bob", "carol"]) == {
        "alice": {1: 1},
        "carol": {0: 2, 1: 2, 2: 1},
    }


# --- inbox -------------------------------------------------------------------------------------


async def fill_inboxes(store: Storage) -> list[str]:
    """Mail of every kind for bob, among mail that is not his; returns bob's msg_ids, oldest
    first. Message ``n`` (from 0) has priority ``n % 4``, channel ops every third, scope
    auth when even (db otherwise, both every fifth), mentions bob when ``n % 3 == 1``, was
    made at ``at(10 * n)``, and threads under bob's first when ``n % 4 == 3``."""
    mine: list[str] = []
    root: str | None = None
    for n in range(14):
        scopes = [AUTH] if n % 2 == 0 else [DB]
        if n % 5 == 0:
            scopes = [DB, AUTH]
        stored = await post(
            store,
            "dave" if n % 2 else "alice",
            ["bob", "carol"],
            f"n{n}",
            when=at(10 * n),
            deliveries=[Delivery(name="bob", mentioned=n % 3 == 1), Delivery(name="carol")],
            priority=n % 4,
            channel="ops" if n % 3 == 0 else None,
            scopes=scopes,
            thread_id=root if n % 4 == 3 else None,
        )
        root = root or stored.msg_id
        mine.append(stored.msg_id)
        if n % 4 == 1:  # not bob's: the filters and pages step over it
            await post(store, "alice", ["carol"], "carol's", when=at(10 * n + 1), priority=3)
        if n % 5 == 2:
            await post(store, "bob", ["alice"], "bob's own", when=at(10 * n + 2), priority=3)
    await store.mail.advance(
        [StateChange(mine[n], "bob", "read", at(500)) for n in (2, 5, 8, 9)]
        + [StateChange(mine[n], "bob", "delivered", at(500)) for n in (3, 4)]
    )
    return mine


async def test_inbox_is_newest_first_with_the_readers_delivery(store: Storage) -> None:
    mine = await fill_inboxes(store)
    page = await store.mail.inbox("bob", InboxQuery(), limit=MANY)
    assert ids(page) == list(reversed(mine))
    assert [delivery.name for _, delivery in page] == ["bob"] * len(mine)
    for message, delivery in page:
        assert await store.mail.get_message(message.msg_id) == message
        assert await delivery_of(store, message.msg_id, "bob") == delivery
    states = {message.content: delivery.state for message, delivery in page}
    assert [states[f"n{n}"] for n in (0, 2, 3)] == ["pending", "read", "delivered"]
    assert ids(await store.mail.inbox("bob", InboxQuery(), limit=3)) == list(reversed(mine))[:3]
    assert await store.mail.inbox("bob", InboxQuery(), limit=0) == []
    assert await store.mail.inbox("nobody", InboxQuery(), limit=MANY) == []


QUERIES = [
    InboxQuery(),
    InboxQuery(unread_only=True),
    InboxQuery(mentions_only=True),
    InboxQuery(thread_id=msg_id_of(1)),
    InboxQuery(thread_id="m000000000999"),
    InboxQuery(channel="ops"),
    InboxQuery(channel="nope"),
    InboxQuery(scope=AUTH),
    InboxQuery(scope=Ref(type="module", value="nope")),
    InboxQuery(scope=Ref(type="pr", value="auth")),  # type and value both count
    InboxQuery(priority_min=2),
    InboxQuery(priority_min=4),
    InboxQuery(since=at(50)),  # at or after: message 5 is in
    InboxQuery(unread_only=True, priority_min=1, scope=AUTH),
    InboxQuery(channel="ops", since=at(30), mentions_only=False, unread_only=True),
    InboxQuery(mentions_only=True, thread_id=msg_id_of(1), priority_min=3),
]


def matches(query: InboxQuery, message: MailMessage, delivery: Delivery) -> bool:
    return (
        (not query.unread_only or delivery.state != "read")
        and (not query.mentions_only or delivery.mentioned)
        and (query.thread_id is None or message.thread_id == query.thread_id)
        and (query.channel is None or message.channel == query.channel)
        and (query.scope is None or query.scope in message.scopes)
        and message.priority >= query.priority_min
        and (query.since is None or message.created_at >= query.since)
    )


async def test_inbox_filters_and_pages_visit_every_match_once(store: Storage) -> None:
    mine = await fill_inboxes(store)
    everything = list(reversed(await store.mail.received("bob", after=None, limit=MANY)))
    assert ids(everything) == list(reversed(mine))

    nonempty = 0
    for query in QUERIES:
        expected = [item for item in everything if matches(query, *item)]
        nonempty += len(expected) > 3
        assert await store.mail.inbox("bob", query, limit=MANY) == expected, query

        pages: list[list[tuple[MailMessage, Delivery]]] = []
        before: str | None = None
        while True:
            page = await store.mail.inbox("bob", query, limit=3, before=before)
            assert len(page) <= 3
            if not page:
                break
            pages.append(page)
            before = page[-1][0].msg_id
            assert len(pages) <= len(mine), "the pages do not end"
        assert [item for page in pages for item in page] == expected, query
        assert all(len(page) == 3 for page in pages[:-1]), query

    assert nonempty >= 6  # the queries page through several pages, not just one
    assert [len(await store.mail.inbox("bob", query, limit=MANY)) for query in QUERIES[:4]] == [
        14,
        10,
        5,
        3,
    ]  # the data set is what the expectations above were made from


async def test_inbox_before_any_msg_id(store: Storage) -> None:
    mine = await fill_inboxes(store)
    newest_first = list(reversed(mine))
    # A cursor need not be one of the reader's: a message of carol's, or past the end.
    carols = ids(await store.mail.received("carol", after=None, limit=MANY))
    not_bobs = sorted(set(carols) - set(mine))
    bound = not_bobs[1]
    below = [m for m in newest_first if m < bound]
    page = await store.mail.inbox("bob", InboxQuery(), limit=MANY, before=bound)
    assert ids(page) == below and below
    page = await store.mail.inbox("bob", InboxQuery(), limit=MANY, before=msg_id_of(999))
    assert ids(page) == newest_first
    assert await store.mail.inbox("bob", InboxQuery(), limit=MANY, before=mine[0]) == []


# --- received and newest_received ---------------------------------------------------------


async def test_received_is_oldest_first_after_a_cursor(store: Storage) -> None:
    m1 = await post(store, "alice", ["bob"], "1")
    m2 = await post(store, "alice", ["carol"], "2")
    m3 = await post(
        store,
        "alice",
        ["bob"],
        "3",
        deliveries=[Delivery(name="bob", state="delivered", delivered_at=T0)],
    )
    m4 = await post(store, "dave", ["bob", "carol"], "4")
    m5 = await post(store, "bob", ["alice"], "5")  # bob's own: not received
    m6 = await post(store, "alice", ["bob"], "6")

    async def received(**kw: Any) -> list[str]:
        items = await store.mail.received("bob", **{"after": None, "limit": MANY, **kw})
        assert all(delivery.name == "bob" for _, delivery in items)
        return ids(items)

    assert await received() == ids([m1, m3, m4, m6])
    assert await received(after=m1.msg_id) == ids([m3, m4, m6])
    assert await received(after=m2.msg_id) == ids([m3, m4, m6])  # not bob's, still a bound
    assert await received(after=m5.msg_id) == ids([m6])
    assert await received(after=m6.msg_id) == []
    assert await received(limit=2) == ids([m1, m3])
    assert await received(after=m3.msg_id, limit=1) == ids([m4])
    assert await received(limit=0) == []
    assert await received(pending_only=True) == ids([m1, m4, m6])
    assert await received(pending_only=True, limit=2) == ids([m1, m4])  # the limit after it
    assert await received(pending_only=True, after=m1.msg_id, limit=2) == ids([m4, m6])

    await store.mail.advance([StateChange(m4.msg_id, "bob", "delivered", at(1))])
    await store.mail.mark_read("bob", at(2), msg_ids=[m6.msg_id])
    assert await received(pending_only=True) == ids([m1])
    (item,) = await store.mail.received("bob", after=m3.msg_id, limit=1)
    assert item == (m4, Delivery(name="bob", state="delivered", delivered_at=at(1)))
    assert ids(await store.mail.received("carol", after=None, limit=MANY)) == ids([m2, m4])


async def test_newest_received_is_the_readers_newest(store: Storage) -> None:
    assert await store.mail.newest_received("bob") is None
    first = await post(store, "alice", ["bob"])
    assert await store.mail.newest_received("bob") == first.msg_id
    await post(store, "bob", ["alice"])  # sent by bob
    await post(store, "alice", ["carol"])  # to someone else
    assert await store.mail.newest_received("bob") == first.msg_id
    await store.mail.mark_read("bob", at(1))  # read or not, received
    latest = await post(store, "alice", ["carol", "bob"])
    assert await store.mail.newest_received("bob") == latest.msg_id
    assert await store.mail.newest_received("carol") == latest.msg_id
    assert await store.mail.newest_received("alice") == msg_id_of(2)


# --- unread counts -----------------------------------------------------------------------------


async def test_unread_counts_follow_every_change(store: Storage) -> None:
    names = ["alice", "bob", "carol", "dave"]
    posted = []
    for n in range(8):
        posted.append(await post(store, "alice", ["bob", "carol"], f"n{n}", priority=n % 4))
    await post(
        store,
        "alice",
        ["bob", "dave"],
        "already read",
        priority=3,
        deliveries=[
            Delivery(name="bob", state="read", delivered_at=T0, read_at=T0),  # never unread
            Delivery(name="dave", state="delivered", delivered_at=T0),  # unread all the same
        ],
    )
    assert await check_unread(store, names) == {
        "bob": {0: 2, 1: 2, 2: 2, 3: 2},
        "carol": {0: 2, 1: 2, 2: 2, 3: 2},
        "dave": {3: 1},
    }

    m = ids(posted)
    await store.mail.advance([StateChange(m[0], "bob", "delivered", at(1))])  # still unread
    await store.mail.advance(
        [StateChange(m[n], "bob", "read", at(2)) for n in (0, 4, 4, 5)]  # 4 twice: counted once
    )
    assert (await check_unread(store, names))["bob"] == {1: 1, 2: 2, 3: 2}

    assert await store.mail.mark_read("bob", at(3), msg_ids=[m[2], m[6]]) == [m[2], m[6]]
    assert (await check_unread(store, names))["bob"] == {1: 1, 3: 2}

    await post(
        store,
        "bob",
        ["alice"],
        "re",
        priority=0,
        parent=ParentChange(msg_id=m[3], read_by="bob"),
    )
    await post(
        store,
        "carol",
        ["alice"],
        "re",
        priority=0,
        parent=ParentChange(msg_id=m[3], read_by="carol"),
    )
    assert await check_unread(store, names) == {
        "alice": {0: 2},
        "bob": {1: 1, 3: 1},
        "carol": {0: 2, 1: 2, 2: 2, 3: 1},
        "dave": {3: 1},
    }

    for name in names:
        await store.mail.mark_read(name, at(4))
    assert await check_unread(store, names) == {}
    assert await store.mail.unread_counts("bob") == {}
    assert await store.mail.unread_totals() == {}


# --- sent and thread -----------------------------------------------------------------------------


async def test_sent_is_newest_first_and_pages(store: Storage) -> None:
    mine: list[str] = []
    for n in range(11):
        mine.append((await post(store, "alice", [] if n % 4 == 0 else ["bob"], f"n{n}")).msg_id)
        if n % 3 == 0:
            await post(store, "bob", ["alice"], "not alice's")
    newest_first = list(reversed(mine))

    assert ids(await store.mail.sent("alice", limit=MANY)) == newest_first
    assert ids(await store.mail.sent("alice", limit=4)) == newest_first[:4]
    assert await store.mail.sent("alice", limit=0) == []
    assert await store.mail.sent("carol", limit=MANY) == []

    pages: list[list[str]] = []
    before: str | None = None
    while page := ids(await store.mail.sent("alice", limit=4, before=before)):
        pages.append(page)
        before = page[-1]
        assert len(pages) <= len(mine), "the pages do not end"
    assert [len(page) for page in pages] == [4, 4, 3]
    assert [m for page in pages for m in page] == newest_first

    bobs = ids(await store.mail.sent("bob", limit=MANY))  # a bound need not be the author's
    assert ids(await store.mail.sent("alice", limit=MANY, before=bobs[1])) == [
        m for m in newest_first if m < bobs[1]
    ]
    sent = await store.mail.sent("alice", limit=MANY)
    for message in sent:
        assert await store.mail.get_message(message.msg_id) == message


async def test_a_thread_is_oldest_first(store: Storage) -> None:
    root = await post(store, "alice", ["bob"], "root", thread_id=msg_id_of(1))  # its own thread
    other = await post(store, "bob", ["alice"], "other root")
    replies = []
    for n in range(4):
        replies.append(
            await post(
                store, "bob" if n % 2 else "alice", ["carol"], f"re {n}", thread_id=root.msg_id
            )
        )
        await post(store, "carol", ["bob"], "elsewhere", thread_id=other.msg_id)

    assert await store.mail.thread(root.msg_id) == [root, *replies]  # whoever wrote them
    assert len(await store.mail.thread(other.msg_id)) == 4  # the root had no thread_id
    assert await store.mail.thread("m000000000999") == []
    assert await store.mail.thread("nonsense") == []


# --- durability ---------------------------------------------------------------------------------


NAMES = ["alice", "bob", "carol", "dave", "helper"]
FILLED = 9  # the messages fill_everything posts


async def fill_everything(store: Storage) -> None:
    """A store with something of every kind of write."""
    await store.mail.put_participant(
        Participant(name="bob", kind="agent", roles=["dev"], last_seen=at(1), info={"x": [1]})
    )
    await store.mail.put_participant(Participant(name="alice", kind="person", status="here"))
    root = await post(
        store,
        "alice",
        ["bob", "carol"],
        "root",
        when=at(2),
        deliveries=[Delivery(name="bob", mentioned=True), Delivery(name="carol")],
        priority=2,
        channel="ops",
        scopes=[AUTH],
        refs=[Ref(type="mention", value="bob")],
        mentions=["bob"],
        structured={"k": [1, 2.5, None]},
        metadata={"m": {"n": True}},
        format="plain",
        idempotency_key="root-key",
    )
    await post(
        store,
        "bob",
        ["alice", "carol"],
        "reply",
        when=at(3),
        thread_id=root.msg_id,
        reply_to=root.msg_id,
        parent=ParentChange(msg_id=root.msg_id, start_thread=True, read_by="bob"),
        new_participants=[Participant(name="carol", online=True), Participant(name="bob")],
    )
    question = await post(store, "carol", ["helper"], "help", when=at(4), priority=3)
    await post(
        store,
        "helper",
        ["carol"],
        "answer",
        when=at(5),
        run_id="run-1",
        parent=ParentChange(msg_id=question.msg_id, answered=True, read_by="helper"),
    )
    for n in range(5):
        await post(store, "dave", ["bob", "alice"], f"n{n}", when=at(6 + n), priority=n % 3)
    await store.mail.advance(
        [
            StateChange(msg_id_of(5), "bob", "delivered", at(20)),
            StateChange(msg_id_of(6), "alice", "read", at(21)),
        ]
    )
    await store.mail.mark_read("carol", at(22), thread_id=root.msg_id)
    await store.mail.mark_read("alice", at(23), msg_ids=[msg_id_of(7)])


async def everything(store: Storage) -> dict[str, object]:
    """Every read of the mail store, over what ``fill_everything`` wrote."""
    every = [msg_id_of(n) for n in range(1, FILLED + 1)]
    reads: dict[str, object] = {
        "participants": await store.mail.participants(),
        "messages": [await store.mail.get_message(m) for m in every],
        "deliveries": await store.mail.deliveries(every),
        "totals": await store.mail.unread_totals(),
        "thread": await store.mail.thread(msg_id_of(1)),
    }
    for name in NAMES:
        reads[f"inbox {name}"] = await store.mail.inbox(name, InboxQuery(), limit=MANY)
        reads[f"inbox {name} unread"] = await store.mail.inbox(
            name, InboxQuery(unread_only=True, mentions_only=False), limit=MANY
        )
        reads[f"inbox {name} paged"] = await store.mail.inbox(
            name, InboxQuery(), limit=2, before=msg_id_of(9)
        )
        reads[f"received {name}"] = await store.mail.received(name, after=None, limit=MANY)
        reads[f"pending {name}"] = await store.mail.received(
            name, after=msg_id_of(2), limit=MANY, pending_only=True
        )
        reads[f"newest {name}"] = await store.mail.newest_received(name)
        reads[f"unread {name}"] = await store.mail.unread_counts(name)
        reads[f"sent {name}"] = await store.mail.sent(name, limit=MANY)
    return reads


async def test_mail_reads_back_the_same_after_reopening(store: Storage, reopen: Reopen) -> None:
    await fill_everything(store)
    before = await everything(store)
    # The fill did what it says, so the comparison below is of something.
    assert before["thread"] and before["totals"] == {"alice": 4, "bob": 5, "carol": 1}
    messages = before["messages"]
    assert isinstance(messages, list) and None not in messages
    assert messages[2].answered_by == msg_id_of(4) and messages[0].thread_id == msg_id_of(1)
    await check_unread(store, NAMES)

    store = await reopen(store)
    assert await everything(store) == before
    await check_unread(store, NAMES)


async def test_msg_ids_and_keys_carry_on_after_reopening(store: Storage, reopen: Reopen) -> None:
    await fill_everything(store)
    first = await store.mail.get_message(msg_id_of(1))

    store = await reopen(store)
    again, created = await store.mail.post(
        mail("alice", ["dave"], "again", idempotency_key="root-key"), [Delivery(name="dave")]
    )
    assert (again, created) == (first, False)  # the key is remembered
    assert await store.mail.received("dave", after=None, limit=MANY) == []
    nxt = await post(store, "alice", ["bob"], "after", when=at(30))
    assert nxt.msg_id == msg_id_of(FILLED + 1)
    await store.mail.advance([StateChange(nxt.msg_id, "bob", "delivered", at(31))])
    await store.mail.mark_read("bob", at(32))
    before = await everything(store)

    store = await reopen(store)
    assert await everything(store) == before
    assert await store.mail.get_message(nxt.msg_id) == nxt
    assert (await delivery_of(store, nxt.msg_id, "bob")) == Delivery(
        name="bob", state="read", delivered_at=at(31), read_at=at(32)
    )
    assert (await post(store, "alice", ["bob"], "later")).msg_id == msg_id_of(FILLED + 2)
    await check_unread(store, NAMES)


# --- lifetime -----------------------------------------------------------------------------------


async def test_a_closed_store_refuses_mail(store: Storage) -> None:
    await post(store)
    await store.close()
    mail_store = store.mail
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: mail_store.put_participant(Participant(name="bob")),
        mail_store.participants,
        lambda: mail_store.post(mail(), [Delivery(name="bob")]),
        lambda: mail_store.get_message(msg_id_of(1)),
        lambda: mail_store.deliveries([msg_id_of(1)]),
        lambda: mail_store.advance([StateChange(msg_id_of(1), "bob", "read", T0)]),
        lambda: mail_store.mark_read("bob", T0),
        lambda: mail_store.inbox("bob", InboxQuery(), limit=5),
        lambda: mail_store.received("bob", after=None, limit=5),
        lambda: mail_store.newest_received("bob"),
        lambda: mail_store.unread_counts("bob"),
        mail_store.unread_totals,
        lambda: mail_store.sent("alice", limit=5),
        lambda: mail_store.thread(msg_id_of(1)),
    ]
    for call in calls:
        with pytest.raises(StorageError, match=STORE_CLOSED):
            await call()
