"""Audit events: what an administrator may need to see later. UIDs and AE titles only."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import Connection, insert
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from triage.db.models import AuditEvent
from triage.db.session import SessionFactory, session_scope

log = logging.getLogger(__name__)


def add_event(
    *,
    db_session: Session | Connection,
    kind: str,
    study_uid: str | None = None,
    actor: str | None = None,
    **detail: Any,
) -> None:
    """Add an event in the caller's transaction (a session's or a bare connection's)."""
    db_session.execute(
        insert(AuditEvent).values(kind=kind, study_uid=study_uid, actor=actor, detail=detail)
    )


def record_rejection(
    session_factory: SessionFactory, *, reason: str, actor: str | None, **detail: Any
) -> None:
    """Best effort: a rejection caused by a database outage cannot itself be stored."""
    try:
        with session_scope(session_factory) as session:
            add_event(db_session=session, kind="rejection", actor=actor, reason=reason, **detail)
    except SQLAlchemyError as exc:
        log.warning("could not record rejection: %s", type(exc).__name__, extra={"reason": reason})
