"""The executor: claim runs, execute their handlers, record each outcome, and
sweep expired leases. Everything a worker does per run, without the loop
around it (``worker.py``) — ``work_batch`` is this module alone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy.sql import Executable

from . import _children, _ops_async, _wire
from . import _sql as sql
from . import _sql_worker as sqlw
from ._app import AppCore, WorkerSettings
from ._current import running
from ._db_async import AsyncDatabase
from ._logs import (
    about,
    completed_message,
    failure_message,
    fields,
    logger,
    queue_extra,
    run_extra,
)
from ._run import (
    CLAIM_TIMEOUT_REASON,
    SHUTDOWN_REASON,
    ClaimedRun,
    HandOver,
    RunState,
    fail_params,
    failure_reason,
)
from ._runtime import summary
from ._wire import Record
from .context_async import AsyncTaskContext
from .errors import CancelledTask, LeaseLost, NotSerializable, SuspendTask, TaskSignal

log = logger()


class AsyncExecutor:
    """Claims and runs tasks of one app: its database and its registered handlers."""

    def __init__(self, db: AsyncDatabase, core: AppCore) -> None:
        self.db = db
        self.core = core

    async def seconds_until_due(self, queue: str) -> float | None:
        """Seconds until the queue's next run that is not due yet comes due, if any."""
        row = await self.db.one_or_none(sqlw.seconds_until_due, {"queue": queue})
        return None if row is None or row.seconds is None else float(row.seconds)

    async def claim(
        self, queue: str, worker_id: str, claim_timeout: float, batch_size: int
    ) -> list[ClaimedRun]:
        rows = await self.db.all(
            sqlw.claim,
            {
                "queue": queue,
                "worker": worker_id,
                "claim_timeout": claim_timeout,
                "batch_size": batch_size,
            },
        )
        return [ClaimedRun.from_row(row) for row in rows]

    async def queue_exists(self, queue: str) -> bool:
        """Whether ``queue`` was created (a worker checks once, at start)."""
        return bool(await self.db.all(sql.existing_queues, {"queues": [queue]}))

    async def sweep_expired(self, queue: str) -> int:
        """Fail runs whose lease expired as ``$ClaimTimeout`` (retrying per their task)."""
        failed: list[tuple[Any, Record]] = []
        async with self.db.transaction() as conn:
            expired = (await conn.execute(sqlw.expired_runs, {"queue": queue})).all()
            for row in expired:
                params = fail_params(
                    row.run_id,
                    row.queue_name,
                    row.attempt,
                    row.max_attempts,
                    row.retry_strategy,
                    CLAIM_TIMEOUT_REASON,
                    require_lease=False,
                )
                result = (await conn.execute(sqlw.fail_run, params)).one()
                if not result.retried:
                    await _ops_async.announce_done(conn, row.task_id, row.queue_name, row.headers)
                failed.append((row, result))
        # Logged once committed: a rolled-back sweep failed nothing.
        for lapsed, result in failed:
            _log_failure(
                lapsed.task_name,
                lapsed.max_attempts,
                fields(
                    task_id=lapsed.task_id,
                    run_id=lapsed.run_id,
                    task_name=lapsed.task_name,
                    queue=lapsed.queue_name,
                    attempt=lapsed.attempt,
                ),
                _reason_text(CLAIM_TIMEOUT_REASON),
                result,
            )
        if expired:
            log.warning(
                "failed %d run(s) whose lease expired on queue %r",
                len(expired),
                queue,
                extra=queue_extra(queue),
            )
        return len(expired)

    async def still_held(self, run: ClaimedRun, claim_timeout: float) -> bool:
        """Renew the lease of a claimed run that waited its turn; False if it lapsed."""
        row = await self.db.one(sqlw.heartbeat, {"run": run.run_id, "claim_timeout": claim_timeout})
        return bool(row.owned)

    async def work_batch(self, settings: WorkerSettings) -> int:
        """Claim up to ``batch_size`` runs and execute them one after another."""
        await self.sweep_expired(settings.queue)
        claimed = await self.claim(
            settings.queue, settings.worker_id, settings.claim_timeout, settings.batch_size
        )
        for position, run in enumerate(claimed):
            # Runs wait their turn here: renew each lease before starting it, and
            # skip a run whose lease ran out meanwhile (the sweep retries it).
            if position and not await self.still_held(run, settings.claim_timeout):
                log.warning(
                    "task %s (%s): run %s lost its lease before it started; skipped",
                    run.task_name,
                    run.task_id,
                    run.run_id,
                    extra=run_extra(run),
                )
                continue
            await self.execute(run, settings.worker_id, settings.claim_timeout)
        return len(claimed)

    async def execute(
        self,
        run: ClaimedRun,
        worker_id: str,
        claim_timeout: float,
        on_start: Callable[[], bool] | None = None,
        hand_over: HandOver | None = None,
    ) -> list[ClaimedRun]:
        """Run one claimed run to completion, failure or suspension.

        ``on_start`` is called just before the handler is (what a stopping
        worker needs to know: a run whose handler never started costs no attempt);
        False means the worker has handed the run back meanwhile, and the
        handler is not called.
        With ``hand_over``, a completion also claims the slot's next run, which
        is returned (a list of at most one); otherwise the list is empty.
        Children complete alone: their completion also wakes their parent.
        """
        state = RunState(run, worker_id, claim_timeout)
        registration = self.core.registry.get(run.task_name)
        violation = None if registration is None else run.policy_violation()
        if registration is None or violation is not None:
            try:
                await self._turn_away(run, violation)
            except Exception as exc:
                # Never strand the rest of a batch: record this run's failure instead.
                log.exception(
                    "task %s (%s): could not hand back run %s",
                    run.task_name,
                    run.task_id,
                    run.run_id,
                    extra=run_extra(run),
                )
                await self._fail(state, exc)
            return []
        ctx = AsyncTaskContext(self.db, self.core, state)
        wrap = self.core.hooks.wrap_task

        async def call() -> Any:
            return await registration.handler(run.params, ctx)

        if on_start is not None and not on_start():
            return []
        started = time.monotonic()
        try:
            with running(ctx):
                result = await wrap(ctx, call) if wrap is not None else await call()
        except TaskSignal as signal_:
            _log_signal(run, signal_)
            return []
        except Exception as exc:
            await self._fail(state, exc)
            return []
        try:
            params = state.complete_params(result)
        except NotSerializable as exc:
            await self._fail(state, exc)
            return []
        next_runs: list[ClaimedRun] = []
        if hand_over is not None and not _children.is_child(run.headers) and hand_over.begin():
            row, next_runs = await self._complete_and_claim(
                run, params, hand_over, worker_id, claim_timeout
            )
        else:
            row = await self._record_outcome(
                run, sqlw.complete_run, params, lambda row: bool(row.owned)
            )
        if not row.owned:
            log.warning(
                "task %s (%s): discarded the result of run %s: it is %s and no longer held "
                "by this worker (cancelled, failed, or its lease expired)",
                run.task_name,
                run.task_id,
                run.run_id,
                row.run_state,
                extra=run_extra(run),
            )
            return next_runs
        log.info(
            completed_message(run.task_name, run.task_id, time.monotonic() - started, run.attempt),
            extra=run_extra(run),
        )
        return next_runs

    async def _complete_and_claim(
        self,
        run: ClaimedRun,
        params: Mapping[str, Any],
        hand_over: HandOver,
        worker_id: str,
        claim_timeout: float,
    ) -> tuple[Record, list[ClaimedRun]]:
        """Record ``run``'s completion and claim the slot's next run, in one
        statement. Retried like any outcome after a lost connection, but a
        retry only completes: the first attempt may have committed, claim
        included, with its answer lost. So after a retry the run that attempt
        claimed, if any, is looked up where the completion recorded it
        (``runs.handed_over``) and taken over."""
        claimed: list[ClaimedRun] = []
        tries = 0
        merged = {
            **params,
            "queue": hand_over.queue,
            "worker": worker_id,
            "claim_timeout": claim_timeout,
            "batch_size": 1,
        }

        async def attempt() -> Record:
            nonlocal tries
            tries += 1
            if tries > 1:
                return _wire.exactly_one(await self.db.rows(sqlw.complete_run, params))
            row = _wire.exactly_one(await self.db.rows(sqlw.complete_and_claim, merged))
            if row.run_id is not None:
                claimed.append(ClaimedRun.from_row(row))
            return row

        with about(run):
            row = await self.db.retrying(sqlw.complete_run, params, attempt)
            if tries > 1 and row.owned:
                claimed.extend(await self._handed_over(run, worker_id))
        return row, claimed

    async def _handed_over(self, run: ClaimedRun, worker_id: str) -> list[ClaimedRun]:
        """The run ``run``'s completion claimed, if it is still this worker's."""
        try:
            rows = await self.db.reading(
                sqlw.handed_over_run, {"run": run.run_id, "worker": worker_id}
            )
        except Exception as exc:
            log.warning(
                "task %s (%s): could not look up the run the completion of run %s claimed "
                "(%s); if it claimed one, that run waits for its lease to expire",
                run.task_name,
                run.task_id,
                run.run_id,
                summary(exc),
                extra=run_extra(run),
            )
            return []
        found = [ClaimedRun.from_row(row) for row in rows]
        for next_run in found:
            log.info(
                "task %s (%s): took over run %s, which the completion of run %s claimed "
                "before its answer was lost",
                next_run.task_name,
                next_run.task_id,
                next_run.run_id,
                run.run_id,
                extra=run_extra(next_run),
            )
        return found

    async def release(
        self, run: ClaimedRun, worker_id: str, claim_timeout: float, started: bool
    ) -> None:
        """Give back a run a stopping worker will not finish, claimable at once.

        A run whose handler never started is handed back as if never claimed
        (no attempt used); one whose handler started fails as
        ``$WorkerShutdown`` and is retried at once while attempts remain. The
        abandoned handler's later writes are fenced.
        """
        if not started:
            await self.db.one(sqlw.defer_run, run.defer_params(delay=0.0))
            log.info(
                "task %s (%s): run %s handed back before its handler started (no attempt "
                "used): the worker stopped",
                run.task_name,
                run.task_id,
                run.run_id,
                extra=run_extra(run),
            )
            return
        state = RunState(run, worker_id, claim_timeout)
        params = state.fail_params(SHUTDOWN_REASON, delay=0.0)
        row = await self._record_outcome(
            run, sqlw.fail_run, params, lambda row: bool(row.owned and not row.retried)
        )
        if row.owned:
            _log_failure(
                run.task_name, run.max_attempts, run_extra(run), _reason_text(SHUTDOWN_REASON), row
            )

    async def _turn_away(self, run: ClaimedRun, violation: str | None) -> None:
        """A run this worker must not start: its task is unknown here (no
        ``violation``), or its cancellation policy says it is too late."""
        if violation is not None:
            log.info(
                "cancelling task %s (%s): %s",
                run.task_name,
                run.task_id,
                violation,
                extra=run_extra(run),
            )
            async with self.db.transaction() as conn:
                await _ops_async.cancel(conn, self.core.task_params(run.task_id, None))
            return
        # Unknown here (e.g. mid-deploy): hand it back for a worker that knows it.
        log.warning(
            "no handler for task %r here; deferring run %s of task %s",
            run.task_name,
            run.run_id,
            run.task_id,
            extra=run_extra(run),
        )
        await self.db.one(sqlw.defer_run, run.defer_params())

    async def _record_outcome(
        self,
        run: ClaimedRun,
        statement: Executable,
        params: Mapping[str, Any],
        finished: Callable[[Record], bool],
    ) -> Record:
        """Write a run's outcome; a child that ``finished`` also wakes its parent, in
        the same transaction (otherwise the single statement runs in autocommit).
        Retried on a lost connection (``Database.retrying``)."""

        if not _children.is_child(run.headers):
            with about(run):  # records of the retries name the run
                return await self.db.retrying(statement, params)

        async def attempt() -> Record:
            async with self.db.transaction() as conn:
                row = (await conn.execute(statement, params)).one()
                if finished(row):
                    await _ops_async.announce_done(conn, run.task_id, run.queue_name, run.headers)
            return row

        with about(run):
            return await self.db.retrying(statement, params, attempt)

    async def _fail(self, state: RunState, exc: BaseException) -> None:
        run = state.run
        row = await self._record_outcome(
            run,
            sqlw.fail_run,
            state.fail_params(failure_reason(exc)),
            lambda row: bool(row.owned and not row.retried),
        )
        if not row.owned:
            log.warning(
                "task %s (%s): could not record the failure of run %s (%s): it is %s",
                run.task_name,
                run.task_id,
                run.run_id,
                summary(exc),
                row.run_state,
                extra=run_extra(run),
            )
        else:
            _log_failure(run.task_name, run.max_attempts, run_extra(run), summary(exc), row, exc)


