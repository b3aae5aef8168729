"""The `chinwag` command: talk to the daemon from a terminal or a script.

Every command but `serve` is a client of the daemon over its Unix socket,
through the client library, under anyio's asyncio backend. `serve` replaces
this process with the daemon itself (`python -m chinwag.daemon`), so the CLI
never imports the daemon.
"""

from __future__ import annotations

import codecs
import contextlib
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal, NoReturn, Protocol, TypeVar

import anyio
import anyio.abc
import anyio.from_thread
import anyio.lowlevel
import click
import msgspec
from chinwag.protocol import (
    JSON,
    AgentItem,
    AskUser,
    Compaction,
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
    ToolResult,
    Usage,
    default_socket_path,
)
from click.shell_completion import CompletionItem
from rich.console import Console
from rich.table import Table
from rich.text import Text

from . import mcp, telegram
from ._client import (
    ChinwagError,
    Client,
    ConnectionLost,
    DaemonUnreachable,
    connect,
    connect_explained,
)

_T = TypeVar("_T")

CLIENT_NAME = "chinwag-cli"
#: How long `send` and `chat` wait for a daemon they started to listen.
START_TIMEOUT_S = 15.0
#: How long `stop` waits for the daemon to exit: its shutdown grace (10 s by default) and more.
STOP_TIMEOUT_S = 30.0


# --- failures ------------------------------------------------------------------


class Failure(click.ClickException):
    """An expected failure: one line on stderr, exit status 1, no traceback."""

    exit_code = 1

    def show(self, file: IO[str] | None = None) -> None:
        print(f"chinwag: {self.message}", file=file or sys.stderr, flush=True)


def _describe(exc: ChinwagError) -> str:
    if isinstance(exc, ConnectionLost):
        return exc.message
    return f"error {exc.code}: {exc.message}"


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _run(fn: Callable[[], Awaitable[_T]]) -> _T:
    """Run one command's async body on asyncio, turning expected errors into `Failure`."""

    async def body() -> _T:
        return await fn()

    try:
        return anyio.run(body, backend="asyncio")
    except ChinwagError as exc:
        raise Failure(_describe(exc)) from exc
    except BaseExceptionGroup as group:
        # Task groups wrap what their tasks raise; an expected failure inside
        # one is still an expected failure.
        for leaf in _leaves(group):
            if isinstance(leaf, click.ClickException):
                raise leaf from None
            if isinstance(leaf, ChinwagError):
                raise Failure(_describe(leaf)) from None
        raise


# --- settings and connecting ------------------------------------------------------


@dataclass
class Settings:
    socket: Path
    socket_given: bool


def _settings(ctx: click.Context) -> Settings:
    settings = ctx.find_object(Settings)
    assert settings is not None, "the `chinwag` group sets it up"
    return settings


def _no_daemon(path: Path) -> Failure:
    return Failure(DaemonUnreachable.nobody_at(path).message)


def _accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
        return True


def daemon_log_path(socket_path: Path) -> Path:
    """Where a daemon started in the background writes its logs: next to its socket."""
    return socket_path.with_name(socket_path.stem + ".log")


def ensure_daemon(socket_path: Path, timeout: float = START_TIMEOUT_S) -> None:
    """Start a daemon in the background unless one listens on ``socket_path``.

    Like tmux: the daemon gets its own session, so it outlives this command and
    a Ctrl-C at the terminal never reaches it.
    """
    if _accepts(socket_path):
        return
    socket_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    log_path = daemon_log_path(socket_path)
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "chinwag.daemon", "--socket", str(socket_path)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            close_fds=True,
        )
    deadline = time.monotonic() + timeout
    while not _accepts(socket_path):
        status = proc.poll()
        if status is not None:
            if _accepts(socket_path):
                return  # another client's daemon won the race for the socket
            raise Failure(
                f"the daemon exited with status {status} before listening on {socket_path}; "
                f"see its log at {log_path}"
            )
        if time.monotonic() > deadline:
            raise Failure(
                f"the daemon did not listen on {socket_path} within {timeout:g} s; "
                f"see its log at {log_path}"
            )
        time.sleep(0.05)  # polling another process's socket: there is no event to wait on
    print(
        f"chinwag: started a daemon in the background (pid {proc.pid}, log {log_path})",
        file=sys.stderr,
        flush=True,
    )


