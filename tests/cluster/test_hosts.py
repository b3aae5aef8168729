"""The cluster harness itself: daemons on hosts of their own, one database, and the network
between them ours to cut."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import cluster_network
import pytest
from chinwag.clients import connect
from cluster_hosts import Host, open_cluster
from cluster_network import open_network
from cluster_postgres import private_server
from deadlines import PROCESS_S, collect

HERE = Path(__file__).resolve().parent
NETNS = pytest.param("netns", id="netns")
PROCESSES = pytest.param("processes", id="processes")

# Run on a host: how a TCP connection to HOST:PORT goes, within one second.
CONNECT = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1).close()
except OSError as exc:
    print(type(exc).__name__)
else:
    print("connected")
"""

# Run on a host: a query through the storage URL's server, as the daemon's driver makes it.
QUERY = """
import sys, psycopg
url = sys.argv[1].split("?")[0]
with psycopg.connect(url, connect_timeout=5) as conn:
    print(conn.execute("SELECT inet_client_addr()").fetchone()[0])
"""


def connect_from(host: Host, address: str, port: int) -> str:
    done = host.run(sys.executable, "-c", CONNECT, address, str(port))
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def server_of(cluster) -> tuple[str, int]:
    """Where the cluster's PostgreSQL listens, from its storage URL."""
    url = urlsplit(cluster.storage_url)
    assert url.hostname is not None and url.port is not None, cluster.storage_url
    return url.hostname, url.port


@pytest.mark.parametrize("cluster", [NETNS, PROCESSES], indirect=True)
async def test_a_conversation_streamed_on_one_host_is_read_on_another(cluster):
    print(f"cluster mode: {cluster.mode}")
    a = cluster.start("a")
    b = cluster.start("b")
    if cluster.mode == "netns":
        assert a.namespace.name != b.namespace.name
    async with connect(a.socket_path) as on_a:
        async with on_a.stream("assistant", "hello from a") as events:
            got = await collect(events)
        assert got[-1].status == "done"
    async with connect(b.socket_path) as on_b:
        history = await on_b.history("assistant")
    assert [e.content for e in history.entries] == ["hello from a", "hello from a"]


@pytest.mark.parametrize("cluster", [NETNS], indirect=True)
def test_a_host_reaches_postgres_over_its_veth_and_has_its_own_loopback(cluster):
    a = cluster.start("a")
    # The system's server listens on the root namespace's 127.0.0.1:5432, not on a's.
    assert connect_from(a, "127.0.0.1", 5432) == "ConnectionRefusedError"
    server, port = server_of(cluster)
    assert connect_from(a, server, port) == "connected"
    query = a.run(sys.executable, "-c", QUERY, a.daemon.storage_url)
    assert query.returncode == 0, query.stderr
    assert query.stdout.strip() == str(a.namespace.address.ip), "a's queries come over its veth"
    # The process we hold is the daemon itself (`ip netns exec` and `chinwag serve` exec),
    # in a's namespace, not in ours.
    pid = a.daemon.proc.pid
    assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert b"chinwag.daemon" in argv and str(a.socket_path).encode() in argv, argv


@pytest.mark.parametrize("cluster", [NETNS], indirect=True)
@pytest.mark.parametrize(
    ("cut_by", "lost"),
    [("nft", "TimeoutError"), ("link_down", "OSError")],  # silently dropped; unreachable at once
)
def test_a_cut_host_loses_the_server_until_healed(cluster, monkeypatch, cut_by, lost):
    if cut_by == "nft" and cluster_network.NFT is None:
        reason = "no nft here (.ci/run installs it): a cut takes the link down instead"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    if cut_by == "link_down":
        monkeypatch.setattr(cluster_network, "NFT", None)
    a = cluster.start("a")
    b = cluster.start("b")
    server, port = server_of(cluster)
    cluster.cut(a)
    assert connect_from(a, server, port) == lost
    assert connect_from(b, server, port) == "connected", "only a was cut"
    cluster.heal(a)
    assert connect_from(a, server, port) == "connected"


