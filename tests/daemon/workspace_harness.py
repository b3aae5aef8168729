"""What the workspace and run_command tests share: a temporary tree, a runtime whose
agents hold the workspace tools, one tool call, and a child process's liveness."""

from __future__ import annotations

import json
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

from chinwag.daemon._config import AgentConfig, Config, DaemonConfig
from chinwag.daemon._runtime import Runtime
from chinwag.protocol import ToolResult
from runtime_harness import open_runtime, submit

WORKSPACE = ["read_file", "write_file", "list_dir", "run_command"]


@contextmanager
def temporary_area() -> Iterator[Path]:
    """A temporary tree: `root/ws` is the working directory, `root/outside` is not."""
    with tempfile.TemporaryDirectory(prefix="cw-ws-") as d:
        root = Path(d).resolve()
        (root / "ws").mkdir()
        (root / "outside").mkdir()
        (root / "outside" / "secret.txt").write_text("top secret\n")
        yield root


@asynccontextmanager
async def runtime(
    area: Path, *, assistant: dict[str, object] | None = None, **daemon: object
) -> AsyncIterator[Runtime]:
    """A runtime on memory storage; ``assistant`` adds keys to that agent's config."""
    daemon.setdefault("allowed_roots", [str(area / "ws")])
    config = Config(
        daemon=DaemonConfig(**daemon),  # type: ignore[arg-type]
        agents={
            "assistant": AgentConfig(provider="echo", tools=WORKSPACE, **(assistant or {})),  # type: ignore[arg-type]
            "placed": AgentConfig(provider="echo", tools=WORKSPACE, cwd=str(area / "ws")),
            "bare": AgentConfig(provider="echo", tools=["set_title"]),
        },
    )
    async with open_runtime(config) as rt:
        yield rt


def tool(name: str, **args: object) -> str:
    return f"/tool {name} {json.dumps(args)}"


async def call(
    rt: Runtime, area: Path, name: str, *, within: float = 30.0, **args: object
) -> ToolResult:
    """One tool call in a run whose cwd is `area/ws`; its result, within ``within`` s."""
    sink = submit(rt, tool(name, **args), cwd=str(area / "ws"))
    await sink.finished(within=within)
    assert sink.end.status == "done", sink.end
    return sink.result


def alive(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie (killed, not yet reaped) counts as gone."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def written(path: Path) -> bool:
    """Whether a command has finished writing ``path`` (its line ends)."""
    return path.exists() and path.read_text().endswith("\n")