_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def daemon_pid(socket_path: Path) -> int:
    """The pid of the process listening on ``socket_path`` (its SO_PEERCRED)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(socket_path))
        except OSError:
            raise _no_daemon(socket_path) from None
        creds = probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    pid, _uid, _gid = _PEERCRED.unpack(creds)
    return int(pid)


def _is_daemon(pid: int) -> bool:
    """Whether ``pid`` runs `chinwag serve` or `python -m chinwag.daemon`."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return False
    head = argv[:3]  # the interpreter, -m, the module; or the console script
    return "chinwag.daemon" in head or any(Path(arg).name == "chinwag" for arg in head)


def _program(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "unknown"


def _alive(pid: int) -> bool:
    """Whether ``pid`` still runs: a zombie, exited but not yet reaped, does not."""
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return status.rpartition(")")[2].split()[0] != "Z"  # the state, after "(command)"


@contextlib.asynccontextmanager
async def _connect(settings: Settings) -> AsyncIterator[Client]:
    """Connect, turning "nothing listens there" into one clear line."""
    try:
        async with connect_explained(settings.socket, client=CLIENT_NAME) as client:
            yield client
    except DaemonUnreachable as exc:
        raise Failure(exc.message) from exc


#: How long shell completion waits for the daemon before offering nothing.
COMPLETE_TIMEOUT_S = 2.0


def complete_agents(
    ctx: click.Context, param: click.Parameter, incomplete: str
) -> list[CompletionItem]:
    """Shell completion of agent names, from the running daemon's `list_agents`.

    Nothing at all when no daemon answers: completion must never print errors.
    """
    given = ctx.find_root().params.get("socket_path")
    path = given if isinstance(given, Path) else default_socket_path()

    async def agents() -> list[AgentItem]:
        with anyio.fail_after(COMPLETE_TIMEOUT_S):
            async with connect(path, client=CLIENT_NAME) as client:
                return await client.list_agents()

    try:
        items = anyio.run(agents, backend="asyncio")
    except Exception:
        return []
    return [
        CompletionItem(item.name, help=item.description or None)
        for item in items
        if item.name.startswith(incomplete)
    ]


# Options several commands take, alike.
sender_option = click.option("--sender", help="Whose conversation (default: user).")
guest_option = click.option(
    "--guest",
    help="Let this agent answer instead, over the conversation's history.",
    shell_complete=complete_agents,
)
cwd_option = click.option(
    "--cwd",
    type=click.Path(file_okay=False, resolve_path=True),
    help="Working directory for the runs' tools.",
)


# --- terminal input ------------------------------------------------------------------


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
    if len(answers) == 1:
        return answers[0][1]
    return "\n".join(f"{question}: {answer}" for question, answer in answers)


# --- rendering events --------------------------------------------------------------------


def _compaction_note(event: Compaction) -> str:
    return f"the context was full: {event.archived_entries} entries compacted into {event.archive}"


def _clip(text: str, width: int = 100) -> str:
    one_line = " ".join(text.split())
    return one_line if len(one_line) <= width else one_line[: width - 1] + "…"


def line_console(*, stderr: bool = False) -> Console:
    """A console for line output: lines are never hard-wrapped, so a pipe or a
    narrow terminal gets them whole."""
    return Console(stderr=stderr, highlight=False, soft_wrap=True)


def _tool_call_text(event: ToolCall, indent: str = "  ") -> Text:
    text = Text(f"{indent}⚙ ", style="dim cyan")
    text.append(event.name, style="cyan")
    text.append(f"({_clip(event.arguments, 80)})", style="dim")
    return text


def _tool_result_text(event: ToolResult, indent: str = "  ") -> Text:
    style = "red" if event.is_error else "dim"
    text = Text(f"{indent}↳ ", style=style)
    text.append(_clip(event.output, 100) or "(no output)", style=style)
    text.append(f"  {event.duration_ms:.0f} ms", style="dim")
    return text


def _end_problem(end: End) -> str | None:
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


# --- the command group ----------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--socket",
    "socket_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The daemon's Unix socket (default: $CHINWAG_SOCKET, "
    "else $XDG_RUNTIME_DIR/chinwag/chinwag.sock).",
)
@click.pass_context
def cli(ctx: click.Context, socket_path: Path | None) -> None:
    """Talk to the chinwag daemon: run turns, follow runs, read history."""
    ctx.obj = Settings(
        socket=socket_path if socket_path is not None else default_socket_path(),
        socket_given=socket_path is not None,
    )


