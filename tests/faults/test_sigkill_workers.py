"""Scenario 1: worker processes SIGKILLed mid-step under load, replaced at once."""

from __future__ import annotations

import pytest

from tests.faults import scenarios
from tests.faults.harness import FaultCluster
from tests.faults.scenarios import Result

KILLS = 10


@pytest.fixture(scope="module")
def result(fault_cluster: FaultCluster) -> Result:
    return scenarios.sigkill_workers(fault_cluster, tasks_count=300, kills=KILLS)


def test_every_task_completes_with_each_effect_once(result: Result) -> None:
    result.findings.assert_ok()
    assert result.findings.completed == 300, result.describe()


def test_the_kills_hit_running_tasks_and_their_leases_were_swept(result: Result) -> None:
    # Not vacuous: workers really died holding runs, and the sweep recovered them.
    # (The schedule stops early once every task is done, so on a fast machine
    # fewer than KILLS kills may be needed.)
    assert 1 <= result.faults <= KILLS, result.describe()
    # Whether a kill hits a running task depends on the machine's speed; every
    # lease that did expire must have been swept as $ClaimTimeout.
    assert result.findings.failed_runs.get("$ClaimTimeout", 0) == result.findings.lease_expiries
