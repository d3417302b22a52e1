"""The Fast Bully core, one test per rule (Lee & Choi, ICOIN 2002, section 3, and our additions).

Pure: no sockets, no sleeps; time is a number the test moves by hand.
"""

from __future__ import annotations

import random

import pytest

from bully.election import Broadcast, CoordinatorChanged, Effect, ElectionTimings, FastBully, Send
from bully.messages import Answer, Coordinator, Election, Heartbeat, IamUp, Message, Nomination, View

T = ElectionTimings()
PRIORITIES = {"s1": 1, "s2": 2, "s3": 3, "s4": 4, "s5": 5}
EPS = 1e-6


class Lead:
    """A switchable can_lead() predicate."""

    def __init__(self, value: bool = True) -> None:
        self.value = value

    def __call__(self) -> bool:
        return self.value


def make(me: str, can_lead: bool = True) -> tuple[FastBully, Lead]:
    lead = Lead(can_lead)
    return FastBully(me, PRIORITIES, T, lead, random.Random(7)), lead


def sent(effects: list[Effect]) -> list[tuple[str, Message]]:
    """(recipient, message) pairs; '*' for a broadcast."""
    out: list[tuple[str, Message]] = []
    for effect in effects:
        if isinstance(effect, Send):
            out.append((effect.to, effect.message))
        elif isinstance(effect, Broadcast):
            out.append(("*", effect.message))
    return out


def changes(effects: list[Effect]) -> list[str | None]:
    return [e.coordinator for e in effects if isinstance(e, CoordinatorChanged)]


def following(me: str, coordinator: str, epoch: int = 1, can_lead: bool = True) -> FastBully:
    """A server that started and follows `coordinator` at `epoch`."""
    core, _ = make(me, can_lead)
    core.start(0.0)
    core.receive(coordinator, Coordinator(coordinator, epoch), 0.01)
    assert core.coordinator == coordinator and core.state in ("idle", "blocked")
    return core


def coordinating(me: str = "s5", epoch: int = 1) -> FastBully:
    core, _ = make(me)
    core.start(0.0)
    for peer in PRIORITIES:
        if peer != me:
            core.receive(peer, View(peer, epoch - 1, None, (peer,)), 0.01)
    assert core.coordinator == me
    return core


# -- recovery: IamUp and views (paper 3.2) ---------------------------------------------------------------


def test_a_starting_server_broadcasts_iamup_and_waits_t2_for_views() -> None:
    core, _ = make("s3")
    assert sent(core.start(10.0)) == [("*", IamUp("s3", 0))]
    assert core.state == "starting"
    assert core.next_deadline() == pytest.approx(10.0 + T.answer_timeout_s)


def test_every_server_answers_iamup_with_its_view() -> None:
    core = following("s2", "s5", epoch=4)
    core.receive("s4", Heartbeat("s4", 4, 1, "s5"), 0.1)
    assert sent(core.receive("s1", IamUp("s1", 0), 0.2)) == [("s1", View("s2", 4, "s5", ("s5", "s4", "s2", "s1")))]


def test_a_recovering_server_that_outranks_every_view_announces_itself() -> None:
    core, _ = make("s5")
    core.start(0.0)
    core.receive("s4", View("s4", 3, "s4", ("s4", "s1")), 0.01)
    effects = core.on_deadline(T.answer_timeout_s)
    assert ("*", Coordinator("s5", 4)) in sent(effects)
    assert core.coordinator == "s5" and core.epoch == 4


def test_a_recovering_server_adopts_the_coordinator_the_views_name() -> None:
    core, _ = make("s2")
    core.start(0.0)
    core.receive("s1", View("s1", 3, "s4", ("s4", "s1")), 0.01)
    effects = core.on_deadline(T.answer_timeout_s)
    assert sent(effects) == []
    assert changes(effects) == ["s4"]
    assert core.coordinator == "s4" and core.state == "idle" and core.epoch == 3


def test_a_recovering_server_that_hears_no_view_announces_itself() -> None:
    core, _ = make("s1")
    core.start(0.0)
    assert core.on_deadline(T.answer_timeout_s - EPS) == []
    assert sent(core.on_deadline(T.answer_timeout_s)) == [("*", Coordinator("s1", 1))]


def test_views_from_every_server_decide_without_waiting_out_t2() -> None:
    core, _ = make("s5")
    core.start(0.0)
    effects: list[Effect] = []
    for peer in ("s1", "s2", "s3", "s4"):
        effects += core.receive(peer, View(peer, 0, None, (peer,)), 0.01)
    assert ("*", Coordinator("s5", 1)) in sent(effects)


