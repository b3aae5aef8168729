"""`chinwag tui`'s inbox and thread kept as the mail is now, under Textual's Pilot,
against a real daemon (the harness is tests/clients/test_tui.py's): its author edits,
reacts to, pins and deletes a message through another client, and the TUI shows each
change from its watch's `mail_update`s, with no reload."""

from __future__ import annotations

from typing import Any

from chinwag.clients import connect
from chinwag.clients.tui._dialogs import MailEntry, ThreadScreen
from test_cli import fresh_sender
from test_tui import Driver, drive
from textual.widgets import Markdown


def test_the_inbox_shows_a_message_as_its_author_changes_it(daemon: Any) -> None:
    reader = fresh_sender()

    async def body(ui: Driver) -> None:
        def shown() -> list[tuple[str, ...]]:
            return ui.rows("inbox", "from", "message")

        async with connect(daemon.socket_path) as bob:
            posted = await bob.post("bob", "Lunch at noon?", to=reader)
            await ui.until("the message", lambda: shown() == [("bob", "Lunch at noon?")])
            # A change to mail the reader wrote is pushed to it too, and comes before the
            # edit below: the inbox, which does not show that message, ignores it.
            own = await bob.post(reader, "See you there", to="bob")
            await bob.edit(reader, own.msg_id, "See you there at noon")

            await bob.edit("bob", posted.msg_id, "Lunch at one?")
            await ui.until(
                "the new text, edited", lambda: shown() == [("bob", "Lunch at one?  (edited)")]
            )
            await bob.react("bob", posted.msg_id, "👍")
            await ui.until(
                "the reaction", lambda: shown() == [("bob", "Lunch at one?  (edited)  👍 1")]
            )
            await bob.pin("bob", posted.msg_id)
            await ui.until(
                "the pin",
                lambda: shown() == [("bob", "Lunch at one?  (edited)  👍 1  pinned by bob")],
            )
            await bob.delete_message("bob", posted.msg_id, reason="wrong day")
            await ui.until(
                "the message deleted, its text gone",
                lambda: shown() == [("bob", "(deleted)  👍 1  pinned by bob")],
            )
            # Still unread: a change is no reading.
            assert ui.app.inbox.border_title == f"Inbox · {reader} · 1 unread"

    drive(daemon.socket_path, body, reader=reader)


def test_an_open_thread_shows_its_messages_as_their_author_changes_them(daemon: Any) -> None:
    reader = fresh_sender()

    async def body(ui: Driver) -> None:
        async with connect(daemon.socket_path) as bob:
            first = await bob.post("bob", "Lunch at noon?", to=reader)
            second = await bob.post("bob", "Or at one?", to=reader, reply_to=first.msg_id)
            await ui.until("the thread's mail", lambda: len(ui.rows("inbox")) == 2)
            await ui.pilot.press("ctrl+t", "enter")
            await ui.until("the thread", lambda: isinstance(ui.app.screen, ThreadScreen))

            def entries() -> list[tuple[str, ...]]:
                """Each message's text and marks, as far as they are mounted."""
                return [
                    (
                        *(body.source for body in entry.query(Markdown)),
                        *(str(marks.content) for marks in entry.query(".mail-marks")),
                    )
                    for entry in ui.app.screen.query(MailEntry)
                ]

            await ui.until(
                "the thread's messages",
                lambda: entries() == [("Lunch at noon?",), ("Or at one?",)],
            )
            await bob.edit("bob", first.msg_id, "Lunch at half past twelve?")
            await ui.until(
                "the new text, edited",
                lambda: entries() == [("Lunch at half past twelve?", "(edited)"), ("Or at one?",)],
            )
            await bob.react("bob", second.msg_id, "🎉")
            await ui.until(
                "the reaction",
                lambda: (
                    entries()
                    == [("Lunch at half past twelve?", "(edited)"), ("Or at one?", "🎉 1")]
                ),
            )
            await bob.pin("bob", second.msg_id)
            await ui.until(
                "the pin",
                lambda: (
                    entries()
                    == [
                        ("Lunch at half past twelve?", "(edited)"),
                        ("Or at one?", "🎉 1  pinned by bob"),
                    ]
                ),
            )
            await bob.delete_message("bob", first.msg_id)
            await ui.until(
                "the message deleted, its text gone",
                lambda: entries() == [("(deleted)",), ("Or at one?", "🎉 1  pinned by bob")],
            )
            assert [e.has_class("deleted") for e in ui.app.screen.query(MailEntry)] == [
                True,
                False,
            ]

    drive(daemon.socket_path, body, reader=reader)
