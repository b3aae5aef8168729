"""The model provider interface: a request in, a stream of chunks out.

A provider turns a ``ModelRequest`` into a stream of chunks: text, thinking,
complete tool calls, usage, and a finish, and blocks it needs sent back with
the step (``ProviderBlockChunk``). Cancellation (kill) reaches it at its next
checkpoint; a provider holds nothing that outlives the stream.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import AsyncGenerator, Iterator, Sequence
from typing import Any, Literal, Protocol, overload

import msgspec
from chinwag.protocol import ToolCallInfo


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
