"""chinwag's clients: the Python client library and the `chinwag` CLI.

The library runs under asyncio and trio (anyio)::

    async with connect() as c:
        async with c.stream("assistant", "hello") as events:
            async for event in events:
                ...

Clients speak PROTOCOL.md through ``chinwag.protocol`` and never import the
daemon or storage packages.
"""

from ._client import (
    STREAM_BUFFER,
    ChinwagError,
    Client,
    ConnectionLost,
    EventStream,
    Subscription,
    connect,
    wait_for_socket,
)

__all__ = [
    "STREAM_BUFFER",
    "ChinwagError",
    "Client",
    "ConnectionLost",
    "EventStream",
    "Subscription",
    "connect",
    "wait_for_socket",
]
