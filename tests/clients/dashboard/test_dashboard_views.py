"""Each view renders what the real daemon holds, under the proxy's prefix when there is
one, and nothing secret."""

from __future__ import annotations

import html
import re
from typing import Any

from chinwag.clients.dashboard import create_app
from dashboard_harness import TOKEN, logged_in, on_daemon, talk
from starlette.testclient import TestClient

SECRET_KEY = "sk-dashboard-never-shows-this"

CONFIG_WITH_A_KEY = f"""
[daemon]
shutdown_grace_s = 2.0

[providers.remote]
kind = "openai"
base_url = "http://127.0.0.1:9/v1"
api_key = "{SECRET_KEY}"

[agents.assistant]
provider = "echo"
description = "Echoes the user"
tools = ["set_title", "ask_user"]

[agents.helper]
provider = "echo"
description = "A second agent"

[agents.remote]
provider = "remote"
model = "some-model"
system_prompt = "The system prompt is config, never shown."
"""


def test_agents_lists_each_agent_with_its_tools(app_client: TestClient) -> None:
    page = app_client.get("/agents")
    assert page.status_code == 200
    rows = re.findall(r'<tr data-agent="([^"]+)">', page.text)
    assert rows == ["assistant", "helper"]
    assert "Echoes the user" in page.text
    assert '<code class="tool">ask_user</code>' in page.text


def test_conversations_show_titles_filtered_and_searched(
    daemon: Any, app_client: TestClient
) -> None:
    async def fill(client: Any) -> None:
        await talk(client, "ana", "/title Planning the garden")
        await talk(client, "bob", "/title Fixing the roof")
        async with client.stream("helper", "hi", sender="cid") as events:
            await events.collect()

    on_daemon(daemon, fill)
    every = app_client.get("/").text
    assert "Planning the garden" in every and "Fixing the roof" in every
    assert 'data-agent="helper" data-sender="cid"' in every
    only_helper = app_client.get("/", params={"agent": "helper"}).text
    assert 'data-sender="cid"' in only_helper and "Planning the garden" not in only_helper
    searched = app_client.get("/", params={"q": "ROOF"}).text
    assert "Fixing the roof" in searched and "Planning the garden" not in searched
    by_sender = app_client.get("/", params={"q": "ana"}).text
    assert "Planning the garden" in by_sender and "Fixing the roof" not in by_sender
    none = app_client.get("/", params={"q": "nothing like this"}).text
    assert "No conversations match" in none
    # The rows alone, as the page reads them again, searched as the page was.
    assert 'data-fragment="/?q=ROOF&amp;fragment=1"' in searched
    rows = app_client.get("/", params={"q": "ROOF", "fragment": 1}).text
    assert "<html" not in rows and "<tr " in rows
    assert "Fixing the roof" in rows and "Planning the garden" not in rows


def test_a_search_pages_on_to_matches_older_than_the_newest_page(
    daemon: Any, app_client: TestClient
) -> None:
    """The daemon searches: matches past the first page are a cursor away, not lost."""

    async def fill(client: Any) -> None:
        for n in range(55):
            async with client.stream("helper", "hi", sender=f"quokka-{n}") as events:
                await events.collect()
        async with client.stream("helper", "hi", sender="newest") as events:
            await events.collect()

    on_daemon(daemon, fill)
    first = app_client.get("/", params={"q": "QUOKKA"}).text
    shown = re.findall(r'data-sender="([^"]+)"', first)
    assert shown == [f"quokka-{n}" for n in range(54, 4, -1)]  # a page of 50, newest first
    older = re.search(r'<a href="([^"]+)">Older conversations</a>', first)
    assert older is not None, "no way to the older matches"
    rest = app_client.get(html.unescape(older.group(1))).text
    assert re.findall(r'data-sender="([^"]+)"', rest) == [f"quokka-{n}" for n in range(4, -1, -1)]
    assert 'value="QUOKKA"' in rest  # still the search


