"""`chinwag chat` on a pseudo-terminal, checked on what it draws, without a screenshot.

The chat runs in a real pty against a real daemon on the echo model; its output
goes through `Screen`, just enough of a VT100 for what rich writes (text,
carriage returns, cursor up, erase in line), so the assertions see the final
screen: what a person would see once the redraws have settled.
"""

from __future__ import annotations

import io
import os
import re

import anyio
import msgspec
from chinwag.clients._live_chat import LiveChat, SettledMarkdown
from chinwag.protocol import End, Entry, Start, TextDelta, ThinkingDelta, ToolCall, ToolResult
from rich.console import Console, Group
from test_cli import CHINWAG, Terminal, chinwag, fresh_sender

_CSI = re.compile(r"\x1b\[([0-9;?]*)([@-~])")
_OSC = re.compile(r"\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)")
_ESCAPES = re.compile(r"\x1b\[[0-9;?]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)")


class Screen:
    """A terminal's screen, every line kept (no scrolling off): what was drawn where."""

    def __init__(self) -> None:
        self.lines: list[list[str]] = [[]]
        self.row = 0
        self.col = 0
        self._partial = ""  # an escape sequence cut by a read

    def feed(self, data: str) -> None:
        data = self._partial + data
        self._partial = ""
        i = 0
        while i < len(data):
            char = data[i]
            if char == "\x1b":
                found = _CSI.match(data, i) or _OSC.match(data, i)
                if found is None:
                    if len(data) - i < 64:
                        self._partial = data[i:]  # the rest comes with the next read
                        return
                    i += 1
                    continue
                if found.re is _CSI:
                    self._csi(found.group(1), found.group(2))
                i = found.end()
                continue
            if char == "\r":
                self.col = 0
            elif char == "\n":  # the pty's ONLCR makes every newline a CR LF
                self.row += 1
                self.col = 0
            elif char == "\b":
                self.col = max(0, self.col - 1)
            elif char >= " ":
                line = self._line()
                line.extend(" " * (self.col + 1 - len(line)))
                line[self.col] = char
                self.col += 1
            i += 1

    def _line(self) -> list[str]:
        while len(self.lines) <= self.row:
            self.lines.append([])
        return self.lines[self.row]

    def _csi(self, params: str, command: str) -> None:
        if params.startswith("?"):
            return  # modes: the cursor shown or hidden
        numbers = [int(p) if p else 0 for p in params.split(";")] if params else []
        n = numbers[0] if numbers else 0
        match command:
            case "A":
                self.row = max(0, self.row - max(n, 1))
            case "B":
                self.row += max(n, 1)
            case "C":
                self.col += max(n, 1)
            case "D":
                self.col = max(0, self.col - max(n, 1))
            case "G":
                self.col = max(n, 1) - 1
            case "K":
                line = self._line()
                if n == 0:
                    del line[self.col :]
                elif n == 1:
                    line[: self.col + 1] = [" "] * min(len(line), self.col + 1)
                else:
                    line.clear()
            case "J" if n == 0:
                del self._line()[self.col :]
                del self.lines[self.row + 1 :]
            case _:
                pass  # colours and styles

    def text(self) -> str:
        return "\n".join("".join(line).rstrip() for line in self.lines).rstrip("\n")


class LiveTerminal(Terminal):
    """`chinwag chat` on a pty that looks like a colour terminal, 100 columns by 40 lines."""

    expect_timeout_s = 20.0

    def __init__(self, argv: list[str]) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR")}
        env.update(TERM="xterm-256color", COLUMNS="100", LINES="40")
        self.screen = Screen()
        super().__init__(argv, env)

    def plain(self) -> str:
        """What was written, its escape sequences removed (every redraw included)."""
        return _ESCAPES.sub("", self.raw)

    def _searched(self) -> str:
        return self.plain()

    def _shown(self) -> str:
        return self.screen.text()

    def _received(self, text: str) -> None:
        self.screen.feed(text)


def screen_lines(term: LiveTerminal, start: str) -> list[str]:
    return [line for line in term.screen.text().splitlines() if line.startswith(start)]


def test_chat_renders_markdown_titles_tools_and_kills_on_a_terminal(daemon) -> None:
    sender = fresh_sender()
    term = LiveTerminal([CHINWAG, "--socket", str(daemon.socket_path), "chat", "--sender", sender,
                         "assistant"])  # fmt: skip
    try:
        term.expect("you> ")
        term.type("**bold** and `code` and a list\n")
        term.expect("you> ")
        # The Markdown was rendered: its markers are gone, the speaker's label is there.
        assert screen_lines(term, "assistant> ") == ["assistant> bold and code and a list"]
        # A spinner showed while the model had not answered, and was wiped afterwards.
        assert "waiting for assistant" in term.plain()
        assert "waiting for" not in term.screen.text()

        term.type("/title Live Title\n")
        term.expect("you> ")
        [call] = screen_lines(term, "  ⚙ set_title(")
        assert call == '  ⚙ set_title({"title": "Live Title"})'
        [result] = screen_lines(term, "  ↳ ")
        assert re.fullmatch(r"  ↳ \S.* \d+ ms", result), result
        assert screen_lines(term, "— Live Title —") == ["— Live Title —"]

        term.type("/ask Favourite colour?\n")
        term.expect(r"answer> ")
        assert screen_lines(term, "? Favourite colour?") == ["? Favourite colour?"]
        term.type("teal\n")
        term.expect("you> ")
        assert screen_lines(term, "assistant> teal") == ["assistant> teal"]

        term.type("/slow 200 50\n")
        term.expect(r"assistant> 1 2 3")
        term.type("\x03")
        term.expect("killing the run")
        term.expect("the run was killed")
        term.expect("you> ")
        screen = term.screen.text()
        assert "killing the run (Ctrl-C again to quit)" in screen
        # What streamed before the kill stays on the screen, cut where it was.
        [killed] = screen_lines(term, "assistant> 1 2 3")
        assert "200" not in killed
        term.type("\x03")
        assert term.wait() == 0, term.screen.text()
    finally:
        term.close()
    assert "Traceback" not in term.plain()
    history = chinwag(daemon.socket_path, "history", "--json", "--sender", sender, "assistant")
    entries = [msgspec.json.decode(line, type=Entry) for line in history.stdout.splitlines()]
    assert [(e.role, e.content) for e in entries if e.role != "tool"][-2:] == [
        ("assistant", "teal"),
        ("user", "/slow 200 50"),
    ]


