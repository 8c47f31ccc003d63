"""Pure logic, no database: ids, validation, retry math, spawn rows and the
SQL that ``_sql`` compiles to.
"""

from __future__ import annotations

import itertools
import json
import math
import sys
import time
import types
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy.dialects import postgresql

from absurd_sqla import (
    AbsurdError,
    InvalidArgument,
    InvalidQueueName,
    NotSerializable,
    SpawnRequest,
    TaskResultSnapshot,
    _core,
    _sql,
    uuid7,
)
from absurd_sqla._app import AppCore, Hooks
from absurd_sqla._children import PARENT_HEADER, child_headers, done_event, done_payload
from absurd_sqla._core import TaskDefaults

TEN_YEARS = 10 * 365 * 86400.0

# -- uuid7 ----------------------------------------------------------------------


def uuid7_ms(value: uuid.UUID) -> int:
    return value.int >> 80


def test_uuid7_version_and_variant() -> None:
    for _ in range(100):
        value = uuid7()
        assert isinstance(value, uuid.UUID)
        assert value.version == 7
        assert value.variant == uuid.RFC_4122
        assert (value.int >> 62) & 0b11 == 0b10


def test_uuid7_strictly_increasing_in_one_thread() -> None:
    ids = [uuid7() for _ in range(10_000)]
    assert all(a < b for a, b in itertools.pairwise(ids))
    assert all(a.bytes < b.bytes for a, b in itertools.pairwise(ids))
    assert len({str(i) for i in ids}) == len(ids)


def test_uuid7_timestamp_is_now() -> None:
    before = time.time()
    value = uuid7()
    after = time.time()
    ms = uuid7_ms(value)
    assert abs(ms / 1000 - before) < 1.0
    assert before * 1000 - 1000 <= ms <= after * 1000 + 1000


def test_uuid7_monotonic_when_clock_stalls_or_goes_back(monkeypatch: pytest.MonkeyPatch) -> None:
    base = (time.time_ns() // 1_000_000 + 60_000) * 1_000_000  # ahead of any earlier id
    clock = {"now": base}
    monkeypatch.setattr(_core, "time", types.SimpleNamespace(time_ns=lambda: clock["now"]))
    frozen = [uuid7() for _ in range(5000)]  # more than the 4096 counter values per ms
    clock["now"] = base - 5_000_000_000  # the wall clock jumps 5 s back
    after_jump = [uuid7() for _ in range(100)]
    ids = frozen + after_jump
    assert all(a < b for a, b in itertools.pairwise(ids))
    assert all(v.version == 7 and v.variant == uuid.RFC_4122 for v in ids)
    # The counter borrows at most a few milliseconds, never runs away.
    assert uuid7_ms(ids[-1]) - base // 1_000_000 <= 2


# -- retry math -------------------------------------------------------------------


@pytest.mark.parametrize("attempt", [1, 2, 5, 50])
def test_retry_delay_fixed(attempt: int) -> None:
    assert _core.retry_delay({"kind": "fixed", "base_seconds": 60}, attempt) == 60.0


def test_retry_delay_fixed_without_base_is_zero() -> None:
    assert _core.retry_delay({"kind": "fixed"}, 3) == 0.0


@pytest.mark.parametrize(
    ("attempt", "expected"), [(1, 30.0), (2, 60.0), (3, 120.0), (4, 240.0), (5, 300.0)]
)
def test_retry_delay_exponential_capped(attempt: int, expected: float) -> None:
    strategy = {"kind": "exponential", "base_seconds": 30, "factor": 2, "max_seconds": 300}
    assert _core.retry_delay(strategy, attempt) == expected


def test_retry_delay_exponential_formula() -> None:
    strategy = {"kind": "exponential", "base_seconds": 1.5, "factor": 3}
    for attempt in range(1, 10):
        assert _core.retry_delay(strategy, attempt) == pytest.approx(1.5 * 3 ** (attempt - 1))
    # factor defaults to 2
    assert _core.retry_delay({"kind": "exponential", "base_seconds": 10}, 4) == 80.0


def test_retry_delay_exponential_overflow_is_capped() -> None:
    uncapped = {"kind": "exponential", "base_seconds": 30, "factor": 2}
    assert _core.retry_delay(uncapped, 100_000) == TEN_YEARS
    capped = dict(uncapped, max_seconds=3600)
    assert _core.retry_delay(capped, 100_000) == 3600.0
    assert math.isfinite(_core.retry_delay(uncapped, 2000))


@pytest.mark.parametrize(
    "strategy", [None, {}, {"kind": "none"}, {"kind": "none", "base_seconds": 9}]
)
def test_retry_delay_none(strategy: Any) -> None:
    assert _core.retry_delay(strategy, 1) == 0.0
    assert _core.retry_delay(strategy, 7) == 0.0


def test_should_retry() -> None:
    assert _core.should_retry(None, 1)
    assert _core.should_retry(None, 10_000)
    assert _core.should_retry(3, 1)
    assert _core.should_retry(3, 2)
    assert not _core.should_retry(3, 3)
    assert not _core.should_retry(3, 4)
    assert not _core.should_retry(1, 1)


# -- validators -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["default", "a", "Q1", "a.b-c_d", "9lives", "q" * 56])
def test_check_queue_name_accepts(name: str) -> None:
    assert _core.check_queue_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "q" * 57,
        "has space",
        ";drop",
        "-x",
        "_x",
        ".x",
        "café",
        "a/b",
        "a\nb",
        None,
        5,
        b"q",
        "default\n",  # a regex ending in `$` would match before the newline
        "q" * 56 + "\n",
    ],
)
def test_check_queue_name_rejects(name: Any) -> None:
    with pytest.raises(InvalidQueueName):
        _core.check_queue_name(name)


