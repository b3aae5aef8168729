"""run_command's containment: what a command leaves behind is killed, it sees a scrubbed
environment, and, with `sandbox = "bwrap"`, it writes only its cwd and reaches no network.

Real processes, so no autojump clock (it would jump while they run): timeouts
are short real ones, and every wait is bounded.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import pytest
import trio
from chinwag.daemon import _command, _reaper
from chinwag.daemon._config import ConfigError, load_config
from chinwag.daemon._tools import TOOL_NAMES
from deadlines import until
from runtime_harness import submit
from workspace_harness import alive, call, runtime, temporary_area, tool, written

# A child that leaves the command's session and process group: killing the group misses it.
# It writes its own pid (`$$` of the shell that then becomes `sleep`) before it sleeps.
ESCAPEE = (
    "setsid sh -c 'echo $$ > child; exec sleep 300' </dev/null >/dev/null 2>&1 & "
    "until [ -s child ]; do sleep 0.01; done"
)


@pytest.fixture
def area() -> Iterator[Path]:
    with temporary_area() as root:
        yield root
        # A test that fails leaves its escapee running: end it here, not 300 s later.
        with suppress(FileNotFoundError, ValueError, ProcessLookupError):
            os.kill(int((root / "ws" / "child").read_text()), signal.SIGKILL)


def child_of(area: Path) -> int:
    return int((area / "ws" / "child").read_text())


# --- what a command leaves behind ------------------------------------------------


async def test_a_setsid_child_is_gone_once_the_command_ends(area):
    async with runtime(area) as rt:
        result = await call(rt, area, "run_command", command=ESCAPEE)
        assert (result.is_error, result.output) == (False, "[exit code 0]")
        await until(lambda: not alive(child_of(area)), "the command's child to die")


async def test_a_setsid_child_is_gone_after_a_timeout(area):
    async with runtime(area) as rt:
        result = await call(rt, area, "run_command", command=f"{ESCAPEE}; sleep 30", timeout_s=1)
        assert result.is_error and "timed out after 1 s" in result.output
        await until(lambda: not alive(child_of(area)), "the command's child to die")


async def test_a_setsid_child_is_gone_after_a_kill(area):
    async with runtime(area) as rt:
        sink = submit(rt, tool("run_command", command=f"{ESCAPEE}; echo > ready; sleep 30"),
                      cwd=str(area / "ws"))  # fmt: skip
        await until(lambda: written(area / "ws" / "ready"), "the command to say it is ready")
        child = child_of(area)
        assert alive(child)
        await rt.kill("assistant", "user", everything=False)
        assert sink.end.status == "killed"
        await until(lambda: not alive(child), "the command's child to die")


async def test_a_command_that_kills_its_keeper_leaves_nothing_behind(area):
    """The daemon is a subreaper: what a killed reaper leaves comes to it, and it ends that."""
    # $PPID is what started bash; never the daemon itself (a test must not kill pytest).
    command = f'{ESCAPEE}; [ "$PPID" != {os.getpid()} ] && kill -9 "$PPID"; sleep 30'
    async with runtime(area) as rt:
        with trio.fail_after(10):
            result = await call(rt, area, "run_command", command=command)
        assert result.is_error
        await until(lambda: not alive(child_of(area)), "the command's child to die")


def test_the_commands_shell_dies_with_its_reaper(tmp_path):
    """PR_SET_PDEATHSIG: the reaper killed outright, its command is killed by the kernel."""
    reaper = subprocess.Popen(
        [sys.executable, "-I", "-S", _reaper.__file__, str(os.getpid()), "2",
         "sh", "-c", "echo $$ > shell; exec sleep 300"],
        cwd=tmp_path,
    )  # fmt: skip
    shell = tmp_path / "shell"
    try:
        deadline = time.monotonic() + 10
        while not written(shell):
            assert time.monotonic() < deadline, "the command did not start"
            time.sleep(0.01)  # another process's file: no event to await
        command = int(shell.read_text())
        reaper.kill()
        reaper.wait(10)
        while alive(command):
            assert time.monotonic() < deadline + 10, "the command outlived its reaper"
            time.sleep(0.01)
    finally:
        reaper.kill()
        reaper.wait(10)
        with suppress(FileNotFoundError, ProcessLookupError):
            os.kill(int(shell.read_text()), signal.SIGKILL)


async def test_without_a_reaper_the_process_group_is_killed(area, monkeypatch):
    """Where there are no child subreapers (not Linux), the command's group is what ends."""
    monkeypatch.setattr(_command._keeper, "subreaper", False)
    async with runtime(area) as rt:
        result = await call(rt, area, "run_command", command="sleep 30 & echo $! > child")
        assert result.output == "[exit code 0]"
        await until(lambda: not alive(child_of(area)), "the command's child to die")


