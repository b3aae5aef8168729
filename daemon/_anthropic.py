"""The `anthropic` provider: the Messages API, streamed, on the official SDK.

``AsyncAnthropic`` runs unmodified under trio: its HTTP stack (httpx and
httpcore over anyio) and its retry back-off (``anyio.sleep``) take trio's
cancellation, so a kill lands inside the HTTP read and drops the connection.
One client per provider, closed by ``aclose``.

Our messages map onto the API's as follows: every system message joins the
``system`` parameter; an assistant message's tool calls become ``tool_use``
blocks, tool results become ``tool_result`` blocks in a user message; adjacent
messages of one role merge, since the API wants the roles to alternate. A
request without tools (a guest's turn) carries the history's calls and results
as text instead, because the API refuses tool blocks in a request that defines
no tools.

Thinking is asked for when the provider sets ``thinking = "adaptive"`` (the
model decides; current models) or ``thinking_budget`` (extended thinking with a
fixed budget; older models), and ``effort`` goes out as ``output_config``. The
API wants each tool-loop step sent back with its thinking blocks unchanged,
signatures and all: the assembly hands them out as ``ProviderBlockChunk``s, the
runtime keeps them with the step's message (``ModelMessage.provider_blocks``),
and they lead that message's blocks in the next request, where the API puts
them.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Sequence
from typing import Any, Literal, cast

import anthropic
import structlog
import trio
from anthropic import AsyncStream
from anthropic.types import (
    InputJSONDelta,
    MessageParam,
    RawContentBlockDeltaEvent,
    RawContentBlockStartEvent,
    RawContentBlockStopEvent,
    RawMessageDeltaEvent,
    RawMessageStartEvent,
    RawMessageStopEvent,
    RawMessageStreamEvent,
    TextBlockParam,
    TextDelta,
    ToolParam,
    ToolResultBlockParam,
    ToolUseBlock,
    ToolUseBlockParam,
)
from chinwag.protocol import ToolCallInfo

from ._config import ProviderConfig
from ._providers import (
    LIST_MODELS_TIMEOUT_S,
    Chunk,
    FinishChunk,
    ModelMessage,
    ModelRequest,
    ProviderBlockChunk,
    ProviderError,
    TextChunk,
    ThinkingChunk,
    ToolCallChunk,
    UsageChunk,
)

# dict: a provider block (thinking, redacted_thinking) sent back as it came.
Block = TextBlockParam | ToolUseBlockParam | ToolResultBlockParam | dict[str, Any]
Role = Literal["user", "assistant"]

_FINISH = {"tool_use": "tool_calls", "max_tokens": "length"}
_FINISH_LENGTH = {"model_context_window_exceeded"}
# Closing a response mid-body only drops its connection; bound it all the same.
_CLOSE_TIMEOUT_S = 5.0
_DRAIN_EVENTS = 16
_DRAIN_TIMEOUT_S = 1.0
_THINKING = ("thinking", "redacted_thinking")

log = structlog.get_logger("chinwag.anthropic")


class AnthropicProvider:
    """Streams a model's answer from an Anthropic Messages API endpoint."""

    local = False  # a network model: a run overlaps its user entry's write with the request

    def __init__(self, config: ProviderConfig) -> None:
        self._max_tokens = config.max_tokens
        self._thinking: dict[str, Any] | None = None
        if config.thinking is not None:
            self._thinking = {"type": config.thinking}
        elif config.thinking_budget is not None:
            self._thinking = {"type": "enabled", "budget_tokens": config.thinking_budget}
        self._effort = config.effort
        self._timeout_s = config.timeout_s
        # With no key configured the SDK falls back on ANTHROPIC_API_KEY and its other sources.
        self._client = anthropic.AsyncAnthropic(
            api_key=config.resolve_api_key(),
            base_url=config.base_url,
            default_headers=config.extra_headers or None,
            timeout=config.timeout_s,
            max_retries=config.max_retries,
        )

    async def aclose(self) -> None:
        await self._client.close()

    async def list_models(self) -> list[str] | None:
        """The ids `GET /v1/models` lists, every page: one attempt per page, short timeouts.

        Raises ``ProviderError`` (with the HTTP ``status`` when there was one).
        """
        if not self._client.api_key and not self._client.auth_token:
            # The SDK would raise a TypeError at the request; say what the API would.
            raise ProviderError(
                "No Anthropic API key is configured (api_key, api_key_env or $ANTHROPIC_API_KEY).",
                status=401,
            )
        timeout = min(self._timeout_s, LIST_MODELS_TIMEOUT_S)
        client = self._client.with_options(max_retries=0, timeout=timeout)
        try:
            return [model.id async for model in client.models.list(limit=1000)]
        except anthropic.APITimeoutError as exc:
            raise ProviderError(f"The Anthropic API did not answer within {timeout:g} s.") from exc
        except anthropic.APIStatusError as exc:
            raise ProviderError(_provider_error(exc).message, status=exc.status_code) from exc
        except Exception as exc:
            raise _provider_error(exc) from exc

    async def stream(self, request: ModelRequest) -> AsyncGenerator[Chunk, None]:
        """Stream the answer to ``request``; raises ``ProviderError`` on any failure.

        Cancellation propagates from inside the HTTP read; the response is
        closed on the way out, whatever the reason.
        """
        system, messages = build_messages(request.messages, with_tools=bool(request.tools))
        tools = [
            ToolParam(name=t.name, description=t.description, input_schema=t.parameters)
            for t in request.tools
        ]
        params: dict[str, Any] = {}
        if system:
            params["system"] = system
        if tools:
            params["tools"] = tools
        # In the body, not as the SDK's arguments, which older SDKs lack.
        body: dict[str, Any] = {}
        if self._thinking is not None:
            if self._thinking["type"] == "enabled" and _unthought_tool_loop(messages):
                # With a fixed budget the model always thinks, and the API refuses to
                # go on with a step stored without its thinking blocks (a restart, or
                # thinking switched on since): it says to disable thinking. Adaptive
                # thinking may skip a step's thinking, so there it is never required.
                log.info("thinking_skipped", reason="tool loop step without its thinking blocks")
            else:
                body["thinking"] = self._thinking
        if self._effort is not None:
            body["output_config"] = {"effort": self._effort}
        if body:
            params["extra_body"] = body
        try:
            events = await self._client.messages.create(
                model=request.model,
                max_tokens=self._max_tokens,
                # Built as plain dicts: MessageParam is a TypedDict in some SDK versions
                # and a union of them in others.
                messages=cast("list[MessageParam]", messages),
                stream=True,
                **params,
            )
        except Exception as exc:  # the SDK's and httpx's errors, all of them upstream failures
            raise _provider_error(exc) from exc
        assembly = _Assembly()
        try:
            while not assembly.finished:
                try:
                    event = await events.__anext__()
                except StopAsyncIteration:
                    raise ProviderError(
                        "The Anthropic stream ended before its message_stop event."
                    ) from None
                except Exception as exc:
                    raise _provider_error(_unwrapped(exc)) from exc
                for chunk in assembly.feed(event):
                    yield chunk
            with trio.move_on_after(_DRAIN_TIMEOUT_S):  # the answer is whole: wait little more
                await _drain(events)
        finally:
            with trio.move_on_after(_CLOSE_TIMEOUT_S, shield=True):
                await events.close()
                await _drain(events)  # after a failure or a kill: ends at once, stream closed


