"""`chinwag telegram` starting where it cannot work, and what its log shows of a crash.

The rest of the bridge is tested in `tests/clients/telegram/`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import anyio
from test_cli import CHINWAG, Terminal, closed_port

# The fake Bot API lives with the bridge's tests.
sys.path.insert(0, str(Path(__file__).resolve().parent / "telegram"))

TOKEN = "123456789:AAchinwagTestTokenNeverSentAnywhere0"


def test_an_unreachable_bot_api_is_one_line_and_a_failure(short_tmp: Path) -> None:
    api = f"http://chinwag:apipassword@127.0.0.1:{closed_port()}"
    argv = [CHINWAG, "--socket", str(short_tmp / "none.sock"), "telegram", "--api-url", api]
    argv += ["--state-dir", str(short_tmp / "state"), "--allow", "1"]
    done = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, TELEGRAM_BOT_TOKEN=TOKEN),
    )
    assert done.returncode == 1, done
    assert "Traceback" not in done.stderr, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("chinwag: cannot reach the Telegram Bot API at http://"), last
    assert f"127.0.0.1:{api.rsplit(':', 1)[1]}" in last, last
    for secret in (TOKEN, TOKEN.split(":")[1], "apipassword"):
        assert secret not in done.stdout + done.stderr


# The bridge's logging as `chinwag telegram` sets it up, then a task failing in a frame
# that holds the token, as python-telegram-bot's own frames do.
CRASH = f"""
import structlog
from chinwag.clients.telegram._command import _configure_logging

_configure_logging()

def send_message(token):
    raise RuntimeError("the Bot API went away")

try:
    send_message({TOKEN!r})
except RuntimeError:
    structlog.get_logger().exception("telegram_task_failed")
"""


def test_a_task_failure_on_a_terminal_shows_no_frame_locals() -> None:
    terminal = Terminal(
        [sys.executable, "-c", CRASH],
        env=dict(os.environ, NO_COLOR="1", COLUMNS="250", TERM="xterm"),
    )
    try:
        assert terminal.wait(60) == 0, terminal.output
    finally:
        terminal.close()
    assert "telegram_task_failed" in terminal.output and "the Bot API went away" in terminal.output
    assert TOKEN.split(":")[1] not in terminal.output, terminal.output


def test_a_request_telegram_refuses_at_start_is_one_line(short_tmp: Path) -> None:
    # Telegram answered (400), so "cannot reach" would be wrong; python-telegram-bot
    # counts its BadRequest among its network errors.
    from fake_bot_api import FakeBotAPI, Refusal

    refusal = "Bad Request: bad webhook: An HTTPS URL must be provided for webhook"

    async def main() -> subprocess.CompletedProcess[bytes]:
        fake = FakeBotAPI()
        fake.refuse("setWebhook", Refusal(400, refusal))
        async with anyio.create_task_group() as server:
            await server.start(fake.serve)
            argv = [CHINWAG, "--socket", str(short_tmp / "none.sock"), "telegram"]
            argv += ["--api-url", fake.base_url, "--state-dir", str(short_tmp / "state")]
            argv += ["--webhook-url", "http://bot.example.com/hook", "--port", "0"]
            env = dict(os.environ, TELEGRAM_BOT_TOKEN=fake.token)
            with anyio.fail_after(30):
                done = await anyio.run_process(argv, env=env, check=False)
            server.cancel_scope.cancel()
        return done

    done = anyio.run(main, backend="asyncio")
    stderr = done.stderr.decode()
    assert done.returncode == 1, stderr
    assert "Traceback" not in stderr, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("chinwag: the Telegram Bot API refused a request: "), last
    assert "https url must be provided" in last.lower(), last
