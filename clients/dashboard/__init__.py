"""The web dashboard: `chinwag dashboard`, a client of the daemon's socket.

Starlette under uvicorn, pages rendered on the server with jinja2, live through
server-sent events and a few lines of plain JavaScript; nothing to build. One
connection to the daemon (``DaemonLink``) serves every page. A view is one module
of ``views/`` (its routes and templates); ``create_app`` assembles them.
"""

from ._app import create_app
from ._command import command

__all__ = ["command", "create_app"]
