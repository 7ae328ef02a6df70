"""Models through the job path: a MONAI bundle built here, and ``triage-admin models list``."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from pydicom import dcmread
from sqlalchemy import select

from bench.capacity import write_model
from tests.conftest import StackFactory
from tests.helpers.bundles import bundle_probability, cxr_settings, densenet_bundle
from tests.helpers.instances import radiograph
from tests.helpers.process import VENV_BIN
from triage.config import Settings
from triage.db.base import utcnow
from triage.db.models import AuditEvent, Finding, Job, ResultObject, Study
from triage.db.session import session_scope
from triage.domain import StudyStatus, WorkState
from triage.ingest.completion import StudyCompletionWatcher
from workers.analysis import analyze
from workers.context import WorkerContext


def test_monai_bundle_runs_through_the_job_path(
    settings: Settings, tmp_path: Path, stack_factory: StackFactory
) -> None:
    settings = cxr_settings(settings, tmp_path / "models")
    stack = stack_factory(settings)
    study = radiograph(tmp_path / "cr")
    stack.ingest(*study.paths)
    far = utcnow().replace(year=utcnow().year + 1)
    assert StudyCompletionWatcher(settings, stack.session_factory).poll(now=far) == [
        study.study_uid
    ]
    with session_scope(stack.session_factory) as session:
        job_id = session.scalars(select(Job.id)).one()

    assert analyze(WorkerContext(settings), job_id) == "done"
    with session_scope(stack.session_factory) as session:
        job = session.get(Job, job_id)
        assert job is not None
        assert job.state == WorkState.DONE
        assert job.series_uid == study.series_uid
        assert set(job.timings) >= {"load_decode", "preprocess", "model", "postprocess"}
        (finding,) = session.scalars(select(Finding)).all()
        assert finding.kind == "score"
        # The bundle's own network and preprocessing, run here on the image as pydicom reads it:
        # the job must report softmax(logits)[positive_class] of that, and compare it with the
        # bundle's operating point (0.5, written by densenet_bundle).
        expected = bundle_probability(tmp_path / "models" / "cxr-densenet", study.paths[0])
        assert abs(finding.probability - expected) < 1e-4
        assert finding.positive == (expected >= 0.5)
        assert (finding.code_scheme, finding.code_value) == ("SCT", "36118008")
        assert session.scalars(select(Study.status)).one() == StudyStatus.ANALYZED


def test_models_list_reports_each_model_and_why_one_fails(data_dir: Path, tmp_path: Path) -> None:
    models_dir = tmp_path / "models"
    densenet_bundle(models_dir)
    broken = models_dir / "broken"
    broken.mkdir()
    (broken / "model.json").write_text(
        json.dumps({"name": "broken", "version": "1", "format": "torchscript", "file": "gone.ts"})
    )
    # A Python pipeline (bench/capacity's fixed-latency model), and one whose module is absent.
    write_model(models_dir / "python", 0.0, {})
    (models_dir / "python" / "absent.json").write_text(
        json.dumps({"name": "absent", "version": "1", "format": "python", "entry": "nosuch:load"})
    )
    (models_dir / "python" / "unnamed.json").write_text(
        json.dumps({"name": "unnamed", "version": "1", "format": "python", "entry": "nosuch"})
    )
    env = {
        **os.environ,
        "TRIAGE_DATA_DIR": str(data_dir),
        "TRIAGE_MODELS_DIR": str(models_dir),
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
    }
    upgrade = [str(VENV_BIN / "triage-admin"), "db", "upgrade"]
    subprocess.run(upgrade, env=env, capture_output=True, timeout=300, check=True)
    result = subprocess.run(
        [str(VENV_BIN / "triage-admin"), "models", "list", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    statuses = {s["name"]: s for s in json.loads(result.stdout)}
    assert statuses["cxr-densenet"]["state"] == "loaded"
    assert statuses["cxr-densenet"]["device"] == "cpu"
    assert statuses["cxr-densenet"]["applies_to"] == "CR/DX CHEST"
    assert statuses["cxr-densenet"]["mode"] == "clinical"  # no mode set: the default
    assert statuses["broken"]["state"] == "error"
    assert "gone.ts" in statuses["broken"]["error"]
    assert statuses["fixed-latency"]["state"] == "loaded"
    assert statuses["fixed-latency"]["format"] == "python"
    assert statuses["absent"]["state"] == "error"
    assert "cannot import 'nosuch:load'" in statuses["absent"]["error"]
    assert statuses["unnamed"]["state"] == "error"
    assert "not 'module:function'" in statuses["unnamed"]["error"]


def test_findings_count_even_when_result_objects_cannot_be_built(
    settings: Settings, tmp_path: Path, stack_factory: StackFactory
) -> None:
    """A radiograph without Patient Orientation cannot be referenced in an SR; its score still
    ranks the worklist, and the administrator sees why nothing went to the PACS."""
    settings = cxr_settings(settings, tmp_path / "models")
    stack = stack_factory(settings)
    study = radiograph(tmp_path / "cr")
    ds = dcmread(study.paths[0])
    del ds.PatientOrientation
    ds.save_as(study.paths[0])
    stack.ingest(*study.paths)
    far = utcnow().replace(year=utcnow().year + 1)
    StudyCompletionWatcher(settings, stack.session_factory).poll(now=far)
    with session_scope(stack.session_factory) as session:
        job_id = session.scalars(select(Job.id)).one()
    assert analyze(WorkerContext(settings), job_id) == "done"
    with session_scope(stack.session_factory) as session:
        job = session.get(Job, job_id)
        assert job is not None
        assert job.state == WorkState.DONE
        assert job.reason is not None
        assert job.reason.startswith("findings stored; result objects not built")
        assert session.scalars(select(ResultObject)).all() == []
        kinds = session.scalars(select(AuditEvent.kind)).all()
        assert "results_failed" in kinds
