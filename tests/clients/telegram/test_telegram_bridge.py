"""The Telegram bridge end to end: python-telegram-bot against a fake Bot API, a real daemon.

Each test runs on asyncio (python-telegram-bot's loop), starts the fake Bot
API server and the bridge in the test process, and drives a real
`chinwag serve` on the echo model. Tests wait on the fake server's record of
calls ("the chat shows X"), never on sleeps; every wait is bounded.
"""

from __future__ import annotations

import itertools
import json
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx
import pytest
from chinwag.clients import connect
from chinwag.clients.telegram import _bridge
from chinwag.clients.telegram._bridge import Bridge, BridgeConfig, run_bridge
from chinwag.clients.telegram._chat import OUTAGE_NOTICE
from chinwag.clients.telegram._spool import Spool, Spooled
from chinwag.clients.telegram._webhook import Webhook
from chinwag.protocol import End
from fake_bot_api import BOT_USER, MESSAGE_LIMIT, FakeBotAPI, too_many_requests, utf16_length
from structlog.testing import capture_logs

USER = 1111
#: The pacing of the test that measures it: short, but long enough to see.
INTERVAL = 0.2
#: The pacing of the others, which only need it not to hold them up.
QUICK = 0.05

_chat_ids = itertools.count(5000)


async def user_messages(daemon: Any, chat: int) -> list[str]:
    """What the agent was sent from ``chat``, archived entries included."""
    async with connect(daemon.socket_path) as client:
        history = client.iter_history("assistant", f"tg:{chat}", include_archived=True)
        return [entry.content async for entry in history if entry.role == "user"]


def fresh_chat() -> int:
    return next(_chat_ids)


def on_asyncio(fn: Callable[[], Awaitable[Any]], timeout: float = 20) -> None:
    async def bounded() -> None:
        with anyio.fail_after(timeout):
            await fn()

    anyio.run(bounded, backend="asyncio")


def config_for(daemon: Any, fake: FakeBotAPI, state_dir: Path, **changes: Any) -> BridgeConfig:
    config = BridgeConfig(
        token=fake.token,
        agent="assistant",
        socket_path=daemon.socket_path,
        state_dir=state_dir,
        api_url=fake.base_url,
        allowed_users=frozenset({USER}),
        edit_interval_s=QUICK,
        poll_timeout_s=5,
        reconnect_ceiling_s=0.2,
    )
    return replace(config, **changes)


@asynccontextmanager
async def serving(fake: FakeBotAPI) -> AsyncIterator[FakeBotAPI]:
    """The fake Bot API, listening."""
    async with anyio.create_task_group() as server:
        await server.start(fake.serve)
        yield fake
        server.cancel_scope.cancel()


@asynccontextmanager
async def polling(
    daemon: Any, fake: FakeBotAPI, state_dir: Path, **changes: Any
) -> AsyncIterator[None]:
    """A bridge polling ``fake``, talking to ``daemon``, its spool in ``state_dir``;
    stopped on leaving as SIGTERM stops `chinwag telegram` (cancelled)."""
    async with anyio.create_task_group() as bridges:
        await bridges.start(run_bridge, config_for(daemon, fake, state_dir, **changes))
        yield
        bridges.cancel_scope.cancel()


@asynccontextmanager
async def bridge(daemon: Any, **changes: Any) -> AsyncIterator[FakeBotAPI]:
    """A fake Bot API and a bridge polling it, talking to ``daemon``."""
    with tempfile.TemporaryDirectory(prefix="cw-tg-state-") as state_dir:
        async with serving(FakeBotAPI()) as fake, polling(daemon, fake, Path(state_dir), **changes):
            yield fake


def test_a_reply_streams_into_one_message_edited_at_most_once_per_interval(shared_daemon) -> None:
    chat = fresh_chat()

    async def main() -> None:
        async with bridge(shared_daemon, edit_interval_s=INTERVAL) as fake:
            fake.push_message(chat, USER, "/slow 12 50")
            final = " ".join(str(i) for i in range(1, 13))
            await fake.wait_for(lambda: fake.texts(chat) == [final])
            calls = [c for c in fake.calls if c.method in ("sendMessage", "editMessageText")]
            assert [c.method for c in calls].count("sendMessage") == 1
            assert calls[0].text != final and len(calls) > 1  # it streamed, edited
            # A word comes every 50 ms; without pacing, edits would too. (Arrival
            # times jitter, so half the interval: the pacer itself is exact, see
            # test_telegram_pacing.py.)
            gaps = [b.at - a.at for a, b in itertools.pairwise(calls)]
            assert min(gaps) >= INTERVAL / 2, gaps
            assert len(calls) < 12

    on_asyncio(main)


