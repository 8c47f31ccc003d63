"""I/O-free logic shared by the sync and async clients: validation, JSON
encoding, ids, retry math and result types. Nothing here talks to a database.
"""

from __future__ import annotations

import json
import math
import os
import re
import reprlib
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, TypeGuard

from .errors import InvalidArgument, InvalidQueueName, NotSerializable

JSON = Any
TaskState = Literal["pending", "running", "sleeping", "completed", "failed", "cancelled"]

QUEUE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,55}")
MAX_NAME_LENGTH = 255
MAX_SECONDS = 100 * 365 * 86400  # longer delays overflow nothing but mean a bug
MAX_INT = 2**31 - 1  # INTEGER columns
MAX_RETRY_FACTOR = 1e6  # an exponential retry's growth per attempt
# How deeply JSON may nest (lists and dicts inside each other). PostgreSQL
# parses jsonb over 10,000 levels deep (default max_stack_depth = 2MB), but
# Python's json encoder and decoder (what psycopg uses) recurse once per level
# against sys.getrecursionlimit(), 1000 by default, counted from wherever they
# are called: the caller's own stack; the spawn statement, which encodes params
# and headers again two levels down inside its rows; and a worker's claim,
# which decodes them about 20 frames deep, and checkpoints inside a few
# wrappers ({"payload": ...}, a child's done event). Refusing more than 512
# levels leaves about 480 frames of headroom everywhere, where the old check
# (whatever json.dumps managed at the caller's depth) left none.
MAX_JSON_DEPTH = 512
# An escaped NUL that is not itself an escaped backslash: jsonb cannot store it.
_JSON_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


# -- ids -------------------------------------------------------------------

# The header in which a child task names its parent (indexed for "children of").
PARENT_HEADER = "absurd.parent_task_id"

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

_short_repr = reprlib.Repr()
_short_repr.maxlevel = 3  # repr() itself raises RecursionError for deep nesting
_short_repr.maxstring = _short_repr.maxother = 80
_short_repr.maxlong = 40  # repr() of a huge int raises ValueError (digit limit)


def show(value: object) -> str:
    """A caller's value for an error message: short, and safe for anything
    (deeply nested lists, huge ints) that would make repr() itself fail."""
    try:
        return _short_repr.repr(value)
    except Exception:  # a broken __repr__ must not hide the real error
        return f"<{type(value).__name__} object>"


def check_queue_name(name: object) -> str:
    if not isinstance(name, str) or not QUEUE_NAME_RE.fullmatch(name):
        raise InvalidQueueName(
            f"invalid queue name {show(name)}: use 1-56 characters from A-Z a-z 0-9 _ . - "
            "starting with a letter or digit"
        )
    return name


def check_name(kind: str, name: object, *, max_length: int = MAX_NAME_LENGTH) -> str:
    """A name or key stored as text: non-empty, bounded, and storable in UTF-8
    (no NUL, no lone surrogate), checked before any statement runs."""
    if not isinstance(name, str) or not name or len(name) > max_length or "\x00" in name:
        raise InvalidArgument(
            f"{kind} must be a non-empty string of at most {max_length} characters "
            f"without NUL, got {show(name)}"
        )
    try:
        name.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidArgument(
            f"{kind} {show(name)} cannot be stored: it is not valid UTF-8 ({exc.reason})"
        ) from exc
    return name


def _is_number(value: object) -> TypeGuard[int | float]:
    """An int or a finite float (not a bool). Ints are never passed to
    math.isfinite, which raises OverflowError for one too big for a float."""
    if isinstance(value, bool):
        return False
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, int)


def check_seconds(kind: str, value: object, *, allow_none: bool = True) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, timedelta):
        value = value.total_seconds()  # timedelta.max is finite, caught below
    if not _is_number(value):
        raise InvalidArgument(f"{kind} must be a number of seconds, got {show(value)}")
    if value < 0:
        raise InvalidArgument(f"{kind} must not be negative, got {show(value)}")
    if value > MAX_SECONDS:  # exact for ints of any size; float() below cannot overflow
        raise InvalidArgument(f"{kind} must be at most {MAX_SECONDS} seconds (100 years)")
    return float(value)


def check_task_id(task_id: object) -> uuid.UUID:
    if isinstance(task_id, uuid.UUID):
        return task_id
    try:
        return uuid.UUID(str(task_id))
    except (ValueError, RecursionError) as exc:  # str() of a deep list recurses
        raise InvalidArgument(f"task_id must be a UUID, got {show(task_id)}") from exc


