"""Hosts as Linux network namespaces on one bridge, for daemons that must not share a loopback.

Each host is a namespace (``ip netns``) with its own loopback and one veth pair:
``eth0`` inside, the other end a port of a bridge in the root namespace. The
bridge holds the address PostgreSQL listens on. A bridge rather than one /30
per veth because PostgreSQL binds ``listen_addresses`` only when it starts:
the server needs one address that exists before any host does, and hosts join
the bridge whenever a test starts one.

Names are global to the machine, so each carries this process's pid:
``cw<pid>b<n>`` a bridge, ``cw<pid>h<n>`` a host's end of its veth (both at most
15 characters, the kernel's limit), ``chinwag-<pid>-<n>`` a namespace. xdist's
workers and concurrent runs never meet, and what a killed run left is known by
its dead pid and removed by the next run (``remove_stale``). Each bridge takes a
/24 of 10.199.0.0/16 not in use on the machine, chosen under a file lock.
"""

from __future__ import annotations

import fcntl
import functools
import ipaddress
import itertools
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field

import worker_database

SUBNETS = ipaddress.ip_network("10.199.0.0/16")
LOCK_PATH = "/tmp/chinwag-netns.lock"
_STALE_LINK = re.compile(r"cw(\d+)[bh]\d+")
_STALE_NAMESPACE = re.compile(r"chinwag-(\d+)-\d+")
_serial = itertools.count()
# A cut drops the host's packets silently where nft exists, as a real network
# loss does; a downed link, the fallback, fails a connection at once instead.
NFT = shutil.which("nft")
_CUT_TABLE = "chinwag_cut"
_CUT_RULES = f"""
table netdev {_CUT_TABLE} {{
  chain in {{ type filter hook ingress device "eth0" priority 0; policy drop; }}
  chain out {{ type filter hook egress device "eth0" priority 0; policy drop; }}
}}
"""


