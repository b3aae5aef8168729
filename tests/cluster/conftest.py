"""Fixtures for tests of several daemons acting as one: ``cluster``, each daemon a host.

Hosts are network namespaces on a bridge where the machine allows it (root,
``ip``, PostgreSQL's server binaries; checked by trying), each daemon with its
own loopback and reaching a private PostgreSQL server, one per test module,
over its veth: ``cluster.mode == "netns"``. Elsewhere, or with
CHINWAG_TEST_NO_NETNS=1, they are plain processes on the test server
(tests/conftest.py's ``postgres_url``): ``"processes"``, where ``cut`` and
``heal`` skip. Either way the test records ``cluster_mode`` (and, for
processes, ``cluster_fallback``: why) as properties.

A test asks for one mode with
``@pytest.mark.parametrize("cluster", ["processes"], indirect=True)``; ``"netns"``
skips where namespaces cannot be made.
"""

from __future__ import annotations

import functools
import secrets
from collections.abc import Callable, Iterator
from typing import Any

import cluster_network
import cluster_postgres
import pytest
from cluster_hosts import Cluster, open_cluster
from cluster_network import Network, open_network
from cluster_postgres import PrivateServer, private_server


@functools.cache
def netns_unavailable() -> str | None:
    """Why the hosts cannot be namespaces with a private server, or None when they can."""
    return cluster_postgres.unavailable() or cluster_network.namespaces_unavailable()


@pytest.fixture(scope="module")
def cluster_bridge() -> Iterator[Network]:
    """This module's bridge, which the hosts of its tests join."""
    why = netns_unavailable()
    if why is not None:
        pytest.skip(f"no network namespaces here: {why}")
    with open_network() as network:
        yield network


@pytest.fixture(scope="module")
def private_postgres(cluster_bridge: Network) -> Iterator[PrivateServer]:
    """This module's own PostgreSQL server, listening on its bridge's address."""
    with private_server(cluster_bridge.gateway, cluster_bridge.subnet) as server:
        yield server


@pytest.fixture
def cluster(
    request: pytest.FixtureRequest,
    daemon_factory: Callable[..., Any],
    record_property: Callable[[str, object], None],
) -> Iterator[Cluster]:
    """Hosts for this test's daemons, on one fresh database (a schema of its own)."""
    mode = getattr(request, "param", None) or ("processes" if netns_unavailable() else "netns")
    network: Network | None = None
    if mode == "netns":
        network = request.getfixturevalue("cluster_bridge")
        server: PrivateServer = request.getfixturevalue("private_postgres")
        storage_url = server.url(f"chinwag_cluster_{secrets.token_hex(6)}")
    else:
        storage_url = request.getfixturevalue("postgres_url")
        record_property("cluster_fallback", netns_unavailable() or "asked for")
    record_property("cluster_mode", mode)
    with open_cluster(daemon_factory, storage_url, network) as hosts:
        yield hosts
