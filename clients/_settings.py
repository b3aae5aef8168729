"""What every `chinwag` command shares: its settings, failing in one line,
running its async body, and connecting to the daemon.

The commands in `cli.py`, `chinwag telegram` and `chinwag mcp` all take these
from here, so that none of them imports the module that gathers the others.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TypeVar

import anyio
import click

from ._client import (
    ChinwagError,
    Client,
    ConnectionLost,
    DaemonUnreachable,
    addresses,
    connect_explained,
    leaves,
)

_T = TypeVar("_T")

RECONNECT_S = 0.2  # between a lost connection and the next attempt (``reconnecting``)

CLIENT_NAME = "chinwag-cli"


class Failure(click.ClickException):
    """An expected failure: one line on stderr, exit status 1, no traceback."""

    exit_code = 1

    def show(self, file: IO[str] | None = None) -> None:
        print(f"chinwag: {self.message}", file=file or sys.stderr, flush=True)


def describe(exc: ChinwagError) -> str:
    """A refusal as the CLI says it: ``error CODE: MESSAGE``; a lost connection, its message."""
    if isinstance(exc, ConnectionLost):
        return exc.message
    return f"error {exc.code}: {exc.message}"


def run_command(fn: Callable[[], Awaitable[_T]]) -> _T:
    """Run one command's async body on asyncio, turning expected errors into `Failure`."""

    async def body() -> _T:
        return await fn()

    try:
        return anyio.run(body, backend="asyncio")
    except ChinwagError as exc:
        raise Failure(describe(exc)) from exc
    except BaseExceptionGroup as group:
        # Task groups wrap what their tasks raise; an expected failure inside
        # one is still an expected failure.
        for leaf in leaves(group):
            if isinstance(leaf, click.ClickException):
                raise leaf from None
            if isinstance(leaf, ChinwagError):
                raise Failure(describe(leaf)) from None
        raise


@dataclass
class Settings:
    """The `chinwag` group's options, which every command finds on its click context."""

    socket: Path
    socket_given: bool
    url: str | None = None  # --url / $CHINWAG_URL: daemons over TCP, tried in order

    @property
    def target(self) -> Path | str:
        """What commands connect to: the URLs when given, else the socket.

        The URLs are checked here, as a command is about to reach the daemon, so that a
        mistake in ``$CHINWAG_URL`` is a usage error naming the address (not a failed
        connection later), and stops no command that reaches no daemon (``serve``, ``token``).
        """
        if not self.url:
            return self.socket
        try:
            addresses(self.url)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="'--url'") from None
        return self.url


def settings_of(ctx: click.Context) -> Settings:
    settings = ctx.find_object(Settings)
    assert settings is not None, "the `chinwag` group sets it up"
    return settings


async def reconnecting(
    settings: Settings, session: Callable[[Client], Awaitable[None]], say: Callable[[str], None]
) -> None:
    """``session`` on a connection to the daemon. Given daemons' URLs (``--url``), when
    the connection is lost it connects again, to the first address that answers (the
    next daemon, when one went away), says so, and runs ``session`` anew."""
    while True:
        try:
            async with connect_or_fail(settings) as client:
                await session(client)
            return
        except* ConnectionLost as lost:
            if not settings.url:
                raise
            say(f"the connection was lost ({leaves(lost)[0]}); connecting again")
        await anyio.sleep(RECONNECT_S)  # not in a tight loop, should a daemon hang up at once


@contextlib.asynccontextmanager
async def connect_or_fail(settings: Settings) -> AsyncIterator[Client]:
    """Connect, turning "nothing listens there" into one clear line."""
    try:
        async with connect_explained(settings.target, client=CLIENT_NAME) as client:
            yield client
    except DaemonUnreachable as exc:
        raise Failure(exc.message) from exc
