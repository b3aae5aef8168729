"""`chinwag tui` headless under Textual's Pilot, against a real daemon on the echo model.

Each test drives the app as a person would (typing, keys, clicks) and reads its
widgets. A wait for what the daemon makes happen is woken by every message the
app handles (``run_test``'s message hook): no sleeping, and a deadline that
names what never came.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import cairosvg
from chinwag.clients import connect
from chinwag.clients.tui import ChinwagTui
from chinwag.clients.tui._conversation import RunView
from chinwag.clients.tui._dialogs import AskDialog, ThreadScreen
from test_cli import fresh_sender
from textual.pilot import Pilot
from textual.widgets import Button, DataTable, Input, Markdown

DOCS = Path(__file__).parents[2] / "docs" / "screenshots"
WAIT_S = 20.0
BODY_S = 50.0


class Driver:
    """The app under a pilot, and waits for what it shows."""

    def __init__(self, app: ChinwagTui, pilot: Pilot[None], changed: Callable[[], anyio.Event]):
        self.app = app
        self.pilot = pilot
        self._changed = changed

    async def until(self, what: str, seen: Callable[[], bool]) -> None:
        """Return once ``seen()``, re-checked after each message the app handles."""
        with anyio.move_on_after(WAIT_S):
            while not seen():
                await self._changed().wait()
            return
        raise AssertionError(
            f"the app never showed {what}:\n{self.transcript()}\n"
            f"conversations: {self.rows('conversations')}\ninbox: {self.rows('inbox')}\n"
            f"banner: {self.app.gone.display} {self.app.gone.render()}\n"
            f"notices: {[n.message for n in self.app._notifications]}"
        )

    async def send(self, text: str) -> None:
        """Type ``text`` in the message line and press Enter."""
        field = self.app.query_one("#message", Input)
        field.focus()
        field.value = text
        await self.pilot.press("enter")

    def transcript(self) -> str:
        """The open conversation as text: labels, notes, Markdown sources, tool titles."""
        parts: list[str] = []
        for widget in self.app.query(
            "#log .speaker, #log .note, #log Markdown, #log CollapsibleTitle"
        ):
            parts.append(widget.source if isinstance(widget, Markdown) else str(widget.render()))
        return "\n".join(parts)

    def live_text(self) -> str:
        """The Markdown the runs in flight have streamed so far."""
        return "\n".join(
            markdown.source
            for run in self.app.query(RunView)
            for markdown in run.query(Markdown)
            if not markdown.has_class("prompt")
        )

    def rows(self, table_id: str, *columns: str) -> list[tuple[str, ...]]:
        """The table's rows, top down: the cells of ``columns`` (by key), else all."""
        table = self.app.query_one(f"#{table_id}", DataTable)
        keys = columns or tuple(column.value for column in table.columns)
        return [tuple(str(table.get_cell(row.key, k)) for k in keys) for row in table.ordered_rows]


def drive(
    socket: Path,
    body: Callable[[Driver], Awaitable[None]],
    size: tuple[int, int] = (160, 50),
    **options: Any,
) -> None:
    """Run ``body`` against a `ChinwagTui` on ``socket`` (asyncio, as Textual runs)."""

    async def main() -> None:
        changed = anyio.Event()

        def hook(message: object) -> None:
            nonlocal changed
            changed.set()
            changed = anyio.Event()

        app = ChinwagTui(socket, retry_s=0.2, **options)
        with anyio.fail_after(BODY_S):
            async with app.run_test(size=size, message_hook=hook) as pilot:
                await body(Driver(app, pilot, lambda: changed))

    anyio.run(main, backend="asyncio")