@pytest.mark.parametrize("cluster", [PROCESSES], indirect=True)
def test_processes_have_no_network_to_cut(cluster):
    a = cluster.start("a")
    with pytest.raises(pytest.skip.Exception, match="no network of one host's own to cut"):
        cluster.cut(a)
    with pytest.raises(pytest.skip.Exception, match="no network of one host's own to cut"):
        cluster.heal(a)


@pytest.mark.parametrize("cluster", [NETNS, PROCESSES], indirect=True)
def test_kill9_and_stop_reach_the_daemon_itself(cluster):
    a = cluster.start("a")
    b = cluster.start("b")
    killed = a.daemon.proc
    cluster.kill9(a)
    assert killed.returncode == -signal.SIGKILL
    assert not a.daemon.accepting()
    assert cluster.stop(b) == 0, "SIGTERM reached the daemon, which shut down cleanly"
    if cluster.mode == "netns":
        for host in (a, b):
            assert cluster_network.ip("netns", "pids", host.namespace.name).split() == []


def test_teardown_leaves_no_namespace_veth_bridge_or_server(daemon_factory):
    if (why := cluster_network.namespaces_unavailable()) is not None:
        pytest.skip(f"no network namespaces here: {why}")
    with open_network() as network, private_server(network.gateway, network.subnet) as server:
        with open_cluster(daemon_factory, server.url("chinwag_teardown"), network) as cluster:
            a = cluster.start("a")
            loose = subprocess.Popen([*a.namespace.exec_prefix, "sleep", "60"])
            names = [a.namespace.name, a.namespace.veth, network.bridge]
            with (
                pytest.raises(RuntimeError, match="the test failed"),
                open_cluster(daemon_factory, cluster.storage_url, network) as failing,
            ):
                names += [failing.start("b").namespace.name, *[h.veth for h in network.hosts]]
                raise RuntimeError("the test failed")
            assert failing.hosts == [] and [h.name for h in network.hosts] == [a.namespace.name]
        assert loose.wait(PROCESS_S) == -signal.SIGKILL, "what ran on a host was killed"
        assert a.daemon.proc.returncode == -signal.SIGKILL
    assert not server.directory.exists()
    namespaces = cluster_network.ip("netns", "list")
    links = cluster_network.ip("-o", "link", "show")
    for name in names:
        assert name not in namespaces and f" {name}:" not in links and f" {name}@" not in links


LEAVES = f"""
import sys, time
sys.path[:0] = [{str(HERE)!r}, {str(HERE.parent)!r}]
from cluster_network import open_network
from cluster_postgres import private_server
with open_network() as network, private_server(network.gateway, network.subnet) as server:
    host = network.add_host()
    print(host.name, host.veth, network.bridge, server.directory, flush=True)
    time.sleep(60)
"""

CLEANS = f"""
import sys
sys.path[:0] = [{str(HERE)!r}, {str(HERE.parent)!r}]
import cluster_network, cluster_postgres
assert cluster_network.namespaces_unavailable() is None
cluster_postgres.remove_stale()
"""


def test_a_killed_runs_leftovers_are_removed_by_the_next():
    if (why := cluster_network.namespaces_unavailable()) is not None:
        pytest.skip(f"no network namespaces here: {why}")
    killed = subprocess.Popen([sys.executable, "-c", LEAVES], stdout=subprocess.PIPE, text=True)
    try:
        namespace, veth, bridge, directory = killed.stdout.readline().split()
    finally:
        killed.kill()
        killed.wait(PROCESS_S)
    postmaster = int((Path(directory) / "data" / "postmaster.pid").read_text().split()[0])
    assert namespace in cluster_network.ip("netns", "list"), "left behind by the killed run"
    done = subprocess.run([sys.executable, "-c", CLEANS], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert namespace not in cluster_network.ip("netns", "list")
    links = cluster_network.ip("-o", "link", "show")
    assert f" {veth}@" not in links and f" {bridge}:" not in links
    assert not Path(directory).exists()
    deadline = time.monotonic() + PROCESS_S
    while runs(postmaster):  # the server's exit: not our child, no event to await
        assert time.monotonic() < deadline, "the killed run's server still runs"
        time.sleep(0.01)


def runs(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # an orphan's zombie, until whoever adopted it reaps it
