"""A participant's inbox, chosen explicitly (``as``): its mail newest first, each with
its read state, live through the link's watch of that participant; one message opened
(``get_message``), which marks it read for that participant.

The dashboard reads as the participant chosen, never registers as it: the inbox and the
watch mark what they show ``delivered``, opening a message marks it ``read``, as that
participant's own client would.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .._view import View, daemon, live_page, page, required

#: Messages on one page of the inbox.
PAGE_SIZE = 50


async def inbox(request: Request) -> Response:
    client = daemon(request).client
    reader = (request.query_params.get("as") or "").strip().casefold()
    participants = await client.participants()
    if not reader:
        return page(request, "inbox.html", reader="", participants=participants)
    cursor = request.query_params.get("cursor") or None
    found = await client.inbox(reader, limit=PAGE_SIZE, cursor=cursor)
    return live_page(
        request,
        "inbox.html",
        "inbox_rows.html",
        reader=reader,
        participants=participants,
        items=found.items,
        unread=found.unread,
        cursor=cursor or "",
        next_cursor=found.next_cursor,
    )


async def message(request: Request) -> Response:
    reader = required(request, "as").casefold()
    msg_id = required(request, "msg")
    opened = await daemon(request).client.get_message(reader, msg_id, history=True)
    return live_page(
        request,
        "message.html",
        "message_body.html",
        reader=reader,
        message=opened.message,
        state=opened.state,
        versions=opened.versions or [],
    )


view = View(
    routes=[Route("/mail/inbox", inbox), Route("/mail/message", message)],
    title="Inbox",
    path="/mail/inbox",
)
