"""A bare Starlette SSE endpoint streaming the tokens the echo model would.

Served by uvicorn (`bench._processes.sse_server`) as the web-stack baseline:
`POST /stream` with `{"content": "..."}` answers `text/event-stream` with the
same events as a chinwag run (`start`, one `text_delta` per word, `usage`,
`end`), JSON-encoded by msgspec, with no storage and no runtime behind it.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

_encode = msgspec.json.Encoder().encode


def _event(kind: str, data: dict[str, object]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + _encode(data) + b"\n\n"


async def stream(request: Request) -> StreamingResponse:
    body = msgspec.json.decode(await request.body())
    words = str(body["content"]).split()

    async def events() -> AsyncIterator[bytes]:
        yield _event("start", {"run_id": uuid.uuid4().hex, "agent": "assistant", "seq": 1})
        for i, word in enumerate(words):
            yield _event("text_delta", {"delta": word if i == 0 else " " + word})
        n = len(words)
        yield _event(
            "usage",
            {
                "prompt_tokens": n,
                "completion_tokens": n,
                "context_tokens": 2 * n,
                "context_window": 32768,
            },
        )
        yield _event("end", {"status": "done", "error": None, "last_seq": 2})

    return StreamingResponse(events(), media_type="text/event-stream")


app = Starlette(routes=[Route("/stream", stream, methods=["POST"])])