@cli.command()
@click.option("--config", type=click.Path(dir_okay=False, path_type=Path), help="config.toml")
@click.option(
    "--socket",
    "serve_socket",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The Unix socket to listen on.",
)
@click.option("--storage", help="Storage URL: sqlite:////abs/path.db, jsonl:////dir, memory:, ...")
@click.pass_context
def serve(
    ctx: click.Context, config: Path | None, serve_socket: Path | None, storage: str | None
) -> NoReturn:
    """Run the daemon in the foreground (replaces this process)."""
    settings = _settings(ctx)
    args: list[str] = []
    if config is not None:
        args += ["--config", str(config)]
    if serve_socket is None and settings.socket_given:
        serve_socket = settings.socket
    if serve_socket is not None:
        args += ["--socket", str(serve_socket)]
    if storage is not None:
        args += ["--storage", storage]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "chinwag.daemon", *args])


# --- send ------------------------------------------------------------------------------


@cli.command()
@click.argument("agent", shell_complete=complete_agents)
@click.argument("text")
@sender_option
@guest_option
@cwd_option
@click.option(
    "--queue",
    type=click.Choice(["enqueue", "reject", "interrupt"]),
    default="enqueue",
    show_default=True,
    help="What to do when the conversation is busy.",
)
@click.option("--json", "as_json", is_flag=True, help="Print every event as one JSON line.")
@click.pass_context
def send(
    ctx: click.Context,
    agent: str,
    text: str,
    sender: str | None,
    guest: str | None,
    cwd: str | None,
    queue: Literal["enqueue", "reject", "interrupt"],
    as_json: bool,
) -> None:
    """Send TEXT to AGENT and stream the reply to stdout."""
    settings = _settings(ctx)
    ensure_daemon(settings.socket)
    err = line_console(stderr=True)
    out = TextOut(sys.stdout)
    view = _SendView(out, err)
    lines = LineReader()

    async def body() -> None:
        async with (
            _connect(settings) as client,
            client.stream(agent, text, sender=sender, guest=guest, cwd=cwd, queue=queue) as events,
        ):
            async for event in events:
                if as_json:
                    sys.stdout.buffer.write(JSON.encode(event) + b"\n")
                    sys.stdout.buffer.flush()
                else:
                    view.show(event)
                if isinstance(event, AskUser):
                    out.end_line()
                    answer = await ask_on_terminal(event, lines, err)
                    if answer is None:
                        raise Failure(
                            "the agent asked a question but input ended; answer it with "
                            f'"chinwag reply {agent} TEXT"'
                        )
                    await client.reply_to_ask(agent, answer, sender=sender, ask_id=event.ask_id)
                if isinstance(event, End):
                    out.end_line()
                    problem = _end_problem(event)
                    if problem is not None:
                        raise Failure(problem)

    try:
        _run(body)
    except KeyboardInterrupt:
        out.end_line()
        print(
            f'chinwag: interrupted; the run goes on in the daemon (stop it with "chinwag kill '
            f'{agent}")',
            file=sys.stderr,
        )
        sys.exit(130)


class _SendView:
    """`send` keeps stdout for the reply's text; everything else goes to stderr."""

    def __init__(self, out: TextOut, err: Console) -> None:
        self.out = out
        self.err = err
        self.thinking = False
        self.quiet = QuietCalls()

    def show(self, event: StreamEventMsg) -> None:
        if self.thinking and not isinstance(event, ThinkingDelta):
            self.err.print()
            self.thinking = False
        match event:
            case TextDelta(delta=delta):
                self.out.write(delta)
            case ThinkingDelta(delta=delta):
                self.out.end_line()
                self.err.print(Text(delta, style="dim italic"), end="")
                self.thinking = True
            case ToolCall() if not self.quiet.hides(event):
                self.out.end_line()
                self.err.print(_tool_call_text(event))
            case ToolResult() if not self.quiet.hides(event):
                self.err.print(_tool_result_text(event))
            case Title(title=title):
                self.out.end_line()
                self.err.print(Text(f"title: {title}", style="dim"))
            case Queued(position=position):
                self.err.print(Text(f"queued: {position} ahead", style="dim"))
            case Compaction():
                self.err.print(Text(_compaction_note(event), style="dim"))
            case _:
                pass


