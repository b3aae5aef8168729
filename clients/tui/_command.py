"""`chinwag tui`: the command that runs the app."""

from __future__ import annotations

import click

from .._daemon_process import ensure_daemon
from .._mail_cli import DEFAULT_NAME
from .._settings import Failure, connect_or_fail, run_command, settings_of


@click.command()
@click.option("--agent", help="The agent whose conversation opens first (default: the first).")
@click.option("--sender", help="Whose conversation with it (default: user).")
@click.option(
    "--as",
    "name",
    envvar="CHINWAG_NAME",
    default=DEFAULT_NAME,
    show_default="$CHINWAG_NAME, else user",
    help="Whose inbox the mail pane shows.",
)
@click.pass_context
def command(ctx: click.Context, agent: str | None, sender: str | None, name: str) -> None:
    """A terminal UI: the conversations, the open one live, and an inbox.

    Enter sends what is typed to the open conversation; Escape kills its run in
    flight; Ctrl-O compacts it (with instructions, if given); an agent's question
    opens a dialog (Escape closes it unanswered, Ctrl-R shows it again). Ctrl-L goes
    to the conversations and Ctrl-T to the inbox, where Enter opens one; Ctrl-Q quits.
    When the daemon goes away a banner says so, and the app connects again once it
    is back.
    """
    from ._app import ChinwagTui

    settings = settings_of(ctx)
    ensure_daemon(settings.target)

    async def check() -> None:
        async with connect_or_fail(settings) as client:
            if agent is not None and agent not in client.welcome.agents:
                hosted = ", ".join(client.welcome.agents) or "none"
                raise Failure(f"unknown agent {agent!r}; the daemon hosts: {hosted}")

    run_command(check)
    ChinwagTui(settings.target, agent=agent, sender=sender, reader=name).run()
