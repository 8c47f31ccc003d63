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
Python, so accepted). A float of magnitude 1e16 or more comes back as an
int, the float's shortest decimal spelling written out (``jsonb`` stores
numbers as ``numeric`` and prints them without an exponent; documented in
docs/reference.md). A ``timedelta`` in a policy is stored as float seconds.

The defects these tests found are fixed; the inputs that found them are
generated like any other, and kept as plain examples at the end.
"""

from __future__ import annotations

import math
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
from hypothesis import HealthCheck, example, given, settings
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

MAX_INT = 2**31 - 1
MAX_SECONDS = 100 * 365 * 86400
MAX_JSON_DEPTH = 512  # levels of lists and dicts (docs/reference.md, "Errors")
MAX_RETRY_FACTOR = 1e6
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


def note(event: str) -> None:
    """A hypothesis event (statistics), when called from a property."""
    if hypothesis.currently_in_test_context():
        hypothesis.event(event)


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
                note(f"refused: {type(exc).__name__}")
            else:
                note("accepted")
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
    surrogates, lists and dicts nested at most MAX_JSON_DEPTH levels."""
    stack = [(value, 1)]  # (item, how many levels deep a list or dict here is)
    while stack:
        item, depth = stack.pop()
        if isinstance(item, list | tuple | dict) and depth > MAX_JSON_DEPTH:
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


def same(expected: Any, actual: Any) -> bool:
    """``actual`` is what JSON storage gives back for ``expected``: equal, and of
    the same JSON type (``True`` is not ``1``, ``1`` is not ``1.0``); tuples
    come back as lists, floats of magnitude 1e16 or more as ints. Walked
    without recursion: values nest up to MAX_JSON_DEPTH levels."""
    stack = [(expected, actual)]
    while stack:
        want, got = stack.pop()
        if isinstance(want, dict):
            if type(got) is not dict or want.keys() != got.keys():
                return False
            stack.extend((want[key], got[key]) for key in want)
        elif isinstance(want, list | tuple):
            if type(got) is not list or len(want) != len(got):
                return False
            stack.extend(zip(want, got, strict=True))
        elif type(want) is float and abs(want) >= 1e16:
            # jsonb prints numeric without an exponent: 1e23 comes back as
            # 10**23, an int that converts back to the same float.
            if type(got) is not int or float(got) != want:
                return False
        elif type(want) is not type(got) or want != got:
            return False
    return True


def assert_round_trip(expected: Any, actual: Any) -> None:
    assert same(expected, actual), f"stored {expected!r:.300}, read back {actual!r:.300}"


def seconds_ok(value: object, *, positive: bool = False) -> bool:
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    if isinstance(value, float) and not math.isfinite(value):
        return False
    low_ok = value > 0 if positive else value >= 0
    return low_ok and value <= MAX_SECONDS


def seconds_of(value: float | timedelta) -> float:
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


def as_stored(policy: Mapping[str, Any]) -> dict[str, Any]:
    """A policy as stored: timedeltas as float seconds, other values as given."""
    return {k: v.total_seconds() if isinstance(v, timedelta) else v for k, v in policy.items()}


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
    if isinstance(factor, bool) or not isinstance(factor, int | float):
        return False
    return 1 <= factor <= MAX_RETRY_FACTOR  # False for NaN


def cancellation_ok(policy: object) -> bool:
    if policy is None:
        return True
    if not isinstance(policy, Mapping) or set(policy) - {"max_delay", "max_duration"}:
        return False
    return all(v is None or seconds_ok(v, positive=True) for v in policy.values())


def run_after_ok(value: object) -> bool:
    """An aware datetime that exists in UTC (it is stored as UTC), or seconds."""
    if isinstance(value, datetime):
        if value.utcoffset() is None:
            return False
        try:
            value.astimezone(UTC)
        except OverflowError:
            return False
        return True
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
hostile_names = hostile_keys | st.lists(st.integers(), max_size=2)  # unhashable too
queue_names = st.one_of(
    st.sampled_from([*QUEUES, "missing", "Q.1-x_", "a" * 56, "a" * 57, "-a", ".a", "a b", "a\n"]),
    st.from_regex(QUEUE_NAME, fullmatch=True),
    hostile_names,
)