def test_a_recovering_server_below_starting_higher_servers_waits_t4_then_elects() -> None:
    core, _ = make("s2")
    core.start(0.0)
    core.receive("s4", View("s4", 0, None, ("s4",)), 0.01)
    core.on_deadline(T.answer_timeout_s)
    assert core.state == "waiting"
    deadline = core.next_deadline()
    assert deadline is not None and deadline == pytest.approx(T.answer_timeout_s + T.nomination_timeout_s)
    effects = core.on_deadline(deadline)
    assert sent(effects) == [(p, Election("s2", 1)) for p in ("s5", "s4", "s3")]


def test_a_recovering_server_above_the_current_coordinator_bullies_it() -> None:
    core, _ = make("s4")
    core.start(0.0)
    core.receive("s5", View("s5", 2, "s3", ("s5", "s3")), 0.01)
    core.receive("s3", View("s3", 2, "s3", ("s5", "s3")), 0.01)
    effects = core.on_deadline(T.answer_timeout_s)
    assert core.coordinator == "s3"  # followed meanwhile
    assert ("s5", Election("s4", 3)) in sent(effects)


def test_a_coordinator_that_restarts_is_no_longer_followed() -> None:
    core = following("s2", "s5")
    effects = core.receive("s5", IamUp("s5", 0), 1.0)
    assert changes(effects) == [None]
    assert sent(effects) == [("s5", View("s2", 1, None, ("s5", "s2")))]
    assert core.state == "holdoff"


# -- failure and election (paper 3.1) --------------------------------------------------------------------


def test_the_top_survivor_announces_at_once_when_the_coordinator_fails() -> None:
    core = following("s4", "s5")
    effects = core.peer_failed("s5", 5.0)
    assert changes(effects) == [None, "s4"]
    assert sent(effects) == [("*", Coordinator("s4", 2))]


def test_a_lower_survivor_holds_off_then_sends_election_to_every_higher_server() -> None:
    core = following("s2", "s5")
    effects = core.peer_failed("s5", 5.0)
    assert changes(effects) == [None] and sent(effects) == []
    assert core.state == "holdoff"
    effects = core.on_deadline(5.0 + T.holdoff_s)
    assert sent(effects) == [(p, Election("s2", 2)) for p in ("s5", "s4", "s3")]
    assert core.state == "electing" and core.elections_started == 1


def test_an_announcement_during_the_holdoff_cancels_the_election() -> None:
    core = following("s2", "s5")
    core.peer_failed("s5", 5.0)
    core.receive("s4", Coordinator("s4", 2), 5.01)
    assert core.coordinator == "s4" and core.state == "idle"
    assert core.on_deadline(5.0 + T.holdoff_s) == []


def test_the_failure_of_a_server_other_than_the_coordinator_starts_nothing() -> None:
    core = following("s2", "s5")
    assert core.peer_failed("s3", 5.0) == []
    assert core.state == "idle"


def test_a_higher_server_answers_an_election_and_waits_t4() -> None:
    core = following("s4", "s5")
    effects = core.receive("s2", Election("s2", 2), 3.0)
    assert sent(effects) == [("s2", Answer("s4", 2))]
    assert core.state == "waiting"
    assert core.next_deadline() == pytest.approx(3.0 + T.nomination_timeout_s)


def test_an_answerer_that_hears_nothing_for_t4_elects_itself() -> None:
    core = following("s4", "s5")
    core.receive("s2", Election("s2", 2), 3.0)
    effects = core.on_deadline(3.0 + T.nomination_timeout_s)
    assert sent(effects) == [("s5", Election("s4", 3))]


def test_a_coordinator_message_ends_the_wait() -> None:
    core = following("s3", "s5")
    core.receive("s2", Election("s2", 2), 3.0)
    core.receive("s4", Coordinator("s4", 2), 3.1)
    assert core.state == "idle" and core.coordinator == "s4"
    assert core.next_deadline() is None


def electing(me: str = "s2", at: float = 5.0) -> FastBully:
    """An initiator at epoch 2 that has heard from nobody yet (no server known down)."""
    core = following(me, "s5")
    core.start_election(at)
    assert core.state == "electing"
    return core


