"""`chinwag mail ...` and its shortcut `chinwag inbox`: mail from a terminal or a script.

Loaded only once one of them is named (cli.py's `_Commands`), so that the
other commands never pay for it. Every command acts as ``--as NAME``
($CHINWAG_NAME, else `user`); with ``--json`` it prints one JSON document, or
one JSON line per message for `inbox --follow`. The daemon's refusals are one
line on stderr and exit status 1, as for every other command.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import click
import msgspec
from chinwag.protocol import Delivery, MailFormat, MailItem, MailMessage, Ref

from ._client import Client
from ._daemon_process import ensure_daemon
from ._mail_text import one_line, reaction_counts
from ._render import line_console, styled
from ._settings import connect_or_fail, run_command, settings_of

if TYPE_CHECKING:
    from rich.console import Console
    from rich.text import Text

#: Who a mail command acts as when neither ``--as`` nor $CHINWAG_NAME says.
DEFAULT_NAME = "user"
PRIORITIES = {0: "routine", 1: "normal", 2: "high", 3: "critical"}
_PRIORITY_STYLES = {0: "dim", 2: "yellow", 3: "bold red"}
_STATE_STYLES = {"pending": "yellow", "delivered": "cyan", "read": "green"}

_WHOLE = frozenset({"id", "when", "last seen", "answered by"})

_F = TypeVar("_F", bound=Callable[..., Any])


def acting(fn: _F) -> _F:
    """The options every mail command takes: who it acts as, and JSON output."""
    fn = click.option(
        "--json", "as_json", is_flag=True, help="Print machine-readable JSON instead."
    )(fn)
    return click.option(
        "--as",
        "name",
        envvar="CHINWAG_NAME",
        default=DEFAULT_NAME,
        show_default="$CHINWAG_NAME, else user",
        help="Act as this participant.",
    )(fn)


def _type_value(ctx: click.Context, param: click.Parameter, values: Sequence[str]) -> list[Ref]:
    refs = []
    for text in values:
        kind, colon, value = text.partition(":")
        if not colon or not kind or not value:
            raise click.BadParameter(f"write it type:value, such as module:auth; not {text!r}")
        refs.append(Ref(type=kind, value=value))
    return refs


def _json_payload(ctx: click.Context, param: click.Parameter, text: str | None) -> Any:
    if text is None:
        return None
    try:
        return msgspec.json.decode(text)
    except msgspec.DecodeError as exc:
        raise click.BadParameter(f"not JSON: {exc}") from None


# --- output ----------------------------------------------------------------------------


def _emit(document: Any) -> None:
    sys.stdout.buffer.write(msgspec.json.encode(document) + b"\n")
    sys.stdout.buffer.flush()


def _document(reply: msgspec.Struct) -> Any:
    """A reply as JSON output: its fields, without the frame's ``type`` and ``id``."""
    data = msgspec.to_builtins(reply)
    data.pop("type", None)
    data.pop("id", None)
    return data


def _when(moment: datetime | None) -> str:
    return moment.astimezone().strftime("%Y-%m-%d %H:%M") if moment is not None else ""


def _priority(priority: int) -> Text:
    return styled(PRIORITIES.get(priority, str(priority)), style=_PRIORITY_STYLES.get(priority, ""))


def _state(state: str | None) -> Text:
    return styled(state or "", style=_STATE_STYLES.get(state or "", ""))


def _table(columns: Sequence[str], rows: Sequence[Sequence[str | Text]]) -> None:
    """Rows under their columns' names, a long cell folded, never cut."""
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for column in columns:
        # An id or a time folded in two is harder to read (and to copy) than a shorter message.
        table.add_column(column, overflow="fold", no_wrap=column in _WHOLE)
    for row in rows:
        table.add_row(*row)
    Console(highlight=False).print(table)


def _summary(message: MailMessage, state: str | None = None) -> Text:
    """A message as a log line and its body: what `inbox --follow` and `thread` print."""
    line = styled(message.msg_id, style="dim")
    line.append(f"  {_when(message.created_at)}  ", style="dim")
    line.append(message.sender, style="bold green")
    line.append(f" → {', '.join(message.to or message.recipients)}")
    tags = []
    if message.priority != 1:
        tags.append(PRIORITIES.get(message.priority, str(message.priority)))
    if message.channel:
        tags.append(f"#{message.channel}")
    if state:
        tags.append(state)
    if tags:
        line.append(f"  [{', '.join(tags)}]", style=_PRIORITY_STYLES.get(message.priority, "dim"))
    for body_line in message.content.splitlines() or [""]:
        line.append(f"\n  {body_line}")
    return line


