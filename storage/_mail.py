"""The MailStore protocol every backend implements beside ``Storage``, and its values.

The post office (daemon/) decides everything about a message (who receives it,
its thread, which deliveries start `delivered`); a store only keeps it, numbers
it, and answers reads. Each backend's ``Storage`` carries its ``MailStore`` as
``store.mail``, sharing its connection, files and durability. One conformance
suite (tests/conformance/test_mail.py) runs unchanged against every backend.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime
from typing import NamedTuple, Protocol

import msgspec
from chinwag.protocol import (
    DELIVERY_ORDER,
    Delivery,
    DeliveryState,
    LockHolder,
    LockMode,
    MailMessage,
    MessageVersion,
    Participant,
    Project,
    Reaction,
    Ref,
    Space,
    SpaceMember,
)

from ._errors import StorageError

_MSG_ID = re.compile(r"m(\d{12})")


def msg_id_of(number: int) -> str:
    """The msg_id of the store's ``number``-th message: fixed width, so it sorts as it counts."""
    return f"m{number:012d}"


def number_of(msg_id: str) -> int | None:
    """The inverse of ``msg_id_of``; None for a text that is no msg_id."""
    match = _MSG_ID.fullmatch(msg_id)
    return int(match.group(1)) if match else None


class InboxQuery(msgspec.Struct, kw_only=True, frozen=True):
    """The filters of an `inbox` read; every one given must hold (an AND)."""

    unread_only: bool = False  # state is not `read`
    mentions_only: bool = False  # the delivery is ``mentioned``
    thread_id: str | None = None
    channel: str | None = None
    scope: Ref | None = None  # among the message's scopes
    priority_min: int = 0
    since: datetime | None = None  # created at or after
    pinned_only: bool = False
    include_deleted: bool = False  # else a deleted message is left out
    only_spaces: tuple[str, ...] | None = None  # a message in a space must be in one of
    # these (a project's spaces); mail in no space passes


class ParentChange(msgspec.Struct, kw_only=True, frozen=True):
    """What a reply changes on the message it answers, in the reply's own write."""

    msg_id: str
    start_thread: bool = False  # the parent had no thread: its thread_id becomes its msg_id
    read_by: str | None = None  # the replier's delivery of the parent becomes `read`
    answered: bool = False  # the reply is a hosted agent's answer: set the parent's
    # ``answered_by`` to the reply's msg_id and its ``run_id`` to the reply's


class FromSpace(msgspec.Struct, kw_only=True, frozen=True):
    """A post's recipients read as it is stored: every member of the message's space but
    its author, as stored then, beside those ``named`` apart from the space. On a store
    several daemons share, a daemon's own list of members may be behind the store's."""

    named: frozenset[str] = frozenset()  # recipients whether members or not (`to` named them)
    live: frozenset[str] = frozenset()  # a member among these is `delivered` at once (a
    # watch takes the push), the others `pending`
    members_only: bool = False  # a private space's: an author who is no member, as
    # stored, posts nothing (``NotAMember``)


class NotAMember(StorageError):
    """A post to a private space by an author who is, as the store has its members, no
    member of it (one who left on another daemon): nothing was stored."""


def with_members(
    message: MailMessage,
    deliveries: Sequence[Delivery],
    members: Sequence[str],
    space: FromSpace,
) -> tuple[MailMessage, list[Delivery]]:
    """``message`` and its ``deliveries`` (made from an earlier list of the space's
    members) as ``members``, the space's members as stored now, make them.

    A recipient neither named nor a member any more is left out; a member not among the
    deliveries gets one, after the others, in the order of ``members``. Raises
    ``NotAMember`` for an author who must be a member and is not."""
    if space.members_only and message.sender not in members:
        raise NotAMember(f"{message.sender} is no member of #{message.space}.")
    present = set(members) - {message.sender}
    kept = [d for d in deliveries if d.name in space.named or d.name in present]
    have = {d.name for d in kept}
    at = message.created_at
    kept += [
        Delivery(
            name=name,
            state="delivered" if name in space.live else "pending",
            delivered_at=at if name in space.live else None,
        )
        for name in dict.fromkeys(members)
        if name in present and name not in have
    ]
    return msgspec.structs.replace(message, recipients=[d.name for d in kept]), kept


