"""The dashboard in a real browser (Debian's Chromium through Playwright) against a real
`chinwag dashboard` on a real daemon on the echo model.

A failed test leaves a screenshot of its page in its output folder. One test saves a
screenshot of each view; with CHINWAG_UPDATE_SCREENSHOTS=1 it also replaces the ones
under docs/screenshots/ that the README shows.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from chinwag.clients.dashboard._access import UNAUTHORIZED
from dashboard_harness import (
    TOKEN,
    DashboardProcess,
    begin_slow_run,
    held_client,
    on_daemon,
    talk,
)
from playwright.sync_api import Dialog, Page, Route, expect

pytestmark = pytest.mark.usefixtures("screenshot_on_failure")

DOCS = Path(__file__).parents[3] / "docs" / "screenshots"
PNG = b"\x89PNG\r\n\x1a\n"
#: The views the README shows, by the name of their screenshot.
SHOWN = ("conversations", "conversation", "feed", "agents", "stats")
#: The mail views the README shows, likewise.
SHOWN_MAIL = ("participants", "inbox", "space", "locks")


def open_page(page: Page, dashboard: DashboardProcess, path: str = "/", **query: str) -> None:
    """Open ``path`` with the token, as the printed address does; it leaves the address."""
    params = "&".join(f"{key}={value}" for key, value in {**query, "token": TOKEN}.items())
    page.goto(f"{dashboard.url}{path}?{params}")
    assert "token=" not in page.url


def send(page: Page, text: str) -> None:
    page.fill("#send textarea", text)
    page.click("#send button")


def scripted_run(page: Page, *events: dict[str, Any]) -> None:
    """The page's event stream, once: the daemon up, then ``events`` of one run of
    assistant and web (its end not among them unless given)."""
    scripted_stream(page, [run_frame("web", "r1", event) for event in events])


def scripted_stream(page: Page, frames: Sequence[tuple[str, dict[str, Any]]]) -> None:
    """The page's event stream, once: the daemon up, then ``frames`` (event, data)."""
    # No connecting again before the test is over.
    body = stream_body(frames, retry_ms=3_600_000)
    page.route(
        "**/events?*",
        lambda route: route.fulfill(body=body, content_type="text/event-stream"),
        times=1,
    )


def scripted_body(events: Sequence[dict[str, Any]], *, retry_ms: int) -> str:
    """One connection of an event stream: the daemon up, then ``events`` of one run of
    assistant and web; the browser connects again ``retry_ms`` after it ends."""
    return stream_body([run_frame("web", "r1", event) for event in events], retry_ms=retry_ms)


def stream_body(frames: Sequence[tuple[str, dict[str, Any]]], *, retry_ms: int) -> str:
    """One connection of an event stream: the daemon up, then ``frames`` (event, data);
    the browser connects again ``retry_ms`` after it ends."""
    frames = [("daemon", {"up": True, "reason": ""}), *frames]
    return f"retry: {retry_ms}\n\n" + "".join(
        f"event: {kind}\ndata: {json.dumps(data)}\n\n" for kind, data in frames
    )


