"""What `chinwag` imports to start: a command loads what it uses, and nothing else.

How fast it starts is measured in `bench/cli_start.py`, never here; what is
checked here is which modules a command loads, which does not depend on the
machine.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from test_cli import CHINWAG

# Run as the console script runs the CLI, in a fresh interpreter; then list what was
# loaded, as `main` exits (with os._exit, which skips the interpreter's teardown).
LOADED = """
import json, os, sys
from chinwag.clients.cli import main
sys.argv = ["chinwag", *sys.argv[1:]]
exit_now = os._exit

def report(code):
    print(json.dumps({"code": code, "modules": sorted(sys.modules)}), flush=True)
    exit_now(code)

os._exit = report
main()
"""

#: Libraries and modules that only other commands, or other kinds of replies, use.
NOT_FOR_SEND = (
    "rich",  # styling: a reply of plain text has none
    "trio",  # the daemon's; the CLI runs on asyncio
    "structlog",
    "telegram",
    "mcp",
    "chinwag.clients.telegram",
    "chinwag.clients.mcp",
    "chinwag.clients._chat",
    "chinwag.clients._live_chat",
    "chinwag.clients._doctor",
    "chinwag.clients._terminal_input",
    "click.shell_completion",
)


def loaded_by(*args: str) -> tuple[int, set[str]]:
    done = subprocess.run(
        [sys.executable, "-c", LOADED, *args], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    return report["code"], set(report["modules"])


def _under(modules: set[str], names: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == n or m.startswith(f"{n}.") for n in names))


def test_send_of_a_plain_reply_loads_no_other_command_and_no_styling(daemon) -> None:
    code, modules = loaded_by("--socket", str(daemon.socket_path), "send", "assistant", "hi")
    assert code == 0
    assert "chinwag.clients._client" in modules  # it did connect
    assert _under(modules, NOT_FOR_SEND) == []


@pytest.mark.parametrize(("command", "module"), [("telegram", "telegram"), ("mcp", "mcp")])
def test_the_bridges_load_when_named(command: str, module: str) -> None:
    listed = subprocess.run([CHINWAG, "--help"], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert f"  {command} " in listed.stdout, listed.stdout
    code, modules = loaded_by(command, "--help")
    assert code == 0
    assert f"chinwag.clients.{module}" in modules


def test_importing_the_cli_leaves_the_collector_as_it_was() -> None:
    # The CLI pauses the collector while it imports; a program that imports it as a
    # library (the tests do) must get it back running, or paused if it was.
    check = "import gc, sys; {}; import chinwag.clients.cli; print(gc.isenabled())"
    for before, expected in (("pass", "True"), ("gc.disable()", "False")):
        done = subprocess.run(
            [sys.executable, "-c", check.format(before)], capture_output=True, text=True, timeout=60
        )
        assert done.stdout.strip() == expected, done
