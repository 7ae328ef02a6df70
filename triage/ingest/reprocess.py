"""Analyse a study again on request (``triage-admin reprocess``, the API): a new round of jobs."""

from __future__ import annotations

from sqlalchemy import select

from triage.catalog import usable_models
from triage.config import Settings
from triage.db.models import Study
from triage.db.session import SessionFactory, session_scope
from triage.errors import TriageError
from triage.ingest.completion import study_facts
from triage.ingest.jobs import reprocess_study
from triage.ingest.routing import select_models


class ReprocessError(TriageError):
    """The study or the model asked for is not there."""


def reprocess_by_uid(
    *,
    settings: Settings,
    session_factory: SessionFactory,
    study_uid: str,
    model: str | None,
    actor: str,
) -> list[int]:
    """Queue ``model`` (or every model the routing rules pick) on the study; return job ids
    for the caller to send once this has committed."""
    available = usable_models(settings)
    with session_scope(session_factory) as session:
        study = session.scalar(select(Study).where(Study.study_uid == study_uid))
        if study is None:
            raise ReprocessError(f"no study {study_uid}")
        if model is not None:
            names = [model]
        else:
            facts = study_facts(db_session=session, study=study)
            names = select_models(settings.routing_rules, facts)
        if not names:
            raise ReprocessError("no routing rule applies to this study; name a model")
        missing = [name for name in names if name not in available]
        if missing:
            raise ReprocessError(f"model not installed: {', '.join(missing)}")
        return reprocess_study(
            db_session=session,
            study=study,
            models=[available[name] for name in names],
            actor=actor,
        )