def test_the_list_shows_conversations_and_their_titles_live(daemon) -> None:
    first, second = fresh_sender(), fresh_sender()

    async def body(ui: Driver) -> None:
        async with connect(daemon.socket_path) as client:
            async with client.stream("assistant", "/title Plans for May", sender=first) as ev:
                await ev.collect()
            await ui.until(
                "the first conversation and its title",
                lambda: (
                    ("assistant", first, "Plans for May")
                    in ui.rows("conversations", "agent", "sender", "title")
                ),
            )
            # Set while the app runs: the subscription has it listed again.
            async with client.stream("assistant", "/title Budget", sender=second) as ev:
                await ev.collect()
            await ui.until(
                "the second conversation, listed first",
                lambda: (
                    ui.rows("conversations", "agent", "sender", "title")[0]
                    == ("assistant", second, "Budget")
                ),
            )
        # Opened from the list: the view and the heading follow.
        await ui.pilot.press("ctrl+l")
        ui.app.conversations.move_cursor(row=ui.rows("conversations", "sender").index((first,)))
        await ui.pilot.press("enter")
        await ui.until(
            "the first conversation open", lambda: "/title Plans for May" in ui.transcript()
        )
        assert ui.app.sub_title == f"assistant/{first} — Plans for May"

    drive(daemon.socket_path, body)


def test_a_message_sent_streams_into_the_view_live(daemon) -> None:
    sender = fresh_sender()

    async def body(ui: Driver) -> None:
        await ui.until("a new conversation", lambda: "a new conversation" in ui.transcript())
        await ui.send("/slow 8 150")
        # Some words shown while the run is still writing the rest: streamed, not at the end.
        await ui.until("the first words, live", lambda: "1 2" in ui.live_text())
        assert "8" not in ui.live_text()
        assert ui.app.query_one("#message", Input).value == ""
        # Once it ends, the view reads as the history: the prompt and the whole answer.
        await ui.until("the run's end", lambda: not ui.app.query(RunView))
        assert ui.transcript().endswith(f"{sender}\n/slow 8 150\nassistant\n1 2 3 4 5 6 7 8")

    drive(daemon.socket_path, body, agent="assistant", sender=sender)


def test_kill_stops_a_slow_run(daemon) -> None:
    sender = fresh_sender()

    async def body(ui: Driver) -> None:
        await ui.until("a new conversation", lambda: "a new conversation" in ui.transcript())
        await ui.send("/slow 200 100")
        await ui.until("the run writing", lambda: "1 2" in ui.live_text())
        await ui.pilot.press("escape")
        await ui.until("the kill", lambda: "the run was killed" in ui.transcript())
        assert not ui.app.query(RunView)
        async with connect(daemon.socket_path) as client:
            entries = (await client.history("assistant", sender)).entries
        assert [e.role for e in entries] == ["user"]  # the step in progress is dropped

    drive(daemon.socket_path, body, agent="assistant", sender=sender)


def test_an_ask_opens_a_dialog_and_a_button_answers_it(daemon) -> None:
    sender = fresh_sender()
    question = {"question": "Colour?", "options": [{"label": "teal"}, {"label": "red"}]}
    asking = "/tool ask_user " + json.dumps({"questions": [question]})

    async def body(ui: Driver) -> None:
        await ui.until("a new conversation", lambda: "a new conversation" in ui.transcript())
        await ui.send(asking)
        await ui.until("the question", lambda: isinstance(ui.app.screen, AskDialog))
        dialog = ui.app.screen  # its buttons are built after it shows
        await ui.until(
            "the options",
            lambda: [str(b.label) for b in dialog.query(Button)] == ["teal", "red"],
        )
        await ui.pilot.click("#option-0-0")
        await ui.until("the answer echoed", lambda: ui.transcript().endswith("assistant\nteal"))
        assert not isinstance(ui.app.screen, AskDialog)

    drive(daemon.socket_path, body, agent="assistant", sender=sender)


