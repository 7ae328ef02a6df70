"""``triage-admin study show`` as a PACS administrator reads it: labelled sections with the
series, result objects and a failing delivery's last error, every UID whole at 80 columns, times
in the local zone to the second, and no patient identity."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import select

from tests.conftest import StackFactory, free_port
from tests.helpers.pipeline import analysed_phantom
from tests.helpers.process import VENV_BIN, admin_with, under_a_terminal
from triage.config import DimseDestination, Settings
from triage.db.base import utcnow
from triage.db.models import (
    Delivery,
    Feedback,
    Finding,
    Job,
    PriorityChange,
    ResultObject,
    Study,
    WorklistEntry,
)
from triage.db.session import SessionFactory, session_scope
from triage.domain import StudyStatus, Verdict
from workers.dispatch import dispatch

pytestmark = pytest.mark.slow

PARIS = ZoneInfo("Europe/Paris")
HEADERS = ("study", "worklist", "series", "jobs", "results", "deliveries", "priority history",
           "feedback")  # fmt: skip
MICROSECONDS = re.compile(r"\d\d:\d\d:\d\d[.,]\d")
BARE_UID = "1.2.826.0.1.3680043.8.498.99999999999999999999999999999999999999"


def _local(at: datetime) -> str:
    return at.astimezone(PARIS).strftime("%Y-%m-%d %H:%M:%S")


def _header(name: str, text: str) -> re.Match[str] | None:
    return re.search(rf"^{re.escape(name)}( \(\d+\):|: none|:| \(times in \w+\):)$", text, re.M)


@dataclass(frozen=True)
class Shown:
    """A study to show, the environment ``triage-admin`` needs for it (Paris time), and what
    the database holds of it."""

    study_uid: str
    env: dict[str, str]
    result_uids: list[str]
    series_uids: list[str]
    delivery_block: str  # how the failing delivery must be shown
    error: str
    attempts: int
    times: list[datetime]
    acknowledged_at: datetime
    identity: list[str]


def _facts(factory: SessionFactory, study_uid: str, env: dict[str, str]) -> Shown:
    with session_scope(factory) as session:
        study = session.scalars(select(Study).where(Study.study_uid == study_uid)).one()
        jobs = list(session.scalars(select(Job).where(Job.study_id == study.id)))
        results = list(session.scalars(select(ResultObject).order_by(ResultObject.id)))
        failing = session.scalars(select(Delivery).where(Delivery.last_error.is_not(None))).one()
        entry = session.scalars(select(WorklistEntry)).one()
        assert failing.last_error is not None
        assert entry.acknowledged_at is not None
        times = [study.first_received_at, study.completed_at, failing.next_attempt_at]
        times += [t for j in jobs for t in (j.queued_at, j.started_at, j.finished_at)]
        times += [r.retracted_at for r in results]
        times += session.scalars(select(PriorityChange.changed_at))
        times += session.scalars(select(Feedback.at))
        return Shown(
            study_uid=study_uid,
            env=env,
            result_uids=[r.sop_instance_uid for r in results],
            series_uids=[s.series_uid for s in study.series],
            delivery_block=(
                f"delivery {failing.id}: {failing.result.kind} -> main-pacs, queued\n"
                f"    SOP UID      {failing.result.sop_instance_uid}\n"
                f"    attempts     {failing.attempts}\n"
                f"    last error   {failing.last_error}\n"
            ),
            error=failing.last_error,
            attempts=failing.attempts,
            times=[t for t in times if t is not None],
            acknowledged_at=entry.acknowledged_at,
            identity=[v for v in (study.patient_name, study.patient_id) if v],
        )


@pytest.fixture
def shown(
    settings: Settings, database_url: str, tmp_path: Path, stack_factory: StackFactory
) -> Shown:
    """An analysed lesion phantom whose results go to an unreachable PACS (one attempt made),
    acknowledged, with a reader's verdict and a withdrawn result; and a bare study."""
    nope = DimseDestination(name="main-pacs", ae_title="NOPE", host="127.0.0.1", port=free_port())
    settings = settings.model_copy(update={"database_url": database_url, "destinations": [nope]})
    study_uid, factory, context = analysed_phantom(settings, stack_factory, tmp_path)
    with session_scope(factory) as session:
        first = session.scalars(select(Delivery.id).order_by(Delivery.id)).first()
    assert first is not None
    assert dispatch(context, first).state == "retrying"
    now = utcnow()
    with session_scope(factory) as session:
        study = session.scalars(select(Study).where(Study.study_uid == study_uid)).one()
        finding = session.scalars(select(Finding).order_by(Finding.id)).first()
        assert finding is not None
        session.add(
            Feedback(
                study_id=study.id, finding_id=finding.id, model_name="m", model_version="1",
                label=finding.label, probability=finding.probability, positive=finding.positive,
                verdict=Verdict.AGREE, comment="seen on the CT", reader="dr.who",
            )
        )  # fmt: skip
        entry = session.scalars(select(WorklistEntry)).one()
        entry.acknowledged_at, entry.acknowledged_by = now, "dr.who"
        withdrawn = session.scalars(select(ResultObject).order_by(ResultObject.id)).first()
        assert withdrawn is not None
        withdrawn.retracted_at = now
        session.add(
            Study(
                study_uid=BARE_UID, status=StudyStatus.RECEIVING, first_received_at=now,
                last_received_at=now,
            )
        )  # fmt: skip
    env = {
        "TRIAGE_DATA_DIR": str(settings.data_dir),
        "TRIAGE_DATABASE_URL": database_url,
        "TZ": "Europe/Paris",
    }
    return _facts(factory, study_uid, env)


