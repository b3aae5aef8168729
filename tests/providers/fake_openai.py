"""A fake OpenAI-compatible Chat Completions server for tests: trio, HTTP/1.1, SSE.

It runs in the test process on 127.0.0.1, port 0, and answers each request with
the next reply of its script: an `SSE` stream (`data: {json}` events, then
`data: [DONE]`, in chunked transfer encoding on a keep-alive connection, as the
real API sends them) or a `Status` error. It records every request, and notices
when a client leaves in the middle of a reply.

`GET /v1/models` is answered apart from the script, in the real list format,
from `FakeOpenAI.models` (or with `FakeOpenAI.models_status`, to fail it).
"""

from __future__ import annotations

import functools
import json
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found"}
REASONS |= {429: "Too Many Requests", 500: "Internal Server Error", 503: "Service Unavailable"}


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]  # names in lower case
    body: Any  # the JSON body, decoded


@dataclass
class SSE:
    """A 200 event stream: each event after ``delay_s``, then `data: [DONE]`.

    Dict events are sent as JSON; a str event is sent verbatim as the data line
    (to send malformed JSON). ``done`` False leaves out `[DONE]`; ``abort``
    closes the connection where the body should go on (no terminating chunk);
    ``hang`` keeps the stream open after the events until the client leaves.
    """

    events: list[Any]
    delay_s: float = 0.0
    done: bool = True
    abort: bool = False
    hang: bool = False


@dataclass
class Status:
    """A non-2xx answer with a JSON body (OpenAI's error shape by default)."""

    status: int
    message: str = "failed"
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)

    def payload(self) -> Any:
        if self.body is not None:
            return self.body
        return {"error": {"message": self.message, "type": "invalid_request_error", "code": None}}


Reply = SSE | Status


# --- chunk builders: the shapes OpenAI's streaming Chat Completions sends -------------


def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "fake-model",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        **extra,
    }


def text(content: str) -> dict[str, Any]:
    return chunk({"content": content})


def reasoning(content: str, key: str = "reasoning_content") -> dict[str, Any]:
    return chunk({key: content})


def tool_delta(
    index: int, arguments: str = "", *, call_id: str | None = None, name: str | None = None
) -> dict[str, Any]:
    fragment: dict[str, Any] = {"index": index, "function": {"arguments": arguments}}
    if call_id is not None:
        fragment["id"] = call_id
        fragment["type"] = "function"
    if name is not None:
        fragment["function"]["name"] = name
    return chunk({"tool_calls": [fragment]})


def finish(reason: str = "stop") -> dict[str, Any]:
    return chunk({}, finish=reason)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    body = chunk({})
    body["choices"] = []
    body["usage"] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    return body


def answer(words: str, prompt_tokens: int = 10) -> SSE:
    """A plain streamed answer: one text event per word, finish, usage."""
    parts = words.split(" ")
    events: list[Any] = [chunk({"role": "assistant", "content": ""})]
    events += [text(p if i == 0 else " " + p) for i, p in enumerate(parts)]
    return SSE([*events, finish("stop"), usage(prompt_tokens, len(parts))])


# --- the server ---------------------------------------------------------------------------


