"""The command lines as an administrator runs them: real processes, real databases."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.helpers.process import VENV_BIN


def run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_version() -> None:
    result = run([str(VENV_BIN / "triage"), "--version"], {})
    assert result.returncode == 0
    assert result.stdout.startswith("triage 0.")


def test_db_upgrade_then_status(database_url: str, data_dir: Path) -> None:
    env = {"TRIAGE_DATABASE_URL": database_url, "TRIAGE_DATA_DIR": str(data_dir)}
    admin = str(VENV_BIN / "triage-admin")
    first = run([admin, "db", "upgrade"], env)
    assert first.returncode == 0, first.stderr
    assert "upgraded from empty to" in first.stdout
    second = run([admin, "db", "upgrade"], env)
    assert second.returncode == 0
    assert "already at revision" in second.stdout

    status = run([admin, "status", "--json"], env)
    assert status.returncode == 3, status.stderr  # unhealthy: triage serve never ran here
    report = json.loads(status.stdout)
    assert report["instances"] == 0
    assert report["studies"] == {}
    # The embedded broker is triage serve's to create; status does not make one.
    assert report["queue_depth"] == {"inference": None, "dispatch": None}
    assert not (data_dir / "broker.sqlite").exists()
    serve = next(c for c in report["health"]["checks"] if c["name"] == "serve")
    assert serve["state"] == "down"
    assert "never started" in serve["detail"]


def test_status_before_upgrade_says_what_to_do(sqlite_url: str, data_dir: Path) -> None:
    env = {"TRIAGE_DATABASE_URL": sqlite_url, "TRIAGE_DATA_DIR": str(data_dir)}
    result = run([str(VENV_BIN / "triage-admin"), "status"], env)
    assert result.returncode == 1
    assert "triage-admin db upgrade" in result.stderr


@pytest.mark.parametrize(
    "argv",
    [["triage-admin", "status"], ["triage-admin", "db", "upgrade"], ["triage", "serve"]],
)
def test_wrong_setting_gives_one_line_and_status_2(argv: list[str], data_dir: Path) -> None:
    env = {"TRIAGE_DICOM_PORT": "abc", "TRIAGE_DATA_DIR": str(data_dir)}
    result = run([str(VENV_BIN / argv[0]), *argv[1:]], env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: invalid configuration: dicom_port: Input should be a valid integer, unable to "
        "parse string as an integer (got 'abc')"
    ]
    assert "Traceback" not in result.stdout + result.stderr


def test_help_texts_speak_to_administrators() -> None:
    result = run([str(VENV_BIN / "triage-admin"), "--help"], {"COLUMNS": "120"})
    assert result.returncode == 0
    for command in ("db", "status"):
        assert command in result.stdout
    serve = run([str(VENV_BIN / "triage"), "serve", "--help"], {"COLUMNS": "120"})
    assert "DICOM listener" in serve.stdout
    assert "TRIAGE_CONFIG" in serve.stdout
