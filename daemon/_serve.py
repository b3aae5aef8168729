"""`serve`: the daemon's root nursery, from storage and agents to the listener."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import structlog
import trio
from chinwag.storage import open_store

from ._agent import Agent
from ._config import BUILTIN_PROVIDERS, Config
from ._provider_kinds import make_provider
from ._providers import Provider
from ._runtime import Runtime
from ._server import Server, bind_unix, inherited_listener

log = structlog.get_logger("chinwag.daemon")


def make_providers(config: Config) -> dict[str, Provider]:
    """A client for each provider some agent uses; agents on one provider share it."""
    tables = BUILTIN_PROVIDERS | config.providers
    used = sorted({agent.provider for agent in config.agents.values()})
    return {name: make_provider(tables[name]) for name in used}


def build_agents(config: Config, providers: dict[str, Provider]) -> dict[str, Agent]:
    return {
        name: Agent(name=name, config=agent, provider=providers[agent.provider])
        for name, agent in config.agents.items()
    }


async def serve(
    config: Config,
    *,
    socket_path: Path,
    storage_url: str,
    stop: trio.Event | None = None,
    handle_signals: bool = False,
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until ``stop`` is set (or SIGTERM/SIGINT with ``handle_signals``).

    Reports started, with the `Server`, once the socket accepts clients. On
    stop: refuse new requests (503), let runs finish for the configured grace
    period, cancel what is left, flush the clients, and return. Started by
    systemd socket activation, it serves the socket it was passed instead of
    ``socket_path``, and leaves that socket's file to systemd.
    """
    if stop is None:
        stop = trio.Event()
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
            activated or await bind_unix(socket_path) as listener,
            trio.open_nursery() as root,
        ):
            if received is not None:
                root.start_soon(_stop_on_signal, received, stop)
            runtime = Runtime(config, storage, agents, root)
            server = Server(runtime)
            root.start_soon(server.accept, listener)
            log.info(
                "daemon_started",
                socket=str(socket_path),
                activated=activated is not None,
                storage=storage_url,
                agents=list(agents),
            )
            task_status.started(server)
            await stop.wait()
            log.info("daemon_stopping", grace_s=config.daemon.shutdown_grace_s)
            server.shutting_down = True
            await listener.aclose()
            if activated is None:  # systemd keeps listening on its socket, for the next start
                await trio.Path(socket_path).unlink(missing_ok=True)
            await runtime.shutdown(config.daemon.shutdown_grace_s)
            await server.close_connections()
            for provider in providers.values():
                await provider.aclose()
            root.cancel_scope.cancel()
    log.info("daemon_stopped")


async def _stop_on_signal(signals: AsyncIterator[int], stop: trio.Event) -> None:
    async for signum in signals:
        log.info("signal_received", signal=signal.Signals(signum).name)
        stop.set()
        return
