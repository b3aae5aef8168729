"""Compaction's model side: the summarization prompt chinwag owns, and the transcript it reads.

The summarizer is the agent's own provider and model, offered no tools. It
reads the archived entries as a transcript in which every entry is headed by
its seq and who wrote it (the user, an agent by name, a tool's result), so the
summary can keep who said what even when guests spoke; the previous summary,
if any, comes first, so facts survive any number of compactions. A transcript
longer than half the agent's context window is summarized in parts, each
with the summary so far, so a conversation too long for its model can still
be compacted. The tokens its calls take go on the compact marker, where the
store counts them as it counts a run's.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import aclosing

from chinwag.protocol import Entry, TokenUsage

from ._providers import ModelMessage, ModelRequest, Provider, TextChunk, UsageChunk

SUMMARY_PROMPT = """\
You compact a conversation so that it can go on from your summary instead of its \
transcript: the agent {agent} will see only your summary and what is said after it. \
Keep everything it needs to continue as if it remembered:
- who is who: the user, {agent}, and any other agent that spoke, and which of them \
said what where it matters;
- the facts the user gave about themselves or their world, their preferences and \
constraints, precisely (names, numbers, paths, dates);
- decisions taken and why;
- open tasks, promises and questions still waiting for an answer;
- the results of tool calls that later work relies on (what was found, written or \
failed), not their full output.
Drop greetings, repetition and whatever was superseded. Write in the conversation's \
language, as short paragraphs or bullet lists, at most about 400 words. Reply with the \
summary only."""

TOOL_OUTPUT_CHARS = 2000  # of one tool result in the transcript; the rest is elided


def transcript(agent: str, entries: Sequence[Entry], previous_summary: str | None) -> str:
    """The archived entries, each under a ``## <seq> · <who>`` heading."""
    names = {call.call_id: call.name for e in entries for call in e.tool_calls}
    parts: list[str] = []
    if previous_summary:
        parts.append(f"## earlier · summary of what came before\n{previous_summary}")
    for entry in entries:
        if entry.kind != "message":
            continue
        if entry.role == "user":
            who = "user"
        elif entry.role == "assistant":
            who = f"agent {entry.agent or agent}"
        else:
            name = names.get(entry.tool_call_id or "", "a tool")
            who = f"tool {'error' if entry.is_error else 'result'} of {name}"
        body = entry.content
        if entry.role == "tool" and len(body) > TOOL_OUTPUT_CHARS:
            elided = len(body) - TOOL_OUTPUT_CHARS
            body = f"{body[:TOOL_OUTPUT_CHARS]}… [{elided} more characters]"
        lines = [f"## {entry.seq} · {who}", body] if body else [f"## {entry.seq} · {who}"]
        lines += [f"(calls {call.name} {call.arguments})" for call in entry.tool_calls]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


CHARS_PER_TOKEN = 4  # a rough and cautious guess, for text of any model


def estimated_tokens(entry: Entry) -> int:
    """The entry's text and tool calls in tokens, as ``CHARS_PER_TOKEN`` guesses them."""
    return (len(entry.content) + sum(len(c.arguments) for c in entry.tool_calls)) // CHARS_PER_TOKEN


def transcript_parts(entries: Sequence[Entry], *, budget: int) -> list[list[Entry]]:
    """``entries`` cut into whole turns of about ``budget`` tokens at most each.

    A turn (a user entry and what answers it) is never cut, so one longer than
    the budget makes a part of its own.
    """
    parts: list[list[Entry]] = [[]]
    size = 0
    for entry in entries:
        cost = estimated_tokens(entry) + 8  # its heading
        if entry.role == "user" and parts[-1] and size + cost > budget:
            parts.append([])
            size = 0
        parts[-1].append(entry)
        size += cost
    return parts


def summary_request(
    *,
    agent: str,
    model: str,
    entries: Sequence[Entry],
    previous_summary: str | None,
    instructions: str | None,
) -> ModelRequest:
    """The request that asks ``agent``'s model to summarize ``entries``, without tools."""
    ask = f"Summarize this conversation between the user and the agent {agent}."
    if instructions:
        ask += f"\nThe summary must also keep: {instructions.strip()}"
    text = transcript(agent, entries, previous_summary)
    return ModelRequest(
        model=model,
        messages=[
            ModelMessage(role="system", content=SUMMARY_PROMPT.format(agent=agent)),
            ModelMessage(role="user", content=f"{ask}\n\n<transcript>\n{text}\n</transcript>"),
        ],
        purpose="summary",
    )


async def summarize(
    provider: Provider, request: ModelRequest, used: TokenUsage | None = None
) -> tuple[str, TokenUsage | None]:
    """What ``provider`` answers to the summary ``request``: its text, stripped, and
    ``used`` with the tokens of this call added (``used`` as it was when the provider
    reports none). Raises ``ProviderError``.
    """
    parts: list[str] = []
    async with aclosing(provider.stream(request)) as chunks:
        async for chunk in chunks:
            if isinstance(chunk, TextChunk):
                parts.append(chunk.delta)
            elif isinstance(chunk, UsageChunk):
                before = used or TokenUsage(input_tokens=0, output_tokens=0)
                used = TokenUsage(
                    input_tokens=before.input_tokens + chunk.prompt_tokens,
                    output_tokens=before.output_tokens + chunk.completion_tokens,
                )
    return "".join(parts).strip(), used
