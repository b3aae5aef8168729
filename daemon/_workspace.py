"""Workspace tools: `read_file`, `write_file`, `list_dir`, `run_command`, confined to the run's cwd.

A path the model gives is relative to the working directory. It is resolved
(`os.path.realpath`) and must land inside the resolved directory: `..`,
absolute paths and symlinks that lead outside are refused. What was checked is
then opened from `/` following no symlink (`openat2` with `RESOLVE_BENEATH |
RESOLVE_NO_SYMLINKS` where the kernel has it, else one component at a time with
``O_NOFOLLOW``): the root or a component swapped for a symlink after the check
(by a concurrent `run_command`, say) is refused rather than followed. A file
with more than one hard link is not read: a hard link is how a file from
outside gets inside.

`run_command` runs `bash -c COMMAND` (so pipes, `&&` and redirections work as a
model expects) in the working directory; `_command.py` says what confines it.
"""

from __future__ import annotations

import codecs
import ctypes
import errno
import os
import platform
import shutil
import stat
import sys
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Protocol

import trio

from ._command import Sandbox, Tail, bwrap_argv, command_env, run_contained
from ._errors import ToolError

READ_CAP = 256 * 1024  # bytes of a file one read_file returns
LIST_CAP = 1000  # entries one list_dir returns
OUTPUT_CAP = 64 * 1024  # bytes of a command's output kept (the tail)
COMMAND_TIMEOUT_S = 60.0  # when the call names none
_BINARY_SNIFF = 8192

# bash where there is one: models write bash (pipes, `&&`, `[[`, brace expansion).
_SHELL = shutil.which("bash") or "/bin/sh"

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# Linux's PATH_MAX; and deeper than any real tree, yet few enough that one write_file
# never makes more directories than that (a 100,000-deep path made 100,000).
PATH_BYTES_CAP = 4096
PATH_DEPTH_CAP = 64


class _OpenHow(ctypes.Structure):
    _fields_ = [
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    ]


_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08


def _bind_openat2() -> Callable[[int, str, int], int] | None:
    """openat2(2) resolving beneath a directory, following no symlink; None where absent.

    The kernel (5.6 and later) resolves the whole path under those rules, so no
    swap between two steps can lead it out. ``os`` has no binding: it is called
    through ``syscall``, whose number is 437 on every architecture but alpha and
    ia64. A seccomp filter (some container runtimes) may refuse it: then the walk.
    """
    if sys.platform != "linux" or platform.machine() in ("alpha", "ia64"):
        return None
    syscall = ctypes.CDLL(None, use_errno=True).syscall
    syscall.restype = ctypes.c_long
    syscall.argtypes = [
        ctypes.c_long,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.POINTER(_OpenHow),
        ctypes.c_size_t,
    ]

    def openat2(dir_fd: int, path: str, flags: int) -> int:
        how = _OpenHow(flags, 0, _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS)
        fd = int(syscall(437, dir_fd, os.fsencode(path), ctypes.byref(how), ctypes.sizeof(how)))
        if fd < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), path)
        return fd

    try:
        slash = os.open("/", _DIR_FLAGS)
        try:
            os.close(openat2(slash, ".", _DIR_FLAGS))
        finally:
            os.close(slash)
    except OSError:
        return None
    return openat2


_openat2 = _bind_openat2()


class CommandSettings(Protocol):
    """What an agent's config says about its commands (an ``AgentConfig``)."""

    @property
    def env(self) -> Mapping[str, str]: ...
    @property
    def sandbox(self) -> str: ...
    @property
    def sandbox_network(self) -> bool: ...
    @property
    def sandbox_read(self) -> Sequence[str]: ...


@dataclass(frozen=True)
class Workspace:
    """A run's working directory and the limits its tools work within."""

    root: str
    allowed_roots: tuple[str, ...]
    command_timeout_s: float
    env: Mapping[str, str] = field(default_factory=dict)  # a command's, beyond the allowlist
    sandbox: Sandbox | None = None  # None: commands run unconfined

    @classmethod
    def for_agent(
        cls,
        root: str,
        agent: CommandSettings,
        *,
        allowed_roots: Sequence[str],
        command_timeout_s: float,
    ) -> Workspace:
        """The workspace of a run of ``agent`` in ``root``."""
        sandbox = None
        if agent.sandbox == "bwrap":
            read_only = tuple(os.path.expanduser(path) for path in agent.sandbox_read)
            sandbox = Sandbox(network=agent.sandbox_network, read_only=read_only)
        return cls(
            root=root,
            allowed_roots=tuple(allowed_roots),
            command_timeout_s=command_timeout_s,
            env=dict(agent.env),
            sandbox=sandbox,
        )


