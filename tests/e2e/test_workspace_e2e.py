"""End to end: workspace tools in the real daemon, confined to allowed roots and the run's cwd."""

from __future__ import annotations

import json
import os
import signal
from contextlib import suppress
from pathlib import Path

import pytest
from chinwag.clients import ChinwagError, connect
from chinwag.protocol import End, Start, Stream, ToolCall, ToolResult
from deadlines import collect, next_of, until

CONFIG = """
[daemon]
shutdown_grace_s = 0.5
allowed_roots = ["{root}"]

[agents.worker]
provider = "echo"
tools = ["read_file", "write_file", "list_dir", "run_command"]

[agents.talker]
provider = "echo"
tools = ["set_title"]
"""


def tool(name: str, **args: object) -> str:
    return f"/tool {name} {json.dumps(args)}"


async def result_of(c, content: str, *, agent: str = "worker", cwd: str | None = None):
    async with c.stream(agent, content, cwd=cwd) as events:
        got = await collect(events)
    assert isinstance(got[-1], End) and got[-1].status == "done", got[-1]
    call = next(e for e in got if isinstance(e, ToolCall))
    result = next(e for e in got if isinstance(e, ToolResult))
    assert result.call_id == call.call_id
    return result


async def test_workspace_tools_work_in_the_cwd_and_nowhere_else(daemon_factory, short_tmp):
    ws = short_tmp / "ws"
    (ws / "project").mkdir(parents=True)
    (short_tmp / "secret.txt").write_text("not yours\n")
    daemon = daemon_factory(CONFIG.format(root=ws))
    project = str(ws / "project")
    async with connect(daemon.socket_path) as c:
        wrote = await result_of(
            c, tool("write_file", path="notes/a.txt", content="hi\n"), cwd=project
        )
        assert (wrote.output, wrote.is_error) == ("Wrote 3 bytes to notes/a.txt.", False)
        # Later runs keep the conversation's cwd without naming it again.
        listed = await result_of(c, tool("list_dir"))
        assert listed.output == "notes/"
        ran = await result_of(c, tool("run_command", command="cat notes/a.txt; pwd"))
        assert ran.output == f"hi\n{project}\n[exit code 0]"
        escape = await result_of(c, tool("read_file", path="../../secret.txt"))
        assert escape.is_error and "leads outside the working directory" in escape.output
        refused = await result_of(c, tool("read_file", path="x"), agent="talker", cwd=project)
        assert refused.is_error and "not available to this agent" in refused.output
        with pytest.raises(ChinwagError) as err:
            async with c.stream("worker", "hi", sender="other", cwd=str(short_tmp)) as events:
                await collect(events)
        assert err.value.code == 400 and "outside the allowed roots" in err.value.message
        history = await c.history("worker")
        assert history.cwd == project
    assert (ws / "project" / "notes" / "a.txt").read_text() == "hi\n"


async def test_killing_a_run_kills_its_command(daemon_factory, short_tmp):
    ws = short_tmp / "ws"
    ws.mkdir()
    daemon = daemon_factory(CONFIG.format(root=ws))
    pid_file = ws / "pid"

    def pid_written() -> bool:
        return pid_file.exists() and pid_file.read_text().endswith("\n")

    async with connect(daemon.socket_path) as c:
        command = tool("run_command", command="echo $$ > pid; exec sleep 30")
        async with c.stream("worker", command, cwd=str(ws)) as events:
            await next_of(events, Start)
            await until(pid_written, "the command to write its pid")
            await c.kill("worker")
            # The command sleeps 30 s: ended within 10, it was the kill that ended it
            # (how soon is a figure of bench/kill_latency.py).
            rest = await collect(events, within=10, what="the killed run's end")
        assert rest[-1].status == "killed"
        # Killed and reaped before the `end`.
        with pytest.raises(ProcessLookupError, match="No such process"):
            os.kill(int(pid_file.read_text()), 0)


def _gone(pid: int) -> bool:
    # Reaped, not merely killed: the reaper waits for all it kept before it exits.
    return not Path(f"/proc/{pid}").exists()


async def test_a_commands_processes_die_with_the_daemon_after_kill_9(
    daemon_factory, short_tmp, raw
):
    ws = short_tmp / "ws"
    ws.mkdir()
    daemon = daemon_factory(CONFIG.format(root=ws))
    # The shell, and a child that left its session: neither may outlive the daemon.
    command = (
        "setsid sh -c 'echo $$ > child; exec sleep 300' </dev/null >/dev/null 2>&1 & "
        "until [ -s child ]; do sleep 0.01; done; echo $$ > shell; sleep 300"
    )
    request = Stream(
        id=1, agent="worker", content=tool("run_command", command=command), cwd=str(ws)
    )
    shell = ws / "shell"
    pids: list[int] = []
    try:
        async with raw(daemon.socket_path) as conn:
            await conn.send(request)
            shell_started = lambda: shell.exists() and shell.read_text().endswith("\n")  # noqa: E731
            await until(shell_started, "the shell to write its pid")
            pids = [int((ws / name).read_text()) for name in ("child", "shell")]
            assert not any(_gone(pid) for pid in pids)
            daemon.kill9()
        await until(lambda: all(_gone(pid) for pid in pids), "the command's processes reaped")
    finally:
        for pid in pids:  # a failed test must not leave them for 300 s
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


async def test_a_command_sees_the_agents_env_and_not_the_daemons(daemon_factory, short_tmp):
    ws = short_tmp / "ws"
    ws.mkdir()
    config = CONFIG.format(root=ws).replace(
        "[agents.talker]", 'env = { GREETING = "hi" }\n\n[agents.talker]'
    )
    daemon = daemon_factory(config)
    async with connect(daemon.socket_path) as c:
        ran = await result_of(c, tool("run_command", command="env"), cwd=str(ws))
    seen = dict(line.split("=", 1) for line in ran.output.splitlines() if "=" in line)
    assert seen["GREETING"] == "hi"
    assert not [name for name in seen if name.startswith("CHINWAG_")], seen
