"""The processes a benchmark measures: a real `chinwag serve`, and the bare baselines.

Each runs in its own process, as the daemon does, so that neither shares the
client's interpreter or event loop; what a process costs is read from /proc.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from urllib.parse import parse_qs, urlsplit

from . import _profile
from ._report import REPO, Figure, median_of, print_figures

# Where `python -m bench --profile DIR` wants the daemons' py-spy samples (None: nowhere).
profile_dir: Path | None = None
# The interpreter that runs `chinwag serve` (`--daemon-python`): another one measures
# another installed chinwag, e.g. a clean copy of a commit in its own virtualenv.
daemon_python: str = sys.executable

ECHO_CONFIG = """
[daemon]
allowed_roots = ["/tmp"]
{daemon}

[agents.assistant]
provider = "echo"
model = "echo"
tools = {tools}

[agents.helper]
provider = "echo"
model = "echo"
"""


def echo_config(tools: list[str] | None = None, daemon: str = "") -> str:
    """Two echo agents, `assistant` (with ``tools``) and `helper`; ``daemon``: more settings."""
    return ECHO_CONFIG.format(
        tools="[" + ", ".join(f'"{t}"' for t in tools or []) + "]", daemon=daemon
    )


def wait_for_socket(path: Path, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """Return once ``path`` accepts a connection; fail if ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(str(path))
                return
            except OSError:
                time.sleep(0.01)  # a child process's socket: there is no event to wait on
    raise RuntimeError(f"nothing listened on {path} within {timeout:g} s")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # After the command name: state is field 3, utime 14 and stime 15 (1-based).
    ticks = int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def bench_env() -> dict[str, str]:
    """The environment of a child process: `bench` importable, from the repository."""
    path = [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(path))


def in_daemon_python(code: str, *args: str) -> str:
    """Run ``code`` in the daemon's interpreter, e.g. to fill a store with its chinwag;
    what it printed."""
    return subprocess.run(
        [daemon_python, "-c", code, *args],
        env=bench_env(),
        cwd=REPO,
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    ).stdout


# Where the daemon's chinwag comes from: installed, the folder pip recorded it was
# installed from; editable, the repository its packages are folders of.
SOURCE = """
import json
from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import url2pathname
import chinwag.protocol
package = Path(chinwag.protocol.__file__).resolve().parent
for info in package.parent.parent.glob("chinwag-*.dist-info"):
    url = json.loads((info / "direct_url.json").read_text())["url"]
    print(url2pathname(urlsplit(url).path))
    break
else:
    print(package.parent)
"""


def daemon_source() -> Path:
    """The source tree of the chinwag that `daemon_python` runs (the repository when
    pip recorded none)."""
    found = in_daemon_python(SOURCE).strip()
    return Path(found) if found else REPO