class HasWorkspace(Protocol):
    @property
    def workspace(self) -> Workspace | None: ...


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def workdir_problem(cwd: str, allowed_roots: list[str] | tuple[str, ...]) -> str | None:
    """Why ``cwd`` cannot be a working directory (one sentence), or None when it can.

    It must be absolute, an existing directory, and resolve (symlinks
    followed) inside one of ``allowed_roots``. Blocks on the file system.
    """
    try:
        _resolve_workdir(cwd, allowed_roots)
    except ToolError as exc:
        return str(exc)
    return None


def _resolve_workdir(cwd: str, allowed_roots: list[str] | tuple[str, ...]) -> str:
    """``cwd`` resolved, once: the text checked is the text the tools then open."""
    if not os.path.isabs(cwd):
        raise ToolError(f"The cwd {cwd!r} is not an absolute path.")
    if not os.path.isdir(cwd):
        raise ToolError(f"The cwd {cwd!r} is not an existing directory.")
    try:
        real = os.path.realpath(cwd)
        roots = [os.path.realpath(root) for root in allowed_roots]
    except OSError:  # a symlink on the way changed while it was being read
        raise ToolError(f"The cwd {cwd!r} changed while it was being checked.") from None
    if not any(_inside(real, root) for root in roots):
        raise ToolError(
            f"The cwd {cwd!r} is outside the allowed roots ({', '.join(allowed_roots)})."
        )
    return real


def _root(ctx: HasWorkspace) -> tuple[Workspace, str]:
    """The run's workspace and its resolved root; blocks on the file system."""
    ws = ctx.workspace
    if ws is None:
        raise ToolError(
            "This conversation has no working directory: start it with a cwd, "
            "or give the agent a cwd in the config."
        )
    return ws, _resolve_workdir(ws.root, ws.allowed_roots)


def _relative(root: str, path: object, tool: str) -> str:
    """``path`` resolved, relative to ``root``; refused unless it stays inside.

    Symlinks inside are followed here, as text; the result is then opened
    following none, so one swapped in after this check is refused, not followed.
    """
    if not isinstance(path, str) or not path or "\0" in path:
        raise ToolError(f"{tool} needs `path`, a path relative to the working directory.")
    try:
        size = len(os.fsencode(path))
    except UnicodeEncodeError:
        raise ToolError(f"{tool}: the path is not valid UTF-8 text.") from None
    if size > PATH_BYTES_CAP:
        raise ToolError(f"{tool}: the path is {size} bytes long; the limit is {PATH_BYTES_CAP}.")
    _check_depth(path, tool)
    if os.path.isabs(path) or path.startswith("~"):
        raise ToolError(
            f"The path {path!r} is absolute; give a path relative to the working directory."
        )
    try:
        full = os.path.realpath(os.path.join(root, path))
    except OSError:  # a symlink on the way changed while it was being read
        raise ToolError(
            f"The path {path!r} changed while it was being resolved; refused."
        ) from None
    if not _inside(full, root):
        raise ToolError(f"The path {path!r} leads outside the working directory; refused.")
    rel = os.path.relpath(full, root)
    _check_depth(rel, tool)  # symlinks inside may lead deeper than the path looks
    return rel


def _check_depth(path: str, tool: str) -> None:
    depth = sum(1 for part in path.split(os.sep) if part not in ("", "."))
    if depth > PATH_DEPTH_CAP:
        raise ToolError(
            f"{tool}: the path is {depth} directories deep; the limit is {PATH_DEPTH_CAP}."
        )


def _parts(rel: str) -> list[str]:
    return [] if rel in ("", ".") else rel.split(os.sep)


