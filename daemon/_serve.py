"""`serve`: the daemon's root nursery, from storage and agents to the listener."""

from __future__ import annotations

import contextlib
import resource
import signal
from collections import Counter
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

import structlog
import trio
from chinwag.storage import open_store

from ._agent import Agent
from ._cluster import Cluster
from ._config import BUILTIN_PROVIDERS, Config
from ._metrics import DaemonState
from ._provider_kinds import make_provider
from ._providers import Provider
from ._runtime import Runtime
from ._server import ServeError, Server, bind_unix, inherited_listener
from ._telemetry import Telemetry
from ._tokens import server_tls
from ._tracing import Tracing

log = structlog.get_logger("chinwag.daemon")

# Open files kept for what is not a client: storage, the providers' HTTP connections
# (httpx keeps up to 100 per provider), workspace tools and their commands' pipes,
# the runtime itself. A quarter of the limit, and at least this many.
RESERVED_FILES = 64


def make_providers(config: Config) -> dict[str, Provider]:
    """A client for each provider some agent uses; agents on one provider share it."""
    tables = BUILTIN_PROVIDERS | config.providers
    used = sorted({agent.provider for agent in config.agents.values()})
    return {name: make_provider(tables[name]) for name in used}


def raise_open_file_limit() -> int:
    """Raise the soft limit of open files to the hard one; the limit now in force.

    A common soft limit is 1,024, which a daemon with a thousand clients, its
    storage and its tools' files runs out of; the hard limit is what the system
    lets it take.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:  # Linux refuses an infinite soft limit
        try:
            hard = int(Path("/proc/sys/fs/nr_open").read_text())
        except (OSError, ValueError):
            return soft
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError) as exc:
            log.warning("open_file_limit_kept", limit=soft, error=str(exc))
            return soft
        return hard
    return soft


def connection_limit(configured: int, open_files: int) -> int:
    """How many clients the daemon serves at once: ``configured``, unless ``open_files``
    cannot hold that many beside the files kept for everything else."""
    if open_files == resource.RLIM_INFINITY:
        return configured
    reserve = max(RESERVED_FILES, open_files // 4)
    return max(1, min(configured, open_files - reserve))


def build_agents(config: Config, providers: dict[str, Provider]) -> dict[str, Agent]:
    return {
        name: Agent(name=name, config=agent, provider=providers[agent.provider])
        for name, agent in config.agents.items()
    }


@contextlib.asynccontextmanager
async def open_telemetry(config: Config, tracing: Tracing | None) -> AsyncIterator[Telemetry]:
    """The daemon's telemetry for the block: `/metrics` served where ``[daemon] metrics``
    says, spans sent to ``tracing`` (else where the OTEL_* variables say), and both
    stopped at the end, shielded, the batched spans sent. ``ServeError`` when `/metrics`
    cannot listen."""
    telemetry = Telemetry.configure(config, tracing=tracing)
    try:
        address = config.daemon.metrics_address
        if telemetry.metrics is not None and address is not None:
            try:
                await telemetry.metrics.listen(*address)
            except OSError as exc:
                raise ServeError(
                    f"Cannot serve metrics on {config.daemon.metrics}: {exc.strerror or exc}."
                ) from exc
        yield telemetry
    finally:
        with trio.CancelScope(shield=True):
            await telemetry.aclose()


def daemon_state(runtime: Runtime, server: Server) -> DaemonState:
    """What the gauges show, read from the runtime and the server on the loop's thread."""
    in_flight: Counter[str] = Counter()
    queued: Counter[str] = Counter()
    for conv in runtime.conversations.values():
        if conv.busy:
            in_flight[conv.agent] += 1
            queued[conv.agent] += len(conv.queue)
    connections = server.connections
    open_requests = sum(conn.session.open_requests for conn in connections)
    return DaemonState(in_flight, queued, len(connections), open_requests)


