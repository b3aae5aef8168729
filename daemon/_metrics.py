"""Prometheus metrics of one daemon: a registry of its own, its series, and `/metrics`.

A registry per daemon, never prometheus_client's global one: one process may
run several daemons (the tests do). Every label is bounded: agents and
providers come from the config, tools from the built-in set ("unknown" for a
name the model made up), and status, outcome, direction and consumer are
enums. Never a sender, a run id or any text.

The daemon counts in plain numbers on the loop (an agent's or a tool's series
resolved once, a histogram's bucket found by ``bisect``): prometheus_client's
``Counter.inc`` and ``Histogram.observe`` take a lock and check their state on
every call, which cost a run on ``memory:`` about a tenth of its daemon's
bytecode. The numbers become metric families when `/metrics` is scraped.

`/metrics` is prometheus_client's own HTTP server, on its own thread: it
negotiates the format (Prometheus text or OpenMetrics) and gzip. A scrape
reads the counts, and the gauges from the runtime, on the loop's thread
(``trio.from_thread``), so it never sees a conversation or a histogram
half-changed.
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import partial
from types import TracebackType
from typing import NamedTuple
from wsgiref.simple_server import WSGIServer

import trio
from prometheus_client import (
    CollectorRegistry,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

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


class Timings:
    """One histogram's observations: how many fell in each bucket (the last is +Inf's),
    and their sum."""

    __slots__ = ("bounds", "counts", "les", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        # The `le` labels, as prometheus_client writes them ("1.0", "+Inf").
        self.les = [floatToGoString(bound) for bound in (*bounds, float("inf"))]  # type: ignore[no-untyped-call]
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1  # le: the first bound >= it
        self.sum += seconds

    def time(self) -> Timer:
        """Observes the time spent in a ``with`` block (raising too)."""
        return Timer(self)

    def buckets(self) -> list[tuple[str, float]]:
        """The cumulative buckets, as a HistogramMetricFamily takes them."""
        found: list[tuple[str, float]] = []
        total = 0
        for le, count in zip(self.les, self.counts, strict=True):
            total += count
            found.append((le, total))
        return found


class Timer:
    __slots__ = ("_started", "_timings")

    def __init__(self, timings: Timings) -> None:
        self._timings = timings
        self._started = 0.0

    def __enter__(self) -> None:
        self._started = time.perf_counter()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._timings.observe(time.perf_counter() - self._started)


class AgentSeries:
    """One agent's series: a run's hooks look nothing up."""

    __slots__ = (
        "first_output_seconds",
        "input_tokens",
        "model_call_seconds",
        "output_tokens",
        "provider",
        "run_seconds",
        "runs",
    )

    def __init__(self, provider: str) -> None:
        self.provider = provider
        self.runs = dict.fromkeys(RUN_STATUSES, 0)  # by status
        self.run_seconds = Timings(RUN_BUCKETS)
        self.first_output_seconds = Timings(FIRST_OUTPUT_BUCKETS)
        self.model_call_seconds = Timings(MODEL_CALL_BUCKETS)
        self.input_tokens = 0
        self.output_tokens = 0


class ToolSeries:
    """One tool's series: its calls by outcome and their duration."""

    __slots__ = ("error", "ok", "seconds")

    def __init__(self) -> None:
        self.ok = 0
        self.error = 0
        self.seconds = Timings(TOOL_BUCKETS)


