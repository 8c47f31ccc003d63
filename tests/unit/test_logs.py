"""The pure parts of logging (``_logs``, the banner of ``_runtime``): the fields
of a record, the JSON formatter, the CLI's set-up and the wording of each line."""

from __future__ import annotations

import io
import json
import logging
import sys
from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy.engine import make_url

from absurd_sqla import _logs
from absurd_sqla._app import WorkerSettings
from absurd_sqla._logs import FIELDS, JsonFormatter
from absurd_sqla._runtime import banner, database_label, missing_queue_warning
from tests.support import claimed_run


def record(msg: str = "hello %s", *args: object, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("absurd_sqla.worker", logging.INFO, __file__, 1, msg, args, None)
    rec.__dict__.update(extra)
    return rec


def test_run_extra_names_the_run_with_strings_for_ids() -> None:
    run = claimed_run(task_name="charge", queue_name="billing", attempt=3)
    assert _logs.run_extra(run) == {
        "task_id": str(run.task_id),
        "run_id": str(run.run_id),
        "task_name": "charge",
        "queue": "billing",
        "attempt": 3,
    }
    assert tuple(_logs.run_extra(run)) == FIELDS
    assert _logs.queue_extra("q") == dict.fromkeys(FIELDS) | {"queue": "q"}


def test_the_filter_fills_missing_fields_from_the_run_being_written_or_none() -> None:
    fill = _logs.RunFields()
    bare = record()
    assert fill.filter(bare)
    assert {f: getattr(bare, f) for f in FIELDS} == dict.fromkeys(FIELDS)

    run = claimed_run(task_name="charge")
    with _logs.about(run):
        inside = record()
        own = record(**_logs.queue_extra("other"))  # a record's own fields win
        fill.filter(inside)
        fill.filter(own)
    assert inside.run_id == str(run.run_id) and inside.task_name == "charge"
    assert own.queue == "other" and own.run_id is None
    after = record()
    fill.filter(after)
    assert after.run_id is None


def test_the_package_logger_has_the_filter_once() -> None:
    log = _logs.logger()
    _logs.logger()
    assert log is logging.getLogger("absurd_sqla.worker")
    assert sum(isinstance(f, _logs.RunFields) for f in log.filters) == 1


def test_json_lines_carry_the_fields_the_extra_and_the_exception() -> None:
    run = claimed_run(task_name="charge")
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        exc_info = sys.exc_info()
    rec = record("task %s\nfailed", "charge", **_logs.run_extra(run), custom={"k": 1})
    rec.exc_info = exc_info
    rec.created = datetime(2030, 1, 2, 3, 4, 5, 678000, tzinfo=UTC).timestamp()
    line = JsonFormatter().format(rec)
    assert "\n" not in line  # one object per line, newlines escaped
    out = json.loads(line)
    assert out["time"] == "2030-01-02T03:04:05.678+00:00"
    assert out["level"] == "INFO" and out["logger"] == "absurd_sqla.worker"
    assert out["message"] == "task charge\nfailed"
    assert {f: out[f] for f in FIELDS} == _logs.run_extra(run)
    assert out["custom"] == {"k": 1}
    assert out["exception"].startswith("Traceback") and "ValueError: boom" in out["exception"]
    assert "args" not in out and "msg" not in out  # no LogRecord internals


def test_json_gives_null_fields_to_a_record_without_them_and_text_for_odd_values() -> None:
    out = json.loads(JsonFormatter().format(record(when=datetime(2030, 1, 1, tzinfo=UTC))))
    assert {f: out[f] for f in FIELDS} == dict.fromkeys(FIELDS)
    assert out["when"] == "2030-01-01 00:00:00+00:00"
    assert "exception" not in out


def test_configure_logging_writes_one_json_object_per_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(logging.root, "handlers", list(logging.root.handlers))
    monkeypatch.setattr(logging.root, "level", logging.root.level)
    stream = io.StringIO()
    handler = _logs.configure_logging("warning", "json", stream)
    assert logging.root.handlers == [handler] and logging.root.level == logging.WARNING
    log = _logs.logger()
    run = claimed_run()
    log.info("not shown")
    log.warning("about a run", extra=_logs.run_extra(run))
    log.error("about nothing")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["message"] == "about a run" and first["run_id"] == str(run.run_id)
    assert second["level"] == "ERROR" and second["run_id"] is None


def test_configure_logging_text_and_a_bad_format(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logging.root, "handlers", list(logging.root.handlers))
    monkeypatch.setattr(logging.root, "level", logging.root.level)
    stream = io.StringIO()
    _logs.configure_logging(logging.DEBUG, "text", stream)
    logging.getLogger("absurd_sqla.worker").debug("plain")
    assert stream.getvalue().rstrip().endswith("DEBUG absurd_sqla.worker plain")
    with pytest.raises(ValueError, match="text, json"):
        _logs.formatter("xml")


# -- the wording of each line -----------------------------------------------------

WHEN = datetime(2030, 1, 1, 12, 0, 5, 250000, tzinfo=UTC)


def test_completed_line() -> None:
    line = _logs.completed_message("charge", "T1", 1.234, 1)
    assert line == "task charge (T1) completed in 1.23 s, attempt 1"


def test_a_retry_is_a_warning_with_the_time_and_the_next_attempt() -> None:
    level, message = _logs.failure_message(
        "charge",
        "T1",
        "ValueError: boom",
        attempt=1,
        max_attempts=5,
        retry_at=WHEN,
        next_attempt=2,
    )
    assert level == logging.WARNING
    assert message == (
        "task charge (T1) failed: ValueError: boom; will retry at "
        "2030-01-01T12:00:05.250+00:00, attempt 2 of 5"
    )
    _, unlimited = _logs.failure_message(
        "charge", "T1", "E", attempt=7, max_attempts=None, retry_at=WHEN, next_attempt=8
    )
    assert unlimited.endswith("attempt 8")


def test_a_final_failure_is_an_error_with_the_attempts() -> None:
    level, message = _logs.failure_message(
        "charge",
        "T1",
        "ValueError: boom",
        attempt=5,
        max_attempts=5,
        retry_at=None,
        next_attempt=None,
    )
    assert level == logging.ERROR
    assert message == "task charge (T1) failed permanently after 5 attempts: ValueError: boom"
    _, once = _logs.failure_message(
        "charge", "T1", "E", attempt=1, max_attempts=1, retry_at=None, next_attempt=None
    )
    assert "after 1 attempt: E" in once


def test_a_time_in_a_line_is_utc_to_the_millisecond() -> None:
    paris = WHEN.astimezone(timezone(timedelta(hours=1)))
    assert _logs.when(paris) == "2030-01-01T12:00:05.250+00:00"


def test_the_database_label_never_shows_a_password() -> None:
    url = make_url("postgresql+psycopg://app:s3cret@db.example:5433/prod?password=also")
    assert database_label(url) == "app@db.example:5433/prod"
    socket = make_url("postgresql+psycopg:///prod?host=/var/run/postgresql")
    assert database_label(socket) == "/var/run/postgresql/prod"


def settings(**fields: object) -> WorkerSettings:
    base: dict[str, object] = {
        "queue": "billing",
        "worker_id": "host:42",
        "claim_timeout": 120.0,
        "batch_size": 4,
        "concurrency": 4,
    }
    return WorkerSettings(**(base | fields))  # type: ignore[arg-type]


def test_the_banner_names_queue_concurrency_worker_tasks_and_database() -> None:
    line = banner(settings(), ["refund", "charge"], "app@db.example:5433/prod")
    assert line == (
        "worker host:42 starting: queue 'billing', concurrency 4, batch size 4, "
        "claim timeout 120s, 2 task(s) registered (charge, refund), "
        "database app@db.example:5433/prod"
    )
    assert "0 task(s) registered (none)" in banner(settings(), [], "x")
    many = banner(settings(), [f"t{i:02}" for i in range(25)], "x")
    assert "25 task(s) registered (t00, t01," in many and "t19 and 5 more)" in many


def test_the_missing_queue_warning() -> None:
    assert missing_queue_warning(settings()) == (
        "worker host:42 serves queue 'billing', which does not exist: it will claim nothing "
        "until the queue is created (create_queue('billing'))"
    )
