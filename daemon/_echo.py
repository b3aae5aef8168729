"""`echo`, the built-in deterministic model: offline, and every path reachable from it."""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import AsyncGenerator, AsyncIterator

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
        messages = request.messages
        # A step's Prompt keeps its count as the conversation grows: a run costs
        # the same however long the conversation is.
        prompt_tokens = (
            messages.words if isinstance(messages, Prompt) else sum(word_count(m) for m in messages)
        )
        last = request.messages[-1] if request.messages else ModelMessage(role="user", content="")
        if request.purpose == "summary":
            for chunk in _summary(last.content, prompt_tokens):
                yield chunk
            return
        if last.role == "tool":
            # Echo every result of the step that just ran, in call order.
            results: list[str] = []
            for message in reversed(request.messages):
                if message.role != "tool":
                    break
                results.append(message.content)
            words = " ".join(reversed(results)).split()
            async for chunk in _words(words, prompt_tokens):
                yield chunk
            return
        text = last.content.strip()
        directive, _, rest = text.partition(" ")
        match directive:
            case "/slow":
                count, delay_ms = _slow_args(rest)
                async for chunk in _words(
                    [str(i) for i in range(1, count + 1)], prompt_tokens, delay_ms / 1000
                ):
                    yield chunk
            case "/fail":
                raise ProviderError(rest.strip() or "echo was asked to fail")
            case "/title":
                for chunk in _call("set_title", json.dumps({"title": rest.strip()}), prompt_tokens):
                    yield chunk
            case "/ask":
                question = {"question": rest.strip(), "header": "", "options": []}
                arguments = json.dumps({"questions": [question]})
                for chunk in _call("ask_user", arguments, prompt_tokens):
                    yield chunk
            case "/tool":
                name, _, arguments = rest.strip().partition(" ")
                for chunk in _call(name, arguments.strip() or "{}", prompt_tokens):
                    yield chunk
            case _:
                async for chunk in _words(text.split(), prompt_tokens):
                    yield chunk


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


async def _words(
    words: list[str], prompt_tokens: int, delay_s: float = 0.0
) -> AsyncIterator[Chunk]:
    for i, word in enumerate(words):
        if delay_s:
            await trio.sleep(delay_s)
        yield TextChunk(word if i == 0 else " " + word)
    yield UsageChunk(prompt_tokens, len(words))
    yield FinishChunk("stop")
