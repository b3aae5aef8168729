"""`chinwag top` on a pseudo-terminal of 80x24, against a real daemon on the echo model.

What it writes goes through test_cli_chat's `Screen`, taught the cursor moves of
the alternate screen, so the assertions see what a person would see now: a run
shown while it is in flight and gone once it ends, not any frame drawn earlier.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable

from test_cli import CHINWAG, Terminal, chinwag, fresh_sender
from test_cli_chat import Screen


class FullScreen(Screen):
    """`Screen`, and the cursor placed by row and column, as a full-screen redraw does."""

    def _csi(self, params: str, command: str) -> None:
        if command == "H":
            row, _, col = params.partition(";")
            self.row = int(row or 1) - 1
            self.col = int(col or 1) - 1
        else:
            super()._csi(params, command)


class TopTerminal(Terminal):
    """A colour terminal of 80 columns by 24 lines."""

    def __init__(self, argv: list[str]) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR")}
        env.update(TERM="xterm-256color", COLUMNS="80", LINES="24")
        self.screen = FullScreen()
        super().__init__(argv, env)

    def _received(self, text: str) -> None:
        self.screen.feed(text)

    def _shown(self) -> str:
        return self.screen.text()

    def shows(self, what: str, seen: Callable[[list[str]], bool], timeout: float = 20.0) -> str:
        """The screen once ``seen(its lines)``; fails naming ``what`` after ``timeout`` s.

        Polls the pty with a deadline: another process's output has no event to await.
        """
        deadline = time.monotonic() + timeout
        while not seen(self.screen.text().splitlines()):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._read(remaining):
                raise AssertionError(f"the screen never showed {what}:\n{self.screen.text()}")
        return self.screen.text()


def test_top_shows_a_run_in_flight_its_end_an_error_and_the_daemon_going_away(daemon) -> None:
    sender, failing = fresh_sender(), fresh_sender()
    socket = str(daemon.socket_path)
    term = TopTerminal([CHINWAG, "--socket", socket, "top", "--refresh", "0.2"])
    asker: subprocess.Popen[str] | None = None
    try:
        term.shows("the counters", lambda lines: any("connections" in line for line in lines))

        # A run that waits for an answer stays in flight until the test gives one.
        asker = subprocess.Popen(
            [CHINWAG, "--socket", socket, "send", "--sender", sender, "assistant", "/ask Colour?"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        screen = term.shows(
            "the run asking, and counted",
            lambda lines: (
                any(line.startswith("runs 1 in flight") for line in lines)
                and any(line.split()[:3] == ["assistant", sender, "asking"] for line in lines)
            ),
        )
        assert all(len(line) <= 80 for line in screen.splitlines()), screen
        out, err = asker.communicate("teal\n", timeout=30)
        assert (asker.returncode, out) == (0, "teal\n"), err
        term.shows("the run gone", lambda lines: not any(sender in line for line in lines))

        result = chinwag(daemon.socket_path, "send", "--sender", failing, "assistant",
                         "/fail boom on purpose")  # fmt: skip
        assert result.returncode == 1, result
        screen = term.shows(
            "the failed run",
            lambda lines: any(
                line.split()[1:5] == ["assistant", failing, "502", "boom"] for line in lines
            ),
        )
        assert "recent errors" in screen

        daemon.stop()
        # First the connection closed; then, trying again, nobody listens.
        term.shows(
            "the daemon gone, and why",
            lambda lines: (
                any("the daemon went away" in line for line in lines)
                and f"no daemon is listening on {socket}" in " ".join(" ".join(lines).split())
            ),
        )
        daemon.start()
        screen = term.shows(
            "the daemon back",
            lambda lines: any(line.startswith("runs 0 in flight") for line in lines),
        )
        assert "went away" not in screen
        assert failing in screen  # the errors outlive the connection they came over

        term.type("q")
        assert term.wait() == 0, term.screen.text()
    finally:
        if asker is not None and asker.poll() is None:
            asker.kill()
            asker.wait()
        term.close()
    assert "Traceback" not in term.raw


def test_top_without_a_daemon_fails_in_one_line(short_tmp) -> None:
    term = TopTerminal([CHINWAG, "--socket", str(short_tmp / "none.sock"), "top"])
    try:
        assert term.wait() == 1
    finally:
        term.close()
    nobody = f'no daemon is listening on {short_tmp / "none.sock"}; start one with "chinwag serve"'
    assert term.output == f"chinwag: {nobody}\n"
