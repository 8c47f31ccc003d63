"""Scenario 2: the fault suite's own server restarted with ``pg_ctl restart -m
immediate`` (``LocalPostgres.restart``) while worker processes run."""

from __future__ import annotations

import pytest

from tests.faults import scenarios
from tests.faults.harness import FaultCluster
from tests.faults.scenarios import Result

RESTARTS = 3


@pytest.fixture(scope="module")
def result(fault_cluster: FaultCluster) -> Result:
    return scenarios.restart_server(fault_cluster, tasks_count=300, restarts=RESTARTS)


def test_every_task_completes_with_each_effect_once(result: Result) -> None:
    assert result.faults == RESTARTS, result.describe()
    result.findings.assert_ok()


def test_no_run_of_a_live_worker_waits_for_its_lease_to_expire(result: Result) -> None:
    """No worker died: a run whose handler started was known to its worker,
    which must record its outcome once the server is back (retrying the write),
    not leave it ``running`` until the lease sweep fails it."""
    assert result.findings.abandoned_runs == 0, result.describe()


@pytest.mark.parametrize("how", ["restart", "terminate"])
def test_a_pooled_connection_that_died_while_idle_costs_no_attempt(
    fault_cluster: FaultCluster, how: str
) -> None:
    """Tasks with max_attempts=1 pause while their pool is idle; its connections
    are killed (server restart, or pg_terminate_backend); every task completes."""
    result = scenarios.idle_connections_die(fault_cluster, how=how, tasks_count=4)
    assert result.faults >= 4, result.describe()
    result.findings.assert_ok()
    assert result.findings.failed_runs == {}, result.describe()