def test_telegram_offers_the_bridges_commands_when_slash_is_typed(shared_daemon) -> None:
    chat = fresh_chat()

    async def main() -> None:
        async with bridge(shared_daemon) as fake:
            (offered,) = fake.calls_to("setMyCommands")  # set by the time the bridge started
            commands = offered.json("commands")
            assert commands == [
                {
                    "command": "kill",
                    "description": "stop the answer being written "
                    "(/kill all also drops queued messages)",
                },
                {
                    "command": "compact",
                    "description": "summarise the conversation so far, to free the agent's context",
                },
                {"command": "title", "description": "the conversation's title"},
                {"command": "history", "description": "the last N turns (default 5)"},
                {"command": "guest", "description": "ask another agent, in this conversation"},
                {"command": "help", "description": "what this bot does, and its commands"},
            ]
            fake.push_message(chat, USER, "/help")
            await fake.wait_for(lambda: fake.texts(chat))
            # /help lists the same commands, each with the same line.
            listed = fake.texts(chat)[0].split("\n\n", 1)[1].splitlines()
            assert [line.partition(": ")[2] for line in listed] == [
                command["description"] for command in commands
            ]
            assert [line.split(":")[0].split()[0] for line in listed] == [
                f"/{command['command']}" for command in commands
            ]

    on_asyncio(main)


def test_in_a_group_the_answer_replies_to_the_message_it_answers(shared_daemon) -> None:
    group, private = -fresh_chat(), fresh_chat()

    async def main() -> None:
        async with bridge(shared_daemon) as fake:
            first = fake.push_message(group, USER, "/slow 5 100")
            await fake.wait_for(lambda: fake.texts(group))
            second = fake.push_message(group, USER, "and this")
            await fake.wait_for(lambda: fake.texts(group)[::2] == ["1 2 3 4 5", "and this"])
            answer, queued, answer_2 = sorted(
                fake.chats[group].values(), key=lambda m: m.message_id
            )
            assert queued.visible.startswith("⏳ Queued")
            assert [message.reply_parameters for message in (answer, queued, answer_2)] == [
                {"message_id": first, "allow_sending_without_reply": True},
                {"message_id": second, "allow_sending_without_reply": True},
                {"message_id": second, "allow_sending_without_reply": True},
            ]
            # In a private chat, the answer follows the message as before.
            fake.push_message(private, USER, "hello")
            await fake.wait_for(lambda: fake.texts(private) == ["hello"])
            assert fake.last(private).reply_parameters is None
            assert all(
                "reply_parameters" not in call.params
                for call in fake.calls_to("sendMessage", private)
            )

    on_asyncio(main)


def test_a_flood_wait_is_honoured_and_the_final_text_still_arrives(shared_daemon) -> None:
    chat = fresh_chat()

    async def main() -> None:
        async with bridge(shared_daemon) as fake:
            fake.refuse("sendMessage", too_many_requests(1))
            fake.push_message(chat, USER, "hello there")
            await fake.wait_for(lambda: fake.texts(chat) == ["hello there"])
            refused, sent = fake.calls_to("sendMessage", chat)
            assert sent.at - refused.at >= 0.95  # retry_after: 1 s
            assert not fake.calls_to("editMessageText", chat)

    on_asyncio(main)


# Telegram counts a message's length in UTF-16 code units of the text it shows,
# once its MarkdownV2 is parsed; the fake Bot API refuses a longer one as it does.
LONG_REPLIES = {
    # 5399 characters, one unit each.
    "ascii": [f"word{i:04}" for i in range(600)],
    # 4049 characters but 4499 units: each parrot is two (a surrogate pair), so a
    # split that counts characters sends it whole. Its MarkdownV2, with `.`, `-` and
    # `!` escaped, is 5849 units: a limit counted on that would refuse it too.
    "emoji, CJK and escapes": [f"\N{PARROT}{i:03}.漢-!" for i in range(450)],
}


@pytest.mark.parametrize("words", LONG_REPLIES.values(), ids=LONG_REPLIES.keys())
def test_a_reply_over_4096_utf16_units_is_split_into_messages(
    shared_daemon, words: list[str]
) -> None:
    chat = fresh_chat()
    reply = " ".join(words)
    assert utf16_length(reply) > MESSAGE_LIMIT

    async def main() -> None:
        async with bridge(shared_daemon) as fake:
            fake.push_message(chat, USER, reply)
            with anyio.move_on_after(15):
                await fake.wait_for(lambda: " ".join(fake.texts(chat)) == reply or fake.refused())
            assert [(c.method, c.refusal) for c in fake.refused()] == []
            texts = fake.texts(chat)
            assert " ".join(texts) == reply
            assert len(texts) == 2
            assert all(utf16_length(text) <= MESSAGE_LIMIT for text in texts)
            assert utf16_length(texts[0]) > 4000  # filled up to the limit, cut at a space

    on_asyncio(main)


