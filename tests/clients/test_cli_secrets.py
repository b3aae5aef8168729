"""A configured key shows nowhere: not in the daemon's log, on a terminal or not, not in
what `chinwag send` prints of a provider's failure, not in `chinwag doctor`'s report.

The daemon is a real `chinwag serve` with one `openai` provider whose key is in
`api_key`, and a second one in its `base_url` (`http://user:key@host`). Its
server is not there, so every request fails; and a provider bug, injected by
`provider_bug/sitecustomize.py` for the model ``buggy``, crashes a run with a
traceback through a frame that holds the key, as the SDK's own frames do.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from test_cli import CHINWAG, Terminal, closed_port, wait_listening

FAULTS = Path(__file__).resolve().parent / "provider_bug"

KEY = f"sk-test-{secrets.token_hex(12)}"
URL_KEY = f"urlkey{secrets.token_hex(12)}"


def config(root: Path) -> Path:
    path = root / "config.toml"
    path.write_text(f"""
[daemon]
shutdown_grace_s = 2.0

[providers.remote]
kind = "openai"
base_url = "http://chinwag:{URL_KEY}@127.0.0.1:{closed_port()}/v1"
api_key = "{KEY}"
max_retries = 0
timeout_s = 5

[agents.buggy]
provider = "remote"
model = "buggy"

[agents.unreachable]
provider = "remote"
model = "gpt-test"
""")
    return path


def terminal_env(**more: str) -> dict[str, str]:
    # Wide, so that no line a key could be on is wrapped.
    return dict(os.environ, NO_COLOR="1", COLUMNS="250", LINES="50", TERM="xterm", **more)


@dataclass
class Served:
    """A `chinwag serve` on a terminal or on a pipe; everything it wrote, once stopped."""

    socket_path: Path
    config_path: Path
    on_terminal: bool
    terminal: Terminal | None = None
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path = field(default_factory=Path)

    def run(self, argv: list[str], env: dict[str, str] | None = None) -> tuple[int, str]:
        """Run a command to its end, draining the daemon's terminal meanwhile (a full
        pty would block the daemon's next log line): its status and all it wrote."""
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 60
        while proc.poll() is None:
            assert time.monotonic() < deadline, f"{argv} did not exit"
            if self.terminal is not None:
                self.terminal.drain(0.05)
            else:
                time.sleep(0.05)  # another process's exit: no event to await
        assert proc.stdout is not None
        return proc.returncode, proc.stdout.read().decode()

    def stop(self) -> str:
        if self.terminal is not None:
            os.kill(self.terminal.pid, signal.SIGTERM)
            assert self.terminal.wait() == 0, self.terminal.output
            return self.terminal.output
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(15) == 0
        return self.log_path.read_text()


@pytest.fixture(params=["terminal", "pipe"])
def served(request: pytest.FixtureRequest, short_tmp: Path) -> Iterator[Served]:
    config_path = config(short_tmp)
    sock = short_tmp / "chinwag.sock"
    argv = [CHINWAG, "serve", "--config", str(config_path), "--socket", str(sock)]
    argv += ["--storage", "memory:"]
    faults = {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(FAULTS), os.environ.get("PYTHONPATH")]))
    }
    env = terminal_env(**faults, CHINWAG_TEST_PROVIDER_BUG="1")
    served = Served(sock, config_path, request.param == "terminal")
    if served.on_terminal:
        served.terminal = Terminal(argv, env=env)
        served.terminal.expect("daemon_started")
    else:
        served.log_path = short_tmp / "daemon.log"
        with served.log_path.open("ab") as log:
            served.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        wait_listening(sock, served.proc)
    try:
        yield served
    finally:
        if served.terminal is not None:
            served.terminal.close()
        if served.proc is not None and served.proc.poll() is None:
            served.proc.kill()
            served.proc.wait(10)


def doctor_output(served: Served) -> str:
    argv = [CHINWAG, "--socket", str(served.socket_path), "doctor"]
    argv += ["--config", str(served.config_path)]
    if served.on_terminal:
        terminal = Terminal(argv, env=terminal_env())
        try:
            assert terminal.wait(60) == 1, terminal.output  # the agents' checks fail
            return terminal.output
        finally:
            terminal.close()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done
    return done.stdout + done.stderr


def assert_no_key(text: str, what: str) -> None:
    for secret in (KEY, URL_KEY):
        assert secret not in text, f"{what} shows a key:\n{text}"
        assert secret not in "".join(text.split()), f"{what} shows a key, wrapped:\n{text}"


def test_no_key_in_any_log_line_nor_in_what_the_cli_prints(served: Served) -> None:
    send = [CHINWAG, "--socket", str(served.socket_path), "send"]
    status, crashed = served.run([*send, "buggy", "hi"])
    assert status == 1 and "error 500" in crashed, crashed
    status, failed = served.run([*send, "unreachable", "hi"])
    assert status == 1 and "error 502" in failed and "127.0.0.1" in failed, failed
    doctor = doctor_output(served)
    assert "agent unreachable" in doctor and "127.0.0.1" in doctor, doctor
    logged = served.stop()
    # The failures were logged, the crash with its traceback: the test saw what it checks.
    assert "run_crashed" in logged and "an injected provider bug" in logged, logged
    assert "provider_failed" in logged, logged
    assert_no_key(logged, "the daemon's log")
    assert_no_key(crashed + failed, "chinwag send")
    assert_no_key(doctor, "chinwag doctor")
