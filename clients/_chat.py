"""`chat`: a conversation at the terminal, turn after turn, until input ends.

How the runs look is a ``ChatView``'s business: `PlainChat` here writes lines
for pipes and dumb terminals; `LiveChat` (`_live_chat.py`) redraws Markdown
on a terminal that can. Ctrl-C during a run kills it (twice quits); an agent's
question is asked on plain lines, answered from the same stdin.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Literal, Protocol

import anyio
import anyio.abc
from chinwag.protocol import (
    AskUser,
    Compaction,
    End,
    Queued,
    Start,
    StreamEventMsg,
    TextDelta,
    ThinkingDelta,
    Title,
    ToolCall,
    ToolResult,
)
from rich.console import Console
from rich.text import Text

from ._client import ChinwagError, Client, ConnectionLost
from ._render import (
    QuietCalls,
    TextOut,
    compaction_note,
    end_problem,
    line_console,
    tool_call_text,
    tool_result_text,
)
from ._settings import Failure, Settings, describe, reconnecting
from ._terminal_input import LineReader, ask_on_terminal


@dataclass
class _ChatState:
    phase: Literal["prompt", "run"] = "prompt"
    kill_sent: bool = False
    ask_scope: anyio.CancelScope | None = None
    title: str = ""
    guest: str | None = None  # who answers, over the conversation's history
    cwd: str | None = None  # the runs' working directory, when given


class ChatView(Protocol):
    """How `chat` shows a conversation: `PlainChat` lines, or `LiveChat`'s live Markdown."""

    console: Console

    def turn(
        self, tasks: anyio.abc.TaskGroup, agent: str
    ) -> contextlib.AbstractContextManager[None]:
        """Around one run's events; ``tasks`` may host what animates the view meanwhile."""
        ...

    def show(self, event: StreamEventMsg) -> None:
        """Every event of the run but ``ask_user`` (and ``title`` only when it changed)."""
        ...

    def before_ask(self) -> None: ...

    def after_ask(self) -> None: ...

    def failed(self, message: str) -> None:
        """The run's request failed (after ``turn`` was left)."""
        ...

    def interrupted(self) -> None:
        """Ctrl-C: the terminal has echoed ``^C`` where the cursor was."""
        ...

    def prompt(self) -> None: ...

    def input_ended(self) -> None: ...


class PlainChat:
    """Line output for pipes and dumb terminals: text is written as it streams."""

    def __init__(self) -> None:
        self.console = line_console()
        self.out = TextOut(sys.stdout)
        self.speaker = ""
        self.quiet = QuietCalls()

    @contextlib.contextmanager
    def turn(self, tasks: anyio.abc.TaskGroup, agent: str) -> Iterator[None]:
        self.speaker = agent
        self.quiet = QuietCalls()
        yield

    def show(self, event: StreamEventMsg) -> None:
        console, out = self.console, self.out
        match event:
            case Start(agent=speaker):
                self.speaker = speaker
            case TextDelta(delta=delta):
                if not out.mid_line:
                    console.print(Text(f"{self.speaker}> ", style="bold blue"), end="")
                out.write(delta)
            case ThinkingDelta(delta=delta):
                console.print(Text(delta, style="dim italic"), end="")
                out.mid_line = True
            case ToolCall() if not self.quiet.hides(event):
                out.end_line()
                console.print(tool_call_text(event))
            case ToolResult() if not self.quiet.hides(event):
                out.end_line()
                console.print(tool_result_text(event))
            case Title(title=title):
                out.end_line()
                console.print(Text(f"— {title} —", style="dim"))
            case Queued(position=position):
                console.print(Text(f"(queued: {position} ahead)", style="dim"))
            case Compaction():
                console.print(Text(f"({compaction_note(event)})", style="dim"))
            case End():
                out.end_line()
                problem = end_problem(event)
                if problem is not None:
                    style = "yellow" if event.status == "killed" else "red"
                    console.print(Text(problem, style=style))
            case _:
                pass

    def before_ask(self) -> None:
        self.out.end_line()

    def after_ask(self) -> None:
        pass

    def failed(self, message: str) -> None:
        self.out.end_line()
        self.console.print(Text(message, style="red"))

    def interrupted(self) -> None:
        self.out.mid_line = True  # the terminal echoed ^C
        self.out.end_line()

    def prompt(self) -> None:
        self.console.print(Text("you> ", style="bold green"), end="")
        sys.stdout.flush()

    def input_ended(self) -> None:
        self.out.end_line()
        self.console.print()


def _live_terminal() -> bool:
    """Whether stdout is a terminal that can redraw (not a pipe, not TERM=dumb)."""
    return sys.stdout.isatty() and Console().is_interactive