def test_ask_user_becomes_keyboards_whose_presses_and_typed_text_answer_the_run(
    shared_daemon,
) -> None:
    chat = fresh_chat()
    ask = {
        "questions": [
            {"question": "Colour?", "options": [{"label": "red"}, {"label": "blue"}]},
            {
                "question": "Sizes?",
                "options": [{"label": "S"}, {"label": "M"}, {"label": "L"}],
                "multi_select": True,
            },
            {"question": "Name?", "options": [{"label": "Ada"}]},
        ]
    }

    async def main() -> None:
        async with bridge(shared_daemon) as fake:
            fake.push_message(chat, USER, f"/tool ask_user {json.dumps(ask)}")
            await fake.wait_for(lambda: fake.chats[chat] and fake.last(chat).buttons)
            first = fake.last(chat)
            assert "Colour?" in first.visible
            assert [label for label, _ in first.buttons] == ["red", "blue", "Other…"]
            fake.push_press(chat, USER, first.message_id, dict(first.buttons)["blue"])
            await fake.wait_for(lambda: "Sizes?" in fake.last(chat).visible)
            assert fake.chats[chat][first.message_id].buttons == []  # answered: no keyboard
            assert "✅ blue" in fake.chats[chat][first.message_id].visible

            second = fake.last(chat)

            async def tick(label: str) -> None:
                data = dict(fake.last(chat).buttons)[f"▫️ {label}"]
                fake.push_press(chat, USER, second.message_id, data)
                await fake.wait_for(lambda: f"☑️ {label}" in dict(fake.last(chat).buttons))

            await tick("S")
            await tick("L")
            fake.push_press(chat, USER, second.message_id, dict(second.buttons)["Done"])
            await fake.wait_for(lambda: "Name?" in fake.last(chat).visible)

            third = fake.last(chat)
            fake.push_press(chat, USER, third.message_id, dict(third.buttons)["Other…"])
            await fake.wait_for(lambda: "Type your answer" in fake.last(chat).visible)
            toast = fake.calls_to("answerCallbackQuery")[-1]
            assert toast.params["text"] == "Type your answer and send it."
            fake.push_message(chat, USER, "Grace Hopper")
            # echo answers with the tool's result: the answers, as the CLI words them
            answer = "Colour?: blue Sizes?: S, L Name?: Grace Hopper"
            await fake.wait_for(lambda: fake.texts(chat)[-1] == answer)
            assert "✅ Grace Hopper" in fake.chats[chat][third.message_id].visible
            assert len(fake.calls_to("answerCallbackQuery")) == 5

    on_asyncio(main)


def test_kill_stops_the_run(shared_daemon) -> None:
    chat = fresh_chat()

    async def main() -> None:
        async with bridge(shared_daemon) as fake:
            fake.push_message(chat, USER, "/kill")
            await fake.wait_for(lambda: fake.texts(chat) == ["Nothing is running."])
            fake.push_message(chat, USER, "/slow 100 100")  # 10 s unless killed
            await fake.wait_for(lambda: len(fake.texts(chat)) == 2)
            fake.push_message(chat, USER, "/kill")
            await fake.wait_for(lambda: fake.texts(chat)[-1].endswith("⏹ Stopped."))
            assert fake.texts(chat)[-1].startswith("1")
        async with connect(shared_daemon.socket_path) as client:
            history = await client.history("assistant", f"tg:{chat}")
            assert history.entries[-1].role == "user"  # nothing half-done was stored

    on_asyncio(main, timeout=8)


def test_a_message_sent_while_busy_queues_and_the_bridge_says_so(shared_daemon) -> None:
    chat = fresh_chat()

    async def main() -> None:
        async with bridge(shared_daemon) as fake:
            fake.push_message(chat, USER, "/slow 5 100")
            await fake.wait_for(lambda: fake.texts(chat))
            fake.push_message(chat, USER, "second message")
            await fake.wait_for(lambda: len(fake.texts(chat)) == 3)
            assert fake.texts(chat)[1].startswith("⏳ Queued behind 1 message")
            await fake.wait_for(lambda: fake.texts(chat)[::2] == ["1 2 3 4 5", "second message"])

    on_asyncio(main)


def test_nobody_is_allowed_by_default_and_the_refused_user_learns_their_id(shared_daemon) -> None:
    chat = fresh_chat()

    async def main() -> None:
        with capture_logs() as logs:
            async with bridge(shared_daemon, allowed_users=frozenset()) as fake:
                fake.push_message(chat, USER, "hello")
                await fake.wait_for(lambda: fake.texts(chat))
                assert fake.texts(chat) == [
                    f"This bot is private. Your Telegram user id is {USER}; "
                    f"its owner can let you in with --allow {USER}."
                ]
        events = {log["event"]: log for log in logs}
        assert "--allow" in events["telegram_nobody_allowed"]["hint"]
        assert events["telegram_user_refused"]["user_id"] == USER
        assert f"--allow {USER}" in events["telegram_user_refused"]["hint"]
        async with connect(shared_daemon.socket_path) as client:
            page = await client.list_conversations(sender=f"tg:{chat}")
            assert page.items == []  # nothing reached the agent

    on_asyncio(main)


def test_markdown_goes_as_markdown_v2_and_as_plain_text_when_telegram_rejects_it(
    shared_daemon,
) -> None:
    chat = fresh_chat()

    async def main() -> None:
        async with bridge(shared_daemon) as fake:
            fake.push_message(chat, USER, "a **bold** claim. Really!")
            await fake.wait_for(lambda: fake.texts(chat) == ["a bold claim. Really!"])
            shown = fake.last(chat)
            assert (shown.parse_mode, shown.text) == ("MarkdownV2", "a *bold* claim\\. Really\\!")
            fake.reject_markdown = True
            fake.push_message(chat, USER, "now **plain**")
            await fake.wait_for(lambda: fake.texts(chat)[-1:] == ["now **plain**"])
            assert fake.last(chat).parse_mode is None
            rejected = [c for c in fake.calls_to("sendMessage", chat) if c.text == "now *plain*"]
            assert rejected and rejected[0].parse_mode == "MarkdownV2"

    on_asyncio(main)


