"""The task filter of the Tasks view and of the bulk actions, from a query
string or a form, checked before anything is read or written."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .. import _core, _render
from ..errors import InvalidArgument
from ..models import TASK_STATES

PAGE_SIZE = 50
LIVE_STATES = ("pending", "running", "sleeping")


class BadInput(Exception):
    """Input the dashboard refuses with 400; the message says why."""


@dataclass(frozen=True)
class TaskFilter:
    queue: str | None = None
    state: str | None = None
    task_name: str | None = None
    since: str | None = None  # as typed: a duration ago (2h) or an ISO 8601 time
    since_at: datetime | None = None  # ... resolved when parsed

    def query(self) -> dict[str, str]:
        """The filter as query parameters (for links and hidden form fields)."""
        fields = {
            "queue": self.queue,
            "state": self.state,
            "name": self.task_name,
            "since": self.since,
        }
        return {key: value for key, value in fields.items() if value}

    def list_args(self) -> dict[str, Any]:
        return {
            "queue": self.queue,
            "state": self.state,
            "task_name": self.task_name,
            "since": self.since_at,
        }


def _text(values: Mapping[str, Any], key: str) -> str | None:
    value = values.get(key)
    if value is None or not isinstance(value, str):
        return None
    value = value.strip()
    return value or None


def parse_filter(values: Mapping[str, Any], now: datetime | None = None) -> TaskFilter:
    queue = _text(values, "queue")
    state = _text(values, "state")
    name = _text(values, "name")
    since = _text(values, "since")
    try:
        if queue is not None:
            _core.check_queue_name(queue)
        if name is not None:
            _core.check_name("task name", name)
    except InvalidArgument as exc:
        raise BadInput(str(exc)) from None
    if state is not None and state not in TASK_STATES:
        raise BadInput(f"state must be one of {', '.join(TASK_STATES)}, got {state!r}")
    since_at = None
    if since is not None:
        try:
            parsed = _render.parse_since(since)
            since_at = (
                parsed if isinstance(parsed, datetime) else (now or datetime.now(UTC)) - parsed
            )
        except (ValueError, OverflowError):
            raise BadInput(
                f"since: not a time: {since!r} (use a duration such as 2h, or ISO 8601 "
                "such as 2026-12-01T09:00)"
            ) from None
    return TaskFilter(queue, state, name, since, since_at)


def parse_task_id(text: str | None) -> uuid.UUID:
    try:
        return uuid.UUID(text or "")
    except ValueError:
        raise BadInput(f"not a task id: {text!r} (a task id is a UUID)") from None


def parse_queue(text: str | None) -> str | None:
    if text is None or not text.strip():
        return None
    try:
        return _core.check_queue_name(text.strip())
    except InvalidArgument as exc:
        raise BadInput(str(exc)) from None


def parse_page_size(text: str | None) -> int:
    if text is None or not text.strip():
        return PAGE_SIZE
    if not text.strip().isdigit() or not 1 <= int(text) <= 1000:
        raise BadInput(f"limit must be a whole number from 1 to 1000, got {text!r}")
    return int(text)