async def _drain(events: AsyncStream[RawMessageStreamEvent]) -> None:
    """Read what follows ``message_stop`` (the API sends nothing more) to the stream's end.

    Whatever fails here comes after the answer, or after the stream was given
    up, so it is ignored. Reading to the end lets the SDK's stream finish its
    own async generators, which trio would otherwise finalize (with a
    ResourceWarning) when they are garbage collected.
    """
    for _ in range(_DRAIN_EVENTS):
        try:
            await events.__anext__()
        except StopAsyncIteration:
            return
        except Exception:
            return


def build_messages(
    messages: Sequence[ModelMessage], *, with_tools: bool
) -> tuple[str, list[dict[str, Any]]]:
    """Our messages as the ``system`` parameter and the API's alternating turns."""
    system: list[str] = []
    turns: list[tuple[Role, list[Block]]] = []
    names: dict[str, str] = {}  # call id -> tool name, for results rendered as text

    def add(role: Role, blocks: list[Block]) -> None:
        if not blocks:
            return
        if turns and turns[-1][0] == role:
            turns[-1][1].extend(blocks)
        else:
            turns.append((role, blocks))

    for message in messages:
        match message.role:
            case "system":
                if message.content.strip():
                    system.append(message.content)
            case "assistant":
                # A step's thinking leads its message, as the API gave it.
                blocks: list[Block] = [*message.provider_blocks, *_text(message.content)]
                for call in message.tool_calls:
                    names[call.call_id] = call.name
                    if with_tools:
                        blocks.append(
                            ToolUseBlockParam(
                                type="tool_use",
                                id=call.call_id,
                                name=call.name,
                                input=_arguments(call.arguments),
                            )
                        )
                    else:
                        blocks += _text(f"[called the tool {call.name} with {call.arguments}]")
                add("assistant", blocks)
            case "tool":
                call_id = message.tool_call_id or ""
                if with_tools:
                    result = ToolResultBlockParam(
                        type="tool_result", tool_use_id=call_id, is_error=message.is_error
                    )
                    if message.content:
                        result["content"] = message.content
                    add("user", [result])
                else:
                    outcome = "failed" if message.is_error else "returned"
                    name = names.get(call_id, "tool")
                    add("user", _text(f"[the tool {name} {outcome}: {message.content}]"))
            case _:
                add("user", _text(message.content))
    return "\n\n".join(system), [{"role": role, "content": blocks} for role, blocks in turns]


