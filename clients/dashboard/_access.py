"""Who may use the dashboard: the holder of its access token, and only from its own pages.

The token comes once, in the address `chinwag dashboard` prints; the first request
carrying it gets a session cookie (HttpOnly, SameSite=Strict) and is sent on to the
same address without it, so that the token leaves the address bar and the history.
Every other request needs the cookie; each is answered 401 without it.

A session is a random nonce signed with the token (HMAC), so nothing is kept on
the server; its CSRF token is the nonce signed for another purpose. Every request
that changes something (any method but GET and HEAD) must carry that CSRF token
in the ``X-CSRF-Token`` header, which only the dashboard's own pages can read, and
come from this same origin: as the browser's ``Sec-Fetch-Site`` says, or, from a browser
that sends none, as its ``Origin`` (when it sends one) names this same host.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from urllib.parse import urlencode, urlsplit

from starlette._utils import get_route_path
from starlette.datastructures import Headers, QueryParams
from starlette.requests import HTTPConnection
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

COOKIE = "chinwag_dashboard"
CSRF_HEADER = "x-csrf-token"
_SAFE_METHODS = frozenset({"GET", "HEAD"})

UNAUTHORIZED = (
    "This dashboard needs its access token: open the address that `chinwag dashboard` printed."
)
FORBIDDEN = (
    "This request did not come from one of the dashboard's own pages"
    " (its CSRF token or origin is missing or wrong); reload the page and try again."
)


class Access:
    """Checks tokens and signs sessions with one access token."""

    def __init__(self, token: str) -> None:
        self._token = token
        self._key = token.encode()

    def token_matches(self, given: str) -> bool:
        return _same_text(given, self._token)

    def new_session(self) -> str:
        nonce = secrets.token_urlsafe(16)
        return f"{nonce}.{self._sign('session', nonce)}"

    def session_nonce(self, cookie: str | None) -> str | None:
        """The session's nonce when ``cookie`` is one this token signed, else None."""
        if not cookie:
            return None
        nonce, _, signature = cookie.partition(".")
        if not _same_text(signature, self._sign("session", nonce)):
            return None
        return nonce

    def csrf_token(self, nonce: str) -> str:
        return self._sign("csrf", nonce)

    def _sign(self, purpose: str, nonce: str) -> str:
        return hmac.new(self._key, f"{purpose}:{nonce}".encode(), hashlib.sha256).hexdigest()


class AccessMiddleware:
    """Lets through only requests with the session cookie (or the token, once), and
    changes only with the session's CSRF token; puts ``csrf_token`` in the request's state."""

    def __init__(self, app: ASGIApp, access: Access) -> None:
        self.app = app
        self.access = access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        response = self._refusal(scope)
        if response is not None:
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _refusal(self, scope: Scope) -> Response | None:
        connection = HTTPConnection(scope)
        query = connection.query_params
        given = query.get("token")
        if given is not None:
            if not self.access.token_matches(given):
                return _unauthorized()
            return self._welcome(scope, query)
        nonce = self.access.session_nonce(connection.cookies.get(COOKIE))
        if nonce is None:
            return _unauthorized()
        csrf = self.access.csrf_token(nonce)
        scope.setdefault("state", {})["csrf_token"] = csrf
        if scope["method"] in _SAFE_METHODS:
            return None
        headers = connection.headers
        if not _same_text(headers.get(CSRF_HEADER, ""), csrf) or not _same_origin(headers):
            return PlainTextResponse(FORBIDDEN, status_code=403)
        return None

    def _welcome(self, scope: Scope, query: QueryParams) -> Response:
        """The token was right: a session cookie, and the same address without the token."""
        root = scope.get("root_path", "")
        rest = urlencode([(key, value) for key, value in query.multi_items() if key != "token"])
        location = root + (get_route_path(scope) or "/") + (f"?{rest}" if rest else "")
        response = RedirectResponse(location, status_code=303)
        response.set_cookie(
            COOKIE,
            self.access.new_session(),
            path=root or "/",
            httponly=True,
            samesite="strict",
            secure=scope.get("scheme") == "https",
        )
        return response


def _same_text(given: str, expected: str) -> bool:
    """Compared in constant time, as bytes: ``hmac.compare_digest`` refuses text beyond
    ASCII with ``TypeError``, and what a request carries may be any Latin-1."""
    return hmac.compare_digest(given.encode(), expected.encode())


def _unauthorized() -> Response:
    return PlainTextResponse(UNAUTHORIZED, status_code=401)


def _same_origin(headers: Headers) -> bool:
    """From a page of this same origin, as the browser says in ``Sec-Fetch-Site`` (which
    no page can set, and which holds behind a proxy that sends its own ``Host``, as
    nginx's proxy_pass does); without it, no ``Origin``, or one naming the host asked
    (directly or through a proxy that says it in ``X-Forwarded-Host``)."""
    site = headers.get("sec-fetch-site")
    if site is not None:
        return site == "same-origin"
    origin = headers.get("origin")
    if origin is None:
        return True
    hosts = {headers.get("host"), headers.get("x-forwarded-host")} - {None}
    return urlsplit(origin).netloc in hosts