def _full(message: MailMessage, state: str | None) -> Text:
    """A message with every header it has, then its body: what `read` prints."""
    text = styled(message.msg_id, style="bold")
    headers = [
        ("from", message.sender),
        ("to", ", ".join(message.to)),
        ("recipients", ", ".join(message.recipients)),
        ("date", _when(message.created_at)),
        ("priority", PRIORITIES.get(message.priority, str(message.priority))),
        ("channel", message.channel or ""),
        ("thread", message.thread_id or ""),
        ("reply to", message.reply_to or ""),
        ("answered by", message.answered_by or ""),
        ("scopes", ", ".join(f"{r.type}:{r.value}" for r in message.scopes)),
        ("refs", ", ".join(f"{r.type}:{r.value}" for r in message.refs)),
        ("format", message.format if message.format != "markdown" else ""),
        ("space", f"#{message.space}" if message.space else ""),
        ("edited", _when(message.edited_at) if message.edited_at else ""),
        ("deleted", (message.delete_reason or "yes") if message.deleted else ""),
        ("pinned", f"by {message.pinned_by}" if message.pinned else ""),
        ("reactions", "  ".join(f"{r.emoji} {', '.join(r.by)}" for r in message.reactions)),
        ("state", state or ""),
    ]
    for label, value in headers:
        if value:
            text.append(f"\n{label}: ", style="dim")
            text.append(value)
    text.append(f"\n\n{message.content}")
    if message.structured is not None:
        text.append("\n\nstructured: ", style="dim")
        text.append(msgspec.json.encode(message.structured).decode())
    return text


def _print_posted(console: Console, verb: str, posted: Any) -> None:
    line = styled(f"{verb} {posted.msg_id}", style="bold")
    if posted.recipients:
        line.append(f" to {', '.join(posted.recipients)}")
    if posted.thread_id:
        line.append(f" in thread {posted.thread_id}", style="dim")
    console.print(line)
    for warning in posted.warnings:
        line_console(stderr=True).print(styled(f"note: {warning}", style="yellow"))


# --- the group ------------------------------------------------------------------------


@click.group()
def mail() -> None:
    """Mail: write to agents and people, and read what they write to you.

    Every command acts as --as NAME ($CHINWAG_NAME, else `user`) and takes --json.
    """


# --- writing --------------------------------------------------------------------------


def _writing(fn: _F) -> _F:
    """The options of what posts: `send` and `reply`."""
    for option in reversed(
        [
            click.option(
                "--priority",
                type=click.IntRange(0, 3),
                default=1,
                show_default=True,
                help="0 routine, 1 normal, 2 high, 3 critical.",
            ),
            click.option("--channel", help="A label to filter by, such as coordination."),
            click.option(
                "--format",
                "format_",
                type=click.Choice(["markdown", "plain", "json"]),
                default="markdown",
                show_default=True,
                help="How TEXT is written (json: TEXT must parse as JSON).",
            ),
            click.option(
                "--json-payload",
                "structured",
                callback=_json_payload,
                help="A machine-readable payload (JSON) stored with the message.",
            ),
            click.option(
                "--mention",
                "mentions",
                multiple=True,
                help="Also @-mention this name or @role (repeatable).",
            ),
            click.option(
                "--scope",
                "scopes",
                multiple=True,
                callback=_type_value,
                help="What it is about, type:value such as module:auth (repeatable).",
            ),
            click.option(
                "--ref",
                "refs",
                multiple=True,
                callback=_type_value,
                help="What it points to, type:value such as pr:7 (repeatable).",
            ),
            click.option(
                "--idempotency-key",
                help="Sending again with the same key stores nothing and answers the first.",
            ),
        ]
    ):
        fn = option(fn)
    return fn


def _post(ctx: click.Context, name: str, as_json: bool, verb: str, text: str, **post: Any) -> None:
    """Post ``text`` from ``name``; ``post`` holds the other fields of `Client.post`."""
    settings = settings_of(ctx)
    ensure_daemon(settings.target)  # mail waits in the daemon, as `send`'s runs do
    content = sys.stdin.read() if text == "-" else text

    async def body() -> None:
        async with connect_or_fail(settings) as client:
            posted = await client.post(name, content, **post)
        if as_json:
            _emit(_document(posted))
        else:
            _print_posted(line_console(), verb, posted)

    run_command(body)


@mail.command()
@click.argument("text")
@click.option(
    "--to",
    "to",
    multiple=True,
    help="A recipient: a name, @role or @everyone (repeatable).",
)
@click.option("--reply-to", help="The msg_id this answers: threads it.")
@_writing
@acting
@click.pass_context
def send(
    ctx: click.Context,
    text: str,
    to: tuple[str, ...],
    reply_to: str | None,
    priority: int,
    channel: str | None,
    format_: MailFormat,
    structured: Any,
    mentions: tuple[str, ...],
    scopes: list[Ref],
    refs: list[Ref],
    idempotency_key: str | None,
    name: str,
    as_json: bool,
) -> None:
    """Send TEXT (`-`: read it from stdin) to every --to."""
    _post(
        ctx,
        name,
        as_json,
        "sent",
        text,
        to=to,
        reply_to=reply_to,
        priority=priority,
        channel=channel,
        format=format_,
        structured=structured,
        mentions=mentions,
        scopes=scopes,
        refs=refs,
        idempotency_key=idempotency_key,
    )


