"""triage's own results over QIDO-RS and WADO-RS: each SEG and SR is found, counted and
retrieved like any series of its study (here the reference model's, on a lesion phantom)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from tests.conftest import StackFactory
from tests.helpers.phantoms import phantom_study
from triage.config import Settings
from triage.db.base import utcnow
from triage.db.models import Job, ResultObject
from triage.db.session import session_scope
from triage.dicomweb.qido import Level, parse_query, search
from triage.dicomweb.wado import instances
from triage.ingest.completion import StudyCompletionWatcher
from workers.analysis import analyze
from workers.context import WorkerContext

pytestmark = pytest.mark.slow

SEG = "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage (PS3.4 B.5)


def test_results_are_series_of_their_study(
    settings: Settings, stack_factory: StackFactory, tmp_path: Path
) -> None:
    study = phantom_study(tmp_path / "study", 100_011, lesion=True)
    stack = stack_factory(settings)
    stack.ingest(*study.paths)
    far = utcnow().replace(year=utcnow().year + 1)
    assert StudyCompletionWatcher(settings, stack.session_factory).poll(now=far)
    with session_scope(stack.session_factory) as session:
        job_id = session.scalars(select(Job.id)).one()
    assert analyze(WorkerContext(settings), job_id) == "done"
    with session_scope(stack.session_factory) as session:
        made = {
            row.sop_instance_uid: (row.series_uid, row.sop_class_uid, row.file_id)
            for row in session.scalars(select(ResultObject))
        }
    assert len(made) == 3  # a SEG, an SR and a Key Object Selection

    def run(level: Level, *params: tuple[str, str], **fixed: str) -> list[dict[str, Any]]:
        with session_scope(stack.session_factory) as session:
            query = parse_query(level, list(params), fixed=fixed or None)
            return search(session, query, lambda uids: "")

    series = run(Level.SERIES, StudyInstanceUID=study.study_uid)
    modalities = sorted(row["00080060"]["Value"][0] for row in series)
    assert modalities == ["CT", "KO", "SEG", "SR"]
    assert {row["0020000E"]["Value"][0] for row in series} >= {s for s, _, _ in made.values()}
    seg = run(Level.INSTANCE, ("SOPClassUID", SEG))
    assert [row["00080018"]["Value"][0] for row in seg] == [
        uid for uid, (_, sop_class, _) in made.items() if sop_class == SEG
    ]
    (found,) = run(Level.STUDY, ("StudyInstanceUID", study.study_uid))
    assert found["00201206"]["Value"] == [4]  # the CT series, the SEG's, the SR's, the KOS's
    assert found["00201208"]["Value"] == [len(study.paths) + 3]
    assert run(Level.SERIES, ("Modality", "SR"), StudyInstanceUID=study.study_uid)

    with session_scope(stack.session_factory) as session:
        held = instances(session, stack.spool, settings.data_dir / "results", study.study_uid)
    results = [item for item in held if item.sop_instance_uid in made]
    assert [item.sop_instance_uid for item in held[-3:]] == [r.sop_instance_uid for r in results]
    for item in results:
        _, _, file_id = made[item.sop_instance_uid]
        assert item.path == settings.data_dir / "results" / f"{file_id}.dcm"
        assert item.path.read_bytes()[128:132] == b"DICM"
