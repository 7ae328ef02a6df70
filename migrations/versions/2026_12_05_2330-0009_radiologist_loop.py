"""radiologist loop

The reader's side of the AI results: the severity that orders a tier's studies at equal waiting
time, acknowledgment of a critical alert, a key image per positive finding, a model version's
deployment mode (shadow, review, clinical) and the mode each run was made in, the approval of a
run held for review, the withdrawal of result objects a later run contradicts, and the readers'
verdicts on findings.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05 23:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from triage.db.base import UTCDateTime

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("worklist_entries") as batch:
        batch.add_column(
            sa.Column("severity_probability", sa.Float(), nullable=False, server_default="0")
        )
        batch.add_column(
            sa.Column("severity_volume", sa.Float(), nullable=False, server_default="0")
        )
        batch.add_column(sa.Column("acknowledged_at", UTCDateTime(), nullable=True))
        batch.add_column(sa.Column("acknowledged_by", sa.String(length=64), nullable=True))
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(
            sa.Column("mode", sa.String(length=16), nullable=False, server_default="clinical")
        )
        batch.add_column(sa.Column("approved_at", UTCDateTime(), nullable=True))
        batch.add_column(sa.Column("approved_by", sa.String(length=64), nullable=True))
    with op.batch_alter_table("findings") as batch:
        batch.add_column(sa.Column("key_image_ref", sa.String(length=255), nullable=True))
    with op.batch_alter_table("result_objects") as batch:
        batch.add_column(sa.Column("retracted_at", UTCDateTime(), nullable=True))
    op.create_table(
        "model_modes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_name", sa.String(length=64), nullable=False),
        sa.Column("model_version", sa.String(length=32), nullable=False),
        sa.Column("mode", sa.String(length=16), nullable=False),
        sa.Column("changed_at", UTCDateTime(), nullable=False),
        sa.Column("changed_by", sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_modes")),
        sa.UniqueConstraint(
            "model_name", "model_version", name=op.f("uq_model_modes_model_name_model_version")
        ),
    )
    op.create_table(
        "feedback",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("finding_id", sa.Integer(), nullable=True),
        sa.Column("model_name", sa.String(length=64), nullable=True),
        sa.Column("model_version", sa.String(length=32), nullable=True),
        sa.Column("label", sa.String(length=64), nullable=True),
        sa.Column("probability", sa.Float(), nullable=True),
        sa.Column("positive", sa.Boolean(), nullable=True),
        sa.Column("verdict", sa.String(length=16), nullable=False),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("reader", sa.String(length=64), nullable=False),
        sa.Column("at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["study_id"], ["studies.id"], name=op.f("fk_feedback_study_id_studies"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["finding_id"], ["findings.id"], name=op.f("fk_feedback_finding_id_findings"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_feedback")),
    )
    op.create_index(op.f("ix_feedback_study_id"), "feedback", ["study_id"])
    op.create_index(op.f("ix_feedback_at"), "feedback", ["at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_feedback_at"), table_name="feedback")
    op.drop_index(op.f("ix_feedback_study_id"), table_name="feedback")
    op.drop_table("feedback")
    op.drop_table("model_modes")
    with op.batch_alter_table("result_objects") as batch:
        batch.drop_column("retracted_at")
    with op.batch_alter_table("findings") as batch:
        batch.drop_column("key_image_ref")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("approved_by")
        batch.drop_column("approved_at")
        batch.drop_column("mode")
    with op.batch_alter_table("worklist_entries") as batch:
        batch.drop_column("acknowledged_by")
        batch.drop_column("acknowledged_at")
        batch.drop_column("severity_volume")
        batch.drop_column("severity_probability")
