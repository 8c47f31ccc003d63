"""Scenario 5: spawn(session=) in transactions that never commit, next to a
running worker: rollback, exception, killed connection, deferred constraint."""

from __future__ import annotations

from tests.faults import scenarios
from tests.faults.harness import FaultCluster

ROUNDS = 25


def test_uncommitted_spawns_never_run_and_committed_ones_run_once(
    fault_cluster: FaultCluster,
) -> None:
    result = scenarios.spawn_in_session(fault_cluster, rounds=ROUNDS)
    assert result.measured == {"aborted": ROUNDS * 4, "committed": ROUNDS}, result.describe()
    result.findings.assert_ok()
    assert result.findings.completed == ROUNDS
