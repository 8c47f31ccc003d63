"""I/O-free state of one claimed run, shared by ``TaskContext`` and ``AsyncTaskContext``.

The contexts do the I/O; this class names steps, holds the replayed
checkpoints, builds statement parameters and turns statement results into
values or control-flow signals.
"""

from __future__ import annotations

import traceback
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from . import _core
from ._sql import channel_for
from .errors import CancelledTask, InvalidArgument, LeaseLost, SuspendTask, TimeoutError

UNKNOWN_TASK_DELAY = 20.0  # seconds before a run of an unregistered task is offered again


@dataclass(frozen=True, slots=True)
class HandOver:
    """What a worker slot asks of its run's completion: claim the slot's next
    run of ``queue`` in the same statement (``_sql_worker.complete_and_claim``).
    ``begin()`` is called just before; False means claim nothing (the worker
    is stopping), True marks the slot as completing with a claim, which a
    stopping worker then waits for instead of cancelling or releasing it."""

    queue: str
    begin: Callable[[], bool]


@dataclass(frozen=True, slots=True)
class ClaimedRun:
    """One row of the claim statement."""

    run_id: uuid.UUID
    task_id: uuid.UUID
    queue_name: str
    task_name: str
    attempt: int
    params: Any
    headers: Mapping[str, Any]
    retry_strategy: Mapping[str, Any] | None
    max_attempts: int | None
    cancellation: Mapping[str, Any] | None
    enqueued_at: datetime
    first_started_at: datetime
    prev_first_started_at: datetime | None
    prev_started_at: datetime | None
    claimed_at: datetime
    checkpoints: dict[str, Any]

    @classmethod
    def from_row(cls, row: Any) -> ClaimedRun:
        return cls(
            run_id=row.run_id,
            task_id=row.task_id,
            queue_name=row.queue_name,
            task_name=row.task_name,
            attempt=row.attempt,
            params=row.params,
            headers=row.headers or {},
            retry_strategy=row.retry_strategy,
            max_attempts=row.max_attempts,
            cancellation=row.cancellation,
            enqueued_at=row.enqueued_at,
            first_started_at=row.first_started_at,
            prev_first_started_at=row.prev_first_started_at,
            prev_started_at=row.prev_started_at,
            claimed_at=row.now,
            checkpoints=dict(row.checkpoints or {}),
        )

    def defer_params(self, delay: float = UNKNOWN_TASK_DELAY) -> dict[str, Any]:
        """Hand the run back as if never claimed, due in ``delay`` seconds (for a
        worker that knows the task, or at once when a stopping worker releases it)."""
        return {
            "run": self.run_id,
            "delay": delay,
            "prev_started_at": self.prev_started_at,
            "prev_first_started_at": self.prev_first_started_at,
        }

    def policy_violation(self) -> str | None:
        """Why the cancellation policy says this run must not start, if it does."""
        policy = self.cancellation or {}
        max_delay = policy.get("max_delay")
        if max_delay is not None and self.prev_first_started_at is None:
            waited = (self.claimed_at - self.enqueued_at).total_seconds()
            if waited > max_delay:
                return f"not started within max_delay={max_delay}s (waited {waited:.3f}s)"
        max_duration = policy.get("max_duration")
        if max_duration is not None and self.prev_first_started_at is not None:
            ran = (self.claimed_at - self.prev_first_started_at).total_seconds()
            if ran > max_duration:
                return f"ran longer than max_duration={max_duration}s ({ran:.3f}s)"
        return None


@dataclass(frozen=True, slots=True)
class StepHandle:
    """A step begun with ``begin_step``: ``done`` with ``state`` if already checkpointed."""

    name: str
    checkpoint_name: str
    done: bool
    state: Any = None


def failure_reason(exc: BaseException) -> dict[str, Any]:
    return {
        "name": type(exc).__name__,
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(exc)),
    }


SHUTDOWN_REASON = {
    "name": "$WorkerShutdown",
    "message": "the worker was stopped before this run finished",
    "traceback": None,
}

CLAIM_TIMEOUT_REASON = {
    "name": "$ClaimTimeout",
    "message": "the worker's lease on this run expired before it finished",
    "traceback": None,
}