def test_check_name() -> None:
    assert _core.check_name("task name", "x") == "x"
    assert _core.check_name("task name", "n" * 255) == "n" * 255
    for bad in ["", "n" * 256, None, 1, b"x"]:
        with pytest.raises(InvalidArgument, match="task name"):
            _core.check_name("task name", bad)


@pytest.mark.parametrize("value", [10**400, -(10**400), 2**1024], ids=["big", "-big", "2**1024"])
def test_seconds_too_big_for_a_float(value: int) -> None:
    """math.isfinite() of such an int raises OverflowError: never reached."""
    with pytest.raises(InvalidArgument, match="run_after"):
        _core.check_seconds("run_after", value)
    with pytest.raises(InvalidArgument, match="poll_interval"):
        _core.check_poll_interval(value)
    with pytest.raises(InvalidArgument, match="max_delay"):
        _core.check_cancellation({"max_delay": value})
    with pytest.raises(InvalidArgument, match="base_seconds"):
        _core.check_retry_strategy({"kind": "fixed", "base_seconds": value})
    if value > 0:
        with pytest.raises(InvalidArgument, match="claim_timeout"):
            _core.check_claim_timeout(value)
    else:  # 0 or less: the lease never expires
        assert _core.check_claim_timeout(value) == 0.0


def test_check_seconds() -> None:
    assert _core.check_seconds("t", None) is None
    assert _core.check_seconds("t", 0) == 0.0
    assert _core.check_seconds("t", 2) == 2.0
    assert _core.check_seconds("t", 0.25) == 0.25
    assert _core.check_seconds("t", timedelta(minutes=1, milliseconds=500)) == 60.5
    for bad in [-1, -0.001, math.nan, math.inf, -math.inf, True, False, "3", [], timedelta(-1)]:
        with pytest.raises(InvalidArgument, match="t"):
            _core.check_seconds("t", bad)
    with pytest.raises(InvalidArgument):
        _core.check_seconds("t", None, allow_none=False)


def test_check_aware() -> None:
    aware = datetime(2030, 1, 1, tzinfo=UTC)
    assert _core.check_aware("when", aware) == aware
    offset = datetime(2030, 1, 1, tzinfo=timezone(timedelta(hours=-3)))
    assert _core.check_aware("when", offset) == datetime(2030, 1, 1, 3, tzinfo=UTC)
    with pytest.raises(InvalidArgument, match="timezone"):
        _core.check_aware("when", datetime(2030, 1, 1))


