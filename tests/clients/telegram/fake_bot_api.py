"""A fake Telegram Bot API server for tests: HTTP/1.1 on 127.0.0.1, port 0, under anyio.

python-telegram-bot is pointed at it with ``base_url``. It records every call
(method, form parameters, time), keeps the messages of each chat as Telegram
would show them, serves scripted updates to ``getUpdates`` (long polling:
a poll waits until an update is pushed or its timeout passes), and answers
with scripted failures: a 429 with ``retry_after``, or the 400 Telegram gives
for MarkdownV2 it cannot parse.

It refuses what Telegram refuses, with Telegram's errors, so a bug of the
bridge fails a test the way it would fail in production: MarkdownV2 that
Telegram's own parser refuses (markdown_v2.py, a port of tdlib's), a text
that shows nothing, a text that shows more than 4096 UTF-16 code units once
its entities are parsed, and an edit that changes nothing.
"""

from __future__ import annotations

import json
import time
import urllib.parse
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import h11
from markdown_v2 import MarkdownV2Error, parse_markdown_v2

TOKEN = "123456:TEST-token"
BOT_USER = {"id": 123456, "is_bot": True, "first_name": "Chinwag", "username": "chinwag_test_bot"}
NOT_MODIFIED = (
    "Bad Request: message is not modified: specified new message content and reply markup "
    "are exactly the same as a current content and reply markup of the message"
)

#: The most a message's text may show, in UTF-16 code units, once its entities are parsed.
MESSAGE_LIMIT = 4096
TOO_LONG = "Bad Request: message is too long"
EMPTY = "Bad Request: message text is empty"


def cannot_parse(char: str) -> str:
    return (
        f"Bad Request: can't parse entities: Character '{char}' is reserved and must be "
        "escaped with the preceding '\\'"
    )


@dataclass
class Call:
    method: str
    params: dict[str, str]  # form values as sent: JSON text for non-string values
    at: float  # anyio.current_time() when it arrived
    refusal: Refusal | None = None  # the error it was answered with, if any

    @property
    def chat_id(self) -> int:
        return int(self.params["chat_id"])

    @property
    def text(self) -> str:
        return self.params.get("text", "")

    @property
    def parse_mode(self) -> str | None:
        return self.params.get("parse_mode")

    def json(self, name: str) -> Any:
        return json.loads(self.params[name])


@dataclass
class Refusal:
    """A scripted error answer."""

    status: int
    description: str
    retry_after: int | None = None

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "ok": False,
            "error_code": self.status,
            "description": self.description,
        }
        if self.retry_after is not None:
            body["parameters"] = {"retry_after": self.retry_after}
        return body


def too_many_requests(retry_after: int) -> Refusal:
    return Refusal(429, f"Too Many Requests: retry after {retry_after}", retry_after)


@dataclass
class Shown:
    """A message as its chat shows it."""

    message_id: int
    text: str
    parse_mode: str | None
    reply_markup: Any = None
    thread_id: int | None = None
    reply_parameters: Any = None  # as sent: the message it replies to, and how

    @property
    def visible(self) -> str:
        return visible(self.text, self.parse_mode)

    @property
    def buttons(self) -> list[tuple[str, str]]:
        """(label, callback data) of every inline button, row by row."""
        if not self.reply_markup:
            return []
        return [
            (button["text"], button["callback_data"])
            for row in self.reply_markup["inline_keyboard"]
            for button in row
        ]


