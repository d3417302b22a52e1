"""Named simulation scenarios: each builds a `Simulation` from a seed and drives it through disruptions.

Settle bounds (stated here, checked at every step by the harness; derived from `ElectionTimings`):
- `failover_bound`: after the coordinator crashes, T1 to detect, plus a heartbeat of phase, plus the holdoff,
  plus one election (T2) with up to k nominees (k*T3), plus a margin for network delay. 1.90 s by default.
- `general_bound`: after any disruption without message loss (start-up, recovery, partition, heal, pause):
  T1 + T2 + T4 + T2 + k*T3, the longest chain of timeouts one disruption can set off (an answerer's T4
  expiring into a fresh election). 3.20 s by default.
- with message loss (a lost message costs at most one more chain): twice `general_bound`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from bully.election import ElectionTimings
from tests.sim.harness import CoreFactory, Simulation

MARGIN_S = 0.05


def failover_bound(t: ElectionTimings) -> float:
    return (
        t.suspect_after_s
        + t.heartbeat_interval_s
        + t.holdoff_s
        + t.answer_timeout_s
        + t.max_nominees * t.coordinator_timeout_s
        + MARGIN_S
    )


def general_bound(t: ElectionTimings) -> float:
    return (
        t.suspect_after_s
        + 2 * t.answer_timeout_s
        + t.nomination_timeout_s
        + t.max_nominees * t.coordinator_timeout_s
        + MARGIN_S
    )


@dataclass(frozen=True)
class Scenario:
    name: str
    drive: Callable[[Simulation], None]
    n: int = 6
    loss: float = 0.0
    quorum: bool = False
    bound: str = "general"  # "failover", "general" or "lossy"

    def build(
        self, seed: int, factory: CoreFactory | None = None, timings: ElectionTimings | None = None
    ) -> Simulation:
        t = timings or ElectionTimings()
        bounds = {"failover": failover_bound(t), "general": general_bound(t), "lossy": 2 * general_bound(t)}
        bound = bounds[self.bound]
        kwargs = {} if factory is None else {"factory": factory}
        return Simulation(
            self.n,
            seed,
            scenario=self.name,
            timings=t,
            loss=self.loss,
            quorum=self.quorum,
            settle_bound_s=bound,
            **kwargs,  # type: ignore[arg-type]
        )

    def run(self, seed: int, factory: CoreFactory | None = None) -> Simulation:
        sim = self.build(seed, factory)
        self.drive(sim)
        sim.finish()
        return sim


def _settle(sim: Simulation) -> None:
    """Run long enough that the settled-state invariant is checked for a while."""
    sim.run_for(sim.settle_bound_s + 1.0)


def top(sim: Simulation) -> str:
    return max((s for s in sim.live()), key=lambda s: s.priority).server_id


def startup(sim: Simulation) -> None:
    sim.boot_all(spread_s=0.5)
    _settle(sim)


def coordinator_crash(sim: Simulation) -> None:
    sim.boot_all()
    _settle(sim)
    sim.crash(top(sim))
    _settle(sim)


def two_top_crash(sim: Simulation) -> None:
    sim.boot_all()
    _settle(sim)
    first, second = sorted(sim.live(), key=lambda s: -s.priority)[:2]
    sim.crash(first.server_id)
    sim.crash(second.server_id)
    _settle(sim)


def concurrent_elections(sim: Simulation) -> None:
    sim.boot_all()
    _settle(sim)
    for server_id in sim.rng.sample(sim.ids, 3):
        sim.start_election(server_id)
    _settle(sim)
    # Several servers detect the coordinator's failure in the same instant (equal T1 everywhere).
    sim.crash(top(sim))
    _settle(sim)


def recover_higher(sim: Simulation) -> None:
    sim.boot_all()
    _settle(sim)
    victim = top(sim)
    sim.crash(victim)
    _settle(sim)
    # It comes back with a registry replica that needs time to catch up: no takeover before that.
    sim.boot(victim, ready_after_s=sim.rng.uniform(0.2, 1.5))
    _settle(sim)
    assert sim.coordinators()[victim] == victim


def recover_lower(sim: Simulation) -> None:
    sim.boot_all()
    _settle(sim)
    victim = sim.rng.choice(sim.ids[:-1])
    sim.crash(victim)
    _settle(sim)
    before = {s.server_id: s.coordinator_changes for s in sim.live()}
    sim.boot(victim)
    _settle(sim)
    after = {s.server_id: s.coordinator_changes for s in sim.live() if s.server_id in before}
    assert before == after, f"a lower server's recovery changed others' coordinator: {before} -> {after}"


def message_loss(sim: Simulation) -> None:
    sim.boot_all()
    _settle(sim)
    victim = top(sim)
    sim.crash(victim)
    _settle(sim)
    sim.boot(victim)
    _settle(sim)


def partition_heal(sim: Simulation) -> None:
    sim.boot_all()
    _settle(sim)
    ids = list(sim.ids)
    sim.rng.shuffle(ids)
    cut = sim.rng.randint(1, len(ids) - 1)
    sim.partition(ids[:cut])
    _settle(sim)
    sim.heal()
    _settle(sim)


def pause_resume(sim: Simulation) -> None:
    """SIGSTOP the coordinator long enough to be declared dead, then SIGCONT it: it takes the role back."""
    sim.boot_all()
    _settle(sim)
    victim = top(sim)
    sim.pause(victim)
    _settle(sim)
    sim.resume(victim)
    _settle(sim)


def short_pause(sim: Simulation) -> None:
    """A stall shorter than T1 (a busy machine) must not change the coordinator."""
    sim.boot_all()
    _settle(sim)
    before = {s.server_id: s.coordinator_changes for s in sim.live()}
    victim = top(sim)
    sim.pause(victim)
    sim.run_for(sim.timings.suspect_after_s * 0.6)
    sim.resume(victim)
    _settle(sim)
    after = {s.server_id: s.coordinator_changes for s in sim.live()}
    assert before == after, f"a short stall caused an election: {before} -> {after}"


def quorum_minority(sim: Simulation) -> None:
    """With quorum gating, the side without a majority announces nobody; the majority elects its highest."""
    sim.boot_all()
    _settle(sim)
    minority = [top(sim), sim.ids[0]]
    sim.partition(minority)
    _settle(sim)
    sim.heal()
    _settle(sim)


def chaos(sim: Simulation) -> None:
    """Random crashes, restarts, pauses, partitions and admin elections, each phase allowed to settle."""
    sim.boot_all()
    _settle(sim)
    for _ in range(5):
        down = [sid for sid in sim.ids if not sim.servers[sid].alive]
        paused = [sid for sid in sim.ids if sim.servers[sid].alive and sim.servers[sid].paused]
        running = [s.server_id for s in sim.live()]
        actions: list[tuple[str, list[str]]] = [("elect", running)]
        if len(running) > 2:
            actions += [("crash", running), ("pause", running), ("partition", sim.ids)]
        if down:
            actions.append(("boot", down))
        if paused:
            actions.append(("resume", paused))
        actions.append(("heal", []))
        action, pool = sim.rng.choice(actions)
        if action == "elect":
            sim.start_election(sim.rng.choice(pool))
        elif action == "crash":
            sim.crash(sim.rng.choice(pool))
        elif action == "pause":
            sim.pause(sim.rng.choice(pool))
        elif action == "partition":
            sim.partition(sim.rng.sample(pool, sim.rng.randint(1, sim.n // 2)))
        elif action == "boot":
            sim.boot(sim.rng.choice(pool), ready_after_s=sim.rng.uniform(0, 1))
        elif action == "resume":
            sim.resume(sim.rng.choice(pool))
        else:
            sim.heal()
        _settle(sim)


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in [
        Scenario("startup", startup),
        Scenario("startup-3", startup, n=3),
        Scenario("startup-12", startup, n=12),
        Scenario("coordinator-crash", coordinator_crash, bound="failover"),
        Scenario("coordinator-crash-12", coordinator_crash, n=12, bound="failover"),
        # The largest cluster the project sizes for (issue 16): 24 servers, star heartbeats. A crash at
        # 24 costs ~5 s of CPU per seed, so it runs in `bench.election_messages` (n = 24), not here.
        Scenario("startup-24", startup, n=24),
        Scenario("two-top-crash", two_top_crash),
        Scenario("concurrent-elections", concurrent_elections),
        Scenario("recover-higher", recover_higher),
        Scenario("recover-lower", recover_lower),
        Scenario("message-loss", message_loss, loss=0.1, bound="lossy"),
        Scenario("partition-heal", partition_heal),
        Scenario("pause-resume", pause_resume),
        Scenario("short-pause", short_pause),
        Scenario("quorum-minority", quorum_minority, quorum=True),
        Scenario("chaos", chaos, loss=0.02, bound="lossy"),
    ]
}