def _unthought_tool_loop(messages: list[dict[str, Any]]) -> bool:
    """Whether the request goes on with a tool loop whose step lacks its thinking blocks."""
    if len(messages) < 2 or messages[-1]["role"] != "user" or messages[-2]["role"] != "assistant":
        return False
    if not any(block["type"] == "tool_result" for block in messages[-1]["content"]):
        return False
    return messages[-2]["content"][0]["type"] not in _THINKING


def _text(content: str) -> list[Block]:
    # The API refuses text blocks that are empty or only whitespace.
    return [TextBlockParam(type="text", text=content)] if content.strip() else []


def _arguments(arguments: str) -> dict[str, object]:
    """A call's JSON arguments as the object ``tool_use.input`` must be.

    Arguments that are not a JSON object were already refused to the model in
    that call's error result; the API needs an object all the same.
    """
    try:
        parsed = json.loads(arguments or "{}")
    except json.JSONDecodeError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


class _ToolUse:
    def __init__(self, call_id: str, name: str, initial: object) -> None:
        self.call_id = call_id
        self.name = name
        self.initial = initial
        self.fragments: list[str] = []

    def call(self) -> ToolCallInfo:
        arguments = "".join(self.fragments)
        if not arguments:  # no input_json_delta: the input came whole in content_block_start
            arguments = json.dumps(self.initial if isinstance(self.initial, dict) else {})
        return ToolCallInfo(call_id=self.call_id, name=self.name, arguments=arguments)


class _Thinking:
    """A thinking block (its text and signature) or a redacted one (its data) being read."""

    def __init__(self, start: object) -> None:
        self.type = getattr(start, "type", "thinking")
        self.text = [getattr(start, "thinking", None) or ""]
        self.signature = [getattr(start, "signature", None) or ""]
        self.data = getattr(start, "data", None) or ""

    def block(self) -> dict[str, Any] | None:
        """The block to send back, or None when it came incomplete (the API would refuse it)."""
        if self.type == "redacted_thinking":
            return {"type": "redacted_thinking", "data": self.data} if self.data else None
        signature = "".join(self.signature)
        if not signature:
            return None
        return {"type": "thinking", "thinking": "".join(self.text), "signature": signature}


