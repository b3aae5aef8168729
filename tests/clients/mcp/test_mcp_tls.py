"""`chinwag --url ... mcp` over TLS: the MCP server reaches the daemon through the URLs
(the first dead, the second answering) with the token and CA from its environment,
and the token holds its tools to the token's name, which they act as when told no
other (no `--sender`, no `$CHINWAG_NAME`)."""

from __future__ import annotations

import os
from typing import Any

import anyio
from chinwag.clients import connect
from mcp import ClientSession, StdioServerParameters, stdio_client
from mcp.types import Implementation
from tcp_daemons import ALICE, Tls, closed_port, tcp_config, tcp_port, tls_certificates  # noqa: F401
from test_mcp_server import CHINWAG, CLIENT, call, refused


async def test_the_mcp_server_talks_over_tls_as_its_token(daemon_factory: Any, tls: Tls) -> None:
    daemon = daemon_factory(tcp_config(tls))
    port = tcp_port(daemon.log_path)
    urls = f"chinwag+tls://127.0.0.1:{closed_port()},chinwag+tls://127.0.0.1:{port}"
    environment = dict(
        os.environ,
        CHINWAG_TOKEN=ALICE,
        CHINWAG_CA=str(tls.ca),
        CHINWAG_SOCKET="/nonexistent/chinwag.sock",
    )
    environment.pop("CHINWAG_NAME", None)
    params = StdioServerParameters(command=CHINWAG, args=["--url", urls, "mcp"], env=environment)
    client = Implementation(name=CLIENT, version="0")
    with anyio.fail_after(30), (daemon.root / "mcp.log").open("a") as errlog:
        async with (
            stdio_client(params, errlog=errlog) as (read, write),
            ClientSession(read, write, client_info=client) as mcp,
        ):
            await mcp.initialize()
            turn = await call(mcp, "send_message", agent="assistant", content="over tls")
            assert (turn["status"], turn["text"], turn["sender"]) == ("done", "over tls", "alice")
            outside = await refused(
                mcp, "send_message", agent="assistant", content="hi", sender="bob"
            )
            assert "speaks as 'alice', not 'bob'" in outside
            sent = await call(mcp, "send_message", to="helper", content="mail over tls")
            assert sent["posted"]["msg_id"]
    async with connect(daemon.socket_path) as local:
        history = await local.history("assistant", "alice")
        assert [entry.content for entry in history.entries] == ["over tls", "over tls"]
        (mail,) = (await local.sent("alice")).items
        assert mail.message.content == "mail over tls"
