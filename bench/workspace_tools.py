"""What the workspace's confinement costs: `run_command` and `read_file`, in process.

- `run_command true` under its reaper (a Python process of its own that keeps
  what the command starts), beside the same tool with the reaper off (the
  process-group kill it replaced) and a bare ``trio.run_process(["bash", "-c",
  "true"])``; and in bubblewrap, beside bare bubblewrap, where it runs here.
- `read_file` of a file four directories deep, the path opened by one
  ``openat2`` (``RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS``), beside the walk with
  ``O_NOFOLLOW`` it falls back to and a bare ``open().read()``.

Every mode's runs are interleaved so that all see the same machine; each
figure is the median over ``--repeat`` rounds of each round's median.

    python -m bench.workspace_tools [--runs 40] [--reads 2000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import trio
from chinwag.daemon import _command, _workspace
from chinwag.daemon._command import Sandbox, bwrap_argv, sandbox_problem
from chinwag.daemon._workspace import Workspace

from ._processes import run_alone
from ._report import Baseline, Figure


@dataclass
class _Run:
    workspace: Workspace


def _run_of(root: Path, sandbox: Sandbox | None = None) -> _Run:
    return _Run(Workspace(str(root), (str(root),), 60.0, sandbox=sandbox))


async def _ms(call: Callable[[], Awaitable[object]]) -> float:
    started = time.perf_counter()
    await call()
    return (time.perf_counter() - started) * 1000


async def _commands(root: Path, runs: int) -> dict[str, list[float]]:
    plain, boxed = _run_of(root), _run_of(root, Sandbox())
    args = {"command": "true"}

    async def reaper() -> str:
        return await _workspace._run_command(plain, args)

    async def group() -> str:
        was, _command._keeper.subreaper = _command._keeper.subreaper, False
        try:
            return await _workspace._run_command(plain, args)
        finally:
            _command._keeper.subreaper = was

    async def bare() -> object:
        return await trio.run_process(["bash", "-c", "true"], cwd=root)

    modes: dict[str, Callable[[], Awaitable[object]]] = {
        "reaper": reaper,
        "group": group,
        "bare": bare,
    }
    if sandbox_problem("bwrap") is None:
        argv = [*bwrap_argv(str(root), network=False, read_only=()), "bash", "-c", "true"]

        async def sandboxed() -> str:
            return await _workspace._run_command(boxed, args)

        async def bare_bwrap() -> object:
            return await trio.run_process(argv, cwd=root)

        modes |= {"sandboxed": sandboxed, "bare bwrap": bare_bwrap}
    for call in modes.values():  # warm-up: the reaper's bytecode, the page cache
        await call()
    times: dict[str, list[float]] = {name: [] for name in modes}
    for _ in range(runs):
        for name, call in modes.items():
            times[name].append(await _ms(call))
    return times


def _reads(root: Path, reads: int) -> dict[str, list[float]]:
    deep = root / "a" / "b" / "c" / "d"
    deep.mkdir(parents=True)
    (deep / "f.txt").write_text("one line\n" * 100)
    run, args = _run_of(root), {"path": "a/b/c/d/f.txt"}
    kernel = _workspace._openat2

    def openat2() -> object:
        return _workspace._read(run, args)

    def walk() -> object:
        _workspace._openat2 = None
        try:
            return _workspace._read(run, args)
        finally:
            _workspace._openat2 = kernel

    def bare() -> object:
        with open(deep / "f.txt", "rb") as file:
            return file.read()

    modes: dict[str, Callable[[], object]] = {"walk": walk, "bare": bare}
    if kernel is not None:
        modes = {"openat2": openat2, **modes}
    times: dict[str, list[float]] = {name: [] for name in modes}
    for _ in range(reads):
        for name, call in modes.items():
            started = time.perf_counter()
            call()
            times[name].append((time.perf_counter() - started) * 1e6)
    return times


def figures(root: Path, runs: int, reads: int) -> list[Figure]:
    commands = trio.run(_commands, root, runs)
    median = {name: statistics.median(found) for name, found in commands.items()}
    found = [
        Figure(
            "run_command_true_ms",
            "ws",
            "run_command `true`, under its reaper",
            "ms",
            median["reaper"],
            "lower",
            [
                Baseline("the same, process group only (no reaper)", median["group"]),
                Baseline("bare trio.run_process bash -c true", median["bare"]),
            ],
            note=f"median of {runs} runs, interleaved",
        )
    ]
    if "sandboxed" in median:
        found.append(
            Figure(
                "run_command_bwrap_true_ms",
                "ws",
                'run_command `true`, sandbox = "bwrap"',
                "ms",
                median["sandboxed"],
                "lower",
                [Baseline("bare bwrap, same command line", median["bare bwrap"])],
                note=f"median of {runs} runs, interleaved",
            )
        )
    times = _reads(root / "tree", reads)
    read = {name: statistics.median(found) for name, found in times.items()}
    best = "openat2" if "openat2" in read else "walk"
    found.append(
        Figure(
            "read_file_depth4_us",
            "ws",
            f"read_file, 4 directories deep ({best})",
            "us",
            read[best],
            "lower",
            [
                *([Baseline("the O_NOFOLLOW walk", read["walk"])] if best != "walk" else []),
                Baseline("bare open().read()", read["bare"]),
            ],
            note=f"median of {reads} reads, interleaved",
        )
    )
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40, help="commands per mode (default 40)")
    parser.add_argument("--reads", type=int, default=2000, help="reads per mode (default 2000)")
    run_alone(parser, lambda root, args: figures(root, args.runs, args.reads), daemon=False)


if __name__ == "__main__":
    main()
