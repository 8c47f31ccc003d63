"""Inspection: a reason on cancelled tasks, and the indexes that list tasks,
find a task's children and count recent finishes without scanning.

Revision ID: absurd_0002_inspection
Revises: absurd_0001_initial
Create Date: 2026-12-03

Written by hand, like the first revision.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "absurd_0002_inspection"
down_revision: str | None = "absurd_0001_initial"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCHEMA = "absurd"
PARENT = "(headers ->> 'absurd.parent_task_id')"
FINISHED = "state IN ('completed', 'failed', 'cancelled')"


def upgrade() -> None:
    op.add_column("tasks", sa.Column("cancel_reason", sa.Text(), nullable=True), schema=SCHEMA)
    # Newest first (task ids are UUIDv7) within one queue, state or task name.
    for name, column in (
        ("ix_tasks_list_queue", "queue_name"),
        ("ix_tasks_list_state", "state"),
        ("ix_tasks_list_name", "task_name"),
    ):
        op.create_index(op.f(name), "tasks", [column, "task_id"], schema=SCHEMA)
    op.create_index(
        op.f("ix_tasks_parent"),
        "tasks",
        [sa.text(PARENT)],
        schema=SCHEMA,
        postgresql_where=sa.text(f"{PARENT} IS NOT NULL"),
    )
    op.create_index(
        op.f("ix_runs_finished"),
        "runs",
        ["queue_name", "finished_at"],
        schema=SCHEMA,
        postgresql_where=sa.text(FINISHED),
    )


def downgrade() -> None:
    for table, name in (
        ("runs", "ix_runs_finished"),
        ("tasks", "ix_tasks_parent"),
        ("tasks", "ix_tasks_list_name"),
        ("tasks", "ix_tasks_list_state"),
        ("tasks", "ix_tasks_list_queue"),
    ):
        op.drop_index(op.f(name), table_name=table, schema=SCHEMA)
    op.drop_column("tasks", "cancel_reason", schema=SCHEMA)
