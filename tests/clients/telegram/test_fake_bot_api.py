"""The fake Bot API refuses message texts as Telegram does, so the bridge's tests
run against Telegram's rules: what a text shows once its MarkdownV2 is parsed
must hold something and be at most 4096 UTF-16 code units."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fake_bot_api import EMPTY, TOO_LONG, FakeBotAPI, Refusal
from test_telegram_bridge import on_asyncio, serving

CHAT = 42
PARROT = "\N{PARROT}"  # two UTF-16 code units


async def call(fake: FakeBotAPI, method: str, **params: Any) -> tuple[int, dict[str, Any]]:
    async with httpx.AsyncClient() as http:
        response = await http.post(f"{fake.base_url}/bot{fake.token}/{method}", data=params)
    return response.status_code, response.json()


CASES = [
    # (text, parse_mode, Telegram's error or None)
    ("x" * 4096, None, None),
    ("x" * 4097, None, TOO_LONG),
    (PARROT * 2048, None, None),
    (PARROT * 2048 + "x", None, TOO_LONG),  # 2049 characters, 4097 units
    ("漢" * 4096, None, None),  # CJK: one unit each
    ("\\." * 4096, "MarkdownV2", None),  # 8192 characters sent, 4096 shown
    ("*" + PARROT * 2048 + "*", "MarkdownV2", None),
    ("\\!" + PARROT * 2048, "MarkdownV2", TOO_LONG),
    ("", None, EMPTY),
    (" \n ", None, EMPTY),
    ("**", "MarkdownV2", EMPTY),
    ("a.b", "MarkdownV2", "Bad Request: can't parse entities: Character '.' is reserved"),
    ("_a__b_", "MarkdownV2", "Bad Request: can't parse entities: Can't find end of Italic"),
]


@pytest.mark.parametrize(("text", "parse_mode", "error"), CASES)
def test_a_message_text_is_refused_as_telegram_refuses_it(
    text: str, parse_mode: str | None, error: str | None
) -> None:
    async def main() -> None:
        async with serving(FakeBotAPI()) as fake:
            mode = {"parse_mode": parse_mode} if parse_mode else {}
            status, sent = await call(fake, "sendMessage", chat_id=CHAT, text="first", **mode)
            assert status == 200, sent
            message_id = sent["result"]["message_id"]
            for method, params in [
                ("sendMessage", {}),
                ("editMessageText", {"message_id": message_id}),
            ]:
                status, body = await call(fake, method, chat_id=CHAT, text=text, **mode, **params)
                if error is None:
                    assert (status, body["ok"]) == (200, True), body
                    assert not fake.refused()
                else:
                    assert (status, body["error_code"]) == (400, 400), body
                    assert body["description"].startswith(error), body
                    assert fake.refused(method)[-1].refusal == Refusal(400, body["description"])
            assert len(fake.chats[CHAT]) == (2 if error is None else 1)

    on_asyncio(main)
