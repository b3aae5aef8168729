"""One conversation as Telegram shows it: a chat, or one topic of a forum chat."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import anyio
import structlog
from chinwag.protocol import AskUser
from telegram import InlineKeyboardMarkup

from .._client import ChinwagError
from ._ask import AskPrompt, Press
from ._formatting import split_message
from ._link import DaemonLink
from ._outbox import Outbox

log = structlog.get_logger()

_TOASTS = {
    Press.STALE: "This question is no longer open.",
    Press.TOGGLED: "",
    Press.NOTHING_CHOSEN: "Tick at least one option, or tap Other… to type an answer.",
    Press.TYPE: "Type your answer and send it.",
    Press.ANSWERED: "",
}


#: What a message waiting for the daemon to come back is answered, once per outage.
OUTAGE_NOTICE = "🔄 The agent is restarting; your message is kept, and answered once it is back."


#: How often "typing…" is sent again while a run works: Telegram shows it for 5 s.
TYPING_EVERY_S = 4.0


def sender_for(chat_id: int, thread_id: int | None) -> str:
    """The conversation's sender: `tg:<chat id>`, or `tg:<chat id>:<topic id>` in a forum."""
    return f"tg:{chat_id}" if thread_id is None else f"tg:{chat_id}:{thread_id}"


class Typing:
    """Keeps "typing…" showing in a chat (or topic) while any of its turns wants it.

    ``run`` sends the chat action when it is wanted, then again every ``every``
    seconds until it no longer is; each turn runs it while it lives, and one
    at a time sends, so that a chat gets one indicator however many turns it has.
    """

    def __init__(self, outbox: Outbox, thread_id: int | None, every: float = TYPING_EVERY_S):
        self.every = every
        self._outbox = outbox
        self._thread_id = thread_id
        self._wanted: set[object] = set()  # the turns that want it
        self._changed = anyio.Event()
        self._sending = anyio.Lock()

    def want(self, turn: object, wanted: bool) -> None:
        before = bool(self._wanted)
        if wanted:
            self._wanted.add(turn)
        else:
            self._wanted.discard(turn)
        if bool(self._wanted) != before:
            self._changed.set()
            self._changed = anyio.Event()

    async def run(self) -> None:
        """Show it while it is wanted, until cancelled (waiting while another
        turn's ``run`` sends)."""
        async with self._sending:
            while True:
                while not self._wanted:
                    await self._change()
                await self._outbox.typing(self._thread_id)
                with anyio.move_on_after(self.every):
                    while self._wanted:
                        await self._change()

    async def _change(self) -> None:
        changed = self._changed
        await changed.wait()


