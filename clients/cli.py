"""The `chinwag` command: talk to the daemon from a terminal or a script.

Every command but `serve` is a client of the daemon over its Unix socket,
through the client library, under anyio's asyncio backend. `serve` replaces
this process with the daemon itself (`python -m chinwag.daemon`), so the CLI
never imports the daemon.

Only the commands are here. What they all share (settings, failing, running,
connecting) is in `_settings`; starting and stopping the daemon's process in
`_daemon_process`; lines of output in `_render`; reading the terminal in
`_terminal_input`; the chat loop in `_chat` (`_live_chat` on a terminal that
redraws); the doctor's checks in `_doctor`.

A command imports what only it uses in its own body, and the bridges
(`telegram`, `mcp`), mail (`mail`, `inbox`: `_mail_cli`) and `usage`
(`_usage_cli`) are imported once named: `chinwag send` loads neither rich nor
another command's modules, so that it starts fast (`bench/cli_start.py`).
"""

from __future__ import annotations

import gc

# Importing allocates objects that all live as long as the process (some 25,000 for
# `send`): the collector's passes over them on the way, about 25 worth 5 ms, are
# wasted, so it waits for the imports to be done, and `main` then freezes them.
# Hence imports after code (E402); `chinwag.clients` itself imports nothing first.
_collecting = gc.isenabled()
gc.disable()

# ruff: noqa: E402
import importlib
import json
import os
import secrets
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NoReturn

import anyio
import click
from chinwag.protocol import JSON, AgentItem, AskUser, End, default_socket_path, token_digest

from ._client import Client
from ._daemon_process import STOP_TIMEOUT_S, ensure_daemon, stop_daemon
from ._render import (
    SendView,
    TextOut,
    end_problem,
    entry_text,
    limits_usage,
    line_console,
    show_tail_event,
    styled,
    tokens_used,
)
from ._settings import (
    CLIENT_NAME,
    Failure,
    Settings,
    connect_or_fail,
    reconnecting,
    run_command,
    settings_of,
)

if TYPE_CHECKING:
    from click.shell_completion import CompletionItem

    from ._terminal_input import LineReader

if _collecting:
    gc.enable()

#: How long shell completion waits for the daemon before offering nothing.
COMPLETE_TIMEOUT_S = 2.0


def complete_agents(
    ctx: click.Context, param: click.Parameter, incomplete: str
) -> list[CompletionItem]:
    """Shell completion of agent names, from the running daemon's `list_agents`.

    Nothing at all when no daemon answers: completion must never print errors.
    """
    from click.shell_completion import CompletionItem

    from ._client import connect

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


# --- the command group ----------------------------------------------------------------


class _Commands(click.Group):
    """The command group; the bridges' commands and mail's are imported only when named
    (or listed)."""

    # command name -> (module, attribute): `chinwag inbox` is `chinwag mail inbox`.
    lazy = {
        "telegram": ("chinwag.clients.telegram", "command"),
        "mcp": ("chinwag.clients.mcp", "command"),
        "mail": ("chinwag.clients._mail_cli", "mail"),
        "inbox": ("chinwag.clients._mail_cli", "inbox"),
        "usage": ("chinwag.clients._usage_cli", "usage"),
        "tui": ("chinwag.clients.tui", "command"),
        "dashboard": ("chinwag.clients.dashboard", "command"),
    }

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.lazy])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy:
            module, attribute = self.lazy[cmd_name]
            command: click.Command = getattr(importlib.import_module(module), attribute)
            return command
        return super().get_command(ctx, cmd_name)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--socket",
    "socket_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The daemon's Unix socket (default: $CHINWAG_SOCKET, "
    "else $XDG_RUNTIME_DIR/chinwag/chinwag.sock).",
)
@click.option(
    "--url",
    envvar="CHINWAG_URL",
    default=None,
    help="Daemons over TCP instead of the socket: chinwag+tls://HOST:PORT, several "
    "separated by commas, tried in order ($CHINWAG_URL; the token from $CHINWAG_TOKEN, "
    "a private CA from $CHINWAG_CA).",
)
@click.pass_context
def cli(ctx: click.Context, socket_path: Path | None, url: str | None) -> None:
    """Talk to the chinwag daemon: run turns, follow runs, read history."""
    ctx.obj = Settings(
        socket=socket_path if socket_path is not None else default_socket_path(),
        socket_given=socket_path is not None,
        url=url,
    )


