"""The MCP server: `chinwag mcp` lets other agents talk to chinwag's agents over stdio."""

from ._command import command

__all__ = ["command"]
