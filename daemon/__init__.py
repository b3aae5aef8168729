"""The chinwag daemon: one trio process hosting agents and their conversations."""

from ._config import Config, ConfigError, load_config
from ._serve import serve
from ._server import ServeError, Server

__all__ = ["Config", "ConfigError", "ServeError", "Server", "load_config", "serve"]