def test_the_initiator_nominates_the_highest_answerer_after_t2() -> None:
    core = electing()
    core.receive("s3", Answer("s3", 2), 5.01)
    core.receive("s4", Answer("s4", 2), 5.02)
    assert core.state == "electing"  # s5 is not known down: it might still answer
    effects = core.on_deadline(5.0 + T.answer_timeout_s)
    assert sent(effects) == [("s4", Nomination("s2", 2))]
    assert core.state == "nominating"


def test_the_initiator_nominates_at_once_when_the_best_possible_answer_arrives() -> None:
    core = following("s2", "s5")
    core.peer_failed("s5", 4.9)  # known down: s4 is the best candidate
    core.on_deadline(5.0)
    effects = core.receive("s4", Answer("s4", 2), 5.01)
    assert sent(effects) == [("s4", Nomination("s2", 2))]


def test_the_nominee_announces_itself_to_all() -> None:
    core = following("s4", "s5")
    core.receive("s2", Election("s2", 2), 3.0)
    effects = core.receive("s2", Nomination("s2", 2), 3.1)
    assert sent(effects) == [("*", Coordinator("s4", 2))]
    assert changes(effects) == ["s4"] and core.state == "idle"


def test_a_silent_nominee_is_replaced_by_the_next_highest_answerer_after_t3() -> None:
    core = electing()
    core.receive("s3", Answer("s3", 2), 5.01)
    core.receive("s4", Answer("s4", 2), 5.02)
    core.on_deadline(5.0 + T.answer_timeout_s)
    effects = core.on_deadline(5.0 + T.answer_timeout_s + T.coordinator_timeout_s)
    assert sent(effects) == [("s3", Nomination("s2", 2))]


def test_after_k_silent_nominees_the_initiator_restarts_the_election() -> None:
    core = electing()
    for peer in ("s3", "s4"):
        core.receive(peer, Answer(peer, 2), 5.01)
    now = 5.0 + T.answer_timeout_s
    core.on_deadline(now)
    for _ in range(T.max_nominees - 1):
        now += T.coordinator_timeout_s
        core.on_deadline(now)
    effects = core.on_deadline(now + T.coordinator_timeout_s)
    assert sent(effects) == [(p, Election("s2", 3)) for p in ("s5", "s4", "s3")]


def test_an_initiator_without_any_answer_announces_itself_after_t2() -> None:
    core = electing()
    effects = core.on_deadline(5.0 + T.answer_timeout_s)
    assert sent(effects) == [("*", Coordinator("s2", 2))]


def test_the_nominees_announcement_ends_the_election() -> None:
    core = electing()
    core.receive("s4", Answer("s4", 2), 5.01)
    core.on_deadline(5.0 + T.answer_timeout_s)
    core.receive("s4", Coordinator("s4", 2), 5.4)
    assert core.state == "idle" and core.coordinator == "s4" and core.next_deadline() is None


def test_a_newer_election_supersedes_ones_own() -> None:
    core = electing("s3")
    effects = core.receive("s1", Election("s1", 3), 5.05)
    assert sent(effects) == [("s1", Answer("s3", 3))]
    assert core.state == "waiting" and core.epoch == 3


def test_concurrent_detections_converge_on_the_top_survivor() -> None:
    """s1..s4 all detect s5's failure at once; every message is delivered: one coordinator, s4."""
    cores = {sid: following(sid, "s5") for sid in ("s1", "s2", "s3", "s4")}
    queue: list[tuple[str, str, Message]] = []

    def run(sid: str, effects: list[Effect]) -> None:
        for to, message in sent(effects):
            for target in cores if to == "*" else [to]:
                if target != sid:
                    queue.append((sid, target, message))

    now = 10.0
    for sid, core in cores.items():
        run(sid, core.peer_failed("s5", now))
    for _ in range(200):
        while queue:
            src, dst, message = queue.pop(0)
            if dst in cores:
                run(dst, cores[dst].receive(src, message, now))
        now += 0.05
        for sid, core in cores.items():
            run(sid, core.on_deadline(now))
    assert {c.coordinator for c in cores.values()} == {"s4"}
    assert all(c.state == "idle" for c in cores.values())


# -- epochs --------------------------------------------------------------------------------------------------


def test_a_stale_election_is_ignored() -> None:
    core = following("s3", "s5", epoch=4)
    assert core.receive("s1", Election("s1", 3), 1.0) == []
    assert core.state == "idle"


def test_a_coordinator_answers_a_stale_election_with_its_announcement() -> None:
    core = coordinating("s5", epoch=4)
    assert sent(core.receive("s1", Election("s1", 2), 1.0)) == [("s1", Coordinator("s5", 4))]


