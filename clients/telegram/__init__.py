"""The Telegram bridge: `chinwag telegram` relays each chat to an agent's conversation."""

from ._command import command

__all__ = ["command"]
