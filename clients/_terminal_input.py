"""The person at the terminal: lines typed on stdin, and answers to an agent's questions."""

from __future__ import annotations

import codecs
import os
import threading

import anyio
import anyio.from_thread
import anyio.lowlevel
from chinwag.protocol import AskUser
from rich.console import Console
from rich.text import Text


class LineReader:
    """Reads lines from stdin in a daemon thread, one line per request.

    A prompt abandoned on Ctrl-C leaves its read outstanding; the next prompt
    takes that line instead of starting a second reader. It reads the raw file
    descriptor, not ``sys.stdin``, so a thread blocked in it holds no Python
    lock that would hang the interpreter's exit.
    """

    def __init__(self) -> None:
        self._wanted = threading.Semaphore(0)
        send, receive = anyio.create_memory_object_stream[str | None](1)
        self._send = send
        self._receive = receive
        self._thread: threading.Thread | None = None
        self._outstanding = False
        self._eof = False

    async def readline(self) -> str | None:
        """The next line without its newline, or None at end of input."""
        if self._eof:
            return None
        if self._thread is None:
            token = anyio.lowlevel.current_token()
            self._thread = threading.Thread(
                target=self._read_lines, args=(token,), name="chinwag-stdin", daemon=True
            )
            self._thread.start()
        if not self._outstanding:
            self._outstanding = True
            self._wanted.release()
        line = await self._receive.receive()
        self._outstanding = False
        if line is None:
            self._eof = True
        return line

    def _read_lines(self, token: anyio.lowlevel.EventLoopToken) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        buffered = ""
        while True:
            self._wanted.acquire()
            while "\n" not in buffered:
                try:
                    chunk = os.read(0, 4096)
                except OSError:
                    chunk = b""
                if not chunk:
                    break
                buffered += decoder.decode(chunk)
            line: str | None
            if "\n" in buffered:
                line, buffered = buffered.split("\n", 1)
            elif buffered:
                line, buffered = buffered, ""
            else:
                line = None
            try:
                anyio.from_thread.run_sync(self._send.send_nowait, line, token=token)
            except Exception:
                return  # the event loop is gone: nobody is waiting for lines
            if line is None:
                return


def _parse_choice(answer: str, labels: list[str], multi: bool) -> str:
    """Numbers typed at an options prompt become the options' labels."""
    parts = answer.replace(",", " ").split()
    if not parts or not all(p.isdigit() and 1 <= int(p) <= len(labels) for p in parts):
        return answer
    if len(parts) > 1 and not multi:
        return answer
    return ", ".join(labels[int(p) - 1] for p in parts)


async def ask_on_terminal(ask: AskUser, lines: LineReader, console: Console) -> str | None:
    """Put an ``ask_user`` to the person at the terminal; None if input ended."""
    answers: list[tuple[str, str]] = []
    for question in ask.questions:
        heading = Text("? ", style="bold magenta")
        if question.header:
            heading.append(f"{question.header}: ", style="bold")
        heading.append(question.question)
        console.print(heading)
        labels = [option.label for option in question.options]
        for number, option in enumerate(question.options, 1):
            line = Text(f"  {number}. ", style="cyan")
            line.append(option.label)
            if option.description:
                line.append(f"  {option.description}", style="dim")
            console.print(line)
        if labels:
            hint = (
                "numbers, comma separated, or text" if question.multi_select else "number or text"
            )
            console.print(Text(f"  ({hint})", style="dim"))
        console.print(Text("answer> ", style="bold magenta"), end="")
        console.file.flush()
        answer = await lines.readline()
        if answer is None:
            console.print()
            return None
        answers.append(
            (question.question, _parse_choice(answer.strip(), labels, question.multi_select))
        )
    return joined_answers(answers)


def joined_answers(answers: list[tuple[str, str]]) -> str:
    """One reply to an ``ask_user`` from its (question, answer) pairs: the answer alone
    for one question, else a line per question."""
    if len(answers) == 1:
        return answers[0][1]
    return "\n".join(f"{question}: {answer}" for question, answer in answers)