def _walk(dir_fd: int, rel: str, flags: int) -> int:
    """``rel`` opened under ``dir_fd`` one component at a time, following no symlink."""
    *dirs, last = _parts(rel) or ["."]
    fd = os.dup(dir_fd)
    try:
        for part in dirs:
            child = _open_component(fd, part, _DIR_FLAGS)
            os.close(fd)
            fd = child
        return _open_component(fd, last, flags | os.O_NOFOLLOW)
    finally:
        os.close(fd)


def _open_component(dir_fd: int, name: str, flags: int) -> int:
    try:
        return os.open(name, flags, dir_fd=dir_fd)
    except NotADirectoryError:
        # Linux reports a symlink met with O_DIRECTORY | O_NOFOLLOW as ENOTDIR.
        if stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
            raise OSError(errno.ELOOP, "a symlink where a directory was") from None
        raise


def _open_beneath(dir_fd: int, rel: str, flags: int) -> int:
    """``rel`` opened under ``dir_fd``; a symlink anywhere on the way is refused (ELOOP)."""
    if _openat2 is not None:
        # Without O_NOFOLLOW, a symlink last is refused like any other (ELOOP), not
        # met as a non-directory (ENOTDIR) where O_DIRECTORY asks for one.
        return _openat2(dir_fd, rel, flags & ~os.O_NOFOLLOW)
    return _walk(dir_fd, rel, flags)


def _open_root(root: str) -> int:
    """A descriptor of the resolved ``root``, opened from ``/`` following no symlink.

    ``root`` was checked as text (``realpath``, inside an allowed root); opened
    so, what is opened is what lies at that text now: a symlink swapped in for
    it, or for any directory above it, is refused, not followed. No inode check
    against the earlier ``realpath`` is needed: a directory renamed into place
    is at that path, which is all the check promised.
    """
    slash = os.open("/", _DIR_FLAGS)
    try:
        return _open_beneath(slash, root.lstrip(os.sep) or ".", _DIR_FLAGS)
    finally:
        os.close(slash)


def _open_dir(root: str, rel: str, *, create: bool = False) -> int:
    """A descriptor of ``root/rel``, opened from ``/`` without following symlinks.

    With ``create``, missing directories are made on the way, each inside one
    already opened, so none is ever made outside ``root``.
    """
    fd = _open_root(root)
    if not create and rel not in ("", "."):
        try:
            return _open_beneath(fd, rel, _DIR_FLAGS)
        finally:
            os.close(fd)
    try:
        for part in _parts(rel):
            try:
                child = _open_beneath(fd, part, _DIR_FLAGS)
            except FileNotFoundError:
                with suppress(FileExistsError):
                    os.mkdir(part, dir_fd=fd)
                child = _open_beneath(fd, part, _DIR_FLAGS)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _explain(exc: OSError, path: str) -> ToolError:
    """An OSError as the sentence the model sees."""
    if exc.errno in (errno.ELOOP, errno.EXDEV):
        return ToolError(f"The path {path!r} changed into a symlink while being opened; refused.")
    if isinstance(exc, FileNotFoundError):
        return ToolError(f"{path!r} does not exist.")
    if isinstance(exc, NotADirectoryError):
        return ToolError(f"A part of {path!r} is not a directory.")
    if isinstance(exc, IsADirectoryError):
        return ToolError(f"{path!r} is a directory.")
    if isinstance(exc, PermissionError):
        return ToolError(f"Permission denied on {path!r}.")
    return ToolError(f"{path!r}: {exc.strerror or exc}.")


def _int_arg(args: dict[str, Any], name: str, tool: str) -> int | None:
    value = args.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ToolError(f"{tool}: `{name}` must be a whole number of at least 1.")
    return value


# --- read_file ---------------------------------------------------------------


def _read(ctx: HasWorkspace, args: dict[str, Any]) -> str:
    _, root = _root(ctx)
    rel = _relative(root, args.get("path"), "read_file")
    offset = _int_arg(args, "offset", "read_file") or 1
    limit = _int_arg(args, "limit", "read_file")
    if rel == ".":
        raise ToolError("That is the working directory itself; list_dir shows what it holds.")
    parent, name = os.path.split(rel)
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # a FIFO must not block
    try:
        dir_fd = _open_dir(root, parent)
        try:
            fd = os.open(name, flags, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)
        with os.fdopen(fd, "rb") as file:
            info = os.fstat(fd)
            mode = info.st_mode
            if stat.S_ISDIR(mode):
                raise ToolError(f"{rel!r} is a directory; list_dir shows what it holds.")
            if not stat.S_ISREG(mode):
                raise ToolError(f"{rel!r} is not a regular file.")
            # A hard link is the one way to put a file from outside the cwd inside it.
            if info.st_nlink > 1:
                links = info.st_nlink
                raise ToolError(
                    f"{rel!r} has {links} hard links; read_file reads only files linked once."
                )
            if b"\0" in file.read(_BINARY_SNIFF):
                raise ToolError(f"{rel!r} is a binary file; read_file reads text only.")
            file.seek(0)
            return _read_lines(file, rel, offset, limit)
    except OSError as exc:
        raise _explain(exc, rel) from None


