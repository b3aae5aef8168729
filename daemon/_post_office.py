"""The post office: participants, addressing, fan-out, delivery states and watchers.

It knows neither sockets nor encodings: the server hands it requests' fields
and turns what it returns into frames. A message is pushed only once
``MailStore.post`` has returned, so only what is durable is ever seen; posts
and the start of a watch take one lock, so every watcher receives its mail in
msg_id order, and a watch that begins sees every message either in its replay
or pushed, never both. A hosted agent's answer to mail is an ordinary run of
its conversation: the post office only queues the run and posts its final text.

On a store other daemons share, each post office tells the others what it
changed (daemon/_mail_news.py) and pushes their mail to its own watchers as it
pushes its own. Their msg_ids are taken in one order and may commit in
another, so there every push follows the store's order: a message above a
number not yet stored waits until that number is stored (its news comes) or
``PUSH_GAP_WAIT_S`` passed, as a webhook waits (``passable``), then goes; a
number passed over that is stored after all is pushed late rather than never.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import msgspec
import structlog
import trio
from chinwag.protocol import (
    ChangeKind,
    Delivery,
    DeliveryState,
    End,
    LockHolder,
    MailItem,
    MailMessage,
    MessageVersion,
    Participant,
    ParticipantKind,
    Ref,
    Start,
    StreamEventMsg,
    ThreadSummary,
)
from chinwag.storage import (
    DeleteChange,
    EditChange,
    FromSpace,
    InboxQuery,
    MailStore,
    MessageChange,
    NotAMember,
    ParentChange,
    PinChange,
    ReactChange,
    StateChange,
    StorageError,
    msg_id_of,
    number_of,
    search_words,
)

from ._addresses import NAME, RESERVED, participant_name
from ._config import parse_duration
from ._conversation import DelegateAnswer
from ._errors import RequestError
from ._locks import Locks
from ._mail_news import (
    Changed,
    Known,
    News,
    Offline,
    Online,
    Posted,
    Presence,
    Read,
    RollCall,
    SpacesChanged,
    decode_news,
    encode_news,
)
from ._spaces import Spaces
from ._webhooks import Webhooks, newest_msg_id, passable

if TYPE_CHECKING:
    from ._runtime import Runtime

log = structlog.get_logger("chinwag.mail")

PRIORITIES = range(4)
TAKEOVER_WINDOW_S = 30 * 60  # a registration silent for longer may be taken without asking
MAX_ADDRESSES = 256  # entries of `to` plus `mentions`
MAX_PAGE = 500
REPLAY_PAGE = 200
MARK_SPACE_LIMIT = 10_000  # a space's unread mail marked read by one request
RERUN_WINDOW = 1000  # an agent's newest mail looked at, at start, for a run cut short
PUSH_GAP_WAIT_S = 2.0  # how long pushes wait for a msg_id another daemon has yet to store
PASSED_KEPT = 1000  # msg_ids passed over, remembered for a late push (a failed post's stay)


def now() -> datetime:
    return datetime.now(UTC)


def parse_since(text: str, moment: datetime) -> datetime:
    """An RFC 3339 time, or a duration back from ``moment`` (``30m``, ``2h``, ``1d``)."""
    if (duration := parse_duration(text)) is not None:
        return moment - duration
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise RequestError(
            400, f"since must be a time (RFC 3339) or a duration such as 30m, 2h or 1d: {text!r}."
        ) from None
    if parsed.tzinfo is None:
        raise RequestError(400, f"since must name its timezone (a Z or an offset): {text!r}.")
    return parsed.astimezone(UTC)


@dataclass
class Registration:
    """A participant announced on a live connection (``owner``)."""

    owner: object
    participant: Participant
    session: object  # info["session"], compared for conflicts
    seen_at: float  # trio time of the registration or its latest heartbeat


@dataclass(eq=False)
class Watcher:
    """One `watch`: ``deliver`` takes each new message for ``name``, ``update`` each change
    to one, ``read`` the msg_ids of ``name``'s copies that became `read` (False: drop the
    watch); ``room`` says whether it would take one more now."""

    name: str
    deliver: Callable[[MailMessage], bool]
    update: Callable[[ChangeKind, MailMessage], bool] | None  # None: it asked for none
    room: Callable[[], bool]
    read: Callable[[list[str]], bool] | None = None  # None: it asked for none
    # The newest msg_id the reader had when the watch began, which its replay covers:
    # another daemon's news of one up to it comes too late to push.
    cursor: str | None = None


@dataclass
class PostResult:
    message: MailMessage
    created: bool
    warnings: list[str] = field(default_factory=list)


@dataclass
class Page:
    items: list[MailItem]
    next_cursor: str | None
    unread: int


@dataclass
class MailContextView:
    name: str
    unread_by_priority: dict[int, int]
    threads: list[ThreadSummary]
    participant: Participant | None
    spaces: list[str]
    locks: list[LockHolder]


@dataclass
class _Addressed:
    recipients: dict[str, bool] = field(default_factory=dict)  # name -> mentioned
    named: set[str] = field(default_factory=set)  # recipients not (only) by the `#space`
    new: list[str] = field(default_factory=list)  # names never seen before
    direct: set[str] = field(default_factory=set)  # named in `to` (a DM to them)
    at_named: set[str] = field(default_factory=set)  # `@name`d, in `to` or `mentions`
    space: str | None = None  # the `#space` of `to`


class PostOffice:
    """Mail for one daemon: the participants it knows, who is online, who watches."""

    def __init__(self, runtime: Runtime, store: MailStore) -> None:
        self.runtime = runtime
        self.store = store
        self.known: dict[str, Participant] = {}
        self.registrations: dict[str, Registration] = {}
        self.watchers: dict[str, list[Watcher]] = {}
        self.spaces = Spaces(store, lambda: self._tell(SpacesChanged()))
        self.locks = Locks(store)
        self.webhooks = Webhooks(runtime.config.webhooks, runtime.storage)  # run by serve
        self._posting = trio.Lock()
        # Other daemons' news (`heard`), taken in the order it came by one task, and the
        # names registered there.
        self._news, self._news_queue = trio.open_memory_channel[tuple[str, bytes]](math.inf)
        self.elsewhere = Presence()
        # On a shared store: every msg_id up to `_through` was pushed here (or passed
        # over, `_passed`); `_ahead`: one above a gap waits for `_follow` (woken by
        # `_behind`) to push it from the store. None: alone, every post is pushed at once.
        self._through: int | None = None
        self._passed: set[int] = set()
        self._ahead = False
        self._behind = trio.Event()
        runtime.post_office = self

    # --- start ----------------------------------------------------------------------

    async def start(self) -> None:
        """Load the participants, make the configured agents ones, answer waiting mail;
        on a shared store, follow the other daemons' mail from the newest stored."""
        cluster = self.runtime.cluster
        if cluster is not None:
            cluster.on_peers = self.peers_changed
            # Pushes follow on from the newest message stored. Numbers below it that
            # other daemons took and have yet to store are pushed late, when they are.
            newest = number_of(await newest_msg_id(self.runtime.storage)) or 0
            self._through = max(newest - REPLAY_PAGE, 0)
            self._passed_to(newest)
            self.runtime.nursery.start_soon(self._follow)
            self._tell(RollCall())
        self.runtime.nursery.start_soon(self._hear_news)
        for participant in await self.store.participants():
            self.known[participant.name] = participant
        await self.spaces.load()
        made = []
        for name in self.runtime.agents:
            folded = name.casefold()
            if not NAME.fullmatch(folded) or folded in RESERVED:
                log.warning("agent_not_a_mail_address", agent=name)
                continue
            known = self.known.get(folded)
            if known is None or known.kind != "agent":
                participant = Participant(name=folded, kind="agent", last_seen=now())
                await self.store.put_participant(participant)
                self.known[folded] = participant
                made.append(participant)
        if made:
            self._tell(Known(made))
        for name, agent in self.runtime.agents.items():
            if agent.config.mail == "never" or name.casefold() not in self.known:
                continue
            address = name.casefold()
            # Mail the daemon stopped before queueing its run, and mail whose run it died
            # in (taken, never answered; the newest RERUN_WINDOW of it): answered now.
            waiting = await self.store.received(
                address, after=None, limit=10_000, pending_only=True
            )
            waiting_ids = {m.msg_id for m, _ in waiting}
            taken = await self.store.inbox(address, InboxQuery(), limit=RERUN_WINDOW)
            unanswered = {m.msg_id: m for m, d in taken if d.state != "pending"}
            unanswered |= {m.msg_id: m for m, _ in waiting}
            asking = [unanswered[i] for i in sorted(unanswered)]
            asking = [m for m in asking if self._starts_run(name, m)]
            if cluster is not None and asking:  # answered by a run on another daemon
                held = await cluster.holders(list({_conversation(name, m) for m in asking}))
                asking = [m for m in asking if _conversation(name, m) not in held]
            for message in asking:
                if message.msg_id not in waiting_ids or await self._take(address, message):
                    self._answer(name, message)

    # --- participants ----------------------------------------------------------------

    def hosted_agent(self, name: str) -> str | None:
        """The configured agent a mail address names, or None."""
        for agent in self.runtime.agents:
            if agent.casefold() == name:
                return agent
        return None

    def online(self, name: str) -> bool:
        return (
            name in self.registrations
            or name in self.elsewhere
            or self.hosted_agent(name) is not None
        )

    async def _view(self, participant: Participant, unread: int | None = None) -> Participant:
        if unread is None:
            unread = sum((await self.store.unread_counts(participant.name)).values())
        registration = self.registrations.get(participant.name)
        shown = registration.participant if registration is not None else participant
        return msgspec.structs.replace(shown, online=self.online(participant.name), unread=unread)

    async def register(
        self,
        owner: object,
        name: str,
        *,
        kind: ParticipantKind,
        roles: Sequence[str],
        info: dict[str, Any],
        takeover: bool,
    ) -> Participant:
        """Announce ``name`` on the connection ``owner``; 409 when another live one holds it."""
        name = participant_name(name)
        folded_roles = sorted({participant_name(role, "A role") for role in roles})
        if self.hosted_agent(name) is not None:
            raise RequestError(
                409, f"{name} is an agent this daemon hosts; its mail is answered by its runs."
            )
        if kind == "agent":
            raise RequestError(400, "Kind `agent` is for the daemon's configured agents.")
        clash = [role for role in folded_roles if role in self.known or role == name]
        if clash:
            raise RequestError(409, f"A role may not be a participant's name: {clash[0]!r} is one.")
        if name in self._roles():
            raise RequestError(409, f"{name!r} is a role; a participant cannot take its name.")
        session = info.get("session")
        held = self.registrations.get(name)
        # Who holds the name now, here (another connection) or on another daemon.
        rivals = [(r.participant, r.seen_at) for r in self.elsewhere.of(name)]
        if held is not None and held.owner is not owner:
            rivals.append((held.participant, held.seen_at))
        for rival, seen_at in [] if takeover else rivals:
            fresh = trio.current_time() - seen_at < TAKEOVER_WINDOW_S
            if fresh and rival.info.get("session") != session:
                about = ", ".join(
                    f"{key} {rival.info[key]}"
                    for key in ("session", "vendor", "pid", "cwd")
                    if key in rival.info
                )
                raise RequestError(
                    409,
                    f"{name} is registered by another live session"
                    f"{f' ({about})' if about else ''}; register with takeover to replace it, "
                    "or pick another name.",
                )
        moment = now()
        previous = self.known.get(name)
        participant = Participant(
            name=name,
            kind=kind,
            roles=folded_roles,
            last_seen=moment,
            status=previous.status if previous is not None else "",
            info=info,
        )
        await self.store.put_participant(participant)
        self.known[name] = participant
        self.registrations[name] = Registration(owner, participant, session, trio.current_time())
        self._tell(Online([participant], registered=True))
        log.info("participant_registered", name=name, kind=kind, takeover=bool(rivals))
        return await self._view(participant)

    def leave(self, owner: object) -> None:
        """The connection ``owner`` closed: its registrations end (their mail stays)."""
        ended = [name for name, r in self.registrations.items() if r.owner is owner]
        for name in ended:
            del self.registrations[name]
        if ended:
            self._tell(Offline(ended))

    async def heartbeat(self, name: str, status: str | None) -> None:
        name = participant_name(name)
        participant = self.known.get(name)
        if participant is None:
            raise RequestError(404, f"No participant is named {name}; register it first.")
        if status is not None and len(status) > 500:
            raise RequestError(400, "A status line is at most 500 characters.")
        participant = msgspec.structs.replace(
            participant, last_seen=now(), status=participant.status if status is None else status
        )
        await self.store.put_participant(participant)
        self.known[name] = participant
        if (registration := self.registrations.get(name)) is not None:
            registration.participant = participant
            registration.seen_at = trio.current_time()
            self._tell(Online([participant]))
        else:
            self._tell(Known([participant]))

    async def participants(self, *, online_only: bool, role: str | None) -> list[Participant]:
        if role is not None:
            role = role.casefold().removeprefix("@")
        totals = await self.store.unread_totals()
        shown = []
        for name in sorted(self.known):
            participant = self.known[name]
            if online_only and not self.online(name):
                continue
            if role is not None and role not in participant.roles:
                continue
            shown.append(await self._view(participant, totals.get(name, 0)))
        return shown

    def _roles(self) -> set[str]:
        return {role for p in self.known.values() for role in p.roles}

    # --- posting -------------------------------------------------------------------------

    async def post(
        self,
        *,
        sender: str,
        to: Sequence[str],
        content: str,
        format: str,
        structured: Any,
        priority: int,
        channel: str | None,
        reply_to: str | None,
        scopes: Sequence[Ref],
        refs: Sequence[Ref],
        metadata: dict[str, Any],
        mentions: Sequence[str],
        idempotency_key: str | None,
        run_id: str | None = None,
        answers: bool = False,
    ) -> PostResult:
        """Store one message and push it to its recipients' watchers; then queue the runs of
        the hosted agents it asks. Raises ``RequestError`` (400, 404) storing nothing."""
        sender = participant_name(sender, "`from`")
        if priority not in PRIORITIES:
            raise RequestError(400, f"priority must be 0, 1, 2 or 3, not {priority}.")
        if format == "json":
            _check_json(content)
        if not content.strip() and structured is None:
            raise RequestError(400, "A message needs content.")
        if not to and reply_to is None:
            raise RequestError(400, "`to` must name at least one recipient (or set reply_to).")
        if len(to) + len(mentions) > MAX_ADDRESSES:
            raise RequestError(400, f"A message has at most {MAX_ADDRESSES} addresses.")
        if channel is not None and not 1 <= len(channel) <= 64:
            raise RequestError(400, "A channel is 1 to 64 characters.")
        if idempotency_key is not None and not 1 <= len(idempotency_key) <= 200:
            raise RequestError(400, "An idempotency_key is 1 to 200 characters.")
        for ref in (*scopes, *refs):
            if not ref.type or not ref.value:
                raise RequestError(400, "Each scope and ref needs a non-empty type and value.")

        parent = None
        if reply_to is not None:
            parent = await self.store.get_message(reply_to)
            if parent is None or not self._may_read(parent, sender):
                raise RequestError(404, f"No message {reply_to} is yours to reply to.")
            if not to:  # the parent's author, or when that is us, the parent's recipients
                to = [parent.sender] if parent.sender != sender else parent.recipients
                if parent.space is not None:  # and the space it went to
                    to = [*to, f"#{parent.space}"]
        shared = self.runtime.cluster is not None
        if shared and any(
            e.strip().startswith("#") and self.spaces.find(e, sender) is None for e in to
        ):
            await self.spaces.load()  # made, or joined, on another daemon: its news to come
        addressed = self._address(sender, to, mentions)
        recipients = [name for name in addressed.recipients if name != sender]
        warnings = [
            f"{name} is not registered: it will get this when it does."
            for name in addressed.new
            if name != sender
        ]
        mention_refs = [Ref(type="mention", value=name) for name in addressed.at_named]
        thread_id = None
        change = None
        if parent is not None:
            thread_id = parent.thread_id or parent.msg_id
            change = ParentChange(
                msg_id=parent.msg_id,
                start_thread=parent.thread_id is None,
                read_by=sender if sender in parent.recipients else None,
                answered=answers,
            )
        fresh = [
            Participant(name=name, kind="session", last_seen=None)
            for name in [*addressed.new, sender]
            if name not in self.known
        ]
        async with self._posting:
            moment = now()
            # Stored `delivered` where a watch will take it: under this lock nothing else
            # fills a watch's buffer, so one with room now takes the push below.
            live = {name for name in recipients if self._takes_push_now(name)}
            from_space = None
            if shared and addressed.space is not None:
                # Its members as the store has them when it is stored: this daemon's list
                # follows another's joins and leaves only once its news comes.
                from_space = FromSpace(
                    members_only=self.spaces.by_name[addressed.space].private,
                    named=frozenset(addressed.named),
                    live=frozenset(name for name in self.watchers if self._takes_push_now(name)),
                )
            message = MailMessage(
                msg_id="",
                sender=sender,
                to=list(to),
                recipients=recipients,
                content=content,
                created_at=moment,
                thread_id=thread_id,
                format=format,  # type: ignore[arg-type]  # checked by the wire type
                structured=structured,
                priority=priority,
                channel=channel,
                reply_to=parent.msg_id if parent is not None else None,
                scopes=list(scopes),
                refs=[*refs, *(r for r in mention_refs if r not in refs)],
                metadata=metadata,
                mentions=[m.casefold().removeprefix("@") for m in mentions],
                idempotency_key=idempotency_key,
                run_id=run_id,
                space=addressed.space,
            )
            # The hosted agents it asks: their runs are queued at once, so `delivered`
            # (and no other daemon hosting one takes it: see `_take`). A daemon shutting
            # down queues none, and leaves the mail `pending` for one that runs it.
            answering = (
                self._agents_asked(message, direct=addressed.direct)
                if self.runtime.accepting
                else {}
            )
            live |= answering.keys()
            deliveries = [
                Delivery(
                    name=name,
                    state="delivered" if name in live else "pending",
                    delivered_at=moment if name in live else None,
                    mentioned=addressed.recipients[name],
                )
                for name in recipients
            ]
            try:
                stored, created = await self.store.post(
                    message,
                    deliveries,
                    parent=change,
                    new_participants=fresh,
                    from_space=from_space,
                )
            except NotAMember:  # left on another daemon, whose news has yet to come
                raise RequestError(404, f"No space is named #{addressed.space}.") from None
            if created:  # a retry stored nothing: no participant is new either
                for participant in fresh:
                    self.known.setdefault(participant.name, participant)
                if stored.space is not None:
                    self.spaces.posted(stored.space)
                self._in_order(stored)
                self._tell(Posted(stored.msg_id))
                self.webhooks.wake()
                self.runtime.telemetry.mail_posted()
        if created:
            log.debug(
                "mail_posted",
                msg_id=stored.msg_id,
                sender=sender,
                recipients=len(stored.recipients),
            )
            if not stored.recipients:
                warnings.append(
                    f"It reaches nobody: #{addressed.space} has no member but its author."
                    if addressed.space is not None
                    else "It reaches nobody: its only recipient is its author."
                )
            for name in stored.recipients:
                if name in answering:
                    self._answer(answering[name], stored)
            if change is not None and change.read_by is not None:
                await self._read(change.read_by, [change.msg_id])
        return PostResult(stored, created, warnings if created else [])

    def _address(self, sender: str, to: Sequence[str], mentions: Sequence[str]) -> _Addressed:
        addressed = _Addressed()
        roles = self._roles()

        def add(name: str, mentioned: bool, *, named: bool = True) -> None:
            addressed.recipients[name] = addressed.recipients.get(name, False) or mentioned
            if named:
                addressed.named.add(name)

        for entry, is_mention in [*((e, False) for e in to), *((m, True) for m in mentions)]:
            raw = entry.strip()
            if raw.startswith("#"):
                if is_mention:
                    raise RequestError(400, f"A space goes in `to`, not in mentions: {raw}.")
                space = self.spaces.get(raw, sender)
                if addressed.space not in (None, space.name):
                    raise RequestError(400, "A message goes to at most one space.")
                addressed.space = space.name
                for name in self.spaces.recipients(space, sender):
                    add(name, False, named=False)
                continue
            if raw.casefold() == "@everyone":
                if is_mention:
                    raise RequestError(400, "@everyone goes in `to`, not in mentions.")
                for name in self.known:
                    add(name, False)
                continue
            at = raw.startswith("@") or is_mention
            name = raw.removeprefix("@").casefold()
            if name in roles:
                if not at:  # else it would become a participant named as the role
                    raise RequestError(
                        409,
                        f"{name} is a role: write @{name} to reach its holders; nothing was sent.",
                    )
                for participant in self.known.values():
                    if name in participant.roles:
                        add(participant.name, True)
                continue
            if at and name not in self.known and name not in addressed.recipients:
                raise RequestError(
                    404, f"No participant or role is named @{name}; nothing was sent."
                )
            name = participant_name(name, "A recipient")
            if name not in self.known and name not in addressed.new:
                addressed.new.append(name)
            add(name, at)
            if at:
                addressed.at_named.add(name)
            if not is_mention:
                addressed.direct.add(name)
        addressed.recipients.pop(sender, None)
        return addressed

    def _push(self, message: MailMessage) -> list[str]:
        """Hand ``message`` to every watcher of its recipients; drop those that cannot take
        it. The recipients a watcher took it for, to be `delivered` (no agent)."""
        taken = []
        for name in message.recipients:
            watchers = self.watchers.get(name)
            if not watchers:
                continue
            gone = []
            for watcher in watchers:
                if watcher.cursor is not None and message.msg_id <= watcher.cursor:
                    continue  # its replay has it
                if watcher.deliver(message):
                    taken.append(name)
                else:
                    gone.append(watcher)
            for watcher in gone:
                watchers.remove(watcher)
        return [name for name in dict.fromkeys(taken) if not self._moved_by_runs(name)]

    def _in_order(self, message: MailMessage) -> list[str]:
        """Push ``message``, stored, now if its msg_id's turn has come (always, alone on
        the store); else ``_follow`` will. Under the posting lock; as ``_push``."""
        through = self._through
        if through is None:
            return self._push(message)
        number = number_of(message.msg_id) or 0
        if number > through:
            if not self._ahead and (number == through + 1 or self._alone()):
                self._passed_to(number)
                return self._push(message)
            self._ahead = True
            self._behind.set()
            return []
        if number in self._passed:  # stored after it was passed over: late, not never
            self._passed.discard(number)
            return self._push(message)
        return []  # pushed already, read from the store by `_follow`

    def _passed_to(self, number: int) -> None:
        """Pushes reached ``number``: the numbers below it not stored are passed over."""
        assert self._through is not None
        self._passed.update(range(max(self._through + 1, number - PASSED_KEPT), number))
        while len(self._passed) > PASSED_KEPT:
            self._passed.remove(min(self._passed))
        self._through = number

    def _pushed_here(self, msg_id: str) -> bool:
        """Whether this daemon's watchers were pushed ``msg_id`` (or will never be)."""
        return self._through is None or (number_of(msg_id) or 0) <= self._through

    def _alone(self) -> bool:
        cluster = self.runtime.cluster
        return cluster is None or cluster.live <= {cluster.me}

    # --- hosted agents ---------------------------------------------------------------------

    def _starts_run(
        self, agent: str, message: MailMessage, *, direct: set[str] | None = None
    ) -> bool:
        """Whether ``message`` asks the hosted ``agent`` for an answer (never @role/@everyone)."""
        name = agent.casefold()
        if message.sender == name or message.answered_by is not None:
            return False
        if message.run_id is not None and message.reply_to is not None:
            return False  # an agent's answer: answering it back would never end
        mode = self.runtime.agents[agent].config.mail
        named = name in message.mentions or Ref(type="mention", value=name) in message.refs
        if direct is None:  # read back from the store: `to` as the author wrote it
            direct = {e.casefold().removeprefix("@") for e in message.to if not e.startswith("#")}
            direct.discard("everyone")
            direct &= {name}
        if mode == "never":
            return False
        if mode == "mentions":
            return named
        return named or name in direct

    def _answer(self, agent: str, message: MailMessage) -> None:
        """Queue a run of ``agent`` in its conversation with the author; post its answer.
        The agent's delivery is `delivered` already: stored so, or taken (``_take``)."""
        answer = MailAnswer(self, agent, message)
        try:
            answer.run = self.runtime.submit(
                agent=agent,
                sender=_conversation(agent, message)[1],
                content=message.content,
                guest=None,
                cwd=None,
                queue="enqueue",
                sink=answer,
                framing=_framing(agent, message),
            )
        except RequestError as exc:
            log.warning("mail_run_refused", agent=agent, msg_id=message.msg_id, error=exc.message)

    def _agents_asked(
        self, message: MailMessage, *, direct: set[str] | None = None
    ) -> dict[str, str]:
        """The hosted agents among ``message``'s recipients it asks for an answer, by
        address (``_starts_run``, with ``direct`` as it says)."""
        return {
            name: agent
            for name in message.recipients
            if (agent := self.hosted_agent(name)) is not None
            and self._starts_run(agent, message, direct=direct)
        }

    def _takes_push_now(self, name: str) -> bool:
        """Whether a push to ``name`` makes its copy `delivered` at once: a watch of it has
        room (under the posting lock nothing else fills one), and it is no agent."""
        return any(w.room() for w in self.watchers.get(name, ())) and not self._moved_by_runs(name)

    def _moved_by_runs(self, name: str) -> bool:
        """Whether ``name`` is an agent: its copies become `delivered` when a run is queued
        on them and `read` when it starts (or when it reads them itself), never because a
        watch took them or someone listed them, so that a `pending` one is still there
        for a daemon hosting it to take (``_take``)."""
        participant = self.known.get(name)
        return participant is not None and participant.kind == "agent"

    async def _take(self, name: str, message: MailMessage) -> bool:
        """Whether this daemon moved ``name``'s delivery of ``message`` from `pending`: of
        the daemons hosting an agent that try to take mail to it, one does. One shutting
        down takes none: its run would be refused, and the mail left unanswered."""
        if not self.runtime.accepting:
            return False
        change = StateChange(message.msg_id, name, "delivered", now())
        return await self.store.advance([change]) == 1

    async def _answer_taken(self, message: MailMessage) -> None:
        """Mail another daemon stored: the hosted agents here it asks that it was not
        answered by there (their deliveries still `pending`) answer it, if taken here."""
        for name, agent in self._agents_asked(message).items():
            if await self._take(name, message):
                self._answer(agent, message)

    def _later(self, fn: Callable[..., Any], *args: Any) -> None:
        self.runtime.nursery.start_soon(fn, *args)

    async def _read_by_run(self, change: StateChange) -> None:
        """A hosted agent's run started on its mail: its copy is `read`."""
        try:
            if await self.store.advance([change]):
                await self._read(change.name, [change.msg_id])
        except Exception:
            log.exception("mail_state_not_stored")

    async def _reply_for(self, answer: MailAnswer, end: End) -> None:
        agent = answer.agent.casefold()
        message = answer.message
        if end.status == "done":
            content = answer.text.strip() or "(no text)"
        else:
            why = end.error.message if end.error is not None else end.status
            content = f"{answer.agent} could not answer ({end.status}): {why}"
        try:
            await self.post(
                sender=agent,
                to=[],
                content=content,
                format="markdown",
                structured=None,
                priority=message.priority,
                channel=message.channel,
                reply_to=message.msg_id,
                scopes=message.scopes,
                refs=[],
                metadata={},
                mentions=[],
                idempotency_key=f"answer:{message.msg_id}",
                run_id=answer.run.id if answer.run is not None else None,
                answers=True,
            )
        except Exception:
            log.exception("mail_answer_not_posted", agent=agent, msg_id=message.msg_id)

    # --- reading ---------------------------------------------------------------------------

    def _reader(self, name: str) -> str:
        return participant_name(name, "`as`")

    async def inbox(
        self,
        reader: str,
        query: InboxQuery,
        *,
        limit: int,
        cursor: str | None,
        mark_read: bool,
        space: str | None = None,
        project: str | None = None,
    ) -> Page:
        """``reader``'s mail, newest first; with ``space``, that space's mail it may read
        (received or not); narrowed to ``project`` (default: its focus) otherwise."""
        name = self._reader(reader)
        limit = _limit(limit)
        before = _cursor(cursor)
        rows: Sequence[tuple[MailMessage, Delivery | None]]
        if space is not None:
            found = self.spaces.get(space, name).name
            rows = await self.store.space_mail(found, name, query, limit=limit + 1, before=before)
        else:
            only = self.spaces.of_project(project or self.focus_of(name))
            query = msgspec.structs.replace(query, only_spaces=only)
            rows = await self.store.inbox(name, query, limit=limit + 1, before=before)
        more = len(rows) > limit
        rows = rows[:limit]
        moment = now()
        state: DeliveryState = "read" if mark_read else "delivered"
        moves = mark_read or not self._moved_by_runs(name)  # listing an agent's moves none
        changes = [
            StateChange(m.msg_id, name, state, moment)
            for m, d in rows
            if moves
            and d is not None
            and (d.state == "pending" or (mark_read and d.state != "read"))
        ]
        if changes:
            await self.store.advance(changes)
            if mark_read:
                await self._read(name, [change.msg_id for change in changes])
        items = [
            _item(m, None if d is None or not moves else _moved(d, state, moment)) for m, d in rows
        ]
        unread = sum((await self.store.unread_counts(name)).values())
        return Page(items, rows[-1][0].msg_id if more and rows else None, unread)

    async def sent(self, reader: str, *, limit: int, cursor: str | None) -> Page:
        name = self._reader(reader)
        limit = _limit(limit)
        messages = await self.store.sent(name, limit=limit + 1, before=_cursor(cursor))
        more = len(messages) > limit
        messages = messages[:limit]
        deliveries = await self.store.deliveries([m.msg_id for m in messages])
        items = [MailItem(message=m, deliveries=deliveries.get(m.msg_id, [])) for m in messages]
        return Page(items, messages[-1].msg_id if more and messages else None, 0)

    async def thread(self, reader: str, thread_id: str) -> Page:
        name = self._reader(reader)
        messages = [m for m in await self.store.thread(thread_id) if self._may_read(m, name)]
        if not messages:
            raise RequestError(404, f"No thread {thread_id} holds mail of yours.")
        return await self._page(name, messages)

    async def search(self, reader: str, query: str, *, limit: int, project: str | None) -> Page:
        """Mail ``reader`` may read whose text matches ``query``, best first."""
        name = self._reader(reader)
        limit = _limit(limit)
        words = search_words(query)
        if not words:
            raise RequestError(400, "A search needs at least one word.")
        messages = await self.store.search(
            name,
            words,
            readable_spaces=self.spaces.readable(name),
            only_spaces=self.spaces.of_project(project or self.focus_of(name)),
            limit=limit,
        )
        return await self._page(name, messages)

    async def _page(self, name: str, messages: Sequence[MailMessage]) -> Page:
        """``messages`` as a page for ``name``: each with its delivery, when it has one."""
        deliveries = await self.store.deliveries([m.msg_id for m in messages])
        items = []
        for message in messages:
            mine = next((d for d in deliveries.get(message.msg_id, []) if d.name == name), None)
            items.append(_item(message, mine))
        unread = sum((await self.store.unread_counts(name)).values())
        return Page(items, None, unread)

    async def mark_read(
        self,
        reader: str,
        *,
        msg_ids: Sequence[str] | None,
        thread_id: str | None,
        everything: bool,
        space: str | None = None,
    ) -> int:
        name = self._reader(reader)
        chosen = sum(x is not None for x in (msg_ids, thread_id, space)) + everything
        if chosen != 1:
            raise RequestError(
                400, "mark_read takes exactly one of msg_ids, thread_id, space or all."
            )
        if space is not None:
            found = self.spaces.get(space, name).name
            rows = await self.store.space_mail(
                found, name, InboxQuery(unread_only=True), limit=MARK_SPACE_LIMIT
            )
            msg_ids = [m.msg_id for m, _ in rows]
            if not msg_ids:
                return 0
        moved = await self.store.mark_read(name, now(), msg_ids=msg_ids, thread_id=thread_id)
        await self._read(name, moved)
        return len(moved)

    async def get_message(
        self, reader: str, msg_id: str, *, history: bool = False
    ) -> tuple[MailMessage, Delivery | None, list[MessageVersion] | None]:
        name = self._reader(reader)
        message = await self._readable(name, msg_id)
        mine = None
        if name in message.recipients:
            if await self.store.advance([StateChange(msg_id, name, "read", now())]):
                await self._read(name, [msg_id])
            every = (await self.store.deliveries([msg_id]))[msg_id]
            mine = next((d for d in every if d.name == name), None)
        versions = await self.store.versions(msg_id) if history else None
        return message, mine, versions

    async def _readable(self, name: str, msg_id: str) -> MailMessage:
        message = await self.store.get_message(msg_id)
        if message is None or not self._may_read(message, name):
            raise RequestError(404, f"No message {msg_id} is yours to read.")
        return message

    def _may_read(self, message: MailMessage, name: str) -> bool:
        """Its author, its recipients, and whoever may read its space."""
        if message.sender == name or name in message.recipients:
            return True
        space = self.spaces.by_name.get(message.space) if message.space is not None else None
        return space is not None and self.spaces.visible(space, name)

    def focus_of(self, name: str) -> str | None:
        participant = self.known.get(name)
        return participant.focus if participant is not None else None

    async def context(self, reader: str) -> MailContextView:
        name = self._reader(reader)
        unread = await self.store.unread_counts(name)
        rows = await self.store.inbox(
            name, InboxQuery(unread_only=True), limit=MAX_PAGE, before=None
        )
        threads: dict[str, ThreadSummary] = {}
        for message, _ in rows:
            key = message.thread_id or message.msg_id
            summary = threads.get(key)
            if summary is None:
                threads[key] = ThreadSummary(
                    thread_id=key, last_msg_id=message.msg_id, last_from=message.sender, unread=1
                )
            else:
                summary.unread += 1
        participant = self.known.get(name)
        view = await self._view(participant) if participant is not None else None
        held = await self.locks.listed(None, name)
        return MailContextView(
            name, unread, list(threads.values()), view, self.spaces.joined(name), held
        )

    # --- changes to messages -----------------------------------------------------------------

    async def edit(self, sender: str, msg_id: str, content: str, structured: Any) -> MailMessage:
        name = participant_name(sender, "`from`")
        message = await self._readable(name, msg_id)
        if message.sender != name:
            raise RequestError(403, f"Only {message.sender}, its author, edits {msg_id}.")
        if message.deleted:
            raise RequestError(409, f"{msg_id} is deleted; a deleted message is not edited.")
        if not content.strip() and structured is None:
            raise RequestError(400, "A message needs content.")
        if message.format == "json":
            _check_json(content)
        return await self._change(
            message, EditChange(content=content, structured=structured, at=now())
        )

    async def delete(self, sender: str, msg_id: str, reason: str | None) -> MailMessage:
        name = participant_name(sender, "`from`")
        message = await self._readable(name, msg_id)
        if message.sender != name:
            raise RequestError(403, f"Only {message.sender}, its author, deletes {msg_id}.")
        if reason is not None and len(reason) > 500:
            raise RequestError(400, "A reason is at most 500 characters.")
        if message.deleted:
            return message
        return await self._change(message, DeleteChange(reason=reason, at=now()))

    async def react(self, sender: str, msg_id: str, emoji: str, *, remove: bool) -> MailMessage:
        name = participant_name(sender, "`from`")
        message = await self._readable(name, msg_id)
        if not emoji.strip() or len(emoji) > 32 or any(ch.isspace() for ch in emoji):
            raise RequestError(400, "A reaction is 1 to 32 characters without spaces, such as 👍.")
        if message.deleted:
            raise RequestError(409, f"{msg_id} is deleted; nobody reacts to it.")
        return await self._change(message, ReactChange(emoji=emoji, by=name, remove=remove))

    async def pin(self, sender: str, msg_id: str, *, unpin: bool) -> MailMessage:
        name = participant_name(sender, "`from`")
        message = await self._readable(name, msg_id)
        if name != message.sender and name not in message.recipients:
            raise RequestError(403, f"Only {msg_id}'s author and recipients pin it.")
        if message.pinned != unpin:  # already as asked
            return message
        return await self._change(message, PinChange(by=name, at=now(), unpin=unpin))

    async def _change(self, message: MailMessage, change: MessageChange) -> MailMessage:
        # Under the posting lock, so watchers get changes in the order they were stored.
        async with self._posting:
            changed = await self.store.change_message(message.msg_id, change)
            if changed is None:  # pragma: no cover - messages are never removed
                raise RequestError(404, f"No message {message.msg_id} is stored.")
            kind: ChangeKind = change.__struct_config__.tag  # type: ignore[assignment]
            if self._pushed_here(changed.msg_id):  # else it is pushed as it is now, later
                self._push_change(kind, changed)
        self._tell(Changed(changed.msg_id, kind))
        return changed

    def _push_change(self, kind: ChangeKind, changed: MailMessage) -> None:
        for name in dict.fromkeys([changed.sender, *changed.recipients]):
            watchers = self.watchers.get(name, [])
            gone = [w for w in watchers if w.update is not None and not w.update(kind, changed)]
            for watcher in gone:
                watchers.remove(watcher)

    # --- read state ------------------------------------------------------------------------

    async def _read(self, name: str, msg_ids: Sequence[str]) -> None:
        """``name``'s copies of ``msg_ids`` became `read`: the watches of ``name`` that
        asked are told, on this daemon and (its news) on the others."""
        if not msg_ids:
            return
        ordered = sorted(set(msg_ids))
        await self._push_read(name, ordered)
        self._tell(Read(name, ordered))

    async def _push_read(self, name: str, msg_ids: list[str]) -> None:
        if not any(w.read is not None for w in self.watchers.get(name, ())):
            return
        # Under the posting lock: a message read as soon as it was stored is pushed first.
        async with self._posting:
            watchers = self.watchers.get(name, [])
            gone = [w for w in watchers if w.read is not None and not w.read(msg_ids)]
            for watcher in gone:
                watchers.remove(watcher)

    # --- other daemons' mail ---------------------------------------------------------------

    def _tell(self, news: News, to: str | None = None) -> None:
        """On a store daemons share: tell the others (or the daemon ``to``) what changed."""
        cluster = self.runtime.cluster
        if cluster is not None:
            cluster.mail_news(encode_news(news), to)

    def heard(self, peer: str, news: bytes) -> None:
        """The daemon ``peer`` told news (``_tell``): taken in the order told."""
        self._news.send_nowait((peer, news))

    def peers_changed(self, gone: frozenset[str], joined: frozenset[str]) -> None:
        """Daemons died (or this one lost them): nobody is registered there any more.
        Daemons joined (or came back): ask who is registered there."""
        self.elsewhere.gone(gone)
        for peer in joined:
            self._tell(RollCall(), peer)

    async def _hear_news(self) -> None:
        async for peer, text in self._news_queue:
            try:
                news = decode_news(text)
            except msgspec.ValidationError as exc:  # a daemon of another version
                log.warning("mail_news_refused", peer=peer, error=str(exc))
                continue
            try:
                await self._heard(peer, news)
            except StorageError as exc:  # the store failed: that news is lost, not the rest
                log.warning("mail_news_lost", news=type(news).__name__, error=str(exc))

    async def _heard(self, peer: str, news: News) -> None:
        match news:
            case Posted(msg_id):
                await self._heard_posted(msg_id)
                self.webhooks.wake()
            case Changed(msg_id, change):
                async with self._posting:  # in line with this daemon's own pushes
                    if not self._pushed_here(msg_id):
                        return  # it is pushed as it is now, once its turn comes
                    message = await self.store.get_message(msg_id)
                    if message is not None:
                        self._push_change(change, message)
            case Read(name, msg_ids):
                await self._push_read(name, msg_ids)
            case Known(participants):
                self._learn(participants)
            case Online(participants, registered, every):
                self._learn(participants)
                self.elsewhere.online(peer, participants, trio.current_time(), every=every)
                if registered:  # the newer registration of a name holds it, as on one daemon
                    self._replaced(peer, participants)
            case Offline(names):
                self.elsewhere.offline(peer, names)
            case SpacesChanged():
                await self.spaces.load()
            case RollCall():
                here = [r.participant for r in self.registrations.values()]
                self._tell(Online(here, every=True), peer)

    async def _heard_posted(self, msg_id: str) -> None:
        """Another daemon stored ``msg_id``: push it here as this daemon pushes its own,
        read back from the store; who it was pushed to is `delivered`."""
        async with self._posting:
            message = await self.store.get_message(msg_id)
            if message is None:
                return
            for name in (message.sender, *message.recipients):
                if name not in self.known:  # first seen on the other daemon
                    self.known[name] = Participant(name=name, kind="session", last_seen=now())
            if message.space is not None:
                if message.space not in self.spaces.by_name:  # its news has yet to come
                    await self.spaces.load()
                self.spaces.posted(message.space)
            taken = self._in_order(message)
        await self._delivered(message.msg_id, taken)
        await self._answer_taken(message)

    async def _delivered(self, msg_id: str, names: Sequence[str]) -> None:
        if names:
            moment = now()
            await self.store.advance(
                [StateChange(msg_id, name, "delivered", moment) for name in names]
            )

    def _learn(self, participants: Sequence[Participant]) -> None:
        """Participants as another daemon stored them."""
        for participant in participants:
            self.known[participant.name] = participant
            if (registration := self.registrations.get(participant.name)) is not None:
                registration.participant = participant

    def _replaced(self, peer: str, participants: Sequence[Participant]) -> None:
        """``peer`` registered these names: an older registration of one here ends."""
        ended = []
        for participant in participants:
            mine = self.registrations.get(participant.name)
            if mine is None:
                continue
            theirs = (participant.last_seen or datetime.min.replace(tzinfo=UTC), peer)
            ours = (mine.participant.last_seen or datetime.min.replace(tzinfo=UTC), self._me())
            if theirs > ours:
                del self.registrations[participant.name]
                ended.append(participant.name)
        if ended:
            self._tell(Offline(ended))

    def _me(self) -> str:
        cluster = self.runtime.cluster
        return cluster.me if cluster is not None else ""

    async def _follow(self) -> None:
        """On a shared store: push what waits above a gap, read from the store in msg_id
        order, once the gap is filled or ``PUSH_GAP_WAIT_S`` passed (``passable``)."""
        gap: tuple[int, float] | None = None
        while True:
            with trio.move_on_at(math.inf if gap is None else gap[1] + PUSH_GAP_WAIT_S):
                await self._behind.wait()
            self._behind = trio.Event()
            try:
                gap = await self._catch_up(gap)
            except StorageError as exc:  # tried again after a while, or at the next news
                log.warning("mail_push_behind", error=str(exc))
                gap = (self._through or 0) + 1, trio.current_time()

    async def _catch_up(self, gap: tuple[int, float] | None) -> tuple[int, float] | None:
        async with self._posting:
            assert self._through is not None
            cursor = msg_id_of(self._through)
            messages = await self.store.messages_after(cursor, limit=REPLAY_PAGE)
            passed, gap = passable(cursor, messages, gap, trio.current_time(), PUSH_GAP_WAIT_S)
            taken = []
            for message in messages[:passed]:
                self._passed_to(number_of(message.msg_id) or 0)
                taken.append((message, self._push(message)))
            more = passed == len(messages) == REPLAY_PAGE
            self._ahead = gap is not None or more
        if more:
            self._behind.set()
        for message, names in taken:
            await self._delivered(message.msg_id, names)
            await self._answer_taken(message)  # its news may have been lost
        return gap

    # --- focus, spaces, locks -----------------------------------------------------------

    async def focus(self, reader: str, project: str | None) -> None:
        name = self._reader(reader)
        focus = self.spaces.project(project).name if project is not None else None
        participant = self.known.get(name) or Participant(name=name, kind="session")
        participant = msgspec.structs.replace(participant, focus=focus)
        await self.store.put_participant(participant)
        self.known[name] = participant
        self._tell(Known([participant]))
        if (registration := self.registrations.get(name)) is not None:
            registration.participant = msgspec.structs.replace(
                registration.participant, focus=focus
            )

    async def delete_project(self, project: str) -> None:
        """Forget ``project`` (409 while a space refers to it); whoever focused on it
        focuses on nothing."""
        name = self.spaces.project(project).name
        await self.spaces.delete_project(name)
        for participant in list(self.known.values()):
            if participant.focus == name:
                await self.focus(participant.name, None)

    async def member(self, name: str) -> str:
        """``name`` as a participant, made one (kind `session`) if it was never seen."""
        name = participant_name(name)
        if name not in self.known:
            participant = Participant(name=name, kind="session")
            await self.store.put_participant(participant)
            self.known[name] = participant
            self._tell(Known([participant]))
        return name

    # --- watching ----------------------------------------------------------------------------

    async def watch(
        self,
        reader: str,
        deliver: Callable[[MailMessage], bool],
        update: Callable[[ChangeKind, MailMessage], bool] | None,
        room: Callable[[], bool],
        read: Callable[[list[str]], bool] | None = None,
    ) -> tuple[Watcher, str | None]:
        """Start pushing ``reader``'s new mail to ``deliver``, changes to it to ``update``
        and the msg_ids of its copies read to ``read``; returns the watcher and the newest
        msg_id the reader had received before it (what a replay runs up to)."""
        name = self._reader(reader)
        watcher = Watcher(name, deliver, update, room, read)
        async with self._posting:  # no post is between its write and its push
            cursor = await self.store.newest_received(name)
            if (
                self._through is not None
                and cursor is not None
                and cursor > msg_id_of(self._through)
            ):  # stored, its turn to be pushed not come: pushed, not replayed
                cursor = msg_id_of(self._through)
            watcher.cursor = cursor
            self.watchers.setdefault(name, []).append(watcher)
        return watcher, cursor

    def check_cursor(self, cursor: str) -> None:
        """400 unless ``cursor`` is a msg_id (a watch's ``after``)."""
        _cursor(cursor)

    def unwatch(self, watcher: Watcher) -> None:
        watchers = self.watchers.get(watcher.name)
        if watchers is not None and watcher in watchers:
            watchers.remove(watcher)
            if not watchers:
                del self.watchers[watcher.name]

    async def replay(
        self, name: str, after: str, until: str | None
    ) -> list[tuple[MailMessage, Delivery]]:
        """One page of what ``name`` received after ``after`` up to ``until``, oldest first
        (``replayed`` marks it delivered when it is sent)."""
        _cursor(after)
        if until is None or after >= until:
            return []
        rows = await self.store.received(name, after=after, limit=REPLAY_PAGE)
        return [(m, d) for m, d in rows if m.msg_id <= until]

    async def replayed(self, name: str, rows: Sequence[tuple[MailMessage, Delivery]]) -> None:
        """``name``'s copies of a replay's page are being pushed to its watch: delivered
        (an agent's are not: ``_moved_by_runs``)."""
        if self._moved_by_runs(name):
            return
        moment = now()
        pending = [
            StateChange(m.msg_id, name, "delivered", moment)
            for m, d in rows
            if d.state == "pending"
        ]
        if pending:
            await self.store.advance(pending)

    def mailbox(self, name: str) -> AgentMailbox | None:
        """The mail of the hosted agent ``name``, for its tools; None without an address."""
        folded = name.casefold()
        return AgentMailbox(self, folded) if folded in self.known else None

    def stats(self) -> tuple[int, int]:
        """(participants online, watchers)."""
        return len(self.registrations), sum(len(w) for w in self.watchers.values())