class Server:
    """A child process serving on a Unix socket; a context manager that stops it."""

    def __init__(
        self,
        argv: list[str],
        socket_path: Path,
        log_path: Path,
        profile_as: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.argv = argv
        self.env = env or {}  # added to bench_env()
        self.socket_path = socket_path
        self.log_path = log_path
        self.profile_as = profile_as  # the name of its samples, under --profile
        self.proc: subprocess.Popen[bytes] | None = None
        self.recorder: subprocess.Popen[bytes] | None = None
        self.samples = Path()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        env = bench_env() | self.env
        # A server stopped by SIGTERM may leave its socket file behind (the bare ones do).
        self.socket_path.unlink(missing_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO
            )
        try:
            wait_for_socket(self.socket_path, self.proc)
        except RuntimeError as exc:
            self.stop()
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{exc}\n{tail}") from None
        if profile_dir is not None and self.profile_as is not None:
            self.samples = profile_dir / f"{self.profile_as}.txt"
            self.recorder = _profile.start(self.pid, self.samples)

    def stop(self) -> None:
        if self.recorder is not None:
            _profile.stop(self.recorder)
            self.recorder = None
            if self.samples.exists():
                summary = _profile.summarize(self.samples)
                self.samples.with_suffix(".summary.txt").write_text(summary + "\n")
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def rss_kib(self) -> int:
        return rss_kib(self.pid)

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def chinwag_serve(
    root: Path,
    config: str,
    storage: str | None = None,
    env: dict[str, str] | None = None,
    command: list[str] | None = None,
) -> Server:
    """A real `chinwag serve` (it execs `python -m chinwag.daemon`, keeping its pid).

    Storage defaults to sqlite in ``root``; the log level is the default, info,
    as a user runs it. ``env``: variables added to its environment; ``command``:
    what runs instead of `chinwag serve`, given the same options.
    """
    root.mkdir(parents=True, exist_ok=True)
    config_path = root / "config.toml"
    config_path.write_text(config)
    sock = root / "d.sock"
    argv = [
        *(command or [daemon_python, "-m", "chinwag.clients.cli", "serve"]),
        "--config",
        str(config_path),
        "--socket",
        str(sock),
        "--storage",
        storage or f"sqlite:///{root / 'bench.db'}",
    ]
    where = (storage or "sqlite").split(":")[0]
    return Server(argv, sock, root / "daemon.log", profile_as=f"{root.name}-{where}", env=env)


def bare_server(root: Path, mode: str) -> Server:
    """One of `bench._bare_server`'s baselines, on its own socket in ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    sock = root / f"bare-{mode}.sock"
    argv = [sys.executable, "-m", "bench._bare_server", mode, str(sock)]
    return Server(argv, sock, root / f"bare-{mode}.log")


def raw_durable(root: Path, synchronous: str) -> Server:
    """`bench._bare_server durable`: the bare server doing chinwag's sqlite commits inline."""
    root.mkdir(parents=True, exist_ok=True)
    sock = root / f"raw-durable-{synchronous}.sock"
    db = root / f"raw-durable-{synchronous}.db"
    argv = [sys.executable, "-m", "bench._bare_server", "durable", str(sock), str(db), synchronous]
    return Server(argv, sock, root / f"raw-durable-{synchronous}.log")


def sse_server(root: Path) -> Server:
    """The Starlette SSE baseline under uvicorn, on a Unix socket."""
    root.mkdir(parents=True, exist_ok=True)
    sock = root / "sse.sock"
    argv = [
        sys.executable,
        "-m",
        "uvicorn",
        "bench._sse_app:app",
        "--uds",
        str(sock),
        "--log-level",
        "warning",
        "--no-access-log",
    ]
    return Server(argv, sock, root / "sse.log")


def synchronous_of(storage: str | None) -> str | None:
    """The `synchronous` of a sqlite store (None: the default, sqlite with full); None
    for any other store."""
    if storage is None:
        return "full"
    if not storage.startswith("sqlite:"):
        return None
    found = parse_qs(urlsplit(storage).query).get("synchronous", ["full"])
    return found[-1].lower()


def storage_label(storage: str | None) -> str:
    if storage is None:
        return "sqlite (temp dir, synchronous=full)"
    if (synchronous := synchronous_of(storage)) is not None:
        return f"sqlite, synchronous={synchronous}"
    return storage.split(":")[0]


def storage_tag(storage: str | None) -> str:
    """What tells a figure on this store from the default store's: '' for sqlite with
    synchronous=full, else e.g. 'normal', 'memory', 'postgresql'."""
    synchronous = synchronous_of(storage)
    if synchronous is not None:
        return "" if synchronous == "full" else synchronous
    return storage.split(":")[0] if storage else ""


def storage_short(storage: str | None) -> str:
    """A store in a figure's name: 'sqlite full', 'sqlite normal', 'memory:', 'postgresql'."""
    synchronous = synchronous_of(storage)
    if synchronous is not None:
        return f"sqlite {synchronous}"
    return "memory:" if storage == "memory:" else (storage or "").split(":")[0]


def add_daemon_options(
    parser: argparse.ArgumentParser,
    storage: bool = True,
    storage_help: str = "storage URL for the daemon (default: sqlite in a temp dir, "
    "synchronous=full)",
) -> None:
    """--storage (unless ``storage`` is False) and --daemon-python, for every
    benchmark's own command."""
    if storage:
        parser.add_argument("--storage", help=storage_help)
    parser.add_argument(
        "--daemon-python",
        metavar="PATH",
        default=os.environ.get("CHINWAG_BENCH_DAEMON_PYTHON"),
        help="the Python that runs `chinwag serve` (and fills stores), e.g. a virtualenv with "
        "another chinwag installed (default: $CHINWAG_BENCH_DAEMON_PYTHON, else this one)",
    )


def use_daemon_options(args: argparse.Namespace) -> None:
    global daemon_python
    if args.daemon_python:
        daemon_python = args.daemon_python


def run_alone(
    parser: argparse.ArgumentParser,
    measure: Callable[[Path, argparse.Namespace], list[Figure]],
    *,
    daemon: bool = True,
) -> None:
    """A benchmark's own command: ``parser`` (its options, its description the title)
    gets --repeat, and --storage and --daemon-python unless it runs no ``daemon``;
    ``measure`` runs in a temporary directory of its own each time, and the median
    of its figures is printed."""
    parser.add_argument(
        "--repeat", type=int, default=1, help="rounds, each figure their median (default 1)"
    )
    if daemon:
        add_daemon_options(parser)
    args = parser.parse_args()
    if daemon:
        use_daemon_options(args)
    rounds = []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="cwb-", dir="/tmp") as tmp:
            rounds.append(measure(Path(tmp).resolve(), args))
    print_figures(parser.description or "", median_of(rounds))
