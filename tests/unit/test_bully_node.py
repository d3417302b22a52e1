"""ElectionNode: the wiring of core, failure detector and heartbeat schedule, rule by rule (bully/node.py)."""

from __future__ import annotations

import random

import pytest

from bully.election import ElectionTimings
from bully.messages import Heartbeat, IamUp
from bully.node import Broadcast, CoordinatorChanged, ElectionNode, Output, PeerDown, PeerUp, Send

T = ElectionTimings()
PRIORITIES = {"s1": 1, "s2": 2, "s3": 3}


def node(self_id: str = "s1", incarnation: int = 7) -> ElectionNode:
    return ElectionNode(self_id, PRIORITIES, T, lambda: True, random.Random(1), incarnation)


def heartbeats(outputs: list[Output]) -> list[Heartbeat]:
    return [o.message for o in outputs if isinstance(o, Broadcast) and isinstance(o.message, Heartbeat)]


def test_nothing_is_due_before_start_and_start_announces_with_a_heartbeat_due_at_once() -> None:
    n = node()
    assert n.next_deadline() is None
    outputs = n.start(10.0)
    assert any(isinstance(o, Broadcast) and isinstance(o.message, IamUp) for o in outputs)
    assert n.next_deadline() == 10.0


def test_heartbeats_go_out_every_interval_with_epoch_incarnation_and_coordinator() -> None:
    n = node()
    n.start(0.0)
    first = heartbeats(n.on_deadline(0.0))
    assert first == [Heartbeat("s1", n.epoch, 7, n.coordinator)]
    assert heartbeats(n.on_deadline(T.heartbeat_interval_s / 2)) == []
    n.incarnation = 8  # fenced: a new life, heartbeats carry it from now on
    assert heartbeats(n.on_deadline(T.heartbeat_interval_s))[0].incarnation == 8


def test_after_a_stall_the_schedule_restarts_instead_of_sending_a_burst() -> None:
    n = node()
    n.start(0.0)
    n.on_deadline(0.0)
    assert len(heartbeats(n.on_deadline(5.0))) == 1
    deadline = n.next_deadline()
    assert deadline is not None and deadline <= 5.0 + T.heartbeat_interval_s


def test_a_heartbeat_brings_its_peer_up_before_the_core_sees_the_message() -> None:
    n = node()
    n.start(0.0)
    outputs = n.receive("s2", Heartbeat("s2", 0, 5, None), 0.01)
    assert outputs[0] == PeerUp("s2", 5)
    assert "s2" in n.servers_up and n.peer_incarnations == {"s2": 5}


def test_a_silent_peer_is_declared_down_at_a_deadline_and_the_core_reacts() -> None:
    n = node("s1")
    n.start(0.0)
    n.receive("s3", Heartbeat("s3", 1, 5, "s3"), 0.0)
    n.on_deadline(0.0)
    assert n.coordinator == "s3"
    now = 0.0
    outputs: list[Output] = []
    while not any(isinstance(o, PeerDown) for o in outputs):
        deadline = n.next_deadline()
        assert deadline is not None and deadline > now - 1e-9
        now = max(deadline, now)
        outputs = n.on_deadline(now)
        assert now < 5.0, "never declared down"
    assert PeerDown("s3", 5) in outputs
    assert now >= T.suspect_after_s
    assert "s3" not in n.servers_up


def test_a_lost_connection_and_a_refused_reconnect_are_down_at_once() -> None:
    n = node("s1")
    n.start(0.0)
    n.receive("s3", Heartbeat("s3", 1, 5, "s3"), 0.0)
    n.on_deadline(0.0)
    assert n.coordinator == "s3"
    assert n.on_link_event("s3", "lost", 0.1) == []
    outputs = n.on_link_event("s3", "refused", 0.1)
    assert outputs[0] == PeerDown("s3", 5, certain=True)
    assert CoordinatorChanged(None) in outputs and n.coordinator is None  # the core starts the failover


def test_a_late_timer_credits_the_peers_silence() -> None:
    """The observer's timer fired 0.3 s late: heartbeats may be waiting unread, so nobody is declared down
    on the strength of a silence the observer itself caused; on time, the same silence is a failure."""
    late, on_time = node("s1"), node("s1")
    for n in (late, on_time):
        n.start(0.0)
        n.receive("s2", Heartbeat("s2", 1, 5, "s2"), 0.0)  # our coordinator: expected at the full rate
    at = T.suspect_after_s + 0.01
    tick = 0.0
    while tick + T.heartbeat_interval_s < at:
        on_time.on_deadline(tick, armed_for=tick)
        if tick <= at - 0.3:
            late.on_deadline(tick, armed_for=tick)
        tick += T.heartbeat_interval_s
    assert PeerDown("s2", 5) in on_time.on_deadline(at, armed_for=at)
    assert PeerDown("s2", 5) not in late.on_deadline(at, armed_for=at - 0.3)


