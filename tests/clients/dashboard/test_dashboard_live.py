"""A real `chinwag dashboard` process on a real daemon: its actions, and its event stream
carrying the runs and the daemon's comings and goings."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
from dashboard_harness import (
    EVENT_S,
    DashboardProcess,
    EventStream,
    begin_slow_run,
    logged_in,
    on_daemon,
)


@contextmanager
def session(dashboard: DashboardProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=dashboard.url, timeout=EVENT_S) as client:
        client.headers["X-CSRF-Token"] = logged_in(client)
        yield client


@contextmanager
def events(client: httpx.Client, **query: str) -> Iterator[EventStream]:
    """The event stream, once it has said the daemon is up."""
    with client.stream("GET", "/events", params=query) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        stream = EventStream(response)
        stream.until(lambda kind, data: kind == "daemon" and json.loads(data)["up"], "daemon up")
        yield stream


def run_event(kind: str, data: str) -> dict[str, Any]:
    return json.loads(data)["event"] if kind == "run" else {}


def ended(kind: str, data: str) -> bool:
    return run_event(kind, data).get("type") == "end"


def test_a_message_sent_streams_back_and_is_stored(dashboard: DashboardProcess) -> None:
    address = {"agent": "assistant", "sender": "ana"}
    with session(dashboard) as client, events(client, **address) as stream:
        sent = client.post("/conversation/send", json={**address, "content": "hello out there"})
        assert sent.json() == {"accepted": True}
        seen = stream.until(ended, "the run's end")
        text = "".join(run_event(*event).get("delta", "") for event in seen)
        assert text == "hello out there"
        assert run_event(*seen[-1])["status"] == "done"
        history = client.get("/conversation", params=address).text
        assert '<div class="text markdown"><p>hello out there</p>\n</div>' in history


def test_kill_stops_a_slow_run(dashboard: DashboardProcess) -> None:
    address = {"agent": "assistant", "sender": "ana"}
    with session(dashboard) as client, events(client, **address) as stream:
        client.post("/conversation/send", json={**address, "content": "/slow 100 200"})
        stream.until(lambda kind, data: run_event(kind, data).get("delta") == "1", "the first word")
        killed = client.post("/conversation/kill", json=address).json()
        assert killed["run_id"]
        end = run_event(*stream.until(ended, "the killed run's end")[-1])
        assert end["status"] == "killed"


def test_an_ask_is_answered(dashboard: DashboardProcess) -> None:
    address = {"agent": "assistant", "sender": "ana"}
    question = {"questions": [{"question": "Which?", "options": [{"label": "red"}]}]}
    with session(dashboard) as client, events(client, **address) as stream:
        client.post(
            "/conversation/send",
            json={**address, "content": f"/tool ask_user {json.dumps(question)}"},
        )
        asked = run_event(
            *stream.until(lambda k, d: run_event(k, d).get("type") == "ask_user", "the ask")[-1]
        )
        assert asked["questions"][0]["options"] == [{"label": "red", "description": ""}]
        answer = {**address, "content": "red", "ask_id": asked["ask_id"]}
        assert client.post("/conversation/reply", json=answer).json() == {"answered": True}
        seen = stream.until(ended, "the answered run's end")
        results = [run_event(*event) for event in seen]
        assert any(e.get("type") == "tool_result" and "red" in e["output"] for e in results)
        assert run_event(*seen[-1])["status"] == "done"


def test_compact_with_instructions_and_a_refusal(dashboard: DashboardProcess) -> None:
    address = {"agent": "assistant", "sender": "ana"}
    with session(dashboard) as client, events(client, **address) as stream:
        client.post("/conversation/send", json={**address, "content": "something to keep"})
        stream.until(ended, "the run's end")
        done = client.post("/conversation/compact", json={**address, "instructions": "be brief"})
        assert done.status_code == 200
        assert done.json()["archived_entries"] == 2
        unknown = client.post(
            "/conversation/send", json={**address, "agent": "nobody", "content": "x"}
        )
        assert unknown.status_code == 404
        assert "nobody" in unknown.json()["error"]
        empty = client.post("/conversation/send", json=address)
        assert (empty.status_code, empty.json()["error"]) == (400, "This action needs content.")


def test_the_daemon_going_and_coming_back(daemon: Any, dashboard: DashboardProcess) -> None:
    address = {"agent": "assistant", "sender": "ana"}
    with session(dashboard) as client, events(client, **address) as stream:
        daemon.stop()
        down = stream.until(
            lambda kind, data: kind == "daemon" and not json.loads(data)["up"], "daemon away"
        )
        assert "unreachable" in json.loads(down[-1][1])["reason"]
        away = client.get("/conversation", params=address)
        assert away.status_code == 503
        assert '<div id="banner" role="alert">The daemon is unreachable' in away.text
        daemon.start()
        stream.until(lambda kind, data: kind == "daemon" and json.loads(data)["up"], "daemon up")
        # The same page and the same stream work again.
        sent = client.post("/conversation/send", json={**address, "content": "back again"})
        assert sent.status_code == 200
        seen = stream.until(ended, "the run's end after the restart")
        assert "".join(run_event(*e).get("delta", "") for e in seen) == "back again"
        page = client.get("/conversation", params=address)
        assert page.status_code == 200
        assert '<div id="banner" role="alert" hidden>' in page.text


def test_a_page_opened_mid_run_is_shown_the_run_from_its_start(dashboard: DashboardProcess) -> None:
    address = {"agent": "assistant", "sender": "ana"}
    with session(dashboard) as client, events(client, **address) as first:
        client.post("/conversation/send", json={**address, "content": "/slow 4 150"})
        first.until(lambda kind, data: run_event(kind, data).get("delta") == " 2", "two words")
        with events(client, **address) as second:
            seen = second.until(ended, "the run's end, on the page opened late")
        kinds = [run_event(*event).get("type") for event in seen]
        assert kinds[0] == "start"
        assert "".join(run_event(*e).get("delta", "") for e in seen) == "1 2 3 4"


def test_a_run_begun_before_the_dashboard_connected_streams_from_its_start_once(
    daemon: Any, dashboard_factory: Callable[..., DashboardProcess]
) -> None:
    # Begun, and written some words, before the dashboard's link subscribed: the
    # subscription brings only the rest, the page's `attach` the run from its start.
    on_daemon(daemon, lambda client: begin_slow_run(client, "ana", 40, 150))
    dashboard = dashboard_factory(daemon.socket_path)
    address = {"agent": "assistant", "sender": "ana"}
    with session(dashboard) as client, events(client, **address) as stream:
        seen = [run_event(*event) for event in stream.until(ended, "the run's end")]
    assert seen[0]["type"] == "start"
    # Each word once, though the subscription brought the same run's later ones too.
    words = "".join(event.get("delta", "") for event in seen)
    assert words == " ".join(str(word) for word in range(1, 41))
    assert [event["type"] for event in seen].count("end") == 1
    assert seen[-1]["status"] == "done"
