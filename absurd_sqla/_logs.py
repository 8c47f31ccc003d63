"""What the package's log records carry, and how the CLI prints them: pure.

Every record of the ``absurd_sqla`` loggers has the attributes ``FIELDS``
(``task_id``, ``run_id``, ``task_name``, ``queue``, ``attempt``). A record
about a run sets all five; a record about a worker or a queue (the start
banner, an outage, a shutdown) sets ``queue`` and leaves the others ``None``;
``RunFields`` fills whatever a record did not set, so a format string may
always name them (``%(task_id)s``). Ids are strings, ``attempt`` an int.

``JsonFormatter`` writes one JSON object per line; ``configure_logging`` is
what ``absurd-sqla worker --log-level --log-format`` calls.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._run import ClaimedRun

LOGGER_NAME = "absurd_sqla.worker"
FIELDS = ("task_id", "run_id", "task_name", "queue", "attempt")
FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"

# The run whose outcome is being written: fills the fields of records logged
# underneath by code that does not know the run (``Database.retrying``).
_about: ContextVar[Mapping[str, Any] | None] = ContextVar("absurd_sqla_log_run", default=None)


def fields(
    *,
    task_id: object = None,
    run_id: object = None,
    task_name: str | None = None,
    queue: str | None = None,
    attempt: int | None = None,
) -> dict[str, Any]:
    """The ``extra`` of a record: all of ``FIELDS``, ids as strings, None if unknown."""
    return {
        "task_id": None if task_id is None else str(task_id),
        "run_id": None if run_id is None else str(run_id),
        "task_name": task_name,
        "queue": queue,
        "attempt": attempt,
    }


def run_extra(run: ClaimedRun) -> dict[str, Any]:
    """The ``extra`` of a record about one claimed run."""
    return fields(
        task_id=run.task_id,
        run_id=run.run_id,
        task_name=run.task_name,
        queue=run.queue_name,
        attempt=run.attempt,
    )


def queue_extra(queue: str) -> dict[str, Any]:
    """The ``extra`` of a record about a worker or a queue, not one run."""
    return fields(queue=queue)


@contextlib.contextmanager
def about(run: ClaimedRun) -> Iterator[None]:
    """Records logged inside (without fields of their own) are about ``run``."""
    token = _about.set(run_extra(run))
    try:
        yield
    finally:
        _about.reset(token)


class RunFields(logging.Filter):
    """Give a record every attribute of ``FIELDS`` it lacks: the run being
    written (``about``) if any, else None. Installed on the package's logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        current = _about.get() or {}
        for name in FIELDS:
            if not hasattr(record, name):
                setattr(record, name, current.get(name))
        return True


def logger() -> logging.Logger:
    """The package's logger, with ``RunFields`` installed (once)."""
    log = logging.getLogger(LOGGER_NAME)
    if not any(isinstance(f, RunFields) for f in log.filters):
        log.addFilter(RunFields())
    return log


# -- the lines of a run's outcome ------------------------------------------------


def when(moment: datetime) -> str:
    """A time in a log line: ISO 8601 in UTC, to the millisecond."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds")


def completed_message(task_name: str, task_id: object, seconds: float, attempt: int) -> str:
    return f"task {task_name} ({task_id}) completed in {seconds:.2f} s, attempt {attempt}"


def failure_message(
    task_name: str,
    task_id: object,
    error: str,
    *,
    attempt: int,
    max_attempts: int | None,
    retry_at: datetime | None,
    next_attempt: int | None,
) -> tuple[int, str]:
    """The level and line of a recorded failure: a WARNING naming the retry the
    database scheduled (``retry_at``, ``next_attempt``), or an ERROR when there
    is none (``attempt`` was the last)."""
    task = f"task {task_name} ({task_id})"
    if retry_at is not None and next_attempt is not None:
        limit = "" if max_attempts is None else f" of {max_attempts}"
        return logging.WARNING, (
            f"{task} failed: {error}; will retry at {when(retry_at)}, attempt {next_attempt}{limit}"
        )
    plural = "" if attempt == 1 else "s"
    return logging.ERROR, f"{task} failed permanently after {attempt} attempt{plural}: {error}"


# Attributes every LogRecord has: anything else on a record came from ``extra``.
_STANDARD = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys()
    | {"message", "asctime", "taskName"}
)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: ``time`` (ISO 8601, UTC),
    ``level``, ``logger``, ``message``, the ``FIELDS`` (null when they do not
    apply), any other ``extra`` attribute, and ``exception`` / ``stack`` text
    when the record has them."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in FIELDS:
            out[name] = getattr(record, name, None)
        for name, value in record.__dict__.items():
            if name not in _STANDARD and name not in out and not name.startswith("_"):
                out[name] = value
        if record.exc_info and record.exc_info[0] is not None:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        # default=str: a UUID, a datetime or any object in an ``extra`` is logged
        # as its text rather than failing the record.
        return json.dumps(out, default=str, ensure_ascii=False)


def formatter(fmt: str) -> logging.Formatter:
    """The formatter of a ``--log-format``: ``text`` or ``json``."""
    if fmt == "json":
        return JsonFormatter()
    if fmt == "text":
        return logging.Formatter(TEXT_FORMAT)
    raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")


def configure_logging(
    level: int | str = "INFO", fmt: str = "text", stream: IO[str] | None = None
) -> logging.Handler:
    """Log everything at ``level`` and above to ``stream`` (stderr) as ``fmt``:
    one handler on the root logger, replacing any there. Returns the handler."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(formatter(fmt))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    return handler