@dataclass
class FakeBotAPI:
    token: str = TOKEN
    port: int = 0
    calls: list[Call] = field(default_factory=list)
    #: Failures to answer with, in order, per method.
    refusals: defaultdict[str, deque[Refusal]] = field(default_factory=lambda: defaultdict(deque))
    #: Refuse every MarkdownV2 text, as Telegram does text it cannot parse.
    reject_markdown: bool = False
    chats: defaultdict[int, dict[int, Shown]] = field(default_factory=lambda: defaultdict(dict))
    _updates: list[dict[str, Any]] = field(default_factory=list)
    _next_id: int = 1000
    _changed: anyio.Event = field(default_factory=anyio.Event)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- what tests use -----------------------------------------------------------

    @property
    def last_update_id(self) -> int:
        return self._updates[-1]["update_id"]

    def refuse(self, method: str, *refusals: Refusal) -> None:
        self.refusals[method].extend(refusals)

    def push_message(
        self, chat_id: int, user_id: int, text: str, *, thread_id: int | None = None
    ) -> int:
        """Send the bot a message (in a private chat if ``chat_id`` is positive, else
        in a supergroup); its message id."""
        message: dict[str, Any] = {
            "message_id": self._new_id(),
            "date": int(time.time()),
            "chat": {"id": chat_id, "type": _chat_type(chat_id)},
            "from": {"id": user_id, "is_bot": False, "first_name": f"User{user_id}"},
            "text": text,
        }
        if thread_id is not None:
            message |= {"message_thread_id": thread_id, "is_topic_message": True}
        self._push({"message": message})
        return message["message_id"]

    def push_press(self, chat_id: int, user_id: int, message_id: int, data: str) -> None:
        shown = self.chats[chat_id][message_id]
        query = {
            "id": f"query-{self._new_id()}",
            "from": {"id": user_id, "is_bot": False, "first_name": f"User{user_id}"},
            "chat_instance": str(chat_id),
            "data": data,
            "message": self._message(chat_id, shown),
        }
        self._push({"callback_query": query})

    async def wait_for(self, predicate: Callable[[], object]) -> None:
        """Return once ``predicate()`` holds; it is checked after every call."""
        while not predicate():
            changed = self._changed
            await changed.wait()

    def calls_to(self, method: str, chat_id: int | None = None) -> list[Call]:
        return [
            call
            for call in self.calls
            if call.method == method and (chat_id is None or call.chat_id == chat_id)
        ]

    def texts(self, chat_id: int) -> list[str]:
        """What the chat shows, message by message, in the order they were sent."""
        return [shown.visible for _, shown in sorted(self.chats[chat_id].items())]

    def last(self, chat_id: int) -> Shown:
        return self.chats[chat_id][max(self.chats[chat_id])]

    def refused(self, *methods: str) -> list[Call]:
        """The calls (to ``methods``, or any) answered with an error, in order."""
        return [
            call
            for call in self.calls
            if call.refusal is not None and (not methods or call.method in methods)
        ]

    # --- the server -------------------------------------------------------------------

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
        task_status.started()
        await listener.serve(self._connection)

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    def _push(self, update: dict[str, Any]) -> None:
        self._updates.append({"update_id": self._new_id(), **update})
        self._notify()

    async def _connection(self, stream: anyio.abc.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        async with stream:
            try:
                while (request := await _read(conn, stream)) is not None:
                    target, body = request
                    status, payload = await self._answer(target, body)
                    data = json.dumps(payload).encode()
                    headers = [
                        ("content-type", "application/json"),
                        ("content-length", str(len(data))),
                    ]
                    await stream.send(conn.send(h11.Response(status_code=status, headers=headers)))
                    await stream.send(conn.send(h11.Data(data=data)))
                    await stream.send(conn.send(h11.EndOfMessage()))
                    if conn.our_state is h11.MUST_CLOSE:
                        return
                    conn.start_next_cycle()
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, h11.ProtocolError):
                return  # the client went away

    async def _answer(self, target: str, body: bytes) -> tuple[int, Any]:
        path = urllib.parse.urlsplit(target).path
        prefix = f"/bot{self.token}/"
        if not path.startswith(prefix):
            return 401, Refusal(401, "Unauthorized").body()
        method = path[len(prefix) :]
        params = {
            name: values[0]
            for name, values in urllib.parse.parse_qs(body.decode(), keep_blank_values=True).items()
        }
        call = Call(method, params, anyio.current_time())
        self.calls.append(call)
        self._notify()
        try:
            if self.refusals[method]:
                raise _Refused(self.refusals[method].popleft())
            if method in ("sendMessage", "editMessageText"):
                self._check_text(call)
            result = await self._result(call)
        except _Refused as refused:
            call.refusal = refused.refusal
            self._notify()
            return refused.refusal.status, refused.refusal.body()
        return 200, {"ok": True, "result": result}

    def _check_text(self, call: Call) -> None:
        """Refuse a message text as Telegram would: MarkdownV2 it cannot parse, then
        a text that shows nothing, then one that shows more than MESSAGE_LIMIT."""
        if call.parse_mode == "MarkdownV2" and self.reject_markdown:
            raise _Refused(Refusal(400, cannot_parse("!")))
        try:
            shows = visible(call.text, call.parse_mode)
        except MarkdownV2Error as exc:
            raise _Refused(Refusal(400, str(exc))) from None
        if not shows.strip():
            raise _Refused(Refusal(400, EMPTY))
        if utf16_length(shows) > MESSAGE_LIMIT:
            raise _Refused(Refusal(400, TOO_LONG))

    async def _result(self, call: Call) -> Any:
        match call.method:
            case "getMe":
                return BOT_USER
            case (
                "deleteWebhook"
                | "setWebhook"
                | "answerCallbackQuery"
                | "sendChatAction"
                | "setMyCommands"
            ):
                return True
            case "getUpdates":
                return await self._poll(call)
            case "sendMessage":
                thread = call.params.get("message_thread_id")
                shown = Shown(
                    self._new_id(),
                    call.text,
                    call.parse_mode,
                    call.json("reply_markup") if "reply_markup" in call.params else None,
                    int(thread) if thread else None,
                    call.json("reply_parameters") if "reply_parameters" in call.params else None,
                )
                self.chats[call.chat_id][shown.message_id] = shown
                self._notify()
                return self._message(call.chat_id, shown)
            case "editMessageText":
                shown = self._find(call)
                markup = call.json("reply_markup") if "reply_markup" in call.params else None
                if (shown.text, shown.parse_mode, shown.reply_markup) == (
                    call.text,
                    call.parse_mode,
                    markup,
                ):
                    raise _Refused(Refusal(400, NOT_MODIFIED))
                shown.text, shown.parse_mode, shown.reply_markup = (
                    call.text,
                    call.parse_mode,
                    markup,
                )
                self._notify()
                return self._message(call.chat_id, shown)
            case "deleteMessage":
                self.chats[call.chat_id].pop(int(call.params["message_id"]), None)
                self._notify()
                return True
        raise _Refused(Refusal(404, "Not Found"))

    def _find(self, call: Call) -> Shown:
        shown = self.chats[call.chat_id].get(int(call.params["message_id"]))
        if shown is None:
            raise _Refused(Refusal(400, "Bad Request: message to edit not found"))
        return shown

    async def _poll(self, call: Call) -> list[dict[str, Any]]:
        offset = int(call.params.get("offset", "0") or 0)
        timeout = float(call.params.get("timeout", "0") or 0)
        with anyio.move_on_after(timeout):
            while not any(u["update_id"] >= offset for u in self._updates):
                changed = self._changed
                await changed.wait()
        return [u for u in self._updates if u["update_id"] >= offset]

    def _message(self, chat_id: int, shown: Shown) -> dict[str, Any]:
        message: dict[str, Any] = {
            "message_id": shown.message_id,
            "date": int(time.time()),
            "chat": {"id": chat_id, "type": _chat_type(chat_id)},
            "from": BOT_USER,
            "text": shown.visible,
        }
        if shown.thread_id is not None:
            message |= {"message_thread_id": shown.thread_id, "is_topic_message": True}
        if shown.reply_markup:
            message["reply_markup"] = shown.reply_markup
        return message


def _chat_type(chat_id: int) -> str:
    return "private" if chat_id > 0 else "supergroup"


class _Refused(Exception):
    def __init__(self, refusal: Refusal) -> None:
        self.refusal = refusal


async def _read(conn: h11.Connection, stream: anyio.abc.SocketStream) -> tuple[str, bytes] | None:
    """The next request's target and body; None once the client has gone."""
    target = ""
    body = b""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            try:
                data = await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                data = b""
            conn.receive_data(data)
        elif isinstance(event, h11.Request):
            target = event.target.decode()
        elif isinstance(event, h11.Data):
            body += bytes(event.data)
        elif isinstance(event, h11.EndOfMessage):
            return target, body
        elif isinstance(event, h11.ConnectionClosed):
            return None


def utf16_length(text: str) -> int:
    """How Telegram counts a message's length: UTF-16 code units (2 for an emoji)."""
    return len(text.encode("utf-16-le")) // 2


def visible(text: str, parse_mode: str | None) -> str:
    """The text a message shows: a MarkdownV2 text as Telegram parses it (raising
    MarkdownV2Error, with Telegram's message, for text it refuses), else ``text``."""
    if parse_mode == "MarkdownV2":
        return parse_markdown_v2(text).text
    return text
