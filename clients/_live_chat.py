"""`chinwag chat` on a terminal: the reply rendered as Markdown while it streams.

A `rich.live.Live` region at the bottom of the screen holds what may still
change: the Markdown block being written, the line of thinking being written,
and a spinner while the run waits (queued, for the model's first token, for a
tool). Everything settled is printed above it once and never rendered again: a
Markdown block is settled when a blank line outside a code fence is followed by
a line that does not continue it, and a line of thinking when it ends. So a
redraw costs the last block, not the whole reply, and a 10,000-token answer
stays cheap. Redraws come from one ticker, at most `REFRESH_HZ` times a second,
whatever the rate of deltas; the last render stays on screen.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import anyio
import anyio.abc
from chinwag.protocol import (
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
from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.live import Live
from rich.markdown import Markdown
from rich.segment import Segment
from rich.spinner import Spinner
from rich.text import Text

from ._render import QuietCalls, compaction_note, end_problem, tool_call_text, tool_result_text

#: Redraws of the live region per second, at most.
REFRESH_HZ = 12.5
# A speaker label longer than this goes on a line of its own, not beside the text.
_LABEL_BESIDE_MAX = 24
_FENCE = re.compile(r" {0,3}(`{3,}|~{3,})")


class SettledMarkdown:
    """Streamed Markdown split into settled blocks and the block still being written.

    ``feed`` looks only at the new text (and the line it continues), so feeding
    a long reply delta by delta costs its length, not its length squared.
    """

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._pending: list[str] = []
        self._length = 0  # of the pending text
        self._line = ""  # the pending text's last, unfinished line
        self._line_start = 0  # where that line starts in the pending text
        self._fence: str | None = None  # the open code fence's marker
        self._fence_line = ""  # the line that opened it, and where that line starts
        self._fence_start = 0
        self._after_blank = False  # the last finished line was blank (outside a fence)

    @property
    def pending(self) -> str:
        """The text not settled yet."""
        if len(self._pending) > 1:
            self._pending = ["".join(self._pending)]
        return self._pending[0] if self._pending else ""

    def feed(self, delta: str) -> str:
        """Add ``delta``; returns the text that became settled ("" when none did)."""
        boundary: int | None = None
        for index, part in enumerate(delta.split("\n")):
            if index:
                self._end_line()
            if part and not self._line and self._starts_block(part):
                boundary = self._line_start
            self._line += part
            self._length += len(part)
        self._pending.append(delta)
        if boundary is None:
            return ""
        text = self.pending
        self._pending = [text[boundary:]]
        self._length -= boundary
        self._line_start -= boundary
        self._fence_start -= boundary
        return text[:boundary].rstrip("\n")

    def tail(self, max_chars: int, max_lines: int) -> str:
        """The end of the pending text, for a preview when all of it is too long to redraw.

        It starts at a line (or, in one long line, a word) and reopens the code
        fence it starts inside, so that it renders like the end of the whole.
        """
        text = self.pending
        start = max(0, len(text) - max_chars)
        lines_start = len(text)
        for _ in range(max_lines):
            lines_start = text.rfind("\n", 0, lines_start)
            if lines_start < 0:
                break
        start = max(start, lines_start + 1)
        if start == 0:
            return text
        if text[start - 1] != "\n":
            space = text.find(" ", start)
            start = space + 1 if space >= 0 else start
        tail = text[start:]
        if self._fence is not None and self._fence_start < start:
            tail = f"{self._fence_line}\n{tail}"
        return tail

    def flush(self) -> str:
        """Everything pending, as it stands; the splitter starts afresh."""
        text = self.pending
        self._reset()
        return text

    def _starts_block(self, first: str) -> bool:
        """Whether a line beginning with ``first`` starts a new block after settled ones."""
        return self._fence is None and self._after_blank and not first[0].isspace()

    def _end_line(self) -> None:
        line = self._line
        self._length += 1  # the newline
        self._line = ""
        self._line_start = self._length
        if self._fence is not None:
            stripped = line.strip()
            if stripped.startswith(self._fence) and stripped == stripped[0] * len(stripped):
                self._fence = None
            return
        opening = _FENCE.match(line)
        if opening:
            self._fence = opening.group(1)
            self._fence_line = line
            self._fence_start = self._line_start - len(line) - 1
            self._after_blank = False
        else:
            self._after_blank = not line.strip()


class _Region:
    """The live region's renderable: drawn from the view's state at every redraw."""

    def __init__(self, view: LiveChat) -> None:
        self.view = view

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        parts = self.view.region_parts()
        if not parts:
            return
        lines = console.render_lines(Group(*parts), options, pad=False)
        if not self.view.final:
            # Taller than the screen, only the tail can be redrawn in place.
            lines = lines[-max(1, console.height - 1) :]
        for number, line in enumerate(lines):
            if number:
                yield Segment.line()
            yield from line


class _Beside:
    """``label`` beside the first line of ``body``, and its width of blanks beside the rest.

    Cheaper than a `Table.grid`, which renders its cells once more to measure them.
    """

    def __init__(self, label: str, style: str, body: RenderableType) -> None:
        self.label = label
        self.style = style
        self.body = body

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = cell_len(self.label)
        body_options = options.update_width(max(1, options.max_width - width))
        lines = console.render_lines(self.body, body_options, pad=False)
        label = Segment(self.label, console.get_style(self.style))
        blank = Segment(" " * width)
        for number, line in enumerate(lines):
            yield blank if number else label
            yield from line
            yield Segment.line()


class LiveChat:
    """`chat` on a terminal that can redraw: Markdown, spinners, one line per tool."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(highlight=False)
        self.final = False  # the region is drawn whole (the live display is stopping)
        self._live: Live | None = None
        self._ticker: anyio.CancelScope | None = None
        self._dirty = False
        self._speaker = ""
        self._waiting: str | None = None  # the spinner's words; None: no spinner
        self._spinner = Spinner("dots", style="cyan")
        self._quiet = QuietCalls()
        self._text = SettledMarkdown()
        self._blocks = 0  # Markdown blocks printed in the current text segment
        self._thinking = ""  # the unfinished line of thinking
        self._markdown: tuple[str, Markdown] | None = None  # parsed once per text

    # --- a run ------------------------------------------------------------------------

    @contextlib.contextmanager
    def turn(self, tasks: anyio.abc.TaskGroup, agent: str) -> Iterator[None]:
        self._speaker = agent
        self._quiet = QuietCalls()
        self._start(f"waiting for {agent}")
        ticker = anyio.CancelScope()
        tasks.start_soon(self._tick, ticker)
        try:
            yield
        finally:
            ticker.cancel()
            self._stop()

    def show(self, event: StreamEventMsg) -> None:
        match event:
            case Start(agent=speaker):
                self._speaker = speaker
                self._wait(f"waiting for {speaker}")
            case Queued(position=position):
                self._wait(f"queued: {position} ahead")
            case TextDelta(delta=delta):
                self._settle_thinking()
                self._waiting = None
                if settled := self._text.feed(delta):
                    self._print_block(settled)
                self._dirty = True
            case ThinkingDelta(delta=delta):
                self._waiting = None
                *done, self._thinking = (self._thinking + delta).split("\n")
                for line in done:
                    self._print(Text(line, style="dim italic"))
                self._dirty = True
            case ToolCall() if not self._quiet.hides(event):
                self._settle()
                self._print(tool_call_text(event), clip=True)
                self._wait(f"running {event.name}")
            case ToolResult() if not self._quiet.hides(event):
                self._print(tool_result_text(event), clip=True)
                self._wait(f"waiting for {self._speaker}")
            case Title(title=title):
                self._settle()
                self._print(Text(f"— {title} —", style="dim"))
            case Compaction():
                self._print(Text(f"({compaction_note(event)})", style="dim"))
            case End():
                self._waiting = None
                self._stop()  # the last block's render stays where it is
                problem = end_problem(event)
                if problem is not None:
                    style = "yellow" if event.status == "killed" else "red"
                    self.console.print(Text(problem, style=style))
            case _:
                pass

    def before_ask(self) -> None:
        self._stop()  # the question is asked on plain lines, with the typing echoed

    def after_ask(self) -> None:
        self._start(f"waiting for {self._speaker}")

    def failed(self, message: str) -> None:
        self.console.print(Text(message, style="red"))

    def interrupted(self) -> None:
        if self._live is None:
            self.console.print()  # after the echoed ^C
        # While live, the next redraw overwrites the ^C.

    def prompt(self) -> None:
        self.console.print(Text("you> ", style="bold green"), end="")
        self.console.file.flush()

    def input_ended(self) -> None:
        self.console.print()

    # --- the region ------------------------------------------------------------------------

    def region_parts(self) -> list[RenderableType]:
        """What the live region shows now (see `_Region`)."""
        parts: list[RenderableType] = []
        if self._thinking:
            parts.append(Text(self._thinking, style="dim italic"))
        text = self._text.pending
        if not self.final:
            # A block longer than the screen shows its end: redrawing all of it at every
            # tick would cost its whole length, and only the end fits.
            width, height = self.console.size
            text = self._text.tail(width * height, height)
        if text.strip():
            if self._blocks:
                parts.append(Text())
            parts.append(self._labelled(self._parsed(text)))

        if self._waiting is not None and not self.final:
            self._spinner.update(text=Text(self._waiting, style="dim"))
            parts.append(self._spinner)
        return parts

    def _parsed(self, text: str) -> Markdown:
        if self._markdown is None or self._markdown[0] != text:
            self._markdown = (text, Markdown(text))
        return self._markdown[1]

    def _labelled(self, body: RenderableType) -> RenderableType:
        """The speaker's label beside the segment's first block, a hanging indent after."""
        label = f"{self._speaker}> "
        if cell_len(label) > _LABEL_BESIDE_MAX:
            if self._blocks:
                return body
            return Group(Text(label.rstrip(), style="bold blue"), body)
        return _Beside(label if not self._blocks else " " * cell_len(label), "bold blue", body)

    def _print_block(self, text: str) -> None:
        if self._blocks:
            self._print(Text())
        self._print(self._labelled(Markdown(text)))
        self._blocks += 1

    def _settle_thinking(self) -> None:
        if self._thinking:
            self._print(Text(self._thinking, style="dim italic"))
            self._thinking = ""

    def _settle(self) -> None:
        """Print what the region holds above it: a tool line or a title comes next."""
        self._settle_thinking()
        text = self._text.flush()
        if text.strip():
            self._print_block(text)
        self._blocks = 0
        self._markdown = None
        self._dirty = True

    def _print(self, renderable: RenderableType, *, clip: bool = False) -> None:
        """Print above the region (rich redraws the region below it).

        ``clip``: one line, cut with an ellipsis at the screen's edge. Said to
        `print`, not set on the Text: `print` joins texts into a new one.
        """
        if clip:
            self.console.print(renderable, no_wrap=True, overflow="ellipsis")
        else:
            self.console.print(renderable)

    def _wait(self, words: str) -> None:
        self._waiting = words
        self._dirty = True

    # --- the live display --------------------------------------------------------------------

    def _start(self, waiting: str) -> None:
        self._waiting = waiting
        self.final = False
        self._live = Live(
            _Region(self),
            console=self.console,
            auto_refresh=False,
            transient=False,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self._live.start(refresh=True)

    def _stop(self) -> None:
        """Draw the region whole one last time and leave it on the screen."""
        if self._live is None:
            return
        live, self._live = self._live, None
        self.final = True
        try:
            live.stop()
        finally:
            self.final = False
            # What the region held is on the screen now: a new region starts empty.
            self._text = SettledMarkdown()
            self._thinking = ""
            self._blocks = 0
            self._markdown = None
            self._waiting = None

    async def _tick(self, scope: anyio.CancelScope) -> None:
        """Redraw at most `REFRESH_HZ` times a second: when something changed, or to spin."""
        with scope:
            while True:
                await anyio.sleep(1 / REFRESH_HZ)
                if self._live is not None and (self._dirty or self._waiting is not None):
                    self._dirty = False
                    self._live.refresh()