class EditChange(msgspec.Struct, tag="edit", kw_only=True, frozen=True):
    """New text: the text before becomes a ``MessageVersion``."""

    content: str
    structured: object = None
    at: datetime


class DeleteChange(msgspec.Struct, tag="delete", kw_only=True, frozen=True):
    reason: str | None = None
    at: datetime


class ReactChange(msgspec.Struct, tag="react", kw_only=True, frozen=True):
    emoji: str
    by: str
    remove: bool = False


class PinChange(msgspec.Struct, tag="pin", kw_only=True, frozen=True):
    by: str
    at: datetime
    unpin: bool = False


MessageChange = EditChange | DeleteChange | ReactChange | PinChange
"""One change to a stored message, as ``MailStore.change_message`` takes it."""


def changed(
    message: MailMessage, change: MessageChange
) -> tuple[MailMessage, MessageVersion | None]:
    """``message`` with ``change`` made, and (for an edit) the version it replaced.

    Every backend makes a change with this, so they agree on what one does: an
    edit bumps ``version``; a reaction by someone who already reacted so (or a
    removal of one never made) changes nothing; reactions keep the order they
    were first made in, and each one's ``by`` the order of its reactors.
    """
    match change:
        case EditChange(content=content, structured=structured, at=at):
            before = MessageVersion(
                version=message.version,
                content=message.content,
                structured=message.structured,
                created_at=message.edited_at or message.created_at,
                replaced_at=at,
            )
            after = msgspec.structs.replace(
                message,
                content=content,
                structured=structured,
                edited_at=at,
                version=message.version + 1,
            )
            return after, before
        case DeleteChange(reason=reason):
            return msgspec.structs.replace(message, deleted=True, delete_reason=reason), None
        case ReactChange(emoji=emoji, by=by, remove=remove):
            reactions: list[Reaction] = []
            found = False
            for reaction in message.reactions:
                names = list(reaction.by)
                if reaction.emoji == emoji:
                    found = True
                    if remove and by in names:
                        names.remove(by)
                    elif not remove and by not in names:
                        names.append(by)
                if names:
                    reactions.append(Reaction(emoji=reaction.emoji, by=names))
            if not found and not remove:
                reactions.append(Reaction(emoji=emoji, by=[by]))
            return msgspec.structs.replace(message, reactions=reactions), None
        case PinChange(by=by, at=at, unpin=unpin):
            if unpin:
                return msgspec.structs.replace(
                    message, pinned=False, pinned_by=None, pinned_at=None
                ), None
            return msgspec.structs.replace(message, pinned=True, pinned_by=by, pinned_at=at), None


def lock_allows(others: Sequence[LockHolder], mode: LockMode) -> bool:
    """Whether a lock in ``mode`` may be held beside the live ``others`` (its taker left out):
    advisory beside advisory ones, exclusive beside none."""
    if mode == "exclusive":
        return not others
    return all(other.mode == "advisory" for other in others)


class StateChange(NamedTuple):
    """Move ``name``'s delivery of ``msg_id`` forward to ``state``, at ``at``."""

    msg_id: str
    name: str
    state: DeliveryState
    at: datetime