# --- chat --------------------------------------------------------------------------------


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
                console.print(_tool_call_text(event))
            case ToolResult() if not self.quiet.hides(event):
                out.end_line()
                console.print(_tool_result_text(event))
            case Title(title=title):
                out.end_line()
                console.print(Text(f"— {title} —", style="dim"))
            case Queued(position=position):
                console.print(Text(f"(queued: {position} ahead)", style="dim"))
            case Compaction():
                console.print(Text(f"({_compaction_note(event)})", style="dim"))
            case End():
                out.end_line()
                problem = _end_problem(event)
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


@cli.command()
@click.argument("agent", shell_complete=complete_agents)
@sender_option
@guest_option
@cwd_option
@click.option(
    "--plain",
    is_flag=True,
    help="Line output, no live Markdown (the default when stdout is not a terminal).",
)
@click.pass_context
def chat(
    ctx: click.Context,
    agent: str,
    sender: str | None,
    guest: str | None,
    cwd: str | None,
    plain: bool,
) -> None:
    """Talk with AGENT interactively.

    On a terminal the reply is rendered as Markdown as it streams, with tool
    calls and results one line each. Ctrl-C during a reply kills the run
    (twice quits); Ctrl-C or Ctrl-D at the prompt quits.
    """
    settings = _settings(ctx)
    ensure_daemon(settings.socket)
    view: ChatView
    if plain or not _live_terminal():
        view = PlainChat()
    else:
        # Imported here: only a live terminal pays for rich's Markdown and Live.
        from ._live_chat import LiveChat

        view = LiveChat()
    state = _ChatState(guest=guest, cwd=cwd)
    _run(lambda: _chat(settings, agent, sender, state, view))


async def _chat(
    settings: Settings, agent: str, sender: str | None, state: _ChatState, view: ChatView
) -> None:
    console = view.console
    lines = LineReader()
    guest = state.guest
    async with _connect(settings) as client:
        for name in (agent, guest):
            if name is not None and name not in client.welcome.agents:
                hosted = ", ".join(client.welcome.agents) or "none"
                raise Failure(f"unknown agent {name!r}; the daemon hosts: {hosted}")
        with contextlib.suppress(ChinwagError):
            state.title = (await client.history(agent, sender, limit=0)).title
        header = Text(f"chatting with {agent}", style="bold")
        if guest is not None:
            header.append(f" (answered by its guest {guest})", style="bold")
        if state.title:
            header.append(f" — {state.title}", style="dim")
        header.append("  (Ctrl-C stops a reply, Ctrl-C or Ctrl-D at the prompt quits)", style="dim")
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
        console.print(Text(f"could not kill the run: {_describe(exc)}", style="red"))


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
        view.failed(_describe(exc))
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
            console.print(Text(f"the answer was refused: {_describe(exc)}", style="red"))


# --- reading ---------------------------------------------------------------------------


@cli.command()
@click.argument("agent", shell_complete=complete_agents)
@sender_option
@click.option(
    "--all", "include_archived", is_flag=True, help="Include archived (compacted) entries."
)
@click.option("--json", "as_json", is_flag=True, help="Print every entry as one JSON line.")
@click.pass_context
def history(
    ctx: click.Context, agent: str, sender: str | None, include_archived: bool, as_json: bool
) -> None:
    """Print a conversation's history."""
    settings = _settings(ctx)

    async def body() -> None:
        async with _connect(settings) as client:
            reply = await client.history(agent, sender, include_archived=include_archived)
            # A history too long for one frame comes in pages: read on to its last entry.
            entries = reply.entries
            while entries and entries[-1].seq < reply.last_seq:
                page = await client.history(
                    agent, sender, after_seq=entries[-1].seq, include_archived=include_archived
                )
                if not page.entries:
                    break
                entries.extend(page.entries)
        if as_json:
            for entry in entries:
                sys.stdout.buffer.write(JSON.encode(entry) + b"\n")
            sys.stdout.buffer.flush()
            return
        console = line_console()
        heading = Text(f"{reply.agent}/{reply.sender}", style="bold")
        if reply.title:
            heading.append(f" — {reply.title}")
        console.print(heading)
        for entry in entries:
            console.print(_entry_text(entry))

    _run(body)