def _read_lines(file: BinaryIO, rel: str, offset: int, limit: int | None) -> str:
    out = bytearray()
    line = 1  # the line the next piece read belongs to
    taken = 0  # whole lines in `out`
    open_line = False  # the last piece read did not end its line
    cut = more = False
    while piece := file.readline(READ_CAP):
        if line >= offset:
            if limit is not None and taken >= limit:
                more = True
                break
            if len(out) + len(piece) > READ_CAP:
                out += piece[: READ_CAP - len(out)]
                cut = more = True
                break
            out += piece
        open_line = not piece.endswith(b"\n")
        if not open_line:
            if line >= offset:
                taken += 1
            line += 1
    if not more and not out and offset > 1:
        lines = line if open_line else line - 1
        raise ToolError(f"{rel!r} has {lines} lines; offset {offset} is past its end.")
    # A cut may split a UTF-8 sequence: the incremental decoder drops the partial tail.
    text = codecs.getincrementaldecoder("utf-8")("replace").decode(bytes(out), final=not cut)
    if not more:
        return text or f"({rel!r} is empty.)"
    if not cut:
        note = f"[lines {offset}-{line - 1} shown; read on with offset={line}]"
    elif taken:
        note = (
            f"[truncated at {READ_CAP // 1024} KiB: lines {offset}-{line - 1} whole, then "
            f"the start of line {line}; read on with offset={line}]"
        )
    else:
        note = (
            f"[truncated: line {line} is longer than {READ_CAP // 1024} KiB; its start is "
            f"shown, the next line is offset={line + 1}]"
        )
    return text + ("" if text.endswith("\n") else "\n") + note


# --- write_file --------------------------------------------------------------


def _write(ctx: HasWorkspace, args: dict[str, Any]) -> str:
    _, root = _root(ctx)
    content = args.get("content")
    if not isinstance(content, str):
        raise ToolError("write_file needs `content`, the file's whole new text.")
    rel = _relative(root, args.get("path"), "write_file")
    if rel == ".":
        raise ToolError("That is the working directory itself, not a file.")
    parent, name = os.path.split(rel)
    data = content.encode()
    try:
        dir_fd = _open_dir(root, parent, create=True)
        try:
            _replace(dir_fd, name, data)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise _explain(exc, rel) from None
    return f"Wrote {len(data)} bytes to {rel}."


