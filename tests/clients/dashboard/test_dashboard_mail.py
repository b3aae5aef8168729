"""The mail views against a real daemon: participants, an inbox read as a chosen
participant (opening a message reads it), a thread, spaces, locks; and, on a real
`chinwag dashboard`, mail and roster changes arriving on a page's event stream."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from dashboard_harness import (
    EVENT_S,
    TOKEN,
    DashboardProcess,
    EventStream,
    held_client,
    logged_in,
    on_daemon,
)
from playwright.sync_api import Page, expect
from starlette.testclient import TestClient


async def seed(client: Any) -> dict[str, str]:
    """ana and bob talk in a thread, carol has one message, #garden one post, two locks."""
    first = await client.post("ana", "Seeds for the garden?", to="bob")
    await client.post("bob", "**Tomatoes**, and <b>basil</b>", reply_to=first.msg_id)
    to_carol = await client.post("ana", "hello carol", to="carol")
    await client.space_create("ana", "garden", description="Everything green")
    await client.space_join("bob", "garden")
    await client.post("ana", "Water at `six`", to="#garden")
    await client.lock("ana", "src/auth.py")
    await client.lock("bob", "docs/", mode="advisory")
    return {"thread": first.msg_id, "to_carol": to_carol.msg_id}


@pytest.fixture
def seeded(daemon: Any) -> dict[str, str]:
    found: dict[str, str] = {}

    async def fill(client: Any) -> None:
        found.update(await seed(client))

    on_daemon(daemon, fill)
    return found


def rows(page: str, attribute: str) -> list[str]:
    return re.findall(rf'<tr {attribute}="([^"]+)"', page)


def cell(page: str, row: str, css_class: str) -> str:
    found = re.search(rf'{row}.*?<td class="[^"]*\b{css_class}\b[^"]*">([^<]*)<', page, re.S)
    assert found is not None, page
    return found.group(1)


def test_participants_with_presence_and_unread(
    seeded: dict[str, str], app_client: TestClient
) -> None:
    page = app_client.get("/mail").text
    assert rows(page, "data-name") == ["ana", "assistant", "bob", "carol", "helper"]
    assert 'data-fragment="/mail?fragment=1" data-live="participants"' in page
    # Hosted agents are always online; the others' connections have closed.
    assert cell(page, 'data-name="assistant"', "presence") == "online"
    assert cell(page, 'data-name="ana"', "presence") == "offline"
    # bob read ana's message by replying; #garden's post is unread, as carol's one.
    assert cell(page, 'data-name="bob"', "unread") == "1"
    assert cell(page, 'data-name="carol"', "unread") == "1"
    assert '<a href="/mail/inbox?as=carol">carol</a>' in page
    fragment = app_client.get("/mail", params={"fragment": 1}).text
    assert "<html" not in fragment and rows(fragment, "data-name") == rows(page, "data-name")


def test_an_inbox_is_read_as_a_chosen_participant_and_opening_reads(
    seeded: dict[str, str], app_client: TestClient
) -> None:
    unchosen = app_client.get("/mail/inbox").text
    assert "Choose whose inbox to open." in unchosen and 'id="inbox"' not in unchosen
    msg_id = seeded["to_carol"]
    inbox = app_client.get("/mail/inbox", params={"as": "Carol"}).text
    assert '<span id="reader">carol</span>' in inbox
    assert rows(inbox, "data-msg") == [msg_id]
    # Shown, so delivered; not read until opened.
    assert cell(inbox, f'data-msg="{msg_id}"', "state") == "delivered"
    assert "1 unread" in inbox
    opened = app_client.get("/mail/message", params={"as": "carol", "msg": msg_id}).text
    assert '<div class="text markdown"><p>hello carol</p>\n</div>' in opened
    assert '<span class="state">read</span> for carol' in opened
    again = app_client.get("/mail/inbox", params={"as": "carol"}).text
    assert cell(again, f'data-msg="{msg_id}"', "state") == "read"
    assert "0 unread" in again
    # Reading as carol changed nothing of ana's copy of her own message.
    other = app_client.get("/mail/inbox", params={"as": "bob"}).text
    assert "hello carol" not in other


def test_a_thread_in_order(seeded: dict[str, str], app_client: TestClient) -> None:
    page = app_client.get("/mail/thread", params={"as": "ana", "thread": seeded["thread"]}).text
    texts = re.findall(r'<div class="text markdown"><p>(.*)</p>', page)
    # As Markdown, the raw HTML in it as text.
    assert texts == [
        "Seeds for the garden?",
        "<strong>Tomatoes</strong>, and &lt;b&gt;basil&lt;/b&gt;",
    ]
    assert f'data-thread="{seeded["thread"]}"' in page
    unknown = app_client.get("/mail/thread", params={"as": "carol", "thread": seeded["thread"]})
    assert unknown.status_code == 404 and 'class="refused"' in unknown.text


