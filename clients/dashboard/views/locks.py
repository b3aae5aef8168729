"""Locks: every live lock, by resource then holder; live through the link's roster poll
(taken, released and expired locks alike)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .._view import View, daemon, live_page


async def locks(request: Request) -> Response:
    items = await daemon(request).client.locks()
    return live_page(request, "locks.html", "locks_rows.html", locks=items)


view = View(routes=[Route("/mail/locks", locks)], title="Locks", path="/mail/locks")