@mail.command()
@click.argument("msg_id")
@click.argument("text")
@click.option(
    "--to",
    "to",
    multiple=True,
    help="Recipients instead of the message's author (repeatable).",
)
@_writing
@acting
@click.pass_context
def reply(
    ctx: click.Context,
    msg_id: str,
    text: str,
    to: tuple[str, ...],
    priority: int,
    channel: str | None,
    format_: MailFormat,
    structured: Any,
    mentions: tuple[str, ...],
    scopes: list[Ref],
    refs: list[Ref],
    idempotency_key: str | None,
    name: str,
    as_json: bool,
) -> None:
    """Answer MSG_ID with TEXT (`-`: from stdin), in its thread, to its author.

    Replying marks MSG_ID read.
    """
    _post(
        ctx,
        name,
        as_json,
        "replied",
        text,
        to=to,
        reply_to=msg_id,
        priority=priority,
        channel=channel,
        format=format_,
        structured=structured,
        mentions=mentions,
        scopes=scopes,
        refs=refs,
        idempotency_key=idempotency_key,
    )


# --- reading --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Filters:
    """What `inbox` keeps: asked of the daemon for the page, checked here for `--follow`."""

    unread: bool
    mentions: bool
    channel: str | None
    scope: str | None
    thread_id: str | None
    priority_min: int
    since: str | None
    pinned: bool = False
    deleted: bool = False
    space: str | None = None
    project: str | None = None

    def query(self) -> dict[str, Any]:
        return {
            "unread_only": self.unread,
            "mentions_only": self.mentions,
            "channel": self.channel,
            "scope": self.scope,
            "thread_id": self.thread_id,
            "priority_min": self.priority_min,
            "since": self.since,
            "pinned_only": self.pinned,
            "include_deleted": self.deleted,
            "space": self.space,
            "project": self.project,
        }

    def admits(
        self,
        message: MailMessage,
        mentioned_as: frozenset[str],
        project_spaces: frozenset[str] | None = None,
    ) -> bool:
        """Whether a message pushed to the watch belongs in the inbox as filtered.

        It is new, so `--unread` and `--since` keep it, and `--pinned` none.
        ``mentioned_as``: the reader's name and roles, which an `@` mention may
        name; ``project_spaces``: the spaces of the project the inbox is narrowed to.
        """
        if self.pinned:
            return False
        if self.space is not None and message.space != self.space.removeprefix("#"):
            return False
        if project_spaces is not None and message.space not in (None, *project_spaces):
            return False
        if self.channel is not None and message.channel != self.channel:
            return False
        if self.thread_id is not None and message.thread_id != self.thread_id:
            return False
        if message.priority < self.priority_min:
            return False
        if self.scope is not None and self.scope not in {
            f"{r.type}:{r.value}" for r in message.scopes
        }:
            return False
        if self.mentions:
            named = {entry.removeprefix("@").casefold() for entry in message.mentions}
            named |= {entry[1:].casefold() for entry in message.to if entry.startswith("@")}
            return bool(named & mentioned_as)
        return True


def _inbox_table(items: Sequence[MailItem]) -> None:
    rows = [
        (
            item.message.msg_id,
            item.message.sender,
            _when(item.message.created_at),
            _priority(item.message.priority),
            _state(item.state),
            one_line(item.message.content),
        )
        for item in items
    ]
    _table(("id", "from", "when", "priority", "state", "message"), rows)


@click.command()
@click.option("--unread", is_flag=True, help="Only mail not read yet.")
@click.option("--mentions", is_flag=True, help="Only mail that @-names you or one of your roles.")
@click.option("--channel", help="Only mail on this channel.")
@click.option("--scope", help="Only mail about this, written type:value.")
@click.option("--thread", "thread_id", help="Only mail in this thread.")
@click.option(
    "--priority",
    "priority_min",
    type=click.IntRange(0, 3),
    default=0,
    help="Only mail of at least this priority (0 routine ... 3 critical).",
)
@click.option(
    "--since", help="Only mail since this RFC 3339 time, or this long ago: 30m, 2h, 1d, 1w."
)
@click.option("--space", help="This space's mail you may read, whether or not it reached you.")
@click.option("--project", help="Only space mail of this project's spaces (default: your focus).")
@click.option("--pinned", is_flag=True, help="Only pinned mail.")
@click.option("--deleted", is_flag=True, help="Deleted mail too.")
@click.option(
    "--limit", type=click.IntRange(1, 500), default=20, show_default=True, help="At most this many."
)
@click.option(
    "--follow",
    "-f",
    is_flag=True,
    help="Print the inbox oldest first, then each new message as it comes, until Ctrl-C.",
)
@acting
@click.pass_context
def inbox(
    ctx: click.Context,
    unread: bool,
    mentions: bool,
    channel: str | None,
    scope: str | None,
    thread_id: str | None,
    priority_min: int,
    since: str | None,
    space: str | None,
    project: str | None,
    pinned: bool,
    deleted: bool,
    limit: int,
    follow: bool,
    name: str,
    as_json: bool,
) -> None:
    """Your mail, newest first, with its state for you.

    What it shows is `delivered` to you from then on; `chinwag mail read`
    marks a message read.
    """
    settings = settings_of(ctx)
    filters = _Filters(
        unread,
        mentions,
        channel,
        scope,
        thread_id,
        priority_min,
        since,
        pinned=pinned,
        deleted=deleted,
        space=space,
        project=project,
    )

    async def body() -> None:
        async with connect_or_fail(settings) as client:
            if follow:
                await _follow(client, name, filters, limit, as_json)
                return
            page = await client.inbox(name, limit=limit, **filters.query())
        if as_json:
            _emit(_document(page))
            return
        console = line_console()
        if not page.items:
            console.print(styled(f"no mail for {name} here", style="dim"))
        else:
            _inbox_table(page.items)
        more = "; more with a higher --limit" if page.next_cursor is not None else ""
        console.print(styled(f"{page.unread} unread{more}", style="dim"))

    run_command(body)


