"""`chinwag tui`: a Textual app on the client library (asyncio).

The conversation list, the open conversation streaming live as Markdown, kill
and compact keys, an agent's question as a dialog, and an inbox of mail.
"""

from ._app import ChinwagTui
from ._command import command

__all__ = ["ChinwagTui", "command"]
