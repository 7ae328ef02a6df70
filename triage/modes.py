"""Deployment modes per model version: shadow, review, clinical (``triage-admin models mode``).

- **shadow**: the model runs and its findings are recorded, but they change nothing: the study
  keeps its place on the worklist, no SEG, SR or key-object document goes to the PACS, no alert
  is sent, and only administrators see the findings. A department runs a new model this way
  until its monitoring says it can be trusted.
- **review**: the findings raise the study on the worklist as a clinical model's do, but the
  result objects and the external alerts wait until a radiologist or an administrator approves
  the run (study panel, or ``POST /api/studies/{uid}/approve``); then they go, once.
- **clinical**: today's behaviour and the default: findings rank, objects and alerts go at once.

A mode is set for one version, or for every version of a model (``*``); a version's own setting
wins. A job records the mode it ran in, so changing a mode applies to the runs that follow
(``triage-admin reprocess`` runs a study again); every change is an audit event.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from triage.audit import add_event
from triage.db.base import utcnow
from triage.db.models import ALL_VERSIONS, ModelModeSetting
from triage.domain import ModelMode


def mode_for(db_session: Session, model_name: str, model_version: str) -> ModelMode:
    """The mode a run of this model version is made in now."""
    rows = db_session.execute(
        select(ModelModeSetting.model_version, ModelModeSetting.mode).where(
            ModelModeSetting.model_name == model_name,
            ModelModeSetting.model_version.in_((model_version, ALL_VERSIONS)),
        )
    ).all()
    by_version = dict(rows)
    return by_version.get(model_version) or by_version.get(ALL_VERSIONS) or ModelMode.CLINICAL


def modes(db_session: Session) -> dict[tuple[str, str], ModelMode]:
    """Every mode set, by (model name, version or ``*``)."""
    return {
        (row.model_name, row.model_version): row.mode
        for row in db_session.scalars(select(ModelModeSetting))
    }


def set_mode(
    db_session: Session,
    *,
    model_name: str,
    mode: ModelMode,
    model_version: str | None = None,
    actor: str | None = None,
) -> ModelMode | None:
    """Set the mode of one version (or of every version: ``model_version`` None) and audit it.
    Returns the mode it had before (None: not set)."""
    version = model_version or ALL_VERSIONS
    row = db_session.scalar(
        select(ModelModeSetting).where(
            ModelModeSetting.model_name == model_name, ModelModeSetting.model_version == version
        )
    )
    before = row.mode if row else None
    if row is None:
        row = ModelModeSetting(model_name=model_name, model_version=version, mode=mode)
        db_session.add(row)
    row.mode, row.changed_at, row.changed_by = mode, utcnow(), actor
    add_event(
        db_session=db_session,
        kind="model_mode",
        actor=actor,
        model=model_name,
        version=version,
        mode=str(mode),
        previous=str(before) if before else None,
    )
    return before