@pytest.mark.parametrize(
    "offset",
    [
        timedelta(hours=16),  # PostgreSQL: time zone displacement out of range
        -timedelta(hours=23, minutes=59),
        timedelta(microseconds=1),  # PostgreSQL: invalid input syntax
        timedelta(hours=5, seconds=30, microseconds=250),
    ],
)
def test_check_aware_returns_the_instant_in_utc(offset: timedelta) -> None:
    """Any offset Python allows: the same instant, as UTC (which PostgreSQL parses)."""
    when = datetime(2030, 1, 1, 12, 30, tzinfo=timezone(offset))
    checked = _core.check_aware("when", when)
    assert checked == when and checked.utcoffset() == timedelta(0)
    row = _core.spawn_row(SpawnRequest("t", run_after=when), DEFAULTS)
    assert row["run_after"] == when and row["run_after"].utcoffset() == timedelta(0)


def test_check_aware_out_of_range_in_utc() -> None:
    early = datetime.min.replace(tzinfo=timezone(timedelta(hours=1)))
    with pytest.raises(InvalidArgument, match="out of range"):
        _core.check_aware("run_after", early)


def test_check_max_attempts() -> None:
    assert _core.check_max_attempts(None) is None
    assert _core.check_max_attempts(1) == 1
    assert _core.check_max_attempts(50) == 50
    for bad in [0, -1, True, False, 2.0, "3", math.nan]:
        with pytest.raises(InvalidArgument, match="max_attempts"):
            _core.check_max_attempts(bad)


def test_check_retry_strategy() -> None:
    assert _core.check_retry_strategy(None) is None
    good = {"kind": "exponential", "base_seconds": 1, "factor": 1.5, "max_seconds": 60}
    checked = _core.check_retry_strategy(good)
    assert checked == good and checked is not good
    assert _core.check_retry_strategy({"kind": "fixed", "base_seconds": 5}) == {
        "kind": "fixed",
        "base_seconds": 5,
    }
    assert _core.check_retry_strategy({"kind": "none"}) == {"kind": "none"}
    bad_strategies: list[Any] = [
        "fixed",
        ["fixed"],
        {"kind": "linear"},
        {"kind": None},
        {"kind": "fixed", "base_seconds": -1},
        {"kind": "fixed", "base_seconds": "60"},
        {"kind": "exponential", "max_seconds": math.inf},
        {"kind": "exponential", "factor": 0.5},
        {"kind": "exponential", "factor": True},
        {"kind": "exponential", "factor": "2"},
        {"kind": "fixed", "jitter": 0.1},
    ]
    for bad in bad_strategies:
        with pytest.raises(InvalidArgument, match="retry_strategy"):
            _core.check_retry_strategy(bad)


@pytest.mark.parametrize(
    "factor",
    [math.nan, math.inf, -math.inf, 10**5000, 1e6 + 1, 10**7, 0, 0.999, -2],
    ids=["nan", "inf", "-inf", "10**5000", "1e6+1", "10**7", "0", "0.999", "-2"],
)
def test_check_retry_strategy_bounds_the_factor(factor: Any) -> None:
    """NaN and infinity would fail inside PostgreSQL; 10**5000 in json.dumps."""
    with pytest.raises(InvalidArgument, match=r"retry_strategy\['factor'\].*from 1 to 1e\+06"):
        _core.check_retry_strategy({"kind": "exponential", "factor": factor})


@pytest.mark.parametrize("factor", [1, 1.0, 2, 1.5, 10**6, 1e6])
def test_check_retry_strategy_keeps_a_good_factor(factor: Any) -> None:
    strategy = {"kind": "exponential", "base_seconds": 1, "factor": factor}
    assert _core.check_retry_strategy(strategy) == strategy