def test_a_daemon_restart_mid_run_loses_no_answer(daemon) -> None:
    chat = fresh_chat()

    async def main() -> None:
        async with bridge(daemon) as fake:
            fake.push_message(chat, USER, "/slow 8 100")
            await fake.wait_for(lambda: fake.texts(chat))
            # SIGTERM: the daemon lets the run finish (its grace is 2 s), then closes.
            await anyio.to_thread.run_sync(daemon.stop)
            await fake.wait_for(lambda: fake.texts(chat) == ["1 2 3 4 5 6 7 8"])
            fake.push_message(chat, USER, "are you back")
            await anyio.to_thread.run_sync(daemon.start)
            await fake.wait_for(lambda: fake.texts(chat)[-1:] == ["are you back"])

    on_asyncio(main)


def test_a_daemon_crash_ends_the_run_in_flight_and_the_queued_message_is_sent_again(
    daemon,
) -> None:
    chat = fresh_chat()

    async def main() -> None:
        async with bridge(daemon) as fake:
            fake.push_message(chat, USER, "/slow 50 100")
            await fake.wait_for(lambda: fake.texts(chat))
            fake.push_message(chat, USER, "still there?")
            await fake.wait_for(lambda: len(fake.texts(chat)) == 2)  # the queued notice
            await anyio.to_thread.run_sync(daemon.kill9)
            await anyio.to_thread.run_sync(daemon.start)
            # The queued message was never stored: the bridge sends it again.
            await fake.wait_for(lambda: fake.texts(chat)[-1] == "still there?")
            # The run in flight died with the daemon, its step unfinished: the
            # history has nothing more, and the chat is told so.
            await fake.wait_for(lambda: "went away" in fake.texts(chat)[0])
            assert fake.texts(chat)[0].startswith("1")
            assert fake.texts(chat)[0].endswith(
                "⚠️ Error 503: The daemon went away before the run finished."
            )

    on_asyncio(main)


def test_after_a_lost_connection_runs_are_attached_again_or_read_from_history(
    shared_daemon, short_tmp
) -> None:
    chat = fresh_chat()
    proxy = SocketProxy(shared_daemon.socket_path, short_tmp / "proxy.sock")

    async def main() -> None:
        async with anyio.create_task_group() as tasks:
            await tasks.start(proxy.serve)
            async with bridge(shared_daemon, socket_path=proxy.path) as fake:
                # Still running when the bridge is back: attached again, each word once.
                fake.push_message(chat, USER, "/slow 8 100")
                await fake.wait_for(lambda: fake.texts(chat))
                proxy.cut()
                await fake.wait_for(lambda: fake.texts(chat) == ["1 2 3 4 5 6 7 8"])
                assert proxy.connections == 2

                # Over before the bridge is back: its answer comes from the history.
                fake.push_message(chat, USER, "/slow 6 100")
                await fake.wait_for(lambda: len(fake.texts(chat)) == 2)
                proxy.refusing = True
                proxy.cut()
                async with (
                    connect(shared_daemon.socket_path) as client,
                    client.attach("assistant", f"tg:{chat}") as events,
                ):
                    end = (await events.collect())[-1]
                    assert isinstance(end, End) and end.status == "done"
                with capture_logs() as logs:
                    proxy.refusing = False
                    await fake.wait_for(lambda: fake.texts(chat)[-1] == "1 2 3 4 5 6")
                assert any(log["event"] == "run_recovered" for log in logs)
            tasks.cancel_scope.cancel()

    on_asyncio(main)


def test_commands_in_a_forum_topic(shared_daemon) -> None:
    chat = -100777
    topic = 42

    async def main() -> None:
        async with bridge(shared_daemon) as fake:

            async def say(text: str, count: int) -> str:
                fake.push_message(chat, USER, text, thread_id=topic)
                await fake.wait_for(lambda: len(fake.texts(chat)) >= count)
                return fake.texts(chat)[count - 1]

            assert "/kill" in await say("/help", 1)
            assert await say("/title", 2) == "No conversation yet: send a message first."
            await say('/tool set_title {"title": "Trip plans"}', 3)
            assert await say("/title", 4) == "📌 Trip plans"
            assert await say("/guest helper hello there", 5) == "helper:\nhello there"
            history = await say("/history", 6)
            assert "You: /guest" not in history  # a guest turn stores the plain message
            assert "You: hello there\n\nhelper: hello there" in history
            compacted = await say("/compact", 7)
            assert compacted.startswith("🗜 Compacted") or "Could not compact" in compacted
            assert all(shown.thread_id == topic for shown in fake.chats[chat].values())
        async with connect(shared_daemon.socket_path) as client:
            page = await client.list_conversations(sender=f"tg:{chat}:{topic}")
            assert [item.title for item in page.items] == ["Trip plans"]

    on_asyncio(main)


