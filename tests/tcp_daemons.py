"""Daemons served over TCP for tests: trustme certificates, the config, the port taken.

Shared by the tests of TCP in the daemon and of the clients that connect over it (the
bridge, the MCP server): import ``tls_certificates`` where the fixture ``tls`` is used.
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from chinwag.protocol import token_digest

# Tokens, and the names the config lets them speak as.
ALICE, BRIDGE, OPERATOR = "alice-token", "bridge-token", "operator-token"
TOKENS = {ALICE: "alice", BRIDGE: "tg:*", OPERATOR: "*"}

AGENTS = """
[agents.assistant]
provider = "echo"
tools = []

[agents.helper]
provider = "echo"
tools = []
"""


@dataclass
class Tls:
    """A private CA's certificate (for the clients) and a server certificate it issued
    for 127.0.0.1 and localhost, with its key (for the daemon): PEM files."""

    ca: Path
    cert: Path
    key: Path


@pytest.fixture(scope="module", name="tls")
def tls_certificates(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    folder = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1", "localhost")
    paths = Tls(folder / "ca.pem", folder / "cert.pem", folder / "key.pem")
    ca.cert_pem.write_to_path(str(paths.ca))
    issued.cert_chain_pems[0].write_to_path(str(paths.cert))
    issued.private_key_pem.write_to_path(str(paths.key))
    return paths


def closed_port() -> int:
    """A TCP port nothing listens on now (the kernel's pick): an address no daemon answers."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def tcp_config(tls: Tls | None, host: str = "127.0.0.1") -> str:
    """A daemon's config serving TCP on ``host``, on a port the system picks (``tcp_port``
    says which), TLS with ``tls``, with ``TOKENS``."""
    keys = f'tls_cert = "{tls.cert}"\ntls_key = "{tls.key}"\n' if tls is not None else ""
    daemon = f'[daemon]\nshutdown_grace_s = 2.0\nlisten_tcp = "{host}:0"\n{keys}'
    tokens = "".join(f'"{token_digest(token)}" = "{name}"\n' for token, name in TOKENS.items())
    return f"{daemon}{AGENTS}\n[tokens]\n{tokens}"


def tcp_port(log_path: Path, timeout: float = 10.0) -> int:
    """The port a daemon's TCP listener took, as the ``daemon_started`` line of its log
    (``DaemonProcess.log_path``) says.

    The daemon logs the line as it begins to serve, just after its socket accepts (where
    ``daemon_factory`` stops waiting): a child process's file, read again until it is there.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log_path.read_text().splitlines():
            if '"daemon_started"' in line:
                (address,) = json.loads(line)["tcp"]
                return int(address.rsplit(":", 1)[1])
        time.sleep(0.02)
    raise AssertionError(f"no daemon_started line:\n{log_path.read_text()}")
