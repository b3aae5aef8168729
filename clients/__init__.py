"""chinwag's clients: the Python client library and the `chinwag` CLI.

The library runs under asyncio and trio (anyio)::

    async with connect() as c:
        async with c.stream("assistant", "hello") as events:
            async for event in events:
                ...

Clients speak PROTOCOL.md through ``chinwag.protocol`` and never import the
daemon or storage packages.

The names below load on first use (PEP 562): importing a module of this
package, ``chinwag.clients.cli`` first of all, runs nothing else first, so
that the CLI decides how its imports are made (see its top).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._client import (
        STREAM_BUFFER,
        ChinwagError,
        Client,
        ConnectionLost,
        EventStream,
        MailWatch,
        Subscription,
        connect,
        wait_for_socket,
    )
else:

    def __getattr__(name: str) -> Any:
        if name in __all__:
            from . import _client

            return getattr(_client, name)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "STREAM_BUFFER",
    "ChinwagError",
    "Client",
    "ConnectionLost",
    "EventStream",
    "MailWatch",
    "Subscription",
    "connect",
    "wait_for_socket",
]
