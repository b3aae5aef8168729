"""The live feed: every run the daemon starts, as it goes (its `subscribe` stream)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .._view import View, page


async def feed(request: Request) -> Response:
    return page(request, "feed.html")


view = View(routes=[Route("/feed", feed)], title="Live feed", path="/feed")