def test_policies_store_timedeltas_as_float_seconds() -> None:
    retry = _core.check_retry_strategy(
        {"kind": "exponential", "base_seconds": timedelta(seconds=5), "max_seconds": 60}
    )
    assert retry == {"kind": "exponential", "base_seconds": 5.0, "max_seconds": 60}
    assert type(retry["base_seconds"]) is float and type(retry["max_seconds"]) is int
    cancellation = _core.check_cancellation(
        {"max_delay": timedelta(minutes=1, milliseconds=500), "max_duration": 7}
    )
    assert cancellation == {"max_delay": 60.5, "max_duration": 7}
    row = _core.spawn_row(
        SpawnRequest("t", retry_strategy=retry, cancellation=cancellation), DEFAULTS
    )
    assert json.loads(row["retry_strategy"]) == retry  # as JSON text, the floats kept
    assert json.loads(row["cancellation"]) == cancellation
    with pytest.raises(InvalidArgument, match="max_delay"):
        _core.check_cancellation({"max_delay": timedelta(0)})


@pytest.mark.parametrize(
    ("check", "policy"),
    [
        (_core.check_cancellation, {"other": 0, None: 0}),
        (_core.check_cancellation, {None: 1, "a": 2}),
        (_core.check_cancellation, {1: 5}),
        (_core.check_retry_strategy, {0: 0, "a": 0}),
        (_core.check_retry_strategy, {"kind": "fixed", ("kind",): "fixed"}),
    ],
)
def test_policy_keys_must_be_strings(check: Any, policy: Any) -> None:
    with pytest.raises(InvalidArgument, match="keys must be strings"):
        check(policy)


def test_unknown_policy_keys_are_named() -> None:
    with pytest.raises(InvalidArgument, match=r"unknown keys 'b', 'c'.*known: max_delay"):
        _core.check_cancellation({"c": 1, "b": 2, "max_delay": 3})
    with pytest.raises(InvalidArgument, match="unknown keys 'jitter'"):
        _core.check_retry_strategy({"kind": "fixed", "jitter": 0.1})


def test_retry_strategy_seconds_may_be_none() -> None:
    """None means unset: the worker's delay maths treats it as 0 / no cap."""
    strategy = {"kind": "exponential", "base_seconds": None, "max_seconds": None}
    assert _core.check_retry_strategy(strategy) == strategy
    assert _core.retry_delay(strategy, 3) == 0.0
    assert _core.retry_delay({"kind": "fixed", "base_seconds": None}, 3) == 0.0
    capless = {"kind": "exponential", "base_seconds": 1, "max_seconds": None}
    assert _core.retry_delay(capless, 4) == 8.0


@pytest.mark.parametrize("attempt", [1, 2, 60, 10_000, 2**31 - 1])
def test_retry_delay_with_the_largest_factor(attempt: int) -> None:
    strategy = {"kind": "exponential", "base_seconds": 1e-6, "factor": 10**6}
    delay = _core.retry_delay(strategy, attempt)
    assert math.isfinite(delay) and 0 < delay <= TEN_YEARS
    assert _core.retry_delay({**strategy, "base_seconds": 0}, attempt) == 0.0
    assert _core.retry_delay({**strategy, "max_seconds": 0}, attempt) == 0.0


def test_check_cancellation() -> None:
    assert _core.check_cancellation(None) is None
    assert _core.check_cancellation({}) is None
    assert _core.check_cancellation({"max_delay": None}) is None
    assert _core.check_cancellation({"max_delay": 5, "max_duration": None}) == {"max_delay": 5}
    assert _core.check_cancellation({"max_delay": 1.5, "max_duration": 60}) == {
        "max_delay": 1.5,
        "max_duration": 60,
    }
    for bad in [
        5,
        "max_delay",
        {"max_wait": 5},
        {"max_delay": 0},
        {"max_duration": -1},
        {"max_delay": math.nan},
        {"max_delay": "5"},
    ]:
        with pytest.raises(InvalidArgument, match="cancellation"):
            _core.check_cancellation(bad)


# -- JSON -----------------------------------------------------------------------------


def test_encode_json_round_trips() -> None:
    value = {"a": [1, 2.5, None, True, "ü"], "b": {"c": {}}}
    encoded = _core.encode_json("params", value)
    assert json.loads(encoded) == value
    assert " " not in encoded  # compact
    assert _core.encode_json("payload", None) == "null"


