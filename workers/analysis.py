"""``analyze_study``'s work: pick the series, build the volume, run the model, store findings.

Findings first: the findings are committed and the study re-ranked (critical notifications owed)
in one transaction, and only then are the SEG and SR built, written and their deliveries queued,
in a second. The worklist, the API and the notifications never wait for the DICOM objects. In
between, the job is done with ``results_pending`` set; a worker lost there leaves it so, and the
task's redelivery (or the sweeper) runs it again: the findings are replaced by the same ones and
the objects built.

Idempotent: a job already done (or failed) for its round is left alone unless its result objects
are still owed; findings are replaced, never appended; a result for a round that was superseded
meanwhile is discarded.
"""

from __future__ import annotations

import enum
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from triage.audit import add_event
from triage.config import Settings
from triage.db.base import utcnow
from triage.db.models import Finding, Instance, Job, Series, Study
from triage.db.session import session_scope
from triage.domain import InstanceState, ModelMode, ResultKind, StudyStatus, WorkState
from triage.errors import PermanentError
from triage.modes import mode_for
from triage.worklist.service import refresh
from workers.context import WorkerContext
from workers.keyimage import render_key_image
from workers.models.interface import LoadedModel, ModelOutput
from workers.remote import JobFiles
from workers.results import build_objects, record_results, result_input, retract_superseded
from workers.volume import (
    SeriesRequirements,
    Volume,
    describe_series,
    fits,
    load_volume,
    read_headers,
)

log = logging.getLogger(__name__)


class JobOutcome(enum.StrEnum):
    """How one run of ``analyze_study`` ended (also the Celery task's result)."""

    DONE = "done"
    SUPERSEDED = "superseded"  # a newer round was queued meanwhile: this run's result is dropped
    MISSING = "missing"  # no such job (deleted with its study)
    ALREADY_DONE = "already done"
    ALREADY_FAILED = "already failed"
    FAILED = "failed"


_SETTLED = {WorkState.DONE: JobOutcome.ALREADY_DONE, WorkState.FAILED: JobOutcome.ALREADY_FAILED}


@dataclass(frozen=True)
class Claim:
    job_id: int
    round: int
    study_uid: str
    model_name: str
    model_version: str
    series: dict[str, list[str]]  # series UID -> file ids of its latest instance versions
    mode: ModelMode = ModelMode.CLINICAL


def claim(db_session: Session, job_id: int) -> Claim | JobOutcome:
    """Mark the job running and gather what the run needs; or say why there is nothing to do."""
    job = db_session.get(Job, job_id)
    if job is None:
        return JobOutcome.MISSING
    now = utcnow()
    if job.state == WorkState.DONE and job.results_pending:
        # Its findings count already; run it again for the objects, and leave it done meanwhile
        # so the study keeps its place on the worklist.
        job.touched_at = now
    elif (settled := _SETTLED.get(job.state)) is not None:
        return settled
    else:
        job.state = WorkState.RUNNING
        job.started_at = job.touched_at = now
        job.attempts += 1
        job.mode = mode_for(db_session, job.model_name, job.model_version)
        job.approved_at = job.approved_by = None  # an approval is for one run's results
    latest = (
        select(Instance.sop_instance_uid, func.max(Instance.version).label("version"))
        .join(Series, Instance.series_id == Series.id)
        .where(Series.study_id == job.study_id, Instance.state == InstanceState.STORED)
        .group_by(Instance.sop_instance_uid)
        .subquery()
    )
    rows = db_session.execute(
        select(Series.series_uid, Instance.file_id)
        .join(Instance, Instance.series_id == Series.id)
        .join(
            latest,
            (latest.c.sop_instance_uid == Instance.sop_instance_uid)
            & (latest.c.version == Instance.version),
        )
        .order_by(Instance.instance_number, Instance.id)
    )
    series: dict[str, list[str]] = {}
    for series_uid, file_id in rows:
        series.setdefault(series_uid, []).append(file_id)
    return Claim(
        job.id, job.round, job.study.study_uid, job.model_name, job.model_version, series, job.mode
    )


def choose_series(model: LoadedModel, work: Claim, files: JobFiles) -> tuple[str, list[Path]]:
    """The largest series that fits what the model asks for."""
    description = model.description
    requested = dict((description.model_extra or {}).get("series", {}))
    requested.setdefault("modalities", description.applies_to.modalities)
    requirements = SeriesRequirements.from_description(requested)
    refusals = []
    for series_uid, file_ids in sorted(work.series.items(), key=lambda item: -len(item[1])):
        paths = files.series(work.study_uid, series_uid, file_ids)
        facts = describe_series(read_headers(paths[:1])) | {"slices": len(paths)}
        reason = fits(requirements, facts)
        if reason is None:
            return series_uid, paths
        refusals.append(reason)
    raise PermanentError("no series fits the model: " + ("; ".join(refusals) or "no images"))


