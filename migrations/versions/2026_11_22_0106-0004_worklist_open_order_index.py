"""worklist open order index

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22 01:06:57.502962
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


OPEN = "reading_state IN ('unread', 'claimed')"


def upgrade() -> None:
    # Reading order for open entries, read straight off the index (bench/worklist: the old
    # index led with reading_state and could not serve the two-state ORDER BY).
    with op.batch_alter_table("worklist_entries", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_worklist_order"))
    op.create_index(
        "ix_worklist_open_order",
        "worklist_entries",
        ["tier_rank", sa.text("score DESC")],
        postgresql_where=sa.text(OPEN),
        sqlite_where=sa.text(OPEN),
    )


def downgrade() -> None:
    op.drop_index("ix_worklist_open_order", table_name="worklist_entries")
    with op.batch_alter_table("worklist_entries", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_worklist_order"), ["reading_state", "tier_rank", "score"], unique=False
        )
