"""The `openai` provider: streaming Chat Completions on the official SDK.

Anything that speaks the API works: OpenAI, Ollama, vLLM, llama.cpp server,
LM Studio, OpenRouter. ``AsyncOpenAI`` does its I/O through httpx on anyio, so
it runs unmodified under trio, and a kill's cancellation lands in its socket
read (or in its retry back-off), which closes the HTTP connection.

Every failure leaves as a ``ProviderError`` with code 502, the protocol's "the
model provider failed": an error status after the SDK's retries, a broken or
malformed stream, an unreachable server, or one silent for longer than the
configured ``timeout_s``; the message says which.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

import msgspec
import openai
from chinwag.protocol import ToolCallInfo, without_credentials
from openai import AsyncStream
from openai.types.chat import ChatCompletion

from ._config import ProviderConfig
from ._providers import (
    LIST_MODELS_TIMEOUT_S,
    Chunk,
    FinishChunk,
    ModelMessage,
    ModelRequest,
    ProviderError,
    TextChunk,
    ThinkingChunk,
    ToolCallChunk,
    ToolSchema,
    UsageChunk,
    new_call_id,
)

# Local servers take no key, but the SDK insists on one; this one is never checked.
PLACEHOLDER_KEY = "no-key"


class OpenAIProvider:
    """One ``AsyncOpenAI`` client (and its connection pool) per provider."""

    local = False  # a network model: a run overlaps its user entry's write with the request

    def __init__(self, config: ProviderConfig) -> None:
        self.base_url = config.base_url
        self.timeout_s = config.timeout_s
        self._effort = config.effort  # a reasoning model's `reasoning_effort`, when set
        # The SDK's own timeout, not a trio cancel scope: it bounds the wait for
        # each byte, so a long answer that keeps streaming is never cut off.
        self._client = openai.AsyncOpenAI(
            api_key=config.resolve_api_key() or PLACEHOLDER_KEY,
            base_url=config.base_url,
            timeout=config.timeout_s,
            max_retries=config.max_retries,
            default_headers=config.extra_headers or None,
        )

    async def aclose(self) -> None:
        await self._client.close()

    async def list_models(self) -> list[str] | None:
        """The ids `GET /models` lists: one attempt, at most `LIST_MODELS_TIMEOUT_S`.

        Raises ``ProviderError`` (with the HTTP ``status`` when there was one).
        """
        timeout = min(self.timeout_s, LIST_MODELS_TIMEOUT_S)
        client = self._client.with_options(max_retries=0, timeout=timeout)
        try:
            return [model.id async for model in client.models.list()]
        except openai.APITimeoutError as exc:
            raise ProviderError(f"The model provider did not answer within {timeout:g} s.") from exc
        except openai.APIStatusError as exc:
            raise ProviderError(self._error(exc).message, status=exc.status_code) from exc
        except Exception as exc:
            raise self._error(exc) from exc

    async def stream(self, request: ModelRequest) -> AsyncGenerator[Chunk, None]:
        """Stream one model step; tool calls come whole, after the text, before the finish.

        Raises ``ProviderError`` for every failure; cancellation propagates and
        closes the HTTP response.
        """
        # Plain dicts, typed Any: the SDK's TypedDicts for them change between versions.
        messages: list[Any] = [_message(m) for m in request.messages]
        options: dict[str, Any] = {}
        if request.tools:  # some servers reject an empty list
            options["tools"] = [_tool(t) for t in request.tools]
        if self._effort is not None:
            options["reasoning_effort"] = self._effort
        body = {
            "model": request.model,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
            **options,
        }
        try:
            # The SDK's documented `post` for a body we built ourselves: `create`
            # would walk every message through its TypedDict transform first,
            # which costs more than everything else in a step, and grows with
            # the context. Retries, auth, errors and chunk parsing stay the SDK's.
            response = await self._client.post(
                "/chat/completions",
                body=body,
                cast_to=ChatCompletion,
                stream=True,
                # Each event as the SDK decodes it, a dict, made a `_Chunk` below:
                # its own pydantic models would cost 3x the CPU per streamed token.
                stream_cls=AsyncStream[dict[str, Any]],
            )
        except Exception as exc:
            raise self._error(exc) from exc
        calls = _ToolCalls()
        usage: UsageChunk | None = None
        finish: str | None = None
        async with response:
            try:
                async for data in response:
                    event = msgspec.convert(data, _Chunk)
                    if event.usage is not None:
                        usage = UsageChunk(
                            event.usage.prompt_tokens or 0, event.usage.completion_tokens or 0
                        )
                    for choice in event.choices:
                        if choice.index not in (0, None):
                            continue  # we ask for one choice; a server may still number it
                        delta = choice.delta or _NO_DELTA
                        if thought := delta.reasoning_content or delta.reasoning:
                            yield ThinkingChunk(thought)
                        if delta.content:
                            yield TextChunk(delta.content)
                        for fragment in delta.tool_calls or ():
                            calls.add(fragment)
                        if choice.finish_reason is not None:
                            finish = choice.finish_reason
            except Exception as exc:
                raise self._error(exc) from exc
        if finish is None:
            raise ProviderError(
                "The model provider's stream ended before the model finished its answer."
            )
        for call in calls.complete():
            yield ToolCallChunk(call)
        if usage is not None:
            yield usage
        yield FinishChunk(finish)

    def _error(self, exc: Exception) -> ProviderError:
        """The one sentence a client sees for an SDK (or transport) failure."""
        match exc:
            case openai.APIStatusError():
                detail = _detail(exc.body) or _sentence(exc.response.reason_phrase or "no detail")
                return ProviderError(f"The model provider answered {exc.status_code}: {detail}")
            case openai.APITimeoutError():
                return ProviderError(
                    f"The model provider did not answer within {self.timeout_s:g} s."
                )
            case openai.APIConnectionError():
                cause = _sentence(str(exc.__cause__ or exc))
                where = without_credentials(self.base_url or "api.openai.com")
                return ProviderError(
                    f"The connection to the model provider at {where} failed: {cause}"
                )
            case openai.APIError():
                detail = _detail(exc.body) or _sentence(exc.message)
                return ProviderError(f"The model provider failed mid-answer: {detail}")
        # Malformed streams: an SSE line that is not JSON, a chunk of the wrong
        # shape; and, on older SDKs, transport errors that escape unwrapped.
        return ProviderError(
            "The model provider sent a malformed stream: "
            + _sentence(f"{type(exc).__name__}: {exc}")
        )


# The parts of a Chat Completions chunk this provider reads; the rest is ignored.
# Where servers put reasoning text: vLLM, DeepSeek and llama.cpp say
# `reasoning_content`; Ollama and OpenRouter say `reasoning`.


class _FunctionDelta(msgspec.Struct):
    name: str | None = None
    arguments: str | None = None


class _ToolCallDelta(msgspec.Struct):
    index: int | None = None
    id: str | None = None
    function: _FunctionDelta | None = None


class _Delta(msgspec.Struct):
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[_ToolCallDelta] | None = None


_NO_DELTA = _Delta()


class _Choice(msgspec.Struct):
    index: int | None = 0
    delta: _Delta | None = None
    finish_reason: str | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class _Chunk(msgspec.Struct):
    choices: list[_Choice] = msgspec.field(default_factory=list)
    usage: _Usage | None = None


@dataclass
class _PartialCall:
    call_id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)


class _ToolCalls:
    """Tool calls assembled from their fragments, keyed by ``index``.

    The id and name come in a call's first fragment; later fragments carry
    pieces of the arguments. A server that repeats them is not misread.
    """

    def __init__(self) -> None:
        self.calls: dict[int, _PartialCall] = {}

    def add(self, fragment: _ToolCallDelta) -> None:
        index = fragment.index
        if index is None:  # not to spec, but some servers leave it out: go by the id
            known = [i for i, c in self.calls.items() if fragment.id and c.call_id == fragment.id]
            if known:
                index = known[0]
            elif fragment.id or not self.calls:
                index = len(self.calls)
            else:
                index = max(self.calls)
        call = self.calls.setdefault(index, _PartialCall())
        if fragment.id and not call.call_id:
            call.call_id = fragment.id
        function = fragment.function
        if function is not None:
            if function.name and not call.name:
                call.name = function.name
            if function.arguments:
                call.arguments.append(function.arguments)

    def complete(self) -> list[ToolCallInfo]:
        done = []
        for _, call in sorted(self.calls.items()):
            if not call.name:
                raise ProviderError("The model provider sent a tool call without a name.")
            done.append(
                ToolCallInfo(
                    call_id=call.call_id or new_call_id(),
                    name=call.name,
                    arguments="".join(call.arguments) or "{}",
                )
            )
        return done


def _message(message: ModelMessage) -> dict[str, Any]:
    match message.role:
        case "assistant" if message.tool_calls:
            return {
                "role": "assistant",
                "content": message.content or None,
                "tool_calls": [
                    {
                        "id": call.call_id,
                        "type": "function",
                        "function": {"name": call.name, "arguments": call.arguments},
                    }
                    for call in message.tool_calls
                ],
            }
        case "tool":
            return {
                "role": "tool",
                "tool_call_id": message.tool_call_id,
                "content": message.content,
            }
        case role:
            return {"role": role, "content": message.content}


def _tool(schema: ToolSchema) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": schema.name,
            "description": schema.description,
            "parameters": schema.parameters,
        },
    }


def _detail(body: object) -> str:
    """The message in an error body: OpenAI's `{"error": {"message"}}` and its variants."""
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict):
            inner = inner.get("message") or inner.get("detail")  # `detail`: FastAPI servers
        if isinstance(inner, str) and inner.strip():
            return _sentence(inner)
    elif isinstance(body, str) and body.strip():
        return _sentence(body[:500])
    return ""


def _sentence(text: str) -> str:
    text = " ".join(text.split())
    return text if text.endswith((".", "!", "?")) else text + "."