def test_a_stale_coordinator_message_is_ignored() -> None:
    core = following("s3", "s4", epoch=5)
    assert core.receive("s5", Coordinator("s5", 4), 1.0) == []
    assert core.coordinator == "s4"


def test_a_stale_answer_is_ignored() -> None:
    core = electing()
    core.receive("s4", Answer("s4", 1), 5.01)
    assert sent(core.on_deadline(5.0 + T.answer_timeout_s)) == [("*", Coordinator("s2", 2))]


def test_a_stale_nomination_is_ignored() -> None:
    core = following("s4", "s5", epoch=3)
    assert core.receive("s1", Nomination("s1", 2), 1.0) == []
    assert core.coordinator == "s5"


def test_within_one_epoch_the_higher_priority_claim_wins() -> None:
    core = following("s1", "s3", epoch=2)
    core.receive("s4", Coordinator("s4", 2), 1.0)
    assert core.coordinator == "s4"
    core.receive("s2", Coordinator("s2", 2), 1.1)
    assert core.coordinator == "s4"


def test_a_late_message_of_a_failed_reign_does_not_revive_it() -> None:
    core = following("s2", "s5", epoch=3)
    core.peer_failed("s5", 5.0)
    core.receive("s5", Heartbeat("s5", 3, 1, "s5"), 5.01)
    assert core.coordinator is None
    core.receive("s5", Coordinator("s5", 4), 5.02)  # a newer announcement does
    assert core.coordinator == "s5"


def test_a_coordinator_keeps_its_claim_at_the_newest_epoch_it_sees() -> None:
    core = coordinating("s5", epoch=1)
    effects = core.receive("s2", Election("s2", 3), 2.0)
    assert sent(effects) == [("s2", Answer("s5", 3)), ("*", Coordinator("s5", 3))]
    assert sent(core.receive("s2", Nomination("s2", 3), 2.1)) == [("s2", Coordinator("s5", 3))]


def test_epochs_never_decrease() -> None:
    core = following("s3", "s5", epoch=6)
    for message in (Coordinator("s4", 2), Election("s1", 1), View("s1", 0, None, ()), Heartbeat("s1", 0, 1, None)):
        core.receive(message.sender, message, 1.0)
        assert core.epoch == 6


# -- bullying and repair ----------------------------------------------------------------------------------------


def test_a_higher_server_that_can_lead_bullies_a_lower_claimant() -> None:
    core = following("s4", "s5", epoch=2)
    core.peer_failed("s5", 3.0)  # s4 takes over at epoch 3
    core.receive("s5", Coordinator("s5", 4), 3.5)  # s5 recovered and announced: s4 follows
    assert core.coordinator == "s5"
    core.receive("s5", IamUp("s5", 0), 4.0)  # s5 restarts again
    effects = core.receive("s2", Coordinator("s2", 9), 4.1)
    assert ("s5", Election("s4", 10)) in sent(effects)


def test_a_coordinator_outranking_a_newer_claim_reannounces_at_its_epoch() -> None:
    core = coordinating("s5", epoch=2)
    effects = core.receive("s4", Coordinator("s4", 3), 1.0)
    assert sent(effects) == [("*", Coordinator("s5", 3))]
    assert core.coordinator == "s5"


def test_a_coordinators_heartbeat_repairs_a_lost_announcement() -> None:
    core = following("s2", "s4", epoch=2)
    effects = core.receive("s5", Heartbeat("s5", 3, 1, "s5"), 1.0)
    assert changes(effects) == ["s5"]


def test_a_coordinator_tells_a_lagging_peer_at_most_once_per_t2() -> None:
    core = coordinating("s5", epoch=3)
    assert sent(core.receive("s1", Heartbeat("s1", 0, 1, None), 1.0)) == [("s1", Coordinator("s5", 3))]
    assert core.receive("s1", Heartbeat("s1", 0, 1, None), 1.0 + T.answer_timeout_s / 2) == []
    assert sent(core.receive("s1", Heartbeat("s1", 0, 1, None), 1.0 + T.answer_timeout_s)) == [
        ("s1", Coordinator("s5", 3))
    ]


def test_a_coordinator_seeing_a_newer_epoch_follow_a_lower_server_reannounces() -> None:
    core = coordinating("s5", epoch=2)
    assert sent(core.receive("s1", Heartbeat("s1", 4, 1, "s3"), 1.0)) == [("*", Coordinator("s5", 4))]


