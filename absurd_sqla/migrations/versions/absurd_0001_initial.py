"""Absurd tables: queues, tasks, runs, checkpoints, events, waits.

Revision ID: absurd_0001_initial
Revises:
Create Date: 2026-11-24

Written by hand, never generated from the models, so the history stays fixed
when the models move on; a test proves the two agree.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision: str = "absurd_0001_initial"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = ("absurd",)
depends_on: str | Sequence[str] | None = None

SCHEMA = "absurd"
NOW = sa.text("absurd.now()")
TS = pg.TIMESTAMP(timezone=True)
# Every name is wrapped in op.f(): final as written. Otherwise Alembic applies the
# naming convention of whatever target_metadata the running env.py has (ours turns
# "ck_tasks_state" into "ck_tasks_ck_tasks_state"; an app's may differ again).
STATES = "state IN ('pending', 'running', 'sleeping', 'completed', 'failed', 'cancelled')"


def upgrade() -> None:
    op.execute(sa.text("CREATE SCHEMA IF NOT EXISTS absurd"))
    # "Now" is the database clock unless a session sets absurd.fake_now (tests
    # move time with it). STABLE, so `available_at <= absurd.now()` can use an index.
    op.execute(
        sa.text(
            "CREATE FUNCTION absurd.now() RETURNS timestamptz LANGUAGE sql STABLE AS $$ "
            "SELECT coalesce(nullif(current_setting('absurd.fake_now', true), '')::timestamptz, "
            "clock_timestamp()) $$"
        )
    )
    op.create_table(
        "queues",
        sa.Column("queue_name", sa.Text(), nullable=False),
        sa.Column("created_at", TS, server_default=NOW, nullable=False),
        sa.PrimaryKeyConstraint("queue_name", name=op.f("pk_queues")),
        schema=SCHEMA,
    )
    op.create_table(
        "tasks",
        sa.Column("task_id", pg.UUID(as_uuid=True), nullable=False),
        sa.Column("queue_name", sa.Text(), nullable=False),
        sa.Column("task_name", sa.Text(), nullable=False),
        sa.Column("params", pg.JSONB(), nullable=True),
        sa.Column("headers", pg.JSONB(), nullable=True),
        sa.Column("retry_strategy", pg.JSONB(), nullable=True),
        sa.Column("max_attempts", sa.Integer(), nullable=True),
        sa.Column("cancellation", pg.JSONB(), nullable=True),
        sa.Column("idempotency_key", sa.Text(), nullable=True),
        sa.Column("state", sa.Text(), server_default="pending", nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="1", nullable=False),
        sa.Column("last_run_id", pg.UUID(as_uuid=True), nullable=True),
        sa.Column("result", pg.JSONB(), nullable=True),
        sa.Column("enqueued_at", TS, server_default=NOW, nullable=False),
        sa.Column("first_started_at", TS, nullable=True),
        sa.Column("finished_at", TS, nullable=True),
        sa.CheckConstraint(STATES, name=op.f("ck_tasks_state")),
        sa.CheckConstraint("attempts >= 0", name=op.f("ck_tasks_attempts")),
        sa.CheckConstraint(
            "max_attempts IS NULL OR max_attempts >= 1", name=op.f("ck_tasks_max_attempts")
        ),
        sa.ForeignKeyConstraint(
            ["queue_name"],
            ["absurd.queues.queue_name"],
            name=op.f("fk_tasks_queue_name_queues"),
            ondelete="CASCADE",
            onupdate="CASCADE",
        ),
        sa.PrimaryKeyConstraint("task_id", name=op.f("pk_tasks")),
        schema=SCHEMA,
    )
    op.create_index(
        op.f("ix_tasks_queue_name_idempotency_key"),
        "tasks",
        ["queue_name", "idempotency_key"],
        unique=True,
        schema=SCHEMA,
        postgresql_where=sa.text("idempotency_key IS NOT NULL"),
    )
    op.create_index(
        op.f("ix_tasks_finished"),
        "tasks",
        ["queue_name", "finished_at"],
        schema=SCHEMA,
        postgresql_where=sa.text("state IN ('completed', 'failed', 'cancelled')"),
    )
    op.create_table(
        "runs",
        sa.Column("run_id", pg.UUID(as_uuid=True), nullable=False),
        sa.Column("task_id", pg.UUID(as_uuid=True), nullable=False),
        sa.Column("queue_name", sa.Text(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("state", sa.Text(), server_default="pending", nullable=False),
        sa.Column("claimed_by", sa.Text(), nullable=True),
        sa.Column("claim_expires_at", TS, nullable=True),
        sa.Column("available_at", TS, server_default=NOW, nullable=True),
        sa.Column("wake_event", sa.Text(), nullable=True),
        sa.Column("result", pg.JSONB(), nullable=True),
        sa.Column("failure_reason", pg.JSONB(), nullable=True),
        sa.Column("created_at", TS, server_default=NOW, nullable=False),
        sa.Column("started_at", TS, nullable=True),
        sa.Column("finished_at", TS, nullable=True),
        sa.CheckConstraint(STATES, name=op.f("ck_runs_state")),
        sa.ForeignKeyConstraint(
            ["task_id"],
            ["absurd.tasks.task_id"],
            name=op.f("fk_runs_task_id_tasks"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("run_id", name=op.f("pk_runs")),
        sa.UniqueConstraint("task_id", "attempt", name=op.f("uq_runs_task_id_attempt")),
        schema=SCHEMA,
    )
    op.create_index(
        op.f("ix_runs_claim"),
        "runs",
        ["queue_name", "available_at"],
        schema=SCHEMA,
        postgresql_where=sa.text("state IN ('pending', 'sleeping')"),
    )
    op.create_index(
        op.f("ix_runs_lease"),
        "runs",
        ["queue_name", "claim_expires_at"],
        schema=SCHEMA,
        postgresql_where=sa.text("state = 'running'"),
    )
    op.create_table(
        "checkpoints",
        sa.Column("task_id", pg.UUID(as_uuid=True), nullable=False),
        sa.Column("checkpoint_name", sa.Text(), nullable=False),
        sa.Column("state", pg.JSONB(), nullable=True),
        sa.Column("owner_run_id", pg.UUID(as_uuid=True), nullable=False),
        sa.Column("updated_at", TS, server_default=NOW, nullable=False),
        sa.ForeignKeyConstraint(
            ["task_id"],
            ["absurd.tasks.task_id"],
            name=op.f("fk_checkpoints_task_id_tasks"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("task_id", "checkpoint_name", name=op.f("pk_checkpoints")),
        schema=SCHEMA,
    )
    op.create_table(
        "events",
        sa.Column("queue_name", sa.Text(), nullable=False),
        sa.Column("event_name", sa.Text(), nullable=False),
        sa.Column("payload", pg.JSONB(), nullable=True),
        sa.Column("emitted_at", TS, nullable=True),
        sa.Column("created_at", TS, server_default=NOW, nullable=False),
        sa.ForeignKeyConstraint(
            ["queue_name"],
            ["absurd.queues.queue_name"],
            name=op.f("fk_events_queue_name_queues"),
            ondelete="CASCADE",
            onupdate="CASCADE",
        ),
        sa.PrimaryKeyConstraint("queue_name", "event_name", name=op.f("pk_events")),
        schema=SCHEMA,
    )
    op.create_index(
        op.f("ix_events_emitted"),
        "events",
        ["queue_name", "emitted_at"],
        schema=SCHEMA,
        postgresql_where=sa.text("emitted_at IS NOT NULL"),
    )
    op.create_index(
        op.f("ix_events_placeholders"),
        "events",
        ["queue_name", "created_at"],
        schema=SCHEMA,
        postgresql_where=sa.text("emitted_at IS NULL"),
    )
    op.create_table(
        "waits",
        sa.Column("run_id", pg.UUID(as_uuid=True), nullable=False),
        sa.Column("task_id", pg.UUID(as_uuid=True), nullable=False),
        sa.Column("queue_name", sa.Text(), nullable=False),
        sa.Column("event_name", sa.Text(), nullable=False),
        sa.Column("step_name", sa.Text(), nullable=False),
        sa.Column("timeout_at", TS, nullable=True),
        sa.Column("created_at", TS, server_default=NOW, nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["absurd.runs.run_id"],
            name=op.f("fk_waits_run_id_runs"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["task_id"],
            ["absurd.tasks.task_id"],
            name=op.f("fk_waits_task_id_tasks"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("run_id", name=op.f("pk_waits")),
        schema=SCHEMA,
    )
    op.create_index(
        op.f("ix_waits_queue_name_event_name"), "waits", ["queue_name", "event_name"], schema=SCHEMA
    )
    op.create_index(op.f("ix_waits_task_id"), "waits", ["task_id"], schema=SCHEMA)


def downgrade() -> None:
    for table in ("waits", "events", "checkpoints", "runs", "tasks", "queues"):
        op.drop_table(table, schema=SCHEMA)
    op.execute(sa.text("DROP FUNCTION absurd.now()"))
    # Only drop the schema if nothing else lives in it (RESTRICT is the default).
    op.execute(sa.text("DROP SCHEMA absurd"))