def test_spaces_their_members_and_mail(seeded: dict[str, str], app_client: TestClient) -> None:
    listed = app_client.get("/mail/spaces").text
    assert rows(listed, "data-space") == ["garden"]
    assert cell(listed, 'data-space="garden"', "members") == "2"
    assert cell(listed, 'data-space="garden"', "messages") == "1"
    # Read by nobody in particular: the public space's mail, no one's state.
    space = app_client.get("/mail/space", params={"name": "#garden"}).text
    assert re.findall(r'<li data-name="([^"]+)">', space) == ["ana", "bob"]
    assert '<div class="text markdown"><p>Water at <code>six</code></p>' in space
    assert 'class="state"' not in space
    as_bob = app_client.get("/mail/space", params={"name": "garden", "as": "bob"}).text
    # Read as bob, a member: his copy, delivered by this reading.
    assert '<span class="state">delivered</span>' in as_bob
    missing = app_client.get("/mail/space", params={"name": "orchard"})
    assert missing.status_code == 404 and "No space is named orchard" in missing.text


def test_locks(seeded: dict[str, str], app_client: TestClient) -> None:
    page = app_client.get("/mail/locks").text
    assert rows(page, "data-resource") == ["docs/", "src/auth.py"]
    assert re.search(
        r'data-holder="bob">\s*<td><code>docs/</code></td>\s*<td>bob</td>\s*'
        r"<td>advisory</td>",
        page,
    ), page
    assert re.search(r'data-holder="ana">.*?<td>exclusive</td>', page, re.S), page


# --- live, on a real dashboard -------------------------------------------------------


@contextmanager
def stream(dashboard: DashboardProcess, **query: str) -> Iterator[EventStream]:
    """A page's event stream with no run events, ``query`` saying what it follows."""
    with httpx.Client(base_url=dashboard.url, timeout=EVENT_S) as client:
        logged_in(client)
        with client.stream("GET", "/events", params={**query, "runs": "0"}) as response:
            yield EventStream(response)


def test_mail_posted_after_the_page_opened_arrives(
    daemon: Any, dashboard: DashboardProcess
) -> None:
    with stream(dashboard, **{"as": "bob"}) as events, held_client(daemon) as (portal, client):
        events.until(lambda kind, data: kind == "watching" and data == "bob", "bob's watch")
        posted = portal.call(functools.partial(client.post, "ana", "Are you there?", to="bob"))
        _, data = events.until(lambda kind, data: kind == "mail", "the new mail")[-1]
        arrived = json.loads(data)
        assert arrived["change"] is None
        assert arrived["message"]["msg_id"] == posted.msg_id
        assert arrived["message"]["content"] == "Are you there?"
        portal.call(functools.partial(client.react, "bob", posted.msg_id, "👍"))
        _, data = events.until(lambda kind, data: kind == "mail", "the reaction")[-1]
        changed = json.loads(data)
        assert changed["change"] == "react"
        assert changed["message"]["reactions"] == [{"emoji": "👍", "by": ["bob"]}]


def test_mail_read_through_another_client_arrives(daemon: Any, dashboard: DashboardProcess) -> None:
    with stream(dashboard, **{"as": "bob"}) as events, held_client(daemon) as (portal, client):
        posted = [
            portal.call(functools.partial(client.post, "ana", text, to="bob")).msg_id
            for text in ("one", "two")
        ]
        events.until(lambda kind, data: kind == "watching" and data == "bob", "bob's watch")
        portal.call(functools.partial(client.mark_read, "bob", msg_ids=[posted[1]]))
        _, data = events.until(lambda kind, data: kind == "read", "the read")[-1]
        assert json.loads(data) == {"msg_ids": [posted[1]]}
        portal.call(functools.partial(client.get_message, "bob", posted[0]))
        _, data = events.until(lambda kind, data: kind == "read", "the other read")[-1]
        assert json.loads(data) == {"msg_ids": [posted[0]]}