def sends(outputs: list[Output]) -> list[str]:
    """Where the heartbeats in `outputs` go ("*" for a broadcast)."""
    return sorted(
        "*" if isinstance(o, Broadcast) else o.to
        for o in outputs
        if isinstance(o, (Broadcast, Send)) and isinstance(o.message, Heartbeat)
    )


def follower(self_id: str = "s1") -> ElectionNode:
    """A member of {s1, s2, s3} following s3, past its first (broadcast) heartbeats."""
    n = node(self_id)
    n.start(0.0)
    n.on_deadline(0.0)
    n.receive("s3", Heartbeat("s3", 1, 5, "s3"), 0.0)
    assert n.coordinator == "s3"
    return n


def test_a_member_beats_only_its_coordinator_and_everyone_once_per_mesh_interval() -> None:
    n = follower()
    targets = []
    for tick in range(1, 26):  # 2.5 s after the first (broadcast) heartbeat
        t = tick * T.heartbeat_interval_s
        targets.append(sends(n.receive("s3", Heartbeat("s3", 1, 5, "s3"), t) + n.on_deadline(t)))
    assert sum("*" in t for t in targets) == int(2.5 / T.mesh_heartbeat_interval_s)
    assert all(t in (["*"], ["s3"], ["*", "s3"]) for t in targets)
    assert all(t.count("s3") == 1 for t in targets)  # every beat of the coordinator answered, once


def test_a_member_answers_its_coordinators_beat_at_once_and_beats_it_itself_once_they_stop() -> None:
    """The coordinator hears its members right after its own beat (a few loop wake-ups per tick, not n-1),
    and our tick leaves the coordinator out while its beats arrive; once they stop, our tick beats it
    within one interval, so a silent coordinator is still beaten at the full rate."""
    n = follower()
    interval = T.heartbeat_interval_s
    beat = Heartbeat("s3", 1, 5, "s3")
    assert sends(n.receive("s3", beat, 0.53)) == ["s3"]
    assert n.next_deadline() == pytest.approx(0.63)  # no tick of our own before the next answer is due
    assert sends(n.receive("s3", beat, 0.53 + interval / 4)) == []  # at most one answer per half interval
    assert sends(n.on_deadline(0.6)) == []  # the coordinator was beaten less than an interval ago
    assert sends(n.receive("s3", beat, 0.63)) == ["s3"]
    # The coordinator falls silent: our own tick beats it from one interval after our last answer.
    ticks = [(t / 100, sends(n.on_deadline(t / 100))) for t in range(64, 100)]
    beats = [t for t, to in ticks if "s3" in to]
    assert beats and beats[0] <= 0.63 + interval + 0.011
    assert all(b - a <= interval + 0.011 for a, b in zip(beats, beats[1:], strict=False))


def test_a_member_followed_by_others_keeps_its_own_tick_for_them() -> None:
    """Answers do not push our tick back while servers follow us: they still get our beat every interval."""
    n = follower()
    n.receive("s2", Heartbeat("s2", 1, 5, "s1"), 0.5)  # s2 takes us for its coordinator
    follower_beats = []
    for step in range(1, 11):
        t = 0.5 + step * T.heartbeat_interval_s
        n.receive("s3", Heartbeat("s3", 1, 5, "s3"), t - 0.001)  # just before each of our ticks
        follower_beats += [t for to in sends(n.on_deadline(t)) if to in ("s2", "*")]
    assert len(follower_beats) >= 9  # one tick may fall a float hair before its due time


def test_two_servers_that_take_each_other_for_coordinator_do_not_bounce_beats() -> None:
    n = follower()
    answers = sum(len(sends(n.receive("s3", Heartbeat("s3", 1, 5, "s3"), 1.0 + i * 0.001))) for i in range(200))
    assert answers <= 0.2 / (T.heartbeat_interval_s / 2) + 1


def elected() -> tuple[ElectionNode, float]:
    """s3, the top of {s1, s2, s3}, started and ticked until it coordinates; and when that was."""
    n = node("s3")
    n.start(0.0)
    n.receive("s1", Heartbeat("s1", 0, 5, None), 0.0)
    n.receive("s2", Heartbeat("s2", 0, 5, None), 0.0)
    t = 0.0
    while n.coordinator != "s3":
        t += T.heartbeat_interval_s
        n.on_deadline(t)
        assert t < 5.0
    return n, t


