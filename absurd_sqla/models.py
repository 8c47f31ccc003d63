"""The Absurd tables as SQLAlchemy 2.x models in the Postgres schema ``absurd``.

Add :data:`metadata` to your own Alembic ``target_metadata`` so autogenerate
knows these tables belong to someone (they are created by our migrations, see
``docs/migrations.md``).

Every hot query is an index scan whose cost does not grow with the number of
finished tasks: the claim and lease indexes are partial over live runs only.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    CheckConstraint,
    ForeignKey,
    Index,
    MetaData,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, TIMESTAMP, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from ._core import PARENT_HEADER

SCHEMA = "absurd"

TASK_STATES = ("pending", "running", "sleeping", "completed", "failed", "cancelled")
TERMINAL_STATES = ("completed", "failed", "cancelled")
CLAIMABLE_STATES = ("pending", "sleeping")

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(schema=SCHEMA, naming_convention=NAMING_CONVENTION)

_NOW = text("absurd.now()")


def _states_check(column: str, states: tuple[str, ...]) -> str:
    listed = ", ".join(f"'{s}'" for s in states)
    return f"{column} IN ({listed})"


def _state_list(states: tuple[str, ...]) -> str:
    return "(" + ", ".join(f"'{s}'" for s in states) + ")"


class Base(DeclarativeBase):
    metadata = metadata
    type_annotation_map = {  # noqa: RUF012 - SQLAlchemy reads this class attribute
        datetime: TIMESTAMP(timezone=True),
        uuid.UUID: UUID(as_uuid=True),
        dict[str, Any]: JSONB,
        str: Text,
    }


class Queue(Base):
    """A namespace for tasks and events (a row, not a set of tables)."""

    __tablename__ = "queues"

    queue_name: Mapped[str] = mapped_column(primary_key=True)
    created_at: Mapped[datetime] = mapped_column(server_default=_NOW)


class Task(Base):
    """A named unit of work with JSON params; one or more runs attempt it."""

    __tablename__ = "tasks"
    __table_args__ = (
        CheckConstraint(_states_check("state", TASK_STATES), name="state"),
        CheckConstraint("attempts >= 0", name="attempts"),
        CheckConstraint("max_attempts IS NULL OR max_attempts >= 1", name="max_attempts"),
        Index(
            None,
            "queue_name",
            "idempotency_key",
            unique=True,
            postgresql_where=text("idempotency_key IS NOT NULL"),
        ),
        # Retention: find old finished tasks without touching live ones.
        Index(
            "ix_tasks_finished",
            "queue_name",
            "finished_at",
            postgresql_where=text(f"state IN {_state_list(TERMINAL_STATES)}"),
        ),
        # Inspection: newest first (ids are UUIDv7) within a queue, state or name.
        Index("ix_tasks_list_queue", "queue_name", "task_id"),
        Index("ix_tasks_list_state", "state", "task_id"),
        Index("ix_tasks_list_name", "task_name", "task_id"),
        # A task's children name it in a header.
        Index(
            "ix_tasks_parent",
            text(f"(headers ->> '{PARENT_HEADER}')"),
            postgresql_where=text(f"(headers ->> '{PARENT_HEADER}') IS NOT NULL"),
        ),
    )

    task_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    queue_name: Mapped[str] = mapped_column(
        ForeignKey(Queue.queue_name, ondelete="CASCADE", onupdate="CASCADE")
    )
    task_name: Mapped[str]
    params: Mapped[dict[str, Any] | None]
    headers: Mapped[dict[str, Any] | None]
    retry_strategy: Mapped[dict[str, Any] | None]
    max_attempts: Mapped[int | None]
    cancellation: Mapped[dict[str, Any] | None]
    idempotency_key: Mapped[str | None]
    state: Mapped[str] = mapped_column(server_default="pending")
    attempts: Mapped[int] = mapped_column(server_default="1")
    last_run_id: Mapped[uuid.UUID | None]
    result: Mapped[dict[str, Any] | None]
    # When the task first became due: the spawn, or its run_after if later.
    enqueued_at: Mapped[datetime] = mapped_column(server_default=_NOW)
    first_started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    # Why cancel_task(..., reason=) cancelled it, if it said.
    cancel_reason: Mapped[str | None]


class Run(Base):
    """One attempt at a task. Sleeping and waiting reuse the run; failure makes a new one."""

    __tablename__ = "runs"
    __table_args__ = (
        CheckConstraint(_states_check("state", TASK_STATES), name="state"),
        UniqueConstraint("task_id", "attempt"),
        # Claim: live runs only, FIFO by availability.
        Index(
            "ix_runs_claim",
            "queue_name",
            "available_at",
            postgresql_where=text(f"state IN {_state_list(CLAIMABLE_STATES)}"),
        ),
        # Lease sweep: running runs by expiry.
        Index(
            "ix_runs_lease",
            "queue_name",
            "claim_expires_at",
            postgresql_where=text("state = 'running'"),
        ),
        # Inspection: runs finished lately, per queue.
        Index(
            "ix_runs_finished",
            "queue_name",
            "finished_at",
            postgresql_where=text(f"state IN {_state_list(TERMINAL_STATES)}"),
        ),
    )

    run_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    task_id: Mapped[uuid.UUID] = mapped_column(ForeignKey(Task.task_id, ondelete="CASCADE"))
    queue_name: Mapped[str]
    attempt: Mapped[int]
    state: Mapped[str] = mapped_column(server_default="pending")
    claimed_by: Mapped[str | None]
    claim_expires_at: Mapped[datetime | None]
    # NULL while waiting for an event without a timeout: never claimable by time.
    available_at: Mapped[datetime | None] = mapped_column(server_default=_NOW)
    wake_event: Mapped[str | None]
    result: Mapped[dict[str, Any] | None]
    failure_reason: Mapped[dict[str, Any] | None]
    created_at: Mapped[datetime] = mapped_column(server_default=_NOW)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    # Set by a completion that also claimed its worker slot's next run: that
    # run's id and what the claim overwrote (``prev_started_at``,
    # ``prev_first_started_at``), so a worker whose answer was lost can take
    # the run over instead of leaving it to its lease.
    handed_over: Mapped[dict[str, Any] | None]


class Checkpoint(Base):
    """The stored JSON value of a step, shared by all runs of a task."""

    __tablename__ = "checkpoints"

    task_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey(Task.task_id, ondelete="CASCADE"), primary_key=True
    )
    checkpoint_name: Mapped[str] = mapped_column(primary_key=True)
    state: Mapped[dict[str, Any] | None]
    owner_run_id: Mapped[uuid.UUID]
    updated_at: Mapped[datetime] = mapped_column(server_default=_NOW)


class Event(Base):
    """A named JSON payload on a queue; the first emit wins.

    A row with ``emitted_at IS NULL`` is a placeholder written by a waiter: its
    row lock orders "emit" against "suspend" so a wake-up is never lost.
    """

    __tablename__ = "events"
    __table_args__ = (
        Index(
            "ix_events_emitted",
            "queue_name",
            "emitted_at",
            postgresql_where=text("emitted_at IS NOT NULL"),
        ),
        # Retention of placeholders whose waiters gave up.
        Index(
            "ix_events_placeholders",
            "queue_name",
            "created_at",
            postgresql_where=text("emitted_at IS NULL"),
        ),
    )

    queue_name: Mapped[str] = mapped_column(
        ForeignKey(Queue.queue_name, ondelete="CASCADE", onupdate="CASCADE"), primary_key=True
    )
    event_name: Mapped[str] = mapped_column(primary_key=True)
    payload: Mapped[dict[str, Any] | None]
    emitted_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(server_default=_NOW)


class Wait(Base):
    """A run suspended until an event arrives (or its timeout passes)."""

    __tablename__ = "waits"
    __table_args__ = (
        Index(None, "queue_name", "event_name"),
        Index(None, "task_id"),  # the cascade from a deleted task finds its waits
    )

    run_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey(Run.run_id, ondelete="CASCADE"), primary_key=True
    )
    task_id: Mapped[uuid.UUID] = mapped_column(ForeignKey(Task.task_id, ondelete="CASCADE"))
    queue_name: Mapped[str]
    event_name: Mapped[str]
    step_name: Mapped[str]
    timeout_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(server_default=_NOW)


# The Core tables, for statements (``__table__`` is typed as a plain FromClause).
queues = cast(Table, Queue.__table__)
tasks = cast(Table, Task.__table__)
runs = cast(Table, Run.__table__)
checkpoints = cast(Table, Checkpoint.__table__)
events = cast(Table, Event.__table__)
waits = cast(Table, Wait.__table__)
