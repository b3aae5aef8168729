"""Workspace tools in the runtime, driven by echo's `/tool NAME JSON`; real files, real processes.

No autojump clock here: it would jump while a real subprocess runs and time
every command out. Timeouts are short real ones instead.
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from chinwag.daemon import _workspace
from chinwag.daemon._config import ConfigError, DaemonConfig, load_config
from chinwag.daemon._errors import ToolError
from chinwag.daemon._tools import TOOL_NAMES
from chinwag.daemon._workspace import (
    LIST_CAP,
    OUTPUT_CAP,
    READ_CAP,
    Workspace,
    _open_dir,
    _read,
    _relative,
    _write,
)
from chinwag.protocol import ToolResult
from deadlines import deadline, until
from runtime_harness import submit
from workspace_harness import WORKSPACE, alive, call, runtime, temporary_area, tool, written


@pytest.fixture
def area() -> Iterator[Path]:
    with temporary_area() as root:
        yield root


@pytest.fixture(params=["openat2", "walk"])
def resolver(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each way of opening a path without following symlinks: the kernel's, and the walk."""
    if request.param == "walk":
        monkeypatch.setattr(_workspace, "_openat2", None, raising=False)
    elif getattr(_workspace, "_openat2", "") is None:
        pytest.skip("this kernel has no openat2")
    return str(request.param)


# --- happy paths ---------------------------------------------------------------


async def test_write_then_read_a_file_creating_its_parents(area):
    async with runtime(area) as rt:
        wrote = await call(rt, area, "write_file", path="src/pkg/a.txt", content="one\ntwo\n")
        assert (wrote.is_error, wrote.output) == (False, "Wrote 8 bytes to src/pkg/a.txt.")
        assert (area / "ws/src/pkg/a.txt").read_text() == "one\ntwo\n"
        assert sorted(os.listdir(area / "ws/src/pkg")) == ["a.txt"], "no temporary file left"
        read = await call(rt, area, "read_file", path="src/pkg/a.txt")
        assert (read.is_error, read.output) == (False, "one\ntwo\n")


async def test_write_file_replaces_atomically_and_keeps_the_mode(area):
    target = area / "ws" / "run.sh"
    target.write_text("old")
    target.chmod(0o750)
    inode = target.stat().st_ino
    async with runtime(area) as rt:
        result = await call(rt, area, "write_file", path="run.sh", content="#!/bin/sh\n")
    assert not result.is_error
    assert target.read_text() == "#!/bin/sh\n"
    assert target.stat().st_ino != inode, "a new file renamed over the old one"
    assert target.stat().st_mode & 0o777 == 0o750


async def test_read_file_pages_by_lines(area):
    (area / "ws" / "n.txt").write_text("".join(f"line {n}\n" for n in range(1, 11)))
    async with runtime(area) as rt:
        page = await call(rt, area, "read_file", path="n.txt", offset=3, limit=2)
        assert page.output == "line 3\nline 4\n[lines 3-4 shown; read on with offset=5]"
        tail = await call(rt, area, "read_file", path="n.txt", offset=9)
        assert tail.output == "line 9\nline 10\n"
        past = await call(rt, area, "read_file", path="n.txt", offset=12)
        assert past.is_error and "has 10 lines; offset 12 is past its end" in past.output


