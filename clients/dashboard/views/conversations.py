"""Conversations: title, last activity and whether a run is in flight; filtered by agent,
searched by title or sender (the daemon's search: a page of matches, older ones a cursor
on, as the listing pages). Rows follow the runs live (the page's event stream); the
rows are read again when a conversation not among them runs, when a run ends (its row's
last activity, counts and place changed), and whenever the stream connects (what ended
or began before it did came on no stream)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .._view import View, daemon, live_page

#: Conversations on one page.
PAGE_SIZE = 50


async def conversations(request: Request) -> Response:
    client = daemon(request).client
    agent = request.query_params.get("agent") or None
    query = (request.query_params.get("q") or "").strip()
    cursor = request.query_params.get("cursor") or None
    listed = await client.list_conversations(
        agent, limit=PAGE_SIZE, cursor=cursor, query=query or None
    )
    agents = await client.list_agents()
    return live_page(
        request,
        "conversations.html",
        "conversations_rows.html",
        conversations=listed.items,
        agents=agents,
        agent=agent or "",
        query=query,
        cursor=cursor or "",
        next_cursor=listed.next_cursor,
    )


view = View(routes=[Route("/", conversations)], title="Conversations", path="/")