def run_frame(sender: str, run_id: str, event: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A ``run`` event of assistant and ``sender``, of the run ``run_id``."""
    ids = {"agent": "assistant", "sender": sender, "run_id": run_id}
    return ("run", {"type": "event", "id": 1, **ids, "event": {"run_id": run_id, **event}})


still_going = {"type": "text_delta", "delta": "still going"}


def test_the_conversation_list_shows_titles(
    page: Page, daemon: Any, dashboard: DashboardProcess
) -> None:
    on_daemon(daemon, lambda client: talk(client, "ana", "/title Planning the garden"))
    open_page(page, dashboard)
    row = page.locator('#conversations tr[data-sender="ana"]')
    expect(row.locator(".title")).to_have_text("Planning the garden")
    row.locator(".title a").click()
    expect(page.locator("#title")).to_have_text("Planning the garden")


def test_conversations_begun_after_the_list_rendered_show_in_it(
    page: Page, daemon: Any, dashboard: DashboardProcess
) -> None:
    with held_client(daemon) as (portal, client):

        def late(route: Route) -> None:
            # Rendered, its event stream not connected yet: a conversation begun.
            portal.call(talk, client, "early", "/title Begun meanwhile")
            route.continue_()

        page.route("**/events?*", late, times=1)
        open_page(page, dashboard)
        listed = page.locator("#conversations tr[data-sender] .title")
        expect(listed).to_have_text(["Begun meanwhile"])
        # And one begun while the page is open.
        portal.call(talk, client, "later", "/title Begun since")
        expect(listed).to_have_text(["Begun since", "Begun meanwhile"])


def test_a_run_ending_brings_its_row_up_to_date_and_to_the_top(
    page: Page, daemon: Any, dashboard: DashboardProcess
) -> None:
    on_daemon(daemon, lambda client: talk(client, "ana", "hello"))
    on_daemon(daemon, lambda client: talk(client, "bo", "hello"))
    # Once its stream is connected, the page reads its rows again: from then on they
    # follow the runs.
    with page.expect_response(lambda response: "fragment=1" in response.url):
        open_page(page, dashboard)
    rows = page.locator("#conversations tbody tr")
    expect(rows).to_have_count(2)
    expect(rows.first).to_have_attribute("data-sender", "bo")
    ana = page.locator('#conversations tr[data-sender="ana"]')
    tokens = ana.locator("td").nth(6)
    before = tokens.inner_text()
    on_daemon(daemon, lambda client: talk(client, "ana", "one two three four five six"))
    # Its tokens, last activity and place, as a reload shows them.
    expect(tokens).not_to_have_text(before)
    expect(rows.first).to_have_attribute("data-sender", "ana")
    shown = ana.inner_text()
    page.reload()
    expect(ana).to_have_text(shown)


def test_what_is_typed_while_a_message_is_sent_stays(
    page: Page, dashboard: DashboardProcess
) -> None:
    open_page(page, dashboard, "/conversation", agent="assistant", sender="web")
    answered: list[Route] = []
    # The send's answer held back (as under load) until the next message is typed.
    page.route("**/conversation/send", lambda route: answered.append(route), times=1)
    with page.expect_request("**/conversation/send"):
        send(page, "first")
    expect(page.locator("#send textarea")).to_have_value("")
    page.fill("#send textarea", "second, typed meanwhile")
    assert len(answered) == 1
    answered[0].continue_()
    expect(page.locator("#history .entry.user .text")).to_have_text("first")
    expect(page.locator("#send textarea")).to_have_value("second, typed meanwhile")


def test_a_message_sent_streams_in_without_a_reload(
    page: Page, dashboard: DashboardProcess
) -> None:
    open_page(page, dashboard, "/conversation", agent="assistant", sender="web")
    page.evaluate("window.sameDocument = true")
    send(page, "/slow 5 250")
    # Word by word in the live bubble (some of the words, before the last), then the
    # stored entry in the history.
    live = page.locator("#live .entry.assistant .text")
    expect(live).to_have_text(re.compile(r"^1( [234])*$"))
    expect(page.locator("#history .entry.assistant .text")).to_have_text("1 2 3 4 5")
    expect(page.locator("#history .entry.user .text")).to_have_text("/slow 5 250")
    assert page.evaluate("window.sameDocument") is True


def test_a_run_in_flight_when_the_page_opens_streams_from_its_start(
    page: Page, daemon: Any, dashboard_factory: Callable[..., DashboardProcess]
) -> None:
    # Started by a plain client before the dashboard (and so the page) was there.
    on_daemon(daemon, lambda client: begin_slow_run(client, "web", 30, 150))
    dashboard = dashboard_factory(daemon.socket_path)
    open_page(page, dashboard, "/conversation", agent="assistant", sender="web")
    live = page.locator("#live .entry.assistant .text")
    expect(live).to_have_text(re.compile(r"^1 2 3 4 5 6( \d+)*$"))
    # From its first word, each once, still coming in.
    words = live.inner_text().split()
    assert words == [str(word) for word in range(1, len(words) + 1)] and len(words) < 30
    expect(page.locator("#history .entry.assistant .text")).to_have_text(
        " ".join(str(word) for word in range(1, 31))
    )
    expect(page.locator("#live .entry")).to_have_count(0)


def test_a_run_between_the_pages_rendering_and_its_stream_shows(
    page: Page, daemon: Any, dashboard: DashboardProcess
) -> None:
    with held_client(daemon) as (portal, client):

        def late(route: Route) -> None:
            # Rendered, its event stream not connected yet: a whole run, begun and ended.
            portal.call(talk, client, "web", "said meanwhile")
            route.continue_()

        page.route("**/events?*", late, times=1)
        open_page(page, dashboard, "/conversation", agent="assistant", sender="web")
        expect(page.locator("#history .entry.assistant .text")).to_have_text("said meanwhile")


def test_what_a_run_in_flight_stored_shows_once_in_its_bubble(
    page: Page, daemon: Any, dashboard: DashboardProcess
) -> None:
    # Stored: the prompt (seq 1), the call of set_title and its result, the answer.
    on_daemon(daemon, lambda client: talk(client, "web", "/title Garden"))
    # The page is told of that run as if it were still in flight, replayed from its
    # start: what it stored after its prompt (seq 1) is its bubble's to show.
    scripted_run(page, {"type": "start", "agent": "assistant", "seq": 1}, still_going)
    open_page(page, dashboard, "/conversation", agent="assistant", sender="web")
    expect(page.locator("#live .entry.assistant .text")).to_have_text("still going")
    expect(page.locator("#history [data-seq]")).to_have_count(1)
    expect(page.locator("#history .entry.user .text")).to_have_text("/title Garden")


def test_message_text_shows_as_markdown_and_never_as_markup(
    page: Page, dashboard: DashboardProcess
) -> None:
    alerts: list[str] = []

    def alerted(dialog: Dialog) -> None:
        alerts.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", alerted)
    open_page(page, dashboard, "/conversation", agent="assistant", sender="web")
    send(page, "plant **tomatoes** now")
    # Streamed as it came, then the stored answer in its place, rendered.
    answer = page.locator("#history .entry.assistant .text")
    expect(answer.locator("strong")).to_have_text("tomatoes")
    expect(page.locator("#history .entry.user .text strong")).to_have_text("tomatoes")
    expect(page.locator("#live .entry")).to_have_count(0)
    send(page, "<img src=x onerror=alert(1)>")
    expect(answer.nth(1)).to_have_text("<img src=x onerror=alert(1)>")
    expect(page.locator("#history .entry.user .text").nth(1)).to_have_text(
        "<img src=x onerror=alert(1)>"
    )
    assert page.locator("main img").count() == 0
    assert alerts == []


def test_the_feed_shows_a_run_replayed_on_a_new_connection_once(
    page: Page, dashboard: DashboardProcess
) -> None:
    start = {"type": "start", "agent": "assistant", "seq": 1}
    # The stream's first connection ends mid-run (a proxy's timeout, the page fallen
    # behind); the next replays the run in flight from its start, its text merged.
    connections = [
        scripted_body([start, {"type": "text_delta", "delta": "1 2"}], retry_ms=0),
        scripted_body([start, {"type": "text_delta", "delta": "1 2 3"}], retry_ms=3_600_000),
    ]
    page.route(
        "**/events?*",
        lambda route: route.fulfill(body=connections.pop(0), content_type="text/event-stream"),
        times=2,
    )
    open_page(page, dashboard, "/feed")
    expect(page.locator('#feed tr[data-run="r1"] td').nth(4)).to_have_text("1 2 3")
    expect(page.locator("#feed tbody tr")).to_have_count(1)


RESUBSCRIBED_UNSEEN = "ended unseen: its end came as the dashboard subscribed to the daemon again"


def test_the_feed_after_a_resubscription_says_which_run_was_missed(
    page: Page, dashboard: DashboardProcess
) -> None:
    """The daemon dropped the dashboard's subscription and it was taken again: the run
    still in flight comes again from its start, and the one that ended meanwhile is
    missed. Neither is said to be lost with the daemon, which never went away."""
    start = {"type": "start", "agent": "assistant", "seq": 1}
    scripted_stream(
        page,
        [
            run_frame("web", "r1", start),
            run_frame("web", "r1", {"type": "text_delta", "delta": "1 2"}),
            run_frame("bob", "r2", start),
            ("resubscribed", {}),
            ("missed", {"agent": "assistant", "sender": "bob", "run_id": "r2"}),
            run_frame("web", "r1", start),
            run_frame("web", "r1", {"type": "text_delta", "delta": "1 2 3"}),
        ],
    )
    open_page(page, dashboard, "/feed")
    still_running = page.locator('#feed tr[data-run="r1"] td')
    expect(still_running.nth(4)).to_have_text("1 2 3")
    expect(still_running.nth(3)).to_have_text("running")
    expect(page.locator('#feed tr[data-run="r2"] td').nth(3)).to_have_text(RESUBSCRIBED_UNSEEN)


def test_a_run_missed_on_a_resubscription_says_so_on_its_page(
    page: Page, dashboard: DashboardProcess
) -> None:
    scripted_stream(
        page,
        [
            ("inflight", {"run_id": None}),
            run_frame("web", "r1", {"type": "start", "agent": "assistant", "seq": 1}),
            run_frame("web", "r1", still_going),
            ("resubscribed", {}),
            ("missed", {"agent": "assistant", "sender": "web", "run_id": "r1"}),
        ],
    )
    open_page(page, dashboard, "/conversation", agent="assistant", sender="web")
    bubble = page.locator('#live [data-run="r1"]')
    expect(bubble.locator(".text")).to_have_text("still going")
    expect(bubble.locator(".end-status")).to_have_text(RESUBSCRIBED_UNSEEN)
    expect(bubble).to_have_attribute("data-end", "lost")


def test_an_ask_answered_elsewhere_leaves_the_page(page: Page, dashboard: DashboardProcess) -> None:
    question = {"question": "Which?", "header": "", "options": [], "multi_select": False}
    scripted_run(
        page,
        {"type": "start", "agent": "assistant", "seq": 1},
        {"type": "tool_call", "call_id": "c1", "name": "ask_user", "arguments": "{}"},
        {"type": "ask_user", "ask_id": "a1", "questions": [question]},
        # Answered from another client, and the run goes on.
        {"type": "tool_result", "call_id": "c1", "output": "red", "is_error": False},
        still_going,
    )
    open_page(page, dashboard, "/conversation", agent="assistant", sender="web")
    expect(page.locator("#live .entry.assistant .text")).to_have_text("still going")
    expect(page.locator("#ask")).to_be_hidden()


def test_compacting_shows_the_history_as_it_now_reads(
    page: Page, daemon: Any, dashboard: DashboardProcess
) -> None:
    on_daemon(daemon, lambda client: talk(client, "web", "plant tomatoes", "water them"))
    open_page(page, dashboard, "/conversation", agent="assistant", sender="web")
    expect(page.locator("#history .entry.user")).to_have_count(2)
    page.fill("#compact input[name=instructions]", "keep the plants")
    page.click("#compact button")
    expect(page.locator("#compact [data-status]")).to_have_text(
        re.compile(r"^4 entries compacted into archive-\S+$")
    )
    # The entries archived leave the history, the compaction's summary in their place,
    # as a reload shows it.
    expect(page.locator("#history .entry.user")).to_have_count(0)
    expect(page.locator("#history .entry.compact")).to_have_count(1)
    shown = page.locator("#history").inner_text()
    page.reload()
    expect(page.locator("#history")).to_have_text(shown, use_inner_text=True)
    # The archived entries show on demand, the summary after them.
    page.click("#show-archived")
    expect(page.locator("#history [data-seq]")).to_have_count(5)


def test_a_run_the_daemon_died_in_does_not_stream_on_forever(
    page: Page, daemon: Any, dashboard: DashboardProcess
) -> None:
    open_page(page, dashboard, "/conversation", agent="assistant", sender="web")
    send(page, "/slow 100 200")
    bubble = page.locator("#live .entry.assistant")
    expect(bubble.locator(".text")).to_contain_text("1 2")
    daemon.kill9()  # no end for the run: the daemon is gone mid-run
    expect(page.locator("#banner")).to_be_visible()
    daemon.start()
    expect(page.locator("#banner")).to_be_hidden()
    # Back, nothing is in flight: the run shows how it ended, and its prompt shows once.
    expect(bubble.locator(".end-status")).to_contain_text("the daemon went away")
    expect(page.locator("#live .entry.user")).to_have_count(0)
    expect(page.locator("#history .entry.user .text")).to_have_text("/slow 100 200")
    send(page, "after the crash")
    expect(page.locator("#history .entry.user .text").last).to_have_text("after the crash")
    expect(page.locator("#history .entry.assistant .text").last).to_have_text("after the crash")


def test_the_feed_does_not_show_a_run_the_daemon_died_in_as_running(
    page: Page, daemon: Any, dashboard: DashboardProcess
) -> None:
    open_page(page, dashboard, "/feed")
    expect(page.locator("#banner")).to_be_hidden()
    on_daemon(daemon, lambda client: begin_slow_run(client, "web", 100, 200))
    row = page.locator("#feed tr[data-run]")
    expect(row.locator("td").nth(3)).to_have_text("running")
    daemon.kill9()
    expect(page.locator("#banner")).to_be_visible()
    daemon.start()
    expect(page.locator("#banner")).to_be_hidden()
    expect(row.locator("td").nth(3)).to_have_text("ended unseen: the daemon went away")
    # A run begun since shows as usual.
    on_daemon(daemon, lambda client: talk(client, "ana", "back again"))
    expect(page.locator("#feed tr[data-run]").first.locator("td").nth(3)).to_have_text("done")


def test_a_message_refused_does_not_stay_as_if_sent(
    page: Page, daemon: Any, dashboard: DashboardProcess
) -> None:
    open_page(page, dashboard, "/conversation", agent="assistant", sender="web")
    daemon.stop()
    expect(page.locator("#banner")).to_be_visible()
    send(page, "sent while the daemon is away")
    expect(page.locator("#send [data-status]")).to_contain_text("The daemon is unreachable")
    expect(page.locator("#live .entry")).to_have_count(0)
    # Refused, it is back in the box to send again.
    expect(page.locator("#send textarea")).to_have_value("sent while the daemon is away")
    # Back, nothing of it shows; what is sent then does.
    daemon.start()
    expect(page.locator("#banner")).to_be_hidden()
    send(page, "sent once it is back")
    expect(page.locator("#history .entry.user .text")).to_have_text("sent once it is back")


def test_kill_stops_a_slow_run(page: Page, dashboard: DashboardProcess) -> None:
    open_page(page, dashboard, "/conversation", agent="assistant", sender="web")
    send(page, "/slow 100 200")
    bubble = page.locator("#live .entry.assistant")
    expect(bubble.locator(".text")).to_contain_text("1 2")
    page.click("#kill button")
    expect(bubble.locator(".end-status")).to_have_text("killed")
    words = bubble.locator(".text").inner_text().split()
    assert 2 <= len(words) < 100
    expect(page.locator("#banner")).to_be_hidden()
    # Again, with nothing running: it says so.
    page.click("#kill button")
    expect(page.locator("#kill [data-status]")).to_have_text("Nothing is running.")


def test_an_ask_is_answered_with_a_button(page: Page, dashboard: DashboardProcess) -> None:
    question = {
        "question": "Which colour?",
        "options": [{"label": "red"}, {"label": "blue", "description": "the sky's"}],
    }
    open_page(page, dashboard, "/conversation", agent="assistant", sender="web")
    send(page, "/tool ask_user " + json.dumps({"questions": [question]}))
    expect(page.locator("#ask .question")).to_have_text("Which colour?")
    page.get_by_role("button", name="blue").click()
    expect(page.locator("#ask")).to_be_hidden()
    answered = page.locator("#history details.entry.tool")
    expect(answered).to_contain_text("blue")


def test_an_ask_of_several_questions_waits_for_every_answer(
    page: Page, dashboard: DashboardProcess
) -> None:
    colour = {"question": "Which colour?", "options": [{"label": "red"}, {"label": "blue"}]}
    sizes = {
        "question": "Which sizes?",
        "header": "Size",
        "multi_select": True,
        "options": [{"label": "big"}, {"label": "medium"}, {"label": "small"}],
    }
    note = {"question": "Anything else?", "options": []}
    open_page(page, dashboard, "/conversation", agent="assistant", sender="web")
    send(page, "/tool ask_user " + json.dumps({"questions": [colour, sizes, note]}))
    expect(page.locator("#ask .question")).to_have_text(
        ["Which colour?", "Size: Which sizes?", "Anything else?"]
    )
    send_answers = page.locator("#ask button.send")
    page.get_by_role("button", name="blue").click()
    page.get_by_role("button", name="red").click()  # changed its mind: one colour
    # A question choosing several: each option toggles.
    for label in ("small", "big", "medium", "medium"):
        page.get_by_role("button", name=label).click()
    expect(page.locator("#ask")).to_be_visible()
    expect(send_answers).to_be_disabled()  # the last question has no answer yet
    page.locator("#ask input").nth(2).fill("soon")
    send_answers.click()
    expect(page.locator("#ask")).to_be_hidden()
    answered = page.locator("#history details.entry.tool pre")
    expect(answered.last).to_have_text(
        "Which colour?: red\nWhich sizes?: big, small\nAnything else?: soon"
    )


def test_a_request_without_the_token_is_refused(page: Page, dashboard: DashboardProcess) -> None:
    response = page.goto(f"{dashboard.url}/conversation?agent=assistant&sender=web")
    assert response is not None and response.status == 401
    expect(page.locator("body")).to_have_text(UNAUTHORIZED)


def test_screenshots_of_each_view(
    page: Page, daemon: Any, dashboard: DashboardProcess, output_path: str
) -> None:
    async def fill(client: Any) -> None:
        await talk(client, "ana", "/title Planning the garden", "which plants like shade?")
        await talk(client, "ana", "ferns and hostas, I would say", guest="helper")
        await talk(client, "bob", "/title Fixing the roof", "how many tiles are missing")
        await talk(client, "cid", "/title Weekly report", "summarise the week")

    on_daemon(daemon, fill)
    page.set_viewport_size({"width": 1200, "height": 760})
    shots = Path(output_path)
    shots.mkdir(parents=True, exist_ok=True)

    def shoot(name: str) -> None:
        page.screenshot(path=str(shots / f"dashboard-{name}.png"))

    open_page(page, dashboard)
    expect(page.locator("#conversations")).to_contain_text("Weekly report")
    shoot("conversations")
    page.goto(f"{dashboard.url}/agents")
    shoot("agents")
    # The feed, with runs going, started from other tabs.
    page.goto(f"{dashboard.url}/feed")
    others = []
    for sender in ("ana", "bob"):
        other = page.context.new_page()
        other.goto(f"{dashboard.url}/conversation?agent=assistant&sender={sender}")
        send(other, "/slow 40 100")
        others.append(other)
    expect(page.locator("#feed tbody tr")).to_have_count(2)
    expect(page.locator("#feed tbody tr").first).to_contain_text("1 2 3")
    shoot("feed")
    for other in others:
        other.click("#kill button")
        other.close()
    page.goto(f"{dashboard.url}/stats")
    expect(page.locator('[data-stat="runs_total"]')).not_to_have_text("0")
    shoot("stats")
    # A conversation with a question waiting for its answer.
    page.goto(f"{dashboard.url}/conversation?agent=assistant&sender=cid")
    question = {"question": "Include the costs?", "options": [{"label": "yes"}, {"label": "no"}]}
    send(page, "/tool ask_user " + json.dumps({"questions": [question]}))
    expect(page.locator("#ask .question")).to_be_visible()
    page.evaluate("window.scrollTo(0, 0)")
    shoot("conversation")

    kept(shots, SHOWN)


def kept(shots: Path, names: tuple[str, ...]) -> None:
    """Each of ``names`` was taken; with CHINWAG_UPDATE_SCREENSHOTS=1 it replaces the
    README's copy, which is there in any case, and a PNG."""
    for name in names:
        taken = (shots / f"dashboard-{name}.png").read_bytes()
        assert taken.startswith(PNG) and len(taken) > 10_000, name
        if os.environ.get("CHINWAG_UPDATE_SCREENSHOTS") == "1":
            shutil.copy(shots / f"dashboard-{name}.png", DOCS / f"dashboard-{name}.png")
        assert (DOCS / f"dashboard-{name}.png").read_bytes().startswith(PNG), name


async def seed_mail(client: Any) -> None:
    """A release being cut: maya and devin online (this connection), priya gone for
    the day; a direct thread, #release with its mail, locks; maya has read some of it."""
    await client.register("maya", kind="person", roles=["release", "review"])
    await client.heartbeat("maya", status="cutting 2.4.0")
    await client.register("devin", kind="session", roles=["backend"])
    await client.heartbeat("devin", status="fixing the login redirect")
    notes = await client.post("priya", "Can you review the release notes before 17:00?", to="maya")
    await client.post("maya", "On it, after the freeze.", reply_to=notes.msg_id)
    await client.post("priya", "Added the migration steps at the end.", reply_to=notes.msg_id)
    await client.space_create("maya", "release", description="Shipping 2.4.0")
    for member in ("devin", "priya"):
        await client.space_join(member, "release")
    await client.post("maya", "Code freeze at 17:00 UTC today.", to="#release")
    changelog = await client.post("priya", "Changelog drafted in docs/CHANGELOG.md", to="#release")
    await client.post("devin", "The login redirect fix is in review: PR 412", to="#release")
    await client.post("devin", "Can I still merge the cache fix?", to="maya", priority=2)
    await client.post("assistant", "Nightly build: all 1,284 tests passed.", to="maya")
    await client.mark_read("maya", msg_ids=[notes.msg_id, changelog.msg_id])
    await client.lock("devin", "src/app.py")
    await client.lock("maya", "docs/CHANGELOG.md", mode="advisory")


def test_screenshots_of_the_mail_views(
    page: Page, daemon: Any, dashboard: DashboardProcess, output_path: str
) -> None:
    on_daemon(daemon, lambda client: client.register("priya", kind="person", roles=["docs"]))
    page.set_viewport_size({"width": 1200, "height": 760})
    shots = Path(output_path)
    shots.mkdir(parents=True, exist_ok=True)

    def shoot(name: str) -> None:
        page.screenshot(path=str(shots / f"dashboard-{name}.png"))

    with held_client(daemon) as (portal, client):
        portal.call(seed_mail, client)
        open_page(page, dashboard, "/mail")
        expect(page.locator('#participants tr[data-name="maya"] .presence')).to_have_text("online")
        expect(page.locator('#participants tr[data-name="priya"] .presence')).to_have_text(
            "offline"
        )
        shoot("participants")
        page.goto(f"{dashboard.url}/mail/inbox?as=maya")
        expect(page.locator("#inbox tr[data-msg]")).to_have_count(6)
        expect(page.locator("#inbox .state")).to_contain_text(["delivered", "read"])
        shoot("inbox")
        page.goto(f"{dashboard.url}/mail/space?name=release")
        expect(page.locator("#members li")).to_have_count(3)
        expect(page.locator("#space-mail")).to_contain_text("Code freeze at 17:00 UTC")
        shoot("space")
        page.goto(f"{dashboard.url}/mail/locks")
        expect(page.locator("#locks")).to_contain_text("src/app.py")
        shoot("locks")
    kept(shots, SHOWN_MAIL)