# The daemon's own options (`python -m chinwag.daemon --help`), passed on unread: one
# list of them, argparse's, which says what is wrong with a bad one.
@cli.command(
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
    add_help_option=False,
)
@click.argument("daemon_args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def serve(ctx: click.Context, daemon_args: tuple[str, ...]) -> NoReturn:
    """Run the daemon in the foreground (this process becomes it).

    Its options are the daemon's own: `chinwag serve --help` lists them.
    """
    settings = settings_of(ctx)
    # `chinwag --socket S serve`: first, so that `serve --socket` after it wins.
    given = ["--socket", str(settings.socket)] if settings.socket_given else []
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "chinwag.daemon", *given, *daemon_args])


@cli.command()
@click.argument("name")
def token(name: str) -> None:
    """Make a token for a TCP client that speaks as NAME.

    NAME is a sender or participant name; "PREFIX*" covers every name starting PREFIX
    (the Telegram bridge's "tg:*"), "*" any name. Prints the token, for the client's
    $CHINWAG_TOKEN, and the line that lets it in, for the daemon's [tokens] table:
    the config keeps only the token's SHA-256.
    """
    secret = secrets.token_urlsafe(32)
    click.echo(f"token: {secret}")
    click.echo("for the daemon's config.toml:")
    click.echo("[tokens]")
    click.echo(f"{json.dumps(token_digest(secret))} = {json.dumps(name)}")


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
    settings = settings_of(ctx)
    ensure_daemon(settings.target)
    out = TextOut(sys.stdout)
    view = SendView(out)
    lines: LineReader | None = None  # made at the first question: most runs ask none

    async def body() -> None:
        nonlocal lines
        async with (
            connect_or_fail(settings) as client,
            client.stream(agent, text, sender=sender, guest=guest, cwd=cwd, queue=queue) as events,
        ):
            async for event in events:
                if as_json:
                    sys.stdout.buffer.write(JSON.encode(event) + b"\n")
                    sys.stdout.buffer.flush()
                else:
                    view.show(event)
                if isinstance(event, AskUser):
                    from ._terminal_input import LineReader, ask_on_terminal

                    out.end_line()
                    lines = lines or LineReader()
                    answer = await ask_on_terminal(event, lines, view.err)
                    if answer is None:
                        raise Failure(
                            "the agent asked a question but input ended; answer it with "
                            f'"chinwag reply {agent} TEXT"'
                        )
                    await client.reply_to_ask(agent, answer, sender=sender, ask_id=event.ask_id)
                if isinstance(event, End):
                    out.end_line()
                    problem = end_problem(event)
                    if problem is not None:
                        raise Failure(problem)

    try:
        run_command(body)
    except KeyboardInterrupt:
        out.end_line()
        print(
            f'chinwag: interrupted; the run goes on in the daemon (stop it with "chinwag kill '
            f'{agent}")',
            file=sys.stderr,
        )
        sys.exit(130)


# --- chat --------------------------------------------------------------------------------


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
    from ._chat import chat_session, chat_view

    settings = settings_of(ctx)
    ensure_daemon(settings.target)
    view = chat_view(plain)
    run_command(lambda: chat_session(settings, agent, sender, view, guest=guest, cwd=cwd))


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
    settings = settings_of(ctx)

    async def body() -> None:
        async with connect_or_fail(settings) as client:
            entries = client.iter_history(agent, sender, include_archived=include_archived)
            if as_json:
                async for entry in entries:
                    sys.stdout.buffer.write(JSON.encode(entry) + b"\n")
                sys.stdout.buffer.flush()
                return
            # limit 0: the conversation's title (and its sender, named), no entries.
            about = await client.history(agent, sender, limit=0)
            console = line_console()
            heading = styled(f"{about.agent}/{about.sender}", style="bold")
            if about.title:
                heading.append(f" — {about.title}")
            console.print(heading)
            async for entry in entries:
                console.print(entry_text(entry))

    run_command(body)


