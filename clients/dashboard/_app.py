"""The dashboard's web application: the views, the access check, the event stream.

``create_app`` assembles a Starlette app from the views in ``views/``; its lifespan
keeps the connection to the daemon (``DaemonLink``). Every page opens one
server-sent event stream, ``/events``: the daemon's state (``daemon``: up or
away, for the banner), the run events it asks for (``run``; none with ``runs=0``;
with ``agent`` and ``sender``, on each connection to the daemon, which run of that
conversation is in flight, ``inflight``), with ``stats`` the daemon's counters every
few seconds (``stats``), with ``as=NAME`` that participant's mail (``watching`` once
its watch is on, then ``mail``: ``{change, message}``, ``change`` null for a new
message, and ``read``: ``{msg_ids}``, its mail read through any client), and with
``roster`` which of presence, spaces and locks changed (``roster``: ``{changed}``);
``resubscribed`` when the daemon dropped the link's subscription for falling behind and
it has subscribed again, then ``missed`` (``{agent, sender, run_id}``) for each run in
flight then that has ended since, its end unseen. The link encodes each once for every
page; a page sent several at a time gets them in one write.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path

import anyio
import jinja2
import msgspec
from anyio.streams.memory import MemoryObjectReceiveStream
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from .._client import ChinwagError
from .._render import _duration
from ._access import Access, AccessMiddleware
from ._link import DaemonAway, DaemonLink, Shown
from ._markdown import markdown
from ._view import daemon, page
from .views import VIEWS

_HERE = Path(__file__).parent
#: How often a page that asks for them gets the daemon's counters.
STATS_EVERY_S = 2.0
#: How often an idle event stream sends a comment, so that proxies keep it open.
PING_S = 15.0


def create_app(
    socket_path: Path | str, *, token: str, retry_s: float = 1.0, poll_s: float = 1.0
) -> Starlette:
    """The dashboard for the daemon at ``socket_path``, for the holder of ``token``;
    presence, spaces and locks read every ``poll_s`` seconds while a page shows them."""
    link = DaemonLink(socket_path, retry_s=retry_s, poll_s=poll_s)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with anyio.create_task_group() as task_group:
            await task_group.start(link.run)
            yield
            task_group.cancel_scope.cancel()

    routes = [route for view in VIEWS for route in view.routes]
    app = Starlette(
        routes=[
            *routes,
            Route("/events", events, name="events"),
            Mount("/static", StaticFiles(directory=_HERE / "static"), name="static"),
        ],
        middleware=[Middleware(AccessMiddleware, access=Access(token))],
        exception_handlers={ChinwagError: _refused, DaemonAway: _away},
        lifespan=lifespan,
    )
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(_HERE / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    environment.filters["when"] = _when
    environment.filters["duration"] = _duration
    environment.filters["markdown"] = markdown
    app.state.templates = Jinja2Templates(env=environment)
    app.state.link = link
    app.state.views = [view for view in VIEWS if view.title is not None]
    return app


def _when(moment: datetime | None) -> str:
    return "" if moment is None else moment.strftime("%Y-%m-%d %H:%M:%S UTC")


async def events(request: Request) -> Response:
    """The page's event stream: ``agent``, ``sender`` narrow the runs (``runs=0``: none);
    ``stats`` adds counters, ``as`` a participant's mail, ``roster`` what changed of
    presence, spaces and locks."""
    link = daemon(request)
    query = request.query_params
    agent = query.get("agent") or None
    sender = query.get("sender") or None
    with_stats = "stats" in query
    runs = query.get("runs") != "0"
    reader = (query.get("as") or "").strip().casefold() or None
    roster = "roster" in query

    async def stream() -> AsyncIterator[bytes | ServerSentEvent]:
        with link.listen(agent, sender, runs=runs, reader=reader, roster=roster) as items:
            next_stats = anyio.current_time()
            while True:
                first: Shown | None = None
                wait = next_stats - anyio.current_time() if with_stats else None
                with anyio.move_on_after(wait):
                    try:
                        first = await items.receive()
                    except anyio.EndOfStream:
                        return  # fell behind: the browser connects again
                if first is None:
                    next_stats = anyio.current_time() + STATS_EVERY_S
                    counters = await _stats(link)
                    if counters is not None:
                        yield ServerSentEvent(counters, event="stats")
                    continue
                # What has come meanwhile goes in the same write.
                frames = [first.frame]
                ended = _take_waiting(items, frames)
                yield b"".join(frames)
                if ended:
                    return

    return EventSourceResponse(stream(), ping=PING_S)


def _take_waiting(items: MemoryObjectReceiveStream[Shown], frames: list[bytes]) -> bool:
    """Add the frames waiting in ``items`` to ``frames``; whether ``items`` has ended."""
    while True:
        try:
            frames.append(items.receive_nowait().frame)
        except anyio.WouldBlock:
            return False
        except anyio.EndOfStream:
            return True


async def _stats(link: DaemonLink) -> str | None:
    try:
        stats = await link.client.stats()
    except (ChinwagError, DaemonAway):
        return None
    return msgspec.json.encode(stats).decode()


async def _refused(request: Request, exc: Exception) -> HTMLResponse:
    assert isinstance(exc, ChinwagError)
    code = exc.code if 400 <= exc.code < 600 else 502
    return page(request, "refused.html", status_code=code, code=exc.code, message=exc.message)


async def _away(request: Request, exc: Exception) -> HTMLResponse:
    assert isinstance(exc, DaemonAway)
    return page(request, "away.html", status_code=503, reason=exc.reason)