def test_a_conversation_folds_tool_calls_and_names_its_guest(
    daemon: Any, app_client: TestClient
) -> None:
    async def fill(client: Any) -> None:
        await talk(client, "ana", "/title Garden")
        await talk(client, "ana", "what do you think", guest="helper")

    on_daemon(daemon, fill)
    page = app_client.get("/conversation", params={"agent": "assistant", "sender": "ana"})
    assert page.status_code == 200
    assert '<h1 id="title">Garden</h1>' in page.text
    # The call and its result are folded away, the result named after its tool.
    assert "<summary>called set_title</summary>" in page.text
    assert "<summary>result of set_title</summary>" in page.text
    # The guest's reply is shown as the guest's.
    guest_turn = re.search(
        r'<div class="entry assistant guest"[^>]*>\s*<div class="speaker">helper '
        r'<span class="badge">guest</span></div>\s*'
        r'<div class="text markdown"><p>what do you think</p>',
        page.text,
    )
    assert guest_turn is not None, page.text
    assert '<option value="helper">helper (guest)</option>' in page.text


def test_archived_entries_show_on_demand(daemon: Any, app_client: TestClient) -> None:
    async def fill(client: Any) -> None:
        await talk(client, "ana", "before the compaction")
        await client.compact("assistant", "ana")
        await talk(client, "ana", "after the compaction")

    on_daemon(daemon, fill)
    address = {"agent": "assistant", "sender": "ana"}
    current = app_client.get("/conversation", params=address).text
    assert "after the compaction" in current
    assert "<p>before the compaction</p>" not in current
    assert 'class="entry compact"' in current
    archived = app_client.get("/conversation", params={**address, "archived": "1"}).text
    assert "<p>before the compaction</p>" in archived
    assert "hide archived entries" in archived
    # The history as a fragment, likewise (read again when the page compacts).
    entries = "/conversation/entries"
    assert "<p>before the compaction</p>" not in app_client.get(entries, params=address).text
    with_archived = app_client.get(entries, params={**address, "archived": "1"}).text
    assert "<p>before the compaction</p>" in with_archived


def test_archived_entries_are_marked_apart_from_the_live_ones(
    daemon: Any, app_client: TestClient
) -> None:
    async def fill(client: Any) -> None:
        await talk(client, "ana", "/title Archived soon")
        await client.compact("assistant", "ana")
        await talk(client, "ana", "after the compaction")

    on_daemon(daemon, fill)
    address = {"agent": "assistant", "sender": "ana"}
    for path in ("/conversation", "/conversation/entries"):
        shown = app_client.get(path, params={**address, "archived": "1"}).text
        marker = re.search(r"compacted into archive <code>([^<]+)</code>", shown)
        assert marker is not None, shown
        label = f'<span class="badge archived" title="compacted into {marker[1]}">archived</span> '
        # The user's entry, the assistant's call and its tool result, the answer.
        archived = re.findall(
            r'class="entry (?:user|assistant|tool) archived" data-seq="(\d+)"', shown
        )
        assert archived == ["1", "2", "3", "4"], shown
        assert f'<div class="speaker">{label}ana</div>' in shown
        assert f"<summary>{label}result of set_title</summary>" in shown
        # The marker and the entries after it are not archived.
        live = re.findall(r'class="entry (?:user|assistant)" data-seq="(\d+)"', shown)
        assert live == ["6", "7"], shown
        assert shown.count("archived</span>") == 4


def test_archived_in_the_address_is_yes_or_no(daemon: Any, app_client: TestClient) -> None:
    async def fill(client: Any) -> None:
        await talk(client, "ana", "before the compaction")
        await client.compact("assistant", "ana")

    on_daemon(daemon, fill)
    address = {"agent": "assistant", "sender": "ana"}
    for path in ("/conversation", "/conversation/entries"):
        for no in ("0", "false", "off", "OFF", ""):
            shown = app_client.get(path, params={**address, "archived": no})
            assert shown.status_code == 200
            assert "<p>before the compaction</p>" not in shown.text, (path, no)
        for yes in ("1", "true", "on", "True"):
            shown = app_client.get(path, params={**address, "archived": yes})
            assert "<p>before the compaction</p>" in shown.text, (path, yes)
        garbled = app_client.get(path, params={**address, "archived": "maybe"})
        assert garbled.status_code == 400
        assert "`archived` in the address is 1 or 0 (true or false, on or off)." in garbled.text