def _entry_text(entry: Entry) -> Text:
    seq = Text(f"#{entry.seq} ", style="dim")
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
        seq.append(call.name, style="cyan")
        seq.append(f"({_clip(call.arguments, 80)})", style="dim")
    return seq


@cli.command(name="ls")
@click.option("--agent", help="Only this agent's conversations.", shell_complete=complete_agents)
@click.option("--json", "as_json", is_flag=True, help="Print every conversation as one JSON line.")
@click.pass_context
def list_conversations(ctx: click.Context, agent: str | None, as_json: bool) -> None:
    """List conversations, most recently updated first."""
    settings = _settings(ctx)

    async def body() -> None:
        async with _connect(settings) as client:
            items = [item async for item in client.iter_conversations(agent)]
        if as_json:
            for item in items:
                sys.stdout.buffer.write(JSON.encode(item) + b"\n")
            sys.stdout.buffer.flush()
            return
        console = Console(highlight=False)
        if not items:
            console.print("no conversations")
            return
        table = Table(box=None, header_style="bold")
        for column in ("agent", "sender", "title", "updated", "seq", "running"):
            table.add_column(column, overflow="fold")
        for item in items:
            updated = (
                item.updated_at.astimezone().strftime("%Y-%m-%d %H:%M") if item.updated_at else ""
            )
            table.add_row(
                item.agent,
                item.sender,
                item.title,
                updated,
                str(item.last_seq),
                "yes" if item.running else "",
            )
        console.print(table)

    _run(body)


@cli.command()
@click.pass_context
def agents(ctx: click.Context) -> None:
    """List the agents the daemon hosts."""
    settings = _settings(ctx)

    async def body() -> None:
        async with _connect(settings) as client:
            items = await client.list_agents()
        console = Console(highlight=False)
        table = Table(box=None, header_style="bold")
        for column in ("name", "model", "tools", "description"):
            table.add_column(column, overflow="fold")
        for item in items:
            table.add_row(item.name, item.model, ", ".join(item.tools), item.description)
        console.print(table)

    _run(body)


@cli.command()
@click.option("--agent", help="Only this agent's runs.", shell_complete=complete_agents)
@click.option("--sender", help="Only this sender's runs.")
@click.option("--json", "as_json", is_flag=True, help="Print every event frame as one JSON line.")
@click.pass_context
def tail(ctx: click.Context, agent: str | None, sender: str | None, as_json: bool) -> None:
    """Follow runs as they happen, until Ctrl-C."""
    settings = _settings(ctx)
    out = TextOut(sys.stdout)

    async def body() -> None:
        console = line_console()
        last_run: str | None = None
        async with _connect(settings) as client, anyio.create_task_group() as tasks:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as interrupts:
                tasks.start_soon(_cancel_on_first, interrupts, tasks.cancel_scope)
                async with client.subscribe(agent, sender) as subscription:
                    async for frame in subscription:
                        if as_json:
                            sys.stdout.buffer.write(JSON.encode(frame) + b"\n")
                            sys.stdout.buffer.flush()
                            continue
                        last_run = _render_tail_event(frame, last_run, out, console)
                tasks.cancel_scope.cancel()
        out.end_line()

    _run(body)


async def _cancel_on_first(
    interrupts: AsyncIterator[signal.Signals], scope: anyio.CancelScope
) -> None:
    async for _ in interrupts:
        scope.cancel()
        return


def _render_tail_event(frame: Event, last_run: str | None, out: TextOut, console: Console) -> str:
    """Text of one run continues on its line while no other run interleaves."""
    event = frame.event
    prefix = Text(f"[{frame.agent}/{frame.sender}] ", style="bold blue")
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
            line.append_text(_tool_call_text(event, indent=""))
        case ToolResult():
            line.append_text(_tool_result_text(event, indent=""))
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
            problem = _end_problem(event)
            line.append(f"end {status}" + (f": {problem}" if problem else ""), style="dim")
        case _:
            pass
    console.print(line)
    return frame.run_id


# --- acting on conversations --------------------------------------------------------------


