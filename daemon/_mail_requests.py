"""Mail's requests, answered: each one's fields handed to the post office, its result framed.

The server routes every mail request but `post` and `watch` (which need the
connection's ordering and its buffers) here; ``answer`` returns the one frame
that ends it, or raises ``RequestError``.
"""

from __future__ import annotations

from typing import assert_never

from chinwag.protocol import (
    Delete,
    Edit,
    Focus,
    GetContext,
    GetMessage,
    GetThread,
    Heartbeat,
    Inbox,
    ListLocks,
    ListParticipants,
    ListProjects,
    ListSpaces,
    Lock,
    LockResult,
    Locks,
    MailContext,
    MarkRead,
    Members,
    MessageReply,
    Messages,
    Ok,
    Participants,
    Pin,
    Post,
    Posted,
    Project,
    ProjectCreate,
    ProjectDelete,
    ProjectGet,
    ProjectReply,
    Projects,
    ProjectUpdate,
    React,
    Ref,
    Register,
    Registered,
    SearchMail,
    Sent,
    ServerMessage,
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
from chinwag.storage import InboxQuery

from ._addresses import participant_name
from ._errors import RequestError
from ._post_office import Page, PostOffice, now, parse_since

MailRequest = (
    Register
    | Heartbeat
    | ListParticipants
    | Post
    | Inbox
    | Sent
    | GetThread
    | MarkRead
    | GetMessage
    | GetContext
    | Edit
    | Delete
    | React
    | Pin
    | SearchMail
    | SpaceCreate
    | SpaceJoin
    | SpaceLeave
    | SpaceInvite
    | SpaceArchive
    | SpaceMembers
    | ListSpaces
    | ProjectCreate
    | ProjectGet
    | ListProjects
    | ProjectUpdate
    | ProjectDelete
    | Focus
    | Lock
    | Unlock
    | ListLocks
)


async def answer(office: PostOffice, owner: object, msg: MailRequest) -> ServerMessage:
    """The frame that answers ``msg``, a mail request of the connection ``owner``."""
    rid = msg.id
    match msg:
        case Register():
            participant = await office.register(
                owner,
                msg.name,
                kind=msg.kind,
                roles=msg.roles,
                info=msg.info,
                takeover=msg.takeover,
            )
            return Registered(id=rid, participant=participant)
        case Heartbeat():
            await office.heartbeat(msg.name, msg.status)
            return Ok(id=rid)
        case ListParticipants():
            shown = await office.participants(online_only=msg.online_only, role=msg.role)
            return Participants(id=rid, items=shown)
        case Post():
            result = await office.post(
                sender=msg.sender,
                to=msg.to,
                content=msg.content,
                format=msg.format,
                structured=msg.structured,
                priority=msg.priority,
                channel=msg.channel,
                reply_to=msg.reply_to,
                scopes=msg.scopes,
                refs=msg.refs,
                metadata=msg.metadata,
                mentions=msg.mentions,
                idempotency_key=msg.idempotency_key,
            )
            stored = result.message
            return Posted(
                id=rid,
                msg_id=stored.msg_id,
                thread_id=stored.thread_id,
                recipients=stored.recipients,
                created_at=stored.created_at,
                warnings=result.warnings,
            )
        case Inbox():
            query = InboxQuery(
                unread_only=msg.unread_only,
                mentions_only=msg.mentions_only,
                thread_id=msg.thread_id,
                channel=msg.channel,
                scope=_scope(msg.scope),
                priority_min=msg.priority_min,
                since=None if msg.since is None else parse_since(msg.since, now()),
                pinned_only=msg.pinned_only,
                include_deleted=msg.include_deleted,
            )
            page = await office.inbox(
                msg.reader,
                query,
                limit=msg.limit,
                cursor=msg.cursor,
                mark_read=msg.mark_read,
                space=msg.space,
                project=msg.project,
            )
            return _messages(rid, page)
        case Sent():
            return _messages(rid, await office.sent(msg.reader, limit=msg.limit, cursor=msg.cursor))
        case GetThread():
            return _messages(rid, await office.thread(msg.reader, msg.thread_id))
        case SearchMail():
            page = await office.search(msg.reader, msg.query, limit=msg.limit, project=msg.project)
            return _messages(rid, page)
        case MarkRead():
            await office.mark_read(
                msg.reader,
                msg_ids=msg.msg_ids,
                thread_id=msg.thread_id,
                everything=msg.all,
                space=msg.space,
            )
            return Ok(id=rid)
        case GetMessage():
            message, mine, versions = await office.get_message(
                msg.reader, msg.msg_id, history=msg.history
            )
            state = mine.state if mine is not None else None
            return MessageReply(id=rid, message=message, state=state, versions=versions)
        case GetContext():
            view = await office.context(msg.reader)
            return MailContext(
                id=rid,
                name=view.name,
                unread=sum(view.unread_by_priority.values()),
                unread_by_priority=view.unread_by_priority,
                threads=view.threads,
                participant=view.participant,
                spaces=view.spaces,
                locks=view.locks,
                focus=view.participant.focus if view.participant is not None else None,
            )
        case Edit():
            message = await office.edit(msg.sender, msg.msg_id, msg.content, msg.structured)
            return MessageReply(id=rid, message=message)
        case Delete():
            return MessageReply(
                id=rid, message=await office.delete(msg.sender, msg.msg_id, msg.reason)
            )
        case React():
            message = await office.react(msg.sender, msg.msg_id, msg.emoji, remove=msg.remove)
            return MessageReply(id=rid, message=message)
        case Pin():
            message = await office.pin(msg.sender, msg.msg_id, unpin=msg.unpin)
            return MessageReply(id=rid, message=message)
        case SpaceCreate():
            space = await office.spaces.create(
                await office.member(msg.sender),
                msg.name,
                description=msg.description,
                parent=msg.parent,
                project=msg.project,
                private=msg.private,
                at=now(),
            )
            return SpaceReply(id=rid, space=space)
        case SpaceJoin():
            await office.spaces.join(await office.member(msg.sender), msg.space, now())
            return Ok(id=rid)
        case SpaceLeave():
            await office.spaces.leave(participant_name(msg.sender), msg.space, now())
            return Ok(id=rid)
        case SpaceInvite():
            sender = participant_name(msg.sender)
            office.spaces.get(msg.space, sender)  # 404 before anyone is made a participant
            invited = await office.member(msg.name)
            await office.spaces.invite(sender, msg.space, invited, now())
            return Ok(id=rid)
        case SpaceArchive():
            await office.spaces.archive(participant_name(msg.sender), msg.space)
            return Ok(id=rid)
        case SpaceMembers():
            members = office.spaces.members_of(msg.space, _reader(msg.reader))
            for member in members:
                member.online = office.online(member.name)
            return Members(id=rid, items=members)
        case ListSpaces():
            reader = _reader(msg.reader)
            narrowed = msg.project or (office.focus_of(reader) if reader is not None else None)
            items = office.spaces.listed(
                reader,
                project=office.spaces.project(narrowed).name if narrowed is not None else None,
                parent=msg.parent,
                top_level=msg.top_level,
                include_archived=msg.include_archived,
            )
            return Spaces(id=rid, items=items)
        case ProjectCreate():
            moment = now()
            created = await office.spaces.create_project(
                Project(
                    name=msg.name,
                    description=msg.description,
                    path=msg.path,
                    repository=msg.repository,
                    tags=msg.tags,
                    status=msg.status,
                    settings=msg.settings,
                    metadata=msg.metadata,
                    created_by=await office.member(msg.sender),
                    created_at=moment,
                    updated_at=moment,
                )
            )
            return ProjectReply(id=rid, project=created)
        case ProjectGet():
            return ProjectReply(id=rid, project=office.spaces.project(msg.project))
        case ListProjects():
            return Projects(id=rid, items=office.spaces.listed_projects(msg.status, msg.tag))
        case ProjectUpdate():
            participant_name(msg.sender)
            fields = {
                "description": msg.description,
                "path": msg.path,
                "repository": msg.repository,
                "tags": msg.tags,
                "status": msg.status,
                "settings": msg.settings,
                "metadata": msg.metadata,
            }
            updated = await office.spaces.update_project(msg.project, fields, now())
            return ProjectReply(id=rid, project=updated)
        case ProjectDelete():
            participant_name(msg.sender)
            await office.delete_project(msg.project)
            return Ok(id=rid)
        case Focus():
            await office.focus(msg.reader, msg.project)
            return Ok(id=rid)
        case Lock():
            acquired, holders, expires_at = await office.locks.take(
                participant_name(msg.sender), msg.resource, msg.mode, msg.ttl_s
            )
            return LockResult(id=rid, acquired=acquired, holders=holders, expires_at=expires_at)
        case Unlock():
            await office.locks.release(participant_name(msg.sender), msg.resource)
            return Ok(id=rid)
        case ListLocks():
            holder = participant_name(msg.holder) if msg.holder is not None else None
            return Locks(id=rid, items=await office.locks.listed(msg.resource, holder))
    assert_never(msg)


def _reader(name: str | None) -> str | None:
    return participant_name(name, "`as`") if name is not None else None


def _messages(rid: int, page: Page) -> Messages:
    return Messages(id=rid, items=page.items, next_cursor=page.next_cursor, unread=page.unread)


def _scope(text: str | None) -> Ref | None:
    """An inbox's ``scope`` filter, written ``type:value``."""
    if text is None:
        return None
    kind, colon, value = text.partition(":")
    if not colon or not kind or not value:
        raise RequestError(400, f"scope is written type:value, such as module:auth; not {text!r}.")
    return Ref(type=kind, value=value)