def _reason_text(reason: Mapping[str, Any]) -> str:
    return f"{reason['name']}: {reason['message']}"


def _log_failure(
    task_name: str,
    max_attempts: int | None,
    extra: Mapping[str, Any],
    error: str,
    row: Record,
    exc: BaseException | None = None,
) -> None:
    """Log a failure ``fail_run`` recorded (``row``): a retry at WARNING, with the
    time and attempt the database scheduled; a final failure at ERROR, with the
    traceback."""
    level, message = failure_message(
        task_name,
        extra["task_id"],
        error,
        attempt=extra["attempt"],
        max_attempts=max_attempts,
        retry_at=row.retry_at if row.retried else None,
        next_attempt=row.next_attempt if row.retried else None,
    )
    final = level >= logging.ERROR
    log.log(level, message, exc_info=exc if final and exc is not None else None, extra=extra)


def _log_signal(run: ClaimedRun, signal_: TaskSignal) -> None:
    """A handler stopped by a signal: suspended (DEBUG), cancelled (INFO), or
    its run taken away (WARNING)."""
    task = f"task {run.task_name} ({run.task_id})"
    if isinstance(signal_, SuspendTask):
        log.debug("%s suspended, attempt %d: %s", task, run.attempt, signal_, extra=run_extra(run))
    elif isinstance(signal_, CancelledTask):
        log.info(
            "%s was cancelled while running, attempt %d; its handler stopped",
            task,
            run.attempt,
            extra=run_extra(run),
        )
    elif isinstance(signal_, LeaseLost):
        log.warning(
            "%s stopped, attempt %d: %s",
            task,
            run.attempt,
            signal_,
            extra=run_extra(run),
        )
    else:
        log.debug("%s stopped: %r", task, signal_, extra=run_extra(run))
