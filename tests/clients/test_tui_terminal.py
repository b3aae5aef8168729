"""`chinwag tui` run for real in a pseudo-terminal, against a real daemon on the echo model.

The screen is read as test_cli_top reads `chinwag top`'s: what a person would see now.
"""

from __future__ import annotations

import fcntl
import os
import struct
import termios

from test_cli import CHINWAG, Terminal, chinwag, fresh_sender
from test_cli_top import FullScreen, TopTerminal

COLUMNS, LINES = 120, 36


class TuiTerminal(TopTerminal):
    """A colour terminal of `COLUMNS` by `LINES`, its size set as a terminal sets it."""

    def __init__(self, argv: list[str]) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR")}
        env.update(TERM="xterm-256color", COLUMNS=str(COLUMNS), LINES=str(LINES))
        self.screen = FullScreen()
        Terminal.__init__(self, argv, env)
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", LINES, COLUMNS, 0, 0))


def test_tui_lists_conversations_streams_a_message_and_quits(daemon) -> None:
    sender = fresh_sender()
    result = chinwag(daemon.socket_path, "send", "--sender", sender, "assistant", "/title Seen")
    assert result.returncode == 0, result
    term = TuiTerminal([CHINWAG, "--socket", str(daemon.socket_path), "tui",
                        "--agent", "assistant", "--sender", sender])  # fmt: skip
    try:
        term.shows(
            "the conversation in the list",
            lambda lines: any(sender in line and "Seen" in line for line in lines),
        )
        term.type("hello from a terminal\r")
        term.shows(
            "the message and its echo",
            lambda lines: sum("hello from a terminal" in line for line in lines) == 2,
        )
        term.type("\x11")  # Ctrl-Q
        assert term.wait() == 0, term.screen.text()
    finally:
        term.close()
    assert "Traceback" not in term.raw