def chat_view(plain: bool) -> ChatView:
    """`PlainChat` when asked or when stdout cannot redraw, else `LiveChat`."""
    if plain or not _live_terminal():
        return PlainChat()
    # Imported here: only a live terminal pays for rich's Markdown and Live.
    from ._live_chat import LiveChat

    return LiveChat()


async def chat_session(
    settings: Settings,
    agent: str,
    sender: str | None,
    view: ChatView,
    *,
    guest: str | None = None,
    cwd: str | None = None,
) -> None:
    """Prompt, run the turn, show it; until input ends or Ctrl-C at the prompt."""
    state = _ChatState(guest=guest, cwd=cwd)
    console = view.console
    lines = LineReader()
    greeted = False

    async def session(client: Client) -> None:
        nonlocal greeted
        for name in (agent, guest):
            if name is not None and name not in client.welcome.agents:
                hosted = ", ".join(client.welcome.agents) or "none"
                raise Failure(f"unknown agent {name!r}; the daemon hosts: {hosted}")
        if not greeted:  # not again when connected again (to the next daemon)
            greeted = True
            with contextlib.suppress(ChinwagError):
                state.title = (await client.history(agent, sender, limit=0)).title
            header = Text(f"chatting with {agent}", style="bold")
            if guest is not None:
                header.append(f" (answered by its guest {guest})", style="bold")
            if state.title:
                header.append(f" — {state.title}", style="dim")
            quit_hint = "  (Ctrl-C stops a reply, Ctrl-C or Ctrl-D at the prompt quits)"
            header.append(quit_hint, style="dim")
            console.print(header)
        async with anyio.create_task_group() as tasks:
            with anyio.open_signal_receiver(signal.SIGINT) as interrupts:
                tasks.start_soon(
                    _watch_interrupts, interrupts, state, client, agent, sender, view, tasks
                )
                while True:
                    view.prompt()
                    line = await lines.readline()
                    if line is None:
                        view.input_ended()
                        break
                    if not line.strip():
                        continue
                    await _chat_turn(client, agent, sender, line, state, lines, view, tasks)
            tasks.cancel_scope.cancel()

    def say(note: str) -> None:
        console.print(Text(note, style="yellow"))

    await reconnecting(settings, session, say)


async def _watch_interrupts(
    interrupts: AsyncIterator[signal.Signals],
    state: _ChatState,
    client: Client,
    agent: str,
    sender: str | None,
    view: ChatView,
    tasks: anyio.abc.TaskGroup,
) -> None:
    async for _ in interrupts:
        view.interrupted()
        if state.phase == "run" and not state.kill_sent:
            state.kill_sent = True
            if state.ask_scope is not None:
                state.ask_scope.cancel()
            view.console.print(Text("killing the run (Ctrl-C again to quit)", style="yellow"))
            tasks.start_soon(_kill_quietly, client, agent, sender, view.console)
        else:
            tasks.cancel_scope.cancel()
            return


async def _kill_quietly(client: Client, agent: str, sender: str | None, console: Console) -> None:
    try:
        await client.kill(agent, sender)
    except ChinwagError as exc:
        console.print(Text(f"could not kill the run: {describe(exc)}", style="red"))


async def _chat_turn(
    client: Client,
    agent: str,
    sender: str | None,
    line: str,
    state: _ChatState,
    lines: LineReader,
    view: ChatView,
    tasks: anyio.abc.TaskGroup,
) -> None:
    state.phase = "run"
    state.kill_sent = False
    try:
        with view.turn(tasks, agent):
            async with client.stream(
                agent, line, sender=sender, guest=state.guest, cwd=state.cwd
            ) as events:
                async for event in events:
                    match event:
                        case AskUser():
                            view.before_ask()
                            await _chat_ask(
                                client, agent, sender, event, state, lines, view.console
                            )
                            view.after_ask()
                        case Title(title=title):
                            if title != state.title:
                                state.title = title
                                view.show(event)
                        case _:
                            view.show(event)
    except ConnectionLost:
        raise
    except ChinwagError as exc:
        view.failed(describe(exc))
    finally:
        state.phase = "prompt"


async def _chat_ask(
    client: Client,
    agent: str,
    sender: str | None,
    ask: AskUser,
    state: _ChatState,
    lines: LineReader,
    console: Console,
) -> None:
    with anyio.CancelScope() as scope:
        state.ask_scope = scope
        try:
            answer = await ask_on_terminal(ask, lines, console)
        finally:
            state.ask_scope = None
        if answer is None:
            raise Failure("input ended while the agent was asking")
        try:
            await client.reply_to_ask(agent, answer, sender=sender, ask_id=ask.ask_id)
        except ChinwagError as exc:
            console.print(Text(f"the answer was refused: {describe(exc)}", style="red"))
