"""Prometheus metrics of one server, computed from its latest published snapshot.

The counts live in the event loop's state and reach the admin thread only as an immutable `Snapshot`, so
the metrics are not prometheus_client `Counter`/`Gauge` objects mutated by the loop (that would share
mutable state across threads). Instead a custom collector turns the snapshot into metric families at
scrape time: the documented prometheus_client pattern for values owned elsewhere. Each app gets its own
`CollectorRegistry`, so several apps in one process (tests) never collide in the global registry.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from node.status import Counters, RaftView, Snapshot, SnapshotBox

PREFIX = "chatmesh_"


# Counter name (without _total) -> (Counters field, help text).
def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, doc, value=value)


class SnapshotCollector(Collector):
    """Yields the metric families of the latest snapshot on every scrape."""

    def __init__(self, snapshots: SnapshotBox) -> None:
        self.snapshots = snapshots

    def collect(self) -> Iterator[Metric]:
        snapshot = self.snapshots.get()
        yield _gauge("serving", "1 once this server accepts clients and has announced itself", _serving(snapshot))
        age = self.snapshots.age_s()
        yield _gauge(
            "snapshot_age_seconds",
            "Seconds since the event loop last published its state (NaN before the first)",
            math.nan if age is None else age,
        )
        if snapshot is None:
            return
        yield from self._gauges(snapshot)
        yield from self._counters(snapshot)
        yield self._latency(snapshot)

    def _gauges(self, s: Snapshot) -> Iterator[Metric]:
        yield _gauge("clients", "Clients connected to this server", s.local_client_count)
        yield _gauge("rooms", "Rooms hosted by this server (MainHall included)", len(s.local_rooms))
        yield _gauge(
            "registry_identities", "Identities in the replicated registry (cluster-wide)", s.registry_counts.identities
        )
        yield _gauge("registry_rooms", "Rooms in the replicated registry (cluster-wide)", s.registry_counts.rooms)
        yield _gauge(
            "is_coordinator", "1 while this server is the Fast Bully coordinator", int(s.coordinator == s.server_id)
        )
        coordinator = GaugeMetricFamily(
            PREFIX + "coordinator",
            "1 for the server this server takes as coordinator, 0 for the others",
            labels=["server_id"],
        )
        for server in s.servers:
            coordinator.add_metric([server.server_id], int(server.server_id == s.coordinator))
        yield coordinator
        yield _gauge(
            "loop_max_gap_seconds",
            "Longest the event loop was late to its watchdog tick since the process started",
            s.loop_max_gap_s,
        )
        for f in dataclasses.fields(RaftView):
            if "gauge" in f.metadata:
                yield _gauge(f.metadata["gauge"], f.metadata["help"], float(getattr(s.raft, f.name)))
        peer_up = GaugeMetricFamily(
            PREFIX + "peer_up", "1 while the failure detector sees the peer server up, 0 while down", labels=["peer"]
        )
        for server in s.servers:
            if server.server_id != s.server_id:
                peer_up.add_metric([server.server_id], int(server.up))
        yield peer_up

    def _counters(self, s: Snapshot) -> Iterator[Metric]:
        for f in dataclasses.fields(Counters):
            yield CounterMetricFamily(PREFIX + f.name, f.metadata["help"], value=getattr(s.counters, f.name))

    def _latency(self, s: Snapshot) -> Metric:
        histogram = s.approval_latency
        buckets = [(_le(bound), count) for bound, count in histogram.cumulative()]
        return HistogramMetricFamily(
            PREFIX + "approval_latency_seconds",
            "Time from an identity/room request to its committed answer",
            buckets=buckets,
            sum_value=histogram.total_s,
        )


def _serving(snapshot: Snapshot | None) -> int:
    return int(snapshot is not None and snapshot.serving)


def _le(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else repr(float(bound))


def metrics_registry(snapshots: SnapshotBox) -> CollectorRegistry:
    """A registry of its own (never the global one) holding only this app's snapshot collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snapshots))
    return registry


def render_metrics(registry: CollectorRegistry, accept: str | None = None) -> tuple[bytes, str]:
    """(body, content type): the Prometheus text format, or OpenMetrics when the scraper's Accept
    header asks for it (prometheus_client picks, as its own HTTP handler does)."""
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type
