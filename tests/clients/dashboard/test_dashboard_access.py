"""Who gets in: the token once, then its cookie; changes only with the CSRF token and
from the dashboard's own origin; a non-loopback address only with a token set."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from chinwag.clients.cli import cli
from chinwag.clients.dashboard import create_app
from chinwag.clients.dashboard._access import COOKIE, FORBIDDEN, UNAUTHORIZED
from chinwag.protocol import is_loopback
from click.testing import CliRunner
from dashboard_harness import TOKEN, logged_in
from starlette.testclient import TestClient


@pytest.fixture
def client(short_tmp: Path) -> Iterator[TestClient]:
    """The dashboard with no daemon behind it: access is decided before any is asked."""
    with TestClient(create_app(short_tmp / "nobody.sock", token=TOKEN)) as client:
        yield client


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/"),
        ("GET", "/conversation?agent=assistant&sender=user"),
        ("GET", "/events"),
        ("GET", "/static/dashboard.js"),
        ("POST", "/conversation/kill"),
    ],
)
def test_every_request_without_the_token_or_its_cookie_is_refused(
    client: TestClient, method: str, path: str
) -> None:
    response = client.request(method, path, follow_redirects=False)
    assert response.status_code == 401
    assert response.text == UNAUTHORIZED


def test_a_wrong_token_or_a_forged_cookie_is_refused(client: TestClient) -> None:
    wrong = client.get("/", params={"token": TOKEN + "x"}, follow_redirects=False)
    assert wrong.status_code == 401
    assert COOKIE not in wrong.headers.get("set-cookie", "")
    client.cookies.set(COOKIE, "nonce.0123456789abcdef")
    assert client.get("/feed").status_code == 401


def test_the_token_sets_a_strict_cookie_and_leaves_the_address(client: TestClient) -> None:
    first = client.get(
        "/conversation",
        params={"token": TOKEN, "agent": "a b", "sender": "user"},
        follow_redirects=False,
    )
    assert first.status_code == 303
    assert first.headers["location"] == "/conversation?agent=a+b&sender=user"
    cookie = first.headers["set-cookie"].lower()
    assert cookie.startswith(f"{COOKIE}=")
    for attribute in ("httponly", "samesite=strict", "path=/"):
        assert attribute in cookie
    # The cookie alone lets in from then on; the page does not carry the token.
    page = client.get("/feed")
    assert page.status_code == 200
    assert TOKEN not in page.text


def test_a_change_needs_the_sessions_csrf_token_and_the_same_origin(client: TestClient) -> None:
    csrf = logged_in(client)
    body = {"agent": "assistant", "sender": "user"}
    without = client.post("/conversation/kill", json=body)
    assert (without.status_code, without.text) == (403, FORBIDDEN)
    wrong = client.post("/conversation/kill", json=body, headers={"X-CSRF-Token": csrf + "0"})
    assert wrong.status_code == 403
    elsewhere = client.post(
        "/conversation/kill",
        json=body,
        headers={"X-CSRF-Token": csrf, "Origin": "http://evil.example"},
    )
    assert elsewhere.status_code == 403
    # With both right the request reaches the action, which finds no daemon.
    allowed = client.post(
        "/conversation/kill",
        json=body,
        headers={"X-CSRF-Token": csrf, "Origin": "http://testserver"},
    )
    assert allowed.status_code == 503
    assert "unreachable" in allowed.json()["error"] or "connecting" in allowed.json()["error"]


def test_a_change_through_a_proxy_that_sets_its_own_host_is_let_through(
    client: TestClient,
) -> None:
    # nginx's proxy_pass sends the upstream's address as Host, and no X-Forwarded-Host,
    # unless told to: the page's origin then names another host than the one asked.
    csrf = logged_in(client)
    body = {"agent": "assistant", "sender": "user"}
    proxied = {"X-CSRF-Token": csrf, "Origin": "https://chinwag.example.org"}
    allowed = client.post(
        "/conversation/kill", json=body, headers={**proxied, "Sec-Fetch-Site": "same-origin"}
    )
    assert allowed.status_code == 503  # reached the action, which finds no daemon
    # What the browser says of where the request came from is what decides.
    for site in ("cross-site", "same-site", "none"):
        refused = client.post(
            "/conversation/kill", json=body, headers={**proxied, "Sec-Fetch-Site": site}
        )
        assert (refused.status_code, refused.text) == (403, FORBIDDEN), site


def test_a_cookie_or_csrf_token_beyond_ascii_is_refused_not_an_error(
    client: TestClient,
) -> None:
    # Headers arrive as Latin-1; compared as text, a non-ASCII one raised TypeError (500).
    forged = client.get("/", headers=[(b"cookie", f"{COOKIE}=nonce.\xe9".encode("latin-1"))])
    assert (forged.status_code, forged.text) == (401, UNAUTHORIZED)
    logged_in(client)
    wrong = client.post(
        "/conversation/kill", json={}, headers=[(b"x-csrf-token", "\xe9".encode("latin-1"))]
    )
    assert (wrong.status_code, wrong.text) == (403, FORBIDDEN)


def test_another_sessions_csrf_token_is_refused(short_tmp: Path) -> None:
    app = create_app(short_tmp / "nobody.sock", token=TOKEN)
    with TestClient(app) as one, TestClient(app) as other:
        csrf_of_one = logged_in(one)
        logged_in(other)
        answer = other.post("/conversation/kill", json={}, headers={"X-CSRF-Token": csrf_of_one})
        assert answer.status_code == 403


def test_loopback_addresses() -> None:
    assert all(is_loopback(host) for host in ("127.0.0.1", "127.8.8.8", "::1", "localhost"))
    assert not any(is_loopback(host) for host in ("0.0.0.0", "192.168.1.2", "::", "example.org"))


def test_a_public_address_needs_a_token(short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CHINWAG_DASHBOARD_TOKEN", raising=False)
    result = CliRunner().invoke(
        cli, ["--socket", str(short_tmp / "s.sock"), "dashboard", "--host", "0.0.0.0"]
    )
    assert result.exit_code == 1
    assert "--host 0.0.0.0 is not a loopback address: set an access token first" in result.output
