"""The report of the daemon's own checks, which `chinwag doctor` reads.

`python -m chinwag.daemon --check` prints one ``CheckReport`` as a JSON line
on stdout; the CLI, which never imports the daemon, decodes it with these same
structs. New fields get defaults, as on the wire, so that a CLI and a daemon of
different versions still understand each other.
"""

from __future__ import annotations

from typing import Literal

import msgspec

#: ``in_use``: the storage's lock is held by another process, which the CLI
#: judges (its own running daemon, or a stranger's).
FindingStatus = Literal["ok", "warn", "fail", "in_use"]
ConfigSource = Literal["--config", "$CHINWAG_CONFIG", "default", "embedded defaults"]


class CheckFinding(msgspec.Struct, kw_only=True):
    """One check's outcome."""

    check: Literal["config", "storage", "agent", "webhook"]
    subject: str  # the file, the URL, the agent's name, the webhook's name
    status: FindingStatus
    detail: str
    hint: str = ""


class CheckReport(msgspec.Struct, kw_only=True):
    """Everything `python -m chinwag.daemon --check` found, in the order to show it."""

    config_path: str | None  # None: no file, the embedded defaults
    config_source: ConfigSource
    # The socket the config names, else the default one; None when the config did not load.
    socket: str | None
    socket_configured: bool  # the config names a socket
    findings: list[CheckFinding]
