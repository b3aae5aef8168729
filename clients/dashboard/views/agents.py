"""Agents: the daemon's agents, what each runs on and which tools it has."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .._view import View, daemon, page


async def agents(request: Request) -> Response:
    items = await daemon(request).client.list_agents()
    return page(request, "agents.html", agents=items)


view = View(routes=[Route("/agents", agents)], title="Agents", path="/agents")
