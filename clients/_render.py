"""Runs and conversations as lines of text: what `send`, `chat`, `tail` and
`history` print, and the pieces the live chat shares with them.

``rich`` styles every line; none is hard-wrapped, so a pipe gets it whole.
It is imported on first use (``styled``, ``line_console``): `send` of a reply
that is only text prints none of it, and rich is a sixth of its start-up.
"""

from __future__ import annotations

import sys
from datetime import datetime
from functools import cached_property
from typing import IO, TYPE_CHECKING

from chinwag.protocol import (
    AskUser,
    Compaction,
    ConversationItem,
    End,
    Entry,
    Event,
    Queued,
    Start,
    StreamEventMsg,
    TextDelta,
    ThinkingDelta,
    Title,
    ToolCall,
    ToolCallInfo,
    ToolResult,
    Usage,
)

if TYPE_CHECKING:
    from rich.console import Console
    from rich.text import Text


def limits_usage(item: ConversationItem, moment: datetime) -> str:
    """The conversation's usage against each limit its agent sets, as of ``moment``
    (`12/200 msgs, 30k/100k tok, expires in 3d`); empty when it sets none."""
    limits = item.limits
    if limits is None:
        return ""
    parts = []
    if limits.max_messages is not None:
        parts.append(f"{item.messages or 0}/{limits.max_messages} msgs")
    if limits.max_tokens is not None:
        parts.append(f"{_amount(item.tokens or 0)}/{_amount(limits.max_tokens)} tok")
    if item.expires_at is not None:
        left = (item.expires_at - moment).total_seconds()
        parts.append(f"expires in {_duration(left)}" if left > 0 else "expired")
    return ", ".join(parts)


def tokens_used(item: ConversationItem) -> str:
    """The model tokens the conversation used since it began (`30k in, 1.2k out`);
    empty when it used none."""
    if not (item.tokens_in or item.tokens_out):
        return ""
    return f"{_amount(item.tokens_in)} in, {_amount(item.tokens_out)} out"


def _amount(count: int) -> str:
    """A count in at most four characters, never rounded up: 950, 1.5k, 30k, 2.1M."""
    for unit, size in (("M", 1_000_000), ("k", 1000)):
        if count >= size:
            tenths = count * 10 // size
            return f"{tenths / 10:g}{unit}" if tenths < 100 else f"{count // size}{unit}"
    return str(count)


def _duration(seconds: float) -> str:
    """The largest whole unit of ``seconds``: 3d, 5h, 12m, 40s."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{max(int(seconds), 1)}s"


def compaction_note(event: Compaction) -> str:
    return f"the context was full: {event.archived_entries} entries compacted into {event.archive}"


def _clip(text: str, width: int = 100) -> str:
    one_line = " ".join(text.split())
    return one_line if len(one_line) <= width else one_line[: width - 1] + "…"


def line_console(*, stderr: bool = False) -> Console:
    """A console for line output: lines are never hard-wrapped, so a pipe or a
    narrow terminal gets them whole."""
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=True)


def styled(text: str = "", style: str = "") -> Text:
    """``rich.text.Text``, rich imported only once something is styled."""
    from rich.text import Text

    return Text(text, style=style)


def tool_call_summary(call: ToolCall | ToolCallInfo) -> str:
    """A tool call in one line, as every client shows it: its name, then its
    arguments on one line, clipped (`read_file({"path": "notes.md"})`)."""
    return f"{call.name}({_clip(call.arguments, 80)})"


def _tool_call_styled(call: ToolCall | ToolCallInfo, text: Text) -> Text:
    summary = tool_call_summary(call)
    text.append(summary[: len(call.name)], style="cyan")
    text.append(summary[len(call.name) :], style="dim")
    return text


def tool_call_text(event: ToolCall, indent: str = "  ") -> Text:
    return _tool_call_styled(event, styled(f"{indent}⚙ ", style="dim cyan"))


def tool_result_text(event: ToolResult, indent: str = "  ") -> Text:
    style = "red" if event.is_error else "dim"
    text = styled(f"{indent}↳ ", style=style)
    text.append(_clip(event.output, 100) or "(no output)", style=style)
    text.append(f"  {event.duration_ms:.0f} ms", style="dim")
    return text


def end_problem(end: End) -> str | None:
    """Why a run did not finish, in one line; None when it ended `done`."""
    if end.status == "done":
        return None
    if end.status == "error" and end.error is not None:
        return f"the run failed: error {end.error.code}: {end.error.message}"
    if end.status == "killed":
        return "the run was killed"
    return f"the run ended {end.status}"


class QuietCalls:
    """Tool calls a terminal shows in its own way (``ask_user`` as a prompt), not as calls."""

    def __init__(self) -> None:
        self._call_ids: set[str] = set()

    def hides(self, event: ToolCall | ToolResult) -> bool:
        if isinstance(event, ToolCall) and event.name == "ask_user":
            self._call_ids.add(event.call_id)
        return event.call_id in self._call_ids


class TextOut:
    """Streams assistant text to a file, remembering whether a line is open."""

    def __init__(self, file: IO[str]) -> None:
        self.file = file
        self.mid_line = False

    def write(self, text: str) -> None:
        if not text:
            return
        self.file.write(text)
        self.file.flush()
        self.mid_line = not text.endswith("\n")

    def end_line(self) -> None:
        if self.mid_line:
            self.file.write("\n")
            self.file.flush()
            self.mid_line = False


class SendView:
    """`send` keeps stdout for the reply's text; everything else goes to stderr."""

    def __init__(self, out: TextOut) -> None:
        self.out = out
        self.thinking = False
        self.quiet = QuietCalls()

    @cached_property
    def err(self) -> Console:
        """stderr's console, made when first needed: a reply of plain text needs none."""
        return line_console(stderr=True)

    def show(self, event: StreamEventMsg) -> None:
        if self.thinking and not isinstance(event, ThinkingDelta):
            self.err.print()
            self.thinking = False
        match event:
            case TextDelta(delta=delta):
                self.out.write(delta)
            case ThinkingDelta(delta=delta):
                self.out.end_line()
                self.err.print(styled(delta, style="dim italic"), end="")
                self.thinking = True
            case ToolCall() if not self.quiet.hides(event):
                self.out.end_line()
                self.err.print(tool_call_text(event))
            case ToolResult() if not self.quiet.hides(event):
                self.err.print(tool_result_text(event))
            case Title(title=title):
                self.out.end_line()
                self.err.print(styled(f"title: {title}", style="dim"))
            case Queued(position=position):
                self.err.print(styled(f"queued: {position} ahead", style="dim"))
            case Compaction():
                self.err.print(styled(compaction_note(event), style="dim"))
            case _:
                pass