#: A daemon that sends a history a few entries at a time: as many as fit 1 KiB.
PAGED_CONFIG = '[daemon]\nmax_frame_bytes = 1024\n[agents.assistant]\nprovider = "echo"\n'


def test_history_shows_the_last_turns_of_a_history_sent_in_pages(daemon_factory) -> None:
    daemon = daemon_factory(config=PAGED_CONFIG)
    chat = fresh_chat()
    said = [f"turn {n}: " + " ".join(["words"] * 12) for n in range(6)]

    async def main() -> None:
        async with connect(daemon.socket_path) as client:
            for text in said:
                async with client.stream("assistant", text, sender=f"tg:{chat}") as events:
                    await events.collect()
            first = await client.history("assistant", f"tg:{chat}")
            assert 0 < len(first.entries) < 2 * len(said)  # it does come in pages
        async with bridge(daemon) as fake:
            fake.push_message(chat, USER, "/history 4")
            await fake.wait_for(lambda: len(fake.texts(chat)) >= 1)
        [shown] = fake.texts(chat)
        assert shown.split("\n\n") == [
            line for text in said[-4:] for line in (f"You: {text}", f"assistant: {text}")
        ]

    on_asyncio(main)


def test_updates_can_come_by_webhook(shared_daemon, short_tmp) -> None:
    chat = fresh_chat()
    url = "https://bot.example.invalid/telegram/hook"

    async def main() -> None:
        fake = FakeBotAPI()
        async with anyio.create_task_group() as server:
            await server.start(fake.serve)
            async with anyio.create_task_group() as bridges:
                webhook = Webhook(url, "127.0.0.1", 0)
                config = config_for(shared_daemon, fake, short_tmp, webhook=webhook)
                port = await bridges.start(run_bridge, config)
                (registered,) = fake.calls_to("setWebhook")
                assert registered.params["url"] == url
                secret = registered.params["secret_token"]
                update = {
                    "update_id": 1,
                    "message": {
                        "message_id": 1,
                        "date": 0,
                        "chat": {"id": chat, "type": "private"},
                        "from": {"id": USER, "is_bot": False, "first_name": "A"},
                        "text": "by webhook",
                    },
                }
                hook = f"http://127.0.0.1:{port}/telegram/hook"
                async with httpx.AsyncClient() as http:
                    forged = await http.post(hook, json=update)
                    assert forged.status_code == 403
                    header = {"X-Telegram-Bot-Api-Secret-Token": secret}
                    posted = await http.post(hook, json=update, headers=header)
                    assert posted.status_code == 200
                await fake.wait_for(lambda: fake.texts(chat) == ["by webhook"])
                assert not fake.calls_to("getUpdates")
                bridges.cancel_scope.cancel()
            server.cancel_scope.cancel()

    on_asyncio(main)


class SocketProxy:
    """A Unix socket in front of the daemon's, whose connections a test can cut."""

    def __init__(self, target: Path, path: Path) -> None:
        self.target = target
        self.path = path
        self.refusing = False  # new connections are closed at once
        self.connections = 0
        self._pipes: list[anyio.CancelScope] = []

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        listener = await anyio.create_unix_listener(self.path)
        task_status.started()
        await listener.serve(self._pipe)

    def cut(self) -> None:
        for pipe in self._pipes:
            pipe.cancel()
        self._pipes.clear()

    async def _pipe(self, downstream: anyio.abc.SocketStream) -> None:
        async with downstream:
            if self.refusing:
                return
            self.connections += 1
            async with (
                await anyio.connect_unix(self.target) as upstream,
                anyio.create_task_group() as pipe,
            ):
                self._pipes.append(pipe.cancel_scope)
                pipe.start_soon(_copy, downstream, upstream, pipe.cancel_scope)
                pipe.start_soon(_copy, upstream, downstream, pipe.cancel_scope)


async def _copy(
    source: anyio.abc.SocketStream, sink: anyio.abc.SocketStream, pipe: anyio.CancelScope
) -> None:
    try:
        async for chunk in source:
            await sink.send(chunk)
    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
        pass
    pipe.cancel()  # one side closed: close both


def confirmed(fake: FakeBotAPI) -> bool:
    """Whether a getUpdates has told Telegram the last update pushed was received."""
    return any(
        int(call.params.get("offset", 0)) > fake.last_update_id
        for call in fake.calls_to("getUpdates")
    )


