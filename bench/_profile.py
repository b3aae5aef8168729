"""Sampling the daemon with py-spy while a benchmark drives it, and reading the samples.

`python -m bench --profile DIR` attaches `py-spy record --gil --threads` to
each `chinwag serve` the benchmarks start, writes DIR/<daemon>.txt (collapsed
stacks: feed them to flamegraph.pl or speedscope) and DIR/<daemon>.summary.txt:
where the daemon's threads spent their samples, by function, self (the frame
on top) and total (anywhere on the stack).

`--gil` keeps only samples of a thread holding the GIL: Python running on a
CPU, which is what an optimisation of the daemon's code can move. Without it
py-spy also counts a thread that is off the CPU inside a system call as busy:
on a 2-vCPU VM the main thread then shows 35-45% in the socket `send` that wakes
the client, which is the scheduler, not the daemon's work.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
from collections import Counter
from pathlib import Path

RATE = 250  # samples a second
# Where a thread waits, which py-spy counts as active: the trio loop in epoll,
# a worker thread for its next job.
IDLE = {"_io_epoll.py:EpollIOManager.get_events", "_thread_cache.py:WorkerThread._work"}
_LINE = re.compile(r"^(?P<stack>.*) (?P<count>\d+)$")
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]*)(?::\d+)?\)$")


def available() -> bool:
    return shutil.which("py-spy") is not None


def start(pid: int, out: Path) -> subprocess.Popen[bytes]:
    """Record ``pid`` into ``out`` until `stop`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [
            "py-spy",
            "record",
            "--pid",
            str(pid),
            "--rate",
            str(RATE),
            "--format",
            "raw",
            "--threads",
            "--gil",
            "-o",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def stop(recorder: subprocess.Popen[bytes]) -> None:
    """Stop recording; py-spy writes its file on SIGINT."""
    if recorder.poll() is None:
        recorder.send_signal(signal.SIGINT)
    try:
        recorder.wait(30)
    except subprocess.TimeoutExpired:
        recorder.kill()
        recorder.wait(10)


def _name(frame: str) -> str:
    """`func (path/to/module.py:12)` -> `module.py:func`."""
    match = _FRAME.match(frame)
    if match is None:
        return frame
    return f"{Path(match['file']).name}:{match['func']}"


def _thread(label: str) -> str:
    """trio names a worker thread after its job; fold them all into one."""
    return "main thread (the trio loop)" if "MainThread" in label else "worker threads"


def summarize(path: Path, top: int = 25, rate: int = RATE) -> str:
    """Per thread, the functions with the most samples, self and total, in %.

    The % are of a thread's busy samples: those not waiting (see ``IDLE``;
    with ``--gil`` there are hardly any others).
    Frames on every busy sample (the interpreter's entry, `trio.run`) are left out.
    """
    threads: dict[str, tuple[Counter[str], Counter[str]]] = {}
    for line in path.read_text().splitlines():
        match = _LINE.match(line)
        if match is None:
            continue
        frames = match["stack"].split(";")
        count = int(match["count"])
        self_counts, total_counts = threads.setdefault(_thread(frames[0]), (Counter(), Counter()))
        names = [_name(frame) for frame in frames[1:]]
        top_frame = names[-1] if names else "?"
        self_counts[top_frame] += count
        if top_frame not in IDLE:
            for name in set(names):
                total_counts[name] += count
    out: list[str] = [f"profile {path} ({rate} samples/s of GIL-holding threads)"]
    for thread, (self_counts, total_counts) in sorted(threads.items()):
        samples = sum(self_counts.values())
        busy = samples - sum(self_counts.pop(name, 0) for name in IDLE)
        if not busy:
            continue
        out.append(
            f"  {thread}: {samples} samples, {busy} busy ({100 * busy / samples:.0f}%), "
            "% of the busy ones"
        )
        out.append(f"    {'self %':>7}  function")
        for name, count in self_counts.most_common(top):
            out.append(f"    {100 * count / busy:>7.1f}  {name}")
        out.append(f"    {'total %':>7}  function")
        for name, count in total_counts.most_common(top + 10):
            if count < busy:
                out.append(f"    {100 * count / busy:>7.1f}  {name}")
    return "\n".join(out)
