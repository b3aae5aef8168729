"""A hosted agent: its name, its config, and the provider its model is on."""

from __future__ import annotations

from dataclasses import dataclass, field

from ._config import AgentConfig
from ._providers import ModelMessage, Provider, ToolSchema
from ._tools import schemas_for


@dataclass(eq=False)
class Agent:
    name: str
    config: AgentConfig
    provider: Provider
    # Made once: every step of every run of the agent starts with them.
    system: ModelMessage = field(init=False)
    tools: list[ToolSchema] = field(init=False)

    def __post_init__(self) -> None:
        self.system = ModelMessage(role="system", content=self.config.system_prompt)
        self.tools = schemas_for(self.config.tools)
