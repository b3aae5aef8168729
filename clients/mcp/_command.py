"""`chinwag mcp`: the MCP server's command line (the mcp SDK is imported on run)."""

from __future__ import annotations

import anyio
import click

from .._settings import Settings


@click.command("mcp")
@click.option(
    "--sender",
    help="The conversations' sender when a tool call names none "
    "(default: over TCP the token's name, else mcp:<the MCP client's name>). Mail goes "
    "under $CHINWAG_NAME, else the token's name, else the MCP client's name.",
)
@click.pass_obj
def command(settings: Settings, sender: str | None) -> None:
    """Serve chinwag's agents and mail to MCP clients (Claude Code, Codex, ...) over stdio.

    It needs a running daemon (`chinwag serve`); a tool called while none
    listens on the socket fails with a message saying so.
    """
    from ._server import serve

    anyio.run(serve, settings.target, sender, backend="asyncio")
