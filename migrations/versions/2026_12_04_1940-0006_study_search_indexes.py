"""study search indexes

QIDO-RS searches studies by PatientID, AccessionNumber and StudyDate above all (PS3.18 10.6):
each gets an index, so that such a search reads the matching rows, not every study.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04 19:40:00
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_COLUMNS = ("patient_id", "accession_number", "study_date")


def upgrade() -> None:
    for column in _COLUMNS:
        op.create_index(f"ix_studies_{column}", "studies", [column])


def downgrade() -> None:
    for column in _COLUMNS:
        op.drop_index(f"ix_studies_{column}", table_name="studies")
