"""The JSON API: worklist, study record, reading states, and a stream of worklist changes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, StreamingResponse
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from triage.api.deps import (
    EVENTS_PATH,
    AdminCaller,
    AnyCaller,
    ApiCaller,
    AppSettings,
    DbSession,
)
from triage.api.results import key_images_dir
from triage.api.schemas import (
    Acknowledgment,
    ApprovalResult,
    FeedbackRequest,
    Problem,
    ReadingStatus,
    Reprocessing,
)
from triage.db.base import utcnow
from triage.db.models import Study, WorklistEntry
from triage.db.session import session_scope
from triage.destinations import destinations
from triage.domain import ReadingState, Tier, TokenRole
from triage.feedback import FeedbackError, FeedbackInput, UnknownStudy, acknowledge, add_feedback
from triage.ingest.reprocess import ReprocessError, reprocess_by_uid
from triage.monitoring import model_stats
from triage.review import approve
from triage.worklist import reading
from triage.worklist.queries import feedback_record, key_image_findings, study_record, worklist
from triage.worklist.records import FeedbackRecord, StudyRecord, TargetMinutes, WorklistPage
from triage.worklist.service import refresh

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
) -> WorklistPage:
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
    return WorklistPage(
        items=[
            item.row(now=now, viewer_url_template=settings.viewer_url_template) for item in items
        ],
        limit=limit,
        offset=offset,
        targets_minutes=TargetMinutes(
            critical=settings.critical_target_minutes,
            urgent=settings.urgent_target_minutes,
            routine=settings.routine_target_minutes,
        ),
    )


@router.get("/studies/{study_uid}", responses={404: {"model": Problem}})
def get_study(
    study_uid: str, caller: AnyCaller, session: DbSession, settings: AppSettings
) -> StudyRecord:
    """A study's whole record: jobs, findings, result objects, deliveries, priority history and
    feedback. Runs made in shadow mode are shown to administrators only."""
    record = study_record(
        db_session=session,
        study_uid=study_uid,
        include_shadow=caller.role == TokenRole.ADMIN,
        viewer_url_template=settings.viewer_url_template,
    )
    if record is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such study")
    return record


def _study(session: Session, study_uid: str) -> Study:
    study = session.scalar(select(Study).where(Study.study_uid == study_uid))
    if study is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such study")
    return study


@router.get(
    "/studies/{study_uid}/key-image",
    response_class=FileResponse,
    responses={
        200: {"content": {"image/png": {}}, "description": "A non-diagnostic PNG preview."},
        404: {"model": Problem},
    },
)
def get_key_image(
    study_uid: str,
    caller: AnyCaller,
    session: DbSession,
    settings: AppSettings,
    finding: Annotated[
        int | None, Query(description="A finding id (default: the most significant).")
    ] = None,
) -> FileResponse:
    """The key image of the study's most significant positive finding (or of ``finding``): the
    slice through it, windowed, its outline drawn, captioned "AI preview - not for diagnosis"."""
    study = _study(session, study_uid)
    found = key_image_findings(session, study, include_shadow=caller.role == TokenRole.ADMIN)
    if finding is not None:
        found = [f for f in found if f.id == finding]
    if not found or found[0].key_image_ref is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no key image")
    path = key_images_dir(settings) / f"{found[0].key_image_ref}.png"
    if not path.is_file():
        raise HTTPException(status.HTTP_404_NOT_FOUND, "key image file missing")
    return FileResponse(
        path, media_type="image/png", headers={"Cache-Control": "private, max-age=60"}
    )


@router.post(
    "/studies/{study_uid}/feedback",
    status_code=status.HTTP_201_CREATED,
    responses={404: {"model": Problem}, 422: {"model": Problem}},
)
def post_feedback(
    study_uid: str, body: FeedbackRequest, caller: AnyCaller, session: DbSession
) -> FeedbackRecord:
    """A reader's verdict on a finding (``finding``: its id) or on the study (null, e.g. a
    finding the model missed): agree, disagree or unsure, with an optional comment."""
    given = FeedbackInput(
        finding=body.finding, verdict=body.verdict, comment=body.comment, reader=caller.name
    )
    try:
        row = add_feedback(session, study_uid=study_uid, given=given)
    except UnknownStudy as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from exc
    except FeedbackError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from exc
    return feedback_record(row)


@router.post("/studies/{study_uid}/acknowledge", responses={404: {"model": Problem}})
def post_acknowledge(study_uid: str, caller: AnyCaller, session: DbSession) -> Acknowledgment:
    """Acknowledge the study's critical alert, so that it is not escalated."""
    try:
        entry = acknowledge(session, study_uid=study_uid, reader=caller.name)
    except UnknownStudy as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from exc
    assert entry.acknowledged_at is not None
    return Acknowledgment(
        acknowledged_at=entry.acknowledged_at.isoformat(), acknowledged_by=caller.name
    )


