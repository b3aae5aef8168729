"""The model provider interface, and `echo`, the built-in deterministic model.

A provider turns a ``ModelRequest`` into a stream of chunks: text, thinking,
complete tool calls, usage, and a finish, and blocks it needs sent back with
the step (``ProviderBlockChunk``). Cancellation (kill) reaches it at its next
checkpoint; a provider holds nothing that outlives the stream.
"""

from __future__ import annotations

import itertools
import json
import re
import shlex
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Sequence
from typing import Any, Literal, Protocol, overload

import msgspec
import trio
from chinwag.protocol import ToolCallInfo

from ._config import ProviderConfig


class ModelMessage(msgspec.Struct, kw_only=True):
    role: str  # system, user, assistant, tool
    content: str
    tool_calls: list[ToolCallInfo] = msgspec.field(default_factory=list)
    tool_call_id: str | None = None
    is_error: bool = False  # a tool result that reports a failure
    # What the provider gave with this (assistant) message and needs back unchanged
    # in later requests (Anthropic's signed thinking blocks, see ProviderBlockChunk).
    # Opaque to everything else; a provider that sent none ignores it.
    provider_blocks: list[dict[str, Any]] = msgspec.field(default_factory=list)


def word_count(message: ModelMessage) -> int:
    """The message's length as `echo` counts tokens: its words."""
    return len(message.content.split())


class Prompt(Sequence[ModelMessage]):
    """A request's messages: a head made for this step, then a view of kept messages.

    Built in O(1) however long the conversation: ``body`` is the conversation's
    own list, not copied, seen up to its length when the prompt was made (the
    list may grow while the request is out); ``tail`` holds what is not in it
    yet (a user entry whose write is still in flight). ``words`` is the total
    `echo` reports as prompt tokens, kept by the caller per message as the
    conversation grows (``body_words`` covers ``body[:len]``).
    """

    __slots__ = ("_body", "_head", "_length", "_tail", "words")

    def __init__(
        self,
        head: Sequence[ModelMessage],
        body: list[ModelMessage],
        body_words: int,
        tail: Sequence[ModelMessage] = (),
    ) -> None:
        self._head = head
        self._body = body
        self._tail = tail
        self._length = len(body)
        self.words = (
            body_words + sum(word_count(m) for m in head) + sum(word_count(m) for m in tail)
        )

    def __len__(self) -> int:
        return len(self._head) + self._length + len(self._tail)

    def __iter__(self) -> Iterator[ModelMessage]:
        return itertools.chain(self._head, itertools.islice(self._body, self._length), self._tail)

    @overload
    def __getitem__(self, index: int) -> ModelMessage: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[ModelMessage]: ...
    def __getitem__(self, index: int | slice) -> ModelMessage | Sequence[ModelMessage]:
        if isinstance(index, slice):
            return list(self)[index]
        size = len(self)
        if index < 0:
            index += size
        if not 0 <= index < size:
            raise IndexError("prompt index out of range")
        if index < len(self._head):
            return self._head[index]
        index -= len(self._head)
        if index < self._length:
            return self._body[index]
        return self._tail[index - self._length]


class ToolSchema(msgspec.Struct, kw_only=True):
    name: str
    description: str
    parameters: dict[str, Any]


class ModelRequest(msgspec.Struct, kw_only=True):
    model: str
    messages: Sequence[ModelMessage]  # a list, or a step's `Prompt`
    tools: list[ToolSchema] = msgspec.field(default_factory=list)
    # A summary request asks for a compaction summary (see _compaction.py);
    # real models read its prompt, `echo` answers it deterministically.
    purpose: Literal["reply", "summary"] = "reply"


class TextChunk(msgspec.Struct):
    delta: str


class ThinkingChunk(msgspec.Struct):
    delta: str


class ToolCallChunk(msgspec.Struct):
    call: ToolCallInfo


class ProviderBlockChunk(msgspec.Struct):
    """A block of the answer the provider needs back, unchanged, when the run goes on.

    The runtime keeps these with the step's assistant message and hands them
    back as ``ModelMessage.provider_blocks`` in the run's later requests: the
    Anthropic API refuses to continue a tool loop with thinking enabled unless
    the step's thinking blocks come back with their signatures. Never shown to
    clients (the thinking text streams as ``ThinkingChunk``) and never stored.
    """

    block: dict[str, Any]


class UsageChunk(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int


class FinishChunk(msgspec.Struct):
    reason: str  # stop, tool_calls, length


Chunk = TextChunk | ThinkingChunk | ToolCallChunk | ProviderBlockChunk | UsageChunk | FinishChunk


class ProviderError(Exception):
    """The model provider failed; the run ends `error` with ``code`` (502 by default).

    ``status`` is the HTTP status the provider answered, where it answered one
    (set by ``list_models``, for the hint `chinwag doctor` gives).
    """

    def __init__(self, message: str, code: int = 502, *, status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


class Provider(Protocol):
    local: bool
    """True when the model answers from this process, with no round trip to wait
    for: a run then stores its user entry before the first request, since there
    is nothing to overlap the write with."""

    def stream(self, request: ModelRequest) -> AsyncGenerator[Chunk, None]:
        """Stream the model's answer to ``request``; raises ``ProviderError``."""
        ...

    async def aclose(self) -> None: ...

    async def list_models(self) -> list[str] | None:
        """The model ids the endpoint lists, or None when it takes any name.

        A health check (`chinwag doctor`), not part of a run: one attempt, a
        short timeout. Raises ``ProviderError`` when the endpoint cannot be
        reached or refuses (``status`` then holds its HTTP status, if any).
        """
        ...


#: How long listing an endpoint's models may take: a health check, not a run.
LIST_MODELS_TIMEOUT_S = 10.0


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:16]}"


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


def make_provider(config: ProviderConfig) -> Provider:
    match config.kind:
        case "echo":
            return EchoProvider()
        case "openai":
            # Imported here: the SDK takes a while to import, and echo never needs it.
            from ._openai import OpenAIProvider

            return OpenAIProvider(config)
        case "anthropic":
            from ._anthropic import AnthropicProvider

            return AnthropicProvider(config)
    raise AssertionError(f"unhandled provider kind {config.kind!r}")
