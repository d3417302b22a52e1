"""Run every benchmark and gather their results: the `make bench` entry point.

    python -m bench.all [--quick] [--only approval,fanout] [--skip connections]

Runs each bench script present in bench/ (registry, approval, fanout, connections, failover, noisy_neighbour,
election_messages) one after another as `python -m bench.<name>`, each writing its own JSON report under
bench/results/, then writes bench/results/latest.json: the machine (CPU model, cores, Python version,
date), and per bench its exit status, wall time and report. A bench that fails or is missing is recorded
as such; the others still run. Exit status 1 if any bench failed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import RESULTS_DIR, ROOT, format_table, machine_info, write_report

# In run order: the quick, quiet ones first, the one that loads the machine most last.
BENCHES = ("registry", "election_messages", "approval", "fanout", "failover", "noisy_neighbour", "scale", "connections")
# One bench may not run longer than this.
BENCH_TIMEOUT_S = 600.0


def run_bench(name: str, quick: bool) -> dict[str, Any]:
    script = ROOT / "bench" / f"{name}.py"
    if not script.exists():
        return {"status": "missing"}
    report_path = RESULTS_DIR / f"{name}.json"
    # Not every bench has a short mode; one without it runs in full.
    quick = quick and '"--quick"' in script.read_text()
    command = [sys.executable, "-m", f"bench.{name}"] + (["--quick"] if quick else [])
    print(f"\n=== {' '.join(command[1:])}", flush=True)
    started = time.monotonic()
    wall_started = time.time()
    try:
        proc = subprocess.run(command, cwd=ROOT, timeout=BENCH_TIMEOUT_S, check=False)
        status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
    except subprocess.TimeoutExpired:
        status = f"timed out after {BENCH_TIMEOUT_S:.0f} s"
    entry: dict[str, Any] = {
        "status": status,
        "command": " ".join(["python", *command[1:]]),
        "wall_s": round(time.monotonic() - started, 1),
    }
    report = _fresh_report(report_path, wall_started)
    if report is not None:
        entry["report"] = report
    elif status == "ok":
        entry["status"] = f"ok, but wrote no {report_path.relative_to(ROOT)}"
    return entry


def _fresh_report(path: Path, since: float) -> Any:
    """The JSON at `path` if this run wrote it (modified after `since`)."""
    try:
        if path.stat().st_mtime < since:
            return None
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _previous(path: Path) -> dict[str, Any]:
    try:
        benches = json.loads(path.read_text()).get("benches", {})
    except (OSError, ValueError):
        return {}
    return {name: {**entry, "from_earlier_run": True} for name, entry in benches.items() if name in BENCHES}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="pass --quick to every bench (a smoke run)")
    parser.add_argument("--only", default="", help="comma-separated benches to run (default: all)")
    parser.add_argument("--skip", default="", help="comma-separated benches not to run")
    parser.add_argument("--out", default=str(RESULTS_DIR / "latest.json"), help="where to write the summary")
    args = parser.parse_args(argv)
    only = {n.strip() for n in args.only.split(",") if n.strip()}
    skip = {n.strip() for n in args.skip.split(",") if n.strip()}
    unknown = (only | skip) - set(BENCHES)
    if unknown:
        parser.error(f"unknown bench(es) {', '.join(sorted(unknown))}; known: {', '.join(BENCHES)}")

    started = time.monotonic()
    machine = machine_info()
    # A partial run (--only/--skip) updates its benches in the existing summary and keeps the others.
    results: dict[str, Any] = _previous(Path(args.out)) if (only or skip) else {}
    for name in BENCHES:
        if (only and name not in only) or name in skip:
            continue
        results[name] = run_bench(name, args.quick)
    results = {name: results[name] for name in BENCHES if name in results}

    summary = {
        "command": "python -m bench.all" + (" --quick" if args.quick else ""),
        "quick": args.quick,
        "machine": machine,
        "benches": results,
        "wall_s": round(time.monotonic() - started, 1),
    }
    out = write_report(args.out, summary)
    print("\n=== summary")
    print(
        format_table(
            ("bench", "status", "wall s"), [(n, r["status"], f"{r.get('wall_s', 0):.0f}") for n, r in results.items()]
        )
    )
    print(
        f"\n{machine['cpu_model']}, {machine['cores']} cores, {machine['python']}; "
        f"written {out} in {summary['wall_s']:.0f} s"
    )
    failed = [n for n, r in results.items() if not r["status"].startswith("ok") and r["status"] != "missing"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