def _mask_name(work: Claim, output: ModelOutput) -> str | None:
    """The file the run's label map is kept in (``masks_dir``), named before it is written."""
    return None if output.mask is None else f"job-{work.job_id}-round-{work.round}.npz"


def _save_mask(context: WorkerContext, work: Claim, output: ModelOutput) -> None:
    name = _mask_name(work, output)
    if name is None or output.mask is None:
        return
    directory = Path(context.masks_dir)
    directory.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(directory / name, mask=output.mask)


def store(
    db_session: Session,
    work: Claim,
    series_uid: str,
    output: ModelOutput,
    mask_ref: str | None,
    timings: dict[str, float],
) -> JobOutcome:
    """Replace the job's findings with ``output``'s and mark it done (DONE), unless its round
    was superseded meanwhile (SUPERSEDED: nothing written)."""
    job = db_session.get(Job, work.job_id)
    if job is None or job.round != work.round:
        return JobOutcome.SUPERSEDED
    db_session.execute(delete(Finding).where(Finding.job_id == job.id))
    for ordinal, finding in enumerate(output.findings):
        location = None
        if finding.centroid_voxel is not None:
            location = {"centroid_voxel": [round(v, 2) for v in finding.centroid_voxel]}
        db_session.add(
            Finding(
                job_id=job.id,
                ordinal=ordinal,
                kind=finding.kind,
                label=finding.label,
                code_scheme=finding.code.scheme,
                code_value=finding.code.value,
                code_meaning=finding.code.meaning,
                probability=finding.probability,
                positive=finding.positive,
                volume_ml=finding.volume_ml,
                location=location,
                mask_ref=f"{mask_ref}#{finding.segment}" if mask_ref and finding.segment else None,
            )
        )
    now = utcnow()
    job.state = WorkState.DONE
    job.results_pending = True
    job.reason = None
    job.series_uid = series_uid
    job.timings = {stage: round(seconds, 4) for stage, seconds in timings.items()}
    job.finished_at = job.touched_at = now
    return JobOutcome.DONE


def settle_and_rank(db_session: Session, study: Study, settings: Settings) -> None:
    """Settle the study's status, then re-rank it on the worklist."""
    settle_study(db_session, study)
    db_session.flush()
    refresh(db_session=db_session, study=study, settings=settings)


def settle_study(db_session: Session, study: Study) -> None:
    """Once every job of the current round has finished, the study is analysed (or failed)."""
    states = db_session.scalars(
        select(Job.state).where(Job.study_id == study.id, Job.round == study.analysis_round)
    ).all()
    if not states or any(s in (WorkState.QUEUED, WorkState.RUNNING) for s in states):
        return
    if study.status != StudyStatus.ANALYZING:
        return  # re-opened by a late instance meanwhile
    failed = sum(s == WorkState.FAILED for s in states)
    study.status = StudyStatus.FAILED if failed == len(states) else StudyStatus.ANALYZED
    study.status_reason = f"{failed} of {len(states)} models failed" if failed else None


def analyze(context: WorkerContext, job_id: int) -> JobOutcome:
    """Run one job to the end. Raises RetryableError or PermanentError on failure."""
    with session_scope(context.session_factory) as session:
        work = claim(session, job_id)
    if isinstance(work, JobOutcome):
        log.info("nothing to do: %s", work, extra={"job_id": job_id})
        return work
    timings: dict[str, float] = {}
    started = time.perf_counter()
    warm = context.registry.is_loaded(work.model_name, work.model_version)
    model = context.registry.get(work.model_name, work.model_version)
    if not warm:  # loaded for this job
        timings["model_load"] = time.perf_counter() - started
    started = time.perf_counter()
    with context.images.job_files() as files:  # read into memory, then let go
        series_uid, paths = choose_series(model, work, files)
        volume = load_volume(paths)
    timings["load_decode"] = time.perf_counter() - started
    output = model.run(volume)
    timings |= output.timings
    mask_ref = _mask_name(work, output)  # written with the objects, off the critical path
    with session_scope(context.session_factory) as session:
        outcome = store(session, work, series_uid, output, mask_ref, timings)
        if outcome is JobOutcome.DONE:
            job = session.get(Job, work.job_id)
            assert job is not None
            settle_and_rank(session, job.study, context.settings)
    log.info(
        "job %s",
        outcome,
        extra={
            "job_id": job_id,
            "study_uid": work.study_uid,
            "model": work.model_name,
            "positive": output.positive,
            "findings": len(output.findings),
        },
    )
    if outcome is JobOutcome.DONE:
        outcome = make_results(context, work, model, volume, output)
    return outcome