def test_entries_after_a_seq_are_a_fragment(daemon: Any, app_client: TestClient) -> None:
    on_daemon(daemon, lambda client: talk(client, "ana", "one", "two"))
    fragment = app_client.get(
        "/conversation/entries", params={"agent": "assistant", "sender": "ana", "after_seq": 2}
    ).text
    assert "<html" not in fragment
    assert re.findall(r'data-seq="(\d+)"', fragment) == ["3", "4"]
    garbled = app_client.get(
        "/conversation/entries", params={"agent": "assistant", "sender": "ana", "after_seq": "x"}
    )
    assert garbled.status_code == 400  # not a ValueError's 500
    assert "after_seq is the number of an entry." in garbled.text
    # Beyond what the wire carries: not msgspec's OverflowError as a 500.
    huge = app_client.get(
        "/conversation/entries",
        params={"agent": "assistant", "sender": "ana", "after_seq": str(2**64)},
    )
    assert huge.status_code == 400
    assert "after_seq is the number of an entry." in huge.text


def test_feed_and_stats(daemon: Any, app_client: TestClient) -> None:
    on_daemon(daemon, lambda client: talk(client, "ana", "one", "two"))
    assert 'id="feed"' in app_client.get("/feed").text
    stats = app_client.get("/stats").text
    assert '<dd data-stat="runs_total">2</dd>' in stats
    # The dashboard's own connection, holding its one subscription.
    assert '<dd data-stat="subscriptions">1</dd>' in stats


def test_a_refusal_of_the_daemon_is_its_sentence(app_client: TestClient) -> None:
    page = app_client.get("/conversation", params={"agent": "nobody", "sender": "user"})
    assert page.status_code == 404
    assert "nobody" in page.text and 'class="refused"' in page.text
    missing = app_client.get("/conversation", params={"agent": "assistant"})
    assert missing.status_code == 400
    assert "This page needs `sender` in its address." in missing.text


def test_links_stay_under_the_proxys_prefix(daemon: Any) -> None:
    app = create_app(daemon.socket_path, token=TOKEN, retry_s=0.1)
    with TestClient(app, root_path="/cw") as client:
        assert client.portal is not None
        client.portal.call(app.state.link.until_up)
        # As uvicorn hands it on: the path with the prefix, which the routes do without.
        first = client.get(
            "/cw/", params={"token": TOKEN, "agent": "helper"}, follow_redirects=False
        )
        assert first.headers["location"] == "/cw/?agent=helper"
        assert "path=/cw" in first.headers["set-cookie"].lower()
        page = client.get("/cw/agents").text
    links = re.findall(r'(?:href|src|action)="([^"]+)"', page)
    assert links, page
    assert all(link.startswith("/cw/") for link in links), links
    assert '<meta name="root" content="/cw">' in page
    assert '<a href="/cw/conversation?agent=helper&amp;sender=user">talk</a>' in page


def test_no_secret_is_rendered(daemon_factory: Any) -> None:
    daemon = daemon_factory(CONFIG_WITH_A_KEY)
    on_daemon(daemon, lambda client: talk(client, "ana", "/title Hello"))
    app = create_app(daemon.socket_path, token=TOKEN, retry_s=0.1)
    with TestClient(app) as client:
        assert client.portal is not None
        client.portal.call(app.state.link.until_up)
        logged_in(client)
        pages = [
            client.get(path, params=params).text
            for path, params in [
                ("/", {}),
                ("/agents", {}),
                ("/feed", {}),
                ("/stats", {}),
                ("/conversation", {"agent": "assistant", "sender": "ana"}),
                ("/conversation", {"agent": "remote", "sender": "ana"}),
            ]
        ]
    assert all("chinwag" in text for text in pages)
    for text in pages:
        assert TOKEN not in text
        assert SECRET_KEY not in text
        assert "never shown" not in text
        assert "127.0.0.1:9" not in text
