"""The conversation pane: its stored history, and each run in flight streaming live.

What is stored is shown from `get_history`, tool calls folded under their result. A
run in flight is followed with `attach` (which replays it from its `start`) into a
`RunView` of its own, its text rendered as Markdown as it streams; once it ends, the
view gives way to what the run stored. So the pane always ends as the history reads,
whoever started the run: this TUI, another client, or mail.
"""

from __future__ import annotations

import anyio
import anyio.abc
from chinwag.protocol import (
    AskUser,
    Compaction,
    End,
    Entry,
    Queued,
    Start,
    StreamEventMsg,
    TextDelta,
    ThinkingDelta,
    ToolCall,
    ToolCallInfo,
    ToolResult,
)
from textual.app import ComposeResult
from textual.containers import Vertical, VerticalScroll
from textual.markup import escape
from textual.message import Message
from textual.widget import Widget
from textual.widgets import Collapsible, Input, Markdown, Static
from textual.widgets._markdown import MarkdownStream

from .._client import ChinwagError, Client, ConnectionLost, EventStream
from .._render import compaction_note, end_problem, tool_call_summary
from .._settings import describe
from ._dialogs import AskDialog

#: The entries shown when a conversation opens: the latest ones.
HISTORY_SHOWN = 100

#: What the daemon calls a Unix client's conversation when the client names no sender.
DEFAULT_SENDER = "user"


def _label(text: str, kind: str) -> Static:
    return Static(text, classes=f"speaker {kind}", markup=False)


class ToolCard(Collapsible):
    """A tool call, folded: its name and arguments on the title line, its result inside."""

    def __init__(self, call: ToolCall | ToolCallInfo) -> None:
        self.result = Static("(running)", classes="tool-result", markup=False)
        # The model's arguments, as written: not markup.
        title = escape(f"⚙ {tool_call_summary(call)}")
        super().__init__(self.result, title=title, classes="tool")

    def show_result(self, output: str, is_error: bool) -> None:
        self.result.update(output or "(no output)")
        self.set_class(is_error, "failed")


class _Cards:
    """The tool calls shown, by call_id, so that a result finds its call."""

    def __init__(self) -> None:
        self._cards: dict[str, ToolCard] = {}

    def call(self, call: ToolCall | ToolCallInfo) -> ToolCard:
        card = self._cards[call.call_id] = ToolCard(call)
        return card

    def result(self, call_id: str | None, output: str, is_error: bool) -> Widget | None:
        """Put a result under its call; a widget of its own when the call is not shown."""
        card = self._cards.pop(call_id or "", None)
        if card is not None:
            card.show_result(output, is_error)
            return None
        orphan = Static(output or "(no output)", classes="tool-result", markup=False)
        return Collapsible(orphan, title="↳ a tool's result", classes="tool")


def entry_widgets(entry: Entry, agent: str, sender: str, cards: _Cards) -> list[Widget]:
    """What one stored entry shows (nothing for a tool result whose call is shown)."""
    if entry.kind == "compact":
        summary = Static(entry.content, classes="summary", markup=False)
        return [
            Collapsible(
                summary, title=f"── compacted into {entry.archive or '?'} ──", classes="compact"
            )
        ]
    if entry.role == "tool":
        orphan = cards.result(entry.tool_call_id, entry.content, entry.is_error)
        return [orphan] if orphan is not None else []
    widgets: list[Widget] = []
    if entry.role == "user":
        widgets.append(_label(sender, "user"))
    else:
        widgets.append(_label(entry.agent or agent, "assistant"))
    if entry.content:
        widgets.append(Markdown(entry.content))
    widgets.extend(cards.call(call) for call in entry.tool_calls)
    return widgets


class RunView(Vertical):
    """One run in flight: its prompt, then its text (Markdown, streamed), thinking and
    tool calls in the order they come."""

    def __init__(self, run_id: str) -> None:
        super().__init__(classes="run")
        self.run_id = run_id
        self._stream: MarkdownStream | None = None
        self.asking: str | None = None  # the call_id of its `ask_user` waiting for an answer
        self.waiting: AskUser | None = None  # that question, until answered
        self.dialog: AskDialog | None = None  # that question, on screen

    def close_dialog(self) -> None:
        """The question was answered (maybe elsewhere), or the run ended."""
        dialog, self.dialog, self.asking, self.waiting = self.dialog, None, None, None
        if dialog is not None:
            dialog.withdraw()

    async def text(self, delta: str) -> None:
        if self._stream is None:
            markdown = Markdown()
            await self.mount(markdown)
            self._stream = Markdown.get_stream(markdown)
        await self._stream.write(delta)

    async def _end_text(self) -> None:
        if self._stream is not None:
            stream, self._stream = self._stream, None
            await stream.stop()

    async def add(self, widget: Widget) -> None:
        """Something other than text: the text after it starts a new block."""
        await self._end_text()
        await self.mount(widget)

    async def finish(self) -> None:
        await self._end_text()