def _replace(dir_fd: int, name: str, data: bytes) -> None:
    """Write ``name`` in ``dir_fd`` atomically: a temporary file, fsynced, renamed over it."""
    try:
        existing = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        existing = None
    if existing is not None and not stat.S_ISREG(existing.st_mode):
        kind = "a directory" if stat.S_ISDIR(existing.st_mode) else "not a regular file"
        raise ToolError(f"{name!r} is {kind}; write_file replaces regular files only.")
    temp = f".{name}.{uuid.uuid4().hex[:8]}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(temp, flags, 0o666, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            if existing is not None:
                os.fchmod(fd, stat.S_IMODE(existing.st_mode))
            os.fsync(fd)
        os.replace(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with suppress(OSError):
            os.unlink(temp, dir_fd=dir_fd)
        raise
    os.fsync(dir_fd)


# --- list_dir ----------------------------------------------------------------


def _list(ctx: HasWorkspace, args: dict[str, Any]) -> str:
    _, root = _root(ctx)
    rel = _relative(root, args.get("path") or ".", "list_dir")
    try:
        fd = _open_dir(root, rel)
        try:
            with os.scandir(fd) as entries:
                names = sorted(e.name + "/" if e.is_dir() else e.name for e in entries)
        finally:
            os.close(fd)
    except OSError as exc:
        raise _explain(exc, rel) from None
    if not names:
        return f"({rel!r} is empty.)"
    shown = "\n".join(names[:LIST_CAP])
    if len(names) > LIST_CAP:
        shown += f"\n[{len(names) - LIST_CAP} more entries not shown]"
    return shown


# --- run_command -------------------------------------------------------------


async def _run_command(ctx: HasWorkspace, args: dict[str, Any]) -> str:
    """Cancelled (killed run), the command and all it started are killed before this returns."""
    ws, root = await trio.to_thread.run_sync(_root, ctx)
    command = args.get("command")
    if not isinstance(command, str) or not command.strip():
        raise ToolError("run_command needs `command`, a non-empty shell command line.")
    timeout = args.get("timeout_s", COMMAND_TIMEOUT_S)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
        raise ToolError("run_command: `timeout_s` must be a positive number of seconds.")
    timeout = min(float(timeout), ws.command_timeout_s)
    argv = [_SHELL, "-c", command]
    if ws.sandbox is not None:
        argv = bwrap_argv(root, network=ws.sandbox.network, read_only=ws.sandbox.read_only) + argv
    tail = Tail(OUTPUT_CAP)
    with trio.move_on_after(timeout) as deadline:
        code = await run_contained(argv, cwd=root, env=command_env(ws.env), tail=tail)
    output = tail.data.decode("utf-8", "replace")
    if tail.total > len(tail.data):
        output = (
            f"[output truncated: {tail.total} bytes, the last {len(tail.data)} shown]\n" + output
        )
    if output and not output.endswith("\n"):
        output += "\n"
    if deadline.cancelled_caught:
        raise ToolError(f"{output}[timed out after {timeout:g} s; the command was killed]")
    if code < 0:
        raise ToolError(f"{output}[killed by signal {-code}]")
    if code:
        raise ToolError(f"{output}[exit code {code}]")
    return f"{output}[exit code 0]"


# --- the tools, registered in _tools.TOOLS ------------------------------------


async def _read_file(ctx: HasWorkspace, args: dict[str, Any]) -> str:
    return await trio.to_thread.run_sync(_read, ctx, args)


async def _write_file(ctx: HasWorkspace, args: dict[str, Any]) -> str:
    return await trio.to_thread.run_sync(_write, ctx, args)


async def _list_dir(ctx: HasWorkspace, args: dict[str, Any]) -> str:
    return await trio.to_thread.run_sync(_list, ctx, args)


_PATH = {"type": "string", "description": "A path relative to the working directory."}

WORKSPACE_TOOLS: list[
    tuple[str, str, dict[str, Any], Callable[[HasWorkspace, dict[str, Any]], Awaitable[str]]]
] = [
    (
        "read_file",
        f"Read a text file in the working directory, at most {READ_CAP // 1024} KiB at a "
        "time; `offset` (the first line, from 1) and `limit` (how many lines) page through "
        "longer ones.",
        {
            "type": "object",
            "properties": {
                "path": _PATH,
                "offset": {"type": "integer", "minimum": 1},
                "limit": {"type": "integer", "minimum": 1},
            },
            "required": ["path"],
        },
        _read_file,
    ),
    (
        "write_file",
        "Write a file in the working directory, replacing it whole; missing parent "
        "directories are created.",
        {
            "type": "object",
            "properties": {"path": _PATH, "content": {"type": "string"}},
            "required": ["path", "content"],
        },
        _write_file,
    ),
    (
        "list_dir",
        "List a directory in the working directory: names sorted, directories ending in '/'.",
        {
            "type": "object",
            "properties": {"path": {**_PATH, "default": "."}},
        },
        _list_dir,
    ),
    (
        "run_command",
        "Run a bash command line in the working directory, without stdin. Returns its "
        f"output (stdout and stderr together; the last {OUTPUT_CAP // 1024} KiB) and "
        f"exit code. `timeout_s` defaults to {COMMAND_TIMEOUT_S:g}.",
        {
            "type": "object",
            "properties": {
                "command": {"type": "string"},
                "timeout_s": {"type": "number", "exclusiveMinimum": 0},
            },
            "required": ["command"],
        },
        _run_command,
    ),
]
