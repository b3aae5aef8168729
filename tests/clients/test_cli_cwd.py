"""`send --cwd` and `chat --cwd`: the runs' workspace tools work in that directory."""

from __future__ import annotations

from pathlib import Path

from test_cli import chinwag, fresh_sender


def workspace_config(root: Path) -> str:
    return f"""
[daemon]
allowed_roots = ["{root}"]

[agents.assistant]
provider = "echo"
tools = ["list_dir", "read_file"]
"""


def test_chat_and_send_run_the_tools_in_their_cwd(daemon_factory, tmp_path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("the plan is in here\n")
    daemon = daemon_factory(config=workspace_config(tmp_path))
    sender = fresh_sender()
    chat = chinwag(
        daemon.socket_path,
        "chat",
        "--plain",
        "--sender",
        sender,
        "--cwd",
        str(work),
        "assistant",
        input='/tool read_file {"path": "notes.txt"}\n',
    )
    assert chat.returncode == 0, chat.stderr
    assert "the plan is in here" in chat.stdout, chat.stdout
    sent = chinwag(
        daemon.socket_path,
        "send",
        "--cwd",
        str(work),
        "assistant",
        '/tool list_dir {"path": "."}',
    )
    assert sent.returncode == 0, sent.stderr
    assert "notes.txt" in sent.stdout + sent.stderr
    # The conversation keeps its cwd: a later chat without --cwd works there too ...
    later = chinwag(
        daemon.socket_path,
        "chat",
        "--plain",
        "--sender",
        sender,
        "assistant",
        input="/tool list_dir {}\n",
    )
    assert later.returncode == 0, later.stderr
    assert "notes.txt" in later.stdout, later.stdout
    # ... and a conversation that never had one (nor has the agent) says so, not guessing.
    bare = chinwag(
        daemon.socket_path,
        "chat",
        "--plain",
        "--sender",
        fresh_sender(),
        "assistant",
        input="/tool list_dir {}\n",
    )
    assert bare.returncode == 0, bare.stderr
    assert "no working directory" in bare.stdout, bare.stdout