json_floats = st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from(
    [1e16, -1e16, 1e23, 9007199254740993.0, 1.7976931348623157e308]
)
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
# Nesting: shallow, around the documented maximum, just under the recursion
# limit (where json.dumps still succeeds), or far past it.
deep_json = st.builds(
    nested,
    st.integers(0, 300)
    | st.integers(MAX_JSON_DEPTH - 12, MAX_JSON_DEPTH + 2)
    | st.integers(sys.getrecursionlimit() - 40, sys.getrecursionlimit() + 5)
    | st.integers(3 * sys.getrecursionlimit(), 4 * sys.getrecursionlimit()),
    clean_json,
)
any_json = st.one_of(clean_json, json_values(hostile_text, hostile=True), deep_json)

any_numbers = st.one_of(
    st.integers(min_value=-(10**300), max_value=10**300),
    st.integers(),
    any_floats,
    st.floats(),
    st.sampled_from([0, -1, MAX_SECONDS, MAX_SECONDS + 1, True, "60", None]),
    st.sampled_from([10**400, -(10**400), 2**1024, 10**4300]),  # no float is this big
)
good_seconds = st.one_of(
    st.floats(min_value=0, max_value=MAX_SECONDS),
    st.integers(min_value=0, max_value=MAX_SECONDS),
)
# Every offset Python allows, including those PostgreSQL would not parse (16 h
# or more, or with microseconds): run_after is stored as the instant in UTC.
aware_timezones = st.timezones() | st.builds(
    timezone,
    st.timedeltas(
        min_value=-timedelta(hours=23, minutes=59, seconds=59, microseconds=999999),
        max_value=timedelta(hours=23, minutes=59, seconds=59, microseconds=999999),
    ),
)
aware_datetimes = st.datetimes(timezones=aware_timezones)

