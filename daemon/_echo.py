"""`echo`, the built-in deterministic model: offline, and every path reachable from it."""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import AsyncGenerator

import trio
from chinwag.protocol import ToolCallInfo

from ._providers import (
    Chunk,
    FinishChunk,
    ModelMessage,
    ModelRequest,
    Prompt,
    ProviderError,
    TextChunk,
    ToolCallChunk,
    UsageChunk,
    new_call_id,
    word_count,
)


class EchoProvider:
    """Streams the last user message back, one text chunk per word.

    Directives make every path reachable offline: ``/slow N MS`` streams the
    words 1..N, each after MS ms; ``/title TEXT`` calls ``set_title``;
    ``/ask QUESTION`` calls ``ask_user``; ``/tool NAME JSON`` calls any tool;
    ``/fail TEXT`` fails like a provider. After tool results it echoes them.
    Asked for a summary, it answers one line per message of the transcript:
    who wrote it and its first `SUMMARY_WORDS` words (an earlier summary's lines
    are kept as they are). Usage counts words as tokens.
    """

    local = True

    async def aclose(self) -> None:
        pass

    async def list_models(self) -> list[str] | None:
        return None  # echo answers whatever the model is called

    async def stream(self, request: ModelRequest) -> AsyncGenerator[Chunk, None]:
        delay_s, chunks = _answer(request)
        for chunk in chunks:
            if delay_s and type(chunk) is TextChunk:
                await trio.sleep(delay_s)
            yield chunk


def _answer(request: ModelRequest) -> tuple[float, list[Chunk]]:
    """The whole answer at once, and the pause before each word (for `/slow`).

    Made in one go, not word by word: a long answer streams at the cost of one
    generator, as a network model's chunks would.
    """
    messages = request.messages
    # A step's Prompt keeps its count as the conversation grows: a run costs
    # the same however long the conversation is.
    prompt_tokens = (
        messages.words if isinstance(messages, Prompt) else sum(word_count(m) for m in messages)
    )
    last = messages[-1] if messages else ModelMessage(role="user", content="")
    if request.purpose == "summary":
        return 0.0, _summary(last.content, prompt_tokens)
    if last.role == "tool":
        # Echo every result of the step that just ran, in call order.
        results: list[str] = []
        for message in reversed(messages):
            if message.role != "tool":
                break
            results.append(message.content)
        return 0.0, _words(" ".join(reversed(results)).split(), prompt_tokens)
    text = last.content.strip()
    directive, _, rest = text.partition(" ")
    match directive:
        case "/slow":
            count, delay_ms = _slow_args(rest)
            return delay_ms / 1000, _words([str(i) for i in range(1, count + 1)], prompt_tokens)
        case "/fail":
            raise ProviderError(rest.strip() or "echo was asked to fail")
        case "/title":
            return 0.0, _call("set_title", json.dumps({"title": rest.strip()}), prompt_tokens)
        case "/ask":
            question = {"question": rest.strip(), "header": "", "options": []}
            return 0.0, _call("ask_user", json.dumps({"questions": [question]}), prompt_tokens)
        case "/tool":
            name, _, arguments = rest.strip().partition(" ")
            return 0.0, _call(name, arguments.strip() or "{}", prompt_tokens)
    return 0.0, _words(text.split(), prompt_tokens)


SUMMARY_WORDS = 8
_HEADING = re.compile(r"^## (\S+) · (.+)$", re.MULTILINE)


def _summary(transcript: str, prompt_tokens: int) -> list[Chunk]:
    lines: list[str] = []
    headings = list(_HEADING.finditer(transcript))
    for heading, after in zip(headings, [*headings[1:], None], strict=True):
        end = after.start() if after else transcript.rfind("</transcript>")
        body = transcript[heading.end() : end].strip()
        who = heading.group(2)
        if heading.group(1) == "earlier":
            lines.extend(line for line in body.splitlines() if line.strip())
        elif who == "user" or who.startswith("agent "):
            said = [line for line in body.splitlines() if not line.startswith("(calls ")]
            words = " ".join(said).split()[:SUMMARY_WORDS]
            if words:
                lines.append(f"{who.removeprefix('agent ')}: {' '.join(words)}")
    text = "\n".join(lines)
    return [TextChunk(text), UsageChunk(prompt_tokens, len(text.split())), FinishChunk("stop")]


def _slow_args(rest: str) -> tuple[int, float]:
    try:
        count, delay_ms = (float(part) for part in shlex.split(rest))
    except ValueError:
        raise ProviderError("echo: /slow takes two numbers, N and MS.", code=400) from None
    return int(count), delay_ms


def _call(name: str, arguments: str, prompt_tokens: int) -> list[Chunk]:
    call = ToolCallInfo(call_id=new_call_id(), name=name, arguments=arguments)
    return [ToolCallChunk(call), UsageChunk(prompt_tokens, 1), FinishChunk("tool_calls")]


def _words(words: list[str], prompt_tokens: int) -> list[Chunk]:
    """One text chunk per word (each but the first after a space), then usage and finish."""
    chunks: list[Chunk] = [TextChunk(word) for word in words[:1]]
    chunks.extend(TextChunk(" " + word) for word in words[1:])
    chunks.append(UsageChunk(prompt_tokens, len(words)))
    chunks.append(FinishChunk("stop"))
    return chunks
