"""Notes in a study's priority history that do not change its priority: an acknowledged or an
escalated critical alert. The page and ``study show`` list them with the priority changes."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.orm import Session

from triage.db.models import PriorityChange, WorklistEntry


def note(db_session: Session, entry: WorklistEntry, *, at: datetime, reason: str) -> None:
    """Add ``reason`` to the history of the entry's study, its tier and score unchanged."""
    db_session.add(
        PriorityChange(
            study_id=entry.study_id,
            changed_at=at,
            old_tier=entry.tier,
            new_tier=entry.tier,
            old_score=entry.score,
            new_score=entry.score,
            reason=reason[:500],
        )
    )
