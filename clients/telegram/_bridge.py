"""The bridge: Telegram updates in, the agent's runs out, every chat over one connection.

python-telegram-bot runs on asyncio, so the bridge does too (anyio's asyncio
backend, like the client library under it). Updates, from long polling or a
webhook, land in one queue; ``Bridge.handle`` takes each in order and starts
a task for it (a turn, a command, a button press), so that nothing one chat
waits for holds up another.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, TypeVarTuple

import anyio
import anyio.abc
import structlog
from telegram import Bot, CallbackQuery, Message, Update
from telegram.constants import ChatType
from telegram.error import TelegramError
from telegram.ext import Updater

from .._client import ChinwagError, Client
from ._chat import Chat
from ._link import Backoff, DaemonLink
from ._outbox import Outbox
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
_HISTORY_ENTRY_CHARS = 500

_Ts = TypeVarTuple("_Ts")

HELP = """I pass this chat on to the chinwag agent **{agent}**. Write, and the answer streams in.

/kill: stop the answer being written (/kill all also drops queued messages)
/compact [what to keep]: summarise the conversation so far, to free the agent's context
/title: the conversation's title
/history [N]: the last N turns (default 5)
/guest NAME text: ask another agent, in this conversation
/help: this message"""


@dataclass(frozen=True)
class BridgeConfig:
    token: str
    agent: str
    socket_path: Path
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
    None when long polling). A token Telegram refuses raises ``InvalidToken``.
    """
    api = config.api_url.rstrip("/")
    bot = Bot(config.token, base_url=f"{api}/bot", base_file_url=f"{api}/file/bot")
    updates: asyncio.Queue[object] = asyncio.Queue()
    link = DaemonLink(config.socket_path, Backoff(ceiling=config.reconnect_ceiling_s))
    async with bot, anyio.create_task_group() as tasks:
        tasks.start_soon(link.run)
        bridge = Bridge(config, bot, link, tasks)
        if not config.allowed_users:
            log.warning(
                "telegram_nobody_allowed",
                hint="every message is refused: pass --allow USER_ID (repeatable) or set "
                "CHINWAG_TELEGRAM_ALLOW; a refused user is told their id",
            )
        log.info(
            "telegram_bridge_started",
            bot=bot.username,
            agent=config.agent,
            updates="webhook" if config.webhook else "long polling",
        )
        if config.webhook is not None:
            port = await tasks.start(serve_webhook, bot, updates, config.webhook, ALLOWED_UPDATES)
            task_status.started(port)
            await bridge.dispatch(updates)
        else:
            async with Updater(bot, updates) as updater:
                await updater.start_polling(
                    timeout=dt.timedelta(seconds=config.poll_timeout_s),
                    allowed_updates=ALLOWED_UPDATES,
                )
                try:
                    task_status.started(None)
                    await bridge.dispatch(updates)
                finally:
                    # Stopping confirms the updates taken, so that a restart
                    # does not take them again; bounded, for an unreachable API.
                    with anyio.move_on_after(STOP_TIMEOUT_S, shield=True):
                        await updater.stop()


class Bridge:
    """Routes each update to its chat: a turn for the agent, a command, a button press."""

    def __init__(
        self, config: BridgeConfig, bot: Bot, link: DaemonLink, tasks: anyio.abc.TaskGroup
    ) -> None:
        self._config = config
        self._bot = bot
        self._link = link
        self._tasks = tasks
        self._outboxes: dict[int, Outbox] = {}
        self._chats: dict[tuple[int, int | None], Chat] = {}
        self._commands: dict[str, Callable[[Chat, str], Awaitable[None]]] = {
            "start": self._help,
            "help": self._help,
            "kill": self._kill,
            "compact": self._compact,
            "title": self._title,
            "history": self._history,
            "guest": self._guest,
        }

    async def dispatch(self, updates: asyncio.Queue[object]) -> None:
        """Handle updates from ``updates`` in order, forever."""
        while True:
            update = await updates.get()
            if isinstance(update, Update):
                self.handle(update)

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
        thread_id = message.message_thread_id if message.is_topic_message else None
        chat = self._chat(message.chat.id, thread_id)
        text = message.text
        if text is None:
            self._spawn(chat.say, "I only read text messages.")
            return
        command = parse_command(text, self._bot.username)
        if command is not None and not command.ours:
            return
        if command is not None and command.name in self._commands:
            self._spawn(self._commands[command.name], chat, command.arguments)
        elif chat.asking:
            self._spawn(self._answer, chat, text)
        else:
            self._start_turn(chat, text)

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

    def _start_turn(self, chat: Chat, text: str, guest: str | None = None) -> None:
        ticket = chat.take_ticket()  # taken now, so that messages go out in arrival order
        self._spawn(Turn(chat, self._link, self._config.agent, text, guest).run, ticket)

    async def _answer(self, chat: Chat, text: str) -> None:
        if not await chat.typed(text):
            self._start_turn(chat, text)  # the question closed meanwhile: a new message

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
            history = await client.history(self._config.agent, chat.sender, after_seq=after)
        except ChinwagError as exc:
            await chat.say(f"⚠️ {exc.message} (error {exc.code})")
            return
        messages = [
            entry
            for entry in history.entries
            if entry.kind == "message" and entry.role in ("user", "assistant") and entry.content
        ]
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

    async def _guest(self, chat: Chat, arguments: str) -> None:
        guest, _, text = arguments.partition(" ")
        if not guest or not text.strip():
            await chat.say("Usage: /guest NAME your message")
            return
        self._start_turn(chat, text.strip(), guest=guest)