async def test_read_file_caps_its_size_and_says_so(area):
    line = "x" * 99 + "\n"
    (area / "ws" / "big.txt").write_text(line * (READ_CAP // 100 * 2))
    async with runtime(area) as rt:
        result = await call(rt, area, "read_file", path="big.txt")
    body, _, note = result.output.rpartition("\n")
    assert not result.is_error
    assert READ_CAP - 100 < len(body) <= READ_CAP
    assert note.startswith("[truncated at 256 KiB") and "read on with offset=" in note


async def test_read_file_refuses_binary_files_and_directories(area):
    (area / "ws" / "blob.bin").write_bytes(b"\x7fELF\x00\x01\x02")
    (area / "ws" / "sub").mkdir()
    async with runtime(area) as rt:
        binary = await call(rt, area, "read_file", path="blob.bin")
        assert binary.is_error and "is a binary file" in binary.output
        directory = await call(rt, area, "read_file", path="sub")
        assert directory.is_error and "is a directory" in directory.output
        missing = await call(rt, area, "read_file", path="nope.txt")
        assert missing.is_error and "does not exist" in missing.output


async def test_list_dir_sorts_marks_directories_and_caps(area):
    ws = area / "ws"
    (ws / "b.txt").write_text("")
    (ws / "a").mkdir()
    (ws / ".hidden").write_text("")
    (ws / "many").mkdir()
    for n in range(LIST_CAP + 5):
        (ws / "many" / f"{n:05}").write_text("")
    async with runtime(area) as rt:
        top = await call(rt, area, "list_dir")
        assert top.output.splitlines() == [".hidden", "a/", "b.txt", "many/"]
        many = await call(rt, area, "list_dir", path="many")
        lines = many.output.splitlines()
        assert len(lines) == LIST_CAP + 1 and lines[0] == "00000"
        assert lines[-1] == "[5 more entries not shown]"
        empty = await call(rt, area, "list_dir", path="a")
        assert empty.output == "('a' is empty.)"


async def test_run_command_runs_in_the_workdir_with_output_and_exit_code(area):
    (area / "ws" / "here.txt").write_text("")
    async with runtime(area) as rt:
        ok = await call(rt, area, "run_command", command="ls; echo out; echo err >&2 | cat")
        assert (ok.is_error, ok.output) == (False, "here.txt\nout\nerr\n[exit code 0]")
        failed = await call(rt, area, "run_command", command="echo bad news; exit 3")
        assert (failed.is_error, failed.output) == (True, "bad news\n[exit code 3]")
        stdin = await call(rt, area, "run_command", command="cat")
        assert stdin.output == "[exit code 0]", "no stdin: cat reads nothing and ends"


async def test_run_command_keeps_the_tail_of_long_output(area):
    async with runtime(area) as rt:
        result = await call(rt, area, "run_command", command="seq 1 100000; echo the end")
    first, *_, last_line, code = result.output.splitlines()
    total = len("".join(f"{n}\n" for n in range(1, 100001))) + len("the end\n")
    assert first.startswith(f"[output truncated: {total} bytes, the last {OUTPUT_CAP} shown]")
    assert (last_line, code) == ("the end", "[exit code 0]")
    assert len(result.output.encode()) < OUTPUT_CAP + 200


# The commands sleep 30 s: a run that ends within 10 s was ended by the timeout or the
# kill. How soon it ends is a figure of bench/kill_latency.py, not a test's outcome.


async def test_run_command_times_out_and_kills_the_command(area):
    async with runtime(area) as rt:
        result = await call(
            rt, area, "run_command", command="echo $$ > pid; echo begun; exec sleep 30",
            timeout_s=0.5, within=10,
        )  # fmt: skip
        assert result.is_error
        assert result.output == "begun\n[timed out after 0.5 s; the command was killed]"
        assert not alive(int((area / "ws" / "pid").read_text()))


async def test_the_configured_maximum_caps_a_commands_timeout(area):
    async with runtime(area, command_timeout_s=0.5) as rt:
        result = await call(rt, area, "run_command", command="sleep 30", timeout_s=3600, within=10)
        assert result.is_error and "timed out after 0.5 s" in result.output


async def test_what_a_command_leaves_in_the_background_is_killed_when_it_exits(area):
    async with runtime(area) as rt:
        result = await call(rt, area, "run_command", command="sleep 30 & echo $! > child")
        assert result.output == "[exit code 0]"
        child = int((area / "ws" / "child").read_text())
        await until(lambda: not alive(child), "the background child to be killed")


async def test_kill_during_a_command_ends_the_run_killed_and_the_processes_are_gone(area):
    async with runtime(area) as rt:
        command = "sleep 30 & echo $! > child; echo $$ > pid; wait"
        sink = submit(rt, tool("run_command", command=command), cwd=str(area / "ws"))
        pid_file = area / "ws" / "pid"
        await until(lambda: written(pid_file), "the command to write its pid")
        shell, child = int(pid_file.read_text()), int((area / "ws" / "child").read_text())
        assert alive(shell) and alive(child)
        with deadline(10, "the kill to end the run and its command"):
            await rt.kill("assistant", "user", everything=False)
        assert sink.ended.is_set() and sink.end.status == "killed"
        assert not any(isinstance(e, ToolResult) for e in sink.events)
        assert not alive(shell), "run_process reaped the shell before the run ended"
        # Signalled; it dies when next scheduled.
        await until(lambda: not alive(child), "the command's child to die")
        entries = await rt.storage.history("assistant", "user")
        assert [e.role for e in entries] == ["user"], "the killed step is not stored"


# --- confinement ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("read_file", {"path": "../outside/secret.txt"}),
        ("read_file", {"path": "a/../../outside/secret.txt"}),
        ("write_file", {"path": "../outside/new.txt", "content": "x"}),
        ("list_dir", {"path": ".."}),
    ],
)
async def test_dot_dot_out_of_the_workdir_is_refused(area, name, args):
    async with runtime(area) as rt:
        result = await call(rt, area, name, **args)
    assert result.is_error and "leads outside the working directory" in result.output
    assert sorted(os.listdir(area / "outside")) == ["secret.txt"]


