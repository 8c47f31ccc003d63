"""Scenario 3: the worker processes' backends terminated (pg_terminate_backend)
in a loop while tasks run: mid-claim, mid-checkpoint, or idle in the pool."""

from __future__ import annotations

import pytest

from tests.faults import scenarios
from tests.faults.harness import FaultCluster
from tests.faults.scenarios import Result


@pytest.fixture(scope="module")
def result(fault_cluster: FaultCluster) -> Result:
    return scenarios.terminate_backends(fault_cluster, tasks_count=400, terminations=60)


def test_every_task_completes_with_each_effect_once(result: Result) -> None:
    result.findings.assert_ok()


def test_backends_were_terminated_while_busy(result: Result) -> None:
    hit = result.measured["terminated"]
    assert result.faults >= 10, result.describe()
    assert sum(n for kind, n in hit.items() if kind != "idle") >= 1, result.describe()


def test_no_run_of_a_live_worker_waits_for_its_lease_to_expire(result: Result) -> None:
    """Every worker process survives: a run whose handler started must be
    finished by its worker (retrying the outcome write on a new connection),
    not left ``running`` for the lease sweep."""
    assert result.findings.abandoned_runs == 0, result.describe()