def test_an_ask_answered_elsewhere_closes_its_dialog(daemon) -> None:
    sender = fresh_sender()

    async def body(ui: Driver) -> None:
        await ui.until("a new conversation", lambda: "a new conversation" in ui.transcript())
        await ui.send("/ask Which day?")
        await ui.until("the question", lambda: isinstance(ui.app.screen, AskDialog))
        dialog = ui.app.screen
        await ui.until(
            "a free text box", lambda: any(isinstance(w, Input) for w in dialog.query("#text-0"))
        )
        async with connect(daemon.socket_path) as client:
            await client.reply_to_ask("assistant", "Monday", sender=sender)
        await ui.until("the dialog closed", lambda: not isinstance(ui.app.screen, AskDialog))
        await ui.until("the answer echoed", lambda: ui.transcript().endswith("assistant\nMonday"))

    drive(daemon.socket_path, body, agent="assistant", sender=sender)


def test_text_with_markup_in_it_shows_as_written(daemon: Any) -> None:
    """A title, a tool call, mail and an ask's options are the model's or a person's
    text: Textual's markup in them is shown, not parsed (a stray `[/x]` ended the app)."""
    sender = fresh_sender()
    reader = fresh_sender()
    question = {
        "question": "Which [b]one[/b]?",
        "options": [{"label": "[/o] first", "description": "[/d] the [@click=app.quit]first[/]"}],
    }

    async def body(ui: Driver) -> None:
        async with connect(daemon.socket_path) as client:
            async with client.stream("assistant", "/title [/t] Plans", sender=sender) as events:
                await events.collect()
            await client.post("bob", "[/m] lunch [@click=app.quit]now[/]?", to=reader)
            await ui.until(
                "the title as written",
                lambda: ("[/t] Plans",) in ui.rows("conversations", "title"),
            )
            await ui.until(
                "the mail as written",
                lambda: ui.rows("inbox", "message") == [("[/m] lunch [@click=app.quit]now[/]?",)],
            )
            # The transcript is read again when the run ends, after the list has its title.
            await ui.until(
                "the tool call as written",
                lambda: 'set_title({"title": "[/t] Plans"})' in ui.transcript(),
            )
            await ui.send("/tool ask_user " + json.dumps({"questions": [question]}))
            await ui.until("the question", lambda: isinstance(ui.app.screen, AskDialog))
            option = ui.app.screen.query_one("#option-0-0", Button)
            assert str(option.label) == "[/o] first"
            await ui.pilot.click("#option-0-0")
            await ui.until("the answer echoed", lambda: ui.transcript().endswith("[/o] first"))

    drive(daemon.socket_path, body, agent="assistant", sender=sender, reader=reader)


def test_compact_with_instructions(daemon) -> None:
    sender = fresh_sender()

    async def body(ui: Driver) -> None:
        async with connect(daemon.socket_path) as client:
            for text in ("apples and pears", "plums and figs"):
                async with client.stream("assistant", text, sender=sender) as events:
                    await events.collect()
        await ui.until("the history", lambda: "plums and figs" in ui.transcript())
        await ui.pilot.press("ctrl+o")
        await ui.until("the compact dialog", lambda: ui.app.screen.query("#instructions"))
        await ui.pilot.press(*"keep fruit", "enter")
        # Archived: the history shown starts at the marker.
        await ui.until(
            "the compact marker alone", lambda: ui.transcript().startswith("▶ ── compacted into")
        )
        assert len(ui.transcript().splitlines()) == 1, ui.transcript()

    drive(daemon.socket_path, body, agent="assistant", sender=sender)


