"""`chinwag telegram`: the bridge's command line (python-telegram-bot is imported on run)."""

from __future__ import annotations

import click


@click.command("telegram")
def command() -> None:
    """Bridge Telegram chats to an agent (being built: issue 6)."""
    raise click.ClickException("The Telegram bridge is not built yet.")
