"""Prometheus metrics of one daemon: a registry of its own, its series, and `/metrics`.

A registry per daemon, never prometheus_client's global one: one process may
run several daemons (the tests do). Every label is bounded: agents and
providers come from the config, tools from the built-in set ("unknown" for a
name the model made up), and status, outcome, direction and consumer are
enums. Never a sender, a run id or any text.

`/metrics` is prometheus_client's own HTTP server, on its own thread: it
negotiates the format (Prometheus text or OpenMetrics) and gzip, and a scrape
costs the loop nothing but the gauges read from the runtime, which it reads
on the loop's thread (``trio.from_thread``), so it never sees a conversation
half-changed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import NamedTuple
from wsgiref.simple_server import WSGIServer

import trio
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from ._config import AgentConfig
from ._tools import TOOL_NAMES

RUN_STATUSES = ("done", "error", "killed")
OUTCOMES = ("ok", "error")
#: What is dropped for falling behind: a client's connection, a subscription, a mail watch.
CONSUMERS = ("connection", "subscription", "watch")
UNKNOWN_TOOL = "unknown"

# Buckets, in seconds, for what each histogram times.
RUN_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
FIRST_OUTPUT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
MODEL_CALL_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
TOOL_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 600)
APPEND_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
MAIL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)


class DaemonState(NamedTuple):
    """What the gauges read from the runtime and the server at each scrape."""

    runs_in_flight: Mapping[str, int]  # by agent: conversations running a job
    runs_queued: Mapping[str, int]  # by agent: jobs waiting behind them
    connections: int
    open_requests: int


class AgentSeries:
    """One agent's series, their labels resolved once: a run's hooks look nothing up."""

    __slots__ = (
        "first_output_seconds",
        "input_tokens",
        "model_call_seconds",
        "output_tokens",
        "run_seconds",
        "runs",
    )

    def __init__(self, metrics: Metrics, agent: str, provider: str) -> None:
        self.runs = {status: metrics.runs.labels(agent, status) for status in RUN_STATUSES}
        self.run_seconds = metrics.run_seconds.labels(agent)
        self.first_output_seconds = metrics.first_output_seconds.labels(agent)
        self.model_call_seconds = metrics.model_call_seconds.labels(agent, provider)
        self.input_tokens = metrics.tokens.labels(agent, provider, "input")
        self.output_tokens = metrics.tokens.labels(agent, provider, "output")


class ToolSeries:
    """One tool's series: its calls by outcome and their duration."""

    __slots__ = ("error", "ok", "seconds")

    def __init__(self, metrics: Metrics, tool: str) -> None:
        self.ok = metrics.tool_calls.labels(tool, "ok")
        self.error = metrics.tool_calls.labels(tool, "error")
        self.seconds = metrics.tool_call_seconds.labels(tool)