async def _follow(client: Client, name: str, filters: _Filters, limit: int, as_json: bool) -> None:
    """The inbox, then each new message, until SIGINT or SIGTERM.

    The watch stands before the inbox is read, and the inbox shows only what
    came up to the watch's cursor: what came after is the watch's to push, so
    no message is missed or printed twice at the boundary.
    """
    console = line_console()

    def show(item: MailItem) -> None:
        if as_json:
            _emit(msgspec.to_builtins(item))
        else:
            console.print(_summary(item.message, item.state))

    mentioned_as = frozenset({name.casefold()})
    if filters.mentions:
        for participant in await client.participants():
            if participant.name == name.casefold():
                mentioned_as |= frozenset(participant.roles)
    narrowed = filters.project
    if narrowed is None and filters.space is None:
        narrowed = (await client.mail_context(name)).focus
    project_spaces = None
    if narrowed is not None:
        project_spaces = frozenset(s.name for s in await client.spaces(project=narrowed))
    async with anyio.create_task_group() as tasks:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as interrupts:
            tasks.start_soon(_cancel_on_first, interrupts, tasks.cancel_scope)
            async with client.watch(name) as watch:
                page = await client.inbox(name, limit=limit, **filters.query())
                boundary = watch.cursor
                earlier = [
                    item
                    for item in page.items
                    if boundary is not None and item.message.msg_id <= boundary
                ]
                for item in reversed(earlier):
                    show(item)
                if not as_json:
                    line_console(stderr=True).print(
                        styled(f"following the mail of {name}; Ctrl-C to stop", style="dim")
                    )
                async for message in watch:
                    if filters.admits(message, mentioned_as, project_spaces):
                        # Pushing it to the watch made it delivered.
                        show(MailItem(message=message, state="delivered"))
            tasks.cancel_scope.cancel()


async def _cancel_on_first(
    interrupts: AsyncIterator[signal.Signals], scope: anyio.CancelScope
) -> None:
    async for _ in interrupts:
        scope.cancel()
        return


mail.add_command(inbox)


def _deliveries(deliveries: Sequence[Delivery] | None) -> Text:
    """Each recipient's state, one a line."""
    text = styled()
    for number, delivery in enumerate(deliveries or ()):
        if number:
            text.append("\n")
        text.append(f"{delivery.name} ")
        text.append_text(_state(delivery.state))
    return text


@mail.command()
@click.option("--status", is_flag=True, help="Each recipient's state: pending, delivered, read.")
@click.option(
    "--limit", type=click.IntRange(1, 500), default=20, show_default=True, help="At most this many."
)
@acting
@click.pass_context
def sent(ctx: click.Context, status: bool, limit: int, name: str, as_json: bool) -> None:
    """What you sent, newest first."""
    settings = settings_of(ctx)

    async def body() -> None:
        async with connect_or_fail(settings) as client:
            page = await client.sent(name, limit=limit)
        if as_json:
            _emit(_document(page))
            return
        if not page.items:
            line_console().print(styled(f"{name} has sent no mail", style="dim"))
            return
        columns = ["id", "to", "when", "message"]
        answered = any(item.message.answered_by for item in page.items)
        rows: list[list[str | Text]] = []
        for item in page.items:
            message = item.message
            row: list[str | Text] = [
                message.msg_id,
                ", ".join(message.to or message.recipients),
                _when(message.created_at),
                one_line(message.content),
            ]
            if status:
                row.append(_deliveries(item.deliveries))
                if answered:
                    row.append(message.answered_by or "")
            rows.append(row)
        if status:
            columns += ["status", "answered by"] if answered else ["status"]
        _table(columns, rows)

    run_command(body)


