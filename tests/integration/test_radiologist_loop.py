"""The radiologist's loop on the real pipeline: deployment modes (shadow, review, clinical) with
a real model run and a real Orthanc as the PACS, approval of held results, feedback, the
acknowledgment and escalation of critical alerts, and the retraction of results a later
version of the model no longer finds (IHE IOCM rejection note)."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client import CollectorRegistry
from sqlalchemy import select

from tests.conftest import StackFactory
from tests.helpers import orthanc as peers
from tests.helpers.orthanc import OrthancFactory, OrthancPeer
from tests.helpers.pipeline import analysed_phantom, analyze_queued
from tests.helpers.process import VENV_BIN
from triage.api.app import create_app
from triage.api.tokens import create_token
from triage.config import DimseDestination, Settings
from triage.db.models import Delivery, Notification, ResultObject, Study, WorklistEntry
from triage.db.session import SessionFactory, session_scope
from triage.destinations import destinations
from triage.domain import ModelMode, ResultKind, Tier, TokenRole
from triage.feedback import acknowledge
from triage.ingest.reprocess import reprocess_by_uid
from triage.modes import set_mode
from triage.notify.notifier import Notifier
from triage.review import approve
from triage.worklist.queries import study_record
from triage.worklist.service import refresh
from workers.context import WorkerContext
from workers.dispatch import dispatch

pytestmark = pytest.mark.slow

orthanc_factory = peers.orthanc_factory

REFERENCE_MODEL = "ct-head-hyperdensity"
# SOP classes, from PS3.4 Annex B.5
SEG = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
KEY_OBJECT_SELECTION = "1.2.840.10008.5.1.4.1.1.88.59"
RESULT_CLASSES = (SEG, COMPREHENSIVE_3D_SR, KEY_OBJECT_SELECTION)


def results_in(orthanc: OrthancPeer, study_uid: str) -> dict[str, str]:
    """SOP Instance UID -> SOP Class UID of the result objects Orthanc holds in the study."""
    found = {}
    for instance in orthanc.qido(f"studies/{study_uid}/instances"):
        sop_class = instance["00080016"]["Value"][0]
        if sop_class in RESULT_CLASSES:
            found[instance["00080018"]["Value"][0]] = sop_class
    return found


def deliver_all(context: WorkerContext, factory: SessionFactory) -> int:
    with session_scope(factory) as session:
        queued = list(
            session.scalars(
                select(Delivery.id).where(Delivery.state == "queued").order_by(Delivery.id)
            )
        )
    for delivery_id in queued:
        assert dispatch(context, delivery_id).state == "done"
    return len(queued)


def tier_of(factory: SessionFactory, study_uid: str) -> Tier:
    with session_scope(factory) as session:
        return session.scalars(
            select(WorklistEntry.tier).join(Study).where(Study.study_uid == study_uid)
        ).one()


def notifications(factory: SessionFactory) -> list[str]:
    with session_scope(factory) as session:
        return list(session.scalars(select(Notification.channel).order_by(Notification.id)))


@pytest.fixture
def pacs_settings(
    settings: Settings, orthanc_factory: OrthancFactory
) -> tuple[Settings, OrthancPeer]:
    pacs = orthanc_factory()
    destination = DimseDestination(ae_title="ORTHANC", host="127.0.0.1", port=pacs.dicom_port)
    return settings.model_copy(update={"destinations": [destination]}), pacs


def test_shadow_changes_nothing_review_waits_for_approval_then_sends_once(
    pacs_settings: tuple[Settings, OrthancPeer], tmp_path: Path, stack_factory: StackFactory
) -> None:
    settings, pacs = pacs_settings
    stack = stack_factory(settings)
    with session_scope(stack.session_factory) as session:
        set_mode(session, model_name=REFERENCE_MODEL, mode=ModelMode.SHADOW, actor="test")

    study_uid, factory, context = analysed_phantom(settings, stack_factory, tmp_path, [pacs])
    # Shadow: the model found the lesion, but the study stays routine, nothing is built or
    # sent, no alert is owed, and only an administrator's view shows the findings.
    assert tier_of(factory, study_uid) is Tier.ROUTINE
    with session_scope(factory) as session:
        assert session.scalars(select(ResultObject)).all() == []
        assert session.scalars(select(Delivery)).all() == []
        admin = study_record(db_session=session, study_uid=study_uid, include_shadow=True)
        reader = study_record(db_session=session, study_uid=study_uid, include_shadow=False)
    assert notifications(factory) == []
    assert results_in(pacs, study_uid) == {}
    assert admin is not None
    assert reader is not None
    (shadow_job,) = admin.jobs
    assert shadow_job.mode is ModelMode.SHADOW
    assert any(f.positive for f in shadow_job.findings)
    assert reader.jobs == []

    # Review: the next run raises the study at once, but its objects and alerts wait.
    with session_scope(factory) as session:
        set_mode(session, model_name=REFERENCE_MODEL, mode=ModelMode.REVIEW, actor="test")
    reprocess_by_uid(
        settings=settings, session_factory=factory, study_uid=study_uid, model=None, actor="test"
    )
    analyze_queued(context, factory)
    assert tier_of(factory, study_uid) is Tier.CRITICAL
    with session_scope(factory) as session:
        kinds = sorted(r.kind for r in session.scalars(select(ResultObject)))
        assert kinds == sorted([ResultKind.SEG, ResultKind.SR, ResultKind.KOS])
        assert session.scalars(select(Delivery)).all() == []
        record = study_record(db_session=session, study_uid=study_uid, include_shadow=False)
    assert record is not None
    assert [job.held for job in record.jobs] == [True]
    assert notifications(factory) == []
    assert results_in(pacs, study_uid) == {}

    # Approved: SEG, SR and KOS reach the PACS, once; the alerts are owed now.
    with session_scope(factory) as session:
        study = session.scalars(select(Study).where(Study.study_uid == study_uid)).one()
        approval = approve(
            session, study=study, targets=destinations(settings, db_session=session), actor="dr.a"
        )
        refresh(db_session=session, study=study, settings=settings)
    assert len(approval.jobs) == 1
    assert len(approval.deliveries) == 3
    assert deliver_all(context, factory) == 3
    held = results_in(pacs, study_uid)
    assert sorted(held.values()) == sorted(RESULT_CLASSES)
    assert sorted(notifications(factory)) == ["hl7", "webhook"]
    with session_scope(factory) as session:
        study = session.scalars(select(Study).where(Study.study_uid == study_uid)).one()
        again = approve(
            session, study=study, targets=destinations(settings, db_session=session), actor="dr.a"
        )
    assert again.jobs == []
    assert again.deliveries == []
    assert deliver_all(context, factory) == 0
    assert results_in(pacs, study_uid) == held


def test_a_later_version_that_finds_nothing_withdraws_the_earlier_results(
    pacs_settings: tuple[Settings, OrthancPeer], tmp_path: Path, stack_factory: StackFactory
) -> None:
    settings, pacs = pacs_settings
    study_uid, factory, context = analysed_phantom(settings, stack_factory, tmp_path, [pacs])
    assert deliver_all(context, factory) == 3
    first = results_in(pacs, study_uid)
    withdrawn = set(first)

    # Version 2 of the same model, which finds nothing.
    models_dir = tmp_path / "models"
    (models_dir / REFERENCE_MODEL).mkdir(parents=True)
    sidecar = {
        "name": REFERENCE_MODEL,
        "version": "2.0.0",
        "format": "python",
        "entry": "tests.helpers.negative_model:load",
        "applies_to": {"modalities": ["CT"], "body_parts": ["HEAD", "BRAIN"],
                       "description_patterns": ["(?i)head"]},
        "finding": {"code": "1386000", "scheme": "SCT", "meaning": "Intracranial hemorrhage"},
    }  # fmt: skip
    (models_dir / REFERENCE_MODEL / "model.json").write_text(json.dumps(sidecar))
    settings = settings.model_copy(update={"models_dir": models_dir})
    context = WorkerContext(settings)
    reprocess_by_uid(
        settings=settings, session_factory=factory, study_uid=study_uid, model=None, actor="test"
    )
    analyze_queued(context, factory)
    deliver_all(context, factory)

    now_held = results_in(pacs, study_uid)
    with session_scope(factory) as session:
        rows = {r.sop_instance_uid: r for r in session.scalars(select(ResultObject))}
        rejection = [r for r in rows.values() if r.kind == ResultKind.REJECTION]
        assert len(rejection) == 1
        assert rejection[0].sop_instance_uid in now_held
        assert {uid for uid, r in rows.items() if r.retracted_at is not None} == withdrawn
        record = study_record(db_session=session, study_uid=study_uid)
    assert record is not None
    assert sum(r.retracted_at is not None for r in record.results) == 3
    # The note in the PACS: titled "Rejected for Quality Reasons" (DCM 113001, PS3.16 CID 7010)
    # and referencing exactly the withdrawn objects.
    note = pacs.instance_dataset(rejection[0].sop_instance_uid)
    title = note.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator) == ("113001", "DCM")
    referenced = {
        item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for item in note.ContentSequence
        if "ReferencedSOPSequence" in item
    }
    assert referenced == withdrawn


class Receiver:
    """A webhook endpoint: keeps every JSON body posted to it."""

    def __init__(self) -> None:
        bodies: list[dict[str, Any]] = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                bodies.append(json.loads(self.rfile.read(length)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self.bodies = bodies
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receivers() -> Iterator[tuple[Receiver, Receiver]]:
    first, second = Receiver(), Receiver()
    yield first, second
    first.close()
    second.close()


def test_an_unacknowledged_critical_alert_is_escalated_once_an_acknowledged_one_is_not(
    pacs_settings: tuple[Settings, OrthancPeer],
    tmp_path: Path,
    stack_factory: StackFactory,
    receivers: tuple[Receiver, Receiver],
) -> None:
    first, second = receivers
    settings, pacs = pacs_settings
    settings = settings.model_copy(
        update={
            "webhook_url": first.url,
            "escalation_webhook_url": second.url,
            "alert_acknowledge_seconds": 2.0,
        }
    )
    study_uid, factory, context = analysed_phantom(settings, stack_factory, tmp_path, [pacs])
    notifier = Notifier(settings, factory)

    def pass_after(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            notifier.escalate_due()
            notifier.send_due()
            time.sleep(0.2)

    # Round 1: acknowledged within the time, never escalated.
    notifier.send_due()
    assert [b["event"] for b in first.bodies] == ["critical_finding"]
    with session_scope(factory) as session:
        acknowledge(session, study_uid=study_uid, reader="dr.a")
    pass_after(3.0)
    assert second.bodies == []

    # Round 2 (analysed again, a new alert): nobody acknowledges it; escalated once.
    reprocess_by_uid(
        settings=settings, session_factory=factory, study_uid=study_uid, model=None, actor="test"
    )
    analyze_queued(context, factory)
    pass_after(4.0)
    assert [b["event"] for b in first.bodies] == ["critical_finding"] * 2
    assert [b["event"] for b in second.bodies] == ["critical_finding_unacknowledged"]
    assert second.bodies[0]["study_uid"] == study_uid
    assert second.bodies[0]["round"] == 2
    with session_scope(factory) as session:
        record = study_record(db_session=session, study_uid=study_uid)
    assert record is not None
    reasons = [h.reason for h in record.priority_history]
    assert any(r.startswith("critical alert acknowledged by dr.a") for r in reasons)
    assert sum("not acknowledged within 2 s: escalated" in r for r in reasons) == 1


def test_key_image_feedback_and_stats_through_the_api(
    pacs_settings: tuple[Settings, OrthancPeer], tmp_path: Path, stack_factory: StackFactory
) -> None:
    settings, pacs = pacs_settings
    study_uid, factory, _ = analysed_phantom(settings, stack_factory, tmp_path, [pacs])
    with session_scope(factory) as session:
        reader = bearer(create_token(db_session=session, name="dr.a", role=TokenRole.RADIOLOGIST))
        admin = bearer(create_token(db_session=session, name="boss", role=TokenRole.ADMIN))
    app = create_app(settings, factory, CollectorRegistry())
    with TestClient(app) as client:
        row = client.get("/api/worklist", headers=reader).json()["items"][0]
        assert row["study_uid"] == study_uid
        assert row["key_image_url"] == f"/api/studies/{study_uid}/key-image"
        assert row["needs_acknowledgment"] is True
        image = client.get(row["key_image_url"], headers=reader)
        assert image.status_code == 200
        assert image.headers["content-type"] == "image/png"
        with Image.open(BytesIO(image.content)) as png:
            assert png.width >= 512  # the phantom's matrix: the slice at full size
            assert png.height > png.width  # the caption band below it
        record = client.get(f"/api/studies/{study_uid}", headers=reader).json()
        findings = [f for job in record["jobs"] for f in job["findings"]]
        lesion = next(f for f in findings if f["kind"] == "lesion" and f["positive"])
        assert (
            lesion["key_image_url"] == f"/api/studies/{study_uid}/key-image?finding={lesion['id']}"
        )
        assert client.get(lesion["key_image_url"], headers=reader).status_code == 200
        missing = client.get(f"/api/studies/{study_uid}/key-image?finding=999999", headers=reader)
        assert missing.status_code == 404
        assert client.get("/api/studies/1.2.3.4/key-image", headers=reader).status_code == 404

        hostile = "<img src=x onerror=alert(1)>"
        given = client.post(
            f"/api/studies/{study_uid}/feedback",
            headers=reader,
            json={"finding": lesion["id"], "verdict": "agree", "comment": hostile},
        )
        assert given.status_code == 201
        assert given.json()["reader"] == "dr.a"
        miss = {"finding": None, "verdict": "disagree", "comment": "missed a second bleed"}
        assert (
            client.post(f"/api/studies/{study_uid}/feedback", headers=reader, json=miss).status_code
            == 201
        )
        wrong = {"finding": 999999, "verdict": "agree"}
        assert (
            client.post(
                f"/api/studies/{study_uid}/feedback", headers=reader, json=wrong
            ).status_code
            == 422
        )
        bad = {"finding": None, "verdict": "maybe"}
        assert (
            client.post(f"/api/studies/{study_uid}/feedback", headers=reader, json=bad).status_code
            == 422
        )
        feedback = client.get(f"/api/studies/{study_uid}", headers=reader).json()["feedback"]
        assert [(f["finding"], f["verdict"], f["comment"]) for f in feedback] == [
            (lesion["id"], "agree", hostile),
            (None, "disagree", "missed a second bleed"),
        ]
        assert {f["model"] for f in feedback} == {REFERENCE_MODEL}

        acknowledged = client.post(f"/api/studies/{study_uid}/acknowledge", headers=reader)
        assert acknowledged.json()["acknowledged_by"] == "dr.a"
        row = client.get("/api/worklist", headers=reader).json()["items"][0]
        assert row["needs_acknowledgment"] is False

        assert client.get("/api/models/stats", headers=reader).status_code == 403
        (stats,) = client.get("/api/models/stats", headers=admin).json()
        assert (stats["model"], stats["mode"]) == (REFERENCE_MODEL, "clinical")
        totals = stats["totals"]
        assert (totals["analysed"], totals["positive_rate"], totals["alert_rate"]) == (1, 1.0, 1.0)
        assert (totals["feedback"], totals["agree"], totals["disagree"]) == (2, 1, 1)
        assert totals["agreement_rate"] == 0.5
        assert totals["ppv_estimate"] == 1.0  # the one verdict on a positive finding agreed
        assert stats["drift"]["samples"] == 1
        assert stats["drift"]["verdict"] is None  # far too few scores for a verdict
        metrics = client.get("/metrics", headers=reader).text
        assert (
            f'triage_model_studies_analysed{{model="{REFERENCE_MODEL}",version="1.0.0"}} 1.0'
            in metrics
        )

    exported = subprocess.run(
        [str(VENV_BIN / "triage-admin"), "feedback", "export", "--json"],
        env={**os.environ, **settings_env(settings)},
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    rows = json.loads(exported.stdout)
    assert [(r["study_uid"], r["verdict"], r["comment"]) for r in rows] == [
        (study_uid, "agree", hostile),
        (study_uid, "disagree", "missed a second bleed"),
    ]

    def admin_cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(VENV_BIN / "triage-admin"), *args],
            env={**os.environ, **settings_env(settings)},
            capture_output=True, text=True, check=False, timeout=120,
        )  # fmt: skip

    unknown = admin_cli("models", "mode", "nosuch", "review")
    assert unknown.returncode == 1
    assert "no model named 'nosuch'" in unknown.stderr
    assert len(unknown.stderr.strip().splitlines()) == 1
    changed = admin_cli("models", "mode", REFERENCE_MODEL, "review", "--version", "1.0.0", "--json")
    assert changed.returncode == 0, changed.stderr
    assert json.loads(changed.stdout)["mode"] == "review"
    stats_cli = admin_cli("models", "stats", "--json")
    assert stats_cli.returncode == 0, stats_cli.stderr
    (listed,) = json.loads(stats_cli.stdout)
    assert (listed["mode"], listed["totals"]["analysed"]) == ("review", 1)
    shown = admin_cli("study", "show", study_uid)
    assert shown.returncode == 0, shown.stderr
    assert "feedback" in shown.stdout
    assert hostile in shown.stdout  # printed as text


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def settings_env(settings: Settings) -> dict[str, str]:
    return {
        "TRIAGE_DATA_DIR": str(settings.data_dir),
        "TRIAGE_DATABASE_URL": settings.database_url,
    }
