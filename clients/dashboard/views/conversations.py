"""Conversations: title, last activity and whether a run is in flight; filtered by agent,
searched by title or sender. Rows follow the runs live (the page's event stream); the
rows are read again when a conversation not among them runs, when a run ends (its row's
last activity, counts and place changed), and whenever the stream connects (what ended
or began before it did came on no stream)."""

from __future__ import annotations

from chinwag.protocol import ConversationItem
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .._view import View, daemon, live_page

#: Conversations on one page.
PAGE_SIZE = 50
#: A search reads at most this many conversations, newest first, for its matches.
SEARCH_LIMIT = 2_000


async def conversations(request: Request) -> Response:
    client = daemon(request).client
    agent = request.query_params.get("agent") or None
    query = (request.query_params.get("q") or "").strip()
    cursor = request.query_params.get("cursor") or None
    items: list[ConversationItem] = []
    next_cursor: str | None = None
    read_from = cursor
    if query:
        # The daemon lists, it does not search: read the newest pages and keep the matches.
        words = query.casefold()
        read = 0
        while len(items) < PAGE_SIZE and read < SEARCH_LIMIT:
            listed = await client.list_conversations(agent, limit=PAGE_SIZE, cursor=read_from)
            read += len(listed.items)
            items += [
                item
                for item in listed.items
                if words in item.title.casefold() or words in item.sender.casefold()
            ]
            read_from = listed.next_cursor
            if read_from is None:
                break
        items = items[:PAGE_SIZE]
    else:
        listed = await client.list_conversations(agent, limit=PAGE_SIZE, cursor=cursor)
        items, next_cursor = listed.items, listed.next_cursor
    agents = await client.list_agents()
    return live_page(
        request,
        "conversations.html",
        "conversations_rows.html",
        conversations=items,
        agents=agents,
        agent=agent or "",
        query=query,
        cursor=cursor or "",
        next_cursor=next_cursor,
    )


view = View(routes=[Route("/", conversations)], title="Conversations", path="/")