def test_a_message_taken_while_the_daemon_is_down_survives_a_bridge_restart(
    daemon, short_tmp, spool_watch: SpoolWatch
) -> None:
    chat = fresh_chat()
    state = short_tmp / "state"

    async def main() -> None:
        await anyio.to_thread.run_sync(daemon.stop)
        async with serving(FakeBotAPI()) as fake:
            async with polling(daemon, fake, state):
                fake.push_message(chat, USER, "anyone home?")
                await fake.wait_for(lambda: confirmed(fake) and fake.texts(chat))
            # Stopped: Telegram was told the update arrived, and will not send it again.
            assert int(fake.calls_to("getUpdates")[-1].params["offset"]) > fake.last_update_id
            assert fake.texts(chat) == [OUTAGE_NOTICE]
            await anyio.to_thread.run_sync(daemon.start)
            async with polling(daemon, fake, state):
                await fake.wait_for(lambda: fake.texts(chat)[1:] == ["anyone home?"])
                # Its run has ended (else the next message is rightly told it is queued).
                await spool_watch.emptied()
                # A second copy would be queued ahead of this one in the daemon.
                fake.push_message(chat, USER, "and now?")
                await fake.wait_for(lambda: fake.texts(chat)[-1:] == ["and now?"])
                assert fake.texts(chat) == [OUTAGE_NOTICE, "anyone home?", "and now?"]
                await spool_watch.emptied()
        users = await user_messages(daemon, chat)
        assert users == ["anyone home?", "and now?"]
        assert spooled(state) == []

    on_asyncio(main, timeout=40)


def test_while_the_daemon_is_down_a_chat_is_told_once_that_its_messages_are_kept(
    daemon, short_tmp
) -> None:
    chat, other = fresh_chat(), fresh_chat()
    state = short_tmp / "state"

    def kept() -> list[str]:
        """The messages the spool holds, from its file (the bridge holds its lock)."""
        lines = [json.loads(line) for line in (state / SPOOL).read_text().splitlines()]
        done = {line["update_id"] for line in lines if line["op"] == "done"}
        return [
            line["text"]
            for line in lines
            if line["op"] == "message" and line["update_id"] not in done
        ]

    def shown(fake: FakeBotAPI) -> list[str]:
        """What the chat shows but the notes that a message queues in the daemon."""
        return [text for text in fake.texts(chat) if not text.startswith("⏳ Queued")]

    async def main() -> None:
        await anyio.to_thread.run_sync(daemon.stop)
        async with serving(FakeBotAPI()) as fake, polling(daemon, fake, state):
            fake.push_message(chat, USER, "one")
            await fake.wait_for(lambda: fake.texts(chat) == [OUTAGE_NOTICE])
            # More messages in the same outage: no other notice; another chat gets its own.
            fake.push_message(chat, USER, "two")
            fake.push_message(chat, USER, "three")
            fake.push_message(other, USER, "elsewhere")
            await fake.wait_for(lambda: confirmed(fake) and fake.texts(other) == [OUTAGE_NOTICE])
            assert kept() == ["one", "two", "three", "elsewhere"]
            await anyio.to_thread.run_sync(daemon.start)
            # (The first messages of answers given at once may swap: each reply
            # waits for the chat's next free slot on its own.)
            await fake.wait_for(lambda: sorted(shown(fake)[1:]) == ["one", "three", "two"])
            assert shown(fake)[0] == OUTAGE_NOTICE
            await fake.wait_for(lambda: fake.texts(other) == [OUTAGE_NOTICE, "elsewhere"])
            # A new outage: told again, once.
            await anyio.to_thread.run_sync(daemon.stop)
            fake.push_message(chat, USER, "four")
            await fake.wait_for(lambda: shown(fake)[4:] == [OUTAGE_NOTICE])
            fake.push_message(chat, USER, "five")
            await fake.wait_for(lambda: confirmed(fake))
            await anyio.to_thread.run_sync(daemon.start)
            await fake.wait_for(lambda: sorted(shown(fake)[5:]) == ["five", "four"])
            assert shown(fake)[4] == OUTAGE_NOTICE
            assert fake.texts(chat).count(OUTAGE_NOTICE) == 2
        assert await user_messages(daemon, chat) == ["one", "two", "three", "four", "five"]

    on_asyncio(main, timeout=40)


def test_a_spooled_message_the_daemon_already_took_is_not_sent_again(
    shared_daemon, short_tmp, spool_watch: SpoolWatch
) -> None:
    chat = fresh_chat()
    state = short_tmp / "state"

    async def main() -> None:
        async with serving(FakeBotAPI()) as fake:
            # As a bridge that died before it heard the daemon take its first
            # message, and before it confirmed either update to Telegram.
            fake.push_message(chat, USER, "just once")
            taken = fake.last_update_id
            fake.push_message(chat, USER, "then this")
            spool = await anyio.to_thread.run_sync(Spool.open, state / SPOOL)
            for update_id, text in ((taken, "just once"), (fake.last_update_id, "then this")):
                await spool.add(Spooled(update_id=update_id, chat_id=chat, text=text))
            await spool.sent(taken, datetime.now(UTC))
            spool.close()
            async with (
                connect(shared_daemon.socket_path) as client,
                client.stream("assistant", "just once", sender=f"tg:{chat}") as answer,
            ):
                await answer.collect()
            with capture_logs() as logs:
                async with polling(shared_daemon, fake, state):
                    await fake.wait_for(lambda: len(fake.texts(chat)) == 2)
                    # Its answer, read back from the history; the other one, sent.
                    assert sorted(fake.texts(chat)) == ["just once", "then this"]
                    fake.push_message(chat, USER, "last")
                    await fake.wait_for(lambda: fake.texts(chat)[-1:] == ["last"])
                    await spool_watch.emptied()
        users = await user_messages(shared_daemon, chat)
        assert users == ["just once", "then this", "last"]
        assert spooled(state) == []
        events = [log["event"] for log in logs]
        assert events.count("telegram_spool_already_delivered") == 1
        assert events.count("telegram_update_repeated") == 2  # Telegram sent both again

    on_asyncio(main)


