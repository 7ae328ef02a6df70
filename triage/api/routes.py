"""The JSON API: worklist, study record, reading states, and a stream of worklist changes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from triage.api.deps import EVENTS_PATH, AdminCaller, AnyCaller, AppSettings, DbSession
from triage.db.base import utcnow
from triage.db.models import Study, WorklistEntry
from triage.db.session import session_scope
from triage.domain import ReadingState, Tier, TokenRole
from triage.ingest.reprocess import ReprocessError, reprocess_by_uid
from triage.worklist.queries import study_record, worklist

router = APIRouter(prefix="/api", tags=["worklist"])

HEARTBEAT_SECONDS = 15.0
POLL_SECONDS = 1.0


@router.get("/worklist")
def get_worklist(
    caller: AnyCaller,
    session: DbSession,
    settings: AppSettings,
    tier: Tier | None = None,
    state: Annotated[list[ReadingState] | None, Query()] = None,
    modality: str | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> dict[str, Any]:
    """Studies to read, most urgent first. By default unread and claimed ones."""
    states = tuple(state) if state else (ReadingState.UNREAD, ReadingState.CLAIMED)
    items = worklist(
        db_session=session,
        tier=tier,
        states=states,
        modality=modality,
        limit=limit,
        offset=offset,
    )
    now = utcnow()
    return {
        "items": [
            item.as_json(now=now, viewer_url_template=settings.viewer_url_template)
            for item in items
        ],
        "limit": limit,
        "offset": offset,
        "targets_minutes": {
            "critical": settings.critical_target_minutes,
            "urgent": settings.urgent_target_minutes,
            "routine": settings.routine_target_minutes,
        },
    }


@router.get("/studies/{study_uid}")
def get_study(study_uid: str, caller: AnyCaller, session: DbSession) -> dict[str, Any]:
    """A study's whole record: jobs, findings, result objects, deliveries, priority history."""
    record = study_record(db_session=session, study_uid=study_uid)
    if record is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such study")
    return record


def _entry(session: Session, study_uid: str) -> WorklistEntry:
    entry = session.scalar(select(WorklistEntry).join(Study).where(Study.study_uid == study_uid))
    if entry is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such study on the worklist")
    return entry


def _state(entry: WorklistEntry) -> dict[str, Any]:
    return {
        "reading_state": str(entry.reading_state),
        "claimed_by": entry.claimed_by,
        "claim_expires_at": entry.claim_expires_at.isoformat() if entry.claim_expires_at else None,
    }


@router.post("/studies/{study_uid}/claim")
def claim(
    study_uid: str, caller: AnyCaller, session: DbSession, settings: AppSettings
) -> dict[str, Any]:
    """Claim a study for reading; the claim lapses after claim_minutes."""
    entry = _entry(session, study_uid)
    now = utcnow()
    if entry.reading_state == ReadingState.READ:
        raise HTTPException(status.HTTP_409_CONFLICT, "already read")
    held = (
        entry.reading_state == ReadingState.CLAIMED
        and entry.claimed_by != caller.name
        and entry.claim_expires_at is not None
        and entry.claim_expires_at > now
    )
    if held:
        raise HTTPException(status.HTTP_409_CONFLICT, f"claimed by {entry.claimed_by}")
    entry.reading_state = ReadingState.CLAIMED
    entry.claimed_by = caller.name
    entry.claimed_at = now
    entry.claim_expires_at = now + timedelta(minutes=settings.claim_minutes)
    entry.updated_at = now
    return _state(entry)


@router.post("/studies/{study_uid}/release")
def release(study_uid: str, caller: AnyCaller, session: DbSession) -> dict[str, Any]:
    """Give a claim back. Only its holder, or an admin, may."""
    entry = _entry(session, study_uid)
    if entry.reading_state != ReadingState.CLAIMED:
        raise HTTPException(status.HTTP_409_CONFLICT, "not claimed")
    if entry.claimed_by != caller.name and caller.role != TokenRole.ADMIN:
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"claimed by {entry.claimed_by}")
    entry.reading_state = ReadingState.UNREAD
    entry.claimed_by = entry.claimed_at = entry.claim_expires_at = None
    entry.updated_at = utcnow()
    return _state(entry)


@router.post("/studies/{study_uid}/read")
def mark_read(study_uid: str, caller: AnyCaller, session: DbSession) -> dict[str, Any]:
    """Mark a study read; it leaves the worklist."""
    entry = _entry(session, study_uid)
    someone_else = entry.reading_state == ReadingState.CLAIMED and entry.claimed_by != caller.name
    if someone_else and caller.role != TokenRole.ADMIN:
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"claimed by {entry.claimed_by}")
    now = utcnow()
    entry.reading_state = ReadingState.READ
    entry.read_at = entry.updated_at = now
    return _state(entry)


@router.post("/studies/{study_uid}/reprocess", status_code=status.HTTP_202_ACCEPTED)
def reprocess(study_uid: str, caller: AdminCaller, request: Request) -> dict[str, Any]:
    """Analyse the study again with every routed model (admin only)."""
    try:
        job_ids = reprocess_by_uid(
            settings=request.app.state.settings,
            session_factory=request.app.state.session_factory,
            study_uid=study_uid,
            model=None,
            actor=caller.name,
        )
    except ReprocessError as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc
    for job_id in job_ids:
        request.app.state.sender.analyze_study(job_id)
    return {"queued_jobs": job_ids}


def _version(request: Request) -> str:
    with session_scope(request.app.state.session_factory) as session:
        latest, count = session.execute(
            select(func.max(WorklistEntry.updated_at), func.count(WorklistEntry.id))
        ).one()
    return f"{latest.isoformat() if latest else '-'}/{count}"


@router.get(EVENTS_PATH.removeprefix("/api"), response_class=StreamingResponse)
async def events(request: Request, caller: AnyCaller) -> StreamingResponse:
    """Server-sent events: ``worklist`` whenever the worklist changes (refetch it then)."""

    async def stream() -> AsyncIterator[str]:
        last = None
        quiet = 0.0
        yield "retry: 2000\n\n"
        stopping = request.app.state.stopping
        while not stopping.is_set() and not await request.is_disconnected():
            version = await run_in_threadpool(_version, request)
            if version != last:
                last = version
                quiet = 0.0
                yield f"event: worklist\ndata: {json.dumps({'version': version})}\n\n"
            elif quiet >= HEARTBEAT_SECONDS:
                quiet = 0.0
                yield ": keep-alive\n\n"
            await asyncio.sleep(POLL_SECONDS)
            quiet += POLL_SECONDS

    return StreamingResponse(
        stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store"}
    )
