"""The side panes: the conversations, and the participant's inbox.

Their cells are rich ``Text``, not strings, which a ``DataTable`` would parse as markup:
a title or a message is someone's text, shown as written (a stray ``[/x]`` in one
raised ``MarkupError`` and ended the app)."""

from __future__ import annotations

from datetime import datetime

import msgspec
from chinwag.protocol import ConversationItem, MailItem, MailMessage
from rich.text import Text
from textual.message import Message
from textual.widgets import DataTable

from .._mail_text import gist, since_written

#: How many conversations the list shows: the most recently active.
CONVERSATIONS_SHOWN = 200
#: How many messages the inbox shows: the newest.
INBOX_SHOWN = 100
#: How much of a message's text its row shows.
GIST_WIDTH = 60


def _when(moment: datetime | None, now: datetime) -> str:
    """Today's times as 14:05, older ones as their day."""
    if moment is None:
        return ""
    local = moment.astimezone()
    return local.strftime("%H:%M" if local.date() == now.date() else "%Y-%m-%d")


def _key(agent: str, sender: str) -> str:
    return f"{agent}\0{sender}"


class ConversationList(DataTable[str | Text]):
    """Every conversation, most recently active first, ● while it runs; Enter opens one."""

    class Opened(Message):
        def __init__(self, agent: str, sender: str) -> None:
            super().__init__()
            self.agent = agent
            self.sender = sender

    def __init__(self) -> None:
        super().__init__(id="conversations", cursor_type="row", zebra_stripes=True)
        self.border_title = "Conversations"
        self.items: list[ConversationItem] = []

    def on_mount(self) -> None:
        self.add_column("", key="running")
        self.add_column("agent", key="agent")
        self.add_column("sender", key="sender")
        self.add_column("last", key="last")
        self.add_column("title", key="title")

    def show(self, items: list[ConversationItem], current: tuple[str, str] | None) -> None:
        """The list as the daemon gave it; the cursor stays on the row it was on."""
        self.items = items
        selected = self._selected()
        now = datetime.now().astimezone()
        self.clear()
        for item in items:
            self.add_row(
                "●" if item.running else "",
                Text(item.agent),
                Text(item.sender),
                _when(item.updated_at, now),
                Text(item.title),
                key=_key(item.agent, item.sender),
            )
        for key in (selected, _key(*current) if current else None):
            if key is not None and key in self.rows:
                self.move_cursor(row=self.get_row_index(key), scroll=False)
                break

    def _selected(self) -> str | None:
        if not self.rows or self.cursor_row < 0 or self.cursor_row >= len(self.items):
            return None
        item = self.items[self.cursor_row]
        return _key(item.agent, item.sender)

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        item = self.items[event.cursor_row]
        self.post_message(self.Opened(item.agent, item.sender))


def _row_text(message: MailMessage) -> Text:
    """Its text (a deleted one's left out), then what was done to it since, dimmed."""
    text = Text(gist(message, GIST_WIDTH), style="dim italic" if message.deleted else "")
    marks = since_written(message)
    if marks:
        text.append(f"  {marks}", style="dim")
    return text


def _read_now(item: MailItem) -> MailItem:
    return msgspec.structs.replace(item, state="read", read_at=datetime.now().astimezone())


class InboxPane(DataTable[str | Text]):
    """``reader``'s mail, newest first, unread marked ●, each message as it is now
    (edited, reacted to, pinned, deleted); Enter opens the thread."""

    class Opened(Message):
        def __init__(self, item: MailItem) -> None:
            super().__init__()
            self.item = item

    def __init__(self, reader: str) -> None:
        super().__init__(id="inbox", cursor_type="row")
        self.reader = reader
        self.items: list[MailItem] = []
        # Read before their mail came (a daemon sharing the store holds a message back
        # while a lower msg_id is not stored yet, and its read may come first).
        self._read_early: set[str] = set()
        self._title()

    def on_mount(self) -> None:
        self.add_column("", key="unread")
        self.add_column("when", key="when")
        self.add_column("from", key="from")
        self.add_column("message", key="message")

    @property
    def unread(self) -> int:
        return sum(1 for item in self.items if item.state != "read")

    def _title(self) -> None:
        unread = self.unread
        self.border_title = f"Inbox · {self.reader}" + (f" · {unread} unread" if unread else "")

    def show(self, items: list[MailItem]) -> None:
        self.items = items[:INBOX_SHOWN]
        self.clear()
        now = datetime.now().astimezone()
        for item in self.items:
            self._add(item, now)
        self._title()

    def arrived(self, item: MailItem) -> None:
        """A new message: on top (read, if its read came first)."""
        if item.message.msg_id in self._read_early:
            self._read_early.discard(item.message.msg_id)
            item = _read_now(item)
        self.show([item, *self.items])

    def read(self, msg_ids: set[str]) -> None:
        """These messages are read now; one newer than any shown is still to come."""
        newest = self.items[0].message.msg_id if self.items else ""
        self._read_early |= {msg_id for msg_id in msg_ids if msg_id > newest}
        for index, item in enumerate(self.items):
            if item.message.msg_id in msg_ids and item.state != "read":
                self.items[index] = _read_now(item)
                self.update_cell(item.message.msg_id, "unread", "")
        self._title()

    def changed(self, message: MailMessage) -> None:
        """A message shown is now ``message`` (one not shown stays so)."""
        for index, item in enumerate(self.items):
            if item.message.msg_id == message.msg_id:
                self.items[index] = msgspec.structs.replace(item, message=message)
                self.update_cell(message.msg_id, "message", _row_text(message))
                return

    def _add(self, item: MailItem, now: datetime) -> None:
        message = item.message
        self.add_row(
            "●" if item.state != "read" else "",
            _when(message.created_at, now),
            Text(message.sender),
            _row_text(message),
            key=message.msg_id,
        )

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self.post_message(self.Opened(self.items[event.cursor_row]))