@mail.command()
@click.argument("msg_ids", nargs=-1, required=True)
@click.option("--history", is_flag=True, help="Each earlier version too, before its edits.")
@acting
@click.pass_context
def read(
    ctx: click.Context, msg_ids: tuple[str, ...], history: bool, name: str, as_json: bool
) -> None:
    """Show each message MSG_ID..., which marks it read for you."""
    settings = settings_of(ctx)

    async def body() -> None:
        async with connect_or_fail(settings) as client:
            replies = [
                await client.get_message(name, msg_id, history=history) for msg_id in msg_ids
            ]
        if as_json:
            _emit([_document(reply) for reply in replies])
            return
        console = line_console()
        for number, reply in enumerate(replies):
            if number:
                console.print()
            console.print(_full(reply.message, reply.state))
            for version in reply.versions or ():
                console.print(
                    styled(
                        f"\nversion {version.version}, until {_when(version.replaced_at)}:",
                        style="dim",
                    )
                )
                console.print(version.content)

    run_command(body)


@mail.command()
@click.argument("thread_id")
@acting
@click.pass_context
def thread(ctx: click.Context, thread_id: str, name: str, as_json: bool) -> None:
    """The messages of THREAD_ID you wrote or received, oldest first."""
    settings = settings_of(ctx)

    async def body() -> None:
        async with connect_or_fail(settings) as client:
            page = await client.thread(name, thread_id)
        if as_json:
            _emit(_document(page))
            return
        console = line_console()
        for item in page.items:
            console.print(_summary(item.message, item.state))

    run_command(body)


@mail.command()
@click.option("--online", is_flag=True, help="Only those online now.")
@click.option("--role", help="Only those holding this role.")
@acting
@click.pass_context
def who(ctx: click.Context, online: bool, role: str | None, name: str, as_json: bool) -> None:
    """Everyone with a mail address: presence, status and unread mail."""
    settings = settings_of(ctx)

    async def body() -> None:
        async with connect_or_fail(settings) as client:
            items = await client.participants(online_only=online, role=role)
        if as_json:
            _emit({"items": msgspec.to_builtins(items)})
            return
        rows = [
            (
                p.name,
                p.kind,
                ", ".join(p.roles),
                styled("online", style="green") if p.online else styled("offline", style="dim"),
                _when(p.last_seen),
                p.status,
                str(p.unread),
            )
            for p in items
        ]
        _table(("name", "kind", "roles", "presence", "last seen", "status", "unread"), rows)

    run_command(body)


@mail.command()
@acting
@click.pass_context
def context(ctx: click.Context, name: str, as_json: bool) -> None:
    """What to know at the start of a session: unread mail by priority, open threads."""
    settings = settings_of(ctx)

    async def body() -> None:
        async with connect_or_fail(settings) as client:
            view = await client.mail_context(name)
        if as_json:
            _emit(_document(view))
            return
        console = line_console()
        heading = styled(f"{view.name}: {view.unread} unread", style="bold")
        counts = [
            f"{view.unread_by_priority[p]} {PRIORITIES[p]}"
            for p in sorted(PRIORITIES, reverse=True)
            if view.unread_by_priority.get(p)
        ]
        if counts:
            heading.append(f" ({', '.join(counts)})")
        console.print(heading)
        if view.participant is not None and view.participant.status:
            console.print(styled(f"status: {view.participant.status}", style="dim"))
        if view.focus:
            console.print(styled(f"focus: {view.focus}", style="dim"))
        if view.spaces:
            console.print(
                styled("spaces: ", style="dim") + styled(", ".join(f"#{s}" for s in view.spaces))
            )
        for held in view.locks:
            console.print(f"holds {held.resource} ({held.mode}) until {_when(held.expires_at)}")
        if view.threads:
            console.print(styled("threads with unread mail:", style="bold"))
            for summary in view.threads:
                console.print(
                    f"  {summary.thread_id}  {summary.unread} unread, "
                    f"last {summary.last_msg_id} from {summary.last_from}"
                )

    run_command(body)


# --- part 2: changes to messages, search, spaces, projects, focus, locks -----------------


def _call(
    ctx: click.Context,
    as_json: bool,
    call: Callable[[Client], Any],
    show: Callable[[Any], None],
    *,
    start: bool = False,
) -> None:
    """Run ``call`` on a connection; print its result as JSON, or with ``show``."""
    settings = settings_of(ctx)
    if start:
        ensure_daemon(settings.target)

    async def body() -> None:
        async with connect_or_fail(settings) as client:
            result = await call(client)
        if as_json:
            _emit(_document(result) if isinstance(result, msgspec.Struct) else _listed(result))
        else:
            show(result)

    run_command(body)


def _listed(result: Any) -> Any:
    return {"items": msgspec.to_builtins(result)} if isinstance(result, list) else result


def _done(what: str) -> Callable[[Any], None]:
    return lambda _: line_console().print(styled(what, style="bold"))


def _changed(verb: str) -> Callable[[MailMessage], None]:
    return lambda message: line_console().print(
        styled(f"{verb} {message.msg_id}", style="bold")
        + styled(f" (version {message.version})" if message.version > 1 else "", style="dim")
    )


