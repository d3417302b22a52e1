"""Seeded chaos: clients keep working while servers are killed, frozen and restarted at random.

    python -m tests.chaos --seed 7 --minutes 2 [--servers 5] [--clients 10] [--json out.json] [--keep]
    ip netns exec <hub> python -m tests.chaos --lab lab.json ...   (partitions too: tests/fault/netlab.py)

Theory of operation
-------------------
A real cluster of `--servers` processes on loopback (tests.support.Cluster). `--clients` worker threads each
own one client at a time and loop: log in (names drawn from a small shared pool, so they collide), then
chat, `who`, `list`, create a room (a small pool too), join rooms (following `route` to other servers with
`movejoin`), delete their room, and sometimes quit. A fault thread injects, every few seconds: SIGKILL of a
server (the coordinator half the time), a restart of a killed server from its data directory, SIGSTOP
for 0.3-3 s then SIGCONT, or, when run inside a network-namespace lab (`--lab`), a partition that cuts a
minority (the coordinator's side half the time) off for 0.5-3 s and heals. It never takes down or cuts off
more than a minority, so the cluster can always make progress. A cut-off server is, for the ledger, like a
frozen one: until it learns after the heal that the majority declared it down, it serves its old sessions
under names the majority may have given away (a bounded zombie window, see tests/fault/invariants.py).

Every approval any client receives goes into one `tests.fault.invariants.Ledger`. At the end the faults
stop, every server is brought back, the workers stop where they are (their sessions stay open), and the
settled-cluster checks run: one coordinator (the highest priority), identical registries on every server
equal to what the still-open sessions hold, and no identity or room ever certainly held by two sessions.

Each thread has its own `random.Random` derived from the seed, so the choices a run makes are the same for
a seed; the interleaving with real processes is not (this is a soak test, not a simulation: the replayable
simulation of the election lives in tests/sim/). Every wait is bounded; every process is killed at exit.
Exit status 0 when every invariant held, 1 otherwise; the summary says which.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import random
import shutil
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from tests.fault.invariants import (
    REPLY_TIMEOUT_S,
    Clients,
    NoReply,
    Session,
    SessionLost,
    check_settled,
    move,
    now,
)
from tests.fault.netlab import LabSpec, lab_cluster
from tests.support import Cluster

# Pools small enough that clients contend for the same names all the time.
IDENTITY_POOL_PER_CLIENT = 2
ROOM_POOL_PER_CLIENT = 1
# Pause between two operations of one client, and between two faults.
CLIENT_PAUSE_S = (0.01, 0.08)
FAULT_PAUSE_S = (1.5, 4.0)
STOP_DURATION_S = (0.3, 3.0)
PARTITION_DURATION_S = (0.5, 3.0)
# Bounds on bringing servers back and on the final settling.
START_TIMEOUT_S = 60.0
SETTLE_TIMEOUT_S = 40.0
WORKER_JOIN_TIMEOUT_S = 3 * REPLY_TIMEOUT_S


class Chaos:
    def __init__(self, cluster: Cluster, seed: int, clients: int) -> None:
        self.cluster = cluster
        self.seed = seed
        self.clients = Clients(cluster)
        self.n_clients = clients
        self.identities = [f"user{i}" for i in range(IDENTITY_POOL_PER_CLIENT * clients)]
        self.room_ids = [f"room{i}" for i in range(max(2, ROOM_POOL_PER_CLIENT * clients))]
        self.stop_event = threading.Event()
        self.ops: collections.Counter[str] = collections.Counter()
        self.faults: list[str] = []
        self.errors: list[str] = []
        self.down: set[str] = set()  # killed, not restarted yet
        self.frozen: set[str] = set()
        self.lab = getattr(cluster, "lab", None)  # a tests.fault.netlab.NetLab when run with --lab
        self.lock = threading.Lock()
        self.t0 = now()
        by_address = {cluster.client_address(sid): sid for sid in cluster.ids}
        self.server_of = lambda address: by_address[(address[0], int(address[1]))]

    def count(self, op: str) -> None:
        with self.lock:
            self.ops[op] += 1

    def log_fault(self, text: str) -> None:
        t = now()
        line = f"[{t - self.t0:7.2f}s] {text} (monotonic {t:.3f})"
        with self.lock:
            self.faults.append(line)
        print(line, flush=True)

    # -- clients --------------------------------------------------------------------------------------

    def worker(self, index: int) -> None:
        rng = random.Random(self.seed * 1_000_003 + index)
        session: Session | None = None
        while not self.stop_event.is_set():
            try:
                session = self.step(rng, session)
            except (SessionLost, NoReply, OSError) as exc:
                self.count(f"lost:{type(exc).__name__}")
                if session is not None:
                    session.close()
                session = None
            except Exception:
                self.errors.append(f"client {index}: {traceback.format_exc()}")
                if session is not None:
                    session.close()
                session = None
            time.sleep(rng.uniform(*CLIENT_PAUSE_S))

    def step(self, rng: random.Random, session: Session | None) -> Session | None:
        ledger = self.clients.ledger
        if session is None or session.closed:
            server = rng.choice(self.cluster.ids)
            fresh = self.clients.connect(server)
            self.count("newidentity")
            return fresh if fresh.login(rng.choice(self.identities), ledger) else None
        session.drain()
        roll = rng.random()
        if roll < 0.30:
            session.say(f"hello {rng.random():.6f}")
            self.count("message")
        elif roll < 0.40:
            session.ping()
            self.count("who")
        elif roll < 0.50:
            session.list_rooms()
            self.count("list")
        elif roll < 0.65:
            if session.owned_room is None:
                self.count("createroom")
                session.create_room(rng.choice(self.room_ids), ledger)
            else:
                self.count("deleteroom")
                session.delete_room(session.owned_room, ledger)
        elif roll < 0.95:
            if session.owned_room is not None:
                return session  # an owner cannot leave its room
            rooms = session.list_rooms()
            target = rng.choice(rooms) if rooms else None
            if target and target != session.room:
                self.count("joinroom")
                reply = session.join(target)
                if reply["type"] == "route":
                    self.count("route")
                    moved = move(session, reply, self.server_of, ledger)
                    self.clients.sessions.append(moved)
                    return moved
        else:
            self.count("quit")
            session.quit(ledger)
            return None
        return session

    # -- faults ---------------------------------------------------------------------------------------

    def majority(self) -> int:
        return len(self.cluster.ids) // 2 + 1

    def running(self) -> list[str]:
        with self.lock:
            return [s for s in self.cluster.ids if s not in self.down and s not in self.frozen]

    def coordinator(self) -> str | None:
        for sid in self.running():
            with contextlib.suppress(Exception):
                return self.cluster.status(sid, 0.5).get("coordinator")
        return None

    def faulter(self, rng: random.Random, until: float) -> None:
        while now() < until and not self.stop_event.is_set():
            time.sleep(rng.uniform(*FAULT_PAUSE_S))
            if now() >= until:
                break
            try:
                self.one_fault(rng)
            except Exception:
                self.errors.append(f"fault thread: {traceback.format_exc()}")

    def one_fault(self, rng: random.Random) -> None:
        running = self.running()
        can_take = len(running) > self.majority()
        choices = []
        if self.down:
            choices += ["restart"] * 3
        if can_take:
            choices += ["kill"] * 3 + ["stop"] * 2
        if self.lab is not None and not self.down and not self.frozen:
            choices += ["partition"] * 2
        if not choices:
            return
        action = rng.choice(choices)
        if action == "restart":
            sid = rng.choice(sorted(self.down))
            self.log_fault(f"restart {sid}")
            self.cluster.start(sid)
            with self.lock:
                self.down.discard(sid)
            return
        coordinator = self.coordinator()
        if action == "partition":
            self.partition(rng, running, coordinator)
            return
        target = coordinator if coordinator in running and rng.random() < 0.5 else rng.choice(running)
        label = " (coordinator)" if target == coordinator else ""
        if action == "kill":
            self.log_fault(f"SIGKILL {target}{label}")
            with self.lock:
                self.down.add(target)
            self.cluster.kill(target)
            self.clients.ledger.server_lost(target, self.clients.sessions)
        else:
            duration = rng.uniform(*STOP_DURATION_S)
            self.log_fault(f"SIGSTOP {target}{label} for {duration:.2f}s")
            with self.lock:
                self.frozen.add(target)
            stopped_at = now()
            self.cluster.stop(target)
            time.sleep(duration)
            self.cluster.resume(target)
            self.clients.ledger.server_frozen(target, stopped_at, now())
            with self.lock:
                self.frozen.discard(target)
            self.log_fault(f"SIGCONT {target}")

    def partition(self, rng: random.Random, running: list[str], coordinator: str | None) -> None:
        """Cut a minority (with the coordinator half the time) off from the rest, then heal."""
        assert self.lab is not None
        size = rng.randint(1, len(self.cluster.ids) - self.majority())
        pool = sorted(running)
        first = coordinator if coordinator in pool and rng.random() < 0.5 else rng.choice(pool)
        minority = sorted({first, *rng.sample([s for s in pool if s != first], size - 1)})
        majority = [s for s in self.cluster.ids if s not in minority]
        duration = rng.uniform(*PARTITION_DURATION_S)
        label = " (coordinator's side)" if coordinator in minority else ""
        self.log_fault(f"partition {majority} | {minority}{label} for {duration:.2f}s")
        with self.lock:
            self.frozen.update(minority)
        cut_at = now()
        self.lab.partition(majority, minority)
        time.sleep(duration)
        self.lab.heal()
        healed_at = now()
        for sid in minority:
            self.clients.ledger.server_frozen(sid, cut_at, healed_at)
        with self.lock:
            self.frozen.difference_update(minority)
        self.log_fault("healed")

    # -- the run --------------------------------------------------------------------------------------

    def run(self, seconds: float) -> list[str]:
        workers = [
            threading.Thread(target=self.worker, args=(i,), name=f"client{i}", daemon=True)
            for i in range(self.n_clients)
        ]
        for w in workers:
            w.start()
        self.faulter(random.Random(self.seed), now() + seconds)
        self.log_fault("faults over: bringing every server back")
        for sid in sorted(self.down):
            self.cluster.start(sid)
        self.down.clear()
        for sid in self.cluster.ids:
            self.cluster.resume(sid)
        for sid in self.cluster.ids:
            self.cluster.wait_ready(sid, START_TIMEOUT_S)
        time.sleep(1.0)  # let the clients work a moment on the whole cluster (not a readiness wait)
        self.stop_event.set()
        for w in workers:
            w.join(WORKER_JOIN_TIMEOUT_S)
        stuck = [w.name for w in workers if w.is_alive()]
        problems = [f"client threads still running: {stuck}"] if stuck else []
        self.log_fault("clients stopped: checking invariants")
        problems += check_settled(
            self.cluster, self.clients.sessions, self.clients.ledger, SETTLE_TIMEOUT_S, self.cluster.ids, False
        )
        return problems + self.errors

    def summary(self, problems: list[str], seconds: float) -> dict[str, Any]:
        ledger = self.clients.ledger
        alive = [s for s in self.clients.sessions if not s.closed and s.identity]
        _, windows = ledger.overlaps()
        return {
            "seed": self.seed,
            "servers": len(self.cluster.ids),
            "clients": self.n_clients,
            "seconds": round(seconds, 1),
            "faults": len([f for f in self.faults if "SIG" in f or "restart" in f or "] partition " in f]),
            "kills": sum("SIGKILL" in f for f in self.faults),
            "stops": sum("SIGSTOP" in f for f in self.faults),
            "restarts": sum(" restart " in f for f in self.faults),
            "partitions": sum("] partition " in f for f in self.faults),
            "operations": dict(sorted(self.ops.items())),
            "approved": dict(ledger.approvals),
            "refused": dict(ledger.refusals),
            "sessions_opened": len(self.clients.sessions),
            "sessions_alive_at_end": len(alive),
            "zombie_windows": len(windows),
            "zombie_window_max_s": round(max(windows), 3) if windows else None,
            "problems": problems,
            "ok": not problems,
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--minutes", type=float, default=1.0, help="how long faults are injected")
    parser.add_argument("--servers", type=int, default=5)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--json", help="also write the summary here")
    parser.add_argument("--keep", action="store_true", help="keep the run directory (logs, data)")
    parser.add_argument("--lab", help="a partition lab's LabSpec (JSON file): run inside its hub namespace")
    args = parser.parse_args(argv)
    if args.servers < 3 or args.clients < 1 or args.minutes <= 0:
        parser.error("need --servers >= 3, --clients >= 1, --minutes > 0")

    root = Path(tempfile.mkdtemp(prefix=f"chatmesh-chaos-{args.seed}-"))
    print(f"chaos seed {args.seed}: {args.servers} servers, {args.clients} clients, {args.minutes} min, in {root}")
    if args.lab:
        spec = LabSpec.from_json(Path(args.lab).read_text())
        if len(spec.servers) != args.servers:
            parser.error(f"the lab has {len(spec.servers)} servers, not --servers {args.servers}")
        cluster = lab_cluster(root, spec)
    else:
        cluster = Cluster(root, args.servers)
    started = now()
    summary: dict[str, Any]
    chaos = None
    try:
        for sid in cluster.ids:
            cluster.start(sid)
        for sid in cluster.ids:
            cluster.wait_ready(sid, START_TIMEOUT_S)
        cluster.wait_coordinator(cluster.ids[-1], START_TIMEOUT_S)
        chaos = Chaos(cluster, args.seed, args.clients)
        problems = chaos.run(args.minutes * 60)
        summary = chaos.summary(problems, now() - started)
    except Exception:
        summary = {"seed": args.seed, "ok": False, "problems": [f"chaos run crashed: {traceback.format_exc()}"]}
    finally:
        if chaos is not None:
            chaos.clients.close()
        cluster.close()

    print("---- chaos summary ----")
    for key, value in summary.items():
        if key != "problems":
            print(f"{key:>22}: {value}")
    for problem in summary["problems"]:
        print(f"PROBLEM: {problem}")
    if not summary["ok"]:
        for sid in cluster.ids:
            print(f"---- {sid} log (tail) ----\n{cluster.log(sid)[-3000:]}")
        print(f"replay: python -m tests.chaos --seed {args.seed} --minutes {args.minutes} "
              f"--servers {args.servers} --clients {args.clients}")  # fmt: skip
    print("RESULT ok" if summary["ok"] else "RESULT FAIL", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    if args.keep or not summary["ok"]:
        print(f"run directory kept: {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