async def test_dot_dot_that_stays_inside_is_fine(area):
    (area / "ws" / "a").mkdir()
    (area / "ws" / "b.txt").write_text("b\n")
    async with runtime(area) as rt:
        result = await call(rt, area, "read_file", path="a/../b.txt")
    assert (result.is_error, result.output) == (False, "b\n")


@pytest.mark.parametrize("name", ["read_file", "write_file", "list_dir"])
async def test_absolute_paths_are_refused(area, name):
    target = area / "outside" / ("secret.txt" if name == "read_file" else "")
    async with runtime(area) as rt:
        result = await call(rt, area, name, path=str(target), content="x")
        inside = await call(rt, area, name, path=str(area / "ws"), content="x")
    assert result.is_error and "is absolute" in result.output
    assert inside.is_error and "is absolute" in inside.output


async def test_a_symlink_pointing_outside_is_refused(area):
    ws = area / "ws"
    (ws / "link.txt").symlink_to(area / "outside" / "secret.txt")
    (ws / "dangling.txt").symlink_to(area / "outside" / "created.txt")
    (ws / "inner.txt").write_text("inner\n")
    (ws / "ok.txt").symlink_to("inner.txt")
    async with runtime(area) as rt:
        read = await call(rt, area, "read_file", path="link.txt")
        write = await call(rt, area, "write_file", path="link.txt", content="owned")
        create = await call(rt, area, "write_file", path="dangling.txt", content="owned")
        fine = await call(rt, area, "read_file", path="ok.txt")
    for result in (read, write, create):
        assert result.is_error and "leads outside the working directory" in result.output
    assert (area / "outside" / "secret.txt").read_text() == "top secret\n"
    assert not (area / "outside" / "created.txt").exists()
    assert (fine.is_error, fine.output) == (False, "inner\n"), "a symlink inside is followed"


async def test_a_symlinked_parent_directory_pointing_outside_is_refused(area):
    (area / "ws" / "sub").symlink_to(area / "outside")
    async with runtime(area) as rt:
        results = [
            await call(rt, area, "read_file", path="sub/secret.txt"),
            await call(rt, area, "write_file", path="sub/new.txt", content="x"),
            await call(rt, area, "write_file", path="sub/deeper/new.txt", content="x"),
            await call(rt, area, "list_dir", path="sub"),
        ]
    for result in results:
        assert result.is_error and "leads outside the working directory" in result.output
    assert sorted(os.listdir(area / "outside")) == ["secret.txt"]


def test_a_component_swapped_for_a_symlink_after_the_check_is_not_followed(area, resolver):
    ws = str(area / "ws")
    (area / "ws" / "sub").mkdir()
    rel = _relative(ws, "sub/new.txt", "write_file")
    (area / "ws" / "sub").rmdir()  # the race: `sub` becomes a symlink out after the check
    (area / "ws" / "sub").symlink_to(area / "outside")
    with pytest.raises(OSError) as err:
        _open_dir(ws, os.path.dirname(rel), create=True)
    assert err.value.errno == errno.ELOOP, "O_NOFOLLOW refused the symlink"
    with pytest.raises(ToolError, match="leads outside"):
        _relative(ws, "sub/new.txt", "write_file")


@dataclass
class _Run:
    """What the file tools read of the run that calls them."""

    workspace: Workspace