class MailStore(Protocol):
    """Durable home of participants, messages and per-recipient deliveries.

    Every write is all or nothing and durable when it returns, with the same
    cancellation promise as ``Storage.append``. Returned values are the
    caller's: changing them changes nothing stored. Times are given in UTC.
    Raises ``StorageError`` when the store fails or is closed.
    """

    async def put_participant(self, participant: Participant) -> None:
        """Create or replace the participant of that name (``online`` and ``unread`` are not
        stored: they read back False and 0)."""
        ...

    async def participants(self) -> list[Participant]:
        """Every stored participant, by name."""
        ...

    async def post(
        self,
        message: MailMessage,
        deliveries: Sequence[Delivery],
        *,
        parent: ParentChange | None = None,
        new_participants: Sequence[Participant] = (),
        from_space: FromSpace | None = None,
    ) -> tuple[MailMessage, bool]:
        """Store one message with one delivery per recipient, numbered after every other.

        The store sets ``msg_id`` (``msg_id_of`` the next number; whatever it held is
        ignored) and keeps every other field as given. ``parent`` is applied and
        ``new_participants`` put in the same write (a participant already stored is
        left as it is). With ``from_space``, the recipients and deliveries are those
        ``with_members`` makes of the members of ``message.space`` as stored in the
        same write: a membership changed (``set_member``) before it is counted, and one
        changed while it is written waits for it (``NotAMember``, storing nothing, for an
        author of a private space who is no member). Returns the stored message and True.
        When the message has an ``idempotency_key`` that the same ``sender`` used
        before, nothing is stored and the first message comes back with False.
        """
        ...

    async def get_message(self, msg_id: str) -> MailMessage | None:
        """The stored message, or None (also for a text that is no msg_id)."""
        ...

    async def deliveries(self, msg_ids: Sequence[str]) -> dict[str, list[Delivery]]:
        """Each message's deliveries, by recipient name; a msg_id not stored is left out."""
        ...

    async def advance(self, changes: Sequence[StateChange]) -> int:
        """Move deliveries forward, in one write: to `delivered` (sets ``delivered_at``) or
        to `read` (sets ``read_at``, and ``delivered_at`` when it had none). A change to the
        state a delivery has or one behind it, or to a delivery that does not exist, is
        left out: a state never goes back and its time is never rewritten. Returns how many
        deliveries moved, each once: of several writers moving one delivery at the same
        time, one moves it (so a move from `pending` can claim a message)."""
        ...

    async def mark_read(
        self,
        name: str,
        at: datetime,
        *,
        msg_ids: Sequence[str] | None = None,
        thread_id: str | None = None,
    ) -> list[str]:
        """Mark ``name``'s deliveries that are not `read` as `read`: of ``msg_ids``, of the
        thread, or (neither given) all of them. Returns the msg_ids of those that moved,
        each once, in msg_id order (what the reader's watches are told)."""
        ...

    async def inbox(
        self, name: str, query: InboxQuery, *, limit: int, before: str | None = None
    ) -> list[tuple[MailMessage, Delivery]]:
        """``name``'s received messages matching ``query``, newest first, with msg_id below
        ``before`` when given; at most ``limit``."""
        ...

    async def received(
        self, name: str, *, after: str | None, limit: int, pending_only: bool = False
    ) -> list[tuple[MailMessage, Delivery]]:
        """``name``'s received messages with msg_id above ``after`` (all when None), oldest
        first, at most ``limit``; with ``pending_only`` only those still `pending`."""
        ...

    async def newest_received(self, name: str) -> str | None:
        """The msg_id of the newest message ``name`` received, or None."""
        ...

    async def unread_counts(self, name: str) -> dict[int, int]:
        """``name``'s messages not `read`, counted by priority (a priority with none is left
        out)."""
        ...

    async def unread_totals(self) -> dict[str, int]:
        """Every name with messages not `read`, and how many."""
        ...

    async def sent(self, name: str, *, limit: int, before: str | None = None) -> list[MailMessage]:
        """The messages ``name`` wrote, newest first, below ``before`` when given."""
        ...

    async def thread(self, thread_id: str) -> list[MailMessage]:
        """Every message of the thread, oldest first (empty for an unknown thread)."""
        ...

    async def messages_after(self, after: str | None, *, limit: int) -> list[MailMessage]:
        """Every stored message with msg_id above ``after`` (all when None), oldest first, at
        most ``limit``: what the webhooks' outbox reads its new mail from."""
        ...

    async def space_mail(
        self, space: str, name: str, query: InboxQuery, *, limit: int, before: str | None = None
    ) -> list[tuple[MailMessage, Delivery | None]]:
        """The messages posted to ``space`` matching ``query``, newest first, below ``before``
        when given, at most ``limit``, each with ``name``'s delivery of it (None when ``name``
        is no recipient: ``unread_only`` and ``mentions_only`` then leave it out)."""
        ...

    # --- changes to messages ---------------------------------------------------------

    async def change_message(self, msg_id: str, change: MessageChange) -> MailMessage | None:
        """Make ``change`` (as ``changed`` makes it) and return the message as it is now;
        None, changing nothing, when no such message is stored. An edit stores the version
        it replaced, and searches match the new text (a deleted message matches none)."""
        ...

    async def versions(self, msg_id: str) -> list[MessageVersion]:
        """The versions edits replaced, oldest first (empty for none, or no such message)."""
        ...

    async def search(
        self,
        name: str,
        words: Sequence[str],
        *,
        readable_spaces: Sequence[str],
        only_spaces: Sequence[str] | None = None,
        limit: int,
    ) -> list[MailMessage]:
        """Messages whose content matches ``words`` (the words of ``search_words``: a
        message matches if it has any of them, ranked by BM25, best first, the newer first
        on a tie), at most ``limit``, among those ``name`` may read: it is a recipient, the
        author, or the message's space is in ``readable_spaces``. A deleted message is left
        out; ``only_spaces`` narrows as ``InboxQuery.only_spaces`` does. No words: none."""
        ...

    # --- spaces and projects -----------------------------------------------------------

    async def put_space(self, space: Space) -> None:
        """Create or replace the space of that name (its counts are not stored: they read
        back 0); its members stay as they are."""
        ...

    async def spaces(self) -> list[Space]:
        """Every stored space, by name."""
        ...

    async def set_member(self, space: str, name: str, at: datetime, *, member: bool) -> bool:
        """Make ``name`` a member of ``space`` since ``at`` (kept as it is if it was one), or
        no longer one. Returns whether anything changed."""
        ...

    async def members(self) -> dict[str, list[SpaceMember]]:
        """Every space with members, and them, each list by name."""
        ...

    async def space_counts(self) -> dict[str, int]:
        """Every space with messages, and how many it has (deleted ones included)."""
        ...

    async def put_project(self, project: Project) -> None:
        """Create or replace the project of that name."""
        ...

    async def projects(self) -> list[Project]:
        """Every stored project, by name."""
        ...

    async def delete_project(self, name: str) -> bool:
        """Forget the project; False when there was none. (Refusing it while a space
        refers to it is the post office's check, not the store's.)"""
        ...

    # --- locks ---------------------------------------------------------------------------

    async def take_lock(self, lock: LockHolder, now: datetime) -> tuple[bool, list[LockHolder]]:
        """Take or renew ``lock``, all in one write: holders of its resource that expired by
        ``now`` are dropped; then, if ``lock_allows`` the others beside it, ``lock`` is
        stored (replacing its holder's earlier row, whose ``acquired_at`` is kept). Returns
        whether it was taken, and the resource's live holders after, by holder name."""
        ...

    async def release_lock(self, resource: str, holder: str, now: datetime) -> bool:
        """Drop ``holder``'s lock on ``resource``; False when it held none live at ``now``."""
        ...

    async def locks(
        self, now: datetime, *, resource: str | None = None, holder: str | None = None
    ) -> list[LockHolder]:
        """The live locks at ``now`` (expired ones are left out, and may be forgotten), of
        ``resource`` and ``holder`` when given, by resource then holder."""
        ...


def advanced(delivery: Delivery, state: DeliveryState, at: datetime) -> Delivery | None:
    """``delivery`` moved forward to ``state`` at ``at``, or None when that is no move."""
    if DELIVERY_ORDER[state] <= DELIVERY_ORDER[delivery.state]:
        return None
    if state == "read":
        return msgspec.structs.replace(
            delivery, state="read", read_at=at, delivered_at=delivery.delivered_at or at
        )
    return msgspec.structs.replace(delivery, state=state, delivered_at=at)
