"""Several `chinwag serve` daemons, each on a host of its own, sharing one PostgreSQL database.

In ``netns`` mode a host is a network namespace (tests/cluster/cluster_network.py):
its daemon has its own loopback and reaches PostgreSQL only over its veth, and a
test can cut it off the network and heal it. In ``processes`` mode, where
namespaces cannot be made, the hosts are plain processes on one machine: the
same database, but no network of their own to lose.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cluster_network import Namespace, Network


@dataclass
class Host:
    """A daemon on a host: ``namespace`` is None in processes mode."""

    name: str
    daemon: Any  # tests/conftest.py's DaemonProcess, restartable on the same host
    namespace: Namespace | None

    @property
    def socket_path(self) -> Path:
        return Path(self.daemon.socket_path)

    def run(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run a command on this host (in its namespace, if it has one), its output captured."""
        prefix = [] if self.namespace is None else self.namespace.exec_prefix
        return subprocess.run(
            [*prefix, *argv], capture_output=True, text=True, timeout=timeout, check=False
        )


class Cluster:
    """Daemons started on hosts of their own, all on ``storage_url``.

    ``start_daemon`` is tests/conftest.py's ``daemon_factory``.
    """

    def __init__(
        self, start_daemon: Callable[..., Any], storage_url: str, network: Network | None
    ) -> None:
        self._start_daemon = start_daemon
        self.storage_url = storage_url
        self.network = network
        self.hosts: list[Host] = []

    @property
    def mode(self) -> str:
        return "processes" if self.network is None else "netns"

    def start(self, name: str, config: str | None = None) -> Host:
        """A new host running a started daemon; ``config`` defaults to daemon_factory's."""
        namespace = None if self.network is None else self.network.add_host()
        options = {} if config is None else {"config": config}
        daemon = self._start_daemon(
            storage_url=self.storage_url,
            name=name,
            prefix=[] if namespace is None else namespace.exec_prefix,
            **options,
        )
        host = Host(name, daemon, namespace)
        self.hosts.append(host)
        return host

    def kill9(self, host: Host) -> None:
        """SIGKILL the daemon and reap it."""
        host.daemon.kill9()

    def stop(self, host: Host) -> int:
        """SIGTERM the daemon; its exit code once it has shut down."""
        return int(host.daemon.stop())

    def cut(self, host: Host) -> None:
        """The host loses the network: its packets are dropped silently where nft exists,
        its link is down otherwise. Skips in processes mode."""
        self._namespace_of(host).cut()

    def heal(self, host: Host) -> None:
        """Undo ``cut``."""
        self._namespace_of(host).heal()

    def _namespace_of(self, host: Host) -> Namespace:
        if host.namespace is None:
            pytest.skip(
                "The hosts are processes on one machine (no network namespaces here):"
                " there is no network of one host's own to cut."
            )
        return host.namespace

    def close(self) -> None:
        """Kill every daemon and remove every host's namespace."""
        for host in self.hosts:
            if host.daemon.proc is not None and host.daemon.proc.poll() is None:
                host.daemon.kill9()
        for host in self.hosts:
            if host.namespace is not None:
                assert self.network is not None
                self.network.remove_host(host.namespace)
        self.hosts.clear()


@contextmanager
def open_cluster(
    start_daemon: Callable[..., Any], storage_url: str, network: Network | None
) -> Iterator[Cluster]:
    """A Cluster, closed when the block ends however it ends."""
    cluster = Cluster(start_daemon, storage_url, network)
    try:
        yield cluster
    finally:
        cluster.close()