def test_a_follower_whose_coordinator_stopped_coordinating_elects_a_new_one() -> None:
    core = following("s4", "s5", epoch=2)
    effects = core.receive("s5", Heartbeat("s5", 3, 1, None), 1.0)
    assert changes(effects)[:1] == [None]
    assert core.state in ("holdoff", "electing", "idle")


# -- quorum gating ----------------------------------------------------------------------------------------------


def test_no_announcement_while_the_server_cannot_lead() -> None:
    core, lead = make("s5", can_lead=False)
    core.start(0.0)
    effects = core.on_deadline(T.answer_timeout_s)
    assert sent(effects) == [] and core.coordinator is None and core.state == "blocked"
    retry = core.next_deadline()
    assert retry is not None and retry > T.answer_timeout_s
    assert sent(core.on_deadline(retry)) == []  # still blocked: retries later, sends nothing
    lead.value = True
    retry = core.next_deadline()
    assert retry is not None
    assert sent(core.on_deadline(retry)) == [("*", Coordinator("s5", 1))]


def test_a_server_that_cannot_lead_does_not_answer_elections_or_nominations() -> None:
    core = following("s4", "s5", can_lead=False)
    assert core.receive("s2", Election("s2", 2), 1.0) == []
    assert core.receive("s2", Nomination("s2", 2), 1.1) == []


def test_a_recovering_higher_server_takes_the_role_back_only_once_it_can_lead() -> None:
    core, lead = make("s5", can_lead=False)
    core.start(0.0)
    core.receive("s4", View("s4", 2, "s4", ("s4",)), 0.01)
    core.receive("s4", Heartbeat("s4", 2, 1, "s4"), 0.02)
    core.on_deadline(T.answer_timeout_s)
    assert core.coordinator == "s4" and core.state == "blocked"  # follows the lower one meanwhile
    now = T.answer_timeout_s
    for _ in range(5):
        deadline = core.next_deadline()
        assert deadline is not None
        now = deadline
        assert sent(core.on_deadline(now)) == []
    lead.value = True
    deadline = core.next_deadline()
    assert deadline is not None
    assert sent(core.on_deadline(deadline)) == [("*", Coordinator("s5", 3))]


def test_a_coordinator_that_cannot_lead_steps_down_when_a_newer_election_starts() -> None:
    core = coordinating("s5", epoch=1)
    core._can_lead = Lead(False)  # its registry lost quorum
    effects = core.receive("s2", Election("s2", 2), 1.0)
    assert sent(effects) == [] and changes(effects) == [None] and core.state == "blocked"


def test_an_initiator_that_cannot_lead_retries_instead_of_announcing() -> None:
    core = electing()
    core._can_lead = Lead(False)
    assert sent(core.on_deadline(5.0 + T.answer_timeout_s)) == []
    assert core.state == "blocked"


# -- bookkeeping ---------------------------------------------------------------------------------------------------


def test_coordinator_changed_is_reported_once_per_change() -> None:
    core, _ = make("s2")
    core.start(0.0)
    assert changes(core.receive("s5", Coordinator("s5", 1), 0.1)) == ["s5"]
    assert changes(core.receive("s5", Coordinator("s5", 1), 0.2)) == []
    assert changes(core.receive("s5", Heartbeat("s5", 1, 1, "s5"), 0.3)) == []


def test_messages_from_unknown_or_impersonated_senders_are_ignored() -> None:
    core = following("s2", "s5")
    assert core.receive("s9", Coordinator("s9", 5), 1.0) == []
    assert core.receive("s3", Coordinator("s4", 5), 1.0) == []
    assert core.coordinator == "s5"


def test_timings_require_t4_greater_than_t2_plus_k_times_t3() -> None:
    with pytest.raises(ValueError, match="T4"):
        ElectionTimings(answer_timeout_s=0.3, coordinator_timeout_s=0.3, max_nominees=2, nomination_timeout_s=0.8)
    ElectionTimings(answer_timeout_s=0.3, coordinator_timeout_s=0.3, max_nominees=2, nomination_timeout_s=0.95)


def test_the_default_timings_keep_the_documented_values() -> None:
    assert (T.heartbeat_interval_s, T.suspect_after_s) == (0.1, 0.75)
    assert (T.answer_timeout_s, T.coordinator_timeout_s, T.max_nominees, T.nomination_timeout_s) == (0.3, 0.3, 2, 1.2)


def test_a_single_server_cluster_coordinates_itself() -> None:
    core = FastBully("solo", {"solo": 1}, T, lambda: True, random.Random(1))
    assert sent(core.start(0.0)) == [("*", Coordinator("solo", 1))]