_libc = ctypes.CDLL(None, use_errno=True)
_RENAME_EXCHANGE = 2


class Swapper:
    """A thread turning ``parent/name`` between a directory and a symlink to ``target``.

    Each flip is one ``renameat2(RENAME_EXCHANGE)``: the directory and the symlink
    trade names atomically, so a tool sees one or the other, never nothing.
    """

    def __init__(self, parent: Path, name: str, target: Path) -> None:
        self.name, self.other = os.fsencode(name), os.fsencode(f".{name}-other")
        (parent / f".{name}-other").symlink_to(target)
        # The directory itself moves (the root's swapper moves the component's); its fd stays.
        self.fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
        self.swaps = 0
        self.error: OSError | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            if _libc.renameat2(self.fd, self.name, self.fd, self.other, _RENAME_EXCHANGE):
                self.error = OSError(ctypes.get_errno(), "renameat2")
                return
            self.swaps += 1

    def __enter__(self) -> Swapper:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)
        os.close(self.fd)
        assert not self.thread.is_alive()
        if self.error is not None:
            raise self.error


def test_the_root_and_a_component_swapped_for_symlinks_never_let_a_tool_out(tmp_path, resolver):
    """The issue's attack: 36 of 1,500 reads got the outside file, 272 of 1,000 writes landed
    outside, while the root flipped between a directory and a symlink out."""
    jail, outside = tmp_path / "jail", tmp_path / "outside"
    ws = jail / "ws"
    (ws / "sub").mkdir(parents=True)
    (outside / "sub").mkdir(parents=True)
    for d, words in [(ws, "inside"), (ws / "sub", "inside"), (outside, "SECRET"),
                     (outside / "sub", "SECRET")]:  # fmt: skip
        (d / "f.txt").write_text(f"{words}\n")
    planted = set(outside.rglob("*"))
    run = _Run(Workspace(root=str(ws), allowed_roots=(str(jail),), command_timeout_s=1.0))
    reads, writes = 1500, 1000
    outcomes: list[str] = []

    def read(n: int) -> None:
        try:
            text = _read(run, {"path": "sub/f.txt" if n % 2 else "f.txt"})
        except ToolError:
            outcomes.append("refused")
        except OSError:  # call_tool would make it an error result; still a bug
            outcomes.append("crashed")
        else:
            outcomes.append("escaped" if "SECRET" in text else "read")

    def write(n: int) -> None:
        try:
            _write(run, {"path": f"sub/n{n}.txt" if n % 2 else f"n{n}.txt", "content": "x"})
        except ToolError:
            outcomes.append("refused")
        except OSError:
            outcomes.append("crashed")
        else:
            outcomes.append("wrote")

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads interleave between any two bytecodes: races show
    # Both made before either starts: the second opens `ws`, which the first swaps.
    root_swapper, sub_swapper = Swapper(jail, "ws", outside), Swapper(ws, "sub", outside / "sub")
    with root_swapper, sub_swapper, ThreadPoolExecutor(4) as pool:
        jobs = [pool.submit(read, n) for n in range(reads)]
        jobs += [pool.submit(write, n) for n in range(writes)]
        for job in jobs:
            job.result(timeout=60)  # a tool's own exception fails the test here
    sys.setswitchinterval(switch)
    written_outside = sorted(str(p) for p in set(outside.rglob("*")) - planted)
    escapes = {"reads": outcomes.count("escaped"), "writes": len(written_outside)}
    assert escapes == {"reads": 0, "writes": 0}, f"of {reads} reads, {writes} writes: {escapes}"
    assert outcomes.count("crashed") == 0, "every failure is a refusal the model can read"
    assert root_swapper.swaps > 0 and sub_swapper.swaps > 0
    assert outcomes.count("read") > 0 and outcomes.count("wrote") > 0, "the tools still worked"


async def test_a_hard_link_to_a_file_outside_is_not_read(area):
    os.link(area / "outside" / "secret.txt", area / "ws" / "hard.txt")
    async with runtime(area) as rt:
        read = await call(rt, area, "read_file", path="hard.txt")
        write = await call(rt, area, "write_file", path="hard.txt", content="mine\n")
        again = await call(rt, area, "read_file", path="hard.txt")
    assert read.is_error and "secret" not in read.output
    assert read.output == "'hard.txt' has 2 hard links; read_file reads only files linked once."
    assert not write.is_error, "a write replaces the link with a file of its own"
    assert (again.is_error, again.output) == (False, "mine\n")
    assert (area / "outside" / "secret.txt").read_text() == "top secret\n"