def test_chat_on_a_terminal_shows_the_guest_speaking(daemon) -> None:
    term = LiveTerminal([CHINWAG, "--socket", str(daemon.socket_path), "chat", "--sender",
                         fresh_sender(), "--guest", "helper", "assistant"])  # fmt: skip
    try:
        term.expect("you> ")
        term.type("over to *you*\n")
        term.expect("you> ")
        assert screen_lines(term, "helper> ") == ["helper> over to you"]
        term.type("\x04")  # Ctrl-D at the prompt quits
        assert term.wait() == 0, term.screen.text()
    finally:
        term.close()


def test_chat_plain_on_a_terminal_keeps_line_output(daemon) -> None:
    term = LiveTerminal([CHINWAG, "--socket", str(daemon.socket_path), "chat", "--plain",
                         "--sender", fresh_sender(), "assistant"])  # fmt: skip
    try:
        term.expect("you> ")
        term.type("**as typed**\n")
        term.expect(r"assistant> \*\*as typed\*\*")
        term.expect("you> ")
        assert "waiting for" not in term.plain()
        term.type("\x04")
        assert term.wait() == 0, term.screen.text()
    finally:
        term.close()


# --- settling streamed Markdown, without a terminal --------------------------------------


def settle(text: str, step: int) -> list[str]:
    """Feed ``text`` ``step`` characters at a time; the settled blocks, then the rest."""
    splitter = SettledMarkdown()
    blocks = []
    for i in range(0, len(text), step):
        if settled := splitter.feed(text[i : i + step]):
            blocks.append(settled)
    return [*blocks, splitter.flush()]


def test_markdown_settles_at_blank_lines_outside_code_fences() -> None:
    text = (
        "First paragraph\nstill first.\n\n"
        "```python\nx = 1\n\ny = 2\n```\n\n"
        "- a list\n\n  continued item\n- b\n\n"
        "Last, unfinished"
    )
    expected = [
        "First paragraph\nstill first.",
        "```python\nx = 1\n\ny = 2\n```",
        "- a list\n\n  continued item\n- b",
        "Last, unfinished",
    ]
    for step in (1, 2, 3, 7):
        assert settle(text, step) == expected, step
    # Blocks settled by one delta come out together.
    assert settle(text, len(text)) == ["\n\n".join(expected[:3]), expected[3]]
    # Nothing settles while the block after the blank line has not begun.
    splitter = SettledMarkdown()
    assert splitter.feed("one\n\n") == ""
    assert splitter.feed("  indented: still the same block\n\n") == ""
    assert splitter.feed("two") == "one\n\n  indented: still the same block"
    assert splitter.pending == "two"


def test_live_chat_dims_thinking_and_redraws_only_the_end_of_a_tall_block() -> None:
    out = io.StringIO()
    console = Console(
        file=out, force_terminal=True, force_interactive=True, width=60, height=10,
        color_system="standard",
    )  # fmt: skip
    view = LiveChat(console)
    code = [f"line {i}" for i in range(50)]

    async def turn() -> list[str]:
        async with anyio.create_task_group() as tasks:
            with view.turn(tasks, "assistant"):
                view.show(Start(id=1, run_id="r", agent="assistant", seq=1))
                view.show(ThinkingDelta(id=1, delta="let me\nthink"))
                view.show(TextDelta(id=1, delta="Intro.\n\n```\n"))
                for line in code:
                    view.show(TextDelta(id=1, delta=line + "\n"))
                region = console.render_lines(Group(*view.region_parts()), console.options)
                view.show(
                    ToolCall(id=1, call_id="c", name="read_file", arguments="{" + "x" * 99 + "}")
                )
                view.show(
                    ToolResult(id=1, call_id="c", output="done", is_error=False, duration_ms=3)
                )
                view.show(TextDelta(id=1, delta="After."))
                view.show(End(id=1, status="done", error=None, last_seq=4))
            tasks.cancel_scope.cancel()
        return ["".join(segment.text for segment in line).rstrip() for line in region]

    region = anyio.run(turn)
    # While streaming, a block taller than the screen is redrawn from its end only.
    # (A code block's padding adds a line above and below its source lines.)
    assert len(region) <= 12 and any("line 49" in row for row in region[-2:]), region
    assert not any("line 39" in row for row in region), region
    screen = Screen()
    screen.feed(out.getvalue().replace("\n", "\r\n"))
    lines = screen.text().splitlines()
    # Thinking is dimmed (SGR 2) and comes first; then the Markdown, each line once.
    assert "\x1b[2;3mlet me" in out.getvalue()
    assert lines[:3] == ["let me", "think", "assistant> Intro."]
    assert [row.strip() for row in lines if row.strip().startswith("line ")] == code
    # The tool call is clipped to the screen's width, on one line.
    [call] = [row for row in lines if "⚙" in row]
    assert call.startswith("  ⚙ read_file({xxx") and call.endswith("…") and len(call) == 60
    assert lines[-1] == "assistant> After."