def check_positive_int(kind: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_INT:
        raise InvalidArgument(f"{kind} must be a whole number >= 1, got {show(value)}")
    return value


def check_flag(kind: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgument(f"{kind} must be True or False, got {show(value)}")
    return value


def check_claim_timeout(value: object) -> float:
    """Seconds a claim holds its lease; 0 (or less, returned as 0) means the
    lease never expires."""
    if not _is_number(value):
        raise InvalidArgument(f"claim_timeout must be a number of seconds, got {show(value)}")
    if value > MAX_SECONDS:
        raise InvalidArgument(f"claim_timeout must be at most {MAX_SECONDS} seconds (100 years)")
    return float(value) if value > 0 else 0.0  # -10**400 has no float


def check_poll_interval(value: object) -> float:
    """An idle worker's longest wait between claims: positive (0 would spin)."""
    seconds = check_seconds("poll_interval", value, allow_none=False)
    if not seconds:
        raise InvalidArgument(f"poll_interval must be more than 0 seconds, got {show(value)}")
    return seconds


def check_aware(kind: str, when: datetime) -> datetime:
    """An aware datetime, returned as the same instant in UTC: PostgreSQL
    refuses some offsets Python allows (16 hours or more, or with microseconds)."""
    if when.tzinfo is None or when.utcoffset() is None:
        raise InvalidArgument(f"{kind} must be a timezone-aware datetime, got a naive {when!r}")
    try:
        return when.astimezone(UTC)
    except OverflowError as exc:  # the instant is before year 1 or after 9999 in UTC
        raise InvalidArgument(f"{kind} {when!r} is out of range in UTC") from exc


def check_max_attempts(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_INT:
        raise InvalidArgument(
            f"max_attempts must be a whole number from 1 to {MAX_INT}, got {show(value)}"
        )
    return value


def encode_json(kind: str, value: object, *, max_depth: int = MAX_JSON_DEPTH) -> str:
    """Serialise once, here, so bad values fail before any statement runs.

    Also refuses what JSON allows but ``jsonb`` cannot store: NUL characters and
    lone surrogates (which would otherwise fail inside Postgres and abort the
    caller's transaction); what ``json.dumps`` would silently change: mapping
    keys that are not strings (``{1: "a", "1": "b"}`` would lose a key); and
    nesting deeper than ``max_depth`` levels (see ``MAX_JSON_DEPTH``).
    """
    try:
        text = json.dumps(value, allow_nan=False, ensure_ascii=False, separators=(",", ":"))
        text.encode("utf-8")
    except (TypeError, ValueError) as exc:  # UnicodeEncodeError is a ValueError
        raise NotSerializable(f"{kind} is not JSON-serialisable: {exc}") from exc
    except RecursionError as exc:
        raise NotSerializable(
            f"{kind} is nested too deeply to store as JSON (at most {max_depth} levels)"
        ) from exc
    _check_keys(kind, value, max_depth)
    if _JSON_NUL.search(text):
        raise NotSerializable(f"{kind} contains a NUL character, which jsonb cannot store")
    return text


_CONTAINERS = (dict, list, tuple)


def _check_keys(kind: str, value: object, max_depth: int) -> None:
    """Every mapping key is a string, and containers nest at most ``max_depth``
    levels (``[]`` is one level, ``[[]]`` two). Walked without recursion."""
    stack: list[tuple[object, int]] = [(value, 1)] if isinstance(value, _CONTAINERS) else []
    while stack:
        item, level = stack.pop()
        if level > max_depth:
            raise NotSerializable(
                f"{kind} is nested too deeply to store as JSON: more than {max_depth} "
                "levels of lists and dicts"
            )
        if isinstance(item, dict):
            for key in item:
                if not isinstance(key, str):
                    raise NotSerializable(
                        f"{kind} has a key that is not a string: {show(key)} "
                        "(JSON keys are strings; convert it yourself)"
                    )
            children: Any = item.values()
        else:
            children = item
        stack.extend((child, level + 1) for child in children if isinstance(child, _CONTAINERS))


RETRY_KINDS = ("fixed", "exponential", "none")
RETRY_KEYS = ("kind", "base_seconds", "factor", "max_seconds")
CANCELLATION_KEYS = ("max_delay", "max_duration")


def _check_policy_keys(kind: str, policy: Mapping[Any, Any], known: tuple[str, ...]) -> None:
    """String keys from ``known`` only; the message never sorts keys of mixed types."""
    for key in policy:
        if not isinstance(key, str):
            raise InvalidArgument(
                f"{kind} keys must be strings ({', '.join(known)}), got the key {show(key)}"
            )
    unknown = sorted(set(policy) - set(known))
    if unknown:
        shown = ", ".join(show(key) for key in unknown[:5])
        raise InvalidArgument(f"{kind} has unknown keys {shown} (known: {', '.join(known)})")


def check_retry_strategy(strategy: object) -> dict[str, Any] | None:
    """A retry policy as stored: a ``timedelta`` becomes float seconds, other
    numbers are kept as given."""
    if strategy is None:
        return None
    if not isinstance(strategy, Mapping):
        raise InvalidArgument(f"retry_strategy must be a dict, got {show(strategy)}")
    _check_policy_keys("retry_strategy", strategy, RETRY_KEYS)
    checked = dict(strategy)
    kind = checked.get("kind", "none")
    if not isinstance(kind, str) or kind not in RETRY_KINDS:
        raise InvalidArgument(f"retry_strategy kind must be one of {RETRY_KINDS}, got {show(kind)}")
    for key in ("base_seconds", "max_seconds"):
        if key not in checked:
            continue
        seconds = check_seconds(f"retry_strategy[{key!r}]", checked[key])  # None: unset
        if isinstance(checked[key], timedelta):
            checked[key] = seconds
    factor = checked.get("factor", 2)
    # 1 <= factor <= MAX_RETRY_FACTOR is False for NaN and exact for ints of any size.
    if not _is_number(factor) or not 1 <= factor <= MAX_RETRY_FACTOR:
        raise InvalidArgument(
            f"retry_strategy['factor'] must be a number from 1 to {MAX_RETRY_FACTOR:g}, "
            f"got {show(factor)}"
        )
    return checked


def check_cancellation(policy: object) -> dict[str, Any] | None:
    """A cancellation policy as stored: ``None`` values dropped, a ``timedelta``
    as float seconds, other numbers kept as given."""
    if policy is None:
        return None
    if not isinstance(policy, Mapping):
        raise InvalidArgument(f"cancellation must be a dict, got {show(policy)}")
    _check_policy_keys("cancellation", policy, CANCELLATION_KEYS)
    checked: dict[str, Any] = {}
    for key, value in policy.items():
        seconds = check_seconds(f"cancellation[{key!r}]", value)
        if seconds is None:
            continue
        if seconds == 0:
            raise InvalidArgument(f"cancellation[{key!r}] must be positive")
        checked[key] = seconds if isinstance(value, timedelta) else value
    return checked or None


def retry_delay(strategy: Mapping[str, Any] | None, attempt: int) -> float:
    """Seconds to wait before the attempt after ``attempt`` (which just failed)."""
    if not strategy:
        return 0.0
    kind = strategy.get("kind", "none")
    base = float(strategy.get("base_seconds") or 0)
    if kind == "fixed":
        return base
    if kind == "exponential":
        cap = strategy.get("max_seconds")
        limit = float(cap) if cap is not None else 10 * 365 * 86400.0
        if base <= 0:
            return 0.0
        factor = float(strategy.get("factor", 2))
        try:  # base > 0 and factor >= 1: the product is finite or overflows, never NaN
            delay = base * factor ** max(attempt - 1, 0)
        except OverflowError:
            delay = math.inf
        return min(delay, limit)
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

    @property
    def parent_task_id(self) -> uuid.UUID | None:
        """The task spawning this one with ``ctx.spawn``, if any (for
        ``Hooks.before_spawn``; ``get_current_context()`` also tells which
        task's handler is running)."""
        parent = (self.headers or {}).get(PARENT_HEADER)
        try:
            return None if parent is None else uuid.UUID(str(parent))
        except ValueError:
            return None


@dataclass(frozen=True, slots=True)
class TaskDefaults:
    """What a spawn uses for each option it leaves out: the task's registered
    defaults, else the app's."""

    queue: str
    max_attempts: int | None
    cancellation: Mapping[str, Any] | None
    retry_strategy: Mapping[str, Any] | None = None


def spawn_row(request: SpawnRequest, defaults: TaskDefaults) -> dict[str, Any]:
    """Validate one request into the values of the spawn statement's fields
    (``_sql.SPAWN_FIELDS``): fresh ids, and JSON encoded once, as text."""
    check_name("task name", request.task_name)
    params = None if request.params is None else encode_json("params", request.params)
    if request.headers is not None and not isinstance(request.headers, Mapping):
        raise InvalidArgument(f"headers must be a dict, got {show(request.headers)}")
    headers = None if request.headers is None else encode_json("headers", request.headers)
    if request.idempotency_key is not None:
        check_name("idempotency_key", request.idempotency_key)
    max_attempts = check_max_attempts(request.max_attempts)
    run_after_at: datetime | None = None
    delay: float | None = None
    if isinstance(request.run_after, datetime):
        run_after_at = check_aware("run_after", request.run_after)
    else:
        delay = check_seconds("run_after", request.run_after)
    cancellation = check_cancellation(
        request.cancellation if request.cancellation is not None else defaults.cancellation
    )
    retry_strategy = check_retry_strategy(
        request.retry_strategy if request.retry_strategy is not None else defaults.retry_strategy
    )
    return {
        "task_id": uuid7(),
        "run_id": uuid7(),
        "task_name": request.task_name,
        "params": params,
        "headers": headers,
        "retry_strategy": _encoded(retry_strategy),
        "max_attempts": max_attempts if max_attempts is not None else defaults.max_attempts,
        "cancellation": _encoded(cancellation),
        "idempotency_key": request.idempotency_key,
        "delay_seconds": delay,
        "run_after": run_after_at,
    }


def _encoded(policy: Mapping[str, Any] | None) -> str | None:
    """A policy ``check_*`` has validated (plain JSON values), as JSON text."""
    return None if policy is None else json.dumps(policy, separators=(",", ":"))


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
