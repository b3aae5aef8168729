"""Built-in tools. An agent is offered, and may call, only those its whitelist names."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec
from chinwag.protocol import AskQuestion, ToolCallInfo

from ._errors import ToolError
from ._providers import ToolSchema
from ._workspace import WORKSPACE_TOOLS, Workspace


class ToolContext(Protocol):
    """What a tool may do to the run that called it."""

    async def set_title(self, title: str) -> None: ...

    async def ask(self, questions: list[AskQuestion]) -> str:
        """Ask the user and wait for the answer; raises ``ToolError`` on timeout."""
        ...

    async def delegate(self, agent: str, message: str) -> str:
        """Run a turn of ``agent`` in its conversation with this agent; its final text."""
        ...

    @property
    def workspace(self) -> Workspace | None:
        """The run's working directory and limits; None: the run has none."""
        ...


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]
    run: Callable[[ToolContext, dict[str, Any]], Awaitable[str]]

    @property
    def schema(self) -> ToolSchema:
        return ToolSchema(name=self.name, description=self.description, parameters=self.parameters)


async def _set_title(ctx: ToolContext, args: dict[str, Any]) -> str:
    title = args.get("title")
    if not isinstance(title, str) or not title.strip():
        raise ToolError("set_title needs a non-empty string `title`.")
    title = " ".join(title.split())[:200]
    await ctx.set_title(title)
    return f"Title set to {title!r}."


async def _ask_user(ctx: ToolContext, args: dict[str, Any]) -> str:
    raw = args.get("questions")
    if raw is None and "question" in args:
        raw = [args]
    try:
        questions = msgspec.convert(raw, list[AskQuestion])
    except msgspec.ValidationError as exc:
        raise ToolError(
            f"ask_user needs `questions`, a list of {{question, options}}: {exc}."
        ) from exc
    if not questions:
        raise ToolError("ask_user needs at least one question.")
    return await ctx.ask(questions)


async def _delegate(ctx: ToolContext, args: dict[str, Any]) -> str:
    agent, message = args.get("agent"), args.get("message")
    if not isinstance(agent, str) or not isinstance(message, str) or not message.strip():
        raise ToolError("delegate needs `agent` (an agent's name) and a non-empty `message`.")
    return await ctx.delegate(agent, message)


_OPTION = {
    "type": "object",
    "properties": {"label": {"type": "string"}, "description": {"type": "string"}},
    "required": ["label"],
}

TOOLS: dict[str, Tool] = {
    tool.name: tool
    for tool in [
        Tool(
            name="set_title",
            description="Set a short title for this conversation.",
            parameters={
                "type": "object",
                "properties": {"title": {"type": "string", "description": "A few words."}},
                "required": ["title"],
            },
            run=_set_title,
        ),
        Tool(
            name="ask_user",
            description=(
                "Ask the user one or more questions and wait for the answer. "
                "Offer options where the answer is a choice."
            ),
            parameters={
                "type": "object",
                "properties": {
                    "questions": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "question": {"type": "string"},
                                "header": {"type": "string"},
                                "options": {"type": "array", "items": _OPTION},
                                "multi_select": {"type": "boolean"},
                            },
                            "required": ["question"],
                        },
                    }
                },
                "required": ["questions"],
            },
            run=_ask_user,
        ),
        Tool(
            name="delegate",
            description=(
                "Ask another agent to do something and wait for its answer. It sees only "
                "your message and its own conversation with you."
            ),
            parameters={
                "type": "object",
                "properties": {
                    "agent": {"type": "string", "description": "The other agent's name."},
                    "message": {"type": "string", "description": "What to ask it."},
                },
                "required": ["agent", "message"],
            },
            run=_delegate,
        ),
        *(Tool(*spec) for spec in WORKSPACE_TOOLS),  # read_file, write_file, list_dir, run_command
    ]
}

TOOL_NAMES = frozenset(TOOLS)


def schemas_for(allowed: list[str]) -> list[ToolSchema]:
    """The schemas offered to an agent: exactly its whitelist, in its order."""
    return [TOOLS[name].schema for name in allowed if name in TOOLS]


async def call_tool(ctx: ToolContext, allowed: list[str], call: ToolCallInfo) -> tuple[str, bool]:
    """Run one tool call; returns ``(output, is_error)``. Never raises but Cancelled."""
    tool = TOOLS.get(call.name)
    if tool is None or call.name not in allowed:
        return f"The tool {call.name!r} is not available to this agent.", True
    try:
        args = json.loads(call.arguments or "{}")
    except json.JSONDecodeError as exc:
        return f"The arguments of {call.name} are not valid JSON: {exc}.", True
    if not isinstance(args, dict):
        return f"The arguments of {call.name} must be a JSON object.", True
    try:
        return await tool.run(ctx, args), False
    except ToolError as exc:
        return str(exc), True
    except Exception as exc:  # a tool's bug is the model's error result, not a failed run
        return f"{call.name} failed: {type(exc).__name__}: {exc}", True
