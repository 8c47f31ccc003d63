"""Scenario 4: cancel_task racing completion, failure, retry and checkpoints,
each race met at a Barrier between the handler and a canceller thread."""

from __future__ import annotations

import pytest

from tests.faults import scenarios
from tests.faults.harness import FaultCluster
from tests.faults.scenarios import RACES, Result

ROUNDS = 40


@pytest.fixture(scope="module")
def result(fault_cluster: FaultCluster) -> Result:
    return scenarios.cancel_races(fault_cluster, rounds=ROUNDS)


def test_races_leave_no_deadlock_and_tasks_agree_with_their_runs(result: Result) -> None:
    """Zero deadlocks in the server log, task state == last run state, cancel_task
    returned True exactly for the tasks that ended cancelled, and never raised."""
    assert result.faults == ROUNDS * len(RACES), result.describe()
    result.findings.assert_ok()
    assert result.findings.tasks == ROUNDS * (len(RACES) + 1)
    assert result.findings.states.get("cancelled", 0) >= ROUNDS  # retry-wait at least


def test_a_cancelled_handler_sees_cancelled_task_not_lease_lost(result: Result) -> None:
    assert result.measured["lease_lost"] == {}, result.describe()
