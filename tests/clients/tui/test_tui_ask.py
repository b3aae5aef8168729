"""`chinwag tui`'s questions under Textual's Pilot, against a real daemon on the echo
model (the harness is tests/clients/test_tui.py's)."""

from __future__ import annotations

from typing import Any

from chinwag.clients.tui._dialogs import AskDialog
from test_cli import fresh_sender
from test_tui import Driver, drive
from textual.widgets import Input


def test_a_question_closed_unanswered_opens_again(daemon: Any) -> None:
    sender = fresh_sender()

    async def body(ui: Driver) -> None:
        await ui.until("a new conversation", lambda: "a new conversation" in ui.transcript())
        await ui.send("/ask Which day?")
        await ui.until("the question", lambda: isinstance(ui.app.screen, AskDialog))
        await ui.pilot.press("escape")  # closed, to read the conversation first
        await ui.until("the dialog closed", lambda: not isinstance(ui.app.screen, AskDialog))
        assert any("Ctrl-R" in n.message for n in ui.app._notifications)
        await ui.pilot.press("ctrl+r")
        await ui.until("the question again", lambda: isinstance(ui.app.screen, AskDialog))
        field = ui.app.screen.query_one("#text-0", Input)
        field.value = "Monday"
        await ui.pilot.press("enter")
        await ui.until("the answer echoed", lambda: ui.transcript().endswith("assistant\nMonday"))
        # Answered: nothing waits any more.
        await ui.pilot.press("ctrl+r")
        assert not isinstance(ui.app.screen, AskDialog)
        await ui.until(
            "no question waiting",
            lambda: any("No question" in n.message for n in ui.app._notifications),
        )

    drive(daemon.socket_path, body, agent="assistant", sender=sender)
