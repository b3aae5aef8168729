"""Figures, each beside its baselines, and how they are printed and saved.

A `Figure` is one measurement of chinwag with the same measurement of one or
more baselines taken in the same run; `ratio` is always chinwag / baseline, so
for a latency a ratio above 1 means chinwag is slower, for a rate below 1.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import trio

REPO = Path(__file__).resolve().parent.parent

Better = Literal["lower", "higher"]


@dataclass
class Baseline:
    name: str
    value: float
    repeats: list[float] = field(default_factory=list)  # its value in every repeat

    def ratio(self, ours: float) -> float | None:
        return ours / self.value if self.value else None


@dataclass
class Target:
    """A goal from the issue: ``value`` with ``<=`` (lower is better) or ``>=``.

    With ``of``, the name of one of the figure's baselines, the goal is on the
    ratio chinwag / that baseline (``<= 1.3`` reads "at most 1.3x the baseline").
    """

    op: Literal["<=", ">="]
    value: float
    of: str | None = None

    def met(self, fig: Figure) -> bool:
        ours = fig.value if self.of is None else fig.ratio_to(self.of)
        if ours is None:
            return False
        return ours <= self.value if self.op == "<=" else ours >= self.value

    def text(self) -> str:
        return f"{self.op} {self.value:,g}{'x' if self.of else ''}"


@dataclass
class Figure:
    key: str  # stable across runs: matches a figure's repeats, names the JSON entry
    bench: str  # the section: "a" .. "e", "slow"
    name: str
    unit: str
    value: float
    better: Better
    baselines: list[Baseline] = field(default_factory=list)
    target: Target | None = None
    note: str = ""
    repeats: list[float] = field(default_factory=list)  # chinwag's value in every repeat

    def ratio_to(self, baseline: str) -> float | None:
        """chinwag / the baseline named so; None when it is missing or zero."""
        for base in self.baselines:
            if base.name == baseline:
                return base.ratio(self.value)
        return None

    def met(self) -> bool | None:
        """Whether the target is met; None without a target."""
        return None if self.target is None else self.target.met(self)

    def as_json(self) -> dict[str, object]:
        data = asdict(self)
        data["baselines"] = [
            {
                "name": b.name,
                "value": b.value,
                "ratio": b.ratio(self.value),
                "repeats": b.repeats,
                # Each repeat's own ratio, chinwag's value over the baseline's of that repeat.
                "ratio_repeats": [
                    ours / theirs if theirs else None
                    for ours, theirs in zip(self.repeats, b.repeats, strict=False)
                ],
            }
            for b in self.baselines
        ]
        data["target"] = (
            None
            if self.target is None
            else {
                "op": self.target.op,
                "value": self.target.value,
                "of": self.target.of,
                "met": self.met(),
            }
        )
        return data


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) by nearest rank; what every figure here uses."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def median_of(rounds: Sequence[Sequence[Figure]]) -> list[Figure]:
    """Per figure, the median over the repeats of chinwag's value and of each
    baseline's value alike, the ratio taken between the two medians.

    ``repeats`` (of the figure and of each baseline) keeps every repeat's value.
    The note is the median repeat's (the lower middle one for an even count),
    since some notes report what happened in their repeat.
    """
    seen: dict[str, list[Figure]] = {}
    for figures in rounds:
        for fig in figures:
            seen.setdefault(fig.key, []).append(fig)
    merged: list[Figure] = []
    for repeats in seen.values():
        values = [fig.value for fig in repeats]
        middle = sorted(repeats, key=lambda fig: fig.value)[(len(repeats) - 1) // 2]
        baselines: dict[str, list[float]] = {}
        for fig in repeats:
            for base in fig.baselines:
                baselines.setdefault(base.name, []).append(base.value)
        merged.append(
            replace(
                middle,
                value=statistics.median(values),
                repeats=values,
                baselines=[
                    Baseline(name, statistics.median(found), found)
                    for name, found in baselines.items()
                ],
            )
        )
    return merged


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


NAME = 66  # widths of the table's name columns
BASE = 44


def _aim(fig: Figure, base: Baseline) -> str:
    """Marks the baseline a ratio target is measured against."""
    return "  <- target" if fig.target is not None and fig.target.of == base.name else ""


def table(figures: Sequence[Figure]) -> str:
    """The figures as a fixed-width table, one line per baseline."""
    head = (
        f"{'figure':<{NAME}}{'chinwag':>10}  {'target':<11}{'':<7}"
        f"{'baseline (same run)':<{BASE}}{'value':>10}{'ratio':>8}"
    )
    lines = [head, "-" * len(head)]
    for fig in figures:
        target, met = "", ""
        if fig.target is not None:
            target = fig.target.text()
            met = "met" if fig.met() else "MISSED"
        name = f"({fig.bench}) {fig.name} ({fig.unit})"
        left = f"{name:<{NAME}}{_fmt(fig.value):>10}  {target:<11}{met:<7}"
        if not fig.baselines:
            lines.append(left.rstrip())
        for i, base in enumerate(fig.baselines):
            ratio = base.ratio(fig.value)
            lines.append(
                f"{left if i == 0 else ' ' * len(left)}{base.name:<{BASE}}{_fmt(base.value):>10}"
                f"{'-' if ratio is None else format(ratio, '.2f'):>8}{_aim(fig, base)}"
            )
        if fig.note:
            lines.append(f"{'':<4}{fig.note}")
    return "\n".join(lines)


def _spread(repeats: Sequence[float]) -> str:
    return f"{_fmt(min(repeats))} to {_fmt(max(repeats))}" if len(repeats) > 1 else ""


def markdown(figures: Sequence[Figure]) -> str:
    """The figures as a Markdown table, one row per baseline (for docs/benchmarks.md);
    with repeats, each baseline's value is followed by its spread."""
    rows = [
        "| figure | chinwag | repeats | target | | baseline (same run) | baseline | ratio |",
        "|---|--:|--:|---|---|---|--:|--:|",
    ]
    for fig in figures:
        spread = _spread(fig.repeats)
        target, met = "", ""
        if fig.target is not None:
            target = fig.target.text()
            if fig.target.of is not None:
                target += f" {fig.target.of}"
            met = "met" if fig.met() else "**missed**"
        name = f"({fig.bench}) {fig.name}, {fig.unit}".replace("|", "\\|")
        for i, base in enumerate(fig.baselines or [Baseline("", 0.0)]):
            ratio = base.ratio(fig.value)
            first = i == 0
            rows.append(
                f"| {name if first else ''} | {_fmt(fig.value) if first else ''} "
                f"| {spread if first else ''} | {target if first else ''} | {met if first else ''} "
                f"| {base.name} | {_fmt(base.value) if base.name else ''}"
                f"{f' ({_spread(base.repeats)})' if len(base.repeats) > 1 else ''} "
                f"| {'' if ratio is None else format(ratio, '.2f')} |"
            )
    return "\n".join(rows)


