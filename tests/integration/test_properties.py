"""Property-based tests (hypothesis) of every public entry point that takes
names or JSON.

The property, for each call: it EITHER raises the exception docs/reference.md
documents for it (an ``InvalidArgument`` subclass, ``QueueNotFound``,
``TaskNotFound``, ``QueueMismatch``, ``TaskStateError``), having written
nothing, with the caller's transaction still usable (the call runs with
``session=`` inside an open Session transaction, followed by a known-good write
in the same transaction and a commit); OR it succeeds, and what absurd's
tables, ``fetch_task_result`` and a replayed step give back equals what was
passed. A reference model of the documented rules says which of the two each
input must get, so a refusal of a good input fails too.

Round trips compare types as well as values: ``1`` and ``1.0`` and ``True``
differ. Tuples are stored as JSON arrays and come back as lists. ``-0.0``
comes back as ``0.0`` (``jsonb`` numbers have no negative zero; equal in
Python, so accepted).

Known defects are kept out of the generated inputs (see ``known_issues``) and
pinned by the strict xfail tests at the end, one per defect, so fixing one
makes its test pass and fail as XPASS until its exclusion is removed. Set
``ABSURD_PROPERTIES_KNOWN_ISSUES=1`` to generate them anyway.
"""

from __future__ import annotations

import math
import os
import re
import sys
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import hypothesis
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, create_engine, event, select, text
from sqlalchemy.orm import Session

from absurd_sqla import (
    Absurd,
    InvalidArgument,
    InvalidQueueName,
    NotSerializable,
    QueueMismatch,
    QueueNotFound,
    SpawnRequest,
    SpawnResult,
    TaskAlreadyRegistered,
    TaskContext,
    TaskNotFound,
    TaskStateError,
    TimeoutError,
)
from absurd_sqla.models import checkpoints, events, tasks
from absurd_sqla.testing import FakeClock, run_until_idle
from tests.support import Order

INCLUDE_KNOWN_ISSUES = os.environ.get("ABSURD_PROPERTIES_KNOWN_ISSUES") == "1"

MAX_INT = 2**31 - 1
MAX_SECONDS = 100 * 365 * 86400
NOW = datetime(2030, 1, 1, tzinfo=UTC)  # the database clock, frozen
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
QUEUES = ("default", "other")  # exist in every example; "missing" never does
DEFAULT_MAX_ATTEMPTS = 5

PROPERTY = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)


# -- the database ------------------------------------------------------------------


class Statements:
    """Counts statements sent through the engine (to prove none ran)."""

    def __init__(self, engine: Engine) -> None:
        self.count = 0
        event.listen(engine, "before_cursor_execute", self._seen)

    def _seen(self, *args: Any) -> None:
        self.count += 1


@dataclass
class Db:
    engine: Engine
    statements: Statements
    clock: FakeClock

    def reset(self) -> None:
        """Empty tables, the two queues, and the clock at NOW: each example starts here."""
        self.clock.set(NOW)
        with self.engine.begin() as conn:
            conn.execute(text("TRUNCATE absurd.queues, absurd.tasks, public.orders CASCADE"))
            conn.execute(
                text("INSERT INTO absurd.queues (queue_name) VALUES ('default'), ('other')")
            )

    def app(self) -> Absurd:
        return Absurd(self.engine)


@pytest.fixture(scope="module")
def db(database_url: str) -> Iterator[Db]:
    engine = create_engine(database_url, pool_size=5, max_overflow=5)
    clock = FakeClock(engine, NOW)
    yield Db(engine, Statements(engine), clock)
    clock.close()  # also disposes of the engine


COUNTS = text(
    "SELECT (SELECT count(*) FROM absurd.queues), (SELECT count(*) FROM absurd.tasks),"
    " (SELECT count(*) FROM absurd.runs), (SELECT count(*) FROM absurd.checkpoints),"
    " (SELECT count(*) FROM absurd.events), (SELECT count(*) FROM absurd.waits),"
    " (SELECT count(*) FROM public.orders)"
)


def counts(bind: Engine | Session) -> tuple[int, ...]:
    """Rows in each of absurd's six tables, and the business table."""
    if isinstance(bind, Session):
        return tuple(bind.execute(COUNTS).one())
    with bind.connect() as conn:
        return tuple(conn.execute(COUNTS).one())


GOOD_WRITE = (0, 1, 1, 0, 0, 0, 1)  # what the known-good write adds: a task, its run, an order


@dataclass
class Refused:
    error: BaseException


def in_transaction(db: Db, app: Absurd, call: Callable[[Session], Any], allowed: Any) -> Any:
    """Run ``call(session)`` in an open transaction. If it raises one of
    ``allowed``: nothing was written, the transaction still works (a known-good
    write in it commits), and the ``Refused`` is returned. Otherwise the
    transaction commits and the call's result is returned."""
    with Session(db.engine) as session:
        with session.begin():
            before = counts(session)
            sent = db.statements.count
            try:
                result = call(session)
            except allowed as exc:
                if isinstance(exc, InvalidArgument) and not isinstance(exc, QueueMismatch):
                    assert db.statements.count == sent, f"{exc!r} was raised after a statement"
                assert counts(session) == before, f"{exc!r} was raised after a write"
                session.add(Order(email="known-good@example.com", amount=1))
                app.spawn("known-good", {"ok": True}, session=session)
                refused = Refused(exc)
                hypothesis.event(f"refused: {type(exc).__name__}")
            else:
                hypothesis.event("accepted")
                return result
        after = counts(db.engine)
    assert after == tuple(b + g for b, g in zip(before, GOOD_WRITE, strict=True))
    return refused


# -- the reference model: what the documentation says is refused ----------------------

QUEUE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,55}")


