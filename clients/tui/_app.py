"""`ChinwagTui`: the Textual app, and its one connection to the daemon at a time.

Everything comes over the client library (asyncio, as Textual runs): the list
from `list_conversations`, listed again when the subscription shows a run start,
end or take a title; the open conversation from `get_history` and `attach`; the
inbox from `inbox` and `watch`, whose `mail_update`s keep the messages shown (in the
inbox, and in a thread open) as they are now. When the connection goes, a banner says
so, and the app connects again every ``retry_s`` seconds; once back, it shows
everything afresh.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import anyio
import anyio.abc
from chinwag.protocol import End, MailItem, MailMessage, MailRead, MailUpdate, Start, Title
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import Footer, Header, Input, Static

from .._client import ChinwagError, Client, ConnectionLost, connect_explained, leaves
from .._mail_cli import DEFAULT_NAME
from .._settings import CLIENT_NAME, describe
from ._conversation import DEFAULT_SENDER, ConversationView
from ._dialogs import CompactDialog, ThreadScreen
from ._lists import CONVERSATIONS_SHOWN, INBOX_SHOWN, ConversationList, InboxPane

#: The least time between two listings of the conversations: a burst of runs starting
#: and ending is listed once.
RELIST_EVERY_S = 0.2


class ChinwagTui(App[None]):
    """Conversations, the open one live, and an inbox, from the daemon at ``socket``.

    ``agent`` and ``sender`` name the conversation open at start (the daemon's first
    agent, and the daemon's default sender, when None); ``reader`` whose inbox shows.
    """

    CSS_PATH = "tui.tcss"
    TITLE = "chinwag"
    BINDINGS = [
        Binding("escape", "kill", "Kill the run"),
        Binding("ctrl+o", "compact", "Compact"),
        Binding("ctrl+r", "ask_again", "Answer"),
        Binding("ctrl+l", "focus_list", "Conversations"),
        Binding("ctrl+t", "focus_inbox", "Inbox"),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]

    def __init__(
        self,
        socket: Path | str,
        *,
        agent: str | None = None,
        sender: str | None = None,
        reader: str = DEFAULT_NAME,
        retry_s: float = 1.0,
    ) -> None:
        super().__init__()
        self.socket = socket
        self.retry_s = retry_s
        self.client: Client | None = None  # None while the daemon is away
        self._tasks: anyio.abc.TaskGroup | None = None  # the connection's
        self._relist = anyio.Event()
        self._gone_since = ""
        self.gone = Static("", id="gone", markup=False)
        self.conversations = ConversationList()
        self.inbox = InboxPane(reader)
        self.view = ConversationView(agent or "", sender or DEFAULT_SENDER)

    def compose(self) -> ComposeResult:
        yield Header(icon="≡")
        yield self.gone
        with Horizontal():
            with Vertical(id="side"):
                yield self.conversations
                yield self.inbox
            yield self.view
        yield Footer()

    def on_mount(self) -> None:
        self.gone.display = False
        self.query_one("#message", Input).focus()
        self.run_worker(self._stay_connected(), name="connection", exit_on_error=True)

    # --- the connection ----------------------------------------------------------------------

    async def _stay_connected(self) -> None:
        while True:
            lost = await self._connection()
            self._went_away(describe(lost))
            await anyio.sleep(self.retry_s)  # then try again

    async def _connection(self) -> ChinwagError:
        """Show everything over one connection until it fails; returns what failed."""
        lost: ChinwagError | None = None
        try:
            async with (
                connect_explained(self.socket, client=CLIENT_NAME) as client,
                anyio.create_task_group() as tasks,
            ):
                self.client, self._tasks = client, tasks
                self.gone.display = False
                if not self.view.agent:
                    self.view.agent = client.welcome.agents[0] if client.welcome.agents else ""
                tasks.start_soon(self._follow_runs, client)
                tasks.start_soon(self._keep_listed, client)
                tasks.start_soon(self._follow_mail, client)
                tasks.start_soon(self.view.follow, client, self.view.agent, self.view.sender)
        except* ChinwagError as group:
            lost = next(leaf for leaf in leaves(group) if isinstance(leaf, ChinwagError))
        finally:
            self.client = self._tasks = None
            self.view.close()
        return lost or ConnectionLost("The connection to the daemon ended.")

    def _went_away(self, reason: str) -> None:
        if not self.gone.display:
            self._gone_since = datetime.now().strftime("%H:%M:%S")
        self.gone.update(
            f"Lost the daemon at {self._gone_since}; connecting again every "
            f"{self.retry_s:g} s. {reason}"
        )
        self.gone.display = True

    def _start(self, action: str, *args: object) -> bool:
        """Run one of the app's requests in the connection's task group: a refusal is a
        notice, a lost connection the connection's end. False when there is none."""
        if self._tasks is None or self.client is None:
            self.notify("The daemon is away; wait for it to come back.", severity="warning")
            return False
        self._tasks.start_soon(self._guarded, self.client, action, args)
        return True

    async def _guarded(self, client: Client, action: str, args: tuple[object, ...]) -> None:
        try:
            await getattr(self, action)(client, *args)
        except ConnectionLost:
            raise
        except ChinwagError as exc:
            self.notify(describe(exc), severity="error", markup=False)

    # --- what follows the daemon ---------------------------------------------------------------

    async def _follow_runs(self, client: Client) -> None:
        async with client.subscribe() as events:
            self._relist.set()
            async for frame in events:
                event = frame.event
                if isinstance(event, Start | End | Title):
                    self._relist.set()
                if (frame.agent, frame.sender) != self.view.key:
                    continue
                if isinstance(event, Start):
                    self.view.run_started(frame.run_id)
                elif isinstance(event, Title):
                    # Here, not from the run's own events: a short run may end before
                    # the view attaches to it.
                    self.view.retitle(event.title)
        raise ConnectionLost("The daemon ended the subscription.")

    async def _keep_listed(self, client: Client) -> None:
        while True:
            await self._relist.wait()
            self._relist = anyio.Event()
            page = await client.list_conversations(limit=CONVERSATIONS_SHOWN)
            self.conversations.show(page.items, self.view.key)
            await anyio.sleep(RELIST_EVERY_S)

    async def _follow_mail(self, client: Client) -> None:
        """The inbox up to a watch's cursor, then what the watch brings (as `chinwag inbox
        --follow`: none missed or shown twice at the boundary): new mail, changes to
        mail shown, and the mail the reader read (here or through any other client). A
        change stored before the inbox was read comes all the same; they come in the
        order stored, so what shows last is the message as it is now."""
        reader = self.inbox.reader
        async with client.watch(reader, updates=True, reads=True) as watch:
            page = await client.inbox(reader, limit=INBOX_SHOWN)
            cursor = watch.cursor
            self.inbox.show(
                [i for i in page.items if cursor is not None and i.message.msg_id <= cursor]
            )
            async for pushed in watch:
                if isinstance(pushed, MailRead):
                    self.inbox.read(set(pushed.msg_ids))
                elif isinstance(pushed, MailUpdate):
                    self._changed(pushed.message)
                else:
                    self.inbox.arrived(MailItem(message=pushed, state="delivered"))

    def _changed(self, message: MailMessage) -> None:
        """Show ``message`` as it is now wherever it is shown."""
        self.inbox.changed(message)
        for screen in self.screen_stack:
            if isinstance(screen, ThreadScreen):
                screen.changed(message)

    # --- what the person does --------------------------------------------------------------------

    def on_conversation_list_opened(self, event: ConversationList.Opened) -> None:
        self.open(event.agent, event.sender)

    def open(self, agent: str, sender: str) -> None:
        """Show another conversation (once the daemon is back, while it is away)."""
        if self._tasks is not None and self.client is not None:
            self._tasks.start_soon(self.view.follow, self.client, agent, sender)
        else:
            self.view.agent, self.view.sender = agent, sender
        self.query_one("#message", Input).focus()

    def on_conversation_view_title_changed(self, event: ConversationView.TitleChanged) -> None:
        if (event.agent, event.sender) == self.view.key:
            self.sub_title = f"{event.agent}/{event.sender}" + (
                f" — {event.title}" if event.title else ""
            )

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id != "message" or not event.value.strip():
            return
        if self._start("_send", self.view.agent, self.view.sender, event.value):
            event.input.clear()

    async def _send(self, client: Client, agent: str, sender: str, text: str) -> None:
        """Run a turn; the conversation pane shows it (from `attach`), so its events are
        only read here, for a refusal."""
        async with client.stream(agent, text, sender=sender) as events:
            async for _ in events:
                pass

    def action_kill(self) -> None:
        self._start("_kill", self.view.agent, self.view.sender)

    async def _kill(self, client: Client, agent: str, sender: str) -> None:
        killed = await client.kill(agent, sender)
        if killed.run_id is None:
            self.notify("Nothing is running.")

    def action_ask_again(self) -> None:
        if not self.view.ask_again():
            self.notify("No question is waiting for an answer here.")

    def action_compact(self) -> None:
        agent, sender = self.view.key

        def chosen(instructions: str | None) -> None:
            if instructions is not None:
                self._start("_compact", agent, sender, instructions)

        self.push_screen(CompactDialog(agent, sender), chosen)

    async def _compact(self, client: Client, agent: str, sender: str, instructions: str) -> None:
        done = await client.compact(agent, sender, instructions=instructions or None)
        self.notify(f"{done.archived_entries} entries compacted into {done.archive}")
        if (agent, sender) == self.view.key:
            self.open(agent, sender)  # shown afresh: the history starts at the marker now

    def on_inbox_pane_opened(self, event: InboxPane.Opened) -> None:
        self._start("_open_thread", event.item)

    async def _open_thread(self, client: Client, item: MailItem) -> None:
        """The message's thread (a message alone when none answered it), marked read."""
        reader = self.inbox.reader
        message = item.message
        thread_id = message.thread_id or message.msg_id
        try:
            items = (await client.thread(reader, thread_id)).items
        except ChinwagError as exc:
            if exc.code != 404:
                raise
            one = await client.get_message(reader, message.msg_id)  # marks it read
            items = [MailItem(message=one.message, state=one.state)]
        else:
            await client.mark_read(reader, thread_id=thread_id)
        self.inbox.read({i.message.msg_id for i in items})
        self.push_screen(ThreadScreen(reader, items))

    def action_focus_list(self) -> None:
        self.conversations.focus()

    def action_focus_inbox(self) -> None:
        self.inbox.focus()