@cli.command()
@click.option(
    "--timeout",
    type=float,
    default=STOP_TIMEOUT_S,
    show_default=True,
    help="Seconds to wait for the daemon to exit.",
)
@click.pass_context
def stop(ctx: click.Context, timeout: float) -> None:
    """Stop the daemon, as SIGTERM does: runs in flight get its shutdown grace.

    The next `send` or `chat` starts a daemon again, with the config as it is then.
    """
    settings = _settings(ctx)
    pid = daemon_pid(settings.socket)
    if not _is_daemon(pid):
        # Under socket activation the listener is systemd's, not the daemon's.
        raise Failure(
            f"{settings.socket} is held by pid {pid} ({_program(pid)}), not by a chinwag"
            " daemon; stop it with its service manager, e.g. systemctl --user stop"
            " chinwag.socket chinwag.service"
        )
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            raise Failure(
                f"the daemon (pid {pid}) is still running {timeout:g} s after SIGTERM; see its"
                f" log at {daemon_log_path(settings.socket)}"
            )
        time.sleep(0.05)  # another process's exit: there is no event to wait on
    print(f"chinwag: stopped the daemon (pid {pid})", file=sys.stderr)


@cli.command()
@click.argument("agent", shell_complete=complete_agents)
@sender_option
@click.option("--all", "kill_all", is_flag=True, help="Also drop every run queued behind it.")
@click.pass_context
def kill(ctx: click.Context, agent: str, sender: str | None, kill_all: bool) -> None:
    """Kill the conversation's run in flight."""
    settings = _settings(ctx)

    async def body() -> None:
        async with _connect(settings) as client:
            reply = await client.kill(agent, sender, all=kill_all)
        if reply.run_id is None:
            print("nothing was running")
        else:
            print(f"killed run {reply.run_id}")

    _run(body)


@cli.command()
@click.argument("agent", shell_complete=complete_agents)
@click.argument("text")
@sender_option
@click.option("--ask-id", help="The ask being answered (refused if another is pending).")
@click.pass_context
def reply(
    ctx: click.Context, agent: str, text: str, sender: str | None, ask_id: str | None
) -> None:
    """Answer the question AGENT is asking."""
    settings = _settings(ctx)

    async def body() -> None:
        async with _connect(settings) as client:
            await client.reply_to_ask(agent, text, sender=sender, ask_id=ask_id)

    _run(body)


@cli.command()
@click.argument("agent", shell_complete=complete_agents)
@sender_option
@click.option("--instructions", help="What the summary must keep.")
@click.pass_context
def compact(ctx: click.Context, agent: str, sender: str | None, instructions: str | None) -> None:
    """Summarize a conversation into an archive and start its context afresh."""
    settings = _settings(ctx)

    async def body() -> None:
        async with _connect(settings) as client:
            done = await client.compact(agent, sender, instructions=instructions)
        console = line_console()
        console.print(
            Text(f"archived {done.archived_entries} entries as {done.archive}", style="bold")
        )
        console.print(Text(done.summary))

    _run(body)


@cli.command()
@click.argument("agent", shell_complete=complete_agents)
@click.argument("query")
@click.option("--limit", default=10, show_default=True, help="At most this many matches.")
@click.option("--json", "as_json", is_flag=True, help="Print every match as one JSON line.")
@click.pass_context
def search(ctx: click.Context, agent: str, query: str, limit: int, as_json: bool) -> None:
    """Search AGENT's memory: its notes and the archives of its compacted conversations."""
    settings = _settings(ctx)

    async def body() -> None:
        async with _connect(settings) as client:
            hits = await client.search_memory(agent, query, limit=limit)
        if as_json:
            for hit in hits:
                sys.stdout.buffer.write(JSON.encode(hit) + b"\n")
            return
        console = line_console()
        if not hits:
            console.print(Text(f"nothing in {agent}'s memory matches {query!r}", style="dim"))
        for number, hit in enumerate(hits, 1):
            line = Text(f"{number}. {hit.kind} {hit.name}", style="bold")
            about = [hit.sender] if hit.sender else []
            if hit.created_at is not None:
                about.append(f"{hit.created_at:%Y-%m-%d %H:%M}")
            line.append(f" ({', '.join(about)})" if about else "", style="dim")
            console.print(line)
            console.print(Text(f"   {hit.snippet}"))

    _run(body)


# --- doctor ------------------------------------------------------------------------------

