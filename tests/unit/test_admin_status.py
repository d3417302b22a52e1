"""Snapshots and the loop-owned recorders behind the admin endpoints (node/status.py)."""

from __future__ import annotations

import dataclasses

import pytest

from node.status import (
    APPROVAL_LATENCY_BUCKETS_S,
    ClientView,
    EventLog,
    LatencyHistogram,
    LatencyRecorder,
    RoomView,
    ServerView,
    Snapshot,
    SnapshotBox,
)


def test_a_snapshot_needs_only_a_server_id() -> None:
    snapshot = Snapshot(server_id="s1")
    assert snapshot.serving is False and snapshot.servers == () and snapshot.raft.leader is None
    assert snapshot.approval_latency.count == 0


def test_snapshots_are_immutable() -> None:
    snapshot = Snapshot(server_id="s1")
    with pytest.raises(dataclasses.FrozenInstanceError):
        snapshot.coordinator = "s2"  # type: ignore[misc]


def test_snapshot_lookups() -> None:
    snapshot = Snapshot(
        server_id="s1",
        servers=(ServerView("s1"), ServerView("s2")),
        rooms=(RoomView("MainHall-s1", "s1", "", ()), RoomView("games", "s2", "carol")),
        clients=(ClientView("alice", "s1", "MainHall-s1"), ClientView("carol", "s2")),
    )
    assert [r.room_id for r in snapshot.local_rooms] == ["MainHall-s1"]
    assert [c.identity for c in snapshot.local_clients] == ["alice"]
    assert snapshot.room("games") is not None and snapshot.room("nope") is None
    assert snapshot.client("carol") == ClientView("carol", "s2")
    assert snapshot.server("s2") == ServerView("s2") and snapshot.server("s9") is None


def test_snapshot_box_hands_out_the_latest_snapshot_and_its_age() -> None:
    now = [10.0]
    box = SnapshotBox(lambda: now[0])
    assert box.get() is None and box.age_s() is None
    first, second = Snapshot(server_id="s1"), Snapshot(server_id="s1", serving=True)
    box.publish(first)
    now[0] = 12.5
    assert box.get() is first and box.age_s() == 2.5
    box.publish(second)
    assert box.get() is second and box.age_s() == 0.0


def test_latency_samples_on_a_bound_fall_in_that_bucket() -> None:
    """Prometheus buckets are "less than or equal": le="0.005" counts a 0.005 s sample."""
    recorder = LatencyRecorder((0.005, 0.01))
    for sample in (0.001, 0.005, 0.0051, 0.01, 3.0):
        recorder.observe(sample)
    histogram = recorder.freeze()
    assert histogram.counts == (2, 2, 1)
    assert histogram.cumulative() == ((0.005, 2), (0.01, 4), (float("inf"), 5))
    assert histogram.count == 5
    assert histogram.total_s == pytest.approx(3.0211)


def test_a_frozen_histogram_does_not_change_with_its_recorder() -> None:
    recorder = LatencyRecorder()
    recorder.observe(0.002)
    frozen = recorder.freeze()
    recorder.observe(0.002)
    assert frozen.count == 1 and recorder.freeze().count == 2


def test_histogram_of_raw_samples() -> None:
    histogram = LatencyHistogram.of([0.003, 20.0])
    assert histogram.bounds == APPROVAL_LATENCY_BUCKETS_S
    assert histogram.counts[-1] == 1 and histogram.count == 2


def test_histogram_shape_is_checked() -> None:
    with pytest.raises(AssertionError):
        LatencyHistogram((0.1, 0.2), (0, 0))


def test_event_log_keeps_the_newest_events_oldest_first() -> None:
    log = EventLog(limit=3)
    for i in range(5):
        log.record(float(i), f"event {i}")
    events = log.freeze()
    assert [e.text for e in events] == ["event 2", "event 3", "event 4"]
    assert events[0].wall_time == 2.0
    wall_time, text = events[-1]
    assert (wall_time, text) == (4.0, "event 4")
