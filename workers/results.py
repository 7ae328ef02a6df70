"""From a finished model run to result objects on disk and deliveries owed.

The SEG and SR are built by triage's pure builders; their UIDs derive from (study, model,
version, kind), so a re-run rewrites the same objects and re-queues the same deliveries.
"""

from __future__ import annotations

import logging
import uuid
from io import BytesIO

from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from sqlalchemy import select
from sqlalchemy.orm import Session

from triage.audit import add_event
from triage.db.base import utcnow
from triage.db.models import Job, ResultObject
from triage.destinations import destinations
from triage.dicom import uids
from triage.domain import ResultKind, WorkState
from triage.results.inputs import CT_HEAD, AlgorithmIdentity, FindingInput, ResultInput
from triage.results.kos import (
    InstanceReference,
    build_key_object_selection,
    build_rejection_note,
    key_slices,
)
from triage.results.seg import build_segmentation
from triage.results.sr import build_sr
from triage.review import is_held, queue_deliveries
from workers.context import WorkerContext
from workers.models.interface import DetectedFinding, LoadedModel, ModelOutput
from workers.volume import Volume

log = logging.getLogger(__name__)

SEG_SERIES_NUMBER = 9001
SR_SERIES_NUMBER = 9002
KOS_SERIES_NUMBER = 9003
REJECTION_SERIES_NUMBER = 9004
WITHDRAWN_KINDS = (ResultKind.SEG, ResultKind.SR, ResultKind.KOS)


def _procedure(model: LoadedModel) -> Code:
    given = (model.description.model_extra or {}).get("procedure")
    if given:
        return Code(str(given["code"]), str(given["scheme"]), str(given["meaning"]))
    return CT_HEAD


def _location(finding: DetectedFinding, volume: Volume) -> tuple[float, float, float] | None:
    if finding.centroid_voxel is None:
        return None
    slice_, row, col = finding.centroid_voxel
    rows, cols = volume.voxels.shape[1:]
    flip_rows, flip_cols = volume.in_plane_flips
    return (
        slice_,
        rows - 1 - row if flip_rows else row,
        cols - 1 - col if flip_cols else col,
    )


def result_input(
    *, study_uid: str, model: LoadedModel, volume: Volume, output: ModelOutput
) -> ResultInput:
    """The builders' input for one run: findings in order, the mask laid out as the sources."""
    name, version = model.description.name, model.description.version
    segmented = output.mask is not None
    findings = []
    for index, finding in enumerate(output.findings):
        positive = finding.positive
        findings.append(
            FindingInput(
                label=finding.label[:64],
                code=Code(finding.code.value, finding.code.scheme, finding.code.meaning),
                probability=min(1.0, max(0.0, finding.probability)),
                positive=positive,
                tracking_uid=uids.tracking_uid(
                    study_uid=study_uid, model_name=name, model_version=version, finding_index=index
                ),
                volume_ml=finding.volume_ml if positive else None,
                segment_number=finding.segment if positive and segmented else None,
                location=_location(finding, volume) if positive else None,
            )
        )
    mask = volume.to_source_frames(output.mask) if output.mask is not None else None
    return ResultInput(
        source=volume.datasets,
        algorithm=AlgorithmIdentity(name=name, version=version),
        findings=findings,
        mask=mask,
        study_uid=study_uid,
        procedure=_procedure(model),
        seg_series_number=SEG_SERIES_NUMBER,
        sr_series_number=SR_SERIES_NUMBER,
    )


def build_objects(result: ResultInput) -> dict[ResultKind, Dataset]:
    """The SR, which every run gets; the SEG, where something was segmented; and the Key Object
    Selection naming the key slices with the SEG and SR, where a finding is positive (IHE AI
    Results)."""
    segmentation = build_segmentation(result)
    sr = build_sr(result, segmentation)
    objects: dict[ResultKind, Dataset] = {ResultKind.SR: sr}
    if segmentation is not None:
        objects[ResultKind.SEG] = segmentation
    slices = key_slices(result)
    if slices:
        objects[ResultKind.KOS] = build_key_object_selection(
            result, segmentation, sr, slices, series_number=KOS_SERIES_NUMBER
        )
    return objects


