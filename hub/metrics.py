"""Prometheus metrics of one hub process, served at ``GET /metrics`` (text format 0.0.4).

Each :class:`Metrics` has its own ``CollectorRegistry``, so several hubs in one process (tests)
do not collide. Names are listed in docs/reliability.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]


class Metrics:
    """Counters and gauges of a hub process. Gauges read live values through callbacks."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.connections = Gauge("hub_connections", "Open WebSocket connections", registry=r)
        self.subscriptions = Gauge("hub_subscriptions", "Channel subscriptions of local "
                                   "connections, personal channels included", registry=r)
        self.channels = Gauge("hub_channels", "Channels with at least one local subscriber",
                              registry=r)
        self.broker_connected = Gauge("hub_broker_connected", "1 while the broker is connected",
                                      registry=r)
        self.received = Counter("hub_messages_received", "Messages received from the broker",
                                registry=r)
        self.deliveries = Counter("hub_deliveries", "Messages written to local connections",
                                  registry=r)
        self.burst_messages = Counter(
            "hub_burst_messages", "Broker messages that reached the node in a burst (more "
            "than one read at once), whose frames were coalesced per connection", registry=r)
        self.coalesced_writes = Counter(
            "hub_coalesced_writes", "Transport writes that carried several frames of one "
            "broker burst to one connection (one write instead of one per frame)", registry=r)
        self.errors = Counter("hub_errors", "Error replies sent to clients, by code", ["code"],
                              registry=r)
        self.slow_consumers = Counter("hub_slow_consumers_closed", "Connections closed with "
                                      "4008 because their write buffer passed the limit",
                                      registry=r)
        self.broker_reconnects = Counter("hub_broker_reconnects", "Broker links rebuilt after "
                                         "a loss", registry=r)
        self.gaps = Counter("hub_gaps_signalled", "gap frames sent to clients after a broker "
                            "outage", registry=r)
        self.handshakes_in_progress = Gauge(
            "hub_handshakes_in_progress", "TCP connections accepted whose opening handshake "
            "has not ended", registry=r)
        self.handshakes_aborted = Counter(
            "hub_handshakes_aborted", "Connections given up before the end of their "
            "opening handshake: evicted (the oldest, past --max-pending-handshakes), timeout "
            "(--handshake-timeout), malformed (past the request header limits, or not HTTP)",
            ["reason"], registry=r)
        self.accept_errors = Counter(
            "hub_accept_errors", "accept() calls of a listening socket that failed (EMFILE: "
            "out of file descriptors, ENFILE, ENOBUFS, ENOMEM)", registry=r)
        self.closes = Counter("hub_connections_closed", "Connections closed by the hub, by "
                              "close code", ["code"], registry=r)
        self.payloads_dropped = Counter("hub_payloads_dropped", "Broker messages not delivered "
                                        "to anyone, by reason (too_large: over "
                                        "--max-payload-bytes)", ["reason"], registry=r)
        self.broker_lag = Gauge("hub_broker_lag_seconds", "Age of the oldest broker message "
                                "not yet delivered, as the last liveness probe measured it",
                                registry=r)
        self.recoveries = Counter(
            "hub_recoveries", "Subscribes with since on history channels, by result: asked, "
            "succeeded (recovered:true), failed (recovered:false)", ["result"], registry=r)
        self.history_repairs = Counter(
            "hub_history_repairs", "Ranges of skipped offsets this process read back from "
            "history (a skipped offset in the live stream, a broker reconnect)", registry=r)
        self.history_refilled = Counter(
            "hub_history_refilled", "Messages delivered from history by repairs", registry=r)
        self.history_duplicates = Counter(
            "hub_history_duplicates", "History messages dropped as already delivered",
            registry=r)
        self.unrecorded_publishes = Counter(
            "hub_unrecorded_publishes", "Plain PUBLISHes on history channels: delivered live, "
            "not recorded, not recoverable", registry=r)
        self.api_requests = Counter(
            "hub_api_requests", "HTTP API requests (--api-port), by endpoint (publish, "
            "broadcast, history, presence, presence_stats, batch, info, openapi; other: an "
            "unknown path) and HTTP status",
            ["endpoint", "status"], registry=r)
        self.api_seconds = Histogram(
            "hub_api_request_seconds", "Seconds from an HTTP API request's headers to its "
            "answer, by endpoint", ["endpoint"], registry=r,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                     2.5, 5.0, 10.0))
        self.presence_events = Counter(
            "hub_presence_events", "Presence join and leave events this process published "
            "(each leave by the one process that removed the entry), by event: join, leave",
            ["event"], registry=r)
        self.presence_sweeps = Counter(
            "hub_presence_sweeps", "Presence sweeps this process ran (one per shard store "
            "per sweep; a failed one included)", registry=r)
        self.presence_swept = Counter(
            "hub_presence_swept", "Expired presence entries (of dead or stalled processes) "
            "this process's sweeps deleted", registry=r)
        self.presence_recreated = Counter(
            "hub_presence_recreated", "Presence entries of this process that a refresh "
            "found missing and created again (swept while the process stalled, or lost by "
            "Redis): announced as joins again (with join_leave)", registry=r)
        self.presence_failures = Counter(
            "hub_presence_failures", "Presence operations that failed (logged, never failing "
            "a subscribe or unsubscribe), by op: add, remove, refresh, sweep (a store call), "
            "publish (a join or leave event not published)", ["op"], registry=r)
        self.broker_connect_attempts = _CallbackCounter(
            "hub_broker_connect_attempts", "Attempts to (re)build a broker link, successful or "
            "not")
        r.register(self.broker_connect_attempts)

    def bind(self, connections: Callable[[], float], subscriptions: Callable[[], float],
             channels: Callable[[], float], broker_connected: Callable[[], float]) -> None:
        """Attach the callbacks the gauges read at scrape time."""
        self.connections.set_function(connections)
        self.subscriptions.set_function(subscriptions)
        self.channels.set_function(channels)
        self.broker_connected.set_function(broker_connected)

    def bind_broker(self, lag: Callable[[], float], connect_attempts: Callable[[], float]
                    ) -> None:
        """Attach the callbacks of ``hub_broker_lag_seconds`` and
        ``hub_broker_connect_attempts_total``, read at scrape time."""
        self.broker_lag.set_function(lag)
        self.broker_connect_attempts.read = connect_attempts

    def render(self) -> bytes:
        """The exposition text of every metric."""
        return generate_latest(self.registry)


class _CallbackCounter(Collector):
    """A counter whose value is read at scrape time from ``read`` (a count kept elsewhere,
    e.g. by the broker); exposed as ``<name>_total``."""

    def __init__(self, name: str, documentation: str) -> None:
        self.name = name
        self.documentation = documentation
        self.read: Callable[[], float] = lambda: 0.0

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self.name, self.documentation, value=self.read())
