"""`chinwag mcp`: the MCP server's command line (the mcp SDK is imported on run)."""

from __future__ import annotations

import click


@click.command("mcp")
def command() -> None:
    """Serve chinwag's agents to MCP clients over stdio (being built: issue 6)."""
    raise click.ClickException("The MCP server is not built yet.")