@pytest.mark.parametrize(
    ("path", "words"),
    [
        ("a/" * 100_000 + "f.txt", "bytes long"),  # the issue's: 100,000 directories made
        ("a/" * 200 + "f.txt", "directories deep"),
    ],
    ids=["100000-deep", "200-deep"],
)
async def test_a_path_too_long_or_too_deep_is_refused_before_anything_is_made(area, path, words):
    async with runtime(area) as rt:
        result = await call(rt, area, "write_file", path=path, content="x")
    assert result.is_error and words in result.output
    assert len(result.output) < 200, "the refusal does not echo the path"
    assert os.listdir(area / "ws") == []


# --- who may use them, and where -----------------------------------------------


async def test_tools_outside_the_whitelist_are_refused(area):
    async with runtime(area) as rt:
        sink = submit(rt, tool("read_file", path="x"), cwd=str(area / "ws"), agent="bare")
        await sink.finished()
    assert sink.result.is_error
    assert sink.result.output == "The tool 'read_file' is not available to this agent."
    assert set(WORKSPACE) <= TOOL_NAMES


async def test_no_working_directory_means_no_workspace(area):
    async with runtime(area) as rt:
        sink = submit(rt, tool("list_dir"), cwd=None)
        await sink.finished()
    assert sink.result.is_error and "has no working directory" in sink.result.output


async def test_the_workdir_is_the_streams_then_the_stored_then_the_agents(area):
    (area / "ws" / "first").mkdir()
    (area / "ws" / "first" / "here").write_text("")
    async with runtime(area) as rt:
        first = submit(rt, tool("list_dir"), cwd=str(area / "ws" / "first"))
        await first.finished()
        again = submit(rt, tool("list_dir"), cwd=None)
        await again.finished()
        placed = submit(rt, tool("list_dir"), cwd=None, agent="placed")
        await placed.finished()
    assert first.result.output == again.result.output == "here"
    assert placed.result.output == "first/"


async def test_a_stream_cwd_outside_the_allowed_roots_is_refused(area):
    async with runtime(area) as rt:
        for cwd, words in [
            (str(area / "outside"), "outside the allowed roots"),
            (str(area / "ws" / "missing"), "not an existing directory"),
            ("relative/dir", "not an absolute path"),
        ]:
            problem = await rt.cwd_problem(cwd)
            assert problem is not None and words in problem and problem.endswith(".")
        (area / "ws" / "escape").symlink_to(area / "outside")
        assert "outside the allowed roots" in (await rt.cwd_problem(str(area / "ws" / "escape")))
        assert await rt.cwd_problem(str(area / "ws")) is None


def test_an_agents_cwd_must_lie_under_the_allowed_roots(area):
    config = area / "config.toml"
    template = """
[daemon]
allowed_roots = ["{root}"]

[agents.worker]
provider = "echo"
cwd = "{cwd}"
"""
    config.write_text(template.format(root=area / "ws", cwd=area / "outside"))
    with pytest.raises(ConfigError, match=r"\[agents.worker\]: The cwd .* is outside"):
        load_config(config, tool_names=TOOL_NAMES)
    config.write_text(template.format(root=area / "ws", cwd=area / "ws" / "missing"))
    with pytest.raises(ConfigError, match="not an existing directory"):
        load_config(config, tool_names=TOOL_NAMES)
    config.write_text(template.format(root="relative", cwd=area / "ws"))
    with pytest.raises(ConfigError, match="allowed_roots must be absolute"):
        load_config(config, tool_names=TOOL_NAMES)
    config.write_text(template.format(root=area / "ws", cwd=area / "ws"))
    loaded = load_config(config, tool_names=TOOL_NAMES)
    assert loaded.agents["worker"].cwd == str(area / "ws")


def test_the_allowed_roots_default_to_the_home_directory():
    assert DaemonConfig().roots == [os.path.expanduser("~")]
    assert DaemonConfig(allowed_roots=["~/src", "/srv"]).roots == [
        os.path.expanduser("~/src"),
        "/srv",
    ]