@cli.command(name="ls")
@click.option("--agent", help="Only this agent's conversations.", shell_complete=complete_agents)
@click.option(
    "--search",
    "query",
    metavar="TEXT",
    help="Only the conversations whose title or sender contains TEXT, in any case.",
)
@click.option("--json", "as_json", is_flag=True, help="Print every conversation as one JSON line.")
@click.pass_context
def list_conversations(
    ctx: click.Context, agent: str | None, query: str | None, as_json: bool
) -> None:
    """List conversations, most recently updated first."""
    settings = settings_of(ctx)

    async def body() -> None:
        async with connect_or_fail(settings) as client:
            items = [item async for item in client.iter_conversations(agent, query=query)]
        if as_json:
            for item in items:
                sys.stdout.buffer.write(JSON.encode(item) + b"\n")
            sys.stdout.buffer.flush()
            return
        if not items:
            print("no conversations" if query is None else f"no conversations match {query!r}")
            return
        rows: list[tuple[str, ...]] = [
            (
                item.agent,
                item.sender,
                item.title,
                item.updated_at.astimezone().strftime("%Y-%m-%d %H:%M") if item.updated_at else "",
                str(item.last_seq),
                "yes" if item.running else "",
            )
            for item in items
        ]
        columns: tuple[str, ...] = ("agent", "sender", "title", "updated", "seq", "running")
        if any(item.tokens_in or item.tokens_out for item in items):
            columns += ("tokens",)
            rows = [(*row, tokens_used(item)) for row, item in zip(rows, items, strict=True)]
        if any(item.limits is not None for item in items):
            moment = datetime.now(UTC)
            columns += ("limits",)
            rows = [
                (*row, limits_usage(item, moment)) for row, item in zip(rows, items, strict=True)
            ]
        _print_table(columns, rows)

    run_command(body)


@cli.command()
@click.pass_context
def agents(ctx: click.Context) -> None:
    """List the agents the daemon hosts."""
    settings = settings_of(ctx)

    async def body() -> None:
        async with connect_or_fail(settings) as client:
            items = await client.list_agents()
        rows = [(item.name, item.model, ", ".join(item.tools), item.description) for item in items]
        _print_table(("name", "model", "tools", "description"), rows)

    run_command(body)


def _print_table(columns: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> None:
    """Rows under their columns' names, a long cell folded, never cut."""
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*row)
    Console(highlight=False).print(table)


@cli.command()
@click.option("--agent", help="Only this agent's runs.", shell_complete=complete_agents)
@click.option("--sender", help="Only this sender's runs.")
@click.option("--json", "as_json", is_flag=True, help="Print every event frame as one JSON line.")
@click.pass_context
def tail(ctx: click.Context, agent: str | None, sender: str | None, as_json: bool) -> None:
    """Follow runs as they happen, until Ctrl-C."""
    settings = settings_of(ctx)
    out = TextOut(sys.stdout)

    async def body() -> None:
        console = line_console()
        last_run: str | None = None

        async def follow(client: Client) -> None:
            nonlocal last_run
            async with anyio.create_task_group() as tasks:
                with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as interrupts:
                    tasks.start_soon(_cancel_on_first, interrupts, tasks.cancel_scope)
                    async with client.subscribe(agent, sender) as subscription:
                        async for frame in subscription:
                            if as_json:
                                sys.stdout.buffer.write(JSON.encode(frame) + b"\n")
                                sys.stdout.buffer.flush()
                                continue
                            last_run = show_tail_event(frame, last_run, out, console)
                    tasks.cancel_scope.cancel()

        def say(note: str) -> None:
            out.end_line()
            print(note, file=sys.stderr, flush=True)

        await reconnecting(settings, follow, say)
        out.end_line()

    run_command(body)


async def _cancel_on_first(
    interrupts: AsyncIterator[signal.Signals], scope: anyio.CancelScope
) -> None:
    async for _ in interrupts:
        scope.cancel()
        return


@cli.command()
@click.option("--agent", help="Only this agent's runs.", shell_complete=complete_agents)
@click.option(
    "--refresh",
    type=click.FloatRange(min=0.1),
    default=1.0,
    show_default=True,
    help="Seconds between redraws, and between `stats` requests.",
)
@click.pass_context
def top(ctx: click.Context, agent: str | None, refresh: float) -> None:
    """A live view of the daemon: runs in flight, queue, connections, recent errors.

    q or Ctrl-C quits. When the daemon goes away it says so, and connects
    again once the daemon is back.
    """
    from ._top import show_top

    settings = settings_of(ctx)
    run_command(lambda: show_top(settings, agent=agent, refresh=refresh))


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
    pid = stop_daemon(settings_of(ctx).socket, timeout)
    print(f"chinwag: stopped the daemon (pid {pid})", file=sys.stderr)


