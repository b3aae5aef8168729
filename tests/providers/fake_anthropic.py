"""A fake Anthropic Messages API on 127.0.0.1: scripted replies, every request recorded.

A hand-written HTTP/1.1 server on trio, enough for the official SDK: it reads
one request per connection (``Content-Length`` bodies), answers with either a
JSON error or a ``text/event-stream`` body in chunked transfer encoding,
written in the real event format (``message_start``, ``content_block_*``,
``message_delta``, ``message_stop``, ``ping``, ``error``), and closes.

Each test scripts the replies in order (`FakeAnthropic.script`); a request
beyond the script gets a plain text answer. Builders below make the usual
streams: `text_stream`, `tool_stream`, and `message_events` for anything else.

Extended thinking as the real API has it: a scripted stream's thinking blocks
(`thinking_block`, `redacted_thinking_block`) are sent only to a request that
enables `thinking` (`enabled` with a budget, or `adaptive`), and are cut from
the stream otherwise. A thinking request is checked first, and refused with a
400 the way the API refuses it (the script is then left as it was): a thinking
block whose signature is not the one the fake gave its text (`signature`); and,
with `enabled`, `budget_tokens` under 1024 or not under `max_tokens`, and a
request that goes on with a tool loop (its last user message holds
tool_results) whose last assistant message does not begin with the very
thinking blocks the fake sent with that step's tool_use blocks (`adaptive`
thinking may skip a step, so it requires none).

`GET /v1/models` is answered apart from the script, in the real paginated list
format (`limit`, `after_id`), from `FakeAnthropic.models`, or fails with
`FakeAnthropic.models_error` when that is set.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import trio

Event = tuple[str, dict[str, Any]]


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class Stream:
    """A 200 event stream; ``abort_after`` events, the connection drops mid-body."""

    events: list[Event]
    delay_s: float = 0.0
    abort_after: int | None = None
    raw: bytes = b""  # written after the events, as is: for malformed streams
    hold_s: float = 0.0  # a wait before the body's end, after the last event


@dataclass
class Status:
    """An HTTP error with the API's error body."""

    code: int
    message: str
    error_type: str = "api_error"


Reply = Stream | Status


@dataclass
class FakeAnthropic:
    port: int = 0
    requests: list[Recorded] = field(default_factory=list)
    replies: list[Reply] = field(default_factory=list)
    # Set when a streaming reply's connection is closed by the client.
    client_left: trio.Event = field(default_factory=trio.Event)
    # What `GET /v1/models` lists, apart from the script; a Status fails it instead.
    models: list[str] = field(default_factory=lambda: ["claude-fake"])
    models_error: Status | None = None
    model_listings: list[Recorded] = field(default_factory=list)
    # The thinking blocks sent with each tool_use id, as a step must bring them back.
    thinking_sent: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def script(self, *replies: Reply) -> None:
        self.replies.extend(replies)

    @property
    def bodies(self) -> list[dict[str, Any]]:
        return [r.body for r in self.requests]

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, conn: trio.SocketStream) -> None:
        async with conn:
            try:
                request = await _read_request(conn)
            except (trio.BrokenResourceError, ValueError):
                return
            if request is None:
                return
            if request.method == "GET" and urlsplit(request.path).path == "/v1/models":
                self.model_listings.append(request)
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await self._send_models(conn, request)
                return
            self.requests.append(request)
            refusal = thinking_refusal(request.body, self.thinking_sent)
            if refusal is not None:
                reply: Reply = refusal
            else:
                reply = self.replies.pop(0) if self.replies else text_stream("ok")
            if isinstance(reply, Stream):
                if _thinking_enabled(request.body):
                    self._remember_thinking(reply.events)
                else:
                    reply = _without_thinking(reply)
            try:
                match reply:
                    case Status():
                        await _send_status(conn, reply)
                    case Stream():
                        await _send_stream(conn, reply)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.client_left.set()

    def _remember_thinking(self, events: list[Event]) -> None:
        thinking: dict[int, dict[str, Any]] = {}
        tool_ids: list[str] = []
        for name, data in events:
            if name == "content_block_start":
                block = data["content_block"]
                if block["type"] in THINKING_TYPES:
                    thinking[data["index"]] = dict(block)
                elif block["type"] == "tool_use":
                    tool_ids.append(block["id"])
            elif name == "content_block_delta" and data["index"] in thinking:
                block, delta = thinking[data["index"]], data["delta"]
                if delta["type"] == "thinking_delta":
                    block["thinking"] += delta["thinking"]
                elif delta["type"] == "signature_delta":
                    block["signature"] += delta["signature"]
        blocks = [thinking[index] for index in sorted(thinking)]
        for tool_id in tool_ids:
            self.thinking_sent[tool_id] = blocks

    async def _send_models(self, conn: trio.SocketStream, request: Recorded) -> None:
        if self.models_error is not None:
            await _send_status(conn, self.models_error)
            return
        query = parse_qs(urlsplit(request.path).query)
        limit = int(query.get("limit", ["20"])[0])
        start = 0
        if "after_id" in query:
            start = self.models.index(query["after_id"][0]) + 1
        page = self.models[start : start + limit]
        body = json.dumps(
            {
                "data": [
                    {
                        "type": "model",
                        "id": model,
                        "display_name": model,
                        "created_at": "2025-01-01T00:00:00Z",
                    }
                    for model in page
                ],
                "has_more": start + limit < len(self.models),
                "first_id": page[0] if page else None,
                "last_id": page[-1] if page else None,
            }
        ).encode()
        await conn.send_all(
            f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode()
            + body
        )