def entry_text(entry: Entry) -> Text:
    seq = styled(f"#{entry.seq} ", style="dim")
    if entry.kind == "compact":
        seq.append(f"── compacted into {entry.archive or '?'} ──\n", style="magenta")
        seq.append(entry.content, style="dim")
        return seq
    speaker = entry.role if not entry.agent else f"{entry.role} ({entry.agent})"
    style = {"user": "bold green", "assistant": "bold blue", "tool": "cyan"}.get(entry.role, "bold")
    seq.append(f"{speaker}: ", style=style)
    if entry.role == "tool":
        seq.append(_clip(entry.content, 200), style="red" if entry.is_error else "dim")
    else:
        seq.append(entry.content)
    for call in entry.tool_calls:
        seq.append("\n    ⚙ ", style="dim cyan")
        _tool_call_styled(call, seq)
    return seq


def show_tail_event(frame: Event, last_run: str | None, out: TextOut, console: Console) -> str:
    """Text of one run continues on its line while no other run interleaves."""
    event = frame.event
    prefix = styled(f"[{frame.agent}/{frame.sender}] ", style="bold blue")
    if isinstance(event, TextDelta):
        if frame.run_id != last_run or not out.mid_line:
            out.end_line()
            console.print(prefix, end="")
            sys.stdout.flush()
        out.write(event.delta)
        return frame.run_id
    out.end_line()
    line = prefix
    match event:
        case Start(agent=speaker, seq=seq):
            line.append(f"start {speaker} run {frame.run_id} at seq {seq}", style="dim")
        case ToolCall():
            line.append_text(tool_call_text(event, indent=""))
        case ToolResult():
            line.append_text(tool_result_text(event, indent=""))
        case Title(title=title):
            line.append(f"title: {title}", style="dim")
        case AskUser(questions=questions):
            asked = "; ".join(q.question for q in questions)
            line.append(f"asks ({event.ask_id}): {asked}", style="magenta")
        case Queued(position=position):
            line.append(f"queued: {position} ahead", style="dim")
        case Usage():
            line.append(
                f"usage: {event.prompt_tokens} in, {event.completion_tokens} out, "
                f"context {event.context_tokens}/{event.context_window}",
                style="dim",
            )
        case ThinkingDelta(delta=delta):
            line.append(delta, style="dim italic")
        case End(status=status):
            problem = end_problem(event)
            line.append(f"end {status}" + (f": {problem}" if problem else ""), style="dim")
        case _:
            pass
    console.print(line)
    return frame.run_id