def test_an_answer_read_back_from_a_history_sent_in_pages_is_whole(
    daemon_factory, short_tmp
) -> None:
    daemon = daemon_factory(config=PAGED_CONFIG)
    chat = fresh_chat()
    state = short_tmp / "state"
    # A tool call whose arguments fill a page alone: the run's result and answer
    # come on the next page.
    text = "/tool nothing " + json.dumps({"pad": "x" * 600})

    async def main() -> None:
        async with serving(FakeBotAPI()) as fake:
            # As a bridge that died after sending the message, before it showed the answer.
            fake.push_message(chat, USER, text)
            spool = await anyio.to_thread.run_sync(Spool.open, state / SPOOL)
            await spool.add(Spooled(update_id=fake.last_update_id, chat_id=chat, text=text))
            await spool.sent(fake.last_update_id, datetime.now(UTC))
            spool.close()
            async with connect(daemon.socket_path) as client:
                async with client.stream("assistant", text, sender=f"tg:{chat}") as answer:
                    await answer.collect()
                page = await client.history("assistant", f"tg:{chat}", after_seq=1)
                assert [e.tool_calls != [] for e in page.entries] == [True]  # the call alone
                [*_, last] = [e async for e in client.iter_history("assistant", f"tg:{chat}")]
            assert last.role == "assistant" and last.content and not last.tool_calls
            with capture_logs() as logs:
                async with polling(daemon, fake, state):
                    await fake.wait_for(lambda: fake.texts(chat) == [last.content])
        assert any(log["event"] == "run_recovered" and log["done"] for log in logs)

    on_asyncio(main)


def test_a_message_queued_in_the_daemon_is_kept_until_its_answer_is_shown(
    daemon, short_tmp, spool_watch: SpoolWatch
) -> None:
    chat = fresh_chat()
    state = short_tmp / "state"

    async def main() -> None:
        async with serving(FakeBotAPI()) as fake:
            async with polling(daemon, fake, state):
                fake.push_message(chat, USER, "/slow 50 100")  # 5 s: past the daemon's grace
                await fake.wait_for(lambda: fake.texts(chat))
                fake.push_message(chat, USER, "still there?")
                await fake.wait_for(lambda: len(fake.texts(chat)) == 2)  # the queued notice
            # The daemon keeps its queue in memory: the spool keeps the message;
            # and the run's answer is not shown yet: the spool keeps its message too.
            assert [message.text for message in spooled(state)] == ["/slow 50 100", "still there?"]
            await anyio.to_thread.run_sync(daemon.stop)  # the queue is dropped (503)
            await anyio.to_thread.run_sync(daemon.start)
            async with polling(daemon, fake, state):
                # The run that streamed is read back (cut short by the stop),
                # the queued message sent again.
                await fake.wait_for(
                    lambda: (
                        "still there?" in fake.texts(chat)
                        and any("went away" in text for text in fake.texts(chat)[2:])
                    )
                )
                # What the first bridge showed of it stays: the history holds less.
                assert fake.texts(chat)[0].startswith("1")
                assert "went away" not in fake.texts(chat)[0]
                await spool_watch.emptied()
        users = await user_messages(daemon, chat)
        assert users == ["/slow 50 100", "still there?"]
        assert spooled(state) == []

    on_asyncio(main, timeout=40)


@pytest.mark.parametrize("still_running", [False, True], ids=["ended", "running"])
def test_a_run_streaming_when_the_bridge_stops_is_completed_in_its_message_after_a_restart(
    shared_daemon, short_tmp, spool_watch: SpoolWatch, still_running: bool
) -> None:
    chat = fresh_chat()
    state = short_tmp / "state"
    full = " ".join(str(word) for word in range(1, 41))

    async def main() -> None:
        async with serving(FakeBotAPI()) as fake:
            async with polling(shared_daemon, fake, state):
                # 4 s: time enough, on a loaded machine too, to restart while it runs
                fake.push_message(chat, USER, "/slow 40 100")
                # An edit: the answer's message was sent, and its id kept.
                await fake.wait_for(lambda: fake.calls_to("editMessageText", chat))
            # Stopped as SIGTERM stops it, the answer half shown: the message stays,
            # with the message its answer was being shown in.
            [(answer_id, half)] = fake.chats[chat].items()
            assert half.visible != full
            [message] = spooled(state)
            assert (message.text, message.answer_ids) == ("/slow 40 100", (answer_id,))
            if not still_running:
                async with (
                    connect(shared_daemon.socket_path) as client,
                    client.attach("assistant", f"tg:{chat}") as events,
                ):
                    end = (await events.collect())[-1]
                    assert isinstance(end, End) and end.status == "done"
            with capture_logs() as logs:
                async with polling(shared_daemon, fake, state):
                    await fake.wait_for(lambda: fake.texts(chat)[-1:] == [full])
                    await spool_watch.emptied()
        # Completed in the message the first bridge left half written: edited, none sent.
        assert fake.texts(chat) == [full]
        assert len(fake.calls_to("sendMessage", chat)) == 1
        assert fake.calls_to("editMessageText", chat)[-1].params["message_id"] == str(answer_id)
        users = await user_messages(shared_daemon, chat)
        assert users == ["/slow 40 100"]
        assert spooled(state) == []
        events = [log["event"] for log in logs]
        assert events.count("telegram_spool_already_delivered") == 1
        # Attached while it ran (each word once), or read back once it ended.
        assert events.count("run_recovered") == (0 if still_running else 1)

    on_asyncio(main)