# --- extended thinking, as the API checks it ---------------------------------------

THINKING_TYPES = ("thinking", "redacted_thinking")


def sign(thinking: str) -> str:
    """The fake's signature for a thinking text: any change to the text shows."""
    return base64.b64encode(hashlib.sha256(b"fake:" + thinking.encode()).digest()).decode()


def _thinking_enabled(body: dict[str, Any]) -> bool:
    thinking = body.get("thinking")
    return isinstance(thinking, dict) and thinking.get("type") in ("enabled", "adaptive")


def _invalid(message: str) -> Status:
    return Status(400, message, "invalid_request_error")


def thinking_refusal(
    body: dict[str, Any], thinking_sent: dict[str, list[dict[str, Any]]]
) -> Status | None:
    """The 400 the API answers a request that gets extended thinking wrong, if any."""
    messages = body.get("messages", [])
    for i, message in enumerate(messages):
        for j, block in enumerate(_blocks(message)):
            if block["type"] == "thinking" and block.get("signature") != sign(block["thinking"]):
                where = f"messages.{i}.content.{j}"
                return _invalid(f"{where}: Invalid `signature` in `thinking` block.")
    if not _thinking_enabled(body):
        return None
    if body["thinking"]["type"] == "adaptive":
        return None  # the model may skip thinking in a step: nothing to require back
    budget = body["thinking"].get("budget_tokens", 0)
    if budget < 1024:
        return _invalid(
            "thinking.enabled.budget_tokens: Input should be greater than or equal to 1024"
        )
    if body.get("max_tokens", 0) <= budget:
        return _invalid("`max_tokens` must be greater than `thinking.budget_tokens`.")
    if len(messages) < 2 or messages[-1]["role"] != "user":
        return None
    if not any(b["type"] == "tool_result" for b in _blocks(messages[-1])):
        return None
    step = len(messages) - 2
    blocks = _blocks(messages[step])
    leading = []
    for block in blocks:
        if block["type"] not in THINKING_TYPES:
            break
        leading.append(block)
    tool_ids = [b["id"] for b in blocks if b["type"] == "tool_use"]
    sent = thinking_sent.get(tool_ids[0], []) if tool_ids else []
    if leading and leading != sent:
        # Signed, but not this step's: the fake's own check, stricter than the API's may be.
        return _invalid(
            f"messages.{step}: the thinking blocks before its tool_use blocks are not the ones "
            "sent with them"
        )
    if not leading:
        found = blocks[len(leading)]["type"] if len(blocks) > len(leading) else "nothing"
        return _invalid(
            f"messages.{step}.content.{len(leading)}.type: Expected `thinking` or "
            f"`redacted_thinking`, but found `{found}`. When `thinking` is enabled, a final "
            "`assistant` message must start with a thinking block (preceeding the lastmost set "
            "of `tool_use` and `tool_result` blocks). We recommend you include thinking blocks "
            "from previous turns. To avoid this requirement, disable `thinking`."
        )
    return None


def _blocks(message: dict[str, Any]) -> list[dict[str, Any]]:
    content = message["content"]  # the API takes a string for a lone text block
    return content if isinstance(content, list) else [{"type": "text", "text": content}]


def _without_thinking(reply: Stream) -> Stream:
    """``reply`` with its thinking blocks cut out and the other blocks renumbered."""
    thinking = {
        data["index"]
        for name, data in reply.events
        if name == "content_block_start" and data["content_block"]["type"] in THINKING_TYPES
    }
    if not thinking:
        return reply
    events: list[Event] = []
    for name, data in reply.events:
        if "index" in data:
            if data["index"] in thinking:
                continue
            data = copy.deepcopy(data)
            data["index"] -= sum(1 for index in thinking if index < data["index"])
        events.append((name, data))
    return Stream(events, reply.delay_s, reply.abort_after, reply.raw, reply.hold_s)