def test_the_inbox_shows_new_mail_and_marks_it_read_on_open(daemon) -> None:
    reader = fresh_sender()

    async def body(ui: Driver) -> None:
        await ui.until("the empty inbox", lambda: ui.app.inbox.border_title == f"Inbox · {reader}")
        async with connect(daemon.socket_path) as client:
            await client.post("bob", "Lunch at **noon**?", to=reader)
            await ui.until(
                "the message, unread",
                lambda: (
                    ui.rows("inbox", "unread", "from", "message")
                    == [("●", "bob", "Lunch at **noon**?")]
                ),
            )
            assert ui.app.inbox.border_title == f"Inbox · {reader} · 1 unread"
            await ui.pilot.press("ctrl+t", "enter")
            await ui.until("the thread", lambda: isinstance(ui.app.screen, ThreadScreen))
            # Each message of the thread composes its body once the screen is up.
            await ui.until(
                "the message's body",
                lambda: [m.source for m in ui.app.screen.query(Markdown)] == ["Lunch at **noon**?"],
            )
            await ui.until("the message read", lambda: ui.rows("inbox", "unread") == [("",)])
            assert ui.app.inbox.border_title == f"Inbox · {reader}"
            page = await client.inbox(reader)
            assert [item.state for item in page.items] == ["read"]

    drive(daemon.socket_path, body, reader=reader)


def test_a_daemon_restart_shows_a_banner_then_everything_again(daemon) -> None:
    sender = fresh_sender()

    async def body(ui: Driver) -> None:
        async with (
            connect(daemon.socket_path) as client,
            client.stream("assistant", "before the restart", sender=sender) as events,
        ):
            await events.collect()
        await ui.until("the history", lambda: "before the restart" in ui.transcript())
        await anyio.to_thread.run_sync(daemon.stop)
        await ui.until("the banner", lambda: ui.app.gone.display)
        assert "Lost the daemon at" in str(ui.app.gone.render())
        await anyio.to_thread.run_sync(daemon.start)
        await ui.until("the banner gone", lambda: not ui.app.gone.display)
        await ui.until("the history again", lambda: "before the restart" in ui.transcript())
        await ui.send("after the restart")
        await ui.until("the new run", lambda: ui.transcript().endswith("after the restart"))

    drive(daemon.socket_path, body, agent="assistant", sender=sender)


def test_a_screenshot_of_the_app(daemon, tmp_path: Path) -> None:
    """A conversation, the list and an inbox, saved as the PNG the README shows (replacing
    docs/screenshots/tui.png with CHINWAG_UPDATE_SCREENSHOTS=1)."""
    plan = "Steps for the **release**:\n\n1. tag `v0.2`\n2. publish the *notes*\n3. tell ana"
    reply = "Steps for the **release**: 1. tag `v0.2` 2. publish the *notes* 3. tell ana"

    async def conversations_and_mail() -> None:
        async with connect(daemon.socket_path) as client:
            for agent, sender, text in (
                ("helper", "agent:assistant", "what changed since v0.1?"),
                ("assistant", "tg:40211", "/title Groceries for the week"),
                ("assistant", "ana", "/title Release checklist"),
                ("assistant", "ana", plan),
            ):
                async with client.stream(agent, text, sender=sender) as events:
                    await events.collect()
            await client.post("bob", "Lunch on Friday?", to="user")
            await client.post("ana", "Can you review the **release notes**?", to="user")

    async def body(ui: Driver) -> None:
        await ui.until("the reply", lambda: ui.transcript().endswith(reply))
        await ui.until("the mail", lambda: len(ui.rows("inbox")) == 2)
        await ui.until("the list", lambda: len(ui.rows("conversations")) == 3)
        await ui.until("the title", lambda: ui.app.sub_title.endswith("Release checklist"))
        await ui.pilot.pause()  # the last change drawn
        ui.app.save_screenshot(path=str(tmp_path), filename="tui.svg")

    anyio.run(conversations_and_mail)
    drive(daemon.socket_path, body, agent="assistant", sender="ana", size=(120, 34))
    # The SVG names Textual's web font, not installed here: a monospace font that is.
    svg = (tmp_path / "tui.svg").read_text().replace("Fira Code", "DejaVu Sans Mono")
    png = tmp_path / "tui.png"
    cairosvg.svg2png(bytestring=svg.encode(), write_to=str(png))
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    if os.environ.get("CHINWAG_UPDATE_SCREENSHOTS") == "1":
        shutil.copyfile(png, DOCS / "tui.png")