def test_presence_and_locks_changes_arrive(daemon: Any, dashboard: DashboardProcess) -> None:
    def roster(kind: str, data: str) -> tuple[str, ...]:
        return tuple(json.loads(data)["changed"]) if kind == "roster" else ()

    with stream(dashboard, roster="1") as events:
        # The first reading: everything is new to the page.
        events.until(
            lambda *event: set(roster(*event)) == {"participants", "spaces", "locks"},
            "the first roster",
        )
        with held_client(daemon) as (portal, client):
            portal.call(functools.partial(client.register, "dave", kind="person"))
            events.until(lambda *event: roster(*event) == ("participants",), "dave online")
            portal.call(functools.partial(client.lock, "dave", "src/"))
            events.until(lambda *event: "locks" in roster(*event), "dave's lock")
        events.until(lambda *event: "participants" in roster(*event), "dave offline")


# --- in a browser ----------------------------------------------------------------------


@pytest.mark.usefixtures("screenshot_on_failure")
def test_an_inbox_updates_live_without_a_reload(
    page: Page, daemon: Any, dashboard: DashboardProcess
) -> None:
    on_daemon(daemon, lambda client: client.post("ana", "first", to="bob"))
    page.goto(f"{dashboard.url}/mail/inbox?as=bob&token={TOKEN}")
    inbox = page.locator("#inbox tr[data-msg] .subject a")
    expect(inbox).to_have_text(["first"])
    page.evaluate("window.sameDocument = true")
    # Once bob's watch is on, what is posted is pushed to the page.
    expect(page.locator("body")).to_have_attribute("data-watching", "bob")
    on_daemon(daemon, lambda client: client.post("ana", "second, live", to="bob"))
    expect(inbox).to_have_text(["second, live", "first"])
    expect(page.locator("#inbox .unread")).to_have_text("2 unread")
    assert page.evaluate("window.sameDocument") is True
    # Opened, it is read; in the inbox again, it says so.
    inbox.first.click()
    expect(page.locator("#message .state")).to_have_text("read")
    page.goto(f"{dashboard.url}/mail/inbox?as=bob")
    expect(page.locator("#inbox tr[data-msg] .state")).to_have_text(["read", "delivered"])


@pytest.mark.usefixtures("screenshot_on_failure")
def test_an_inbox_shows_mail_read_elsewhere_read_without_a_reload(
    page: Page, daemon: Any, dashboard: DashboardProcess
) -> None:
    posted: list[str] = []

    async def fill(client: Any) -> None:
        for text in ("read elsewhere", "left unread"):
            posted.append((await client.post("ana", text, to="bob")).msg_id)

    on_daemon(daemon, fill)
    # The page reads its inbox again once the daemon is up and once bob's watch is on:
    # both are waited for, so that only the read can make it read it once more.
    fragments: list[str] = []

    def second_fragment(response: Any) -> bool:
        if "fragment=1" in response.url:
            fragments.append(response.url)
        return len(fragments) == 2

    with page.expect_response(second_fragment):
        page.goto(f"{dashboard.url}/mail/inbox?as=bob&token={TOKEN}")
    states = page.locator("#inbox tr[data-msg] .state")
    expect(states).to_have_text(["delivered", "delivered"])
    expect(page.locator("#inbox .unread")).to_have_text("2 unread")
    expect(page.locator("body")).to_have_attribute("data-watching", "bob")
    page.evaluate("window.sameDocument = true")
    # bob reads the older one through another client (the CLI, the TUI, another tab).
    on_daemon(daemon, lambda client: client.mark_read("bob", msg_ids=[posted[0]]))
    expect(states).to_have_text(["delivered", "read"])
    expect(page.locator("#inbox .unread")).to_have_text("1 unread")
    assert page.evaluate("window.sameDocument") is True


def test_an_inbox_s_older_page_stays_itself_live(
    page: Page, daemon: Any, dashboard: DashboardProcess
) -> None:
    async def fill(client: Any) -> None:
        for number in range(1, 53):
            await client.post("ana", f"note {number}", to="bob")

    on_daemon(daemon, fill)
    page.goto(f"{dashboard.url}/mail/inbox?as=bob&token={TOKEN}")
    expect(page.locator("body")).to_have_attribute("data-watching", "bob")
    # The watch on: the page's live part is read again, as it is on every connection.
    with page.expect_response(lambda response: "fragment=1" in response.url):
        page.get_by_role("link", name="Older mail").click()
    inbox = page.locator("#inbox tr[data-msg] .subject a")
    expect(inbox).to_have_text(["note 2", "note 1"])
    # Mail coming changes what it shows (unread counts), not which page.
    with page.expect_response(lambda response: "fragment=1" in response.url):
        on_daemon(daemon, lambda client: client.post("ana", "late", to="bob"))
    expect(page.locator("#inbox .unread")).to_have_text("53 unread")
    expect(inbox).to_have_text(["note 2", "note 1"])