@dataclass
class AgentMailbox:
    """A hosted agent's mail, as its tools write and read it (``Mailbox`` of _tools)."""

    office: PostOffice
    name: str

    async def send(
        self, to: Sequence[str], content: str, *, priority: int, reply_to: str | None
    ) -> tuple[MailMessage, list[str]]:
        result = await self.office.post(
            sender=self.name,
            to=to,
            content=content,
            format="markdown",
            structured=None,
            priority=priority,
            channel=None,
            reply_to=reply_to,
            scopes=(),
            refs=(),
            metadata={},
            mentions=(),
            idempotency_key=None,
        )
        return result.message, result.warnings

    async def check(self, *, unread_only: bool, limit: int) -> list[MailItem]:
        page = await self.office.inbox(
            self.name,
            InboxQuery(unread_only=unread_only),
            limit=limit,
            cursor=None,
            mark_read=True,
        )
        return page.items


class MailAnswer(DelegateAnswer):
    """The sink of a run that answers mail: marks it read at `start`, posts the answer at `end`."""

    def __init__(self, office: PostOffice, agent: str, message: MailMessage) -> None:
        super().__init__()
        self.office = office
        self.agent = agent
        self.message = message
        self.run: Any = None

    def __call__(self, event: StreamEventMsg) -> bool:
        if type(event) is Start:
            change = StateChange(self.message.msg_id, self.agent.casefold(), "read", now())
            self.office._later(self.office._read_by_run, change)
        elif type(event) is End:
            self.office._later(self.office._reply_for, self, event)
            return False
        return super().__call__(event)