good_retry = st.none() | st.fixed_dictionaries(
    {"kind": st.sampled_from(["fixed", "exponential", "none"])},
    optional={
        "base_seconds": good_seconds,
        "factor": st.floats(min_value=1, max_value=MAX_RETRY_FACTOR) | st.integers(1, 10**6),
        "max_seconds": good_seconds,
    },
)
policy_values = any_numbers | hostile_text | st.timedeltas()
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
    assert_round_trip(None if retry is None else as_stored(retry), row.retry_strategy)
    cancellation = {k: v for k, v in (kwargs.get("cancellation") or {}).items() if v is not None}
    assert_round_trip(as_stored(cancellation) or None, row.cancellation)
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
@given(kwargs=spawn_kwargs())
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
        kwargs = draw(spawn_kwargs())
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
    kwargs=spawn_kwargs(("task_name", "queue", "max_attempts", "retry_strategy", "cancellation")),
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
    kwargs=spawn_kwargs(("task_name", "params", "headers", "queue", "max_attempts", "run_after")),
    step_name=st.none() | clean_names | hostile_names,
)
@example(  # two problems at once: a bad step name and a missing queue
    kwargs={
        "task_name": "0",
        "params": None,
        "headers": None,
        "queue": "missing",
        "max_attempts": None,
        "run_after": None,
    },
    step_name="",
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
    # With several problems (a bad step name and a missing queue, say) either
    # refusal is right: each is raised before anything is written.
    refusals: tuple[type[BaseException], ...] = ()
    refusal = spawn_refusal({"task_name": name, "params": params, **kwargs})
    if refusal is not None:
        refusals += (refusal,)
    if not (step_name is None or name_ok(step_name)):
        refusals += (InvalidArgument,)
    if refusals:
        assert [type(o) for o in probe.outcomes] == [Refused, Refused]
        assert all(isinstance(o.error, refusals) for o in probe.outcomes)
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


# -- the inputs that found defects, kept as plain examples --------------------------------


def nest_lists(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


def refused(db: Db, call: Callable[[Absurd, Session], Any]) -> BaseException:
    """``call`` raised InvalidArgument before any statement, leaving the
    transaction usable (``in_transaction`` checks both)."""
    db.reset()
    app = db.app()
    outcome = in_transaction(db, app, lambda s: call(app, s), InvalidArgument)
    assert isinstance(outcome, Refused), f"accepted: {outcome!r}"
    return outcome.error


def exponential(factor: Any) -> Callable[[Absurd, Session], Any]:
    return lambda app, s: app.spawn(
        "t", retry_strategy={"kind": "exponential", "factor": factor}, session=s
    )


MINUS_ONE_HOUR_AT_THE_START = datetime.min.replace(tzinfo=timezone(timedelta(hours=1)))

REFUSED: dict[str, tuple[Callable[[Absurd, Session], Any], str]] = {
    # Passed the check, then PostgreSQL raised DataError (Token "NaN" is invalid).
    "retry_factor_nan": (exponential(math.nan), r"\['factor'\] must be a number from 1 to 1e\+06"),
    "retry_factor_inf": (exponential(math.inf), r"\['factor'\]"),
    # json.dumps cannot print it: a bare ValueError.
    "retry_factor_10**5000": (exponential(10**5000), r"\['factor'\]"),
    "retry_factor_above_1e6": (exponential(1e6 + 1), r"\['factor'\]"),
    # sorted() of mixed keys raised TypeError while building the message.
    "cancellation_keys_of_mixed_types": (
        lambda app, s: app.spawn("t", cancellation={"other": 0, None: 0}, session=s),
        "cancellation keys must be strings",
    ),
    "retry_keys_of_mixed_types": (
        lambda app, s: app.spawn("t", retry_strategy={0: 0, "a": 0}, session=s),
        "retry_strategy keys must be strings",
    ),
    # math.isfinite() raised OverflowError.
    "run_after_too_big_for_a_float": (
        lambda app, s: app.spawn("t", run_after=10**400, session=s),
        "run_after must be at most",
    ),
    "max_delay_too_big_for_a_float": (
        lambda app, s: app.spawn("t", cancellation={"max_delay": -(10**400)}, session=s),
        "must not be negative",
    ),
    "run_after_not_in_utc_range": (
        lambda app, s: app.spawn("t", run_after=MINUS_ONE_HOUR_AT_THE_START, session=s),
        "out of range in UTC",
    ),
    # The registry was looked up before the name was checked: TypeError: unhashable.
    "unhashable_task_name": (lambda app, s: app.spawn(["t"], session=s), "task name"),
    "unhashable_task_name_in_spawn_many": (
        lambda app, s: app.spawn_many([SpawnRequest(task_name=[])], session=s),  # type: ignore[arg-type]
        "task name",
    ),
    # Just under the recursion limit: spawn raised RecursionError (encoded again
    # inside the statement's rows), or accepted what a worker could not decode.
    "json_one_level_too_deep": (
        lambda app, s: app.spawn("t", nest_lists(MAX_JSON_DEPTH + 1), session=s),
        f"params is nested too deeply.*{MAX_JSON_DEPTH}",
    ),
    "json_near_the_recursion_limit": (
        lambda app, s: app.spawn("t", nest_lists(sys.getrecursionlimit() - 11), session=s),
        "params is nested too deeply",
    ),
    "headers_near_the_recursion_limit": (
        lambda app, s: app.spawn(
            "t", headers={"h": nest_lists(sys.getrecursionlimit() - 12)}, session=s
        ),
        "headers is nested too deeply",
    ),
    # repr() of the headers, for the message, raised RecursionError.
    "deep_headers_that_are_not_a_mapping": (
        lambda app, s: app.spawn("t", headers=nest_lists(sys.getrecursionlimit() + 5), session=s),
        "headers must be a dict",
    ),
}


@pytest.mark.parametrize("what", sorted(REFUSED))
def test_refused_before_any_statement(db: Db, what: str) -> None:
    call, message = REFUSED[what]
    error = refused(db, call)
    assert re.search(message, str(error)), error


STORED: dict[str, dict[str, Any]] = {
    # A timedelta passed the seconds check, was stored as is, and json.dumps
    # raised TypeError: it is stored as float seconds.
    "timedelta_in_cancellation": {"cancellation": {"max_delay": timedelta(seconds=5)}},
    "timedelta_in_retry_strategy": {
        "retry_strategy": {
            "kind": "exponential",
            "base_seconds": timedelta(milliseconds=1500),
            "max_seconds": timedelta(hours=1),
        }
    },
    "retry_factor_1e6": {"retry_strategy": {"kind": "exponential", "factor": 1e6}},
    "retry_factor_10**6": {"retry_strategy": {"kind": "exponential", "factor": 10**6}},
    # Offsets PostgreSQL cannot parse (DataError): stored as the instant in UTC.
    "run_after_offset_16h": {
        "run_after": datetime(2030, 1, 1, tzinfo=timezone(timedelta(hours=16)))
    },
    "run_after_offset_-23h59m59s": {
        "run_after": datetime(2030, 1, 1, tzinfo=timezone(-timedelta(hours=23, seconds=3599)))
    },
    "run_after_offset_with_microseconds": {
        "run_after": datetime(2030, 1, 1, tzinfo=timezone(timedelta(microseconds=1)))
    },
    "run_after_at_the_end_of_time": {"run_after": datetime.max.replace(tzinfo=UTC)},
    "json_at_the_maximum_depth": {
        "params": nest_lists(MAX_JSON_DEPTH),
        "headers": {"h": nest_lists(MAX_JSON_DEPTH - 1)},
    },
}


@pytest.mark.parametrize("what", sorted(STORED))
def test_stored_as_documented(db: Db, what: str) -> None:
    kwargs = {"task_name": "t", **STORED[what]}
    db.reset()
    app = db.app()
    outcome = in_transaction(db, app, lambda s: app.spawn(**kwargs, session=s), InvalidArgument)
    assert isinstance(outcome, SpawnResult), outcome
    assert_spawned(db, outcome, kwargs)


@pytest.mark.parametrize(
    ("number", "comes_back_as"),
    [
        (1e16, int),
        (-1e16, int),
        (1e23, int),
        (1.7976931348623157e308, int),
        (-1.5e300, int),
        (9999999999999998.0, float),  # the largest float below 1e16
        (1e15, float),
        (1.5, float),
        (1e-7, float),
    ],
)
def test_big_floats_come_back_as_ints(db: Db, number: float, comes_back_as: type) -> None:
    """json.dumps writes 1e+23; jsonb keeps the numeric 10^23 and prints it
    without an exponent, which json.loads reads as the int 10**23: every float
    of magnitude 1e16 or more comes back as the int its shortest decimal
    spelling names (float() of it gives the float back). Documented in
    docs/reference.md; smaller floats come back as floats."""
    db.reset()
    app = db.app()
    app.emit_event("e", number)
    with db.engine.connect() as conn:
        back = conn.scalar(select(events.c.payload))
    assert type(back) is comes_back_as
    assert float(back) == number
    assert_round_trip(number, back)


def test_ctx_spawn_with_headers_that_are_not_a_mapping(db: Db) -> None:
    """``ctx.spawn`` refuses such headers as ``spawn`` does (it merged them into
    a dict first and raised TypeError)."""
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
    assert "headers must be a dict" in str(raised[0])
    assert counts(db.engine)[1] == 1  # no child


def test_json_at_the_maximum_depth_end_to_end(db: Db) -> None:
    """Params, headers, a step value, a child's result, an event payload and a
    task's result nested MAX_JSON_DEPTH levels are stored, claimed, replayed
    and read back (a worker decodes them inside wrappers: checkpoints, the done
    event); one level more is refused wherever it is passed."""
    db.reset()
    app = db.app()
    deepest, too_deep = nest_lists(MAX_JSON_DEPTH), nest_lists(MAX_JSON_DEPTH + 1)
    refusals: list[BaseException] = []

    @app.register_task("echo")
    def echo(params: Any, ctx: TaskContext) -> Any:
        return params

    @app.register_task("too-deep", max_attempts=1)
    def returns_too_deep(params: Any, ctx: TaskContext) -> Any:
        return too_deep

    @app.register_task("parent", max_attempts=1)
    def parent(params: Any, ctx: TaskContext) -> Any:
        for call in (
            lambda: ctx.step("too-deep", lambda: too_deep),
            lambda: ctx.emit_event("too-deep", too_deep),
            lambda: ctx.spawn("echo", too_deep, step_name="too-deep-child"),
        ):
            try:
                call()
            except NotSerializable as exc:
                refusals.append(exc)
        assert params == deepest and ctx.headers["h"] == nest_lists(MAX_JSON_DEPTH - 1)
        assert ctx.step("deep", lambda: deepest) == deepest
        child = ctx.spawn("echo", deepest)
        assert ctx.await_task_result(child.task_id).result == deepest
        assert ctx.await_event("deep-event") == deepest
        return params

    task = app.spawn("parent", deepest, headers={"h": nest_lists(MAX_JSON_DEPTH - 1)})
    failing = app.spawn("too-deep")
    run_until_idle(app)
    app.emit_event("deep-event", deepest)
    run_until_idle(app)
    snapshot = app.fetch_task_result(task.task_id)
    assert snapshot is not None and snapshot.state == "completed", snapshot
    assert_round_trip(deepest, snapshot.result)
    assert refusals and all("nested too deeply" in str(e) for e in refusals)
    assert len(refusals) % 3 == 0  # all three, on every execution of the parent
    failed = app.fetch_task_result(failing.task_id)
    assert failed is not None and failed.state == "failed" and failed.failure is not None
    assert failed.failure["name"] == "NotSerializable"
    for call in (
        lambda: app.spawn("echo", too_deep),
        lambda: app.spawn("echo", headers={"h": deepest}),
        lambda: app.emit_event("e", too_deep),
    ):
        with pytest.raises(NotSerializable, match="nested too deeply"):
            call()