def test_study_show_prints_every_section_whole_uids_the_error_and_local_times(
    shown: Shown,
) -> None:
    piped = admin_with(shown.env, "study", "show", shown.study_uid, columns=80)
    assert piped.returncode == 0, piped.stderr
    status, printed = under_a_terminal(
        [str(VENV_BIN / "triage-admin"), "study", "show", shown.study_uid], shown.env
    )
    assert status == 0, printed
    for text in (piped.stdout, printed):
        for name in HEADERS:
            assert _header(name, text), f"no {name!r} section in:\n{text}"
        assert f"(times in {datetime.now(PARIS).tzname()}):" in text
        for uid in [shown.study_uid, *shown.result_uids, *shown.series_uids]:
            assert re.search(rf"(^|\s){re.escape(uid)}$", text, re.M), f"{uid} cut in:\n{text}"
        assert shown.delivery_block in text, text
        assert f"acknowledged by dr.who at {_local(shown.acknowledged_at)}" in text
        assert "comment      seen on the CT" in text
        assert not MICROSECONDS.search(text), text
        for at in shown.times:
            assert _local(at) in text, f"{at} not shown as {_local(at)} in:\n{text}"
        assert shown.times[0].strftime("%Y-%m-%d %H:%M:%S") not in text  # received, in UTC
        for identity in shown.identity:
            assert identity not in text


def test_study_show_says_none_for_empty_sections_and_json_has_the_new_fields(
    shown: Shown,
) -> None:
    bare = admin_with(shown.env, "study", "show", BARE_UID, columns=80)
    assert bare.returncode == 0, bare.stderr
    for name in HEADERS[1:]:
        assert re.search(rf"^{name}: none$", bare.stdout, re.M), bare.stdout
    record = json.loads(
        admin_with(shown.env, "study", "show", shown.study_uid, "--json", columns=80).stdout
    )
    failing = next(d for d in record["deliveries"] if d["last_error"])
    assert (failing["last_error"], failing["attempts"]) == (shown.error, shown.attempts)
    assert failing["state"] == "queued"
    assert failing["next_attempt_at"] is not None
    assert failing["result_uid"] in shown.result_uids
    assert all(d["next_attempt_at"] is None for d in record["deliveries"] if d["state"] != "queued")
    (job,) = record["jobs"]
    assert job["queued_at"] <= job["started_at"] <= job["finished_at"]
    assert {"patient_name", "patient_id", "status", "worklist", "series"} <= record.keys()