class _Assembly:
    """Turns the API's stream events into chunks, holding tool_use blocks until complete."""

    def __init__(self) -> None:
        # Open blocks by index; None for text and anything else we do not keep.
        self.blocks: dict[int, _ToolUse | _Thinking | None] = {}
        self.input_tokens = 0
        self.output_tokens = 0
        self.stop_reason: str | None = None
        self.finished = False

    def feed(self, event: RawMessageStreamEvent) -> list[Chunk]:
        try:
            return self._feed(event)
        except ProviderError:
            raise
        except Exception as exc:  # an event whose fields are missing or of the wrong type
            raise ProviderError(
                f"The Anthropic stream is malformed: a {getattr(event, 'type', '?')} event "
                f"could not be read ({type(exc).__name__})."
            ) from exc

    def _feed(self, event: RawMessageStreamEvent) -> list[Chunk]:
        if isinstance(event, RawContentBlockDeltaEvent):
            delta = event.delta
            block = self._open(event.index)
            if isinstance(delta, TextDelta):
                return [TextChunk(delta.text)] if delta.text else []
            if isinstance(delta, InputJSONDelta):
                if not isinstance(block, _ToolUse):
                    raise ProviderError(
                        "The Anthropic stream is malformed: tool input arrived for a block "
                        "that is not a tool_use."
                    )
                block.fragments.append(delta.partial_json)
                return []
            # Thinking by type and attribute: SDKs before 0.47 have no classes for it.
            if delta.type == "thinking_delta":
                thinking = getattr(delta, "thinking", "")
                if isinstance(block, _Thinking):
                    block.text.append(thinking)
                return [ThinkingChunk(thinking)] if thinking else []
            if delta.type == "signature_delta" and isinstance(block, _Thinking):
                block.signature.append(getattr(delta, "signature", ""))
            return []  # citations: nothing we keep
        if isinstance(event, RawContentBlockStartEvent):
            start = event.content_block
            if isinstance(start, ToolUseBlock):
                self.blocks[event.index] = _ToolUse(start.id, start.name, start.input)
            elif start.type in _THINKING:
                thinking = self.blocks[event.index] = _Thinking(start)
                return [ThinkingChunk(thinking.text[0])] if thinking.text[0] else []
            else:
                self.blocks[event.index] = None
                text = getattr(start, "text", "")  # a text block may open with some text
                if start.type == "text" and isinstance(text, str) and text:
                    return [TextChunk(text)]
            return []
        if isinstance(event, RawContentBlockStopEvent):
            block = self._open(event.index)
            del self.blocks[event.index]
            if isinstance(block, _ToolUse):
                return [ToolCallChunk(block.call())]
            if isinstance(block, _Thinking) and (whole := block.block()) is not None:
                return [ProviderBlockChunk(whole)]
            return []
        if isinstance(event, RawMessageStartEvent):
            self.input_tokens = _prompt_tokens(event.message.usage)
            self.output_tokens = event.message.usage.output_tokens or 0
            return []
        if isinstance(event, RawMessageDeltaEvent):
            self.stop_reason = event.delta.stop_reason
            usage = event.usage
            self.output_tokens = usage.output_tokens or self.output_tokens
            if getattr(usage, "input_tokens", None) is not None:
                self.input_tokens = _prompt_tokens(usage)
            return []
        if isinstance(event, RawMessageStopEvent):
            if self.blocks:
                raise ProviderError(
                    "The Anthropic stream is malformed: the message stopped inside a content block."
                )
            self.finished = True
            reason = self.stop_reason or "end_turn"
            finish = "length" if reason in _FINISH_LENGTH else _FINISH.get(reason, "stop")
            return [UsageChunk(self.input_tokens, self.output_tokens), FinishChunk(finish)]
        return []  # ping, and event types newer than this code

    def _open(self, index: int) -> _ToolUse | _Thinking | None:
        if index not in self.blocks:
            raise ProviderError(
                f"The Anthropic stream is malformed: content block {index} was not started."
            )
        return self.blocks[index]


def _prompt_tokens(usage: object) -> int:
    """Input tokens, cached ones included: all of them fill the context window."""
    return sum(
        getattr(usage, name, None) or 0
        for name in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
    )


def _provider_error(exc: Exception) -> ProviderError:
    """One clear sentence for whatever the SDK or its HTTP stack raised."""
    if isinstance(exc, anthropic.APIStatusError):
        kind, detail = _error_body(exc.body)
        detail = detail or exc.message
        if exc.status_code < 400:  # an `error` event in a stream that began 200
            return ProviderError(
                _sentence(
                    f"The Anthropic stream failed mid-answer with {kind or 'an error'}: {detail}"
                )
            )
        upstream = f"{exc.status_code}{f' ({kind})' if kind else ''}"
        return ProviderError(_sentence(f"The Anthropic API answered HTTP {upstream}: {detail}"))
    if isinstance(exc, anthropic.APITimeoutError):
        return ProviderError("The Anthropic API did not answer in time.")
    if isinstance(exc, anthropic.APIConnectionError):
        cause = exc.__cause__ or exc
        return ProviderError(_sentence(f"The Anthropic API cannot be reached: {cause}"))
    if isinstance(exc, ValueError):  # undecodable JSON in an event's data
        return ProviderError(_sentence(f"The Anthropic stream is malformed: {exc}"))
    return ProviderError(_sentence(f"The Anthropic stream broke off: {type(exc).__name__}: {exc}"))


def _unwrapped(exc: Exception) -> Exception:
    """What broke a stream that had begun: newer SDKs (2.17) wrap httpx's error in
    their connection error, which would read as "cannot be reached"; older ones
    let it through. Either way it is said as the stream breaking off."""
    if isinstance(exc, anthropic.APIConnectionError) and isinstance(exc.__cause__, Exception):
        return exc.__cause__
    return exc


def _error_body(body: object) -> tuple[str, str]:
    """The ``error.type`` and ``error.message`` of an API error body, where present."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return "", ""
    kind, message = error.get("type"), error.get("message")
    return (kind if isinstance(kind, str) else "", message if isinstance(message, str) else "")


def _sentence(text: str) -> str:
    text = " ".join(text.split())
    return text if text.endswith((".", "!", "?")) else text + "."
