"""I/O-free logic shared by the sync and async clients: validation, JSON
encoding, ids, retry math and result types. Nothing here talks to a database.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from .errors import InvalidArgument, InvalidQueueName, NotSerializable

JSON = Any
TaskState = Literal["pending", "running", "sleeping", "completed", "failed", "cancelled"]

QUEUE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,55}")
MAX_NAME_LENGTH = 255
MAX_SECONDS = 100 * 365 * 86400  # longer delays overflow nothing but mean a bug
MAX_INT = 2**31 - 1  # INTEGER columns
# An escaped NUL that is not itself an escaped backslash: jsonb cannot store it.
_JSON_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


# -- ids -------------------------------------------------------------------

_uuid7_lock = threading.Lock()
_uuid7_last = (0, 0)  # (millisecond, counter) of the previous id


def uuid7() -> uuid.UUID:
    """A UUIDv7 (RFC 9562): 48-bit Unix milliseconds, then a 12-bit counter that
    keeps ids from one process strictly increasing within a millisecond, then
    62 random bits.
    """
    global _uuid7_last
    with _uuid7_lock:
        ms = time.time_ns() // 1_000_000
        last_ms, counter = _uuid7_last
        if ms <= last_ms:
            ms, counter = last_ms, counter + 1
            if counter > 0xFFF:  # counter spent: borrow the next millisecond
                ms, counter = ms + 1, 0
        else:
            counter = 0
        _uuid7_last = (ms, counter)
    rand = int.from_bytes(os.urandom(8), "big") & ((1 << 62) - 1)
    value = (ms << 80) | (0x7 << 76) | (counter << 64) | (0b10 << 62) | rand
    return uuid.UUID(int=value)


# -- validation ------------------------------------------------------------


def check_queue_name(name: object) -> str:
    if not isinstance(name, str) or not QUEUE_NAME_RE.fullmatch(name):
        raise InvalidQueueName(
            f"invalid queue name {name!r}: use 1-56 characters from A-Z a-z 0-9 _ . - "
            "starting with a letter or digit"
        )
    return name


def check_name(kind: str, name: object, *, max_length: int = MAX_NAME_LENGTH) -> str:
    """A name or key stored as text: non-empty, bounded, and storable in UTF-8
    (no NUL, no lone surrogate), checked before any statement runs."""
    if not isinstance(name, str) or not name or len(name) > max_length or "\x00" in name:
        raise InvalidArgument(
            f"{kind} must be a non-empty string of at most {max_length} characters "
            f"without NUL, got {name!r:.80}"
        )
    try:
        name.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidArgument(
            f"{kind} {name!r:.80} cannot be stored: it is not valid UTF-8 ({exc.reason})"
        ) from exc
    return name


def check_seconds(kind: str, value: object, *, allow_none: bool = True) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, timedelta):
        value = value.total_seconds()  # timedelta.max is finite, caught below
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidArgument(f"{kind} must be a number of seconds, got {value!r}")
    if value < 0:
        raise InvalidArgument(f"{kind} must not be negative, got {value!r}")
    if value > MAX_SECONDS:
        raise InvalidArgument(f"{kind} must be at most {MAX_SECONDS} seconds (100 years)")
    return float(value)


def check_task_id(task_id: object) -> uuid.UUID:
    if isinstance(task_id, uuid.UUID):
        return task_id
    try:
        return uuid.UUID(str(task_id))
    except ValueError as exc:
        raise InvalidArgument(f"task_id must be a UUID, got {task_id!r:.80}") from exc


def check_positive_int(kind: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_INT:
        raise InvalidArgument(f"{kind} must be a whole number >= 1, got {value!r}")
    return value


def check_claim_timeout(value: object) -> float:
    """Seconds a claim holds its lease; 0 (or less) means the lease never expires."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidArgument(f"claim_timeout must be a number of seconds, got {value!r}")
    if value > MAX_SECONDS:
        raise InvalidArgument(f"claim_timeout must be at most {MAX_SECONDS} seconds (100 years)")
    return float(value)


