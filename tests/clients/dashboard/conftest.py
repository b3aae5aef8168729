"""The dashboard under test: in process (Starlette's TestClient) or as a real
`chinwag dashboard` process, each against a real `chinwag serve` on the echo model.

The browser tests drive Debian's Chromium through Playwright, which cannot download
browsers here: `browser` launches `chromium` from the PATH, for one test at a time.
When there is none they skip, except under CI=true, where they fail.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from chinwag.clients.dashboard import create_app
from dashboard_harness import TOKEN, DashboardProcess, logged_in, start_dashboard
from playwright.sync_api import Browser, Page, sync_playwright
from starlette.testclient import TestClient


@pytest.fixture
def app_client(daemon: Any) -> Iterator[TestClient]:
    """The dashboard app on the daemon, logged in, once it is connected."""
    app = create_app(daemon.socket_path, token=TOKEN, retry_s=0.1)
    with TestClient(app) as client:
        assert client.portal is not None
        client.portal.call(app.state.link.until_up)
        client.headers["X-CSRF-Token"] = logged_in(client)
        yield client


@pytest.fixture
def dashboard_factory() -> Iterator[Callable[..., DashboardProcess]]:
    started: list[DashboardProcess] = []

    def make(socket_path: Path, *args: str) -> DashboardProcess:
        dashboard = start_dashboard(socket_path, *args)
        started.append(dashboard)
        return dashboard

    yield make
    for dashboard in started:
        dashboard.stop()


@pytest.fixture
def dashboard(daemon: Any, dashboard_factory: Callable[..., DashboardProcess]) -> DashboardProcess:
    """A `chinwag dashboard` process on the daemon."""
    return dashboard_factory(daemon.socket_path)


# --- the browser ------------------------------------------------------------------------


@pytest.fixture
def browser() -> Iterator[Browser]:
    """Debian's Chromium (which `.ci/run` installs), launched for one test.

    Not pytest-playwright's session-long browser: Playwright's sync API keeps an
    asyncio loop running on this thread for as long as it is started, and the tests
    a worker runs after it (anyio on asyncio, the Telegram bridge) must not find one.
    """
    chromium = shutil.which("chromium")
    if chromium is None:
        reason = "no `chromium` on the PATH (apt-get install chromium) for the browser tests"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A page of its own browser context, closed after the test."""
    context = browser.new_context()
    yield context.new_page()
    context.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when == "call":
        item.stash[_FAILED] = report.failed
    return report


_FAILED = pytest.StashKey[bool]()


@pytest.fixture
def screenshot_on_failure(
    request: pytest.FixtureRequest, page: Page, output_path: str
) -> Iterator[None]:
    """A failed browser test leaves a screenshot of its page in its output folder
    (pytest-playwright's ``--output``, ``test-results/`` by default)."""
    yield
    if request.node.stash.get(_FAILED, False):
        Path(output_path).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(output_path) / "failed.png"), full_page=True)
