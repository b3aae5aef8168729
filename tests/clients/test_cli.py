"""The `chinwag` console script, run as a subprocess against a real daemon."""

from __future__ import annotations

import codecs
import contextlib
import itertools
import os
import pty
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import msgspec
import pytest
from chinwag.clients import connect
from chinwag.protocol import (
    ConversationItem,
    End,
    Entry,
    Event,
    MemoryHit,
    ServerMsg,
    Start,
    TextDelta,
)
from deadlines import killed_after

_installed = Path(sys.executable).with_name("chinwag")
# The console script next to this interpreter, else whatever `chinwag` is on PATH.
CHINWAG = str(_installed) if _installed.exists() else (shutil.which("chinwag") or "chinwag")

_senders = itertools.count()


def fresh_sender() -> str:
    return f"cli-test-{next(_senders)}"


def chinwag(
    socket_path: Path,
    *args: str,
    input: str | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 30,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CHINWAG, "--socket", str(socket_path), *args],
        capture_output=True,
        text=True,
        input=input if input is not None else "",
        env=env,
        timeout=timeout,
    )


def closed_port() -> int:
    """A local TCP port nothing listens on (it was free a moment ago)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_listening(path: Path, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """Return once ``proc`` listens on the Unix socket ``path``; fail if it exits first.

    Polls: another process's socket has no event to await.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"{proc.args} exited with {proc.returncode}"
        with socket.socket(socket.AF_UNIX) as probe:
            if probe.connect_ex(str(path)) == 0:
                return
        time.sleep(0.02)
    raise AssertionError(f"nothing listened on {path} within {timeout:g} s")