async def serve(
    config: Config,
    *,
    socket_path: Path,
    storage_url: str,
    stop: trio.Event | None = None,
    handle_signals: bool = False,
    tracing: Tracing | None = None,
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until ``stop`` is set (or SIGTERM/SIGINT with ``handle_signals``).

    Reports started, with the `Server`, once the socket accepts clients. On
    stop: refuse new requests (503), let runs finish for the configured grace
    period, cancel what is left, flush the clients, and return. Started by
    systemd socket activation, it serves the socket it was passed instead of
    ``socket_path``, and leaves that socket's file to systemd. Metrics and
    traces: see ``open_telemetry``.
    """
    if stop is None:
        stop = trio.Event()
    open_files = await trio.to_thread.run_sync(raise_open_file_limit)
    max_connections = connection_limit(config.daemon.max_connections, open_files)
    if max_connections < config.daemon.max_connections:
        log.warning(
            "max_connections_lowered",
            configured=config.daemon.max_connections,
            effective=max_connections,
            open_files=open_files,
        )
    providers = make_providers(config)
    agents = build_agents(config, providers)
    # Signals are caught before the socket listens: a client that has just
    # connected may signal at once, and that must stop the daemon cleanly.
    signals = trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) if handle_signals else None
    with signals or contextlib.nullcontext() as received:
        activated = inherited_listener()
        if activated is not None:
            socket_path = Path(activated.socket.getsockname())
        async with (
            open_store(storage_url) as storage,
            # TCP and `/metrics` listen before the socket, which clients wait for.
            listen_tcp(config) as tcp,
            open_telemetry(config, tracing) as telemetry,
            activated or await bind_unix(socket_path) as listener,
            trio.open_nursery() as root,
        ):
            if received is not None:
                root.start_soon(_stop_on_signal, received, stop)
            runtime = Runtime(config, storage, agents, root, telemetry)
            server = Server(runtime, max_connections=max_connections)
            if telemetry.metrics is not None:
                telemetry.metrics.state = partial(daemon_state, runtime, server)
            await runtime.count_stored_usage()  # before mail may start a run
            if storage.bus is not None:  # other daemons share the store: join them
                runtime.cluster = Cluster(runtime, storage.bus)
                runtime.cluster.on_mail = server.post_office.heard
                await root.start(runtime.cluster.serve, str(socket_path))
            await server.post_office.start()
            await root.start(server.post_office.webhooks.run)
            root.start_soon(server.accept, listener)
            for tcp_listener in tcp:
                root.start_soon(partial(server.accept, tcp_listener, tcp=True))
            log.info(
                "daemon_started",
                socket=str(socket_path),
                activated=activated is not None,
                storage=storage_url,
                agents=list(agents),
                open_files=open_files,
                max_connections=max_connections,
                metrics=config.daemon.metrics,
                tcp=[_where(tcp_listener) for tcp_listener in tcp],
                tls=config.daemon.tls_cert is not None,
                traces=telemetry.tracing is not None,
            )
            task_status.started(server)
            await stop.wait()
            log.info("daemon_stopping", grace_s=config.daemon.shutdown_grace_s)
            server.shutting_down = True
            await listener.aclose()
            for tcp_listener in tcp:
                await tcp_listener.aclose()  # idempotent: listen_tcp closes them again
            if activated is None:  # systemd keeps listening on its socket, for the next start
                await trio.Path(socket_path).unlink(missing_ok=True)
            await runtime.shutdown(config.daemon.shutdown_grace_s)
            await server.close_connections()
            for provider in providers.values():
                await provider.aclose()
            root.cancel_scope.cancel()
    log.info("daemon_stopped")


@contextlib.asynccontextmanager
async def listen_tcp(config: Config) -> AsyncIterator[list[trio.abc.Listener[trio.abc.Stream]]]:
    """The TCP listeners ``listen_tcp`` asks for (one per address its host resolves to),
    TLS when ``tls_cert`` is set, none when it is unset; closed on exit."""
    daemon = config.daemon
    address = daemon.tcp_address
    if address is None:
        yield []
        return
    host, port = address
    try:
        tls = None
        if daemon.tls_cert is not None and daemon.tls_key is not None:
            tls = server_tls(daemon.tls_cert, daemon.tls_key)  # as the config check did
        plain = await trio.open_tcp_listeners(port, host=host)
    except (OSError, ValueError) as exc:
        raise ServeError(f"Cannot serve TCP on {daemon.listen_tcp}: {exc}.") from exc
    listeners: list[trio.abc.Listener[trio.abc.Stream]] = list(plain)
    if tls is not None:
        listeners = [trio.SSLListener(one, tls, https_compatible=False) for one in plain]
    try:
        yield listeners
    finally:
        for listener in listeners:
            await listener.aclose()


def _where(listener: trio.abc.Listener[trio.abc.Stream]) -> str:
    """A TCP listener's bound address, ``HOST:PORT``."""
    inner = listener.transport_listener if isinstance(listener, trio.SSLListener) else listener
    assert isinstance(inner, trio.SocketListener)
    host, port = inner.socket.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _stop_on_signal(signals: AsyncIterator[int], stop: trio.Event) -> None:
    async for signum in signals:
        log.info("signal_received", signal=signal.Signals(signum).name)
        stop.set()
        return
