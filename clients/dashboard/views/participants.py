"""Participants: everyone with a mail address (agents, sessions, people), with presence
(online, last seen, status line), roles and unread mail; live through the link's roster
poll, since the protocol pushes no presence. Each links to its inbox."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .._view import View, daemon, live_page


async def participants(request: Request) -> Response:
    items = await daemon(request).client.participants()
    return live_page(request, "participants.html", "participants_rows.html", participants=items)


view = View(routes=[Route("/mail", participants)], title="Participants", path="/mail")