class FakeOpenAI:
    def __init__(self) -> None:
        self.replies: deque[Reply] = deque()
        self.requests: list[Recorded] = []
        self.port = 0
        self.client_left = trio.Event()  # a client closed its connection mid-reply
        self.connections = 0
        self._request_arrived = trio.Event()
        # What `GET /v1/models` lists, apart from the script; a Status fails it instead.
        self.models: list[str] = ["fake-model"]
        self.models_status: Status | None = None
        self.model_listings = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def script(self, *replies: Reply) -> None:
        self.replies.extend(replies)

    async def wait_for_requests(self, count: int) -> None:
        """Return once ``count`` requests in all have arrived."""
        while len(self.requests) < count:
            await self._request_arrived.wait()

    @property
    def bodies(self) -> list[Any]:
        return [r.body for r in self.requests]

    async def handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        reader = _Reader(stream)
        async with stream:
            try:
                while (request := await reader.request()) is not None:
                    if request.method == "GET" and request.path.split("?")[0] == "/v1/models":
                        self.model_listings += 1
                        await self._answer(stream, reader, self._model_list())
                        continue
                    self.requests.append(request)
                    self._request_arrived.set()
                    self._request_arrived = trio.Event()
                    if self.replies:
                        reply = self.replies.popleft()
                    else:
                        reply = Status(
                            500, "the fake server has no reply scripted for this request"
                        )
                    if not await self._answer(stream, reader, reply):
                        return
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return  # the client went away between replies

    def _model_list(self) -> Status:
        if self.models_status is not None:
            return self.models_status
        data = [
            {"id": model, "object": "model", "created": 1700000000, "owned_by": "fake"}
            for model in self.models
        ]
        return Status(200, body={"object": "list", "data": data})

    async def _answer(self, stream: trio.SocketStream, reader: _Reader, reply: Reply) -> bool:
        """Send one reply; False when the connection is over."""
        match reply:
            case Status():
                body = json.dumps(reply.payload()).encode()
                headers = {"content-type": "application/json", **reply.headers}
                await stream.send_all(_head(reply.status, headers, len(body)) + body)
                return True
            case SSE():
                head = _head(200, {"content-type": "text/event-stream"}, None)
                try:
                    async with trio.open_nursery() as nursery:
                        # A client that closes its end mid-reply cancels the rest.
                        nursery.start_soon(self._watch, reader, nursery.cancel_scope)
                        await stream.send_all(head)
                        await self._events(stream, reply)
                        nursery.cancel_scope.cancel()
                except* (trio.BrokenResourceError, trio.ClosedResourceError):
                    self.client_left.set()
                return not (reply.abort or self.client_left.is_set())

    async def _events(self, stream: trio.SocketStream, reply: SSE) -> None:
        for event in reply.events:
            if reply.delay_s:
                await trio.sleep(reply.delay_s)
            data = event if isinstance(event, str) else json.dumps(event)
            await stream.send_all(_chunked(f"data: {data}\n\n".encode()))
        if reply.abort:
            return  # the caller closes the connection with the body unfinished
        if reply.hang:
            await trio.sleep_forever()
        if reply.done:
            await stream.send_all(_chunked(b"data: [DONE]\n\n"))
        await stream.send_all(b"0\r\n\r\n")

    async def _watch(self, reader: _Reader, scope: trio.CancelScope) -> None:
        if not await reader.wait_eof():
            return
        self.client_left.set()
        scope.cancel()


class _Reader:
    """Reads HTTP/1.1 requests with a Content-Length body off one connection."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    async def _fill(self) -> bool:
        data = await self.stream.receive_some(65536)
        self.buffer += data
        return bool(data)

    async def request(self) -> Recorded | None:
        while b"\r\n\r\n" not in self.buffer:
            if not await self._fill():
                return None
        head, _, rest = bytes(self.buffer).partition(b"\r\n\r\n")
        self.buffer = bytearray(rest)
        request_line, *lines = head.decode("latin-1").split("\r\n")
        method, path, _ = request_line.split(" ", 2)
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        while len(self.buffer) < length:
            if not await self._fill():
                return None
        body = bytes(self.buffer[:length])
        del self.buffer[:length]
        return Recorded(method, path, headers, json.loads(body) if body else None)

    async def wait_eof(self) -> bool:
        """True once the client closed its end (or broke the connection)."""
        try:
            while await self._fill():
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        return True


def _head(status: int, headers: dict[str, str], length: int | None) -> bytes:
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    if length is None:
        lines.append("transfer-encoding: chunked")
    else:
        lines.append(f"content-length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _chunked(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


@asynccontextmanager
async def open_fake_openai() -> AsyncIterator[FakeOpenAI]:
    """A running fake server; stopped (every connection closed) on exit."""
    server = FakeOpenAI()
    async with trio.open_nursery() as nursery:
        serve = functools.partial(trio.serve_tcp, server.handle, 0, host="127.0.0.1")
        listeners = await nursery.start(serve)
        server.port = listeners[0].socket.getsockname()[1]
        yield server
        nursery.cancel_scope.cancel()