#: How long the doctor waits for the daemon's answers on the socket.
DOCTOR_SOCKET_TIMEOUT_S = 5.0
#: How long the daemon-side checks (`python -m chinwag.daemon --check`) may take.
DOCTOR_CHECK_TIMEOUT_S = 60.0

_START_HINT = (
    'start one with "chinwag serve", or enable the systemd socket: '
    "systemctl --user enable --now chinwag.socket"
)

CheckStatus = Literal["ok", "warn", "fail"]


class _Finding(msgspec.Struct, kw_only=True):
    """One finding of `python -m chinwag.daemon --check` (daemon/_check.py's `Finding`)."""

    check: str
    subject: str
    status: Literal["ok", "warn", "fail", "in_use"]
    detail: str
    hint: str = ""


class _CheckReport(msgspec.Struct, kw_only=True):
    """What `python -m chinwag.daemon --check` prints (daemon/_check.py's `CheckReport`)."""

    config_path: str | None
    config_source: str
    socket: str | None
    socket_configured: bool
    findings: list[_Finding]


@dataclass
class _Check:
    status: CheckStatus
    label: str
    detail: str
    hint: str = ""


@dataclass
class _DaemonSeen:
    """What the socket check learnt: whether a daemon answers, and the checks to print."""

    answers: bool
    checks: list[_Check]


def _socket_source(settings: Settings) -> str:
    if settings.socket_given:
        return "--socket"
    if os.environ.get("CHINWAG_SOCKET"):
        return "$CHINWAG_SOCKET"
    return "the default"


def _uptime(seconds: float) -> str:
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    if minutes:
        return f"{minutes} min {secs} s"
    return f"{seconds:.1f} s" if seconds < 10 else f"{secs} s"


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


async def _check_socket(settings: Settings) -> _DaemonSeen:
    """Is there a socket, and does a daemon answer on it? Its version and uptime if so."""
    path = settings.socket
    where = f"{path} (from {_socket_source(settings)})"

    def failed(detail: str, hint: str = _START_HINT) -> _DaemonSeen:
        return _DaemonSeen(False, [_Check("fail", "socket", f"{where}: {detail}", hint)])

    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return failed("does not exist: no daemon is listening")
    except OSError as exc:
        return failed(f"cannot be looked at: {exc.strerror}", "check the directory's permissions")
    if not stat.S_ISSOCK(mode):
        return failed("is not a socket", "point --socket or $CHINWAG_SOCKET at the daemon's socket")
    try:
        with anyio.fail_after(DOCTOR_SOCKET_TIMEOUT_S):
            async with connect(path, client=CLIENT_NAME) as client:
                server = client.welcome.server
                stats = await client.stats()
    except TimeoutError:
        return failed(
            f"the daemon did not answer within {DOCTOR_SOCKET_TIMEOUT_S:g} s",
            "the daemon may be stuck: see its log, and restart it",
        )
    except (FileNotFoundError, ConnectionRefusedError):
        return failed("nothing listens on it (a socket file left behind)")
    except OSError as exc:
        return failed(
            f"cannot connect: {exc.strerror or exc}",
            "is it another user's daemon? use your own socket, or ask to be in its allowed_uids",
        )
    except ChinwagError as exc:
        return failed(
            f"the daemon refused the connection: {_describe(exc)}", "see the daemon's log"
        )
    daemon = (
        f"{server}, up {_uptime(stats.uptime_s)}, {_plural(stats.connections, 'connection')}, "
        f"{_plural(stats.runs_in_flight, 'run')} in flight"
    )
    return _DaemonSeen(True, [_Check("ok", "socket", where), _Check("ok", "daemon", daemon)])


async def _daemon_checks(
    config: Path | None, storage: str | None, *, daemon_runs: bool
) -> tuple[_CheckReport | None, str]:
    """Run `python -m chinwag.daemon --check`: its report, or None and why not.

    With a daemon running, the store is left closed: opening it could migrate
    or lock what that daemon uses.
    """
    argv = [sys.executable, "-m", "chinwag.daemon", "--check"]
    if daemon_runs:
        argv.append("--store-in-use")
    if config is not None:
        argv += ["--config", str(config)]
    if storage is not None:
        argv += ["--storage", storage]
    try:
        with anyio.fail_after(DOCTOR_CHECK_TIMEOUT_S):
            done = await anyio.run_process(argv, stdin=subprocess.DEVNULL, check=False)
    except TimeoutError:
        return None, f"the checks did not finish within {DOCTOR_CHECK_TIMEOUT_S:g} s"
    try:
        return msgspec.json.decode(done.stdout, type=_CheckReport), ""
    except msgspec.DecodeError:
        said = done.stderr.decode(errors="replace").strip().splitlines()
        why = said[-1] if said else f"it exited with status {done.returncode}"
        return None, f"the checks could not run: {why}"


