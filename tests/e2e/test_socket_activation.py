"""systemd socket activation: `chinwag serve` started with LISTEN_FDS serves the socket it
was passed, and leaves that socket to its owner when it stops."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import trio
from chinwag.clients import connect

CONFIG = """
[daemon]
shutdown_grace_s = 0.5

[agents.assistant]
provider = "echo"
"""

# What systemd does between fork and exec: the socket on fd 3, LISTEN_PID this process.
ACTIVATE = """
import os, sys
os.dup2(int(sys.argv[1]), 3)
os.environ["LISTEN_PID"] = str(os.getpid())
os.environ["LISTEN_FDS"] = "1"
os.execv(sys.executable, [sys.executable, "-m", "chinwag.daemon", *sys.argv[2:]])
"""


def activate(listening: socket.socket, root: Path, log) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            ACTIVATE,
            str(listening.fileno()),
            "--config",
            str(root / "config.toml"),
            "--socket",
            str(root / "not-this.sock"),
            "--storage",
            f"sqlite:///{root / 'chinwag.db'}",
        ],
        pass_fds=[listening.fileno()],
        stdout=log,
        stderr=subprocess.STDOUT,
    )


async def test_an_activated_daemon_serves_the_passed_socket_and_leaves_it(short_tmp):
    (short_tmp / "config.toml").write_text(CONFIG)
    path = short_tmp / "activated.sock"
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listening.bind(str(path))
    listening.listen(16)
    # Connecting before the daemon even starts works: systemd's socket queues us.
    with (short_tmp / "daemon.log").open("ab") as log:
        for turn in ("first start", "second start"):
            proc = activate(listening, short_tmp, log)
            try:
                with trio.fail_after(20):
                    async with connect(path) as c:
                        async with c.stream("assistant", turn) as events:
                            assert (await events.collect())[-1].status == "done"
                        history = await c.history("assistant")
                assert history.entries[-1].content == turn
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(15) == 0
            finally:
                if proc.poll() is None:
                    proc.kill()
            assert path.exists(), "the socket file stays: systemd owns it"
            assert not (short_tmp / "not-this.sock").exists()
    listening.close()
    log_text = (short_tmp / "daemon.log").read_text()
    assert log_text.count('"activated":true') == 2


def test_only_this_process_takes_the_passed_socket():
    """LISTEN_FDS meant for another process (a parent's) is ignored, and cleared."""
    env = dict(os.environ, LISTEN_PID="1", LISTEN_FDS="1")
    out = subprocess.run(
        [sys.executable, "-c", "from chinwag.daemon._server import inherited_listener as f;"
         "import os; print(f(), os.environ.get('LISTEN_FDS'))"],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert out.stdout.split() == ["None", "None"]
