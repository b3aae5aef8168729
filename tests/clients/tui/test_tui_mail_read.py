"""`chinwag tui`'s inbox keeps its unread marks as the reader's mail is read elsewhere (the
CLI, the dashboard, an MCP client), from its watch's `mail_read`s, with no reload. The
harness is tests/clients/test_tui.py's, against a real daemon."""

from __future__ import annotations

from typing import Any

from chinwag.clients import connect
from chinwag.storage import msg_id_of, number_of
from test_cli import fresh_sender
from test_tui import Driver, drive


def test_the_inbox_shows_mail_read_through_another_client_as_read(daemon: Any) -> None:
    reader = fresh_sender()

    async def body(ui: Driver) -> None:
        def shown() -> list[tuple[str, ...]]:
            return ui.rows("inbox", "unread", "message")

        async with connect(daemon.socket_path) as elsewhere:
            first = await elsewhere.post("bob", "Lunch at noon?", to=reader)
            await elsewhere.post("bob", "Or at one?", to=reader)
            await ui.until(
                "both unread",
                lambda: shown() == [("●", "Or at one?"), ("●", "Lunch at noon?")],
            )
            assert ui.app.inbox.border_title == f"Inbox · {reader} · 2 unread"
            await elsewhere.mark_read(reader, msg_ids=[first.msg_id])
            await ui.until(
                "the first read", lambda: shown() == [("●", "Or at one?"), ("", "Lunch at noon?")]
            )
            assert ui.app.inbox.border_title == f"Inbox · {reader} · 1 unread"

    drive(daemon.socket_path, body, reader=reader)


def test_mail_read_before_it_came_comes_read(daemon: Any) -> None:
    """On a store daemons share, a message's read can come before the message (held back
    while a lower msg_id is not stored): it then comes read."""
    reader = fresh_sender()

    async def body(ui: Driver) -> None:
        async with connect(daemon.socket_path) as elsewhere:
            await elsewhere.post("bob", "first", to=reader)
            await ui.until("the first", lambda: ui.rows("inbox", "message") == [("first",)])
            held = msg_id_of((number_of(ui.app.inbox.items[0].message.msg_id) or 0) + 1)
            ui.app.inbox.read({held})  # its read, as the watch gives it, before it
            await elsewhere.post("bob", "second", to=reader)
            await ui.until(
                "the second, read",
                lambda: ui.rows("inbox", "unread", "message") == [("", "second"), ("●", "first")],
            )
            assert ui.app.inbox.items[0].message.msg_id == held

    drive(daemon.socket_path, body, reader=reader)