class ConversationView(Vertical):
    """The open conversation and the line to write to it."""

    class TitleChanged(Message):
        """The open conversation's title, as it loaded or as a run set it."""

        def __init__(self, agent: str, sender: str, title: str) -> None:
            super().__init__()
            self.agent = agent
            self.sender = sender
            self.title = title

    def __init__(self, agent: str, sender: str) -> None:
        super().__init__(id="conversation")
        self.agent = agent
        self.sender = sender
        self.title = ""
        self.transcript = VerticalScroll(id="log")
        self._shown_seq = 0  # the last stored entry shown
        self._live: dict[str, RunView] = {}  # runs followed, by run_id
        self._cards = _Cards()
        self._lock = anyio.Lock()  # history caught up, or a run's view begun: one at a time
        self._runs: anyio.abc.TaskGroup | None = None
        self._client: Client | None = None
        self._scope: anyio.CancelScope | None = None

    def compose(self) -> ComposeResult:
        yield self.transcript
        yield Input(placeholder=self._placeholder(), id="message")

    def _placeholder(self) -> str:
        return f"message {self.agent} as {self.sender} (Enter sends)"

    def on_mount(self) -> None:
        self.transcript.anchor()

    @property
    def key(self) -> tuple[str, str]:
        return self.agent, self.sender

    # --- following the conversation over one connection ----------------------------------------

    def close(self) -> None:
        """Stop following: the connection went, or another conversation opens."""
        if self._scope is not None:
            self._scope.cancel()
        self._scope = self._client = self._runs = None
        for view in self._live.values():
            view.close_dialog()

    async def follow(self, client: Client, agent: str, sender: str) -> None:
        """Show (``agent``, ``sender``) and follow its runs until ``close`` or a failure.

        Cancelled by ``close``; ``ConnectionLost`` when the connection goes.
        """
        self.close()
        self.agent, self.sender = agent, sender
        self.query_one("#message", Input).placeholder = self._placeholder()
        with anyio.CancelScope() as scope:
            self._scope = scope
            self._client = client
            async with anyio.create_task_group() as runs:
                self._runs = runs
                await self._reset()
                # Attached first: history is then read knowing the run in flight, whose
                # entries its own view shows.
                events, first = await self._attached(client)
                if isinstance(first, Start):
                    self._live[first.run_id] = RunView(first.run_id)
                await self._load(client)
                runs.start_soon(self._follow_run, events, first)
                await anyio.sleep_forever()

    def run_started(self, run_id: str) -> None:
        """A run of this conversation started (the subscription says): follow it."""
        if self._runs is not None and self._client is not None and run_id not in self._live:
            self._runs.start_soon(self._attach_run, self._client)

    async def _reset(self) -> None:
        self._live.clear()
        self._cards = _Cards()
        self._shown_seq = 0
        await self.transcript.remove_children()

    async def _load(self, client: Client) -> None:
        """The latest `HISTORY_SHOWN` entries, and the title."""
        try:
            about = await client.history(self.agent, self.sender, limit=0)
        except ChinwagError as exc:
            if exc.code != 404:
                raise
            await self.transcript.mount(Static("a new conversation", classes="note"))
            self._set_title("")
            return
        self._set_title(about.title)
        self._shown_seq = max(0, about.last_seq - HISTORY_SHOWN)
        if self._shown_seq:
            await self.transcript.mount(
                Static(f"{self._shown_seq} earlier entries not shown", classes="note")
            )
        await self._catch_up(client)

    async def _catch_up(self, client: Client) -> None:
        """Show the entries stored since the last one shown, up to a run still in flight."""
        async with self._lock:
            widgets: list[Widget] = []
            entries = client.iter_history(self.agent, self.sender, after_seq=self._shown_seq)
            try:
                async for entry in entries:
                    if entry.run_id is not None and entry.run_id in self._live:
                        break
                    widgets.extend(entry_widgets(entry, self.agent, self.sender, self._cards))
                    self._shown_seq = entry.seq
            except ChinwagError as exc:
                if exc.code != 404:  # not stored yet: nothing to show
                    raise
            finally:
                await entries.aclose()
            first_run = next(iter(self._live.values()), None)
            if widgets:
                if first_run is not None and first_run.parent is self.transcript:
                    await self.transcript.mount(*widgets, before=first_run)
                else:
                    await self.transcript.mount(*widgets)

    def retitle(self, title: str) -> None:
        """A run of this conversation set its title."""
        self._set_title(title)

    def _set_title(self, title: str) -> None:
        self.title = title
        self.post_message(self.TitleChanged(self.agent, self.sender, title))

    async def _attached(self, client: Client) -> tuple[EventStream, StreamEventMsg | None]:
        """`attach`, and its first event: the run in flight's `start`, else an `end`
        (None for a conversation not stored yet)."""
        events = client.attach(self.agent, self.sender)
        try:
            await events.__aenter__()
            return events, await anext(events)
        except ChinwagError as exc:
            await events.__aexit__(None, None, None)
            if exc.code != 404:
                raise
            return events, None
        except BaseException:
            await events.__aexit__(None, None, None)
            raise

    async def _attach_run(self, client: Client) -> None:
        events, first = await self._attached(client)
        if isinstance(first, Start):
            if first.run_id in self._live:
                await events.__aexit__(None, None, None)  # followed already
                return
            self._live[first.run_id] = RunView(first.run_id)
        await self._follow_run(events, first)

    async def _follow_run(self, events: EventStream, first: StreamEventMsg | None) -> None:
        """Show one run's events, the first already read, until its `end`."""
        client = self._client
        assert client is not None
        try:
            if not isinstance(first, Start):  # nothing in flight (it may just have ended)
                await self._catch_up(client)
                return
            view = self._live[first.run_id]
            await self._begin(client, view, first)
            await self._show(client, view, first)
            async for event in events:
                await self._show(client, view, event)
        finally:
            await events.__aexit__(None, None, None)

    async def _begin(self, client: Client, view: RunView, start: Start) -> None:
        """Put the run's view after what is shown, with its prompt unless shown already."""
        async with self._lock:
            await self.transcript.mount(view)
            if self._shown_seq < start.seq:
                prompt = await client.history(
                    self.agent, self.sender, after_seq=start.seq - 1, limit=1
                )
                for entry in prompt.entries:
                    await view.add(_label(self.sender, "user"))
                    await view.add(Markdown(entry.content, classes="prompt"))
            await view.add(_label(start.agent, "assistant"))

    async def _show(self, client: Client, view: RunView, event: StreamEventMsg) -> None:
        match event:
            case TextDelta(delta=delta):
                await view.text(delta)
            case ThinkingDelta(delta=delta):
                await view.add(Static(delta, classes="thinking", markup=False))
            case ToolCall(name=name, call_id=call_id):
                await view.add(self._cards.call(event))
                if name == "ask_user":
                    view.asking = call_id
            case ToolResult(call_id=call_id, output=output, is_error=is_error):
                orphan = self._cards.result(call_id, output, is_error)
                if orphan is not None:
                    await view.add(orphan)
                if call_id == view.asking:  # answered, maybe elsewhere
                    view.close_dialog()
            case AskUser():
                self._ask(client, view, event)
            case Queued(position=position):
                await view.add(Static(f"queued: {position} ahead", classes="note"))
            case Compaction():
                await view.add(Static(compaction_note(event), classes="note"))
            case End():
                await self._end(client, view, event)
            case _:
                pass  # usage: nothing to show

    def ask_again(self) -> bool:
        """Show again the question a run waits on, closed unanswered; False when none."""
        client = self._client
        for view in self._live.values():
            if view.waiting is not None and view.dialog is None and client is not None:
                self._ask(client, view, view.waiting)
                return True
        return False

    def _ask(self, client: Client, view: RunView, ask: AskUser) -> None:
        dialog = view.dialog = AskDialog(self.agent, ask)
        view.waiting = ask
        runs = self._runs

        def answered(answer: str | None) -> None:
            if view.dialog is dialog:
                view.dialog = None
            if answer is not None and runs is not None:
                runs.start_soon(self._reply, client, ask, answer)
            elif view.waiting is ask:
                # Closed to read the conversation first: the run waits on.
                self.notify("The question still waits: Ctrl-R shows it again.")

        self.app.push_screen(dialog, answered)

    async def _reply(self, client: Client, ask: AskUser, answer: str) -> None:
        try:
            await client.reply_to_ask(self.agent, answer, sender=self.sender, ask_id=ask.ask_id)
        except ConnectionLost:
            raise
        except ChinwagError as exc:
            self.notify(f"the answer was refused: {describe(exc)}", severity="error", markup=False)

    async def _end(self, client: Client, view: RunView, end: End) -> None:
        await view.finish()
        view.close_dialog()
        del self._live[view.run_id]
        await self._catch_up(client)
        problem = end_problem(end)
        async with self._lock:
            await view.remove()
            if problem is not None:
                kind = "killed" if end.status == "killed" else "failed"
                await self.transcript.mount(Static(problem, classes=f"note {kind}", markup=False))
