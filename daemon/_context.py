"""What a model sees of a conversation: its working context as model messages, framed.

The prompt of a step is the speaker's system prompt, a framing message when
other agents have spoken (never stored), then the working context: a summary
in place of the latest compact marker (never stored either), and every entry
after it, another agent's words wrapped as theirs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from chinwag.protocol import Entry

from ._agent import Agent
from ._providers import ModelMessage, Prompt, word_count

ProviderBlocks = dict[int, list[dict[str, Any]]]
"""A run's provider blocks, by the seq of the step's assistant entry they came with."""


class Context:
    """A conversation's working context: the entries from its latest compact marker on.

    Beside the entries it keeps the primary agent's model messages, each
    converted once as the context grows, their word count and who wrote the
    assistant entries, so that a step's prompt costs the same however long the
    conversation is. A compaction or a reload replaces the whole Context; a
    guest's messages are made afresh for each of its steps.
    """

    def __init__(self, primary: str, entries: list[Entry]) -> None:
        self.primary = primary
        self.entries = entries
        self._messages: list[ModelMessage] = []
        self._words = 0
        self._authors: set[str] = set()

    @property
    def marker(self) -> Entry | None:
        """The compact marker the context starts at, if any."""
        first = self.entries[0] if self.entries else None
        return first if first is not None and first.kind == "compact" else None

    def extend(self, stored: Sequence[Entry]) -> None:
        self.entries.extend(stored)

    def prompt(
        self,
        speaker: Agent,
        *,
        blocks: ProviderBlocks,
        pending: Entry | None = None,
        framing: str | None = None,
    ) -> Prompt:
        """The messages of ``speaker``'s next step, with ``pending`` (not stored yet) last,
        and ``framing`` (the run's own, never stored) after the system prompt."""
        guest = speaker.name != self.primary
        tail = () if pending is None else (_message(pending, self.primary, speaker, blocks),)
        if guest:
            body = [_message(entry, self.primary, speaker, blocks) for entry in self.entries]
            head = [speaker.system, _guest_framing(speaker.name, self.primary)]
            if framing is not None:
                head.append(ModelMessage(role="system", content=framing))
            return Prompt(head, body, sum(word_count(m) for m in body), tail)
        for entry in self.entries[len(self._messages) :]:  # one message per entry
            message = _message(entry, self.primary, speaker, blocks)
            self._messages.append(message)
            self._words += word_count(message)
            if entry.role == "assistant":
                self._authors.add(entry.agent or self.primary)
        others = self._authors - {speaker.name}
        head = (
            [speaker.system, _others_framing(speaker.name, others)] if others else [speaker.system]
        )
        if framing is not None:
            head = [*head, ModelMessage(role="system", content=framing)]
        return Prompt(head, self._messages, self._words, tail)


def _message(entry: Entry, primary: str, speaker: Agent, blocks: ProviderBlocks) -> ModelMessage:
    """An entry as ``speaker``'s model sees it: another agent's words wrapped as theirs."""
    if entry.kind == "compact":
        return ModelMessage(role="system", content=_summary(entry, primary, speaker))
    content = entry.content
    if entry.role == "assistant":
        author = entry.agent or primary
        if author != speaker.name:
            content = f'<from agent="{author}">{content}</from>'
    return ModelMessage(
        role=entry.role,
        content=content,
        tool_calls=entry.tool_calls,
        tool_call_id=entry.tool_call_id,
        is_error=entry.is_error,
        provider_blocks=blocks.get(entry.seq, []),
    )


def _summary(marker: Entry, primary: str, speaker: Agent) -> str:
    """The auto-injected stand-in for what a compact marker archived."""
    text = (
        f"The earlier part of this conversation was compacted into the archive {marker.archive!r}. "
        f"Summary of the earlier conversation:\n<summary>\n{marker.content}\n</summary>"
    )
    if speaker.name == primary and "memory_search" in speaker.config.tools:
        text += "\nmemory_search finds the archived details."
    return text


def _guest_framing(guest: str, primary: str) -> ModelMessage:
    return ModelMessage(
        role="system",
        content=(
            f"You are {guest}, a guest in a conversation between the user and the agent "
            f"{primary}. Answer the user's latest message in text only. Messages wrapped in "
            '<from agent="NAME"> were written by that agent, not by you.'
        ),
    )


def _others_framing(speaker: str, others: set[str]) -> ModelMessage:
    return ModelMessage(
        role="system",
        content=(
            f"You are {speaker}. Guest agents ({', '.join(sorted(others))}) have spoken in this "
            'conversation; their messages are wrapped in <from agent="NAME">, and they are not '
            "you."
        ),
    )
