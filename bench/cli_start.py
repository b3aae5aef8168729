"""How long `chinwag send assistant hi` takes, whole process, against a running daemon.

From fork to exit: the interpreter starting, the CLI importing what it needs,
connecting, one turn of the echo model, and exiting. Two baselines, measured
in the same run, interleaved with chinwag's runs so that both see the same
machine:

- ``python -c pass``: what every Python command pays before its first line
  (the interpreter and its ``site``); no CLI in Python starts faster.
- a bare client: ``python -c`` with a blocking socket and the stdlib's json,
  saying ``hello`` and sending the same ``stream``, reading frames to ``end``:
  the floor for this turn from any Python process, the daemon's part included.

Not ``python -c "import trio"``: the CLI runs on asyncio, never imports trio,
and trio alone costs more than the target.

Bytecode is written and used, as after `pip install` (which compiles it):
``PYTHONDONTWRITEBYTECODE`` is dropped from the children's environment and a
warm-up run of each command writes whatever cache is missing.

    python -m bench.cli_start [--runs 30] [--daemon-python PATH]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time
from pathlib import Path

from . import _processes
from ._report import Baseline, Figure, Target

#: The target from issue 12, in ms: `send` against a running daemon, median.
TARGET_MS = 120.0

#: What is sent: a conversation of the benchmark's own, so that the runs never queue.
SEND = ("--sender", "bench-cli", "assistant", "hi")

BARE_CLIENT = r"""
import json, socket, struct, sys

def frame(message):
    body = json.dumps(message).encode()
    return struct.pack(">I", len(body)) + body

with socket.socket(socket.AF_UNIX) as sock:
    sock.connect(sys.argv[1])
    sock.sendall(
        frame({"type": "hello", "protocol": 1, "client": "bare"})
        + frame({"type": "stream", "id": 1, "agent": "assistant", "content": "hi",
                 "sender": "bench-bare"})
    )
    buffered = b""
    while True:
        while len(buffered) < 4 or len(buffered) < 4 + struct.unpack(">I", buffered[:4])[0]:
            data = sock.recv(65536)
            if not data:
                sys.exit("the daemon closed the connection")
            buffered += data
        size = struct.unpack(">I", buffered[:4])[0]
        message, buffered = json.loads(buffered[4 : 4 + size]), buffered[4 + size :]
        if message["type"] == "text_delta":
            sys.stdout.write(message["delta"])
        if message["type"] == "end":
            sys.stdout.write("\n")
            break
"""


def cli_argv(python: str) -> list[str]:
    """The `chinwag` console script installed beside ``python``, as a user runs it."""
    script = Path(python).with_name("chinwag")
    if script.exists():
        return [str(script)]
    return [python, "-m", "chinwag.clients.cli"]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def timed(argv: list[str], env: dict[str, str]) -> float:
    """Milliseconds from spawn to exit; fails unless the command printed the echo."""
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    elapsed = (time.perf_counter() - started) * 1000
    if done.returncode != 0 or done.stdout not in ("", "hi\n"):
        raise RuntimeError(f"{argv!r} failed ({done.returncode}): {done.stdout}{done.stderr}")
    return elapsed


def measure(root: Path, runs: int, storage: str | None = None) -> dict[str, list[float]]:
    """Each command's times over ``runs`` rounds, one run of each per round."""
    python = _processes.daemon_python
    env = child_env()
    with _processes.chinwag_serve(root, _processes.echo_config(), storage) as daemon:
        sock = str(daemon.socket_path)
        commands = {
            "chinwag": [*cli_argv(python), "--socket", sock, "send", *SEND],
            "pass": [python, "-c", "pass"],
            "bare": [python, "-c", BARE_CLIENT, sock],
        }
        for argv in commands.values():  # warm-up: caches, bytecode, the conversations
            timed(argv, env)
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(runs):
            for name, argv in commands.items():
                times[name].append(timed(argv, env))
    return times


def figures(root: Path, runs: int, storage: str | None = None) -> list[Figure]:
    times = measure(root, runs, storage)
    median = {name: statistics.median(found) for name, found in times.items()}
    chinwag = times["chinwag"]
    return [
        Figure(
            "cli_send_ms",
            "h",
            "`chinwag send assistant hi`, whole process, running daemon",
            "ms",
            median["chinwag"],
            "lower",
            [
                Baseline("python -c pass", median["pass"]),
                Baseline("bare client: blocking socket, stdlib json", median["bare"]),
            ],
            Target("<=", TARGET_MS),
            note=f"median of {runs} runs, interleaved with the baselines'; "
            f"chinwag's fastest {min(chinwag):.0f} ms, slowest {max(chinwag):.0f} ms",
        )
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30, help="runs of each command (default 30)")
    _processes.run_alone(parser, lambda root, args: figures(root, args.runs, args.storage))


if __name__ == "__main__":
    main()
