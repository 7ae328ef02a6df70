"""instance content digest

The spool's per-file SHA-256 becomes a digest named by its algorithm ("xxh3-128:<hex>"),
30x cheaper on the ingest path. Rows already held keep their SHA-256 as "sha256:<hex>" (a value that
is not 64 characters, left by a downgrade, is kept as it is): an identical re-send of one of
them is recognised by comparing the files' data sets byte by byte, as every re-send is.

Downgrade strips the "sha256:" prefix again; a row digested by another algorithm keeps its
value, which the older code compares with a SHA-256 and never finds equal, so a re-send of
that instance is kept as a new version rather than taken for a duplicate.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 07:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.alter_column(
            "sha256",
            new_column_name="digest",
            existing_type=sa.String(length=64),
            type_=sa.String(length=80),
            existing_nullable=False,
        )
    op.execute("UPDATE instances SET digest = 'sha256:' || digest WHERE length(digest) = 64")


def downgrade() -> None:
    op.execute(
        "UPDATE instances SET digest = substr(digest, 8) WHERE digest LIKE 'sha256:%'"
    )
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.alter_column(
            "digest",
            new_column_name="sha256",
            existing_type=sa.String(length=80),
            type_=sa.String(length=64),
            existing_nullable=False,
        )
