"""`chinwag telegram` itself: its options, its environment, and a clean stop on SIGTERM."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import anyio
from chinwag.clients.cli import cli
from chinwag.clients.telegram._spool import Spool
from click.testing import CliRunner
from fake_bot_api import BOT_USER, FakeBotAPI

USER = 1111


def bridge_command(socket_path: Path, fake: FakeBotAPI, state_dir: Path) -> list[str]:
    """`chinwag telegram` against ``fake``, its token in $BOT_TOKEN."""
    return [
        sys.executable,
        "-m",
        "chinwag.clients.cli",
        "--socket",
        str(socket_path),
        "telegram",
        "--token-env",
        "BOT_TOKEN",
        "--api-url",
        fake.base_url,
        "--state-dir",
        str(state_dir),
    ]


def test_an_empty_token_variable_is_refused_in_one_line() -> None:
    result = CliRunner().invoke(
        cli, ["telegram", "--token-env", "CHINWAG_TEST_NO_TOKEN"], env={"CHINWAG_TEST_NO_TOKEN": ""}
    )
    assert result.exit_code == 1
    assert "$CHINWAG_TEST_NO_TOKEN is empty" in result.output
    assert "Traceback" not in result.output


def test_the_command_bridges_a_chat_and_stops_cleanly_on_sigterm(shared_daemon, short_tmp) -> None:
    chat = 9001
    log_path = short_tmp / "bridge.log"

    async def main() -> None:
        with anyio.fail_after(20):
            await bridge_then_stop()

    async def bridge_then_stop() -> None:
        fake = FakeBotAPI()
        env = dict(os.environ, BOT_TOKEN=fake.token, CHINWAG_TELEGRAM_ALLOW=f"2222 {USER}")
        async with anyio.create_task_group() as server:
            await server.start(fake.serve)
            command = bridge_command(shared_daemon.socket_path, fake, short_tmp / "state")
            with log_path.open("wb") as log:
                process = await anyio.open_process(command, env=env, stdout=log, stderr=log)
                async with process:
                    fake.push_message(chat, USER, "hello from the command")
                    await fake.wait_for(lambda: fake.texts(chat) == ["hello from the command"])
                    process.send_signal(signal.SIGTERM)
                    assert await process.wait() == 0, log_path.read_text()
            # Stopping confirmed the update it had taken: a restart will not take it again.
            last_poll = fake.calls_to("getUpdates")[-1]
            assert int(last_poll.params["offset"]) > fake.last_update_id
            assert last_poll.params["timeout"] == "0"
            server.cancel_scope.cancel()
        assert "telegram_bridge_stopping" in log_path.read_text()

    anyio.run(main, backend="asyncio")


def test_a_corrupt_spool_stops_the_command_in_one_line_naming_file_and_line(
    shared_daemon, short_tmp
) -> None:
    spool = short_tmp / "state" / f"spool-{BOT_USER['id']}.jsonl"
    spool.parent.mkdir()
    spool.write_bytes(b'{"op":"done","update_id":1}\nnot json\n')

    async def main() -> None:
        fake = FakeBotAPI()
        env = dict(os.environ, BOT_TOKEN=fake.token)
        async with anyio.create_task_group() as server:
            await server.start(fake.serve)
            command = bridge_command(shared_daemon.socket_path, fake, spool.parent)
            with anyio.fail_after(20):
                result = await anyio.run_process(command, env=env, check=False)
            server.cancel_scope.cancel()
        stderr = result.stderr.decode()
        assert result.returncode == 1, stderr
        assert f"chinwag: {spool}:2: the spool does not parse" in stderr
        assert "Traceback" not in stderr
        assert not fake.calls_to("getUpdates")  # nothing was taken from Telegram

    anyio.run(main, backend="asyncio")


def test_a_second_bridge_on_the_same_spool_stops_in_one_line_naming_the_lock(
    shared_daemon, short_tmp
) -> None:
    state = short_tmp / "state"
    lock = state / f"spool-{BOT_USER['id']}.lock"

    async def main() -> None:
        fake = FakeBotAPI()
        env = dict(os.environ, BOT_TOKEN=fake.token)
        # As the bridge already running would: it holds the lock while it runs.
        held = Spool.open(state / f"spool-{BOT_USER['id']}.jsonl")
        try:
            async with anyio.create_task_group() as server:
                await server.start(fake.serve)
                command = bridge_command(shared_daemon.socket_path, fake, state)
                with anyio.fail_after(20):
                    result = await anyio.run_process(command, env=env, check=False)
                server.cancel_scope.cancel()
        finally:
            held.close()
        stderr = result.stderr.decode()
        assert result.returncode == 1, stderr
        (line,) = stderr.splitlines()
        assert line.startswith("chinwag: another bridge holds") and str(lock) in line
        assert not fake.calls_to("getUpdates")  # nothing was taken from Telegram

    anyio.run(main, backend="asyncio")


def test_after_a_kill_9_mid_answer_the_next_start_completes_the_same_message(
    shared_daemon, short_tmp
) -> None:
    chat = 9002
    full = " ".join(str(word) for word in range(1, 41))
    log_path = short_tmp / "bridge.log"

    async def main() -> None:
        with anyio.fail_after(30):
            await kill_then_restart()

    async def kill_then_restart() -> None:
        fake = FakeBotAPI()
        env = dict(os.environ, BOT_TOKEN=fake.token, CHINWAG_TELEGRAM_ALLOW=str(USER))
        async with anyio.create_task_group() as server:
            await server.start(fake.serve)
            command = bridge_command(shared_daemon.socket_path, fake, short_tmp / "state")
            with log_path.open("wb") as log:
                async with await anyio.open_process(command, env=env, stderr=log) as process:
                    fake.push_message(chat, USER, "/slow 40 100")  # 4 s
                    # An edit: the answer's message was sent, and its id spooled.
                    await fake.wait_for(lambda: fake.calls_to("editMessageText", chat))
                    process.kill()
                    await process.wait()
                [(answer_id, half)] = fake.chats[chat].items()
                assert half.visible != full
                async with await anyio.open_process(command, env=env, stderr=log) as process:
                    await fake.wait_for(lambda: fake.texts(chat)[-1:] == [full])
                    process.send_signal(signal.SIGTERM)
                    assert await process.wait() == 0, log_path.read_text()
            server.cancel_scope.cancel()
        # Completed in the message the killed bridge left half written: edited, none sent.
        assert fake.texts(chat) == [full]
        assert len(fake.calls_to("sendMessage", chat)) == 1
        assert fake.calls_to("editMessageText", chat)[-1].params["message_id"] == str(answer_id)

    anyio.run(main, backend="asyncio")
