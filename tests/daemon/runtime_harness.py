"""The runtime without sockets, for the tests in this folder: a recording sink,
a runtime over memory storage, and a way to submit a run to it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
from chinwag.daemon._config import Config
from chinwag.daemon._runtime import Runtime
from chinwag.daemon._serve import build_agents, make_providers
from chinwag.protocol import End, StreamEventMsg, ToolResult
from chinwag.storage import MemoryStorage
from deadlines import RUN_S, deadline, describe


class Recorder:
    """A sink that keeps every event and lets a test await the end."""

    def __init__(self) -> None:
        self.events: list[StreamEventMsg] = []
        self.ended = trio.Event()

    def __call__(self, event: StreamEventMsg) -> bool:
        self.events.append(event)
        if isinstance(event, End):
            self.ended.set()
        return True

    async def finished(self, *, within: float = RUN_S) -> End:
        """The run's end, awaited; fails naming the events so far when it does not come."""
        with deadline(within, "the run's end", lambda: describe(self.events)):
            await self.ended.wait()
        return self.end

    @property
    def end(self) -> End:
        last = self.events[-1]
        assert isinstance(last, End)
        return last

    @property
    def result(self) -> ToolResult:
        """The run's first tool result."""
        return next(e for e in self.events if isinstance(e, ToolResult))


@asynccontextmanager
async def open_runtime(config: Config) -> AsyncIterator[Runtime]:
    async with trio.open_nursery() as nursery:
        yield Runtime(
            config, MemoryStorage(), build_agents(config, make_providers(config)), nursery
        )
        nursery.cancel_scope.cancel()


def submit(
    rt: Runtime,
    content: str,
    *,
    sender: str = "user",
    agent: str = "assistant",
    cwd: str | None = None,
) -> Recorder:
    sink = Recorder()
    rt.submit(
        agent=agent,
        sender=sender,
        content=content,
        guest=None,
        cwd=cwd,
        queue="enqueue",
        sink=sink,
    )
    return sink
