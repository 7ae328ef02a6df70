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

from triage.db.base import utcnow
from triage.db.models import Delivery, Job, ResultObject
from triage.destinations import destinations
from triage.dicom import uids
from triage.domain import ResultKind, WorkState
from triage.results.inputs import CT_HEAD, AlgorithmIdentity, FindingInput, ResultInput
from triage.results.seg import build_segmentation
from triage.results.sr import build_sr
from workers.context import WorkerContext
from workers.models.interface import DetectedFinding, LoadedModel, ModelOutput
from workers.volume import Volume

log = logging.getLogger(__name__)

SEG_SERIES_NUMBER = 9001
SR_SERIES_NUMBER = 9002


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
    """The SEG (only where something was segmented) and the SR, which every run gets."""
    segmentation = build_segmentation(result)
    objects: dict[ResultKind, Dataset] = {ResultKind.SR: build_sr(result, segmentation)}
    if segmentation is not None:
        objects[ResultKind.SEG] = segmentation
    return objects


def _encode(dataset: Dataset) -> bytes:
    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def record_results(
    context: WorkerContext, db_session: Session, job: Job, objects: dict[ResultKind, Dataset]
) -> list[int]:
    """Write each object durably, upsert its row, and queue one delivery per destination.

    Returns the delivery ids to send once the transaction commits.
    """
    rows = {
        r.kind: r
        for r in db_session.scalars(select(ResultObject).where(ResultObject.job_id == job.id))
    }
    for kind, row in rows.items():
        if kind not in objects:  # e.g. a positive SEG from an earlier run; the PACS keeps its copy
            db_session.delete(row)
    targets = destinations(context.settings, db_session=db_session)
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
        context.images.keep_result(row.file_id, _encode(dataset))
        db_session.flush()
        existing = {d.destination: d for d in row.deliveries}
        for name in targets:
            delivery = existing.get(name)
            if delivery is None:
                delivery = Delivery(result_id=row.id, destination=name)
                db_session.add(delivery)
            delivery.state = WorkState.QUEUED
            delivery.attempts = 0
            delivery.last_error = None
            delivery.delivered_at = None
            delivery.next_attempt_at = delivery.touched_at = now
            db_session.flush()
            delivery_ids.append(delivery.id)
    return delivery_ids
