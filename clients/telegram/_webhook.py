"""Updates by webhook: a small HTTP server that Telegram posts each update to.

It is meant to sit behind a reverse proxy that terminates TLS at the public
URL given to Telegram. Each start registers that URL with a fresh secret
token; a post without it is refused, so only Telegram can feed the bridge.
Built on starlette and uvicorn (python-telegram-bot's own webhook server
would need tornado).
"""

from __future__ import annotations

import asyncio
import hmac
import secrets
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import anyio
import anyio.abc
import structlog
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from telegram import Bot, Update

log = structlog.get_logger()

_SECRET_HEADER = "x-telegram-bot-api-secret-token"


@dataclass(frozen=True)
class Webhook:
    #: The public HTTPS URL Telegram posts to; its path is the path served here.
    url: str
    #: The address the server binds (a reverse proxy forwards the URL to it).
    listen: str = "127.0.0.1"
    port: int = 8443


async def serve_webhook(
    bot: Bot,
    updates: asyncio.Queue[object],
    webhook: Webhook,
    allowed_updates: Sequence[str],
    *,
    task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Register the webhook with Telegram and put what it posts into ``updates``.

    Reports started, with the port it listens on, once Telegram has the URL;
    serves until cancelled, then lets the server finish the requests it has.
    """
    secret = secrets.token_urlsafe(32)

    async def receive(request: Request) -> Response:
        if not hmac.compare_digest(request.headers.get(_SECRET_HEADER, ""), secret):
            return Response(status_code=403)
        try:
            data = await request.json()
        except ValueError:
            return Response(status_code=400)
        if not isinstance(data, dict):
            return Response(status_code=400)
        await updates.put(Update.de_json(data, bot))
        return Response()

    path = urlsplit(webhook.url).path or "/"
    app = Starlette(routes=[Route(path, receive, methods=["POST"])])
    server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_config=None, access_log=False))
    family = socket.AF_INET6 if ":" in webhook.listen else socket.AF_INET
    with socket.create_server((webhook.listen, webhook.port), family=family) as sock:
        port: int = sock.getsockname()[1]
        await bot.set_webhook(webhook.url, secret_token=secret, allowed_updates=allowed_updates)
        log.info("telegram_webhook_listening", url=webhook.url, listen=webhook.listen, port=port)
        async with anyio.create_task_group() as tasks:

            async def serve() -> None:
                # Shielded: uvicorn stops cleanly when told to, not when cancelled.
                with anyio.CancelScope(shield=True):
                    await server.serve(sockets=[sock])

            tasks.start_soon(serve)
            task_status.started(port)
            try:
                await anyio.sleep_forever()
            finally:
                server.should_exit = True