def assert_clean_failure(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 1, result
    assert result.stderr.splitlines()[-1].startswith("chinwag: "), result.stderr
    assert "Traceback" not in result.stderr


def test_send_prints_the_echo(daemon) -> None:
    result = chinwag(daemon.socket_path, "send", "assistant", "hello from the cli")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hello from the cli\n"
    assert result.stderr == ""


def test_send_json_prints_one_event_per_line(daemon) -> None:
    sender = fresh_sender()
    result = chinwag(
        daemon.socket_path, "send", "--json", "--sender", sender, "assistant", "one two three"
    )
    assert result.returncode == 0, result.stderr
    events = [msgspec.json.decode(line, type=ServerMsg) for line in result.stdout.splitlines()]
    assert isinstance(events[0], Start)
    assert [e.delta.strip() for e in events if isinstance(e, TextDelta)] == ["one", "two", "three"]
    end = events[-1]
    assert isinstance(end, End) and end.status == "done"


def test_send_to_an_unknown_agent_fails_cleanly(daemon) -> None:
    result = chinwag(daemon.socket_path, "send", "nobody", "hi")
    assert_clean_failure(result)
    assert "404" in result.stderr


def test_send_of_a_failing_run_exits_nonzero(daemon) -> None:
    result = chinwag(
        daemon.socket_path, "send", "--sender", fresh_sender(), "assistant", "/fail boom"
    )
    assert_clean_failure(result)
    assert "502" in result.stderr and "boom" in result.stderr


def test_send_answers_an_ask_from_the_terminal(daemon) -> None:
    result = chinwag(
        daemon.socket_path,
        "send",
        "--sender",
        fresh_sender(),
        "assistant",
        "/ask Favourite colour?",
        input="teal\n",
    )
    assert result.returncode == 0, result.stderr
    assert "Favourite colour?" in result.stderr
    assert "teal" in result.stdout


def test_send_with_closed_input_cannot_answer_an_ask(daemon) -> None:
    sender = fresh_sender()
    result = chinwag(daemon.socket_path, "send", "--sender", sender, "assistant", "/ask Why?")
    assert_clean_failure(result)
    assert "chinwag reply" in result.stderr
    # The question still waits for an answer from elsewhere.
    answered = chinwag(daemon.socket_path, "reply", "--sender", sender, "assistant", "because")
    assert answered.returncode == 0, answered.stderr


def test_history(daemon) -> None:
    sender = fresh_sender()
    chinwag(daemon.socket_path, "send", "--sender", sender, "assistant", "remember me")
    result = chinwag(daemon.socket_path, "history", "--sender", sender, "assistant")
    assert result.returncode == 0, result.stderr
    assert "user: remember me" in result.stdout
    assert "assistant: remember me" in result.stdout

    as_json = chinwag(daemon.socket_path, "history", "--json", "--sender", sender, "assistant")
    entries = [msgspec.json.decode(line, type=Entry) for line in as_json.stdout.splitlines()]
    assert [(e.seq, e.role, e.content) for e in entries] == [
        (1, "user", "remember me"),
        (2, "assistant", "remember me"),
    ]


def test_history_of_an_unknown_conversation_fails_cleanly(daemon) -> None:
    assert_clean_failure(chinwag(daemon.socket_path, "history", "--sender", "nobody", "assistant"))


def test_ls(daemon) -> None:
    sender = fresh_sender()
    chinwag(daemon.socket_path, "send", "--sender", sender, "helper", "hi")
    result = chinwag(daemon.socket_path, "ls")
    assert result.returncode == 0, result.stderr
    assert "helper" in result.stdout and sender in result.stdout

    as_json = chinwag(daemon.socket_path, "ls", "--json", "--agent", "helper")
    items = [
        msgspec.json.decode(line, type=ConversationItem) for line in as_json.stdout.splitlines()
    ]
    assert [(i.agent, i.sender, i.last_seq) for i in items] == [("helper", sender, 2)]

    none = chinwag(daemon.socket_path, "ls", "--agent", "assistant")
    assert none.returncode == 0 and "no conversations" in none.stdout


def test_ls_search(daemon) -> None:
    for sender in ("Zoë", "bob", "zoe"):
        chinwag(daemon.socket_path, "send", "--sender", sender, "helper", "hi")

    found = chinwag(daemon.socket_path, "ls", "--json", "--search", "ZOË")
    assert found.returncode == 0, found.stderr
    items = [msgspec.json.decode(line, type=ConversationItem) for line in found.stdout.splitlines()]
    assert [i.sender for i in items] == ["Zoë"]
    table = chinwag(daemon.socket_path, "ls", "--search", "zo", "--agent", "helper")
    assert "Zoë" in table.stdout and "zoe" in table.stdout and "bob" not in table.stdout

    none = chinwag(daemon.socket_path, "ls", "--search", "nobody")
    assert none.returncode == 0 and none.stdout == "no conversations match 'nobody'\n"


def test_agents(daemon) -> None:
    result = chinwag(daemon.socket_path, "agents")
    assert result.returncode == 0, result.stderr
    assert "assistant" in result.stdout and "Echoes the user" in result.stdout
    assert "helper" in result.stdout


def test_kill_with_nothing_running(daemon) -> None:
    sender = fresh_sender()
    chinwag(daemon.socket_path, "send", "--sender", sender, "assistant", "hi")
    result = chinwag(daemon.socket_path, "kill", "--sender", sender, "assistant")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "nothing was running\n"
    assert_clean_failure(chinwag(daemon.socket_path, "kill", "--sender", "nobody", "assistant"))


def test_kill_stops_a_running_send(daemon) -> None:
    sender = fresh_sender()
    send = subprocess.Popen(
        [CHINWAG, "--socket", str(daemon.socket_path), "send", "--sender", sender, "assistant",
         "/slow 100 50"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert send.stdout is not None
        with killed_after(send, 15, "the first word of the run"):
            assert send.stdout.read(1) == "1"  # the run is streaming
        killed = chinwag(daemon.socket_path, "kill", "--sender", sender, "assistant")
        assert killed.returncode == 0, killed.stderr
        assert re.fullmatch(r"killed run \S+\n", killed.stdout)
        _, err = send.communicate(timeout=30)
    finally:
        if send.poll() is None:
            send.kill()
            send.wait()
    assert send.returncode == 1
    assert "chinwag: the run was killed" in err


def test_reply_with_no_question_pending_fails_cleanly(daemon) -> None:
    sender = fresh_sender()
    chinwag(daemon.socket_path, "send", "--sender", sender, "assistant", "hi")
    result = chinwag(daemon.socket_path, "reply", "--sender", sender, "assistant", "yes")
    assert_clean_failure(result)
    assert "404" in result.stderr


def _wait_for_subscribers(socket_path: Path, count: int) -> None:
    async def poll() -> None:
        async with connect(socket_path) as c:
            with anyio.fail_after(15):
                # The subscriber is another process: there is no event to await.
                while (await c.stats()).subscriptions < count:  # noqa: ASYNC110
                    await anyio.sleep(0.05)

    anyio.run(poll)


def test_tail_prints_events_until_interrupted(daemon) -> None:
    sender = fresh_sender()
    tail = subprocess.Popen(
        [CHINWAG, "--socket", str(daemon.socket_path), "tail", "--json", "--sender", sender],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _wait_for_subscribers(daemon.socket_path, 1)
        sent = chinwag(daemon.socket_path, "send", "--sender", sender, "assistant", "tailed words")
        assert sent.returncode == 0, sent.stderr
        assert tail.stdout is not None
        frames: list[Event] = []
        with killed_after(tail, 30, "tail to print the run's end"):
            while not (frames and isinstance(frames[-1].event, End)):
                frame = msgspec.json.decode(tail.stdout.readline(), type=ServerMsg)
                assert isinstance(frame, Event)
                frames.append(frame)
        tail.send_signal(signal.SIGINT)
        _, err = tail.communicate(timeout=15)
    finally:
        if tail.poll() is None:
            tail.kill()
            tail.wait()
    assert tail.returncode == 0, err
    assert "Traceback" not in err
    assert {(f.agent, f.sender) for f in frames} == {("assistant", sender)}
    assert "".join(f.event.delta for f in frames if isinstance(f.event, TextDelta)) == (
        "tailed words"
    )


def test_chat_over_a_pipe(daemon) -> None:
    sender = fresh_sender()
    result = chinwag(
        daemon.socket_path,
        "chat",
        "--sender",
        sender,
        "assistant",
        input="first line\n/title Piped\nsecond line\n",
    )
    assert result.returncode == 0, result.stderr
    assert "first line" in result.stdout
    assert "Piped" in result.stdout
    assert "second line" in result.stdout
    history = chinwag(daemon.socket_path, "history", "--json", "--sender", sender, "assistant")
    users = [
        e.content
        for e in (msgspec.json.decode(line, type=Entry) for line in history.stdout.splitlines())
        if e.role == "user"
    ]
    assert users == ["first line", "/title Piped", "second line"]


def test_chat_with_an_unknown_agent_fails_cleanly(daemon) -> None:
    result = chinwag(daemon.socket_path, "chat", "nobody", input="hi\n")
    assert_clean_failure(result)
    assert "unknown agent" in result.stderr


def test_commands_without_a_daemon_say_so(short_tmp: Path) -> None:
    socket_path = short_tmp / "nothing.sock"
    for args in (["ls"], ["history", "assistant"], ["agents"], ["kill", "assistant"]):
        result = chinwag(socket_path, *args)
        assert result.returncode == 1
        assert result.stdout == ""
        assert result.stderr == (
            f'chinwag: no daemon is listening on {socket_path}; start one with "chinwag serve"\n'
        )


@pytest.fixture
def isolated_env(short_tmp: Path) -> Iterator[dict[str, str]]:
    """An environment whose user dirs are all under a temporary directory."""
    home = short_tmp / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHINWAG_", "XDG_", "OPENAI_"))}
    env.update(
        HOME=str(home),
        XDG_DATA_HOME=str(home / "data"),
        XDG_CONFIG_HOME=str(home / "config"),
        XDG_STATE_HOME=str(home / "state"),
        XDG_CACHE_HOME=str(home / "cache"),
    )
    yield env


def _stop_pid(pid: int) -> None:
    """Stop a daemon that is not our child: SIGTERM, then wait for it to go."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return
        if state in ("Z", "X"):
            return  # exited; only the reaping is left to its new parent
        time.sleep(0.05)  # another process's exit: nothing to await
    os.kill(pid, signal.SIGKILL)


def _started(result: subprocess.CompletedProcess[str]) -> re.Match[str]:
    """The line saying a daemon was started: its pid is group 1, its log group 2."""
    match = re.search(
        r"^chinwag: started a daemon in the background \(pid (\d+), log (.+)\)$",
        result.stderr,
        re.MULTILINE,
    )
    assert match, result.stderr
    return match


def test_send_starts_a_daemon_when_none_listens(short_tmp: Path, isolated_env) -> None:
    socket_path = short_tmp / "run" / "chinwag.sock"
    result = chinwag(socket_path, "send", "assistant", "wake up", env=isolated_env)
    match = _started(result)
    pid = int(match.group(1))
    try:
        assert result.returncode == 0, result.stderr
        assert result.stdout == "wake up\n"
        assert Path(match.group(2)) == socket_path.with_name("chinwag.log")
        assert Path(match.group(2)).exists()
        # Its storage went to the isolated data dir, and it is still serving.
        assert list((short_tmp / "home" / "data").rglob("*")), "no data under XDG_DATA_HOME"
        again = chinwag(socket_path, "send", "assistant", "still there", env=isolated_env)
        assert again.returncode == 0, again.stderr
        assert again.stdout == "still there\n"
        assert "started a daemon" not in again.stderr
        history = chinwag(socket_path, "history", "--json", "assistant", env=isolated_env)
        assert len(history.stdout.splitlines()) == 4
    finally:
        _stop_pid(pid)


def test_chat_starts_a_daemon_when_none_listens(short_tmp: Path, isolated_env) -> None:
    socket_path = short_tmp / "run" / "chinwag.sock"
    result = chinwag(
        socket_path, "chat", "--plain", "assistant", input="wake up\n", env=isolated_env
    )
    match = _started(result)
    pid = int(match.group(1))
    try:
        # The pid is the daemon on our socket, so stopping it stops nothing else.
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert str(socket_path).encode() in argv, argv
        assert result.returncode == 0, result.stderr
        assert "assistant> wake up\n" in result.stdout
        assert Path(match.group(2)) == socket_path.with_name("chinwag.log")

        async def still_serving() -> list[tuple[str, str]]:
            async with connect(socket_path) as c:
                await c.ping()
                return [(e.role, e.content) for e in (await c.history("assistant")).entries]

        assert anyio.run(still_serving) == [("user", "wake up"), ("assistant", "wake up")]
    finally:
        _stop_pid(pid)


class Terminal:
    """A command on a pseudo-terminal, for what only a terminal does: Ctrl-C."""

    expect_timeout_s = 15.0

    def __init__(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        if env is None:
            env = dict(os.environ, NO_COLOR="1", COLUMNS="200", TERM="dumb")
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: become the command, whatever happens
            try:
                os.execve(argv[0], argv, env)
            finally:
                os._exit(127)
        self.raw = ""  # everything written, escapes and all
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._seen = 0

    @property
    def output(self) -> str:
        """What was written, with the terminal's line ends made plain."""
        return self.raw.replace("\r\n", "\n")

    def _searched(self) -> str:
        """What ``expect`` looks in."""
        return self.output

    def _shown(self) -> str:
        """What a failure shows."""
        return self.output

    def _received(self, text: str) -> None:
        """A hook for what the command wrote, as it comes."""

    def _read(self, timeout: float) -> bool:
        """Read what is there within ``timeout``; False once the command's terminal closed."""
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return True
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # the command exited and the terminal closed
            return False
        text = self._decoder.decode(data)
        self.raw += text
        self._received(text)
        return True

    def drain(self, timeout: float) -> None:
        """Read what the command wrote within ``timeout``: a full pty would block its writes."""
        self._read(timeout)

    def expect(self, pattern: str, timeout: float | None = None) -> None:
        """Wait until ``pattern`` appears in the output after the last match.

        Polls the pty with a deadline: output from another process has no event to await.
        """
        deadline = time.monotonic() + (timeout or self.expect_timeout_s)
        while True:
            found = re.search(pattern, self._searched()[self._seen :])
            if found:
                self._seen += found.end()
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._read(remaining):
                raise AssertionError(f"no {pattern!r} in the terminal:\n{self._shown()}")

    def type(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def wait(self, timeout: float = 15) -> int:
        """The command's exit status, once it exits by itself; what it wrote read to the end."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.pid = 0
                with contextlib.suppress(OSError):
                    while self._read(0.05) and select.select([self.fd], [], [], 0)[0]:
                        pass
                return os.waitstatus_to_exitcode(status)
            with contextlib.suppress(OSError):  # keep the terminal drained
                self._read(0.05)
        raise AssertionError(f"the command did not exit:\n{self._shown()}")

    def close(self) -> None:
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            self.pid = 0
        os.close(self.fd)


def test_chat_ctrl_c_kills_the_run_and_quits_at_the_prompt(daemon) -> None:
    sender = fresh_sender()
    term = Terminal([CHINWAG, "--socket", str(daemon.socket_path), "chat", "--sender", sender,
                     "assistant"])  # fmt: skip
    try:
        term.expect("you> ")
        term.type("/slow 200 50\n")
        term.expect(r"assistant> 1 2 ")
        term.type("\x03")
        term.expect("killing the run")
        term.expect("the run was killed")
        term.expect("you> ")
        # Ctrl-C while the agent asks kills the run too, and the abandoned
        # answer prompt hands the next line to the chat prompt.
        term.type("/ask Pick one?\n")
        term.expect(r"answer> ")
        term.type("\x03")
        term.expect("the run was killed")
        term.expect("you> ")
        term.type("and after\n")
        term.expect(r"assistant> and after\n")
        term.expect("you> ")
        term.type("\x03")
        assert term.wait() == 0, term.output
    finally:
        term.close()
    assert "Traceback" not in term.output
    history = chinwag(daemon.socket_path, "history", "--json", "--sender", sender, "assistant")
    entries = [msgspec.json.decode(line, type=Entry) for line in history.stdout.splitlines()]
    assert [(e.role, e.content) for e in entries] == [
        ("user", "/slow 200 50"),
        ("user", "/ask Pick one?"),
        ("user", "and after"),
        ("assistant", "and after"),
    ]


def test_send_as_a_guest_with_a_cwd(daemon, short_tmp: Path) -> None:
    sender = fresh_sender()
    work = short_tmp / "work"
    work.mkdir()
    first = subprocess.run(
        [CHINWAG, "--socket", str(daemon.socket_path), "send", "--sender", sender,
         "--cwd", "work", "assistant", "hi"],
        capture_output=True, text=True, cwd=short_tmp, timeout=30,
    )  # fmt: skip
    assert first.returncode == 0, first.stderr
    guest = chinwag(
        daemon.socket_path, "send", "--json", "--sender", sender, "--guest", "helper",
        "assistant", "over to you",
    )  # fmt: skip
    assert guest.returncode == 0, guest.stderr
    start = msgspec.json.decode(guest.stdout.splitlines()[0], type=ServerMsg)
    assert isinstance(start, Start) and start.agent == "helper"
    listed = chinwag(daemon.socket_path, "ls", "--json", "--agent", "assistant")
    items = [
        msgspec.json.decode(line, type=ConversationItem) for line in listed.stdout.splitlines()
    ]
    assert [(i.sender, i.cwd) for i in items] == [(sender, str(work))]
    history = chinwag(daemon.socket_path, "history", "--sender", sender, "assistant")
    assert "assistant (helper): over to you" in history.stdout


def test_send_with_queue_reject_on_a_busy_conversation(daemon) -> None:
    sender = fresh_sender()
    busy = subprocess.Popen(
        [CHINWAG, "--socket", str(daemon.socket_path), "send", "--sender", sender, "assistant",
         "/slow 100 50"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert busy.stdout is not None
        assert busy.stdout.read(1) == "1"
        refused = chinwag(
            daemon.socket_path, "send", "--queue", "reject", "--sender", sender, "assistant", "x"
        )
        assert_clean_failure(refused)
        assert "409" in refused.stderr
    finally:
        chinwag(daemon.socket_path, "kill", "--sender", sender, "assistant")
        busy.communicate(timeout=30)


def test_compact(daemon) -> None:
    sender = fresh_sender()
    chinwag(daemon.socket_path, "send", "--sender", sender, "assistant", "squash me")
    result = chinwag(daemon.socket_path, "compact", "--sender", sender, "assistant")
    assert result.returncode == 0, result.stderr
    assert (
        result.stdout
        == "archived 2 entries as archive-1-2\nuser: squash me\nassistant: squash me\n"
    )
    archived = chinwag(daemon.socket_path, "history", "--all", "--json", "--sender", sender,
                       "assistant")  # fmt: skip
    kinds = [
        msgspec.json.decode(line, type=Entry).kind for line in archived.stdout.split("\n")[:-1]
    ]
    assert kinds == ["message", "message", "compact"]

    found = chinwag(daemon.socket_path, "search", "assistant", "squash")
    assert found.returncode == 0, found.stderr
    heading, snippet = found.stdout.splitlines()
    assert heading.startswith(f"1. archive archive-1-2 ({sender}, ")
    assert snippet.startswith("   ") and "[squash] me" in snippet  # each backend cuts its own
    as_json = chinwag(daemon.socket_path, "search", "--json", "assistant", "squash")
    assert msgspec.json.decode(as_json.stdout, type=MemoryHit).name == "archive-1-2"
    nothing = chinwag(daemon.socket_path, "search", "assistant", "absent")
    assert nothing.returncode == 0 and "nothing in assistant's memory" in nothing.stdout


def test_chat_with_a_guest(daemon) -> None:
    sender = fresh_sender()
    result = chinwag(
        daemon.socket_path, "chat", "--sender", sender, "--guest", "helper", "assistant",
        input="who answers\n",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "helper> who answers" in result.stdout
    history = chinwag(daemon.socket_path, "history", "--json", "--sender", sender, "assistant")
    entries = [msgspec.json.decode(line, type=Entry) for line in history.stdout.splitlines()]
    assert [(e.role, e.agent) for e in entries] == [("user", ""), ("assistant", "helper")]


def complete(words: str, cword: int, socket_path: Path) -> subprocess.CompletedProcess[str]:
    """What bash's completion asks of `chinwag` (click's protocol) for ``words``."""
    env = dict(
        os.environ,
        _CHINWAG_COMPLETE="bash_complete",
        COMP_WORDS=words,
        COMP_CWORD=str(cword),
        CHINWAG_SOCKET=str(socket_path),
    )
    return subprocess.run([CHINWAG], env=env, capture_output=True, text=True, timeout=30)


def test_agent_names_complete_from_the_running_daemon(daemon, short_tmp: Path) -> None:
    result = complete("chinwag send a", 2, daemon.socket_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["plain,assistant"]
    assert complete("chinwag history ", 2, daemon.socket_path).stdout.splitlines() == [
        "plain,assistant",
        "plain,helper",
    ]
    # --socket on the command line wins over $CHINWAG_SOCKET; options complete too.
    words = f"chinwag --socket {daemon.socket_path} chat --guest h"
    result = complete(words, 5, short_tmp / "elsewhere.sock")
    assert result.stdout.splitlines() == ["plain,helper"], result.stderr
    # No daemon: no names, and not a word on stderr.
    nothing = complete("chinwag send a", 2, short_tmp / "none.sock")
    assert (nothing.returncode, nothing.stdout.strip(), nothing.stderr) == (0, "", "")


def test_history_reads_every_page_of_a_history_longer_than_a_frame(daemon_factory) -> None:
    daemon = daemon_factory(
        config='[daemon]\nmax_frame_bytes = 4096\n[agents.assistant]\nprovider = "echo"\n'
    )
    sender = fresh_sender()
    words = " ".join(["word"] * 100)  # about 500 bytes, twice per turn: 8 turns > 4096
    for turn in range(8):
        sent = chinwag(
            daemon.socket_path, "send", "--sender", sender, "assistant", f"{turn} {words}"
        )
        assert sent.returncode == 0, sent.stderr
    result = chinwag(daemon.socket_path, "history", "--json", "--sender", sender, "assistant")
    assert result.returncode == 0, result.stderr
    entries = [msgspec.json.decode(line, type=Entry) for line in result.stdout.splitlines()]
    assert [e.seq for e in entries] == list(range(1, 17))
    assert entries[-1].content == f"7 {words}"
