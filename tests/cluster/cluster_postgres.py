"""A private PostgreSQL cluster for one test module, listening where the hosts can reach it.

The system's server listens on 127.0.0.1 only, which a host in a network
namespace cannot reach (its loopback is its own), and is not ours to
reconfigure. So the module gets its own: ``initdb`` into a temporary directory,
served on the bridge's address (tests/cluster/cluster_network.py), trusting the
bridge's subnet, with its Unix socket in the same directory and fsync off.
initdb and postgres refuse to run as root, so both run as the ``postgres`` user.

The directory is named ``chinwag-pg-<pid>-...``: a server whose test process
was killed keeps running, and the next run stops it and removes its directory
(``remove_stale``).
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import worker_database

USER = "postgres"
_PREFIX = "chinwag-pg-"
_STALE = re.compile(rf"{_PREFIX}(\d+)-.*")
SETTINGS = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",  # a few daemons' pools, and the tests' own connections
}


@functools.cache
def bindir() -> Path | None:
    """Where initdb, postgres and pg_ctl are (``pg_config --bindir``), or None."""
    if shutil.which("pg_config") is None:
        return None
    found = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, timeout=30)
    path = Path(found.stdout.strip())
    return path if (path / "initdb").is_file() else None


def unavailable() -> str | None:
    """Why a private server cannot be started here, or None when it can."""
    if bindir() is None:
        return "no PostgreSQL server binaries (pg_config --bindir)"
    if shutil.which("runuser") is None:
        return "no runuser to run them as the postgres user"
    try:
        pwd.getpwnam(USER)
    except KeyError:
        return f"no {USER} user to run them as"
    return None


@dataclass(frozen=True)
class PrivateServer:
    host: str
    port: int
    directory: Path  # its data, log and Unix socket

    def url(self, schema: str) -> str:
        """A storage URL for chinwag on this server, its tables in ``schema``."""
        return f"postgresql://{USER}@{self.host}:{self.port}/postgres?schema={schema}"

    @property
    def log(self) -> str:
        return (self.directory / "server.log").read_text(errors="replace")


def _as_postgres(program: str, *args: str) -> None:
    found = bindir()
    assert found is not None, unavailable()
    done = subprocess.run(
        ["runuser", "-u", USER, "--", str(found / program), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{program} failed: {done.stdout}{done.stderr}")


def _free_port(host: str) -> int:
    # The address is the bridge's, ours alone: nothing else takes the port before the server.
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


@contextmanager
def private_server(
    address: ipaddress.IPv4Interface, trusted: ipaddress.IPv4Network
) -> Iterator[PrivateServer]:
    """A fresh cluster listening on ``address`` and trusting ``trusted``; stopped
    (``pg_ctl stop -m immediate``) and removed when the block ends."""
    remove_stale()
    directory = Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-", dir="/tmp"))
    try:
        account = pwd.getpwnam(USER)
        os.chown(directory, account.pw_uid, account.pw_gid)
        data = directory / "data"
        _as_postgres("initdb", "-D", str(data), "-U", USER, "-A", "trust", "--no-sync")
        with (data / "pg_hba.conf").open("a") as hba:
            hba.write(f"host all all {trusted} trust\n")
        server = PrivateServer(str(address.ip), _free_port(str(address.ip)), directory)
        settings = {
            **SETTINGS,
            "listen_addresses": f"'{server.host}'",
            "port": str(server.port),
            "unix_socket_directories": f"'{directory}'",
        }
        with (data / "postgresql.conf").open("a") as conf:
            conf.writelines(f"{name} = {value}\n" for name, value in settings.items())
        _as_postgres("pg_ctl", "start", "-w", "-D", str(data), "-l", str(directory / "server.log"))
        try:
            yield server
        finally:
            _as_postgres("pg_ctl", "stop", "-m", "immediate", "-D", str(data))
    finally:
        shutil.rmtree(directory)


@functools.cache
def remove_stale() -> None:
    """Stop the servers of test processes that no longer run and remove their directories;
    once per process."""
    for directory in Path("/tmp").glob(f"{_PREFIX}*"):
        found = _STALE.fullmatch(directory.name)
        if not found or worker_database.pid_runs(int(found.group(1))):
            continue
        if (directory / "data" / "postmaster.pid").exists():
            with contextlib.suppress(RuntimeError):  # its server is gone already
                _as_postgres("pg_ctl", "stop", "-m", "immediate", "-D", str(directory / "data"))
        shutil.rmtree(directory, ignore_errors=True)