@mail.command()
@click.argument("msg_id")
@click.argument("text")
@acting
@click.pass_context
def edit(ctx: click.Context, msg_id: str, text: str, name: str, as_json: bool) -> None:
    """Replace the text of your message MSG_ID with TEXT (`-`: from stdin); the earlier
    text stays readable with `read --history`."""
    content = sys.stdin.read() if text == "-" else text
    _call(ctx, as_json, lambda c: c.edit(name, msg_id, content), _changed("edited"))


@mail.command()
@click.argument("msg_id")
@click.option("--reason", help="Why, kept with the message.")
@click.option("--force", is_flag=True, help="Delete without asking.")
@acting
@click.pass_context
def delete(
    ctx: click.Context, msg_id: str, reason: str | None, force: bool, name: str, as_json: bool
) -> None:
    """Delete your message MSG_ID: it stays, marked deleted, out of inboxes and search."""
    if not force:
        if not sys.stdin.isatty():
            raise click.UsageError("deleting needs --force when nobody is at a terminal to ask")
        click.confirm(f"Delete {msg_id}?", abort=True)
    _call(
        ctx, as_json, lambda c: c.delete_message(name, msg_id, reason=reason), _changed("deleted")
    )


@mail.command()
@click.argument("msg_id")
@click.argument("emoji")
@click.option("--remove", is_flag=True, help="Take your reaction back.")
@acting
@click.pass_context
def react(
    ctx: click.Context, msg_id: str, emoji: str, remove: bool, name: str, as_json: bool
) -> None:
    """React to MSG_ID with EMOJI."""

    def show(message: MailMessage) -> None:
        line_console().print(f"{message.msg_id}  {reaction_counts(message) or 'no reactions'}")

    _call(ctx, as_json, lambda c: c.react(name, msg_id, emoji, remove=remove), show)


@mail.command()
@click.argument("msg_id")
@click.option("--unpin", is_flag=True, help="Unpin it instead.")
@acting
@click.pass_context
def pin(ctx: click.Context, msg_id: str, unpin: bool, name: str, as_json: bool) -> None:
    """Pin MSG_ID (in its space or thread: `inbox --pinned` lists them)."""
    verb = "unpinned" if unpin else "pinned"
    _call(ctx, as_json, lambda c: c.pin(name, msg_id, unpin=unpin), _changed(verb))


@mail.command()
@click.argument("query")
@click.option(
    "--limit", type=click.IntRange(1, 500), default=20, show_default=True, help="At most this many."
)
@click.option("--project", help="Only space mail of this project (default: your focus).")
@acting
@click.pass_context
def search(
    ctx: click.Context, query: str, limit: int, project: str | None, name: str, as_json: bool
) -> None:
    """The mail you may read that matches any word of QUERY, best first."""

    def show(page: Any) -> None:
        if page.items:
            _inbox_table(page.items)
        else:
            line_console().print(styled(f"nothing matches {query!r}", style="dim"))

    _call(ctx, as_json, lambda c: c.search_mail(name, query, limit=limit, project=project), show)


@mail.command()
@click.argument("since")
@click.option(
    "--limit", type=click.IntRange(1, 500), default=50, show_default=True, help="At most this many."
)
@acting
@click.pass_context
def since(ctx: click.Context, since: str, limit: int, name: str, as_json: bool) -> None:
    """Your mail since SINCE: a duration back from now (30m, 2h, 1d) or an RFC 3339 time."""

    def show(page: Any) -> None:
        if page.items:
            _inbox_table(page.items)
        else:
            line_console().print(styled(f"no mail for {name} since {since}", style="dim"))

    _call(ctx, as_json, lambda c: c.inbox(name, since=since, limit=limit), show)


@mail.command()
@click.argument("project", required=False)
@click.option("--clear", is_flag=True, help="Focus on nothing.")
@acting
@click.pass_context
def focus(ctx: click.Context, project: str | None, clear: bool, name: str, as_json: bool) -> None:
    """Narrow your inbox, spaces and search to PROJECT's spaces (mail outside spaces stays)."""
    if (project is None) == (not clear):
        raise click.UsageError("name a PROJECT, or --clear")
    _call(
        ctx,
        as_json,
        lambda c: c.focus(name, project),
        _done(f"{name} focuses on {project}" if project else f"{name} focuses on nothing"),
    )


def _lock_rows(holders: Sequence[Any]) -> list[tuple[str, str, str, str]]:
    return [(h.resource, h.holder, h.mode, _when(h.expires_at)) for h in holders]


@mail.command()
@click.argument("resource")
@click.option(
    "--advisory", "mode", flag_value="advisory", help="Shared with other advisory holders."
)
@click.option(
    "--exclusive", "mode", flag_value="exclusive", default=True, help="Yours alone (default)."
)
@click.option("--ttl", default="5m", show_default=True, help="How long it holds: 90s, 5m, 2h.")
@acting
@click.pass_context
def lock(ctx: click.Context, resource: str, mode: str, ttl: str, name: str, as_json: bool) -> None:
    """Take (or renew) a lock on RESOURCE; exit status 1 when others hold it."""
    seconds = _seconds(ttl)
    settings = settings_of(ctx)

    async def body() -> bool:
        async with connect_or_fail(settings) as client:
            result = await client.lock(name, resource, mode=mode, ttl_s=seconds)  # type: ignore[arg-type]
        if as_json:
            _emit(_document(result))
        elif result.acquired:
            line_console().print(
                styled(f"{name} holds {resource} ({mode}) until {_when(result.expires_at)}")
            )
        else:
            held = ", ".join(
                f"{h.holder} ({h.mode}, until {_when(h.expires_at)})" for h in result.holders
            )
            line_console(stderr=True).print(styled(f"{resource} is held by {held}", style="red"))
        return result.acquired

    if not run_command(body):
        sys.exit(1)