def machine() -> dict[str, object]:
    """What the figures were measured on, from /proc and platform."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kib = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(mem_kib / 1024 / 1024, 1),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "kernel": f"{platform.system()} {platform.release()}",
    }


def calibration() -> dict[str, float]:
    """How fast this machine runs Python and trio, to compare runs across machines."""
    started = time.perf_counter()
    total = 0
    for i in range(2_000_000):
        total += i
    loop_s = time.perf_counter() - started

    async def checkpoints() -> float:
        t0 = time.perf_counter()
        for _ in range(20_000):
            await trio.lowlevel.checkpoint()
        return (time.perf_counter() - t0) / 20_000

    return {
        "python_loop_ns": round(loop_s / 2_000_000 * 1e9, 1),
        "trio_checkpoint_us": round(trio.run(checkpoints) * 1e6, 2),
    }


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def git_revision(
    tree: Path = REPO, folders: Sequence[str] = ("daemon", "protocol", "storage")
) -> str:
    """The commit of ``tree``, with ``+dirty`` when ``folders`` (by default the
    daemon's) have changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=tree,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", *folders],
            cwd=tree,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def describe_machine(info: dict[str, object]) -> str:
    text = (
        f"{info['cpu']}, {info['cores']} cores, {info['ram_gib']} GiB RAM, "
        f"{info['implementation']} {info['python']}, {info['kernel']}"
    )
    if isinstance(speed := info.get("calibration"), dict):
        text += (
            f"; a Python loop step {speed['python_loop_ns']} ns, "
            f"a trio checkpoint {speed['trio_checkpoint_us']} us"
        )
    return text


def write_json(path: Path, report: dict[str, object], figures: Sequence[Figure]) -> None:
    data = dict(report, figures=[fig.as_json() for fig in figures])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def print_figures(title: str, figures: Sequence[Figure]) -> None:
    """What a single benchmark's own command prints."""
    print(title)
    print("ratio = chinwag / baseline; " + describe_machine(machine()))
    print(table(figures))
    sys.stdout.flush()