async def _read_request(conn: trio.SocketStream) -> Recorded | None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await conn.receive_some(65536)
        if not chunk:
            return None
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    request_line, *header_lines = head.decode("latin-1").split("\r\n")
    method, path, _ = request_line.split(" ", 2)
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = await conn.receive_some(65536)
        if not chunk:
            return None
        rest += chunk
    body = json.loads(rest[:length]) if length else {}
    return Recorded(method=method, path=path, headers=headers, body=body)


async def _send_status(conn: trio.SocketStream, reply: Status) -> None:
    body = json.dumps(
        {"type": "error", "error": {"type": reply.error_type, "message": reply.message}}
    ).encode()
    await conn.send_all(
        f"HTTP/1.1 {reply.code} Error\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n"
        f"request-id: req_fake\r\n\r\n".encode()
        + body
    )


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


async def _send_stream(conn: trio.SocketStream, reply: Stream) -> None:
    await conn.send_all(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
        b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
    )
    for i, (name, data) in enumerate(reply.events):
        if reply.abort_after is not None and i >= reply.abort_after:
            return  # no terminating chunk: the body is cut short
        if reply.delay_s and i:
            await trio.sleep(reply.delay_s)
        await conn.send_all(_chunk(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()))
    if reply.abort_after is not None:
        return
    if reply.raw:
        await conn.send_all(_chunk(reply.raw))
    if reply.hold_s:
        await trio.sleep(reply.hold_s)
    await conn.send_all(b"0\r\n\r\n")


# --- stream builders ---------------------------------------------------------


def message_events(
    blocks: Iterable[list[Event]],
    *,
    stop_reason: str = "end_turn",
    input_tokens: int = 10,
    output_tokens: int = 5,
) -> list[Event]:
    """A whole message: message_start, a ping, the blocks, message_delta, message_stop."""
    events: list[Event] = [
        (
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": "msg_fake",
                    "type": "message",
                    "role": "assistant",
                    "model": "claude-fake",
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {"input_tokens": input_tokens, "output_tokens": 1},
                },
            },
        ),
        ("ping", {"type": "ping"}),
    ]
    for block in blocks:
        events.extend(block)
    events.append(
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                "usage": {"output_tokens": output_tokens},
            },
        )
    )
    events.append(("message_stop", {"type": "message_stop"}))
    return events


def text_block(index: int, pieces: Iterable[str]) -> list[Event]:
    return [
        (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": index,
                "content_block": {"type": "text", "text": ""},
            },
        ),
        *(
            (
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": index,
                    "delta": {"type": "text_delta", "text": p},
                },
            )
            for p in pieces
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": index}),
    ]


def thinking_block(
    index: int, pieces: Iterable[str], *, signature: str | None = None
) -> list[Event]:
    """A thinking block, its text in ``pieces``, then its signature (the fake's, by default)."""
    pieces = list(pieces)
    return [
        (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": index,
                "content_block": {"type": "thinking", "thinking": "", "signature": ""},
            },
        ),
        *(
            (
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": index,
                    "delta": {"type": "thinking_delta", "thinking": p},
                },
            )
            for p in pieces
        ),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": index,
                "delta": {
                    "type": "signature_delta",
                    "signature": sign("".join(pieces)) if signature is None else signature,
                },
            },
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": index}),
    ]


def redacted_thinking_block(index: int, data: str) -> list[Event]:
    """Thinking the API sends encrypted: one block, whole in its content_block_start."""
    return [
        (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": index,
                "content_block": {"type": "redacted_thinking", "data": data},
            },
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": index}),
    ]


def tool_block(index: int, call_id: str, name: str, fragments: Iterable[str]) -> list[Event]:
    return [
        (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": index,
                "content_block": {"type": "tool_use", "id": call_id, "name": name, "input": {}},
            },
        ),
        *(
            (
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": index,
                    "delta": {"type": "input_json_delta", "partial_json": f},
                },
            )
            for f in fragments
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": index}),
    ]


def text_stream(text: str, **kwargs: Any) -> Stream:
    """A plain answer, one text delta per word."""
    words = text.split(" ")
    pieces = [w if i == 0 else " " + w for i, w in enumerate(words)]
    return Stream(message_events([text_block(0, pieces)], **kwargs))


def tool_stream(*calls: tuple[str, str, list[str]], text: str = "", thinking: str = "") -> Stream:
    """Optional thinking and text, then a tool_use block per ``(id, name, argument fragments)``."""
    blocks = [thinking_block(0, [thinking])] if thinking else []
    if text:
        blocks.append(text_block(len(blocks), [text]))
    blocks += [tool_block(len(blocks) + i, *call) for i, call in enumerate(calls)]
    return Stream(message_events(blocks, stop_reason="tool_use"))


def error_event(error_type: str, message: str) -> Event:
    return ("error", {"type": "error", "error": {"type": error_type, "message": message}})