class Chat:
    """A Telegram chat (or forum topic) and its conversation with the agent.

    It keeps the order in which its messages reach the daemon, and the
    ``ask_user`` question it shows, if any.
    """

    def __init__(self, outbox: Outbox, thread_id: int | None, link: DaemonLink, agent: str) -> None:
        self.outbox = outbox
        self.thread_id = thread_id
        self.sender = sender_for(outbox.chat_id, thread_id)
        self.typing = Typing(outbox, thread_id)
        self._link = link
        self._agent = agent
        self._prompt: AskPrompt | None = None
        self._ask_lock = anyio.Lock()
        self._tickets = 0
        self._serving = 0  # the ticket whose message goes to the daemon next
        self._done: set[int] = set()
        self._served = anyio.Event()
        self._outage_told = 0  # the last outage of the daemon the chat was told of

    async def say(
        self,
        text: str,
        *,
        markup: InlineKeyboardMarkup | None = None,
        insist: bool = True,
        reply_to: int | None = None,
    ) -> int | None:
        """Send Markdown ``text`` to the chat, in several messages if it is long (the
        keyboard on the last, the first a reply to ``reply_to``); the last message's
        id, or None if it was not sent."""
        pieces = split_message(text)
        message_id: int | None = None
        for number, piece in enumerate(pieces, 1):
            message_id = await self.outbox.send(
                piece,
                thread_id=self.thread_id,
                markup=markup if number == len(pieces) else None,
                insist=insist,
                reply_to=reply_to if number == 1 else None,
            )
        return message_id

    async def tell_outage(self, outage: int) -> None:
        """Say that messages are kept while the daemon is away: once for each ``outage``."""
        if outage != self._outage_told:
            self._outage_told = outage
            await self.say(OUTAGE_NOTICE)

    # --- message order ---------------------------------------------------------------

    def take_ticket(self) -> int:
        """A place in line for a message, taken in the order messages arrive."""
        self._tickets += 1
        return self._tickets - 1

    @asynccontextmanager
    async def in_order(self, ticket: int) -> AsyncIterator[None]:
        """Wait until every earlier ticket has had its turn, then hold this one.

        Turns run concurrently (a second message queues in the daemon while
        the first runs), but their `stream` requests must leave in the order
        the messages came, so the daemon queues them in that order.
        """
        try:
            while self._serving < ticket:
                served = self._served
                await served.wait()
            yield
        finally:
            self.release(ticket)

    def release(self, ticket: int) -> None:
        """``ticket`` has had its turn, or needs none: the tickets after it may go."""
        if ticket >= self._serving:
            self._done.add(ticket)
            while self._serving in self._done:
                self._done.discard(self._serving)
                self._serving += 1
            self._served.set()
            self._served = anyio.Event()

    # --- ask_user ---------------------------------------------------------------------

    @property
    def asking(self) -> bool:
        """Whether a question is open, so that text typed now answers it."""
        return self._prompt is not None

    async def present(self, ask: AskUser) -> None:
        """Show an ``ask_user``: its first question, with its options as buttons."""
        async with self._ask_lock:
            if self._prompt is not None:  # an earlier run's, not withdrawn yet
                await self._close(self._prompt)
            prompt = AskPrompt(ask, secrets.token_hex(4))
            self._prompt = prompt
            prompt.message_id = await self.say(prompt.text(), markup=prompt.keyboard())

    async def withdraw(self, ask_id: str) -> None:
        """The run that asked ``ask_id`` ended: its question takes no more answers."""
        async with self._ask_lock:
            if self._prompt is not None and self._prompt.ask_id == ask_id:
                await self._close(self._prompt)

    async def _close(self, prompt: AskPrompt) -> None:
        self._prompt = None
        if prompt.message_id is not None:
            await self.outbox.edit(
                prompt.message_id, f"❓ {prompt.question.question}\n\n_No longer open._"
            )

    async def press(self, data: str, acknowledge: Callable[[str], Awaitable[None]]) -> None:
        """A button of a question was pressed: ``acknowledge`` it at once, then act."""
        async with self._ask_lock:
            prompt = self._prompt
            outcome = prompt.press(data) if prompt is not None else Press.STALE
            await acknowledge(_TOASTS[outcome])
            if prompt is None or prompt.message_id is None:
                return
            if outcome in (Press.TOGGLED, Press.TYPE):
                await self.outbox.edit(prompt.message_id, prompt.text(), markup=prompt.keyboard())
            elif outcome is Press.ANSWERED:
                await self._answered(prompt)

    async def typed(self, text: str) -> bool:
        """Text typed while a question is open answers it; False if none is open."""
        async with self._ask_lock:
            prompt = self._prompt
            if prompt is None:
                return False
            prompt.type(text)
            await self._answered(prompt)
            return True

    async def _answered(self, prompt: AskPrompt) -> None:
        answered = prompt.answered_text(prompt.answers[-1])
        message_id = prompt.message_id
        if prompt.complete:
            self._prompt = None
            await self._reply(prompt)
        if message_id is not None:
            await self.outbox.edit(message_id, answered)
        if not prompt.complete:
            prompt.next_question()
            prompt.message_id = await self.say(prompt.text(), markup=prompt.keyboard())

    async def _reply(self, prompt: AskPrompt) -> None:
        try:
            client = await self._link.client()
            await client.reply_to_ask(
                self._agent, prompt.reply(), sender=self.sender, ask_id=prompt.ask_id
            )
        except ChinwagError as exc:
            log.info("ask_reply_refused", sender=self.sender, error=str(exc))
            await self.say(f"⚠️ The answer did not reach the agent: {exc.message}")
