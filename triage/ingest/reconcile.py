"""Start-up reconciliation of the spool with the index, after a crash or a restore.

A spool file without a row is indexed (or quarantined if unreadable); a row without a file is
flagged ``missing`` and recorded, so an administrator sees it; a file that comes back (restored
from a backup) is ``stored`` again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import select, update

from triage.audit import add_event
from triage.db.models import Instance, Series, Study
from triage.db.session import SessionFactory, session_scope
from triage.domain import InstanceState
from triage.errors import DicomInputError
from triage.ingest.pipeline import Ingestor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reconciliation:
    partial_removed: int = 0
    adopted: int = 0
    quarantined: int = 0
    missing: int = 0


def reconcile_spool(*, ingestor: Ingestor, session_factory: SessionFactory) -> Reconciliation:
    spool = ingestor.spool
    partial = spool.clear_tmp()
    on_disk = set(spool.stored_ids())
    with session_scope(session_factory) as session:
        states = {
            file_id: state
            for file_id, state in session.execute(select(Instance.file_id, Instance.state))
        }
    stored = {f for f, state in states.items() if state == InstanceState.STORED}
    restored = sorted(
        f for f, state in states.items() if state != InstanceState.STORED and f in on_disk
    )
    if restored:
        with session_scope(session_factory) as session:
            session.execute(
                update(Instance)
                .where(Instance.file_id.in_(restored))
                .values(state=InstanceState.STORED)
            )
    adopted = quarantined = 0
    for file_id in sorted(on_disk - states.keys()):
        path = spool.path_for(file_id)
        try:
            ingestor.adopt(path)
            adopted += 1
        except DicomInputError as exc:
            spool.quarantine(path)
            quarantined += 1
            with session_scope(session_factory) as session:
                add_event(db_session=session, kind="quarantine", file_id=file_id, reason=str(exc))
    missing_ids = sorted(stored - on_disk)
    if missing_ids:
        with session_scope(session_factory) as session:
            session.execute(
                update(Instance)
                .where(Instance.file_id.in_(missing_ids))
                .values(state=InstanceState.MISSING)
            )
            rows = session.execute(
                select(Instance.sop_instance_uid, Study.study_uid)
                .join(Series, Instance.series_id == Series.id)
                .join(Study, Series.study_id == Study.id)
                .where(Instance.file_id.in_(missing_ids))
            ).all()
            for sop_instance_uid, study_uid in rows:
                add_event(
                    db_session=session,
                    kind="spool_missing",
                    study_uid=study_uid,
                    sop_instance_uid=sop_instance_uid,
                    reason="indexed instance has no spool file",
                )
    result = Reconciliation(partial, adopted, quarantined, len(missing_ids))
    if result != Reconciliation():
        log.warning(
            "spool reconciled",
            extra={
                "partial_removed": partial,
                "adopted": adopted,
                "quarantined": quarantined,
                "missing": len(missing_ids),
            },
        )
    return result