def _seconds(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = text[:-1], text[-1:]
    if unit not in units or not number.isdigit():
        raise click.BadParameter(f"write a duration such as 90s, 5m or 2h; not {text!r}")
    return int(number) * units[unit]


@mail.command()
@click.argument("resource")
@acting
@click.pass_context
def unlock(ctx: click.Context, resource: str, name: str, as_json: bool) -> None:
    """Release your lock on RESOURCE."""
    _call(ctx, as_json, lambda c: c.unlock(name, resource), _done(f"{name} released {resource}"))


@mail.command()
@click.option("--resource", help="Only this resource's.")
@click.option("--holder", help="Only this holder's.")
@acting
@click.pass_context
def locks(
    ctx: click.Context, resource: str | None, holder: str | None, name: str, as_json: bool
) -> None:
    """The locks held now."""

    def show(items: list[Any]) -> None:
        if items:
            _table(("resource", "holder", "mode", "until"), _lock_rows(items))
        else:
            line_console().print(styled("no locks are held", style="dim"))

    _call(ctx, as_json, lambda c: c.locks(resource=resource, holder=holder), show)


# --- spaces --------------------------------------------------------------------------


@mail.group()
def space() -> None:
    """Spaces: broadcast groups, written #name in --to."""


def _spaces_table(items: Sequence[Any]) -> None:
    rows = [
        (
            s.name,
            s.parent or "",
            s.project or "",
            "private" if s.private else "",
            "archived" if s.archived else "",
            str(s.members),
            str(s.messages),
            one_line(s.description, 40),
        )
        for s in items
    ]
    _table(("name", "parent", "project", "", "", "members", "messages", "description"), rows)


@space.command("create")
@click.argument("space_name")
@click.option("--description", default="", help="What it is for.")
@click.option("--parent", help="The space it nests under (3 deep at most).")
@click.option("--project", help="The project it belongs to.")
@click.option("--private", is_flag=True, help="By invitation only.")
@acting
@click.pass_context
def space_create(
    ctx: click.Context,
    space_name: str,
    description: str,
    parent: str | None,
    project: str | None,
    private: bool,
    name: str,
    as_json: bool,
) -> None:
    """Create SPACE_NAME; you are its first member."""
    _call(
        ctx,
        as_json,
        lambda c: c.space_create(
            name,
            space_name,
            description=description,
            parent=parent,
            project=project,
            private=private,
        ),
        lambda s: line_console().print(styled(f"created #{s.name}", style="bold")),
        start=True,
    )


@space.command("list")
@click.option("--project", help="Only this project's (default: your focus).")
@click.option("--parent", help="Only those nested under this one.")
@click.option("--top-level", is_flag=True, help="Only those nested under none.")
@click.option("--archived", is_flag=True, help="Archived ones too.")
@acting
@click.pass_context
def space_list(
    ctx: click.Context,
    project: str | None,
    parent: str | None,
    top_level: bool,
    archived: bool,
    name: str,
    as_json: bool,
) -> None:
    """The spaces you may see, with their member and message counts."""
    _call(
        ctx,
        as_json,
        lambda c: c.spaces(
            reader=name,
            project=project,
            parent=parent,
            top_level=top_level,
            include_archived=archived,
        ),
        _spaces_table,
    )


def _membership(verb: str, method: str, done: str) -> click.Command:
    @acting
    @click.argument("space_name")
    @click.pass_context
    def command(ctx: click.Context, space_name: str, name: str, as_json: bool) -> None:
        _call(
            ctx,
            as_json,
            lambda c: getattr(c, method)(name, space_name),
            _done(f"{name} {done} #{space_name.removeprefix('#')}"),
        )

    command.__doc__ = f"{verb.capitalize()} SPACE_NAME."
    return click.command(verb)(command)


space.add_command(_membership("join", "space_join", "joined"))
space.add_command(_membership("leave", "space_leave", "left"))
space.add_command(_membership("archive", "space_archive", "archived"))


@space.command("invite")
@click.argument("space_name")
@click.argument("invited")
@acting
@click.pass_context
def space_invite(
    ctx: click.Context, space_name: str, invited: str, name: str, as_json: bool
) -> None:
    """Make INVITED a member of SPACE_NAME (how one joins a private space)."""
    _call(
        ctx,
        as_json,
        lambda c: c.space_invite(name, space_name, invited),
        _done(f"{invited} is a member of #{space_name.removeprefix('#')}"),
    )


@space.command("members")
@click.argument("space_name")
@acting
@click.pass_context
def space_members(ctx: click.Context, space_name: str, name: str, as_json: bool) -> None:
    """SPACE_NAME's members, with presence."""

    def show(items: list[Any]) -> None:
        rows = [
            (
                m.name,
                styled("online", style="green") if m.online else styled("offline", style="dim"),
                _when(m.joined_at),
            )
            for m in items
        ]
        _table(("name", "presence", "joined"), rows)

    _call(ctx, as_json, lambda c: c.space_members(space_name, reader=name), show)


@space.command("send")
@click.argument("space_name")
@click.argument("text")
@_writing
@acting
@click.pass_context
def space_send(ctx: click.Context, /, space_name: str, **fields: Any) -> None:
    """Send TEXT (`-`: from stdin) to every member of SPACE_NAME."""
    ctx.invoke(send, to=(f"#{space_name.removeprefix('#')}",), reply_to=None, **fields)


@space.command("read")
@click.argument("space_name")
@click.option("--pinned", is_flag=True, help="Only its pinned mail.")
@click.option(
    "--limit", type=click.IntRange(1, 500), default=20, show_default=True, help="At most this many."
)
@acting
@click.pass_context
def space_read(
    ctx: click.Context, space_name: str, pinned: bool, limit: int, name: str, as_json: bool
) -> None:
    """SPACE_NAME's mail, newest first (whether or not it reached you)."""

    def show(page: Any) -> None:
        if page.items:
            _inbox_table(page.items)
        else:
            line_console().print(styled(f"no mail in #{space_name}", style="dim"))

    _call(
        ctx,
        as_json,
        lambda c: c.inbox(name, space=space_name, pinned_only=pinned, limit=limit),
        show,
    )


# --- projects ------------------------------------------------------------------------


@mail.group()
def project() -> None:
    """Projects: what groups spaces, and what `focus` narrows to."""


def _project_fields(fn: _F) -> _F:
    for option in reversed(
        [
            click.option("--description", help="What it is."),
            click.option("--path", help="Where it lives on disk."),
            click.option("--repository", help="Its repository."),
            click.option("--tag", "tags", multiple=True, help="A tag (repeatable)."),
            click.option("--status", help="active, paused, done...: yours to choose."),
        ]
    ):
        fn = option(fn)
    return fn


def _show_project(p: Any) -> None:
    text = styled(p.name, style="bold")
    for label, value in (
        ("status", p.status),
        ("description", p.description),
        ("path", p.path or ""),
        ("repository", p.repository or ""),
        ("tags", ", ".join(p.tags)),
    ):
        if value:
            text.append(f"\n{label}: ", style="dim")
            text.append(value)
    line_console().print(text)


@project.command("create")
@click.argument("project_name")
@_project_fields
@acting
@click.pass_context
def project_create(
    ctx: click.Context, /, project_name: str, name: str, as_json: bool, **fields: Any
) -> None:
    """Create PROJECT_NAME."""
    given = {k: (list(v) if k == "tags" else v) for k, v in fields.items() if v not in (None, ())}
    _call(
        ctx,
        as_json,
        lambda c: c.project_create(name, project_name, **given),
        _show_project,
        start=True,
    )


@project.command("list")
@click.option("--status", help="Only those with this status.")
@click.option("--tag", help="Only those with this tag.")
@acting
@click.pass_context
def project_list(
    ctx: click.Context, status: str | None, tag: str | None, name: str, as_json: bool
) -> None:
    """The projects."""

    def show(items: list[Any]) -> None:
        rows = [(p.name, p.status, ", ".join(p.tags), one_line(p.description, 50)) for p in items]
        _table(("name", "status", "tags", "description"), rows)

    _call(ctx, as_json, lambda c: c.projects(status=status, tag=tag), show)


@project.command("show")
@click.argument("project_name")
@acting
@click.pass_context
def project_show(ctx: click.Context, project_name: str, name: str, as_json: bool) -> None:
    """One project, with every field it has."""
    _call(ctx, as_json, lambda c: c.project_get(project_name), _show_project)


@project.command("update")
@click.argument("project_name")
@_project_fields
@acting
@click.pass_context
def project_update(
    ctx: click.Context, /, project_name: str, name: str, as_json: bool, **fields: Any
) -> None:
    """Change the fields given of PROJECT_NAME; keep the rest."""
    given = {k: (list(v) if k == "tags" else v) for k, v in fields.items() if v not in (None, ())}
    _call(ctx, as_json, lambda c: c.project_update(name, project_name, **given), _show_project)


@project.command("delete")
@click.argument("project_name")
@acting
@click.pass_context
def project_delete(ctx: click.Context, project_name: str, name: str, as_json: bool) -> None:
    """Forget PROJECT_NAME (refused while a space belongs to it)."""
    _call(
        ctx,
        as_json,
        lambda c: c.project_delete(name, project_name),
        _done(f"deleted {project_name}"),
    )