# --- the environment -------------------------------------------------------------

PLANTED = {
    "CHINWAG_PLANTED": "planted-chinwag-value",
    "OPENAI_API_KEY": "sk-planted-provider-key",
    "XDG_RUNTIME_DIR": "/run/planted-runtime-dir",
    "LISTEN_FDNAMES": "planted-listen-name",
    "DEPLOY_TOKEN": "planted-deploy-token",
}


async def test_a_secret_in_the_daemons_environment_is_not_the_commands(area, monkeypatch):
    for name, value in PLANTED.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("LANG", "C.UTF-8")
    async with runtime(area) as rt:
        result = await call(rt, area, "run_command", command="env")
    seen = dict(line.split("=", 1) for line in result.output.splitlines()[:-1] if "=" in line)
    assert not set(PLANTED.values()) & set(seen.values()), seen
    assert seen["LANG"] == "C.UTF-8" and seen["PATH"] == os.environ["PATH"]
    assert seen["HOME"] == os.environ["HOME"]


async def test_the_agents_env_is_the_commands(area, monkeypatch):
    monkeypatch.setenv("GREETING", "from the daemon")
    env = {"GREETING": "from the config", "PATH": "/usr/bin:/bin"}
    async with runtime(area, assistant={"env": env}) as rt:
        result = await call(rt, area, "run_command", command='echo "$GREETING $PATH"')
    assert result.output == "from the config /usr/bin:/bin\n[exit code 0]"


@pytest.mark.parametrize(
    "name", ["CHINWAG_SOCKET", "XDG_RUNTIME_DIR", "LISTEN_FDS", "OPENAI_API_KEY"]
)
def test_an_agents_env_may_not_name_what_the_daemon_keeps(area, monkeypatch, name):
    config = area / "config.toml"
    config.write_text(f"""
[providers.gpt]
kind = "openai"
api_key_env = "OPENAI_API_KEY"

[agents.worker]
provider = "echo"
env = {{ {name} = "x" }}
""")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")  # the provider's own check passes
    with pytest.raises(ConfigError, match=rf"\[agents.worker\] env sets {name}, which") as err:
        load_config(config, tool_names=TOOL_NAMES)
    assert str(err.value).endswith(".") and "\n" not in str(err.value)


def test_an_agents_env_may_not_hand_out_a_providers_key(area):
    config = area / "config.toml"
    config.write_text("""
[providers.gpt]
kind = "openai"
api_key = "sk-configured-key"

[agents.worker]
provider = "echo"
env = { HELPER_TOKEN = "sk-configured-key" }
""")
    with pytest.raises(ConfigError, match=r"env sets HELPER_TOKEN to a provider's key, which"):
        load_config(config, tool_names=TOOL_NAMES)


# --- the sandbox -------------------------------------------------------------------


@pytest.fixture
def bwrap() -> None:
    """Skips where bubblewrap cannot run, but fails under CI=true, which installs it."""
    from chinwag.daemon._command import sandbox_problem

    if (problem := sandbox_problem("bwrap")) is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(problem)
        pytest.skip(problem)


def running(marker: str) -> bool:
    """Whether a live process has ``marker`` in its command line (pids differ in a sandbox)."""
    for entry in Path("/proc").iterdir():
        with suppress(OSError):
            if entry.name.isdigit() and marker.encode() in (entry / "cmdline").read_bytes():
                return alive(int(entry.name))
    return False


async def test_a_sandboxed_command_writes_its_cwd_and_nothing_else(area, bwrap):
    command = (
        "echo mine > mine.txt; echo x > ../outside/new.txt; echo x > ../made.txt; "
        "cat ../outside/secret.txt; touch /usr/chinwag-sandbox-probe; ls -A $HOME; true"
    )
    async with runtime(area, assistant={"sandbox": "bwrap"}) as rt:
        result = await call(rt, area, "run_command", command=command)
    assert (area / "ws" / "mine.txt").read_text() == "mine\n"
    assert sorted(os.listdir(area)) == ["outside", "ws"]
    assert os.listdir(area / "outside") == ["secret.txt"]
    assert "top secret" not in result.output
    assert "Read-only file system" in result.output
    assert not await trio.Path("/usr/chinwag-sandbox-probe").exists()


