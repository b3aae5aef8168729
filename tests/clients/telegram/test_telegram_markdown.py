"""What a chat shows for an agent's Markdown, end to end: the bridge against the
fake Bot API and a real daemon on the echo model, which answers with the message
it was sent. What was sent is read as Telegram reads MarkdownV2."""

from __future__ import annotations

import anyio
from fake_bot_api import FakeBotAPI
from markdown_v2 import Message, parse_markdown_v2
from test_telegram_bridge import USER, bridge, fresh_chat, on_asyncio


async def shows(fake: FakeBotAPI, chat: int, texts: list[str]) -> Message:
    """What ``chat`` shows once it shows ``texts`` (the test fails, saying what
    it shows instead, after 10 s); its last message as Telegram reads it."""
    with anyio.move_on_after(10):
        await fake.wait_for(lambda: fake.texts(chat) == texts)
    assert fake.texts(chat) == texts
    last = fake.last(chat)
    assert last.parse_mode == "MarkdownV2", last
    return parse_markdown_v2(last.text)


def test_a_guest_answer_of_one_line_of_inline_code_is_shown_under_the_guests_name(
    shared_daemon,
) -> None:
    chat = fresh_chat()

    async def main() -> None:
        async with bridge(shared_daemon) as fake:
            fake.push_message(chat, USER, "/guest helper ```sh npm install```")
            message = await shows(fake, chat, ["helper:\nsh npm install"])
            assert message.text == "helper:\nsh npm install"
            assert message.spans("bold", "code") == ["helper:", "sh npm install"]

    on_asyncio(main)


def test_a_reply_whose_one_line_is_inline_code_shows_it_as_code(shared_daemon) -> None:
    chat = fresh_chat()

    async def main() -> None:
        async with bridge(shared_daemon) as fake:
            fake.push_message(chat, USER, "```ls```")
            message = await shows(fake, chat, ["ls"])
            assert (message.text, message.spans("code")) == ("ls", ["ls"])

    on_asyncio(main)