class Metrics:
    """The series of one daemon, in its own registry; ``listen`` serves them."""

    def __init__(self, agents: Mapping[str, AgentConfig]) -> None:
        self.registry = registry = CollectorRegistry()
        self.runs = Counter(
            "chinwag_runs",
            "Runs ended, by the agent that spoke and how the run ended.",
            ["agent", "status"],
            registry=registry,
        )
        self.run_seconds = Histogram(
            "chinwag_run_duration_seconds",
            "From a run leaving its queue to its end.",
            ["agent"],
            buckets=RUN_BUCKETS,
            registry=registry,
        )
        self.first_output_seconds = Histogram(
            "chinwag_run_first_output_seconds",
            "From a run leaving its queue to the model's first text, thinking or tool call.",
            ["agent"],
            buckets=FIRST_OUTPUT_BUCKETS,
            registry=registry,
        )
        self.model_call_seconds = Histogram(
            "chinwag_model_call_duration_seconds",
            "One model call, from the request to the stream's end.",
            ["agent", "provider"],
            buckets=MODEL_CALL_BUCKETS,
            registry=registry,
        )
        self.tokens = Counter(
            "chinwag_model_tokens",
            "Tokens the provider reported, in (the prompt) and out (the answer).",
            ["agent", "provider", "direction"],
            registry=registry,
        )
        self.tool_calls = Counter(
            "chinwag_tool_calls",
            "Tool calls, by tool and whether the result was an error.",
            ["tool", "outcome"],
            registry=registry,
        )
        self.tool_call_seconds = Histogram(
            "chinwag_tool_call_duration_seconds",
            "One tool call, from its start to its result.",
            ["tool"],
            buckets=TOOL_BUCKETS,
            registry=registry,
        )
        self.storage_append_seconds = Histogram(
            "chinwag_storage_append_duration_seconds",
            "One append to a conversation's history, as the run waits for it.",
            buckets=APPEND_BUCKETS,
            registry=registry,
        )
        dropped = Counter(
            "chinwag_slow_consumers_dropped",
            "Consumers dropped for falling too far behind: a client's connection, a"
            " subscription, a mail watch.",
            ["consumer"],
            registry=registry,
        )
        self.dropped = {consumer: dropped.labels(consumer) for consumer in CONSUMERS}
        self.mail_posted = Counter(
            "chinwag_mail_posted",
            "Mail messages stored (a retried post counts once).",
            registry=registry,
        )
        self.mail_delivery_seconds = Histogram(
            "chinwag_mail_delivery_seconds",
            "From a message's post to its frame leaving the watch's buffer for the watcher.",
            buckets=MAIL_BUCKETS,
            registry=registry,
        )
        self.agents = {
            name: AgentSeries(self, name, agent.provider) for name, agent in agents.items()
        }
        whitelisted = {tool for agent in agents.values() for tool in agent.tools}
        self._tools = {tool: ToolSeries(self, tool) for tool in sorted(whitelisted)}
        #: Reads the gauges' values, on the loop's thread; set once the runtime exists.
        self.state: Callable[[], DaemonState] | None = None
        self._token: trio.lowlevel.TrioToken | None = None  # the loop `state` runs on
        self._server: tuple[WSGIServer, threading.Thread] | None = None
        registry.register(_Gauges(self, sorted(agents)))
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)

    def tool(self, name: str) -> ToolSeries:
        """The series of tool ``name``; a name no tool has is counted as ``unknown``."""
        series = self._tools.get(name)
        if series is None:  # a tool no agent whitelists, or a name the model made up
            label = name if name in TOOL_NAMES else UNKNOWN_TOOL
            series = self._tools.get(label) or ToolSeries(self, label)
            self._tools[label] = series
        return series

    def read_state(self) -> DaemonState | None:
        """The gauges' values, read on the loop's thread; None before the runtime exists
        or once the loop is gone."""
        state = self.state
        if state is None:
            return None
        if self._token is None or trio.lowlevel.in_trio_run():
            return state()
        try:
            return trio.from_thread.run_sync(state, trio_token=self._token)
        except trio.RunFinishedError:
            return None

    async def listen(self, host: str, port: int) -> None:
        """Serve `/metrics` on ``host:port`` from a thread of its own, until ``aclose``;
        ``OSError`` when it cannot listen there."""
        self._token = trio.lowlevel.current_trio_token()
        start = partial(start_http_server, port, host, self.registry)
        self._server = await trio.to_thread.run_sync(start)

    async def aclose(self) -> None:
        """Stop serving `/metrics` (shielded: it completes, within the server's poll)."""
        if self._server is None:
            return
        httpd, thread = self._server
        self._server = None
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(httpd.shutdown)
            httpd.server_close()
            await trio.to_thread.run_sync(thread.join)


class _Gauges:
    """The gauges read at scrape time from the runtime, never updated as things change."""

    def __init__(self, metrics: Metrics, agents: list[str]) -> None:
        self._metrics = metrics
        self._agents = agents

    def collect(self) -> Iterable[Metric]:
        state = self._metrics.read_state()
        if state is None:
            return
        by_agent = (
            ("chinwag_runs_in_flight", "Conversations running a job now.", state.runs_in_flight),
            ("chinwag_runs_queued", "Jobs waiting behind the one in flight.", state.runs_queued),
        )
        for name, documentation, values in by_agent:
            family = GaugeMetricFamily(name, documentation, labels=["agent"])
            for agent in self._agents:
                family.add_metric([agent], values.get(agent, 0))
            yield family
        yield GaugeMetricFamily(
            "chinwag_connections", "Clients connected to the socket.", value=state.connections
        )
        yield GaugeMetricFamily(
            "chinwag_open_requests",
            "Requests open on every connection (streams, subscriptions, watches...).",
            value=state.open_requests,
        )
