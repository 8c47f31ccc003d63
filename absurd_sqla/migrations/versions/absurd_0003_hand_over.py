"""Hand-over: a completion that also claims its worker slot's next run
records that run on the completed run (``runs.handed_over``), so a worker
whose answer was lost with its connection can take the run over.

Revision ID: absurd_0003_hand_over
Revises: absurd_0002_inspection
Create Date: 2026-12-03

Written by hand, like the first revision. Adding a nullable column without a
default only changes the catalog: no table rewrite, a brief lock.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "absurd_0003_hand_over"
down_revision: str | None = "absurd_0002_inspection"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCHEMA = "absurd"


def upgrade() -> None:
    op.add_column(
        "runs",
        sa.Column("handed_over", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        schema=SCHEMA,
    )


def downgrade() -> None:
    op.drop_column("runs", "handed_over", schema=SCHEMA)
