"""What a view is, and what every view's handlers share: the daemon, and rendering a page.

A view is one module of ``views/`` holding a ``view = View(...)``: its routes and, when
it belongs in the navigation bar, its title and address. Its pages are templates
extending ``base.html``, which carries the banner, the navigation and the script.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import BaseRoute
from starlette.templating import Jinja2Templates

from .._client import ChinwagError
from ._link import DaemonAway, DaemonLink


@dataclass(frozen=True)
class View:
    """One view of the dashboard: its routes, and its entry in the navigation bar
    (``title`` None: reached only by links, such as one conversation)."""

    routes: Sequence[BaseRoute]
    title: str | None = None
    path: str = "/"


def daemon(request: Request) -> DaemonLink:
    link: DaemonLink = request.app.state.link
    return link


def href(request: Request, path: str, query: Mapping[str, Any] | None = None) -> str:
    """``path`` (from the dashboard's root) as a link, under the proxy's prefix if any."""
    given = {key: value for key, value in (query or {}).items() if value not in (None, "")}
    root = str(request.scope.get("root_path", ""))
    return root + path + (f"?{urlencode(given)}" if given else "")


def page(request: Request, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    """``template`` rendered with ``context`` and what every page needs."""
    templates: Jinja2Templates = request.app.state.templates
    link = daemon(request)
    return templates.TemplateResponse(
        request,
        template,
        {
            "views": request.app.state.views,
            "daemon_state": link.state,
            "csrf_token": request.state.csrf_token,
            "root": request.scope.get("root_path", ""),
            "href": lambda path, **query: href(request, path, query),
            **context,
        },
        status_code=status_code,
    )


def live_page(request: Request, template: str, part: str, **context: Any) -> HTMLResponse:
    """``template``, or with ``fragment`` in the address only ``part``: the page's live
    part (``data-fragment``), which its script fetches again when what it shows changes."""
    return page(request, part if "fragment" in request.query_params else template, **context)


def refusal(exc: ChinwagError | DaemonAway) -> JSONResponse:
    """An action's failure as its JSON answer: the daemon's code, or 503 while it is away."""
    if isinstance(exc, DaemonAway):
        return JSONResponse({"error": exc.reason}, status_code=503)
    code = exc.code if 400 <= exc.code < 600 else 502
    return JSONResponse({"error": exc.message, "code": exc.code}, status_code=code)


def required(request: Request, name: str) -> str:
    """A query parameter a page cannot do without; ``ChinwagError`` 400 when missing."""
    value = request.query_params.get(name)
    if not value:
        raise ChinwagError(400, f"This page needs `{name}` in its address.")
    return value


#: How an address says yes or no (a checkbox's ``on`` among them); absent is no.
FLAG_VALUES = {"1": True, "true": True, "on": True, "0": False, "false": False, "off": False}


def flag(request: Request, name: str) -> bool:
    """A yes-or-no query parameter, false when absent or empty; ``ChinwagError`` 400 for
    any other word than 1, true, on, 0, false or off."""
    value = (request.query_params.get(name) or "0").strip().casefold() or "0"
    if value not in FLAG_VALUES:
        raise ChinwagError(400, f"`{name}` in the address is 1 or 0 (true or false, on or off).")
    return FLAG_VALUES[value]