@pytest.mark.parametrize(
    "value",
    [
        object(),
        math.nan,
        math.inf,
        -math.inf,
        {1, 2},
        b"raw",
        {"at": datetime.now(UTC)},
        {(1, 2): "tuple key"},
        [uuid.uuid4()],
    ],
)
def test_encode_json_rejects(value: Any) -> None:
    with pytest.raises(NotSerializable, match="event payload") as info:
        _core.encode_json("event payload", value)
    error = info.value
    assert isinstance(error, InvalidArgument)
    assert isinstance(error, AbsurdError)
    assert isinstance(error, TypeError)
    assert error.__cause__ is not None


def test_error_hierarchy_matches_the_reference() -> None:
    """The tree docs/reference.md documents: what callers may catch, and what they must not."""
    import builtins

    from absurd_sqla import (
        CancelledTask,
        LeaseLost,
        QueueNotFound,
        SuspendTask,
        TaskNotFound,
        TaskSignal,
        TaskStateError,
        TimeoutError,
    )

    assert issubclass(InvalidArgument, AbsurdError) and issubclass(InvalidArgument, ValueError)
    assert issubclass(InvalidQueueName, InvalidArgument)
    assert issubclass(NotSerializable, InvalidArgument) and issubclass(NotSerializable, TypeError)
    for lookup in (QueueNotFound, TaskNotFound):
        assert issubclass(lookup, AbsurdError) and issubclass(lookup, LookupError)
    assert issubclass(TaskStateError, AbsurdError)
    assert issubclass(TimeoutError, AbsurdError) and issubclass(TimeoutError, builtins.TimeoutError)
    assert issubclass(AbsurdError, Exception)
    for signal in (SuspendTask, CancelledTask, LeaseLost):
        assert issubclass(signal, TaskSignal)
        assert not issubclass(signal, Exception)  # `except Exception:` must not swallow it