class RunState:
    """Everything a context knows about its run, without I/O."""

    def __init__(self, run: ClaimedRun, worker_id: str, claim_timeout: float) -> None:
        self.run = run
        self.worker_id = worker_id
        self.claim_timeout = claim_timeout
        self.checkpoints = run.checkpoints
        self._seen: dict[str, int] = {}
        self._issued: set[str] = set()

    # -- naming and replay -----------------------------------------------------

    def checkpoint_name(self, name: str) -> str:
        """``name`` the first time, then ``name#2``, ``name#3``... in execution order.

        A generated name never reuses one already handed out in this execution
        (a step the user named ``poll#2``, say): numbering skips past it. The
        order of calls is the same on every replay, so the names are too.
        """
        count = self._seen.get(name, 0)
        while True:
            count += 1
            candidate = name if count == 1 else f"{name}#{count}"
            if candidate not in self._issued:
                break
        self._seen[name] = count
        self._issued.add(candidate)
        return candidate

    def begin(self, name: str) -> StepHandle:
        """Begin a step the caller named."""
        _core.check_name("step name", name)
        return self._begin(name)

    def begin_named(self, step_name: str | None, prefix: str, target: str) -> StepHandle:
        """Begin a step named after its (already checked) target, ``$await:<event>``
        say, unless the caller named it: any name the API accepts fits."""
        if step_name is not None:
            return self.begin(step_name)
        return self._begin(prefix + target)

    def _begin(self, name: str) -> StepHandle:
        checkpoint = self.checkpoint_name(name)
        if checkpoint in self.checkpoints:
            return StepHandle(name, checkpoint, True, self.checkpoints[checkpoint])
        return StepHandle(name, checkpoint, False)

    # -- statement parameters ----------------------------------------------------

    def base_params(self) -> dict[str, Any]:
        return {"run": self.run.run_id, "claim_timeout": self.claim_timeout}

    def checkpoint_params(self, handle: StepHandle, value: Any) -> dict[str, Any]:
        encoded = _core.encode_json(f"the value of step {handle.name!r}", value)
        return {**self.base_params(), "step": handle.checkpoint_name, "value_json": encoded}

    def heartbeat_params(self, seconds: float | None) -> dict[str, Any]:
        extend = _core.check_seconds("heartbeat seconds", seconds)
        return {
            "run": self.run.run_id,
            "claim_timeout": self.claim_timeout if extend is None else extend,
        }

    def sleep_params(
        self, handle: StepHandle, *, wake_at: datetime | None, seconds: float | None
    ) -> dict[str, Any]:
        if handle.done:  # replay: the wake time was checkpointed
            wake_at, seconds = datetime.fromisoformat(handle.state), None
        return {
            **self.base_params(),
            "step": handle.checkpoint_name,
            "wake_at": wake_at,
            "seconds": seconds,
        }

    def await_params(
        self, handle: StepHandle, event_name: str, queue: str, timeout: float | None
    ) -> dict[str, Any]:
        return {
            **self.base_params(),
            "step": handle.checkpoint_name,
            "event": _core.check_name("event name", event_name),
            "event_queue": queue,
            "timeout_seconds": _core.check_seconds("timeout", timeout),
        }

    def complete_params(self, result: Any) -> dict[str, Any]:
        return {
            **self.base_params(),
            "result_json": _core.encode_json("the task's return value", result),
        }

    def fail_params(
        self, reason: Mapping[str, Any], *, require_lease: bool = True, delay: float | None = None
    ) -> dict[str, Any]:
        return fail_params(
            self.run.run_id,
            self.run.queue_name,
            self.run.attempt,
            self.run.max_attempts,
            self.run.retry_strategy,
            reason,
            require_lease=require_lease,
            delay=delay,
        )

    # -- results -------------------------------------------------------------

    def _ids(self, state: str | None = None) -> dict[str, Any]:
        return {"task_id": self.run.task_id, "run_id": self.run.run_id, "state": state}

    def check_owned(self, row: Any) -> None:
        """Raise the right signal when a write found the run no longer ours."""
        if row.owned:
            return
        ids = {"task_id": self.run.task_id, "run_id": self.run.run_id, "state": row.run_state}
        if row.run_state == "cancelled":
            raise CancelledTask(f"task {self.run.task_id} was cancelled", **ids)
        raise LeaseLost(
            f"run {self.run.run_id} is no longer held by this worker (state {row.run_state})",
            **ids,
        )

    def after_checkpoint(self, handle: StepHandle, value: Any, row: Any) -> Any:
        self.check_owned(row)
        self.checkpoints[handle.checkpoint_name] = value
        return value

    def after_sleep(self, handle: StepHandle, row: Any) -> None:
        self.check_owned(row)
        self.checkpoints[handle.checkpoint_name] = row.wake_at.isoformat()
        if row.suspended:
            raise SuspendTask(f"sleeping until {row.wake_at.isoformat()}", **self._ids("sleeping"))

    def after_await(self, handle: StepHandle, event_name: str, row: Any) -> Any:
        self.check_owned(row)
        if row.emitted:
            self.checkpoints[handle.checkpoint_name] = {"payload": row.payload}
            return row.payload
        if row.timed_out:
            self.checkpoints[handle.checkpoint_name] = {"timeout": True}
            raise TimeoutError(f"timed out waiting for event {event_name!r}", **self._ids())
        raise SuspendTask(f"waiting for event {event_name!r}", **self._ids("sleeping"))

    def replay_await(self, handle: StepHandle, event_name: str) -> Any:
        state = handle.state or {}
        if state.get("timeout"):
            raise TimeoutError(f"timed out waiting for event {event_name!r}", **self._ids())
        return state.get("payload")


def fail_params(
    run_id: uuid.UUID,
    queue: str,
    attempt: int,
    max_attempts: int | None,
    retry_strategy: Mapping[str, Any] | None,
    reason: Mapping[str, Any],
    *,
    require_lease: bool,
    delay: float | None = None,
) -> dict[str, Any]:
    """Parameters of ``fail_run``: the retry decision and delay are made here
    (``delay`` overrides the retry strategy's)."""
    retry = _core.should_retry(max_attempts, attempt)
    if delay is None:
        delay = _core.retry_delay(retry_strategy, attempt) if retry else 0.0
    return {
        "run": run_id,
        "reason_json": _core.encode_json("failure reason", dict(reason)),
        "retry": retry,
        "delay": delay,
        "new_run": _core.uuid7(),
        "require_lease": require_lease,
        "channel": channel_for(queue),
    }


def wake_time(when: datetime | timedelta | float) -> tuple[datetime | None, float | None]:
    """``sleep_until``/``sleep_for`` arguments as (absolute, relative) for the sleep statement."""
    if isinstance(when, datetime):
        return _core.check_aware("sleep_until", when), None
    seconds = _core.check_seconds("sleep seconds", when, allow_none=False)
    if seconds is None:
        raise InvalidArgument("sleep seconds are required")
    return None, seconds
