"""``triage-admin`` as an administrator uses it: real processes on a real database."""

from __future__ import annotations

import json
import subprocess
from datetime import timedelta
from pathlib import Path

from pynetdicom import AE
from sqlalchemy import select

from tests.conftest import StackFactory, free_port
from tests.helpers.bundles import cxr_settings
from tests.helpers.instances import radiograph
from tests.helpers.process import run_admin
from triage.config import Settings
from triage.db.base import utcnow
from triage.db.models import Delivery, Job, ResultObject
from triage.db.session import session_scope
from triage.domain import ResultKind, WorkState
from triage.ingest.completion import StudyCompletionWatcher


def admin(settings: Settings, *argv: str) -> subprocess.CompletedProcess[str]:
    return run_admin(settings, *argv)


def test_study_worklist_reprocess_and_failures(
    settings: Settings, tmp_path: Path, stack_factory: StackFactory
) -> None:
    settings = cxr_settings(settings, tmp_path / "models")
    stack = stack_factory(settings)
    study = radiograph(tmp_path / "cr")
    stack.ingest(*study.paths)
    watcher = StudyCompletionWatcher(settings, stack.session_factory)
    watcher.association_ended({study.study_uid})
    assert watcher.poll(now=utcnow() + timedelta(seconds=5)) == [study.study_uid]

    listing = admin(settings, "worklist", "--json")
    assert listing.returncode == 0, listing.stderr
    (row,) = json.loads(listing.stdout)
    assert row["study_uid"] == study.study_uid
    assert row["tier"] == "routine"
    assert "AI analysis pending" in row["reason"]
    table = admin(settings, "worklist")
    assert study.study_uid in table.stdout

    shown = json.loads(admin(settings, "study", "show", study.study_uid, "--json").stdout)
    assert shown["status"] == "analyzing"
    assert [j["model"] for j in shown["jobs"]] == ["cxr-densenet"]
    assert admin(settings, "study", "show", "1.2.3.4").returncode == 1

    # The job fails for good, and a delivery too: both are listed, then retried.
    with session_scope(stack.session_factory) as session:
        job = session.scalars(select(Job)).one()
        job.state, job.reason = WorkState.FAILED, "PermanentError: no series fits the model"
        result = ResultObject(
            job_id=job.id, kind=ResultKind.SR, sop_class_uid="1.2.3", sop_instance_uid="2.25.1",
            series_uid="2.25.2", file_id="f" * 32,
        )  # fmt: skip
        session.add(result)
        session.flush()
        session.add(
            Delivery(
                result_id=result.id, destination="PACS", state=WorkState.FAILED, attempts=10,
                last_error="PACS at 10.0.0.5:104 could not be reached",
            )
        )  # fmt: skip
    failures = json.loads(admin(settings, "failures", "list", "--json").stdout)
    assert sorted((f["kind"], f["attempts"]) for f in failures) == [("delivery", 10), ("job", 0)]
    assert "could not be reached" in admin(settings, "failures", "list").stdout
    retried = admin(settings, "failures", "retry", "--all")
    assert retried.returncode == 0, retried.stderr
    assert "re-queued 1 job(s) and 1 delivery(ies)" in retried.stdout
    assert json.loads(admin(settings, "failures", "list", "--json").stdout) == []
    assert admin(settings, "failures", "retry").returncode == 1  # says what to name

    requeued = admin(settings, "reprocess", study.study_uid)
    assert requeued.returncode == 0, requeued.stderr
    assert "queued 1 job(s)" in requeued.stdout
    after = json.loads(admin(settings, "study", "show", study.study_uid, "--json").stdout)
    assert after["analysis_round"] == 2
    assert after["jobs"][0]["round"] == 2
    missing = admin(settings, "reprocess", study.study_uid, "--model", "no-such-model")
    assert missing.returncode == 1
    assert "model not installed: no-such-model" in missing.stderr


def test_tokens(settings: Settings) -> None:
    assert admin(settings, "db", "upgrade").returncode == 0
    created = admin(settings, "tokens", "create", "dr.who", "--role", "radiologist")
    assert created.returncode == 0, created.stderr
    assert created.stdout.strip().startswith("trg_")
    again = admin(settings, "tokens", "create", "dr.who")
    assert again.returncode == 1
    assert "exists" in again.stderr
    assert admin(settings, "tokens", "revoke", "dr.who").returncode == 0
    assert admin(settings, "tokens", "revoke", "dr.who").returncode == 1
    assert admin(settings, "tokens", "create", "dr.who").returncode == 0  # the name is free again


def test_peers(settings: Settings) -> None:
    assert admin(settings, "db", "upgrade").returncode == 0
    ae = AE(ae_title="PACS")
    ae.add_supported_context("1.2.840.10008.1.1")
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False)
    try:
        added = admin(settings, "peers", "add", "main-pacs", f"PACS@127.0.0.1:{port}")
        assert added.returncode == 0, added.stderr
        assert (
            admin(settings, "peers", "add", "web", "https://pacs.example/dicom-web").returncode == 0
        )
        assert admin(settings, "peers", "add", "bad", "nonsense").returncode == 1
        peers = json.loads(admin(settings, "peers", "list", "--json").stdout)
        assert [(p["name"], p["kind"]) for p in peers] == [
            ("main-pacs", "dimse"),
            ("web", "dicomweb"),
        ]
        echo = admin(settings, "peers", "echo", "main-pacs")
        assert echo.returncode == 0, echo.stderr
        assert "main-pacs: OK" in echo.stdout
    finally:
        server.shutdown()
    down = admin(settings, "peers", "echo", "main-pacs")
    assert down.returncode == 1
    assert "could not be reached" in down.stderr
    assert admin(settings, "peers", "remove", "web").returncode == 0
    assert admin(settings, "peers", "remove", "web").returncode == 1
