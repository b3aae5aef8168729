"""`chinwag dashboard`: serve the web dashboard, a client of the daemon's socket.

It binds to loopback unless ``--host`` says otherwise, and then only with a token
configured (``--token`` or ``$CHINWAG_DASHBOARD_TOKEN``): anyone who can reach the
port must not be able to drive the agents. Without one it makes a random token and
prints the address with it, once.
"""

from __future__ import annotations

import secrets
import socket
from pathlib import Path

import click
from chinwag.protocol import is_loopback

from .._settings import Failure, settings_of

TOKEN_ENV = "CHINWAG_DASHBOARD_TOKEN"
#: How long uvicorn lets open event streams finish when told to stop.
GRACEFUL_S = 2
BACKLOG = 2048  # uvicorn's own


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="The address to listen on.")
@click.option("--port", default=3456, show_default=True, help="The port (0: any free one).")
@click.option(
    "--root-path",
    default="",
    help="The path prefix the dashboard is served under, behind a reverse proxy (/chinwag).",
)
@click.option(
    "--token",
    envvar=TOKEN_ENV,
    help=f"The access token (default: ${TOKEN_ENV}, else a random one, printed).",
)
@click.pass_context
def command(ctx: click.Context, host: str, port: int, root_path: str, token: str | None) -> None:
    """Serve a live web dashboard of the daemon's agents and conversations."""
    if not is_loopback(host) and not token:
        raise Failure(
            f"--host {host} is not a loopback address: set an access token first "
            f"(--token or ${TOKEN_ENV}), since anyone who reaches it could drive the agents."
        )
    root_path = root_path.rstrip("/")
    if root_path and not root_path.startswith("/"):
        raise Failure(f"--root-path starts with /, such as /chinwag; not {root_path}")
    serve(settings_of(ctx).target, host, port, root_path, token)


def serve(socket_path: Path | str, host: str, port: int, root_path: str, token: str | None) -> None:
    """Listen (on ``port``, or a free one for 0), print the address, serve until Ctrl-C."""
    import uvicorn

    from ._app import create_app

    given = token is not None
    token = token or secrets.token_urlsafe(24)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as exc:
        listener.close()
        raise Failure(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    # Listening before the address is printed: a browser opening it at once is queued.
    listener.listen(BACKLOG)
    bound = listener.getsockname()[1]
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    address = f"http://{shown}:{bound}{root_path}/"
    # The token is printed only when made here: one given is the user's to keep.
    where = address if given else f"{address}?token={token}"
    click.echo(f"chinwag dashboard on {where}")
    config = uvicorn.Config(
        create_app(socket_path, token=token),
        root_path=root_path,
        log_level="warning",
        timeout_graceful_shutdown=GRACEFUL_S,
        backlog=BACKLOG,
    )
    with listener:
        uvicorn.Server(config).run(sockets=[listener])
