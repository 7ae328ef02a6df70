"""``triage-admin`` as an administrator meets it: one line per error with its fix and the
documented exit status, warnings for misspelt variables, IDs never cut at 80 columns (issue 20)."""

from __future__ import annotations

import socket
import subprocess
from datetime import timedelta
from pathlib import Path

import pytest

from tests.conftest import free_port, migrated_engine
from tests.helpers.process import VENV_BIN, admin_with, under_a_terminal
from triage.api.tokens import create_token
from triage.db.base import utcnow
from triage.db.models import Study
from triage.db.session import make_session_factory, session_scope
from triage.domain import StudyStatus, TokenRole
from triage.worklist.policy import PolicyConfig
from triage.worklist.service import reprioritize


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    return lines[0]


@pytest.fixture
def database(tmp_path: Path, database_url: str) -> dict[str, str]:
    """A data directory and a current schema, on SQLite and on PostgreSQL."""
    data_dir = tmp_path / "data"
    env = {"TRIAGE_DATA_DIR": str(data_dir), "TRIAGE_DATABASE_URL": database_url}
    assert admin_with(env, "db", "upgrade", columns=200).returncode == 0
    return env


def test_a_list_setting_that_is_not_json_is_one_line_and_status_2(tmp_path: Path) -> None:
    env = {"TRIAGE_DATA_DIR": str(tmp_path), "TRIAGE_DESTINATIONS": "NOPE@127.0.0.1:9"}
    result = admin_with(env, "status", columns=200)
    assert result.returncode == 2
    line = one_line(result)
    assert "TRIAGE_DESTINATIONS is not valid JSON" in line


def test_a_database_url_that_is_not_one_is_one_line_and_status_2(tmp_path: Path) -> None:
    env = {"TRIAGE_DATA_DIR": str(tmp_path), "TRIAGE_DATABASE_URL": "nonsense"}
    result = admin_with(env, "worklist", columns=200)
    assert result.returncode == 2
    assert "database_url 'nonsense' is not a database URL" in one_line(result)


def test_a_misspelt_variable_is_named_with_the_likely_one(database: dict[str, str]) -> None:
    result = admin_with({**database, "TRIAGE_DATABSE_URL": "sqlite:///x"}, "worklist", columns=200)
    assert result.returncode == 0
    assert "TRIAGE_DATABSE_URL is not a triage setting" in result.stderr
    assert "did you mean TRIAGE_DATABASE_URL?" in result.stderr


def test_serve_on_a_port_in_use_is_one_line_naming_the_setting(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {
            "TRIAGE_DATA_DIR": str(tmp_path),
            "TRIAGE_DICOM_PORT": str(port),
            "TRIAGE_HTTP_PORT": str(free_port()),
        }
        result = admin_with(env, "serve", columns=200, program="triage")
    assert result.returncode == 1
    line = one_line(result)
    assert f":{port} (dicom_port)" in line
    assert "in use" in line


def test_retrying_what_is_not_a_failure_is_an_error(database: dict[str, str]) -> None:
    result = admin_with(database, "failures", "retry", "--job", "9999", columns=200)
    assert result.returncode == 1
    assert "job 9999" in one_line(result)


def test_tokens_list_shows_names_and_roles_never_the_token(database: dict[str, str]) -> None:
    made = admin_with(database, "tokens", "create", "dr.who", "--role", "radiologist", columns=200)
    token = made.stdout.strip().splitlines()[-1]
    listed = admin_with(database, "tokens", "list", "--json", columns=200)
    assert listed.returncode == 0
    assert '"name": "dr.who"' in listed.stdout
    assert '"role": "radiologist"' in listed.stdout
    assert token not in listed.stdout + admin_with(database, "tokens", "list", columns=200).stdout
    names = admin_with(database, "tokens", "list", "-o", "name")
    assert names.stdout.splitlines() == ["dr.who"]


def test_version_and_short_help() -> None:
    version = admin_with({}, "--version", columns=200)
    assert version.returncode == 0
    assert version.stdout.startswith("triage-admin ")
    helped = admin_with({}, "-h", columns=200)
    assert helped.returncode == 0
    assert "status" in helped.stdout


def test_worklist_at_80_columns_prints_every_study_uid_and_accession_whole(
    database: dict[str, str],
) -> None:
    url = database["TRIAGE_DATABASE_URL"]
    now = utcnow()
    uids = [f"1.2.826.0.1.3680043.8.498.{n}" + "1" * (60 - 27) for n in range(3)]
    accessions = [f"ACC{n:013d}" for n in range(3)]  # SH: 16 characters, all used
    for engine in migrated_engine(url):
        factory = make_session_factory(engine)
        with session_scope(factory) as session:
            for n, (uid, accession) in enumerate(zip(uids, accessions, strict=True)):
                study = Study(
                    study_uid=uid[:64],
                    accession_number=accession,
                    status=StudyStatus.ANALYZED,
                    modalities="CT",
                    order_priority="STAT" if n == 0 else None,
                    first_received_at=now - timedelta(minutes=5 + n),
                    last_received_at=now - timedelta(minutes=5 + n),
                )
                session.add(study)
                session.flush()
                reprioritize(
                    db_session=session, study=study, now=now, config=PolicyConfig(), models={}
                )
            create_token(db_session=session, name="x", role=TokenRole.ADMIN)
    status, printed = under_a_terminal([str(VENV_BIN / "triage-admin"), "worklist"], database)
    assert status == 0, printed
    for uid, accession in zip(uids, accessions, strict=True):
        assert uid[:64] in printed, printed
        assert accession in printed
    assert max(len(line) for line in printed.splitlines() if "acc " not in line) <= 80
    names = admin_with(database, "worklist", "-o", "name", columns=200).stdout.split()
    assert names == [uids[0][:64], uids[2][:64], uids[1][:64]]  # STAT first, then the oldest