def _encode(dataset: Dataset) -> bytes:
    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def record_results(
    context: WorkerContext, db_session: Session, job: Job, objects: dict[ResultKind, Dataset]
) -> list[int]:
    """Write each object durably, upsert its row, and queue one delivery per destination
    (none while the job is held for review: the approval queues them).

    Returns the delivery ids to send once the transaction commits.
    """
    rows = {
        r.kind: r
        for r in db_session.scalars(select(ResultObject).where(ResultObject.job_id == job.id))
    }
    for kind, row in rows.items():
        # e.g. the SEG of an earlier, positive run: withdrawn by a rejection note if it was
        # delivered (``retract_superseded``), forgotten if it never was
        if kind not in objects and kind != ResultKind.REJECTION and row.retracted_at is None:
            db_session.delete(row)
    targets = [] if is_held(job) else list(destinations(context.settings, db_session=db_session))
    now = utcnow()
    delivery_ids = []
    for kind, dataset in objects.items():
        found = rows.get(kind)
        row = found or ResultObject(job_id=job.id, kind=kind, file_id=uuid.uuid4().hex)
        if found is None:
            db_session.add(row)
        row.sop_class_uid = str(dataset.SOPClassUID)
        row.sop_instance_uid = str(dataset.SOPInstanceUID)
        row.series_uid = str(dataset.SeriesInstanceUID)
        row.round = job.round
        row.created_at = now
        row.retracted_at = None
        context.images.keep_result(row.file_id, _encode(dataset))
        db_session.flush()
        delivery_ids += queue_deliveries(db_session, row, targets, now)
    return delivery_ids


def retract_superseded(
    context: WorkerContext,
    db_session: Session,
    job: Job,
    objects: dict[ResultKind, Dataset],
    header: Dataset,
) -> list[int]:
    """A run that no longer finds what an earlier run of the same model reported withdraws the
    earlier run's objects (its SEG, and, of another version's run, its SR and key-object
    document) from every destination that got them: a rejection note, IHE Imaging Object
    Change Management's "Rejected for Quality Reasons" Key Object Selection. The objects are
    marked retracted; their deliveries not yet made are dropped. Returns the note's delivery
    ids (to send after the commit)."""
    if ResultKind.SEG in objects:
        return []
    earlier = db_session.scalars(
        select(ResultObject)
        .join(Job, ResultObject.job_id == Job.id)
        .where(
            Job.study_id == job.study_id,
            Job.model_name == job.model_name,
            ResultObject.retracted_at.is_(None),
            ResultObject.kind.in_(WITHDRAWN_KINDS),
        )
        .order_by(ResultObject.id)
    ).all()
    positive_runs = {r.job_id for r in earlier if r.kind == ResultKind.SEG}
    withdrawn = [
        r
        for r in earlier
        if r.job_id in positive_runs and (r.job_id != job.id or r.kind not in objects)
    ]
    got = {
        r.id: sorted(d.destination for d in r.deliveries if d.state == WorkState.DONE)
        for r in withdrawn
    }
    withdrawn = [r for r in withdrawn if got[r.id]]
    if not withdrawn:
        return []
    note = build_rejection_note(
        study_uid=job.study.study_uid,
        model_name=job.model_name,
        model_version=job.model_version,
        rejected=[
            InstanceReference(
                sop_class_uid=r.sop_class_uid,
                sop_instance_uid=r.sop_instance_uid,
                series_instance_uid=r.series_uid,
                image=r.kind == ResultKind.SEG,
            )
            for r in withdrawn
        ],
        header=header,
        series_number=REJECTION_SERIES_NUMBER,
    )
    now = utcnow()
    row = db_session.scalar(
        select(ResultObject).where(
            ResultObject.job_id == job.id, ResultObject.kind == ResultKind.REJECTION
        )
    )
    if row is None:
        row = ResultObject(job_id=job.id, kind=ResultKind.REJECTION, file_id=uuid.uuid4().hex)
        db_session.add(row)
    row.sop_class_uid = str(note.SOPClassUID)
    row.sop_instance_uid = str(note.SOPInstanceUID)
    row.series_uid = str(note.SeriesInstanceUID)
    row.round, row.created_at, row.retracted_at = job.round, now, None
    context.images.keep_result(row.file_id, _encode(note))
    db_session.flush()
    for r in withdrawn:
        r.retracted_at = now
        for delivery in list(r.deliveries):
            if delivery.state != WorkState.DONE:
                db_session.delete(delivery)
    add_event(
        db_session=db_session,
        kind="results_retracted",
        study_uid=job.study.study_uid,
        job_id=job.id,
        model=job.model_name,
        version=job.model_version,
        withdrawn=[r.sop_instance_uid for r in withdrawn],
    )
    log.info(
        "earlier results withdrawn",
        extra={"job_id": job.id, "study_uid": job.study.study_uid, "objects": len(withdrawn)},
    )
    targets = sorted({name for names in got.values() for name in names})
    return queue_deliveries(db_session, row, [] if is_held(job) else targets, now)
