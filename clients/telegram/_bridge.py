"""The bridge: Telegram updates in, the agent's runs out, every chat over one connection.

python-telegram-bot runs on asyncio, so the bridge does too (anyio's asyncio
backend, like the client library under it). Updates, from long polling or a
webhook, land in one queue; ``Bridge.handle`` takes each in order and starts
a task for it (a turn, a command, a button press), so that nothing one chat
waits for holds up another.

A message for the agent is written to the spool (``_spool.py``) as it enters
the queue, before Telegram is told it was received, and stays there until its
answer is shown in the chat; on start, the bridge first sends what the spool
holds, or follows the run of a message the daemon already took.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, TypeVarTuple

import anyio
import anyio.abc
import structlog
from chinwag.protocol import Entry, Start
from telegram import Bot, BotCommand, CallbackQuery, Message, Update
from telegram.constants import ChatType
from telegram.error import TelegramError
from telegram.ext import Updater

from .._client import ChinwagError, Client
from ._chat import Chat
from ._link import Backoff, DaemonLink
from ._outbox import Outbox
from ._spool import Spool, Spooled
from ._turn import Turn
from ._webhook import Webhook, serve_webhook

log = structlog.get_logger()

TELEGRAM_API_URL = "https://api.telegram.org"
#: The updates the bridge asks Telegram for.
ALLOWED_UPDATES = ("message", "callback_query")
#: The most a command waits for the daemon to be reachable before it says it is not.
DAEMON_WAIT_S = 30.0
#: The most the bridge waits, when stopping, for the Bot API to confirm the updates taken.
STOP_TIMEOUT_S = 10.0
_HISTORY_TURNS = 5
#: How many of a conversation's last entries the replay reads first, to find
#: the messages it already took.
_REPLAY_WINDOW = 64
_HISTORY_ENTRY_CHARS = 500

_Ts = TypeVarTuple("_Ts")


class CommandHelp(NamedTuple):
    name: str
    usage: str
    description: str  # one line: Telegram's command menu shows it too


#: The bridge's commands, as /help lists them and Telegram's "/" menu offers them.
COMMANDS = (
    CommandHelp(
        "kill", "/kill", "stop the answer being written (/kill all also drops queued messages)"
    ),
    CommandHelp(
        "compact",
        "/compact [what to keep]",
        "summarise the conversation so far, to free the agent's context",
    ),
    CommandHelp("title", "/title", "the conversation's title"),
    CommandHelp("history", "/history [N]", "the last N turns (default 5)"),
    CommandHelp("guest", "/guest NAME text", "ask another agent, in this conversation"),
    CommandHelp("help", "/help", "what this bot does, and its commands"),
)

HELP = (
    "I pass this chat on to the chinwag agent **{agent}**. Write, and the answer streams in."
    "\n\n" + "\n".join(f"{command.usage}: {command.description}" for command in COMMANDS)
)


@dataclass(frozen=True)
class BridgeConfig:
    token: str
    agent: str
    socket_path: Path | str  # the daemon socket, or daemons' URLs (chinwag+tls://...)
    #: Where the spool is kept: one file per bot, `spool-<bot id>.jsonl`.
    state_dir: Path
    api_url: str = TELEGRAM_API_URL
    #: Telegram user ids that may talk to the agent; nobody else can.
    allowed_users: frozenset[int] = frozenset()
    webhook: Webhook | None = None
    #: The least time between two messages or edits in one chat (Telegram allows ~1/s).
    edit_interval_s: float = 1.0
    #: How long one getUpdates long poll waits for updates.
    poll_timeout_s: float = 30.0
    #: The longest wait between two attempts to reach the daemon.
    reconnect_ceiling_s: float = 10.0


class Command(NamedTuple):
    name: str
    arguments: str
    ours: bool  # `/name` or `/name@<this bot>`, not a command for another bot in a group


def parse_command(text: str, username: str) -> Command | None:
    """The command ``text`` starts with (`/name[@bot] arguments`), or None."""
    if not text.startswith("/"):
        return None
    head, _, arguments = text.partition(" ")
    head, newline, more = head.partition("\n")
    if newline:
        arguments = f"{more} {arguments}" if arguments else more
    name, _, addressee = head[1:].partition("@")
    ours = not addressee or addressee.lower() == username.lower()
    return Command(name.lower(), arguments.strip(), ours)


async def run_bridge(
    config: BridgeConfig,
    *,
    task_status: anyio.abc.TaskStatus[int | None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run the bridge until cancelled (on asyncio).

    Reports started once updates flow in, with the webhook server's port (or
    None when long polling); the messages the spool held are on their way by
    then. A token Telegram refuses raises ``InvalidToken``, a spool that does
    not parse ``SpoolCorrupt``, one another bridge holds (or that cannot be
    used) ``SpoolError``.
    """
    api = config.api_url.rstrip("/")
    bot = Bot(config.token, base_url=f"{api}/bot", base_file_url=f"{api}/file/bot")
    link = DaemonLink(config.socket_path, Backoff(ceiling=config.reconnect_ceiling_s))
    async with bot:
        path = config.state_dir / f"spool-{bot.id}.jsonl"
        spool = await anyio.to_thread.run_sync(Spool.open, path)
        # Closed, and its lock released, once every task has ended (and any
        # write a cancelled task left its worker thread doing).
        with contextlib.closing(spool):
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(link.run)
                await Bridge(config, bot, link, tasks, spool).serve(task_status)