def ip(*args: str) -> str:
    """Run ``ip ARGS``; its output, or a RuntimeError carrying what it printed."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def _name(kind: str) -> str:
    serial = next(_serial)
    if kind == "namespace":
        return f"chinwag-{os.getpid()}-{serial}"
    return f"cw{os.getpid()}{kind}{serial}"


@functools.cache
def namespaces_unavailable() -> str | None:
    """Why hosts cannot be namespaces here, or None when they can: asked by trying, once."""
    if os.environ.get("CHINWAG_TEST_NO_NETNS") == "1":
        return "CHINWAG_TEST_NO_NETNS=1"
    if shutil.which("ip") is None:
        return "no `ip` command"
    probe = _name("namespace")
    try:
        with _machine_lock():
            remove_stale()
        ip("netns", "add", probe)
    except (RuntimeError, OSError) as exc:  # not root, no CAP_NET_ADMIN, no /run/netns
        return str(exc)
    ip("netns", "del", probe)
    return None


@contextmanager
def _machine_lock() -> Iterator[None]:
    """Held while choosing a subnet or removing another run's leftovers."""
    with open(LOCK_PATH, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@dataclass
class Namespace:
    """One host's network: the namespace, its veth pair, its address on the bridge."""

    name: str
    veth: str  # the root namespace's end, a port of the bridge
    address: ipaddress.IPv4Interface

    @property
    def exec_prefix(self) -> list[str]:
        """Runs a command in the namespace; ``ip netns exec`` execs it, so that the pid
        a caller holds, and the signals it sends, are the command's own."""
        return ["ip", "netns", "exec", self.name]

    def cut(self) -> None:
        """The host loses the network: nothing in or out of its ``eth0``."""
        if NFT is not None:
            subprocess.run(
                [*self.exec_prefix, NFT, "-f", "-"],
                input=_CUT_RULES,
                text=True,
                check=True,
                timeout=30,
            )
        else:
            ip("-n", self.name, "link", "set", "eth0", "down")

    def heal(self) -> None:
        if NFT is not None:
            subprocess.run(
                [*self.exec_prefix, NFT, "delete", "table", "netdev", _CUT_TABLE],
                check=True,
                timeout=30,
            )
        else:
            ip("-n", self.name, "link", "set", "eth0", "up")

    def remove(self) -> None:
        """Delete the veth pair, kill what still runs in the namespace, delete it."""
        if self.veth in _links():
            ip("link", "del", self.veth)  # both ends, at once: a namespace goes in the background
        if self.name in _namespaces():
            _remove_namespace(self.name)


@dataclass
class Network:
    """A bridge in the root namespace, and the hosts joined to it."""

    bridge: str
    gateway: ipaddress.IPv4Interface  # the bridge's address: where PostgreSQL listens
    hosts: list[Namespace] = field(default_factory=list)

    @property
    def subnet(self) -> ipaddress.IPv4Network:
        return self.gateway.network

    def add_host(self) -> Namespace:
        """A new namespace joined to the bridge, its ``lo`` and ``eth0`` up."""
        taken = {self.gateway.ip, *(host.address.ip for host in self.hosts)}
        free = next((a for a in self.subnet.hosts() if a not in taken), None)
        if free is None:
            raise RuntimeError(f"no address left for another host in {self.subnet}")
        host = Namespace(
            _name("namespace"),
            _name("h"),
            ipaddress.IPv4Interface(f"{free}/{self.subnet.prefixlen}"),
        )
        self.hosts.append(host)  # before it exists, so that a failure half-way is removed
        ip("netns", "add", host.name)
        ip("link", "add", host.veth, "type", "veth", "peer", "name", "eth0", "netns", host.name)
        ip("link", "set", host.veth, "master", self.bridge, "up")
        ip("-n", host.name, "addr", "add", str(host.address), "dev", "eth0")
        ip("-n", host.name, "link", "set", "eth0", "up")
        ip("-n", host.name, "link", "set", "lo", "up")
        return host

    def remove_host(self, host: Namespace) -> None:
        self.hosts.remove(host)
        host.remove()


@contextmanager
def open_network() -> Iterator[Network]:
    """A bridge on a /24 of its own, removed with every host on it when the block ends."""
    with _machine_lock():  # a subnet is free until a bridge holds it
        remove_stale()
        network = Network(_name("b"), _free_subnet())
        ip("link", "add", network.bridge, "type", "bridge")
        try:
            ip("addr", "add", str(network.gateway), "dev", network.bridge)
        except RuntimeError:
            ip("link", "del", network.bridge)
            raise
    try:
        ip("link", "set", network.bridge, "up")
        yield network
    finally:
        for host in list(network.hosts):
            network.remove_host(host)
        ip("link", "del", network.bridge)


def _free_subnet() -> ipaddress.IPv4Interface:
    """The first address of a /24 of SUBNETS that no address on the machine is in."""
    used = [
        ipaddress.IPv4Interface(word).network
        for word in re.findall(r"inet (\S+)", ip("-4", "-o", "addr", "show"))
    ]
    for subnet in SUBNETS.subnets(new_prefix=24):
        if not any(subnet.overlaps(other) for other in used):
            return ipaddress.IPv4Interface(f"{subnet[1]}/24")
    raise RuntimeError(f"every /24 of {SUBNETS} is in use")


def _links() -> set[str]:
    return set(re.findall(r"^\d+: ([^:@\s]+)", ip("-o", "link", "show"), re.M))


def _namespaces() -> list[str]:
    return [line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()]


def _remove_namespace(name: str) -> None:
    # A process left in a namespace keeps it, and its veth, alive after `ip netns del`.
    pids = [int(pid) for pid in ip("netns", "pids", name).split()]
    for pid in pids:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while ip("netns", "pids", name).split():
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes in {name} outlived SIGKILL: {pids}")
        time.sleep(0.01)  # another process's exit, not ours to wait for
    ip("netns", "del", name)


def _ours_or_dead(pid: int) -> bool:
    # Our own pid too: the names of an earlier process that had it come back.
    return pid == os.getpid() or not worker_database.pid_runs(pid)


@functools.cache
def remove_stale() -> None:
    """Remove the namespaces, veths and bridges named with a pid that no longer runs, or
    with ours before we made any (an earlier process had our pid): once per process, under
    ``_machine_lock``."""
    for link in _links():
        found = _STALE_LINK.fullmatch(link)
        if found and _ours_or_dead(int(found.group(1))):
            ip("link", "del", link)
    for name in _namespaces():
        found = _STALE_NAMESPACE.fullmatch(name)
        if found and _ours_or_dead(int(found.group(1))):
            _remove_namespace(name)