@router.post("/studies/{study_uid}/approve", responses={404: {"model": Problem}})
def post_approve(
    study_uid: str, caller: AnyCaller, request: Request, settings: AppSettings
) -> ApprovalResult:
    """Approve the study's runs held for review: their SEG, SR and key-object document go to
    every destination, and their critical alerts go out. Approving again does nothing."""
    with session_scope(request.app.state.session_factory) as session:
        study = _study(session, study_uid)
        approval = approve(
            session,
            study=study,
            targets=destinations(settings, db_session=session),
            actor=caller.name,
        )
        if approval.jobs:
            session.flush()
            refresh(db_session=session, study=study, settings=settings)
    for delivery_id in approval.deliveries:  # after the commit, so the dispatcher finds them
        request.app.state.sender.dispatch_result(delivery_id)
    return ApprovalResult(approved_jobs=approval.jobs, queued_deliveries=approval.deliveries)


_READING_ERRORS: dict[type[reading.ReadingError], int] = {
    reading.NotOnWorklist: status.HTTP_404_NOT_FOUND,
    reading.ReadingConflict: status.HTTP_409_CONFLICT,
    reading.NotAllowed: status.HTTP_403_FORBIDDEN,
}
_READING_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": Problem} for code in _READING_ERRORS.values()
}


def _change_reading(
    session: Session,
    study_uid: str,
    caller: ApiCaller,
    change: Callable[[WorklistEntry, reading.Reader, datetime], None],
) -> ReadingStatus:
    """Apply one of the reading rules (``triage.worklist.reading``), its refusals as HTTP."""
    reader = reading.Reader(caller.name, admin=caller.role == TokenRole.ADMIN)
    try:
        entry = reading.entry_for(db_session=session, study_uid=study_uid)
        change(entry, reader, utcnow())
    except reading.ReadingError as exc:
        raise HTTPException(_READING_ERRORS[type(exc)], str(exc)) from exc
    return ReadingStatus.of(entry)


@router.post("/studies/{study_uid}/claim", responses=_READING_RESPONSES)
def claim(
    study_uid: str, caller: AnyCaller, session: DbSession, settings: AppSettings
) -> ReadingStatus:
    """Claim a study for reading; the claim lapses after claim_minutes."""
    claim_for = timedelta(minutes=settings.claim_minutes)

    def change(entry: WorklistEntry, reader: reading.Reader, now: datetime) -> None:
        reading.claim(entry, reader=reader, now=now, claim_for=claim_for)

    return _change_reading(session, study_uid, caller, change)


@router.post("/studies/{study_uid}/release", responses=_READING_RESPONSES)
def release(study_uid: str, caller: AnyCaller, session: DbSession) -> ReadingStatus:
    """Give a claim back. Only its holder, or an admin, may."""

    def change(entry: WorklistEntry, reader: reading.Reader, now: datetime) -> None:
        reading.release(entry, reader=reader, now=now)

    return _change_reading(session, study_uid, caller, change)


@router.post("/studies/{study_uid}/read", responses=_READING_RESPONSES)
def mark_read(study_uid: str, caller: AnyCaller, session: DbSession) -> ReadingStatus:
    """Mark a study read; it leaves the worklist."""

    def change(entry: WorklistEntry, reader: reading.Reader, now: datetime) -> None:
        reading.mark_read(entry, reader=reader, now=now)

    return _change_reading(session, study_uid, caller, change)


@router.post(
    "/studies/{study_uid}/reprocess",
    status_code=status.HTTP_202_ACCEPTED,
    responses={409: {"model": Problem}},
)
def reprocess(study_uid: str, caller: AdminCaller, request: Request) -> Reprocessing:
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
    return Reprocessing(queued_jobs=job_ids)


def _version(request: Request) -> str:
    with session_scope(request.app.state.session_factory) as session:
        latest, count = session.execute(
            select(func.max(WorklistEntry.updated_at), func.count(WorklistEntry.id))
        ).one()
    return f"{latest.isoformat() if latest else '-'}/{count}"


@router.get(
    EVENTS_PATH.removeprefix("/api"),
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {"text/event-stream": {}},
            "description": 'Server-sent events: `worklist` with `{"version": ...}` data.',
        }
    },
)
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


@router.get("/models/stats", tags=["models"])
def get_model_stats(
    caller: AdminCaller,
    session: DbSession,
    settings: AppSettings,
    days: Annotated[int, Query(ge=1, le=365)] = 30,
) -> list[dict[str, Any]]:
    """Per model version, by day and in total: studies analysed, positive and alert rates,
    feedback and agreement, a PPV estimate, failures, median run time; and the drift of its
    scores (PSI against the sidecar's reference) with its alarm. Administrators only."""
    return [item.as_json() for item in model_stats(session, settings, days=days)]
