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
    settings: Settings, tmp_path: Path, stack_factory: StackFactory, database_url: str
) -> None:
    settings = cxr_settings(settings, tmp_path / "models")
    settings = settings.model_copy(update={"database_url": database_url})
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
    # the job gave up before its last attempt (a permanent error); the delivery used all ten
    # of delivery_max_attempts' default (config.py's documented default)
    assert sorted((f["kind"], f["attempts"], f["permanent"]) for f in failures) == [
        ("delivery", 10, False),
        ("job", 0, True),
    ]
    listed = admin(settings, "failures", "list").stdout
    assert "could not be reached" in listed
    assert study.study_uid in listed
    retried = admin(settings, "failures", "retry", "--all")
    assert retried.returncode == 0, retried.stderr
    assert "re-queued 1 job(s) and 1 delivery(ies)" in retried.stdout
    job_id = next(f["id"] for f in failures if f["kind"] == "job")
    # a permanent failure will fail again: the retry says so; and no worker runs here
    assert f"job {job_id} failed on attempt 0 of 6" in retried.stderr
    assert retried.stderr.count("retrying does not fix") == 1  # not the delivery
    assert "no worker has consumed the inference queue" in retried.stderr
    assert "no worker has consumed the dispatch queue" in retried.stderr
    assert json.loads(admin(settings, "failures", "list", "--json").stdout) == []
    assert admin(settings, "failures", "retry").returncode == 1  # says what to name

    requeued = admin(settings, "reprocess", study.study_uid)
    assert requeued.returncode == 0, requeued.stderr
    assert "queued 1 job(s)" in requeued.stdout
    assert "no worker has consumed the inference queue" in requeued.stderr
    again = admin(settings, "reprocess", study.study_uid, "--json")
    assert again.returncode == 0, again.stderr
    reply = json.loads(again.stdout)
    assert reply["study_uid"] == study.study_uid
    assert len(reply["jobs"]) == 1
    after = json.loads(admin(settings, "study", "show", study.study_uid, "--json").stdout)
    assert after["analysis_round"] == 3
    assert after["jobs"][0]["round"] == 3
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


def test_destinations(settings: Settings) -> None:
    assert admin(settings, "db", "upgrade").returncode == 0
    ae = AE(ae_title="PACS")
    ae.add_supported_context("1.2.840.10008.1.1")
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False)
    try:
        added = admin(settings, "destinations", "add", "main-pacs", f"PACS@127.0.0.1:{port}")
        assert added.returncode == 0, added.stderr
        web = admin(settings, "destinations", "add", "web", "https://pacs.example/dicom-web")
        assert web.returncode == 0
        assert admin(settings, "destinations", "add", "bad", "nonsense").returncode == 1
        listed = json.loads(admin(settings, "destinations", "list", "--json").stdout)
        fields = ("name", "kind", "ae_title", "host", "port", "url", "tls", "defined_by")
        assert [tuple(d[f] for f in fields) for d in listed] == [
            ("main-pacs", "dimse", "PACS", "127.0.0.1", port, None, False, "added"),
            ("web", "dicomweb", None, None, None, "https://pacs.example/dicom-web", True, "added"),
        ]
        assert [(d["state"], d["backlog"], d["last_error"]) for d in listed] == [
            ("up", 0, None),
            ("up", 0, None),
        ]
        echo = admin(settings, "destinations", "echo", "main-pacs")
        assert echo.returncode == 0, echo.stderr
        assert "main-pacs: OK" in echo.stdout
        as_json = json.loads(admin(settings, "destinations", "echo", "main-pacs", "--json").stdout)
        assert as_json["ok"] is True
        assert as_json["port"] == port
        # the group's first name still works, for scripts written for it
        assert admin(settings, "peers", "echo", "main-pacs").returncode == 0
    finally:
        server.shutdown()
    down = admin(settings, "destinations", "echo", "main-pacs")
    assert down.returncode == 1
    assert "could not be reached" in down.stderr
    assert len(down.stderr.strip().splitlines()) == 1, down.stderr  # no pynetdicom log lines
    down_json = admin(settings, "destinations", "echo", "main-pacs", "--json")
    assert down_json.returncode == 1
    assert json.loads(down_json.stdout)["ok"] is False
    assert admin(settings, "destinations", "remove", "web").returncode == 0
    gone = admin(settings, "destinations", "remove", "web")
    assert gone.returncode == 1
    assert "no destination named web" in gone.stderr