def test_a_spooled_message_the_daemon_took_is_found_after_a_compaction(
    shared_daemon, short_tmp, monkeypatch: pytest.MonkeyPatch
) -> None:
    chat = fresh_chat()
    state = short_tmp / "state"
    # The history is read back from its end, a window of 1, 2, 4... entries at a time.
    monkeypatch.setattr(_bridge, "_REPLAY_WINDOW", 1)

    async def main() -> None:
        async with serving(FakeBotAPI()) as fake:
            async with (
                connect(shared_daemon.socket_path) as client,
                client.stream("assistant", "just once", sender=f"tg:{chat}") as answer,
            ):
                await answer.collect()  # the same text, said before: not the spooled message
            fake.push_message(chat, USER, "just once")
            spool = await anyio.to_thread.run_sync(Spool.open, state / SPOOL)
            await spool.add(Spooled(update_id=fake.last_update_id, chat_id=chat, text="just once"))
            await spool.sent(fake.last_update_id, datetime.now(UTC))
            spool.close()
            async with connect(shared_daemon.socket_path) as client:
                async with client.stream("assistant", "just once", sender=f"tg:{chat}") as answer:
                    await answer.collect()
                await client.compact("assistant", f"tg:{chat}")  # archives their entries
            with capture_logs() as logs:
                async with polling(shared_daemon, fake, state):
                    # Its answer, read back from the archived entries.
                    await fake.wait_for(lambda: fake.texts(chat) == ["just once"])
                    fake.push_message(chat, USER, "last")
                    await fake.wait_for(lambda: fake.texts(chat) == ["just once", "last"])
        users = await user_messages(shared_daemon, chat)
        assert users == ["just once", "just once", "last"]
        events = [log["event"] for log in logs]
        assert events.count("telegram_spool_already_delivered") == 1

    on_asyncio(main)


def test_a_replay_whose_check_fails_still_sends_and_holds_up_nothing(
    shared_daemon, short_tmp, monkeypatch: pytest.MonkeyPatch
) -> None:
    chat = fresh_chat()
    state = short_tmp / "state"

    async def broken(self: Bridge, *args: object) -> None:
        raise RuntimeError("the check broke")

    monkeypatch.setattr(Bridge, "_delivered", broken)

    async def main() -> None:
        async with serving(FakeBotAPI()) as fake:
            fake.push_message(chat, USER, "spooled")
            spool = await anyio.to_thread.run_sync(Spool.open, state / SPOOL)
            await spool.add(Spooled(update_id=fake.last_update_id, chat_id=chat, text="spooled"))
            await spool.sent(fake.last_update_id, datetime.now(UTC))
            spool.close()
            with capture_logs() as logs:
                async with polling(shared_daemon, fake, state):
                    await fake.wait_for(lambda: fake.texts(chat) == ["spooled"])
                    fake.push_message(chat, USER, "next")  # its ticket comes after the replay's
                    await fake.wait_for(lambda: fake.texts(chat) == ["spooled", "next"])
        assert [log["event"] for log in logs].count("telegram_task_failed") == 1

    on_asyncio(main)


#: The spool of the fake Bot API's bot.
SPOOL = f"spool-{BOT_USER['id']}.jsonl"


class SpoolWatch:
    """The changes the bridges make to their spools, to wait for one: a message
    leaves the spool only after its answer is shown, a call later than the one
    the chat shows it by."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self._last: Spool | None = None  # the spool changed last
        self._writing = 0
        self._changed: anyio.Event | None = None
        record = Spool._record

        async def recorded(spool: Spool, line: Any) -> None:
            self._last = spool
            self._writing += 1
            try:
                await record(spool, line)
            finally:
                self._writing -= 1
                if self._changed is not None:
                    self._changed.set()

        monkeypatch.setattr(Spool, "_record", recorded)

    async def emptied(self) -> None:
        """Return once the spool changed last holds nothing, every line written."""
        while self._last is None or self._last.pending or self._writing:
            self._changed = anyio.Event()
            await self._changed.wait()


@pytest.fixture
def spool_watch(monkeypatch: pytest.MonkeyPatch) -> SpoolWatch:
    return SpoolWatch(monkeypatch)


def spooled(state: Path) -> list[Spooled]:
    spool = Spool.open(state / SPOOL)
    spool.close()
    return spool.pending
