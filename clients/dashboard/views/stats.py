"""Daemon stats: its counters, live (the page's event stream asks for them)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .._view import View, daemon, page


async def stats(request: Request) -> Response:
    counters = await daemon(request).client.stats()
    return page(request, "stats.html", stats=counters)


view = View(routes=[Route("/stats", stats)], title="Stats", path="/stats")