def utf8(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def name_ok(name: object) -> bool:
    """Names and keys: non-empty, at most 255 characters, storable as UTF-8 text."""
    return isinstance(name, str) and 0 < len(name) <= 255 and "\x00" not in name and utf8(name)


def queue_ok(name: object) -> bool:
    return isinstance(name, str) and QUEUE_NAME.fullmatch(name) is not None


def json_ok(value: object) -> bool:
    """Storable as JSON: JSON types only (tuples too), string keys, finite
    floats, ints ``json.dumps`` can print, strings without NUL or lone
    surrogates, nesting well within the recursion limit."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > sys.getrecursionlimit() - 100:
            return False
        if item is None or isinstance(item, bool):
            continue
        if isinstance(item, int):
            if abs(item) >= 10 ** sys.get_int_max_str_digits():
                return False
        elif isinstance(item, float):
            if not math.isfinite(item):
                return False
        elif isinstance(item, str):
            if "\x00" in item or not utf8(item):
                return False
        elif isinstance(item, list | tuple):
            stack.extend((child, depth + 1) for child in item)
        elif isinstance(item, dict):
            for key, child in item.items():
                if not isinstance(key, str) or "\x00" in key or not utf8(key):
                    return False
                stack.append((child, depth + 1))
        else:
            return False
    return True


def stored(value: Any) -> Any:
    """What JSON storage gives back: tuples become lists."""
    if isinstance(value, dict):
        return {key: stored(child) for key, child in value.items()}
    if isinstance(value, list | tuple):
        return [stored(child) for child in value]
    return value


def same(expected: Any, actual: Any) -> bool:
    """Equal, and of the same JSON type (``True`` is not ``1``, ``1`` is not ``1.0``)."""
    if isinstance(expected, dict):
        return (
            type(actual) is dict
            and expected.keys() == actual.keys()
            and all(same(expected[key], actual[key]) for key in expected)
        )
    if isinstance(expected, list):
        return (
            type(actual) is list
            and len(expected) == len(actual)
            and all(same(e, a) for e, a in zip(expected, actual, strict=True))
        )
    return type(expected) is type(actual) and expected == actual


def assert_round_trip(expected: Any, actual: Any) -> None:
    assert same(stored(expected), actual), f"stored {expected!r:.300}, read back {actual!r:.300}"


def seconds_ok(value: object, *, positive: bool = False) -> bool:
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return False
    low_ok = value > 0 if positive else value >= 0
    return low_ok and value <= MAX_SECONDS


def seconds_of(value: float | timedelta) -> float:
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


def max_attempts_ok(value: object) -> bool:
    return value is None or (
        isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_INT
    )


RETRY_KEYS = {"kind", "base_seconds", "factor", "max_seconds"}


def retry_ok(strategy: object) -> bool:
    if strategy is None:
        return True
    if not isinstance(strategy, Mapping) or set(strategy) - RETRY_KEYS:
        return False
    if strategy.get("kind", "none") not in ("fixed", "exponential", "none"):
        return False
    for key in ("base_seconds", "max_seconds"):
        if strategy.get(key) is not None and not seconds_ok(strategy[key]):
            return False
    factor = strategy.get("factor", 2)
    return isinstance(factor, int | float) and not isinstance(factor, bool) and factor >= 1


def cancellation_ok(policy: object) -> bool:
    if policy is None:
        return True
    if not isinstance(policy, Mapping) or set(policy) - {"max_delay", "max_duration"}:
        return False
    return all(v is None or seconds_ok(v, positive=True) for v in policy.values())


def run_after_ok(value: object) -> bool:
    if isinstance(value, datetime):
        return value.utcoffset() is not None
    return value is None or seconds_ok(value)


def spawn_refusal(kwargs: Mapping[str, Any]) -> type[BaseException] | None:
    """What ``spawn(**kwargs)`` must raise on a client whose queue is "default"
    and that has no registered tasks; None if it must succeed."""
    headers = kwargs.get("headers")
    key = kwargs.get("idempotency_key")
    queue = kwargs.get("queue")
    valid = (
        name_ok(kwargs["task_name"])
        and json_ok(kwargs.get("params"))
        and (headers is None or (isinstance(headers, Mapping) and json_ok(headers)))
        and (key is None or name_ok(key))
        and (queue is None or queue_ok(queue))
        and max_attempts_ok(kwargs.get("max_attempts"))
        and retry_ok(kwargs.get("retry_strategy"))
        and cancellation_ok(kwargs.get("cancellation"))
        and run_after_ok(kwargs.get("run_after"))
    )
    if not valid:
        return InvalidArgument
    if (queue or "default") not in QUEUES:
        return QueueNotFound
    return None


# -- known defects, kept out of the generated inputs (each has an xfail test below) --


def huge_int(value: object) -> bool:
    return isinstance(value, int) and abs(value) > 1e308


def bad_factor(strategy: object) -> bool:
    """A non-finite or unprintable retry factor passes the check, then breaks
    the spawn statement (test_retry_factor_*)."""
    factor = strategy.get("factor") if isinstance(strategy, Mapping) else None
    if isinstance(factor, float):
        return not math.isfinite(factor)
    return isinstance(factor, int) and abs(factor) >= 10 ** sys.get_int_max_str_digits()


def policy_issue(policy: object) -> bool:
    """timedelta values (test_timedelta_in_a_policy), unknown keys that do not
    sort (test_unknown_policy_keys_of_mixed_types), ints too big for a float
    (test_seconds_too_big_for_a_float)."""
    if not isinstance(policy, Mapping):
        return False
    unknown = set(policy) - RETRY_KEYS - {"max_delay", "max_duration"}
    try:
        sorted(unknown)
    except TypeError:
        return True
    return any(isinstance(v, timedelta) or huge_int(v) for v in policy.values())


def run_after_issue(value: object) -> bool:
    """Offsets PostgreSQL cannot parse (test_run_after_with_an_offset_postgres_refuses)
    and ints too big for a float (test_seconds_too_big_for_a_float)."""
    if isinstance(value, datetime) and value.utcoffset() is not None:
        offset = value.utcoffset()
        assert offset is not None
        return abs(offset) >= timedelta(hours=16) or offset.microseconds != 0
    return huge_int(value)


def known_issues(kwargs: Mapping[str, Any], *, in_task: bool = False) -> bool:
    """Spawn arguments that hit a known defect (``in_task``: of ``ctx.spawn``,
    which cannot take headers that are not a mapping:
    test_ctx_spawn_with_headers_that_are_not_a_mapping)."""
    if INCLUDE_KNOWN_ISSUES:
        return False
    headers = kwargs.get("headers")
    return (
        bad_factor(kwargs.get("retry_strategy"))
        or policy_issue(kwargs.get("retry_strategy"))
        or policy_issue(kwargs.get("cancellation"))
        or run_after_issue(kwargs.get("run_after"))
        or not isinstance(kwargs.get("task_name"), str | int | float | bytes | None)
        or (in_task and headers is not None and not isinstance(headers, Mapping))
    )


# -- strategies ----------------------------------------------------------------------

HOSTILE_TEXT = [
    "",
    " ",
    "\t\n",
    "\u3000",
    "\u200b",
    "\ufeff",
    "\u202e",
    "x\x00y",
    "\x00",
    "\ud800",
    "a\udfff",
    "\ud83d\ude00",  # a surrogate pair as two lone code points
    "\U0001f600",
    "e\u0301",
    "'; DROP TABLE absurd.tasks; --",
    '" OR 1=1 --',
    "$1",
    "%s",
    "%(x)s",
    ":name",
    "\\",
    "\\u0000",  # backslash-u-0000: six ordinary characters, storable
    "\\\\u0000",
    "NULL",
    "default",
    "$await:resume",
    "resume",
    "absurd.default",
    "a" * 255,
    "a" * 256,
    "\xe9" * 255,
    "\U0001f600" * 255,
    "\U0001f600" * 256,
]
ALL_CHARS = st.characters(exclude_categories=())  # NUL and lone surrogates included
CLEAN_CHARS = st.characters(codec="utf-8", exclude_characters="\x00")

clean_text = st.text(CLEAN_CHARS, max_size=20)
clean_names = st.text(CLEAN_CHARS, min_size=1, max_size=30) | st.sampled_from(
    [n for n in HOSTILE_TEXT if name_ok(n)]
)
hostile_text = st.one_of(
    st.sampled_from(HOSTILE_TEXT),
    st.text(ALL_CHARS, max_size=20),
    st.text(ALL_CHARS, min_size=250, max_size=260),
)
non_str = st.one_of(st.none(), st.integers(), st.floats(), st.binary(max_size=4))
hostile_keys = hostile_text | non_str  # hashable: for dict keys
hostile_names = hostile_keys
if INCLUDE_KNOWN_ISSUES:  # unhashable: KNOWN_DEFECTS["unhashable_task_name"]
    hostile_names = hostile_names | st.lists(st.integers(), max_size=2)
queue_names = st.one_of(
    st.sampled_from([*QUEUES, "missing", "Q.1-x_", "a" * 56, "a" * 57, "-a", ".a", "a b", "a\n"]),
    st.from_regex(QUEUE_NAME, fullmatch=True),
    hostile_names,
)

if INCLUDE_KNOWN_ISSUES:
    json_floats = st.floats()
else:  # test_big_floats_come_back_as_ints
    json_floats = st.floats(min_value=-1e16, max_value=1e16, exclude_min=True, exclude_max=True)
any_floats = json_floats | st.sampled_from([math.nan, math.inf, -math.inf, -0.0])
json_ints = st.one_of(
    st.integers(),
    st.integers(min_value=2**63 - 2, max_value=2**64 + 2),
    st.just(-(2**63)),
    st.builds(lambda: 9 * 10**4299),  # 4300 digits: the most json.dumps prints
)
too_big_ints = st.builds(lambda: 10**4300)


def mostly(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> Any:
    """``good`` two times in three."""
    return st.one_of(good, good, bad)


def json_values(leaf_text: st.SearchStrategy[str], *, hostile: bool) -> st.SearchStrategy[Any]:
    leaves = st.one_of(st.none(), st.booleans(), json_ints, any_floats if hostile else json_floats)
    if hostile:
        leaves = leaves | too_big_ints
    leaves = leaves | leaf_text
    keys: st.SearchStrategy[Any] = leaf_text
    if hostile:
        not_json = st.one_of(
            st.binary(max_size=3),
            st.sets(st.integers(), max_size=2),
            st.frozensets(st.integers(), max_size=2),
            st.datetimes(),
            st.dates(),
            st.decimals(allow_nan=False),
            st.complex_numbers(max_magnitude=10),
            st.uuids(),
            st.just(object()),
        )
        leaves = leaves | not_json
        keys = keys | st.integers() | st.booleans() | st.none() | st.floats()
    return st.recursive(
        leaves,
        lambda kids: st.one_of(
            st.lists(kids, max_size=4),
            st.tuples(kids, kids),
            st.dictionaries(keys, kids, max_size=4),
        ),
        max_leaves=12,
    )


def nested(depth: int, leaf: Any) -> Any:
    for _ in range(depth):
        leaf = [leaf] if depth % 2 else {"k": leaf}
    return leaf


clean_json = json_values(clean_text, hostile=False)
# Nesting: shallow, or far past the recursion limit (always refused). Depths near
# the limit are test_nesting_near_the_recursion_limit.
deep_json = st.builds(
    nested,
    st.integers(0, 300) | st.integers(3 * sys.getrecursionlimit(), 4 * sys.getrecursionlimit()),
    clean_json,
)
any_json = st.one_of(clean_json, json_values(hostile_text, hostile=True), deep_json)

any_numbers = st.one_of(
    st.integers(min_value=-(10**300), max_value=10**300),
    any_floats,
    st.floats(),
    st.sampled_from([0, -1, MAX_SECONDS, MAX_SECONDS + 1, True, "60", None]),
)
if INCLUDE_KNOWN_ISSUES:
    any_numbers = any_numbers | st.integers()
good_seconds = st.one_of(
    st.floats(min_value=0, max_value=MAX_SECONDS),
    st.integers(min_value=0, max_value=MAX_SECONDS),
)
aware_timezones = st.builds(
    timezone,
    st.timedeltas(
        min_value=timedelta(hours=-15, minutes=-59), max_value=timedelta(hours=15, minutes=59)
    ).map(lambda d: timedelta(seconds=int(d.total_seconds()))),
)
if INCLUDE_KNOWN_ISSUES:
    aware_timezones = st.timezones() | st.builds(
        timezone, st.timedeltas(min_value=-timedelta(hours=23), max_value=timedelta(hours=23))
    )
aware_datetimes = st.datetimes(timezones=aware_timezones)

good_retry = st.none() | st.fixed_dictionaries(
    {"kind": st.sampled_from(["fixed", "exponential", "none"])},
    optional={
        "base_seconds": good_seconds,
        "factor": st.floats(min_value=1, max_value=1e6) | st.integers(1, 10),
        "max_seconds": good_seconds,
    },
)
policy_values = any_numbers | hostile_text
if INCLUDE_KNOWN_ISSUES:
    policy_values = policy_values | st.timedeltas()
any_retry = st.one_of(
    st.dictionaries(
        st.sampled_from(["kind", "base_seconds", "factor", "max_seconds", "extra"]) | hostile_keys,
        st.sampled_from(["fixed", "exponential", "none", "linear"]) | policy_values,
        max_size=4,
    ),
    st.sampled_from([[], "fixed", 1]),
)
good_cancellation = st.none() | st.fixed_dictionaries(
    {},
    optional={
        "max_delay": st.floats(min_value=1e-3, max_value=MAX_SECONDS),
        "max_duration": st.integers(1, MAX_SECONDS),
    },
)
any_cancellation = st.one_of(
    st.dictionaries(
        st.sampled_from(["max_delay", "max_duration", "other"]) | hostile_keys,
        policy_values,
        max_size=3,
    ),
    st.sampled_from([[], "1", 1]),
)

GOOD_SPAWN: dict[str, st.SearchStrategy[Any]] = {
    "task_name": clean_names,
    "params": clean_json,
    "headers": st.none() | st.dictionaries(clean_text, clean_json, max_size=3),
    "idempotency_key": st.none() | clean_names,
    "queue": st.sampled_from([None, *QUEUES]),
    "max_attempts": st.none() | st.integers(1, MAX_INT),
    "retry_strategy": good_retry,
    "cancellation": good_cancellation,
    "run_after": st.one_of(
        st.none(),
        good_seconds,
        st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=36500)),
        aware_datetimes,
    ),
}
HOSTILE_SPAWN: dict[str, st.SearchStrategy[Any]] = {
    "task_name": hostile_names,
    "params": any_json,
    "headers": st.dictionaries(hostile_text | st.integers(), any_json, max_size=3) | any_json,
    "idempotency_key": hostile_names,
    "queue": queue_names,
    "max_attempts": any_numbers | st.integers(),
    "retry_strategy": any_retry,
    "cancellation": any_cancellation,
    "run_after": st.one_of(
        any_numbers,
        st.timedeltas(),
        st.datetimes(),  # naive
        aware_datetimes,
        st.dates(),
    ),
}


@st.composite
def spawn_kwargs(draw: st.DrawFn, names: tuple[str, ...] = tuple(GOOD_SPAWN)) -> dict[str, Any]:
    """Good arguments, with up to two of them replaced by hostile ones (which may
    happen to be good too: the model decides)."""
    kwargs = {name: draw(GOOD_SPAWN[name]) for name in names}
    for name in draw(st.lists(st.sampled_from(names), max_size=2, unique=True)):
        kwargs[name] = draw(HOSTILE_SPAWN[name])
    return kwargs


def without_known_issues(
    strategy: st.SearchStrategy[dict[str, Any]], *, in_task: bool = False
) -> st.SearchStrategy[dict[str, Any]]:
    return strategy.filter(lambda kwargs: not known_issues(kwargs, in_task=in_task))


# -- round trips ---------------------------------------------------------------------


def epoch(when: datetime) -> Decimal:
    delta = when - EPOCH
    seconds = delta.days * 86400 + delta.seconds
    return Decimal(seconds) + Decimal(delta.microseconds) / 1_000_000


TASK_ROW = text(
    "SELECT t.*, extract(epoch FROM t.enqueued_at) AS enqueued,"
    " extract(epoch FROM r.available_at) AS available"
    " FROM absurd.tasks t JOIN absurd.runs r ON r.run_id = t.last_run_id"
    " WHERE t.task_id = :task"
)


def assert_spawned(
    db: Db, result: SpawnResult, kwargs: Mapping[str, Any], *, claimed: bool = False
) -> None:
    """The task row holds exactly what ``spawn(**kwargs)`` passed (``claimed``: a
    worker may have run it since, or deferred it as a task it has no handler for)."""
    with db.engine.connect() as conn:
        row = conn.execute(TASK_ROW, {"task": result.task_id}).one()
    assert row.task_name == kwargs["task_name"]
    assert_round_trip(kwargs.get("params"), row.params)
    headers = kwargs.get("headers")
    assert_round_trip(None if headers is None else dict(headers), row.headers)
    assert row.idempotency_key == kwargs.get("idempotency_key")
    assert row.queue_name == (kwargs.get("queue") or "default")
    max_attempts = kwargs.get("max_attempts")
    assert row.max_attempts == (DEFAULT_MAX_ATTEMPTS if max_attempts is None else max_attempts)
    retry = kwargs.get("retry_strategy")
    assert_round_trip(None if retry is None else dict(retry), row.retry_strategy)
    cancellation = {k: v for k, v in (kwargs.get("cancellation") or {}).items() if v is not None}
    assert_round_trip(cancellation or None, row.cancellation)
    if claimed:
        return
    run_after = kwargs.get("run_after")
    if isinstance(run_after, datetime):
        assert row.available == epoch(run_after)
    else:
        due = epoch(NOW) + Decimal(seconds_of(run_after or 0))
        assert abs(row.available - due) <= Decimal("0.000002"), (row.available, due)
    assert row.enqueued == max(row.available, epoch(NOW))
    assert (row.state, row.attempts, row.last_run_id) == ("pending", 1, result.run_id)


# -- Absurd.spawn --------------------------------------------------------------------


@settings(PROPERTY, max_examples=70)
@given(kwargs=without_known_issues(spawn_kwargs()))
def test_spawn(db: Db, kwargs: dict[str, Any]) -> None:
    db.reset()
    app = db.app()
    expected = spawn_refusal(kwargs)
    outcome = in_transaction(
        db, app, lambda s: app.spawn(**kwargs, session=s), (InvalidArgument, QueueNotFound)
    )
    if expected is not None:
        assert isinstance(outcome, Refused), f"accepted, but the docs refuse it: {kwargs!r:.500}"
        assert isinstance(outcome.error, expected), outcome.error
        return
    assert isinstance(outcome, SpawnResult), f"refused a documented-good call: {outcome!r}"
    assert outcome.created and outcome.attempt == 1
    assert_spawned(db, outcome, kwargs)
    snapshot = app.fetch_task_result(outcome.task_id)
    assert snapshot is not None and snapshot.state == "pending"
    if kwargs.get("idempotency_key") is not None:
        again = app.spawn(**kwargs)
        assert (again.task_id, again.created) == (outcome.task_id, False)
        assert counts(db.engine)[1] == 1


# -- Absurd.spawn_many ---------------------------------------------------------------


@st.composite
def spawn_many_requests(draw: st.DrawFn) -> list[Any]:
    """Up to four requests, some sharing an idempotency key, now and then an item
    that is not a SpawnRequest."""
    requests: list[Any] = []
    for _ in range(draw(st.integers(0, 4))):
        if draw(st.integers(0, 9)) == 0:
            requests.append(draw(st.sampled_from([None, {"task_name": "t"}, "t"])))
            continue
        kwargs = draw(without_known_issues(spawn_kwargs()))
        if draw(st.booleans()):
            kwargs["idempotency_key"] = draw(st.sampled_from(["k1", "k2"]))
        requests.append(SpawnRequest(**kwargs))
    return requests


@settings(PROPERTY, max_examples=40)
@given(requests=spawn_many_requests())
def test_spawn_many(db: Db, requests: list[Any]) -> None:
    db.reset()
    app = db.app()
    expected: list[type[BaseException]] = []
    for request in requests:
        if not isinstance(request, SpawnRequest):
            expected.append(InvalidArgument)
            continue
        refusal = spawn_refusal({f: getattr(request, f) for f in GOOD_SPAWN})
        if refusal is not None:
            expected.append(refusal)
    outcome = in_transaction(
        db,
        app,
        lambda s: app.spawn_many(requests, session=s),
        (InvalidArgument, QueueNotFound),
    )
    if expected:
        # Every request is validated before anything runs: any invalid one wins.
        assert isinstance(outcome, Refused), f"accepted {requests!r:.500}"
        want = InvalidArgument if InvalidArgument in expected else QueueNotFound
        assert isinstance(outcome.error, want), outcome.error
        return
    assert isinstance(outcome, list) and len(outcome) == len(requests)
    first: dict[tuple[str, str], SpawnResult] = {}
    for request, result in zip(requests, outcome, strict=True):
        queue, key = request.queue or "default", request.idempotency_key
        if key is not None and (queue, key) in first:
            assert (result.task_id, result.created) == (first[queue, key].task_id, False)
            continue
        if key is not None:
            first[queue, key] = result
        assert result.created
        assert_spawned(db, result, {f: getattr(request, f) for f in GOOD_SPAWN})
    distinct = len({r.task_id for r in outcome})
    assert counts(db.engine)[1:3] == (distinct, distinct)


# -- Absurd.emit_event ---------------------------------------------------------------


@settings(PROPERTY, max_examples=50)
@given(
    event_name=mostly(clean_names, hostile_names),
    payload=mostly(clean_json, any_json),
    queue_name=mostly(st.sampled_from([None, *QUEUES]), queue_names),
)
def test_emit_event(db: Db, event_name: Any, payload: Any, queue_name: Any) -> None:
    db.reset()
    app = db.app()
    outcome = in_transaction(
        db,
        app,
        lambda s: app.emit_event(event_name, payload, session=s, queue_name=queue_name),
        (InvalidArgument, QueueNotFound),
    )
    if not (name_ok(event_name) and json_ok(payload)) or not (
        queue_name is None or queue_ok(queue_name)
    ):
        assert isinstance(outcome, Refused) and isinstance(outcome.error, InvalidArgument)
        return
    if (queue_name or "default") not in QUEUES:
        assert isinstance(outcome, Refused) and isinstance(outcome.error, QueueNotFound)
        return
    assert outcome is True
    assert app.emit_event(event_name, "second", queue_name=queue_name) is False  # first one wins
    with db.engine.connect() as conn:
        row = conn.execute(select(events).where(events.c.event_name == event_name)).one()
    assert row.queue_name == (queue_name or "default")
    assert_round_trip(payload, row.payload)


# -- create_queue / drop_queue -------------------------------------------------------


@settings(PROPERTY, max_examples=40)
@given(name=mostly(st.from_regex(QUEUE_NAME, fullmatch=True), queue_names), params=clean_json)
def test_create_and_drop_queue(db: Db, name: Any, params: Any) -> None:
    db.reset()
    app = db.app()
    created = in_transaction(db, app, lambda s: app.create_queue(name, session=s), InvalidArgument)
    queue = "default" if name is None else name  # the client's queue
    if not queue_ok(queue):
        assert isinstance(created, Refused) and isinstance(created.error, InvalidQueueName)
        dropped = in_transaction(
            db, app, lambda s: app.drop_queue(name, session=s), InvalidArgument
        )
        assert isinstance(dropped, Refused) and isinstance(dropped.error, InvalidQueueName)
        return
    assert created is None
    app.create_queue(name)  # idempotent
    assert app.list_queues() == sorted({*QUEUES, queue})
    spawned = app.spawn("t", params, queue=name)
    assert_spawned(db, spawned, {"task_name": "t", "params": params, "queue": queue})
    assert in_transaction(db, app, lambda s: app.drop_queue(name, session=s), ()) is None
    assert app.list_queues() == sorted(set(QUEUES) - {queue})
    assert app.fetch_task_result(spawned.task_id) is None  # dropped with its queue


# -- cancel_task / retry_task / fetch_task_result -------------------------------------


def spelled(task_id: uuid.UUID, how: str) -> Any:
    return {
        "uuid": task_id,
        "str": str(task_id),
        "upper": str(task_id).upper(),
        "hex": task_id.hex,
        "braces": f"{{{task_id}}}",
        "urn": task_id.urn,
        "short": str(task_id)[:-1],
        "long": f"{task_id}0",
    }[how]


@settings(PROPERTY, max_examples=40)
@given(
    op=st.sampled_from(["cancel", "retry", "retry-new", "fetch"]),
    target=st.sampled_from(["pending", "failed", "unknown"]),
    spelling=st.sampled_from(["uuid", "str", "upper", "hex", "braces", "urn", "short", "long"]),
    junk_id=mostly(st.none(), hostile_names),
    queue_name=mostly(st.sampled_from([None, None, *QUEUES, "missing"]), queue_names),
    max_attempts=mostly(st.none() | st.integers(1, 10), any_numbers),
)
def test_task_id_methods(
    db: Db,
    op: str,
    target: str,
    spelling: str,
    junk_id: Any,
    queue_name: Any,
    max_attempts: Any,
) -> None:
    db.reset()
    app = db.app()

    @app.register_task("fails", max_attempts=1)
    def fails(params: Any, ctx: TaskContext) -> None:
        raise RuntimeError("boom")

    pending = app.spawn("pending-task", {"p": 1})
    failed = app.spawn("fails", {"f": [1, 2]}, queue="other")
    run_until_idle(app, queue="other")
    ids = {"pending": pending.task_id, "failed": failed.task_id, "unknown": uuid.uuid4()}
    task_id = spelled(ids[target], spelling) if junk_id is None else junk_id
    calls: dict[str, Callable[[Session], Any]] = {
        "cancel": lambda s: app.cancel_task(task_id, session=s, queue_name=queue_name),
        "retry": lambda s: app.retry_task(
            task_id, max_attempts=max_attempts, queue_name=queue_name, session=s
        ),
        "retry-new": lambda s: app.retry_task(
            task_id, max_attempts=max_attempts, spawn_new=True, queue_name=queue_name, session=s
        ),
        "fetch": lambda s: app.fetch_task_result(task_id, queue_name=queue_name),
    }
    outcome = in_transaction(
        db,
        app,
        calls[op],
        (InvalidArgument, TaskNotFound, TaskStateError),
    )

    # The model.
    try:
        parsed = task_id if isinstance(task_id, uuid.UUID) else uuid.UUID(task_id)
    except (TypeError, ValueError, AttributeError):
        parsed = None
    if (
        parsed is None
        or not (queue_name is None or queue_ok(queue_name))
        or (op.startswith("retry") and not max_attempts_ok(max_attempts))
    ):
        assert isinstance(outcome, Refused) and isinstance(outcome.error, InvalidArgument)
        assert not isinstance(outcome.error, QueueMismatch)
        return
    real_queue = {pending.task_id: "default", failed.task_id: "other"}.get(parsed)
    if real_queue is None:
        if op == "fetch":
            assert outcome is None
        else:
            assert isinstance(outcome, Refused) and isinstance(outcome.error, TaskNotFound)
        return
    if queue_name is not None and queue_name != real_queue:
        assert isinstance(outcome, Refused) and isinstance(outcome.error, QueueMismatch)
        assert outcome.error.queue == real_queue
        return
    state = "pending" if parsed == pending.task_id else "failed"
    if op == "fetch":
        assert outcome is not None and outcome.state == state
        if state == "failed":
            assert outcome.failure is not None and outcome.failure["message"] == "boom"
    elif op == "cancel":
        assert outcome is (state == "pending")
        snapshot = app.fetch_task_result(parsed)
        assert snapshot is not None and snapshot.state == ("cancelled" if outcome else state)
    elif state != "failed":
        assert isinstance(outcome, Refused) and isinstance(outcome.error, TaskStateError)
        assert outcome.error.state == state
    elif op == "retry":
        assert isinstance(outcome, SpawnResult)
        assert (outcome.task_id, outcome.attempt, outcome.created) == (parsed, 2, False)
        with db.engine.connect() as conn:
            row = conn.execute(select(tasks).where(tasks.c.task_id == parsed)).one()
        assert (row.state, row.last_run_id) == ("pending", outcome.run_id)
        assert row.max_attempts == (1 if max_attempts is None else max_attempts)
    else:
        assert isinstance(outcome, SpawnResult) and outcome.created
        assert outcome.task_id != parsed
        kwargs = {"task_name": "fails", "params": {"f": [1, 2]}, "queue": "other"}
        assert_spawned(db, outcome, {**kwargs, "max_attempts": max_attempts or 1})


# -- register_task -------------------------------------------------------------------


@settings(PROPERTY, max_examples=40)
@given(
    kwargs=without_known_issues(
        spawn_kwargs(("task_name", "queue", "max_attempts", "retry_strategy", "cancellation"))
    ),
    original_spelling=st.booleans(),
    both_spellings=st.booleans(),
)
def test_register_task(
    db: Db, kwargs: dict[str, Any], original_spelling: bool, both_spellings: bool
) -> None:
    db.reset()
    app = db.app()
    name = kwargs.pop("task_name")
    options = dict(kwargs)
    if original_spelling:  # the original SDK's names for two of the options
        options["default_max_attempts"] = options.pop("max_attempts")
        options["default_cancellation"] = options.pop("cancellation")
        if both_spellings:
            options["max_attempts"] = 3
    valid = (
        name_ok(name)
        and (kwargs["queue"] is None or queue_ok(kwargs["queue"]))
        and max_attempts_ok(kwargs["max_attempts"])
        and retry_ok(kwargs["retry_strategy"])
        and cancellation_ok(kwargs["cancellation"])
        and not (original_spelling and both_spellings and kwargs["max_attempts"] is not None)
    )

    def handler(params: Any, ctx: TaskContext) -> None:
        return None

    try:
        app.register_task(name, **options)(handler)
    except InvalidArgument as exc:
        assert not valid, f"refused a documented-good registration: {exc!r}"
        assert not isinstance(exc, TaskAlreadyRegistered)
        if name_ok(name):  # the refusal left nothing behind
            app.register_task(name)(handler)
        return
    assert valid, f"accepted, but the docs refuse it: {name!r:.80} {options!r:.300}"
    with pytest.raises(TaskAlreadyRegistered):
        app.register_task(name)(handler)
    if original_spelling and both_spellings:
        kwargs["max_attempts"] = 3
    outcome = in_transaction(
        db, app, lambda s: app.spawn(name, {"x": 1}, session=s), (InvalidArgument, QueueNotFound)
    )
    if (kwargs["queue"] or "default") not in QUEUES:
        assert isinstance(outcome, Refused) and isinstance(outcome.error, QueueNotFound)
        return
    assert isinstance(outcome, SpawnResult)  # spawned with the task's defaults
    assert_spawned(db, outcome, {**kwargs, "task_name": name, "params": {"x": 1}})


# -- TaskContext ---------------------------------------------------------------------


@dataclass
class Probe:
    """Runs ``call(ctx)`` inside a task, records what it gave on each execution,
    then checkpoints a known-good step and waits for the event "resume"."""

    db: Db
    app: Absurd
    call: Callable[[TaskContext], Any]
    documented: Any = InvalidArgument
    returns_value: bool = True  # the task's result is the call's value (else None)

    def __post_init__(self) -> None:
        self.outcomes: list[Any] = []
        self.top: uuid.UUID | None = None
        self.app.register_task("probe", max_attempts=1)(self.handler)

    def handler(self, params: Any, ctx: TaskContext) -> Any:
        if ctx.task_id != self.top:
            return "child"  # a task the probe spawned, named "probe"
        before, sent = counts(self.db.engine), self.db.statements.count
        try:
            value = self.call(ctx)
        except self.documented as exc:
            if isinstance(exc, InvalidArgument):
                assert self.db.statements.count == sent, f"{exc!r} after a statement"
            if not isinstance(exc, TimeoutError):  # a timeout is checkpointed
                assert counts(self.db.engine) == before, f"{exc!r} after a write"
            self.outcomes.append(Refused(exc))
            value = None
        else:
            self.outcomes.append(value)
        ctx.step("after", lambda: "good")
        ctx.await_event("resume")
        return value if self.returns_value else None

    def run(self, between: Callable[[], Any] = lambda: None) -> Any:
        self.top = self.app.spawn("probe", {}).task_id
        run_until_idle(self.app)
        between()
        self.app.emit_event("resume")
        run_until_idle(self.app)
        snapshot = self.app.fetch_task_result(self.top)
        assert snapshot is not None
        assert snapshot.state == "completed", snapshot.failure and snapshot.failure["traceback"]
        return snapshot.result

    def checkpoint(self, name: str) -> Any:
        with self.db.engine.connect() as conn:
            return conn.scalar(
                select(checkpoints.c.state).where(
                    checkpoints.c.task_id == self.top, checkpoints.c.checkpoint_name == name
                )
            )


@settings(PROPERTY, max_examples=25)
@given(name=clean_names | hostile_names, value=clean_json | any_json)
def test_ctx_step(db: Db, name: Any, value: Any) -> None:
    db.reset()
    calls: list[Any] = []

    def fn() -> Any:
        calls.append(value)
        return value

    probe = Probe(db, db.app(), lambda ctx: ctx.step(name, fn))
    result = probe.run()
    if not (name_ok(name) and json_ok(value)):
        assert [type(o) for o in probe.outcomes] == [Refused, Refused]
        assert all(isinstance(o.error, InvalidArgument) for o in probe.outcomes)
        if not name_ok(name):
            assert calls == []  # refused before the step ran
        else:
            assert all(isinstance(o.error, NotSerializable) for o in probe.outcomes)
        assert result is None
        return
    first, replayed = probe.outcomes
    assert first is value  # the first execution returns the step's own value
    assert len(calls) == 1  # ... and the replay does not run it again
    assert_round_trip(value, replayed)
    assert_round_trip(value, probe.checkpoint(name))
    assert_round_trip(value, result)


@settings(PROPERTY, max_examples=15)
@given(name=clean_names | hostile_names, seconds=good_seconds | st.timedeltas() | any_numbers)
def test_ctx_sleep_for(db: Db, name: Any, seconds: Any) -> None:
    db.reset()
    probe = Probe(db, db.app(), lambda ctx: ctx.sleep_for(name, seconds))
    valid = name_ok(name) and seconds_ok(seconds)
    probe.run(between=lambda: db.clock.advance(seconds_of(seconds) + 1 if valid else 0))
    if not valid:
        assert [type(o) for o in probe.outcomes] == [Refused, Refused]
        assert all(isinstance(o.error, InvalidArgument) for o in probe.outcomes)
        return
    assert probe.outcomes[-1] is None
    wake_at = datetime.fromisoformat(probe.checkpoint(name))
    assert abs(epoch(wake_at) - epoch(NOW) - Decimal(seconds_of(seconds))) <= Decimal("0.000002")


@settings(PROPERTY, max_examples=25)
@given(
    event_name=clean_names | hostile_names,
    step_name=st.none() | clean_names | hostile_names,
    timeout=st.none() | good_seconds | any_numbers,
    payload=clean_json,
)
def test_ctx_await_event(
    db: Db, event_name: Any, step_name: Any, timeout: Any, payload: Any
) -> None:
    db.reset()
    app = db.app()
    probe = Probe(
        db,
        app,
        lambda ctx: ctx.await_event(event_name, step_name=step_name, timeout=timeout),
        (InvalidArgument, TimeoutError),
    )
    valid = (
        name_ok(event_name)
        and (step_name is None or name_ok(step_name))
        and (timeout is None or seconds_ok(timeout))
    )
    probe.run(between=lambda: valid and app.emit_event(event_name, payload))
    if not valid:
        assert [type(o) for o in probe.outcomes] == [Refused, Refused]
        assert all(isinstance(o.error, InvalidArgument) for o in probe.outcomes)
        return
    if isinstance(probe.outcomes[0], Refused):  # the clock is frozen: only a ~0 timeout
        assert isinstance(probe.outcomes[0].error, TimeoutError) and timeout < 1e-3
        return
    (received,) = probe.outcomes  # the first execution suspended
    assert_round_trip(payload, received)
    stored_as = probe.checkpoint(step_name if step_name is not None else f"$await:{event_name}")
    assert_round_trip({"payload": payload}, stored_as)


@settings(PROPERTY, max_examples=25)
@given(event_name=clean_names | hostile_names, payload=clean_json | any_json)
def test_ctx_emit_event(db: Db, event_name: Any, payload: Any) -> None:
    db.reset()
    probe = Probe(db, db.app(), lambda ctx: ctx.emit_event(event_name, payload))
    probe.run()
    if not (name_ok(event_name) and json_ok(payload)):
        assert [type(o) for o in probe.outcomes] == [Refused, Refused]
        assert all(isinstance(o.error, InvalidArgument) for o in probe.outcomes)
        return
    # Not a checkpoint: the replay emits again and loses. (Emitting "resume"
    # itself lets the task finish in its first execution.)
    assert probe.outcomes[0] is True and all(o is False for o in probe.outcomes[1:])
    assert len(probe.outcomes) == (1 if event_name == "resume" else 2)
    with db.engine.connect() as conn:
        row = conn.execute(select(events).where(events.c.event_name == event_name)).one()
    assert_round_trip(payload, row.payload)


@settings(PROPERTY, max_examples=25)
@given(
    kwargs=without_known_issues(
        spawn_kwargs(("task_name", "params", "headers", "queue", "max_attempts", "run_after")),
        in_task=True,
    ),
    step_name=st.none() | clean_names | hostile_names,
)
def test_ctx_spawn(db: Db, kwargs: dict[str, Any], step_name: Any) -> None:
    db.reset()
    app = db.app()
    name, params = kwargs.pop("task_name"), kwargs.pop("params")
    probe = Probe(
        db,
        app,
        lambda ctx: ctx.spawn(name, params, step_name=step_name, **kwargs),
        (InvalidArgument, QueueNotFound),
        returns_value=False,
    )
    probe.run()
    refusal = spawn_refusal({"task_name": name, "params": params, **kwargs})
    if refusal is None and not (step_name is None or name_ok(step_name)):
        refusal = InvalidArgument
    if refusal is not None:
        assert [type(o) for o in probe.outcomes] == [Refused, Refused]
        assert all(isinstance(o.error, refusal) for o in probe.outcomes)
        return
    first, replayed = probe.outcomes
    assert isinstance(first, SpawnResult) and first.created
    assert (replayed.task_id, replayed.created) == (first.task_id, False)
    assert probe.top is not None
    headers = {**(kwargs["headers"] or {}), "absurd.parent_task_id": str(probe.top)}
    with db.engine.connect() as conn:
        key = conn.scalar(select(tasks.c.idempotency_key).where(tasks.c.task_id == first.task_id))
    expected = {"task_name": name, "params": params, **kwargs, "headers": headers}
    assert_spawned(db, first, {**expected, "idempotency_key": key}, claimed=True)


# -- known defects: each xfail states the documented behaviour --------------------------


def nest_lists(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


def refused_or_stored(db: Db, call: Callable[[Absurd, Session], Any]) -> None:
    """The documented outcome of a questionable input: InvalidArgument with the
    transaction usable, or success."""
    db.reset()
    app = db.app()
    outcome = in_transaction(db, app, lambda s: call(app, s), InvalidArgument)
    assert outcome is not None


KNOWN_DEFECTS: dict[str, Callable[[Absurd, Session], Any]] = {
    # retry_strategy["factor"] NaN / inf passes the check; the spawn statement
    # then fails in PostgreSQL (DataError: Token "NaN" is invalid) and aborts
    # the caller's transaction.
    "retry_factor_nan": lambda app, s: app.spawn(
        "t", retry_strategy={"kind": "exponential", "factor": math.nan}, session=s
    ),
    "retry_factor_inf": lambda app, s: app.spawn(
        "t", retry_strategy={"kind": "exponential", "factor": math.inf}, session=s
    ),
    # ... and an int factor json.dumps cannot print raises a bare ValueError.
    "retry_factor_10**5000": lambda app, s: app.spawn(
        "t", retry_strategy={"kind": "exponential", "factor": 10**5000}, session=s
    ),
    # check_seconds accepts a timedelta; the policy keeps it and json.dumps
    # raises a bare TypeError.
    "timedelta_in_cancellation": lambda app, s: app.spawn(
        "t", cancellation={"max_delay": timedelta(seconds=5)}, session=s
    ),
    "timedelta_in_retry_strategy": lambda app, s: app.spawn(
        "t", retry_strategy={"kind": "fixed", "base_seconds": timedelta(seconds=5)}, session=s
    ),
    # Unknown keys are reported with sorted(), which raises TypeError for mixed types.
    "unknown_policy_keys_of_mixed_types": lambda app, s: app.spawn(
        "t", cancellation={None: 1, "a": 2}, session=s
    ),
    "unknown_retry_keys_of_mixed_types": lambda app, s: app.spawn(
        "t", retry_strategy={0: 0, "a": 0}, session=s
    ),
    # math.isfinite() of an int too big for a float raises OverflowError.
    "seconds_too_big_for_a_float": lambda app, s: app.spawn("t", run_after=10**400, session=s),
    # A run_after offset PostgreSQL cannot parse: DataError, transaction aborted.
    "run_after_offset_16h": lambda app, s: app.spawn(
        "t", run_after=datetime(2030, 1, 1, tzinfo=timezone(timedelta(hours=16))), session=s
    ),
    "run_after_offset_with_microseconds": lambda app, s: app.spawn(
        "t", run_after=datetime(2030, 1, 1, tzinfo=timezone(timedelta(microseconds=1))), session=s
    ),
    # The registry lookup comes before the name check: TypeError: unhashable type.
    "unhashable_task_name": lambda app, s: app.spawn(["t"], session=s),
}


@pytest.mark.xfail(strict=True, reason="known defect: see KNOWN_DEFECTS")
@pytest.mark.parametrize("what", sorted(KNOWN_DEFECTS))
def test_known_defect(db: Db, what: str) -> None:
    refused_or_stored(db, KNOWN_DEFECTS[what])


@pytest.mark.xfail(strict=True, raises=AssertionError, reason="jsonb prints numbers in full")
@pytest.mark.parametrize("number", [1e16, 1e23, 1e308, -1.5e300])
def test_big_floats_come_back_as_ints(db: Db, number: float) -> None:
    """json.dumps writes 1e+23; jsonb keeps the numeric 10^23 and prints it
    without an exponent, which json.loads reads as the int 10**23 (!= 1e23)."""
    db.reset()
    app = db.app()
    app.emit_event("e", number)
    with db.engine.connect() as conn:
        assert_round_trip(number, conn.scalar(select(events.c.payload)))


@pytest.mark.xfail(strict=True, reason="ctx.spawn raises TypeError: 'list' object is not a mapping")
def test_ctx_spawn_with_headers_that_are_not_a_mapping(db: Db) -> None:
    """``spawn`` refuses such headers with InvalidArgument; ``ctx.spawn`` merges
    them into a dict first and raises TypeError."""
    db.reset()
    app = db.app()
    raised: list[BaseException] = []

    @app.register_task("parent", max_attempts=1)
    def parent(params: Any, ctx: TaskContext) -> None:
        try:
            ctx.spawn("child", {}, headers=[1])
        except Exception as exc:
            raised.append(exc)

    app.spawn("parent")
    run_until_idle(app)
    assert len(raised) == 1 and isinstance(raised[0], InvalidArgument), raised


@pytest.mark.xfail(strict=True, raises=RecursionError, reason="depth checked at one stack depth")
def test_nesting_near_the_recursion_limit(db: Db) -> None:
    """encode_json refuses what json.dumps cannot encode at the caller's stack
    depth; the spawn statement's parameters then encode the value again two
    levels deeper, and the worker decodes it deeper still. Just below the limit,
    spawn raises RecursionError, or the claim does (and the run stays claimed)."""
    db.reset()
    app = db.app()
    app.register_task("echo")(lambda params, ctx: params)
    accepted = {}
    for depth in range(sys.getrecursionlimit() + 10, sys.getrecursionlimit() - 200, -1):
        try:
            accepted[depth] = app.spawn("echo", nest_lists(depth)).task_id
        except NotSerializable:
            continue
    run_until_idle(app)
    for depth, task_id in accepted.items():
        snapshot = app.fetch_task_result(task_id)
        assert snapshot is not None and snapshot.state == "completed"
        assert snapshot.result == nest_lists(depth)