def _config_checks(report: _CheckReport, settings: Settings, seen: _DaemonSeen) -> list[_Check]:
    """The report's findings as lines, with the socket comparison and the storage lock judged."""
    checks: list[_Check] = []
    for finding in report.findings:
        label = finding.check if finding.check != "agent" else f"agent {finding.subject}"
        detail, hint = finding.detail, finding.hint
        status: CheckStatus
        if finding.status == "in_use":
            if seen.answers:
                status, detail = "ok", f"{finding.subject}: in use by the running daemon"
            else:
                status = "fail"
                detail = f"{finding.subject}: {detail}, and no daemon answers on {settings.socket}"
                hint = "another daemon holds it: stop that one, or give this one its own"
        else:
            status = finding.status
            if finding.check == "storage":
                detail = f"{finding.subject}: {detail}"
        checks.append(_Check(status, label, detail, hint))
        if finding.check == "config" and report.socket_configured and report.socket:
            checks.append(_socket_match(report.socket, settings))
    return checks


def _socket_match(configured: str, settings: Settings) -> _Check:
    if os.path.abspath(configured) == os.path.abspath(settings.socket):
        return _Check("ok", "config socket", f"{configured}, the one this command uses")
    return _Check(
        "warn",
        "config socket",
        f"the config names {configured}, but this command uses {settings.socket} "
        f"(from {_socket_source(settings)})",
        f"pass --socket {configured}, or set CHINWAG_SOCKET={configured}",
    )


_MARKS: dict[CheckStatus, tuple[str, str]] = {
    "ok": ("✓", "green"),
    "warn": ("!", "yellow"),
    "fail": ("✗", "red"),
}


def _show_check(console: Console, check: _Check) -> None:
    mark, style = _MARKS[check.status]
    line = Text(f"{mark} ", style=f"bold {style}")
    line.append(f"{check.label}: ", style="bold")
    line.append(check.detail)
    console.print(line)
    if check.hint and check.status != "ok":
        console.print(Text(f"    → {check.hint}", style="dim"))


@cli.command()
@click.option(
    "--config",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The config.toml to check (default: $CHINWAG_CONFIG, else the user config dir).",
)
@click.option("--storage", help="Check this storage URL instead of the config's.")
@click.pass_context
def doctor(ctx: click.Context, config: Path | None, storage: str | None) -> None:
    """Check the config, the socket and daemon, the storage and each agent's provider.

    Exits 1 when a check fails (✗); warnings (!) do not count.
    """
    settings = _settings(ctx)

    async def body() -> list[_Check]:
        seen = await _check_socket(settings)
        report, problem = await _daemon_checks(config, storage, daemon_runs=seen.answers)
        if report is None:
            failed = _Check("fail", "config", problem, "run `chinwag serve` to see the error")
            return [failed, *seen.checks]
        checks = _config_checks(report, settings, seen)
        # The config first, then the socket and daemon, then storage and agents.
        first = [check for check in checks if check.label in ("config", "config socket")]
        rest = [check for check in checks if check not in first]
        return [*first, *seen.checks, *rest]

    checks = _run(body)
    console = line_console()
    for check in checks:
        _show_check(console, check)
    failures = sum(check.status == "fail" for check in checks)
    warnings = sum(check.status == "warn" for check in checks)
    if failures:
        console.print(Text(f"{_plural(failures, 'check')} failed", style="bold red"))
        ctx.exit(1)
    summary = "all checks passed" + (f" ({_plural(warnings, 'warning')})" if warnings else "")
    console.print(Text(summary, style="bold green"))


cli.add_command(telegram.command)
cli.add_command(mcp.command)


def main() -> None:
    """The `chinwag` console script."""
    try:
        cli(prog_name="chinwag")
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
