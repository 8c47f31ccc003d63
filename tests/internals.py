"""The one place tests reach inside a client: its executor's single steps
(claim without running, run one claimed run, sweep leases), for tests that
stage a crash or a race between those steps."""

from __future__ import annotations

from absurd_sqla import Absurd
from absurd_sqla._execute import Executor
from absurd_sqla._run import ClaimedRun


def executor(app: Absurd) -> Executor:
    return app._executor


def claim(
    app: Absurd, queue: str, worker_id: str, claim_timeout: float, batch_size: int
) -> list[ClaimedRun]:
    return executor(app).claim(queue, worker_id, claim_timeout, batch_size)


def execute(app: Absurd, run: ClaimedRun, worker_id: str, claim_timeout: float) -> None:
    executor(app).execute(run, worker_id, claim_timeout)


def sweep_expired(app: Absurd, queue: str) -> int:
    return executor(app).sweep_expired(queue)
