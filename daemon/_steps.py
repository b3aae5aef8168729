"""The step loop of a turn: call the model, stream what it says, run its tool calls, store.

It talks to four things only: the ``Turn`` it drives (a tool context that
also builds each step's prompt, publishes events and stores entries) and the
speaker's provider. Each step is stored whole, the assistant message with all
its tool results in one append, or not at all.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import aclosing
from datetime import UTC, datetime
from typing import Any, Protocol

import trio
from chinwag.protocol import (
    Entry,
    StreamEventMsg,
    TextDelta,
    ThinkingDelta,
    TokenUsage,
    ToolCall,
    ToolCallInfo,
    ToolResult,
    Usage,
)

from ._agent import Agent
from ._providers import (
    FinishChunk,
    ModelMessage,
    ModelRequest,
    ProviderBlockChunk,
    TextChunk,
    ThinkingChunk,
    ToolCallChunk,
    UsageChunk,
)
from ._telemetry import ModelCall, RunTelemetry
from ._tools import ToolContext, call_tool

# Chunks a run publishes before it lets other tasks run, when the model sends
# them without pause: a burst never outgrows a connection's or a subscriber's buffer.
BURST_CHUNKS = 256


class StepsExhausted(Exception):
    """The agent used up its ``max_steps`` without a final answer."""


class Turn(ToolContext, Protocol):
    """What the step loop may do to the run it drives."""

    id: str
    context_tokens: int  # as the model last reported it
    observed: RunTelemetry  # what the run reports of itself (metrics, spans)

    def prompt(self) -> Sequence[ModelMessage]:
        """The messages of the next step's request."""
        ...

    def publish(self, event: StreamEventMsg) -> None: ...

    async def append(self, entries: list[Entry], blocks: list[dict[str, Any]]) -> None:
        """Store one step whole (shielded); ``blocks`` go back with it in later requests."""
        ...


def now() -> datetime:
    return datetime.now(UTC)


async def run_steps(turn: Turn, speaker: Agent, *, guest: bool) -> None:
    """Model steps until a final answer; ``StepsExhausted`` after ``max_steps``.

    A guest speaks text only: it is offered no tools and its tool calls are
    ignored (no events, nothing stored). Cancellation lands inside the
    provider's read or a tool; the step in progress is then dropped.
    """
    config = speaker.config
    attribution = speaker.name if guest else ""
    allowed = [] if guest else config.tools
    tools = [] if guest else speaker.tools
    publish = turn.publish
    observed = turn.observed
    first = observed.awaits_first  # the run's first output is still to come
    for _ in range(config.max_steps):
        request = ModelRequest(model=config.model, messages=turn.prompt(), tools=tools)
        text: list[str] = []
        calls: list[ToolCallInfo] = []
        blocks: list[dict[str, Any]] = []
        used: TokenUsage | None = None
        with observed.model_call(request) as model_call:
            async with aclosing(speaker.provider.stream(request)) as chunks:
                burst = 0
                async for chunk in chunks:
                    burst += 1
                    if burst == BURST_CHUNKS:  # let the writers drain a burst as it grows
                        burst = 0
                        await trio.lowlevel.checkpoint()
                    # By type, most frequent first: a `match` on class patterns costs more
                    # than the rest of a text chunk's way to the socket.
                    if type(chunk) is TextChunk:
                        if first:
                            first = False
                            observed.first_output()
                        text.append(chunk.delta)
                        publish(TextDelta(delta=chunk.delta))
                    elif type(chunk) is ThinkingChunk:
                        if first:
                            first = False
                            observed.first_output()
                        publish(ThinkingDelta(delta=chunk.delta))
                    elif isinstance(chunk, ProviderBlockChunk):
                        blocks.append(chunk.block)
                    elif isinstance(chunk, ToolCallChunk):
                        if guest:
                            continue
                        if first:
                            first = False
                            observed.first_output()
                        call = chunk.call
                        calls.append(call)
                        publish(
                            ToolCall(call_id=call.call_id, name=call.name, arguments=call.arguments)
                        )
                    elif isinstance(chunk, UsageChunk):
                        model_call.usage(chunk.prompt_tokens, chunk.completion_tokens)
                        used = TokenUsage(
                            input_tokens=chunk.prompt_tokens, output_tokens=chunk.completion_tokens
                        )
                        tokens = chunk.prompt_tokens + chunk.completion_tokens
                        turn.context_tokens = tokens
                        publish(
                            Usage(
                                prompt_tokens=chunk.prompt_tokens,
                                completion_tokens=chunk.completion_tokens,
                                context_tokens=tokens,
                                context_window=config.context_window,
                            )
                        )
                    elif isinstance(chunk, FinishChunk):
                        model_call.finished(chunk.reason)
            assistant = Entry(
                seq=0,
                role="assistant",
                content="".join(text),
                agent=attribution,
                tool_calls=calls,
                run_id=turn.id,
                created_at=now(),
                usage=used,
            )
            model_call.answered(assistant)
        if not calls:
            await turn.append([assistant], [])
            return
        results = await _call_tools(turn, calls, allowed, model_call)
        await turn.append([assistant, *results], blocks)
    raise StepsExhausted


async def _call_tools(
    turn: Turn, calls: list[ToolCallInfo], allowed: list[str], asked_by: ModelCall
) -> list[Entry]:
    """Run a step's tool calls concurrently, each reported under the model call that
    ``asked_by`` them; results in call order, for storage."""
    results: dict[str, Entry] = {}

    async def one(call: ToolCallInfo) -> None:
        with asked_by.tool(call) as observed:  # on the task that runs it
            started = time.perf_counter()
            output, is_error = await call_tool(turn, allowed, call)
            duration_s = time.perf_counter() - started
            observed.result(output, is_error, duration_s)
        results[call.call_id] = Entry(
            seq=0,
            role="tool",
            content=output,
            tool_call_id=call.call_id,
            is_error=is_error,
            run_id=turn.id,
            created_at=now(),
        )
        turn.publish(
            ToolResult(
                call_id=call.call_id,
                output=output,
                is_error=is_error,
                duration_ms=round(duration_s * 1000, 3),
            )
        )

    async with trio.open_nursery() as nursery:
        for call in calls:
            nursery.start_soon(one, call)
    return [results[call.call_id] for call in calls]
