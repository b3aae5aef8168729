"""Daemons served over TCP for tests: trustme certificates, a free port, the config.

Shared by the tests of TCP in the daemon and of the clients that connect over it (the
bridge, the MCP server): import ``tls_certificates`` where the fixture ``tls`` is used.
"""

from __future__ import annotations

import socket
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


def free_port() -> int:
    """A TCP port nothing listens on now (the kernel's pick)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def tcp_config(port: int, tls: Tls | None, host: str = "127.0.0.1") -> str:
    """A daemon's config serving TCP on ``host:port`` (TLS with ``tls``), with ``TOKENS``."""
    keys = f'tls_cert = "{tls.cert}"\ntls_key = "{tls.key}"\n' if tls is not None else ""
    daemon = f'[daemon]\nshutdown_grace_s = 2.0\nlisten_tcp = "{host}:{port}"\n{keys}'
    tokens = "".join(f'"{token_digest(token)}" = "{name}"\n' for token, name in TOKENS.items())
    return f"{daemon}{AGENTS}\n[tokens]\n{tokens}"