class Metrics:
    """The series of one daemon, in its own registry; ``listen`` serves them."""

    def __init__(self, agents: Mapping[str, AgentConfig]) -> None:
        self.agents = {name: AgentSeries(agent.provider) for name, agent in agents.items()}
        whitelisted = {tool for agent in agents.values() for tool in agent.tools}
        self._tools = {tool: ToolSeries() for tool in sorted(whitelisted)}
        self.storage_append_seconds = Timings(APPEND_BUCKETS)
        #: By consumer: a client's connection, a subscription, a mail watch.
        self.dropped = dict.fromkeys(CONSUMERS, 0)
        self.mail_posted = 0
        self.mail_delivery_seconds = Timings(MAIL_BUCKETS)
        #: Reads the gauges' values, on the loop's thread; set once the runtime exists.
        self.state: Callable[[], DaemonState] | None = None
        self._token: trio.lowlevel.TrioToken | None = None  # the loop `state` runs on
        self._server: tuple[WSGIServer, threading.Thread] | None = None
        self.registry = registry = CollectorRegistry()
        registry.register(_Collector(self))
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)

    def tool(self, name: str) -> ToolSeries:
        """The series of tool ``name``; a name no tool has is counted as ``unknown``."""
        series = self._tools.get(name)
        if series is None:  # a tool no agent whitelists, or a name the model made up
            label = name if name in TOOL_NAMES else UNKNOWN_TOOL
            series = self._tools.get(label) or ToolSeries()
            self._tools[label] = series
        return series

    def families(self) -> list[Metric]:
        """Every series as metric families, read as they are now, with the gauges when
        the runtime exists. Called on the loop's thread (``read``)."""
        found = list(self._counted())
        state = self.state
        if state is not None:
            found += _gauges(state(), sorted(self.agents))
        return found

    def read(self) -> list[Metric]:
        """``families``, read on the loop's thread while it runs."""
        if self._token is None or trio.lowlevel.in_trio_run():
            return self.families()
        try:
            return trio.from_thread.run_sync(self.families, trio_token=self._token)
        except trio.RunFinishedError:  # the loop is gone: no gauges, no more counting
            return list(self._counted())

    def _counted(self) -> Iterator[Metric]:
        agents = sorted(self.agents.items())
        runs = CounterMetricFamily(
            "chinwag_runs",
            "Runs ended, by the agent that spoke and how the run ended.",
            labels=["agent", "status"],
        )
        for agent, series in agents:
            for status, count in series.runs.items():
                runs.add_metric([agent, status], count)
        yield runs
        by_agent = (
            (
                "chinwag_run_duration_seconds",
                "From a run leaving its queue to its end.",
                "run_seconds",
            ),
            (
                "chinwag_run_first_output_seconds",
                "From a run leaving its queue to the model's first text, thinking or tool call.",
                "first_output_seconds",
            ),
        )
        for name, documentation, field in by_agent:
            family = HistogramMetricFamily(name, documentation, labels=["agent"])
            for agent, series in agents:
                timings: Timings = getattr(series, field)
                family.add_metric([agent], timings.buckets(), timings.sum)
            yield family
        calls = HistogramMetricFamily(
            "chinwag_model_call_duration_seconds",
            "One model call, from the request to the stream's end.",
            labels=["agent", "provider"],
        )
        tokens = CounterMetricFamily(
            "chinwag_model_tokens",
            "Tokens the provider reported, in (the prompt) and out (the answer).",
            labels=["agent", "provider", "direction"],
        )
        for agent, series in agents:
            timings = series.model_call_seconds
            calls.add_metric([agent, series.provider], timings.buckets(), timings.sum)
            tokens.add_metric([agent, series.provider, "input"], series.input_tokens)
            tokens.add_metric([agent, series.provider, "output"], series.output_tokens)
        yield calls
        yield tokens
        tools = sorted(self._tools.items())
        tool_calls = CounterMetricFamily(
            "chinwag_tool_calls",
            "Tool calls, by tool and whether the result was an error.",
            labels=["tool", "outcome"],
        )
        tool_seconds = HistogramMetricFamily(
            "chinwag_tool_call_duration_seconds",
            "One tool call, from its start to its result.",
            labels=["tool"],
        )
        for tool, series_of_tool in tools:
            tool_calls.add_metric([tool, "ok"], series_of_tool.ok)
            tool_calls.add_metric([tool, "error"], series_of_tool.error)
            timings = series_of_tool.seconds
            tool_seconds.add_metric([tool], timings.buckets(), timings.sum)
        yield tool_calls
        yield tool_seconds
        appends = self.storage_append_seconds
        yield HistogramMetricFamily(
            "chinwag_storage_append_duration_seconds",
            "One append to a conversation's history, as the run waits for it.",
            buckets=appends.buckets(),
            sum_value=appends.sum,
        )
        dropped = CounterMetricFamily(
            "chinwag_slow_consumers_dropped",
            "Consumers dropped for falling too far behind: a client's connection, a"
            " subscription, a mail watch.",
            labels=["consumer"],
        )
        for consumer, count in self.dropped.items():
            dropped.add_metric([consumer], count)
        yield dropped
        yield CounterMetricFamily(
            "chinwag_mail_posted",
            "Mail messages stored (a retried post counts once).",
            value=self.mail_posted,
        )
        delivery = self.mail_delivery_seconds
        yield HistogramMetricFamily(
            "chinwag_mail_delivery_seconds",
            "From a message's post to its frame leaving the watch's buffer for the watcher.",
            buckets=delivery.buckets(),
            sum_value=delivery.sum,
        )

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


class _Collector:
    """The daemon's series, as the registry collects them at each scrape."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return self._metrics.read()


def _gauges(state: DaemonState, agents: list[str]) -> list[Metric]:
    """The gauges, read at scrape time from the runtime, never updated as things change."""
    found: list[Metric] = []
    by_agent = (
        ("chinwag_runs_in_flight", "Conversations running a job now.", state.runs_in_flight),
        ("chinwag_runs_queued", "Jobs waiting behind the one in flight.", state.runs_queued),
    )
    for name, documentation, values in by_agent:
        family = GaugeMetricFamily(name, documentation, labels=["agent"])
        for agent in agents:
            family.add_metric([agent], values.get(agent, 0))
        found.append(family)
    found.append(
        GaugeMetricFamily(
            "chinwag_connections", "Clients connected to the socket.", value=state.connections
        )
    )
    found.append(
        GaugeMetricFamily(
            "chinwag_open_requests",
            "Requests open on every connection (streams, subscriptions, watches...).",
            value=state.open_requests,
        )
    )
    return found
