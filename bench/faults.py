"""The fault suite at full size: the scenarios of tests/faults, thousands of tasks.

    python bench/faults.py                        # every scenario, full size (minutes)
    python bench/faults.py --scale 0.2            # the same, a fifth of the tasks and faults
    python bench/faults.py --only sigkill-workers restart-server

Starts its own throwaway PostgreSQL (LocalPostgres; it is restarted by the
restart scenario, so ABSURD_DATABASE_URL is not used) and prints one row per
scenario: tasks committed, completed, lost (committed but not in an allowed
final state), duplicated effects (a transaction_step effect twice, or without
its checkpoint), stuck (runs ``running`` past their lease, tasks disagreeing
with their last run, live runs of finished tasks), deadlocks in the server log,
and the time from the last fault until every task was final. Problems found
are listed under the table; the exit status is 1 if there are any.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.faults

from tests.faults import scenarios
from tests.faults.harness import FaultCluster
from tests.faults.scenarios import Result


def plans(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    def n(value: int) -> int:
        return max(1, round(value * args.scale))

    return {
        "sigkill-workers": {
            "tasks_count": n(args.tasks),
            "workers": args.workers,
            "kills": n(args.kills),
            "claim_timeout": args.claim_timeout,
            "settle_timeout": args.settle_timeout,
        },
        "restart-server": {
            "tasks_count": n(args.tasks),
            "workers": args.workers,
            "restarts": n(args.restarts),
            "claim_timeout": args.claim_timeout,
            "settle_timeout": args.settle_timeout,
        },
        "terminate-backends": {
            "tasks_count": n(args.tasks),
            "workers": args.workers,
            "terminations": n(args.terminations),
            "claim_timeout": args.claim_timeout,
            "settle_timeout": args.settle_timeout,
        },
        "cancel-races": {
            "rounds": n(args.tasks // 7),
            "settle_timeout": args.settle_timeout,
        },
        "spawn-in-session": {"rounds": n(args.tasks // 5), "settle_timeout": args.settle_timeout},
    }


COLUMNS = (
    "scenario",
    "tasks",
    "completed",
    "lost",
    "dup. effects",
    "stuck",
    "deadlocks",
    "recover s",
    "faults",
    "run s",
)


def row(result: Result) -> list[str]:
    f = result.findings
    recover = "never" if result.recover_seconds is None else f"{result.recover_seconds:.2f}"
    lost = f.unsettled + max(0, f.tasks - f.spawned)
    return [
        result.scenario,
        str(f.spawned),
        str(f.completed),
        str(lost),
        str(f.duplicated),
        str(f.stuck),
        str(f.deadlocks),
        recover,
        str(result.faults),
        f"{result.elapsed:.1f}",
    ]


def print_table(rows: list[list[str]]) -> None:
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(COLUMNS)]
    line = "| " + " | ".join(c.ljust(w) for c, w in zip(COLUMNS, widths, strict=True)) + " |"
    print(line)
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=3000, help="tasks per load scenario")
    parser.add_argument("--workers", type=int, default=4, help="worker processes")
    parser.add_argument("--kills", type=int, default=60, help="SIGKILLs (one every 0.5-1 s)")
    parser.add_argument("--restarts", type=int, default=5, help="immediate server restarts")
    parser.add_argument("--terminations", type=int, default=400, help="backends terminated")
    parser.add_argument("--claim-timeout", type=float, default=3.0, help="lease, seconds")
    parser.add_argument("--settle-timeout", type=float, default=300.0, help="deadline, seconds")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply tasks and faults")
    parser.add_argument("--only", nargs="*", choices=list(scenarios.SCENARIOS), default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.CRITICAL)  # in-process workers: the table is the output

    chosen = plans(args)
    if args.only:
        chosen = {name: chosen[name] for name in args.only if name in chosen}
    cluster = FaultCluster().start()
    results: list[Result] = []
    started = time.monotonic()
    try:
        for name, kwargs in chosen.items():
            print(f"running {name} {kwargs} ...", file=sys.stderr, flush=True)
            results.append(scenarios.SCENARIOS[name](cluster, **kwargs))
    finally:
        cluster.stop()
    print_table([row(r) for r in results])
    print(f"\ntotal {time.monotonic() - started:.0f} s")
    failed = False
    for result in results:
        problems = result.findings.problems()
        notes = {
            "failed attempts": result.findings.failed_runs,
            "abandoned runs": result.findings.abandoned_runs,
            **result.measured,
        }
        print(f"\n{result.scenario}: {notes}")
        # The tests' extra assertions: no worker died there, and leases are long.
        if result.scenario != "sigkill-workers" and result.findings.abandoned_runs:
            problems.append(f"abandoned_runs = {result.findings.abandoned_runs} (defect 4)")
        if result.measured.get("lease_lost"):
            problems.append(f"LeaseLost instead of CancelledTask: {result.measured['lease_lost']}")
        for problem in problems:
            failed = True
            print(f"  PROBLEM: {problem}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