def nest_lists(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


def nest_dicts(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = {"k": value}
    return value


@pytest.mark.parametrize("nest", [nest_lists, nest_dicts])
def test_encode_json_refuses_nesting_deeper_than_the_maximum(nest: Any) -> None:
    """JSON nested just under the recursion limit encodes here, but not again
    inside the spawn statement's rows nor when a worker decodes it."""
    limit = _core.MAX_JSON_DEPTH
    assert json.loads(_core.encode_json("params", nest(limit))) == nest(limit)
    recursion_limit = sys.getrecursionlimit()
    for depth in (limit + 1, limit + 100, recursion_limit - 12, recursion_limit + 10):
        with pytest.raises(NotSerializable, match=f"params is nested too deeply.*{limit}"):
            _core.encode_json("params", nest(depth))
    mixed = {"a": [1, {"b": nest(limit - 3)}]}  # limit levels: {, [, {, then the nest
    _core.encode_json("payload", mixed)
    with pytest.raises(NotSerializable):
        _core.encode_json("payload", {"a": [1, {"b": nest(limit - 2)}]})
    assert _core.encode_json("payload", nest(limit + 1), max_depth=limit + 1)


@pytest.mark.parametrize("depth", range(970, 1000))
def test_spawn_rows_near_the_recursion_limit_are_refused(depth: int) -> None:
    """Depths the old check passed, then the spawn statement's own json.dumps of
    its rows raised RecursionError; and deep headers that are not a mapping,
    whose error message raised RecursionError from repr()."""
    core = AppCore()
    for request in (
        SpawnRequest("t", params=nest_lists(depth)),
        SpawnRequest("t", headers={"h": nest_lists(depth)}),
        SpawnRequest("t", headers=nest_lists(depth)),
    ):
        with pytest.raises(InvalidArgument):
            core.spawn_batches([request])


def test_error_messages_survive_values_repr_cannot_print() -> None:
    deep = nest_lists(sys.getrecursionlimit() + 10)
    huge = 10**5000
    for call in (
        lambda: _core.check_retry_strategy(deep),
        lambda: _core.check_cancellation(deep),
        lambda: _core.check_seconds("s", deep),
        lambda: _core.check_max_attempts(huge),
        lambda: _core.check_task_id(deep),
        lambda: _core.check_name("task name", deep),
        lambda: _core.check_queue_name(deep),
        lambda: AppCore().spawn_batches([deep]),
        lambda: child_headers(deep, uuid7()),
    ):
        with pytest.raises(InvalidArgument) as info:
            call()
        assert len(str(info.value)) < 300


def test_spawn_batches_checks_the_task_name_before_the_registry() -> None:
    """An unhashable name cannot be looked up: it must be refused first."""
    core = AppCore()
    for name in (["t"], [], {"t": 1}, {1}):
        with pytest.raises(InvalidArgument, match="task name"):
            core.spawn_batches([SpawnRequest(task_name=name)])


def test_before_spawn_must_return_a_spawn_request() -> None:
    core = AppCore(hooks=Hooks(before_spawn=lambda request: None))  # type: ignore[arg-type,return-value]
    with pytest.raises(InvalidArgument, match="before_spawn"):
        core.spawn_batches([SpawnRequest("t")])


@pytest.mark.parametrize("headers", [[1], "h", 1, [("a", 1)]])
def test_child_headers_must_be_a_mapping(headers: Any) -> None:
    """As ``spawn`` refuses them: InvalidArgument, not TypeError from the merge."""
    with pytest.raises(InvalidArgument, match="headers must be a dict"):
        child_headers(headers, uuid7())
    assert child_headers(None, uuid.UUID(int=1)) == {PARENT_HEADER: str(uuid.UUID(int=1))}
    assert child_headers({"a": 1}, uuid.UUID(int=1))["a"] == 1


def test_done_event_payload_may_wrap_a_result_of_the_maximum_depth() -> None:
    result = nest_lists(_core.MAX_JSON_DEPTH)
    _core.encode_json("the task's return value", result)
    payload = done_payload(TaskResultSnapshot("completed", result))
    params = AppCore.emit_params_for("default", done_event(uuid7()), payload)
    assert json.loads(params["payload_json"]) == payload
    with pytest.raises(NotSerializable):  # an ordinary event gets no extra level
        AppCore.emit_params_for("default", "e", payload)


def test_encode_json_rejects_circular_structures() -> None:
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(NotSerializable):
        _core.encode_json("params", loop)


# -- spawn rows --------------------------------------------------------------------

DEFAULTS = TaskDefaults(queue="default", max_attempts=5, cancellation={"max_delay": 30})


def test_spawn_row_full() -> None:
    when = datetime(2031, 2, 3, 4, 5, 6, tzinfo=UTC)
    request = SpawnRequest(
        "charge",
        {"order": 1},
        max_attempts=3,
        retry_strategy={"kind": "fixed", "base_seconds": 10},
        headers={"trace": "t"},
        queue="ignored-here",
        cancellation={"max_duration": 60},
        idempotency_key="k1",
        run_after=when,
    )
    row = _core.spawn_row(request, DEFAULTS)
    assert row["task_id"].version == 7
    assert row["run_id"].version == 7
    assert row["task_id"] != row["run_id"]
    expected = {
        "task_name": "charge",
        "params": '{"order":1}',  # JSON fields as text, encoded once
        "headers": '{"trace":"t"}',
        "retry_strategy": '{"kind":"fixed","base_seconds":10}',
        "max_attempts": 3,
        "cancellation": '{"max_duration":60}',
        "idempotency_key": "k1",
        "delay_seconds": None,
        "run_after": when,
    }
    assert {k: row[k] for k in expected} == expected
    assert set(row) == set(_sql.SPAWN_FIELDS)  # every field of the statement, nothing else


def test_spawn_row_defaults_and_delay() -> None:
    row = _core.spawn_row(SpawnRequest("t", run_after=90), DEFAULTS)
    assert row["params"] is None
    assert row["headers"] is None
    assert row["retry_strategy"] is None
    assert row["max_attempts"] == 5
    assert row["cancellation"] == '{"max_delay":30}'
    assert row["idempotency_key"] is None
    assert (row["delay_seconds"], row["run_after"]) == (90.0, None)
    row = _core.spawn_row(SpawnRequest("t", run_after=timedelta(seconds=1.5)), DEFAULTS)
    assert row["delay_seconds"] == 1.5
    row = _core.spawn_row(SpawnRequest("t"), TaskDefaults("default", None, None))
    assert (row["max_attempts"], row["cancellation"], row["delay_seconds"]) == (None, None, None)


def test_spawn_row_ids_are_fresh_and_ordered() -> None:
    rows = [_core.spawn_row(SpawnRequest("t"), DEFAULTS) for _ in range(100)]
    ids = [r["task_id"] for r in rows]
    assert ids == sorted(ids) and len(set(ids)) == 100


def test_spawn_row_headers_are_copied() -> None:
    headers = {"a": 1}
    row = _core.spawn_row(SpawnRequest("t", headers=headers), DEFAULTS)
    headers["a"] = 2
    assert row["headers"] == '{"a":1}'


@pytest.mark.parametrize(
    ("request_kwargs", "error"),
    [
        ({"task_name": ""}, InvalidArgument),
        ({"params": object()}, NotSerializable),
        ({"params": {"x": math.nan}}, NotSerializable),
        ({"headers": ["x"]}, InvalidArgument),
        ({"headers": {"x": {1, 2}}}, NotSerializable),
        ({"idempotency_key": ""}, InvalidArgument),
        ({"max_attempts": 0}, InvalidArgument),
        ({"retry_strategy": {"kind": "sometimes"}}, InvalidArgument),
        ({"cancellation": {"max_delay": -1}}, InvalidArgument),
        ({"run_after": -1}, InvalidArgument),
        ({"run_after": datetime(2030, 1, 1)}, InvalidArgument),
        ({"run_after": "soon"}, InvalidArgument),
    ],
)
def test_spawn_row_rejects(request_kwargs: dict[str, Any], error: type[Exception]) -> None:
    kwargs: dict[str, Any] = {"task_name": "t", **request_kwargs}
    with pytest.raises(error):
        _core.spawn_row(SpawnRequest(**kwargs), DEFAULTS)


# -- result snapshots ----------------------------------------------------------------


def test_snapshot_from_row() -> None:
    failure = {"name": "E", "message": "m", "traceback": "tb"}
    assert _core.snapshot_from_row("completed", {"r": 1}, failure) == TaskResultSnapshot(
        "completed", {"r": 1}, None
    )
    assert _core.snapshot_from_row("failed", {"r": 1}, failure) == TaskResultSnapshot(
        "failed", None, failure
    )
    for state in ("pending", "running", "sleeping", "cancelled"):
        assert _core.snapshot_from_row(state, {"r": 1}, failure) == TaskResultSnapshot(state)
    assert [TaskResultSnapshot(s).terminal for s in ("completed", "failed", "cancelled")] == [
        True
    ] * 3
    assert not any(TaskResultSnapshot(s).terminal for s in ("pending", "running", "sleeping"))


def test_poll_delays_grow_to_cap() -> None:
    step = _core.poll_delays(0.01, 0.08)
    assert [step() for _ in range(6)] == [0.01, 0.02, 0.04, 0.08, 0.08, 0.08]


# -- compiled SQL ------------------------------------------------------------------------


def compiled(statement: Any) -> str:
    return str(statement.compile(dialect=postgresql.dialect()))


def test_spawn_sql() -> None:
    sql = compiled(_sql.spawn)
    assert "unnest(CAST(%(task_id)s" in sql  # one array per field
    assert "CAST(%(params)s::TEXT[] AS JSONB[])" in sql  # JSON as text, cast
    assert "WITH ORDINALITY" in sql
    assert "ON CONFLICT (queue_name, idempotency_key) WHERE idempotency_key IS NOT NULL" in sql
    assert "DO NOTHING" in sql
    assert "INSERT INTO absurd.tasks" in sql and "INSERT INTO absurd.runs" in sql
    assert "pg_notify(%(channel)s" in sql
    assert "%(queue)s" in sql
    assert "absurd.now()" in sql
    assert "clock_timestamp" not in sql  # "now" is absurd.now(), which honours fake_now
    assert "'default'" not in sql


def test_emit_sql() -> None:
    sql = compiled(_sql.emit_event)
    assert "INSERT INTO absurd.events" in sql
    assert "ON CONFLICT (queue_name, event_name) DO UPDATE" in sql
    assert "WHERE absurd.events.emitted_at IS NULL" in sql  # first emit wins
    for param in ("%(queue)s", "%(event)s", "%(payload_json)s"):
        assert param in sql
    wake = compiled(_sql.wake_waiters)
    assert "DELETE FROM absurd.waits" in wake
    assert "UPDATE absurd.runs" in wake and "UPDATE absurd.tasks" in wake
    assert "INSERT INTO absurd.checkpoints" in wake
    assert "pg_notify(%(channel)s" in wake


def test_queue_sql() -> None:
    create = compiled(_sql.create_queue)
    assert "INSERT INTO absurd.queues" in create
    assert "%(queue)s" in create
    assert "ON CONFLICT DO NOTHING" in create
    assert compiled(_sql.drop_queue).startswith("DELETE FROM absurd.queues")
    assert "ORDER BY absurd.queues.queue_name" in compiled(_sql.list_queues)


def test_cancel_sql_locks_runs_before_tasks() -> None:
    sql = compiled(_sql.cancel_task)
    assert "%(task)s" in sql and "%(queue)s" in sql
    assert sql.index("UPDATE absurd.runs") < sql.index("UPDATE absurd.tasks")
    assert "DELETE FROM absurd.waits" in sql


def test_fetch_result_sql() -> None:
    sql = compiled(_sql.fetch_task_result)
    assert "LEFT OUTER JOIN absurd.runs" in sql
    assert "absurd.tasks.last_run_id" in sql
    # Found by id alone (ids are unique across queues); the queue is returned to check.
    assert "WHERE absurd.tasks.task_id = %(task)s" in sql and "%(queue)s" not in sql
    assert "absurd.tasks.queue_name" in sql


def test_statement_parameters_are_bound_not_literal() -> None:
    """No statement inlines a queue, task or event name: each is a bind parameter."""
    for name in ("spawn", "emit_event", "wake_waiters", "cancel_task", "create_queue"):
        compiled_statement = getattr(_sql, name).compile(dialect=postgresql.dialect())
        assert "queue" in compiled_statement.params, name
        assert "'default'" not in str(compiled_statement), name
    assert _sql.channel_for("billing") == "absurd.billing"
    assert len(_sql.channel_for("q" * 56)) == 63  # Postgres' identifier limit


@pytest.mark.parametrize(
    "value", ["\x00", {"k": "a\x00b"}, {"a\x00": 1}, ["\\\x00"], "\ud800", {"s": "x\udfff"}]
)
def test_encode_json_rejects_what_jsonb_cannot_store(value: Any) -> None:
    with pytest.raises(NotSerializable):
        _core.encode_json("params", value)


@pytest.mark.parametrize("value", ["\\u0000", "\\\\u0000", {"\\u0000": "\\u0000"}, "😀 ü"])
def test_encode_json_allows_lookalikes_of_nul(value: Any) -> None:
    """A literal backslash followed by ``u0000`` is ordinary text, not a NUL."""
    assert json.loads(_core.encode_json("params", value)) == value


def test_integer_and_interval_bounds() -> None:
    assert _core.check_max_attempts(2**31 - 1) == 2**31 - 1
    with pytest.raises(InvalidArgument):
        _core.check_max_attempts(2**31)
    with pytest.raises(InvalidArgument):
        _core.check_seconds("run_after", timedelta.max)
    assert _core.check_seconds("run_after", 10 * 365 * 86400) == 10 * 365 * 86400.0
    with pytest.raises(InvalidArgument):
        _core.check_name("task name", "a\x00b")
