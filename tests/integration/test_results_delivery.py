"""Results into the PACS: a model run's SEG and SR reach real Orthancs by C-STORE and by
STOW-RS, survive a PACS outage without duplicates, and keep their UIDs on reprocess."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from tests.conftest import StackFactory
from tests.helpers import orthanc as peers
from tests.helpers.orthanc import OrthancFactory, OrthancPeer
from tests.helpers.pipeline import analysed_phantom
from triage.config import DicomWebDestination, DimseDestination, Settings
from triage.db.base import utcnow
from triage.db.models import Delivery, DestinationState, ResultObject
from triage.db.session import SessionFactory, session_scope
from triage.domain import WorkState
from triage.ingest.reprocess import reprocess_by_uid
from workers.analysis import analyze
from workers.context import WorkerContext
from workers.dispatch import dispatch

pytestmark = pytest.mark.slow

orthanc_factory = peers.orthanc_factory

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
KEY_OBJECT_SELECTION = "1.2.840.10008.5.1.4.1.1.88.59"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


def delivery_ids(factory: SessionFactory) -> list[int]:
    with session_scope(factory) as session:
        return list(session.scalars(select(Delivery.id).order_by(Delivery.id)))


def deliver_all(context: WorkerContext, factory: SessionFactory) -> None:
    for delivery_id in delivery_ids(factory):
        assert dispatch(context, delivery_id).state == "done"


def result_uids(orthanc: OrthancPeer, study_uid: str) -> dict[str, str]:
    """SOP Instance UID -> SOP Class UID of what Orthanc holds in the study, besides CT."""
    found = {}
    for instance in orthanc.qido(f"studies/{study_uid}/instances"):
        sop_class = instance["00080016"]["Value"][0]
        if sop_class in (SEG, COMPREHENSIVE_3D_SR, KEY_OBJECT_SELECTION):
            found[instance["00080018"]["Value"][0]] = sop_class
    return found


def test_seg_and_sr_reach_the_pacs_by_c_store_and_stow_rs(
    settings: Settings, tmp_path: Path, stack_factory: StackFactory, orthanc_factory: OrthancFactory
) -> None:
    by_dimse, by_web = orthanc_factory(), orthanc_factory()
    settings = settings.model_copy(
        update={
            "destinations": [
                DimseDestination(ae_title="ORTHANC", host="127.0.0.1", port=by_dimse.dicom_port),
                DicomWebDestination(url=by_web.dicomweb_url),
            ]
        }
    )
    study_uid, factory, context = analysed_phantom(
        settings, stack_factory, tmp_path, [by_dimse, by_web]
    )
    assert len(delivery_ids(factory)) == 6  # SEG, SR and KOS, to each destination
    deliver_all(context, factory)
    with session_scope(factory) as session:
        ours = {r.sop_instance_uid: r.sop_class_uid for r in session.scalars(select(ResultObject))}
    assert sorted(ours.values()) == sorted([SEG, COMPREHENSIVE_3D_SR, KEY_OBJECT_SELECTION])
    assert result_uids(by_dimse, study_uid) == ours
    assert result_uids(by_web, study_uid) == ours
    assert deliver_again_is_a_no_op(context, factory)


def deliver_again_is_a_no_op(context: WorkerContext, factory: SessionFactory) -> bool:
    return all(dispatch(context, i).state == "already done" for i in delivery_ids(factory))


def test_pacs_outage_backs_off_then_delivers_once_and_reprocess_keeps_uids(
    settings: Settings, tmp_path: Path, stack_factory: StackFactory, orthanc_factory: OrthancFactory
) -> None:
    pacs = orthanc_factory()
    settings = settings.model_copy(
        update={
            "destinations": [
                DimseDestination(ae_title="ORTHANC", host="127.0.0.1", port=pacs.dicom_port)
            ],
            "retry_backoff_seconds": 0.5,
            "destination_pause_after_failures": 2,
            "destination_pause_seconds": 30,
        }
    )
    study_uid, factory, context = analysed_phantom(settings, stack_factory, tmp_path, [pacs])
    sources = len(pacs.qido(f"studies/{study_uid}/instances"))
    pacs.stop()
    first, second, third = delivery_ids(factory)
    failed = dispatch(context, first)
    assert failed.state == "retrying"
    assert failed.retry_in is not None
    assert 0.25 <= failed.retry_in <= 0.5  # first backoff: half to all of the base delay
    assert dispatch(context, second).state == "retrying"
    # Two failures in a row pause the destination: nothing is attempted while it is paused.
    paused = dispatch(context, first)
    assert paused.state == "paused"
    assert paused.retry_in is not None
    assert paused.retry_in > 20
    assert dispatch(context, third).state == "paused"
    with session_scope(factory) as session:
        attempts = {
            d.id: (d.attempts, d.state, d.last_error) for d in session.scalars(select(Delivery))
        }
    assert all(s == WorkState.QUEUED for _, s, _ in attempts.values())
    assert all(attempts[i][0] == 1 and attempts[i][2] for i in (first, second))
    assert attempts[third][0] == 0

    pacs.start()
    with session_scope(factory) as session:  # the pause runs out
        state = session.scalars(select(DestinationState)).one()
        state.paused_until = utcnow()
    deliver_all(context, factory)
    held = result_uids(pacs, study_uid)
    assert len(held) == 3
    assert len(pacs.qido(f"studies/{study_uid}/instances")) == sources + 3

    # Reprocess: a new round rewrites the same objects and delivers them again, same UIDs.
    job_ids = reprocess_by_uid(
        settings=settings,
        session_factory=factory,
        study_uid=study_uid,
        model=None,
        actor="test",
    )
    assert analyze(context, job_ids[0]) == "done"
    deliver_all(context, factory)
    assert result_uids(pacs, study_uid) == held
    assert len(pacs.qido(f"studies/{study_uid}/instances")) == sources + 3
