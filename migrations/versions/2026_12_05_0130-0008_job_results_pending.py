"""job results pending

A job's findings are stored (and the study re-ranked) before its SEG and SR are built. Until
they are recorded, ``results_pending`` says the result objects are still owed, so that a worker
lost in between leaves a job the sweeper sends again rather than one that looks finished.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05 01:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(
            sa.Column("results_pending", sa.Boolean(), nullable=False, server_default=sa.false())
        )


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("results_pending")