async def test_a_sandboxed_command_reaches_no_network_unless_configured(area, bwrap):
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        command = f"exec 3<>/dev/tcp/127.0.0.1/{port} && echo connected"
        async with runtime(area, assistant={"sandbox": "bwrap"}) as rt:
            cut_off = await call(rt, area, "run_command", command=command)
        networked = {"sandbox": "bwrap", "sandbox_network": True}
        async with runtime(area, assistant=networked) as rt:
            connected = await call(rt, area, "run_command", command=command)
    assert cut_off.is_error and "connected" not in cut_off.output
    assert (connected.is_error, connected.output) == (False, "connected\n[exit code 0]")


async def test_a_sandboxed_commands_setsid_child_is_gone_once_it_ends(area, bwrap):
    marker = f"300.{os.getpid()}"
    command = f"setsid sleep {marker} </dev/null >/dev/null 2>&1 & sleep 0.2; echo started"
    async with runtime(area, assistant={"sandbox": "bwrap"}) as rt:
        sink = submit(rt, tool("run_command", command=command), cwd=str(area / "ws"))
        await until(lambda: running(marker) or sink.ended.is_set(), "the sandboxed child to run")
        await sink.finished(within=30)
    assert sink.result.output == "started\n[exit code 0]"
    await until(lambda: not running(marker), "the sandboxed child to be gone")


def test_the_bwrap_command_line(tmp_path, monkeypatch):
    from chinwag.daemon._command import bwrap_argv

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    argv = bwrap_argv("/srv/project", network=False, read_only=["/opt/tools"])
    assert argv[0].endswith("bwrap") and argv[1:4] == ["--ro-bind", "/", "/"]
    pairs = list(itertools.pairwise(argv))
    assert ("--tmpfs", "/tmp") in pairs and ("--tmpfs", str(home)) in pairs
    assert argv.index("--tmpfs") < argv.index("--bind"), "the cwd is bound after what hides"
    at = argv.index("--bind")
    assert argv[at : at + 5] == [
        "--bind",
        "/srv/project",
        "/srv/project",
        "--chdir",
        "/srv/project",
    ]
    at = argv.index("/opt/tools") - 1
    assert argv[at : at + 3] == ["--ro-bind-try", "/opt/tools", "/opt/tools"]
    for flag in ("--unshare-all", "--die-with-parent", "--new-session"):
        assert flag in argv
    assert "--share-net" not in argv and argv[-1] == "--"
    assert "--share-net" in bwrap_argv("/srv/project", network=True, read_only=[])


def _config_with_sandbox(area: Path, table: str) -> Path:
    config = area / "config.toml"
    config.write_text(f"""
[daemon]
allowed_roots = ["{area / "ws"}"]

[agents.worker]
provider = "echo"
tools = ["run_command"]
{table}
""")
    return config


def test_a_sandbox_this_machine_cannot_run_is_refused_at_load(area, monkeypatch):
    empty = area / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    config = _config_with_sandbox(area, 'sandbox = "bwrap"')
    with pytest.raises(ConfigError) as err:
        load_config(config, tool_names=TOOL_NAMES)
    assert str(err.value) == (
        f'{config}: [agents.worker] sets sandbox = "bwrap", but bubblewrap (bwrap) is not '
        "on the daemon's PATH; install it (e.g. apt install bubblewrap) or remove the key."
    )
    broken = empty / "bwrap"
    broken.write_text(
        "#!/bin/sh\necho 'bwrap: setting up uid map: Permission denied' >&2\nexit 1\n"
    )
    broken.chmod(0o755)
    with pytest.raises(ConfigError) as err:
        load_config(config, tool_names=TOOL_NAMES)
    assert str(err.value) == (
        f'{config}: [agents.worker] sets sandbox = "bwrap", but bubblewrap cannot make a '
        "sandbox here (bwrap: setting up uid map: Permission denied)."
    )


def test_sandbox_keys_without_the_sandbox_are_refused(area):
    config = _config_with_sandbox(area, "sandbox_network = true")
    with pytest.raises(ConfigError, match=r"sets sandbox_network, which only sandbox = \"bwrap\""):
        load_config(config, tool_names=TOOL_NAMES)
