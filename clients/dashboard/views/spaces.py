"""Spaces: the list (with member and message counts), and one space's members and mail.

Live through the link's roster poll (a space's counts change as mail comes), and, with a
participant chosen (``as``), through its watch. Without one, the public spaces show, and
a public space's mail is read under the dashboard's own name, which is never registered
and holds no copy of any message, so reading changes nothing; a private space needs a
member chosen.
"""

from __future__ import annotations

from chinwag.protocol import Space
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..._client import ChinwagError, Client
from .._link import CLIENT_NAME
from .._view import View, daemon, live_page, required

#: Messages of a space shown, newest first.
PAGE_SIZE = 50


def _reader(request: Request) -> str | None:
    return (request.query_params.get("as") or "").strip().casefold() or None


async def spaces(request: Request) -> Response:
    client = daemon(request).client
    reader = _reader(request)
    found = await client.spaces(reader=reader, include_archived=True)
    return live_page(
        request,
        "spaces.html",
        "spaces_rows.html",
        reader=reader or "",
        spaces=found,
        participants=await client.participants(),
    )


async def _space(client: Client, name: str, reader: str | None) -> Space:
    name = name.removeprefix("#").casefold()
    for space in await client.spaces(reader=reader, include_archived=True):
        if space.name == name:
            return space
    raise ChinwagError(404, f"No space is named {name}, or it is private to its members.")


async def space(request: Request) -> Response:
    client = daemon(request).client
    reader = _reader(request)
    found = await _space(client, required(request, "name"), reader)
    members = await client.space_members(found.name, reader=reader)
    mail = await client.inbox(reader or CLIENT_NAME, space=found.name, limit=PAGE_SIZE)
    return live_page(
        request,
        "space.html",
        "space_body.html",
        reader=reader or "",
        space=found,
        members=members,
        items=mail.items,
        participants=await client.participants(),
    )


view = View(
    routes=[Route("/mail/spaces", spaces), Route("/mail/space", space)],
    title="Spaces",
    path="/mail/spaces",
)