def check_poll_interval(value: object) -> float:
    """An idle worker's longest wait between claims: positive (0 would spin)."""
    seconds = check_seconds("poll_interval", value, allow_none=False)
    if not seconds:
        raise InvalidArgument(f"poll_interval must be more than 0 seconds, got {value!r}")
    return seconds


def check_aware(kind: str, when: datetime) -> datetime:
    if when.tzinfo is None or when.utcoffset() is None:
        raise InvalidArgument(f"{kind} must be a timezone-aware datetime, got a naive {when!r}")
    return when


def check_max_attempts(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_INT:
        raise InvalidArgument(
            f"max_attempts must be a whole number from 1 to {MAX_INT}, got {value!r}"
        )
    return value


def encode_json(kind: str, value: object) -> str:
    """Serialise once, here, so bad values fail before any statement runs.

    Also refuses what JSON allows but ``jsonb`` cannot store: NUL characters and
    lone surrogates (which would otherwise fail inside Postgres and abort the
    caller's transaction); and what ``json.dumps`` would silently change:
    mapping keys that are not strings (``{1: "a", "1": "b"}`` would lose a key).
    """
    try:
        text = json.dumps(value, allow_nan=False, ensure_ascii=False, separators=(",", ":"))
        text.encode("utf-8")
    except (TypeError, ValueError) as exc:  # UnicodeEncodeError is a ValueError
        raise NotSerializable(f"{kind} is not JSON-serialisable: {exc}") from exc
    except RecursionError as exc:
        raise NotSerializable(f"{kind} is nested too deeply to store as JSON") from exc
    _check_keys(kind, value)
    if _JSON_NUL.search(text):
        raise NotSerializable(f"{kind} contains a NUL character, which jsonb cannot store")
    return text


def _check_keys(kind: str, value: object) -> None:
    """Every mapping key is a string (walked without recursion; the encoder
    already bounded the depth)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, child in item.items():
                if not isinstance(key, str):
                    raise NotSerializable(
                        f"{kind} has a key that is not a string: {key!r:.80} "
                        "(JSON keys are strings; convert it yourself)"
                    )
                if isinstance(child, dict | list | tuple):
                    stack.append(child)
        elif isinstance(item, list | tuple):
            stack.extend(child for child in item if isinstance(child, dict | list | tuple))


RETRY_KINDS = ("fixed", "exponential", "none")


def check_retry_strategy(strategy: object) -> dict[str, Any] | None:
    if strategy is None:
        return None
    if not isinstance(strategy, Mapping):
        raise InvalidArgument(f"retry_strategy must be a dict, got {strategy!r}")
    kind = strategy.get("kind", "none")
    if kind not in RETRY_KINDS:
        raise InvalidArgument(f"retry_strategy kind must be one of {RETRY_KINDS}, got {kind!r}")
    for key in ("base_seconds", "max_seconds"):
        if key in strategy:
            check_seconds(f"retry_strategy[{key!r}]", strategy[key])
    factor = strategy.get("factor", 2)
    if isinstance(factor, bool) or not isinstance(factor, int | float) or factor < 1:
        raise InvalidArgument(f"retry_strategy['factor'] must be a number >= 1, got {factor!r}")
    unknown = set(strategy) - {"kind", "base_seconds", "factor", "max_seconds"}
    if unknown:
        raise InvalidArgument(f"retry_strategy has unknown keys {sorted(unknown)}")
    return dict(strategy)


def check_cancellation(policy: object) -> dict[str, Any] | None:
    if policy is None:
        return None
    if not isinstance(policy, Mapping):
        raise InvalidArgument(f"cancellation must be a dict, got {policy!r}")
    unknown = set(policy) - {"max_delay", "max_duration"}
    if unknown:
        raise InvalidArgument(f"cancellation has unknown keys {sorted(unknown)}")
    for key, value in policy.items():
        if value is not None and check_seconds(f"cancellation[{key!r}]", value) == 0:
            raise InvalidArgument(f"cancellation[{key!r}] must be positive")
    return {k: v for k, v in policy.items() if v is not None} or None


def retry_delay(strategy: Mapping[str, Any] | None, attempt: int) -> float:
    """Seconds to wait before the attempt after ``attempt`` (which just failed)."""
    if not strategy:
        return 0.0
    kind = strategy.get("kind", "none")
    base = float(strategy.get("base_seconds", 0))
    if kind == "fixed":
        return base
    if kind == "exponential":
        factor = float(strategy.get("factor", 2))
        try:
            delay = base * factor ** (attempt - 1)
        except OverflowError:
            delay = math.inf
        cap = strategy.get("max_seconds")
        return min(delay, float(cap)) if cap is not None else min(delay, 10 * 365 * 86400.0)
    return 0.0


def should_retry(max_attempts: int | None, attempt: int) -> bool:
    return max_attempts is None or attempt < max_attempts


# -- spawn -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SpawnResult:
    """What ``spawn`` created, or found for an ``idempotency_key`` (``created=False``)."""

    task_id: uuid.UUID
    run_id: uuid.UUID
    attempt: int
    created: bool


@dataclass(frozen=True, slots=True)
class SpawnRequest:
    """One task to spawn, validated and encoded: a row for the spawn statement."""

    task_name: str
    params: JSON = None
    max_attempts: int | None = None
    retry_strategy: Mapping[str, Any] | None = None
    headers: Mapping[str, Any] | None = None
    queue: str | None = None
    cancellation: Mapping[str, Any] | None = None
    idempotency_key: str | None = None
    run_after: datetime | float | timedelta | None = None


@dataclass(frozen=True, slots=True)
class TaskDefaults:
    """What a spawn uses for each option it leaves out: the task's registered
    defaults, else the app's."""

    queue: str
    max_attempts: int | None
    cancellation: Mapping[str, Any] | None
    retry_strategy: Mapping[str, Any] | None = None


def spawn_row(request: SpawnRequest, defaults: TaskDefaults, position: int = 0) -> dict[str, Any]:
    """Validate one request into the JSON record the spawn statement unpacks."""
    check_name("task name", request.task_name)
    encode_json("params", request.params)
    if request.headers is not None and not isinstance(request.headers, Mapping):
        raise InvalidArgument(f"headers must be a dict, got {request.headers!r}")
    encode_json("headers", request.headers)
    if request.idempotency_key is not None:
        check_name("idempotency_key", request.idempotency_key)
    max_attempts = check_max_attempts(request.max_attempts)
    run_after_at: str | None = None
    delay: float | None = None
    if isinstance(request.run_after, datetime):
        run_after_at = check_aware("run_after", request.run_after).isoformat()
    else:
        delay = check_seconds("run_after", request.run_after)
    cancellation = check_cancellation(
        request.cancellation if request.cancellation is not None else defaults.cancellation
    )
    task_id, run_id = uuid7(), uuid7()
    return {
        "position": position,
        "task_id": str(task_id),
        "run_id": str(run_id),
        "task_name": request.task_name,
        "params": request.params,
        "headers": dict(request.headers) if request.headers is not None else None,
        "retry_strategy": check_retry_strategy(
            request.retry_strategy
            if request.retry_strategy is not None
            else defaults.retry_strategy
        ),
        "max_attempts": max_attempts if max_attempts is not None else defaults.max_attempts,
        "cancellation": cancellation,
        "idempotency_key": request.idempotency_key,
        "delay_seconds": delay,
        "run_after": run_after_at,
    }


# -- results ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TaskResultSnapshot:
    """A task's state; ``result`` only when completed, ``failure`` only when failed."""

    state: TaskState
    result: JSON = None
    failure: dict[str, Any] | None = None

    @property
    def terminal(self) -> bool:
        return self.state in ("completed", "failed", "cancelled")


def snapshot_from_row(state: str, result: JSON, failure: JSON) -> TaskResultSnapshot:
    return TaskResultSnapshot(
        state=state,  # type: ignore[arg-type]  # the CHECK constraint guarantees the literal
        result=result if state == "completed" else None,
        failure=failure if state == "failed" else None,
    )


def poll_delays(start: float = 0.01, cap: float = 0.5) -> Callable[[], float]:
    """Growing intervals for polling loops: 10 ms doubling up to ``cap``."""
    current = start / 2

    def step() -> float:
        nonlocal current
        current = min(current * 2, cap)
        return current

    return step