def test_a_coordinator_beats_everyone_every_interval() -> None:
    n, t = elected()
    for _ in range(12):
        t += T.heartbeat_interval_s
        assert sends(n.on_deadline(t)) == ["*"]


def test_followers_are_known_with_since_when_they_follow_without_a_break() -> None:
    """For the membership policy (a new coordinator declares once a majority has followed it a moment):
    each peer from its first beat naming us, again from scratch after a beat naming someone else; this
    server itself from when it became coordinator; a peer we no longer hear is not counted."""
    n, t = elected()
    became = t
    assert n.followers() == {"s3": became}
    n.receive("s1", Heartbeat("s1", n.epoch, 5, "s3"), t + 0.01)
    n.receive("s2", Heartbeat("s2", n.epoch, 5, "s3"), t + 0.02)
    n.receive("s1", Heartbeat("s1", n.epoch, 5, "s3"), t + 0.11)  # still following: since unchanged
    assert n.followers() == {"s3": became, "s1": t + 0.01, "s2": t + 0.02}
    n.receive("s2", Heartbeat("s2", n.epoch, 5, "s1"), t + 0.12)  # s2 follows someone else now
    n.receive("s2", Heartbeat("s2", n.epoch, 5, "s3"), t + 0.2)  # and us again: a fresh start
    assert n.followers()["s2"] == t + 0.2
    for k in range(1, int(T.suspect_max_s / T.heartbeat_interval_s) + 2):
        n.on_deadline(t + 0.2 + k * T.heartbeat_interval_s)  # s1 and s2 silent: declared down, not counted
    assert n.followers() == {"s3": became}


def test_a_changed_coordinator_is_told_at_once_and_so_is_the_previous_one() -> None:
    n = follower()
    n.receive("s2", Heartbeat("s2", 1, 6, "s2"), 0.05)  # same epoch, lower priority: not better, ignored
    assert n.coordinator == "s3"
    outputs = n.receive("s2", Heartbeat("s2", 2, 6, "s2"), 0.06)  # a newer claim
    assert n.coordinator == "s2"
    assert sends(outputs) == ["s2", "s3"]
    assert [o.message.coordinator for o in outputs if isinstance(o, Send)] == ["s2", "s2"]


def silent_until_down(n: ElectionNode, peer: str, start: float, keep_alive: str | None = None) -> float:
    """Run `n`'s deadlines (with `keep_alive` beating it) until `peer` is declared down; when that was."""
    now = start
    while True:
        deadline = n.next_deadline()
        assert deadline is not None
        now = max(deadline, now)
        outputs = n.on_deadline(now)
        if keep_alive is not None:
            outputs += n.receive(keep_alive, Heartbeat(keep_alive, 1, 5, keep_alive), now)
        if any(isinstance(o, PeerDown) and o.peer == peer for o in outputs):
            return now
        assert now < start + 10.0, "never declared down"


def test_a_silent_member_is_suspected_after_the_mesh_window_the_coordinator_after_t1() -> None:
    n = follower()
    n.receive("s2", Heartbeat("s2", 1, 5, "s3"), 0.0)  # a fellow member: it beats us once per mesh interval
    assert "s2" in n.servers_heard_within(T.mesh_heartbeat_interval_s, T.suspect_after_s / 2)  # on schedule
    at = silent_until_down(n, "s2", 0.0, keep_alive="s3")
    assert at >= min(T.suspect_gap_factor * T.mesh_heartbeat_interval_s, T.suspect_max_s)
    m = follower()
    assert silent_until_down(m, "s3", 0.0) < T.suspect_after_s + T.heartbeat_interval_s


def test_a_follower_is_expected_at_the_full_rate_until_it_says_it_switched() -> None:
    n = node("s2")
    n.start(0.0)
    n.receive("s1", Heartbeat("s1", 1, 5, "s2"), 0.0)  # s1 follows us
    assert silent_until_down(n, "s1", 0.0) < T.suspect_after_s + T.heartbeat_interval_s
    m = node("s2")
    m.start(0.0)
    m.receive("s1", Heartbeat("s1", 1, 5, "s2"), 0.0)
    m.receive("s1", Heartbeat("s1", 2, 5, "s3"), 0.05)  # it switched to s3 and told us at once
    assert silent_until_down(m, "s1", 0.05) >= 0.05 + T.suspect_after_s + T.heartbeat_interval_s
