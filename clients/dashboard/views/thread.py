"""A thread, as a chosen participant (``as``) may read it: its messages oldest first,
with that participant's state of each; live through the link's watch of it."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .._view import View, daemon, live_page, required


async def thread(request: Request) -> Response:
    reader = required(request, "as").casefold()
    thread_id = required(request, "thread")
    found = await daemon(request).client.thread(reader, thread_id)
    return live_page(
        request,
        "thread.html",
        "thread_rows.html",
        reader=reader,
        thread_id=thread_id,
        items=found.items,
    )


view = View(routes=[Route("/mail/thread", thread)])
