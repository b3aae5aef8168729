"""`chinwag telegram`: the bridge's command line (python-telegram-bot is imported on run)."""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import click

from .._settings import Failure, Settings

if TYPE_CHECKING:
    # Only for the annotation: python-telegram-bot is imported when the command runs.
    from ._bridge import BridgeConfig


@click.command("telegram")
@click.option(
    "--token-env",
    default="TELEGRAM_BOT_TOKEN",
    show_default=True,
    help="The environment variable holding the bot's token (from @BotFather).",
)
@click.option("--agent", default="assistant", show_default=True, help="The agent chats talk to.")
@click.option(
    "--allow",
    "allowed",
    multiple=True,
    type=int,
    envvar="CHINWAG_TELEGRAM_ALLOW",
    metavar="USER_ID",
    help="A Telegram user id that may use the bot; repeat for more, or list them in "
    "$CHINWAG_TELEGRAM_ALLOW separated by spaces. Nobody is allowed by default "
    "(a refused user is told their id).",
)
@click.option(
    "--api-url",
    default="https://api.telegram.org",
    show_default=True,
    help="The Bot API server: Telegram's, or a self-hosted telegram-bot-api.",
)
@click.option(
    "--webhook-url",
    default=None,
    metavar="URL",
    help="Receive updates by webhook at this public HTTPS URL instead of long polling.",
)
@click.option(
    "--listen",
    default="127.0.0.1",
    show_default=True,
    help="With --webhook-url: the address the webhook server binds.",
)
@click.option(
    "--port",
    default=8443,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="With --webhook-url: the port the webhook server binds.",
)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="CHINWAG_TELEGRAM_STATE_DIR",
    help="Where the bridge keeps the messages it took from Telegram until the daemon has "
    "them [default: telegram/ in chinwag's state directory, e.g. "
    "~/.local/state/chinwag/telegram].",
)
@click.pass_obj
def command(
    settings: Settings,
    token_env: str,
    agent: str,
    allowed: tuple[int, ...],
    api_url: str,
    webhook_url: str | None,
    listen: str,
    port: int,
    state_dir: Path | None,
) -> None:
    """Bridge Telegram chats to an agent: each chat is a conversation `tg:<chat id>`.

    It needs a running daemon (`chinwag serve`), and reconnects whenever the
    daemon restarts.
    """
    import platformdirs
    from chinwag.protocol import APP_NAME, without_credentials

    from .._client import leaves
    from ._bridge import BridgeConfig
    from ._spool import SpoolError
    from ._webhook import Webhook

    token = os.environ.get(token_env, "").strip()
    if not token:
        raise Failure(f"${token_env} is empty; put the token @BotFather gave you in it")
    config = BridgeConfig(
        token=token,
        agent=agent,
        socket_path=settings.target,
        state_dir=state_dir or Path(platformdirs.user_state_dir(APP_NAME)) / "telegram",
        api_url=api_url,
        allowed_users=frozenset(allowed),
        webhook=Webhook(webhook_url, listen, port) if webhook_url else None,
    )
    _configure_logging()
    # Opt in to python-telegram-bot's coming type for durations (RetryAfter's
    # retry_after a timedelta), rather than a deprecation warning on each 429.
    os.environ.setdefault("PTB_TIMEDELTA", "true")
    from telegram.error import BadRequest, InvalidToken, NetworkError

    # except*: run_bridge runs in a task group, which wraps what it raises.
    try:
        anyio.run(_serve_until_signalled, config, backend="asyncio")
    except* InvalidToken as group:
        refused = group.exceptions[0]
        raise Failure(f"Telegram refused the token in ${token_env}: {refused.message}") from refused
    except* SpoolError as group:
        unusable = group.exceptions[0]
        raise Failure(str(unusable)) from unusable
    except* BadRequest as group:  # a NetworkError to python-telegram-bot, but Telegram answered
        denied = next(leaf for leaf in leaves(group) if isinstance(leaf, BadRequest))
        raise Failure(f"the Telegram Bot API refused a request: {denied.message}") from denied
    except* NetworkError as group:
        # Before the bridge started: polling retries by itself once it runs. Said and
        # left, not retried: a person at the terminal learns of a wrong --api-url or no
        # network at once, and a service manager restarts the bridge (Restart=on-failure).
        unreachable = next(leaf for leaf in leaves(group) if isinstance(leaf, NetworkError))
        reason = unreachable.message.replace(token, "<token>")
        raise Failure(
            f"cannot reach the Telegram Bot API at {without_credentials(api_url)}: {reason}"
            " (check the network, or --api-url)"
        ) from unreachable


async def _serve_until_signalled(config: BridgeConfig) -> None:
    """Run the bridge until SIGTERM or SIGINT, then stop it cleanly: polling
    confirms the updates already taken, so a restart does not take them again
    (the spool keeps the messages among them that the daemon does not have yet)."""
    import structlog

    from ._bridge import run_bridge

    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(run_bridge, config)
            async for signum in signals:
                structlog.get_logger().info(
                    "telegram_bridge_stopping", signal=signal.Signals(signum).name
                )
                tasks.cancel_scope.cancel()
                break


def _configure_logging() -> None:
    """structlog to stderr: key-value on a terminal, JSON lines otherwise.

    No frame locals in tracebacks, on a terminal or not: a Bot API URL local
    holds the bot's token.
    """
    import structlog  # here, not at the top: `chinwag` starts without it

    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if sys.stderr.isatty():
        no_locals = structlog.dev.RichTracebackFormatter(show_locals=False)
        processors.append(structlog.dev.ConsoleRenderer(exception_formatter=no_locals))
    else:
        processors += [
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
            ),
            structlog.processors.JSONRenderer(),
        ]
    structlog.configure(
        processors=processors, logger_factory=structlog.WriteLoggerFactory(sys.stderr)
    )
    # python-telegram-bot's warnings and errors; not httpx's INFO line per request,
    # whose Bot API URL holds the token.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
