"""The Telegram bridge over TLS, with a token for every `tg:` sender, and given two
daemons' URLs: when the one it talks to goes away it goes on with the other.

The bridge is `run_bridge`, as `chinwag telegram` runs it, its daemon link connecting
from the URLs and the environment ($CHINWAG_TOKEN, $CHINWAG_CA) as the command's does.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import anyio
import pytest
from fake_bot_api import FakeBotAPI
from tcp_daemons import BRIDGE, Tls, tcp_config, tcp_port, tls_certificates  # noqa: F401
from test_telegram_bridge import USER, fresh_chat, on_asyncio, polling, serving
from test_telegram_bridge import user_messages as said_on


def test_the_bridge_talks_over_tls_and_goes_on_with_the_next_daemon(
    daemon_factory: Any, tls: Tls, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = (daemon_factory(tcp_config(tls), name=name) for name in ("first", "second"))
    ports = [tcp_port(first.log_path), tcp_port(second.log_path)]
    urls = ",".join(f"chinwag+tls://127.0.0.1:{port}" for port in ports)
    monkeypatch.setenv("CHINWAG_TOKEN", BRIDGE)  # speaks for every tg:<chat id>
    monkeypatch.setenv("CHINWAG_CA", str(tls.ca))
    chat = fresh_chat()

    async def main() -> None:
        with tempfile.TemporaryDirectory(prefix="cw-tg-state-") as state_dir:
            async with (
                serving(FakeBotAPI()) as fake,
                polling(first, fake, Path(state_dir), socket_path=urls),
            ):
                fake.push_message(chat, USER, "over tls")
                await fake.wait_for(lambda: "over tls" in fake.texts(chat))
                assert await said_on(first, chat) == ["over tls"]

                await anyio.to_thread.run_sync(first.stop)
                fake.push_message(chat, USER, "to the second")
                await fake.wait_for(lambda: "to the second" in fake.texts(chat))
        assert await said_on(second, chat) == ["to the second"]

    on_asyncio(main, timeout=40)