class Inbox(asyncio.Queue[object]):
    """The queue updates arrive in. A message for the agent is spooled on its way in:
    the Updater confirms an update to Telegram (by its next getUpdates) only once
    ``put`` returns, and the webhook answers Telegram's post only then."""

    def __init__(self, bridge: Bridge) -> None:
        super().__init__()
        self._bridge = bridge

    async def put(self, item: object) -> None:
        if isinstance(item, Update) and not await self._bridge.take(item):
            return
        await super().put(item)


class Bridge:
    """Routes each update to its chat: a turn for the agent, a command, a button press."""

    def __init__(
        self,
        config: BridgeConfig,
        bot: Bot,
        link: DaemonLink,
        tasks: anyio.abc.TaskGroup,
        spool: Spool,
    ) -> None:
        self._config = config
        self._bot = bot
        self._link = link
        self._tasks = tasks
        self._spool = spool
        self._outboxes: dict[int, Outbox] = {}
        self._chats: dict[tuple[int, int | None], Chat] = {}
        # Those of COMMANDS the bridge answers itself (`/guest` goes to the agent),
        # and /start, which Telegram sends when someone opens the chat.
        self._commands: dict[str, Callable[[Chat, str], Awaitable[None]]] = {
            "start": self._help,
            "help": self._help,
            "kill": self._kill,
            "compact": self._compact,
            "title": self._title,
            "history": self._history,
        }

    async def serve(self, task_status: anyio.abc.TaskStatus[int | None]) -> None:
        """Start what the spool holds, then take updates (by webhook or long polling)
        and handle them until cancelled."""
        config = self._config
        if not config.allowed_users:
            log.warning(
                "telegram_nobody_allowed",
                hint="every message is refused: pass --allow USER_ID (repeatable) or set "
                "CHINWAG_TELEGRAM_ALLOW; a refused user is told their id",
            )
        log.info(
            "telegram_bridge_started",
            bot=self._bot.username,
            agent=config.agent,
            updates="webhook" if config.webhook else "long polling",
        )
        await self.offer_commands()
        self.replay()  # before any new update, so that each chat keeps its order
        updates = Inbox(self)
        if config.webhook is not None:
            port = await self._tasks.start(
                serve_webhook, self._bot, updates, config.webhook, ALLOWED_UPDATES
            )
            task_status.started(port)
            await self.dispatch(updates)
        else:
            async with Updater(self._bot, updates) as updater:
                await updater.start_polling(
                    timeout=dt.timedelta(seconds=config.poll_timeout_s),
                    allowed_updates=ALLOWED_UPDATES,
                )
                try:
                    task_status.started(None)
                    await self.dispatch(updates)
                finally:
                    # Stopping confirms the updates taken, so that a restart does
                    # not take them again (the spool keeps those the daemon does
                    # not have yet); bounded, for an unreachable API.
                    with anyio.move_on_after(STOP_TIMEOUT_S, shield=True):
                        await updater.stop()

    async def offer_commands(self) -> None:
        """Have Telegram offer the bridge's commands when "/" is typed (best effort:
        the commands work without the menu)."""
        menu = [BotCommand(command.name, command.description) for command in COMMANDS]
        try:
            await self._bot.set_my_commands(menu)
        except TelegramError as exc:
            log.warning("telegram_commands_not_offered", error=str(exc))

    async def dispatch(self, updates: asyncio.Queue[object]) -> None:
        """Handle updates from ``updates`` in order, forever."""
        while True:
            update = await updates.get()
            if isinstance(update, Update):
                self.handle(update)

    # --- the spool ----------------------------------------------------------------

    async def take(self, update: Update) -> bool:
        """Spool the message ``update`` brings for the agent, if any; False for an
        update taken before (Telegram sends one again when a crash lost its
        confirmation), whose message the spool has or the daemon had."""
        if self._spool.knows(update.update_id):
            log.info("telegram_update_repeated", update_id=update.update_id)
            return False
        message = self.for_agent(update)
        if message is not None:
            await self._spool.add(message)
        return True

    def for_agent(self, update: Update) -> Spooled | None:
        """The message ``update`` brings for the agent (a turn, or a question's answer)."""
        message = update.message
        if message is None or message.from_user is None or message.text is None:
            return None
        if message.from_user.id not in self._config.allowed_users:
            return None
        text, guest = message.text, None
        command = parse_command(text, self._bot.username)
        if command is not None:
            if not command.ours or command.name in self._commands:
                return None
            if command.name == "guest":
                guest, _, text = command.arguments.partition(" ")
                text = text.strip()
                if not guest or not text:
                    return None
        in_group = message.chat.type in (ChatType.GROUP, ChatType.SUPERGROUP)
        return Spooled(
            update_id=update.update_id,
            chat_id=message.chat.id,
            thread_id=_thread_id(message),
            text=text,
            guest=guest,
            # In a group, the answer goes as a reply, to say which message it answers.
            reply_to=message.message_id if in_group else None,
        )

    def replay(self) -> None:
        """Start a turn for each message the spool holds, in order, chat by chat."""
        chats: dict[Chat, list[Spooled]] = {}
        for message in self._spool.pending:
            chats.setdefault(self._chat(message.chat_id, message.thread_id), []).append(message)
        for chat, messages in chats.items():
            log.info("telegram_spool_replayed", sender=chat.sender, messages=len(messages))
            tickets = [chat.take_ticket() for _ in messages]
            self._spawn(self._replay, chat, messages, tickets)

    async def _replay(self, chat: Chat, messages: list[Spooled], tickets: list[int]) -> None:
        runs: dict[int, Start] = {}
        try:
            runs = await self._delivered(chat, messages)
        finally:
            # Even when the check failed: the tickets are the chat's, and a
            # ticket never released holds up every later message of the chat.
            for message, ticket in zip(messages, tickets, strict=True):
                turn = Turn(chat, self._link, self._config.agent, message, self._spool)
                self._spawn(turn.run, ticket, runs.get(message.update_id))

    async def _delivered(self, chat: Chat, messages: list[Spooled]) -> dict[int, Start]:
        """By update id, the runs the daemon started for those of ``messages`` it
        took from a bridge that stopped before hearing so.

        Only a message whose `stream` request went out (``sent_at``) can have
        reached the daemon. It did if the conversation holds a user entry with
        its text stored since, archived by a compaction or not; messages and
        entries are matched in order, each entry to one message at most.
        """
        sent = [message for message in messages if message.sent_at is not None]
        if not sent:
            return {}
        since = min(message.sent_at for message in sent if message.sent_at is not None)
        retry = Backoff(first=0.2, ceiling=5.0)
        while True:
            client = await self._link.client()
            try:
                recent = await self._stored_since(client, chat.sender, since)
                break
            except ChinwagError as exc:
                if exc.code != 503:
                    # 404: no conversation, so nothing reached it. Otherwise,
                    # sending again risks a duplicate; not sending, a loss.
                    if exc.code != 404:
                        log.warning("telegram_spool_check_failed", error=str(exc))
                    return {}
                await anyio.sleep(retry.next())
        entries = [entry for entry in recent if entry.role == "user" and entry.run_id]
        runs: dict[int, Start] = {}
        first = 0  # messages went out in order: a later one is stored after an earlier one
        for message in sent:
            assert message.sent_at is not None
            for index in range(first, len(entries)):
                entry = entries[index]
                stored = entry.created_at
                if entry.content == message.text and stored and stored >= message.sent_at:
                    assert entry.run_id is not None
                    speaker = message.guest or self._config.agent
                    runs[message.update_id] = Start(
                        run_id=entry.run_id, agent=speaker, seq=entry.seq
                    )
                    log.info("telegram_spool_already_delivered", update_id=message.update_id)
                    first = index + 1
                    break
        return runs

    async def _stored_since(self, client: Client, sender: str, since: dt.datetime) -> list[Entry]:
        """The conversation's entries, archived ones included, from its end back
        to one stored before ``since`` (or to its start).

        Read from the end in windows, each twice as wide as the one before, so
        that a long conversation is not read whole.
        """
        # limit 0: no entries, only the conversation's newest seq.
        last = (await client.history(self._config.agent, sender, limit=0)).last_seq
        entries: list[Entry] = []
        upper, window = last, _REPLAY_WINDOW
        while upper > 0:
            after = max(0, last - window)
            entries[:0] = await self._entries_between(client, sender, after, upper)
            upper, window = after, 2 * window
            if entries and entries[0].created_at is not None and entries[0].created_at < since:
                break
        return entries

    async def _entries_between(
        self, client: Client, sender: str, after: int, upper: int
    ) -> list[Entry]:
        """The entries with ``after < seq <= upper``, archived ones included, paged."""
        entries: list[Entry] = []
        pages = client.iter_history(
            self._config.agent,
            sender,
            after_seq=after,
            include_archived=True,
            page_size=upper - after,
        )
        async with contextlib.aclosing(pages):
            async for entry in pages:
                if entry.seq > upper:
                    break
                entries.append(entry)
        return entries

    # --- updates ------------------------------------------------------------------

    def handle(self, update: Update) -> None:
        """Start what ``update`` asks for; returns at once."""
        if update.callback_query is not None:
            self._spawn(self._pressed, update.callback_query)
            return
        message = update.message
        if message is None or message.from_user is None:
            return
        if message.from_user.id not in self._config.allowed_users:
            self._spawn(self._refuse, message)
            return
        chat = self._chat(message.chat.id, _thread_id(message))
        spooled = self.for_agent(update)
        if spooled is not None:
            if chat.asking and spooled.guest is None:
                self._spawn(self._answer, chat, spooled)
            else:
                self._start_turn(chat, spooled)
            return
        if message.text is None:
            self._spawn(chat.say, "I only read text messages.")
            return
        command = parse_command(message.text, self._bot.username)
        if command is None or not command.ours:
            return  # a command for another bot
        if command.name == "guest":
            self._spawn(chat.say, "Usage: /guest NAME your message")
        else:
            self._spawn(self._commands[command.name], chat, command.arguments)

    def _chat(self, chat_id: int, thread_id: int | None) -> Chat:
        chat = self._chats.get((chat_id, thread_id))
        if chat is None:
            outbox = self._outboxes.get(chat_id)
            if outbox is None:
                outbox = Outbox(self._bot, chat_id, self._config.edit_interval_s)
                self._outboxes[chat_id] = outbox
            chat = Chat(outbox, thread_id, self._link, self._config.agent)
            self._chats[chat_id, thread_id] = chat
        return chat

    def _spawn(self, fn: Callable[[*_Ts], Awaitable[object]], *args: *_Ts) -> None:
        self._tasks.start_soon(self._guarded, fn, *args)

    async def _guarded(self, fn: Callable[[*_Ts], Awaitable[object]], *args: *_Ts) -> None:
        # One chat's failure must not stop the bridge for every other chat.
        try:
            await fn(*args)
        except Exception:
            log.exception("telegram_task_failed")

    def _start_turn(self, chat: Chat, message: Spooled) -> None:
        ticket = chat.take_ticket()  # taken now, so that messages go out in arrival order
        turn = Turn(chat, self._link, self._config.agent, message, self._spool)
        self._spawn(turn.run, ticket)

    async def _answer(self, chat: Chat, message: Spooled) -> None:
        if await chat.typed(message.text):
            # The question's run lives in the daemon alone: a stopped bridge
            # could not give it the answer later.
            await self._spool.done(message.update_id)
        else:
            self._start_turn(chat, message)  # the question closed meanwhile: a new message

    async def _refuse(self, message: Message) -> None:
        user = message.from_user
        assert user is not None
        log.warning(
            "telegram_user_refused",
            user_id=user.id,
            username=user.username,
            chat_id=message.chat.id,
            hint=f"to allow them, pass --allow {user.id} (or add it to CHINWAG_TELEGRAM_ALLOW)",
        )
        if message.chat.type == ChatType.PRIVATE:  # in a group, answering would be noise
            chat = self._chat(message.chat.id, None)
            await chat.say(
                f"This bot is private. Your Telegram user id is {user.id}; "
                f"its owner can let you in with `--allow {user.id}`.",
                insist=False,
            )

    async def _pressed(self, query: CallbackQuery) -> None:
        async def acknowledge(text: str) -> None:
            try:
                await self._bot.answer_callback_query(query.id, text=text or None)
            except TelegramError as exc:
                log.info("telegram_callback_answer_failed", error=str(exc))

        if query.from_user.id not in self._config.allowed_users:
            log.warning("telegram_user_refused", user_id=query.from_user.id, button=True)
            await acknowledge("You are not allowed to answer.")
            return
        message = query.message
        chat = None
        if message is not None and query.data is not None:
            thread_id = (
                message.message_thread_id
                if isinstance(message, Message) and message.is_topic_message
                else None
            )
            chat = self._chats.get((message.chat.id, thread_id))
        if chat is None or query.data is None:
            await acknowledge("This question is no longer open.")
            return
        await chat.press(query.data, acknowledge)

    # --- commands ---------------------------------------------------------------------

    async def _daemon(self, chat: Chat) -> Client | None:
        with anyio.move_on_after(DAEMON_WAIT_S):
            return await self._link.client()
        await chat.say("⚠️ The chinwag daemon is not reachable right now; try again shortly.")
        return None

    async def _help(self, chat: Chat, arguments: str) -> None:
        await chat.say(HELP.format(agent=self._config.agent))

    async def _kill(self, chat: Chat, arguments: str) -> None:
        client = await self._daemon(chat)
        if client is None:
            return
        try:
            killed = await client.kill(
                self._config.agent, chat.sender, all=arguments.lower() == "all"
            )
        except ChinwagError as exc:
            if exc.code != 404:  # 404: no conversation yet, so nothing runs
                await chat.say(f"⚠️ Could not stop it: {exc.message} (error {exc.code})")
                return
        else:
            if killed.run_id is not None:
                return  # the run's own message says it stopped
        await chat.say("Nothing is running.")

    async def _compact(self, chat: Chat, arguments: str) -> None:
        client = await self._daemon(chat)
        if client is None:
            return
        try:
            compacted = await client.compact(
                self._config.agent, chat.sender, instructions=arguments or None
            )
        except ChinwagError as exc:
            await chat.say(f"⚠️ Could not compact: {exc.message} (error {exc.code})")
            return
        await chat.say(
            f"🗜 Compacted {compacted.archived_entries} entries into the archive "
            f"`{compacted.archive}`."
        )

    async def _title(self, chat: Chat, arguments: str) -> None:
        client = await self._daemon(chat)
        if client is None:
            return
        try:
            page = await client.list_conversations(self._config.agent, chat.sender, limit=1)
        except ChinwagError as exc:
            await chat.say(f"⚠️ {exc.message} (error {exc.code})")
            return
        if not page.items:
            await chat.say("No conversation yet: send a message first.")
        elif not page.items[0].title:
            await chat.say("This conversation has no title yet.")
        else:
            await chat.say(f"📌 {page.items[0].title}")

    async def _history(self, chat: Chat, arguments: str) -> None:
        turns = (
            max(1, min(int(arguments), 50))
            if arguments.isdecimal() and arguments.isascii()
            else _HISTORY_TURNS
        )
        client = await self._daemon(chat)
        if client is None:
            return
        try:
            page = await client.list_conversations(self._config.agent, chat.sender, limit=1)
            if not page.items:
                await chat.say("No conversation yet: send a message first.")
                return
            # A turn is a few entries, more with tool calls: read a window, not everything.
            after = max(0, page.items[0].last_seq - 20 * turns)
            messages = [
                entry
                async for entry in client.iter_history(
                    self._config.agent, chat.sender, after_seq=after
                )
                if entry.kind == "message" and entry.role in ("user", "assistant") and entry.content
            ]
        except ChinwagError as exc:
            await chat.say(f"⚠️ {exc.message} (error {exc.code})")
            return
        starts = [index for index, entry in enumerate(messages) if entry.role == "user"]
        shown = messages[starts[-turns] if len(starts) >= turns else 0 :]
        if not shown:
            await chat.say("Nothing said yet.")
            return
        lines = []
        for entry in shown:
            who = "You" if entry.role == "user" else entry.agent or self._config.agent
            content = entry.content
            if len(content) > _HISTORY_ENTRY_CHARS:
                content = content[: _HISTORY_ENTRY_CHARS - 1] + "…"
            lines.append(f"**{who}:** {content}")
        await chat.say("\n\n".join(lines))


def _thread_id(message: Message) -> int | None:
    return message.message_thread_id if message.is_topic_message else None