def make_results(
    context: WorkerContext, work: Claim, model: LoadedModel, volume: Volume, output: ModelOutput
) -> JobOutcome:
    """Build the run's SEG and SR, write them and queue their deliveries; the job's results are
    then no longer pending. DONE, or SUPERSEDED where a newer round replaced the findings.

    A run in shadow mode gets no objects: its findings are for administrators only."""
    started = time.perf_counter()
    _save_mask(context, work, output)
    key_images = _key_images(context, volume, output)
    objects: dict[ResultKind, Dataset] | None = {}
    results_error = None
    try:
        if work.mode != ModelMode.SHADOW:
            objects = build_objects(
                result_input(study_uid=work.study_uid, model=model, volume=volume, output=output)
            )
    except Exception as exc:  # source headers the builders cannot use: findings still count
        objects, results_error = None, f"{type(exc).__name__}: {exc}"
        log.warning("result objects not built: %s", results_error, extra={"job_id": work.job_id})
    seconds = time.perf_counter() - started
    delivery_ids: list[int] = []
    with session_scope(context.session_factory) as session:
        job = session.get(Job, work.job_id)
        if job is None or job.round != work.round or job.state != WorkState.DONE:
            return JobOutcome.SUPERSEDED
        for finding in job.findings:
            finding.key_image_ref = key_images.get(finding.ordinal)
        if objects is not None:
            if work.mode != ModelMode.SHADOW:
                header = volume.datasets[0]
                delivery_ids = retract_superseded(context, session, job, objects, header)
                delivery_ids += record_results(context, session, job, objects)
            job.results_pending = False
        else:
            objects_not_built(session, job, str(results_error))
        job.timings = {**job.timings, "results": round(seconds, 4)}
    for delivery_id in delivery_ids:  # after the commit, so the dispatcher finds the rows
        context.sender.dispatch_result(delivery_id)
    return JobOutcome.DONE


def _key_images(context: WorkerContext, volume: Volume, output: ModelOutput) -> dict[int, str]:
    """A key image per positive segmented finding, kept where the API serves it from: the
    finding's ordinal -> its file id. Findings that share a segment share the image."""
    if output.mask is None:
        return {}
    header = volume.datasets[0]
    by_segment: dict[int, str] = {}
    found = {}
    for ordinal, finding in enumerate(output.findings):
        if not (finding.positive and finding.segment):
            continue
        if finding.segment not in by_segment:
            try:
                image = render_key_image(
                    volume,
                    output.mask,
                    finding.segment,
                    modality=header.get("Modality") or None,
                    body_part=header.get("BodyPartExamined") or None,
                )
            except ValueError as exc:  # e.g. an empty segment: no picture, the finding stands
                log.warning("no key image: %s", exc, extra={"segment": finding.segment})
                continue
            file_id = uuid.uuid4().hex
            context.images.keep_key_image(file_id, image.png)
            by_segment[finding.segment] = file_id
        found[ordinal] = by_segment[finding.segment]
    return found


def objects_not_built(db_session: Session, job: Job, reason: str) -> None:
    """The job keeps its findings; its SEG and SR are owed no longer, and the reason is kept
    on the job and in the audit log (``results_failed``)."""
    job.results_pending = False
    job.reason = f"findings stored; result objects not built: {reason}"[:2000]
    add_event(
        db_session=db_session,
        kind="results_failed",
        study_uid=job.study.study_uid,
        job_id=job.id,
        reason=reason[:500],
    )


def record_job_failure(context: WorkerContext, job_id: int, reason: str, *, final: bool) -> None:
    """Record a failure on the job: final (failed) or before a retry (queued again). A done job
    whose re-run for its result objects failed for good keeps its findings; its objects are
    recorded as not built, so the sweeper stops re-sending it."""
    with session_scope(context.session_factory) as session:
        job = session.get(Job, job_id)
        if job is None:
            return
        if job.state == WorkState.DONE:
            if final and job.results_pending:
                objects_not_built(session, job, reason)
            return
        job.reason = reason[:2000]
        job.touched_at = utcnow()
        job.state = WorkState.FAILED if final else WorkState.QUEUED
        if final:
            job.finished_at = job.touched_at
            add_event(
                db_session=session,
                kind="job_failed",
                study_uid=job.study.study_uid,
                job_id=job.id,
                model=job.model_name,
                reason=reason[:500],
            )
            session.flush()
            settle_and_rank(session, job.study, context.settings)
