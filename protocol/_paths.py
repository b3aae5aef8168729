"""Where the daemon's socket lives by default (PROTOCOL.md, Transport)."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import platformdirs

APP_NAME = "chinwag"


def default_socket_path() -> Path:
    """``$CHINWAG_SOCKET``, else ``$XDG_RUNTIME_DIR/chinwag/chinwag.sock``,
    else ``chinwag.sock`` in the user's state directory."""
    if explicit := os.environ.get("CHINWAG_SOCKET"):
        return Path(explicit)
    if runtime := os.environ.get("XDG_RUNTIME_DIR"):
        return Path(runtime) / APP_NAME / "chinwag.sock"
    return Path(platformdirs.user_state_dir(APP_NAME)) / "chinwag.sock"


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) is this machine's loopback: the only
    host plain TCP may reach, on either side (docs/protocol.md, section 1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