def _framing(agent: str, message: MailMessage) -> str:
    about = [f"from {message.sender}", f"priority {message.priority}", f"msg_id {message.msg_id}"]
    if message.channel:
        about.append(f"channel {message.channel}")
    if message.reply_to:
        about.append(f"in reply to {message.reply_to}")
    if message.scopes:
        about.append("about " + ", ".join(f"{s.type}:{s.value}" for s in message.scopes))
    return (
        f"You are {agent}. The user's latest message is mail ({'; '.join(about)}). "
        "Your final answer is sent back to its author as a reply."
    )


def _conversation(agent: str, message: MailMessage) -> tuple[str, str]:
    """The conversation of ``agent`` that answers ``message``."""
    return agent, message.sender if message.space is None else f"#{message.space}"


def _check_json(content: str) -> None:
    try:
        json.loads(content)
    except ValueError as exc:
        raise RequestError(400, f"format is json but content is not JSON: {exc}.") from None


def _limit(limit: int) -> int:
    if not 1 <= limit <= MAX_PAGE:
        raise RequestError(400, f"limit must be between 1 and {MAX_PAGE}.")
    return limit


def _cursor(cursor: str | None) -> str | None:
    if cursor is not None and number_of(cursor) is None:
        raise RequestError(400, "The cursor is not one this daemon issued; start again without it.")
    return cursor


def _moved(delivery: Delivery, state: DeliveryState, moment: datetime) -> Delivery:
    if delivery.state == "pending" or (state == "read" and delivery.state != "read"):
        return msgspec.structs.replace(
            delivery,
            state=state,
            delivered_at=delivery.delivered_at or moment,
            read_at=moment if state == "read" else delivery.read_at,
        )
    return delivery


def _item(message: MailMessage, delivery: Delivery | None) -> MailItem:
    if delivery is None:
        return MailItem(message=message)
    return MailItem(
        message=message,
        state=delivery.state,
        delivered_at=delivery.delivered_at,
        read_at=delivery.read_at,
    )
