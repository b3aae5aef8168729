"""Providers made from their config tables, by kind: `echo`, `openai`, `anthropic`."""

from __future__ import annotations

from ._config import ProviderConfig
from ._echo import EchoProvider
from ._providers import Provider


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