@cli.command()
@click.argument("agent", shell_complete=complete_agents)
@sender_option
@click.option("--all", "kill_all", is_flag=True, help="Also drop every run queued behind it.")
@click.pass_context
def kill(ctx: click.Context, agent: str, sender: str | None, kill_all: bool) -> None:
    """Kill the conversation's run in flight."""
    settings = settings_of(ctx)

    async def body() -> None:
        async with connect_or_fail(settings) as client:
            reply = await client.kill(agent, sender, all=kill_all)
        if reply.run_id is None:
            print("nothing was running")
        else:
            print(f"killed run {reply.run_id}")

    run_command(body)


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
    settings = settings_of(ctx)

    async def body() -> None:
        async with connect_or_fail(settings) as client:
            await client.reply_to_ask(agent, text, sender=sender, ask_id=ask_id)

    run_command(body)


@cli.command()
@click.argument("agent", shell_complete=complete_agents)
@sender_option
@click.option("--instructions", help="What the summary must keep.")
@click.pass_context
def compact(ctx: click.Context, agent: str, sender: str | None, instructions: str | None) -> None:
    """Summarize a conversation into an archive and start its context afresh."""
    settings = settings_of(ctx)

    async def body() -> None:
        async with connect_or_fail(settings) as client:
            done = await client.compact(agent, sender, instructions=instructions)
        console = line_console()
        console.print(
            styled(f"archived {done.archived_entries} entries as {done.archive}", style="bold")
        )
        console.print(styled(done.summary))

    run_command(body)


@cli.command()
@click.argument("agent", shell_complete=complete_agents)
@click.argument("query")
@click.option("--limit", default=10, show_default=True, help="At most this many matches.")
@click.option("--json", "as_json", is_flag=True, help="Print every match as one JSON line.")
@click.pass_context
def search(ctx: click.Context, agent: str, query: str, limit: int, as_json: bool) -> None:
    """Search AGENT's memory: its notes and the archives of its compacted conversations."""
    settings = settings_of(ctx)

    async def body() -> None:
        async with connect_or_fail(settings) as client:
            hits = await client.search_memory(agent, query, limit=limit)
        if as_json:
            for hit in hits:
                sys.stdout.buffer.write(JSON.encode(hit) + b"\n")
            return
        console = line_console()
        if not hits:
            console.print(styled(f"nothing in {agent}'s memory matches {query!r}", style="dim"))
        for number, hit in enumerate(hits, 1):
            line = styled(f"{number}. {hit.kind} {hit.name}", style="bold")
            about = [hit.sender] if hit.sender else []
            if hit.created_at is not None:
                about.append(f"{hit.created_at:%Y-%m-%d %H:%M}")
            line.append(f" ({', '.join(about)})" if about else "", style="dim")
            console.print(line)
            console.print(styled(f"   {hit.snippet}"))

    run_command(body)


# --- doctor ------------------------------------------------------------------------------


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
    from ._doctor import examine, show_checks

    settings = settings_of(ctx)
    checks = run_command(lambda: examine(settings, config, storage))
    if not show_checks(checks):
        ctx.exit(1)


def main() -> None:
    """The `chinwag` console script."""
    # What is loaded by now (modules, classes, functions) lives as long as the
    # process: frozen, no later collection walks it again, nor the one at exit,
    # which spares `send` a tenth of its run (bench/cli_start.py).
    gc.freeze()
    try:
        cli(prog_name="chinwag")
    except KeyboardInterrupt:
        print(file=sys.stderr)
        code: int | str | None = 130
    except SystemExit as ended:  # click ends every command with one
        code = ended.code
    else:
        code = 0
    # The command is done: its files and connections are closed, its event loop
    # and threads are finished. The interpreter's teardown (finalising some
    # 25,000 objects) would only spend a twentieth of `send` before the exit.
    _exit_now(code)


def _exit_now(code: int | str | None) -> NoReturn:
    """Exit with ``code`` as `sys.exit` would, flushing stdout and stderr first."""
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader gone, or the stream closed
            code = code or 1
    os._exit(code or 0)


if __name__ == "__main__":
    main()
