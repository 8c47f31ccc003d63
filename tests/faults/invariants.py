"""The invariants every fault scenario ends with, read in one snapshot.

* every committed task reached a terminal state (the scenario says which ones
  are allowed: ``completed`` unless it cancels or fails tasks on purpose);
* ``transaction_step`` effects happened exactly once: one ``fault_effects`` row
  per stored ``effect-N`` checkpoint, none without one, none twice, and a
  completed task has all of its effects;
* no run is left ``running`` with an expired lease;
* no task disagrees with its last run (``tasks.state`` vs the state of the run
  ``tasks.last_run_id`` names), and no finished task has a live run;
* no "deadlock detected" in the server's log since the scenario started.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from sqlalchemy import Engine, text

TERMINAL = ("completed", "failed", "cancelled")

_SNAPSHOT = """
WITH e AS (
    SELECT task_id, step, count(*) AS n FROM fault_effects GROUP BY task_id, step
), c AS (
    SELECT task_id, checkpoint_name AS step FROM absurd.checkpoints
    WHERE checkpoint_name LIKE 'effect-%'
)
SELECT
    (SELECT count(*) FROM absurd.tasks) AS tasks,
    (SELECT count(*) FROM e WHERE n > 1) AS duplicated_effects,
    (SELECT count(*) FROM c LEFT JOIN e USING (task_id, step) WHERE e.n IS NULL)
        AS checkpoints_without_effect,
    (SELECT count(*) FROM e LEFT JOIN c USING (task_id, step) WHERE c.task_id IS NULL)
        AS effects_without_checkpoint,
    (SELECT count(*) FROM absurd.tasks t
        WHERE t.state = 'completed' AND t.task_name = 'steps'
        AND (SELECT count(DISTINCT step) FROM fault_effects f WHERE f.task_id = t.task_id)
            <> (t.params->>'steps')::int) AS completed_missing_effects,
    (SELECT count(*) FROM absurd.runs
        WHERE state = 'running' AND claim_expires_at < absurd.now()) AS expired_running,
    (SELECT count(*) FROM absurd.tasks t LEFT JOIN absurd.runs r ON r.run_id = t.last_run_id
        WHERE r.run_id IS NULL OR r.state <> t.state) AS state_mismatches,
    (SELECT count(*) FROM absurd.runs r JOIN absurd.tasks t USING (task_id)
        WHERE t.state IN ('completed', 'failed', 'cancelled')
        AND r.state NOT IN ('completed', 'failed', 'cancelled')) AS live_runs_of_finished,
    (SELECT count(*) FROM absurd.runs
        WHERE failure_reason->>'name' = '$ClaimTimeout') AS lease_expiries,
    (SELECT count(*) FROM absurd.runs r
        WHERE r.failure_reason->>'name' = '$ClaimTimeout'
        AND EXISTS (SELECT FROM fault_starts s
                    WHERE s.task_id = r.task_id AND s.attempt = r.attempt)) AS abandoned_runs
"""


@dataclass
class Findings:
    """What one snapshot of a scenario's database (and the server log) shows."""

    spawned: int
    tasks: int
    states: dict[str, int]
    allowed: tuple[str, ...]
    duplicated_effects: int
    checkpoints_without_effect: int
    effects_without_checkpoint: int
    completed_missing_effects: int
    expired_running: int
    state_mismatches: int
    live_runs_of_finished: int
    lease_expiries: int
    # Runs failed by lease expiry although their handler had started: a worker
    # that is still alive knew it held them and should have recorded the outcome.
    abandoned_runs: int
    deadlocks: int
    # Failed attempts by failure name (not an invariant: what the faults cost).
    failed_runs: dict[str, int] = field(default_factory=dict)
    extra: list[str] = field(default_factory=list)

    @property
    def completed(self) -> int:
        return self.states.get("completed", 0)

    @property
    def unsettled(self) -> int:
        """Committed tasks that are missing, or not in an allowed terminal state."""
        settled = sum(n for state, n in self.states.items() if state in self.allowed)
        return self.spawned - settled

    @property
    def duplicated(self) -> int:
        return self.duplicated_effects + self.effects_without_checkpoint

    @property
    def stuck(self) -> int:
        return self.expired_running + self.state_mismatches + self.live_runs_of_finished

    def problems(self) -> list[str]:
        found = []
        if self.tasks != self.spawned:
            found.append(f"{self.spawned} tasks committed but {self.tasks} exist")
        if self.unsettled:
            found.append(
                f"{self.unsettled} task(s) not in {'/'.join(self.allowed)}: states {self.states}"
            )
        for name in (
            "duplicated_effects",
            "checkpoints_without_effect",
            "effects_without_checkpoint",
            "completed_missing_effects",
            "expired_running",
            "state_mismatches",
            "live_runs_of_finished",
            "deadlocks",
        ):
            if getattr(self, name):
                found.append(f"{name} = {getattr(self, name)}")
        return found + self.extra

    def assert_ok(self) -> None:
        problems = self.problems()
        assert not problems, "invariants violated:\n  " + "\n  ".join(problems)


def check(
    engine: Engine,
    *,
    spawned: int,
    deadlocks: int,
    allowed: Iterable[str] = ("completed",),
) -> Findings:
    """Read the invariants in one REPEATABLE READ snapshot (no assertion yet)."""
    with engine.connect() as conn:
        conn = conn.execution_options(isolation_level="REPEATABLE READ")
        with conn.begin():
            row = conn.execute(text(_SNAPSHOT)).one()
            states = dict(
                conn.execute(text("SELECT state, count(*) FROM absurd.tasks GROUP BY state")).all()
            )
            failed_runs = dict(
                conn.execute(
                    text(
                        "SELECT coalesce(failure_reason->>'name', '?'), count(*) "
                        "FROM absurd.runs WHERE state = 'failed' GROUP BY 1"
                    )
                ).all()
            )
    return Findings(
        spawned=spawned,
        tasks=int(row.tasks),
        states={str(k): int(v) for k, v in states.items()},
        allowed=tuple(allowed),
        duplicated_effects=int(row.duplicated_effects),
        checkpoints_without_effect=int(row.checkpoints_without_effect),
        effects_without_checkpoint=int(row.effects_without_checkpoint),
        completed_missing_effects=int(row.completed_missing_effects),
        expired_running=int(row.expired_running),
        state_mismatches=int(row.state_mismatches),
        live_runs_of_finished=int(row.live_runs_of_finished),
        lease_expiries=int(row.lease_expiries),
        abandoned_runs=int(row.abandoned_runs),
        deadlocks=deadlocks,
        failed_runs={str(k): int(v) for k, v in failed_runs.items()},
    )


def settled_count(engine: Engine, allowed: Iterable[str] = TERMINAL) -> int:
    """How many tasks are in one of the ``allowed`` (terminal) states."""
    with engine.connect() as conn:
        return int(
            conn.scalar(
                text("SELECT count(*) FROM absurd.tasks WHERE state = ANY(:s)"),
                {"s": list(allowed)},
            )
            or 0
        )
