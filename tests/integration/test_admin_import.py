"""``triage-admin import`` names each rejected file with its reason, fails unless rejections are
allowed, records them for ``status``, and stops cleanly on Ctrl-C with a resumable count."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import func, select

from tests.helpers.instances import ct_study
from tests.helpers.process import VENV_BIN, admin_with
from triage.config import Settings
from triage.db.models import AuditEvent, Instance
from triage.db.session import create_db_engine
from triage.heartbeat import ServeHeartbeat

pytestmark = pytest.mark.slow

INTERRUPTED = 130  # documented: an import stopped by Ctrl-C


def start_import(env: dict[str, str], *argv: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(VENV_BIN / "triage-admin"), "import", *argv],
        env={**os.environ, **env},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def upgraded_env(data_dir: Path, database_url: str) -> dict[str, str]:
    env = {
        "TRIAGE_DATA_DIR": str(data_dir),
        "TRIAGE_DATABASE_URL": database_url,
        "TRIAGE_SPOOL_MIN_FREE_MB": "1",
        "COLUMNS": "200",
    }
    upgraded = admin_with(env, "db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    return env


@pytest.fixture
def env(tmp_path: Path, database_url: str) -> dict[str, str]:
    """A data directory and an upgraded database, on SQLite and on PostgreSQL."""
    return upgraded_env(tmp_path / "data", database_url)


def instance_count(database_url: str) -> int:
    engine = create_db_engine(database_url)
    try:
        with engine.connect() as connection:
            return int(connection.scalar(select(func.count()).select_from(Instance)) or 0)
    finally:
        engine.dispose()


def rejections(database_url: str) -> list[tuple[str | None, dict[str, object]]]:
    engine = create_db_engine(database_url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                select(AuditEvent.actor, AuditEvent.detail).where(AuditEvent.kind == "rejection")
            )
            return [(actor, dict(detail)) for actor, detail in rows]
    finally:
        engine.dispose()


def bad_files(folder: Path, good: Path) -> list[Path]:
    """A text file, a DICOM file cut in half, and one without its SOP Instance UID."""
    folder.mkdir(parents=True, exist_ok=True)
    text = folder / "notes.txt"
    text.write_text("not DICOM\n")
    truncated = folder / "truncated.dcm"
    data = good.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    no_uid = folder / "no-sop-instance-uid.dcm"
    ds = dcmread(good)
    del ds.SOPInstanceUID
    ds.save_as(no_uid, enforce_file_format=True)
    return [text, truncated, no_uid]


def rejected_in_status(env: dict[str, str]) -> int:
    status = admin_with(env, "status", "--json")
    return sum(json.loads(status.stdout)["rejections_24h"].values())


def test_rejected_files_are_named_fail_the_import_and_count_in_status(
    env: dict[str, str], tmp_path: Path
) -> None:
    folder = tmp_path / "incoming"
    good = ct_study(folder / "study", 4).paths
    bad = bad_files(folder / "bad", good[0])
    files = len(good) + len(bad)

    first = admin_with(env, "import", str(folder))
    assert first.returncode == 1, first.stderr
    lines = first.stdout.splitlines()
    for path in bad:
        named = [line for line in lines if line.startswith(f"rejected {path}: ")]
        assert len(named) == 1, first.stdout
        assert named[0].removeprefix(f"rejected {path}: ").strip(), "a reason follows the path"
    assert not any(str(path) in first.stdout for path in good)
    assert f"stored {len(good)}" in lines[-1]
    assert f"rejected {len(bad)}" in lines[-1]
    closing = first.stderr.strip().splitlines()[-1]
    assert f"{len(bad)} of {files} files rejected" in closing
    assert "--allow-rejects" in closing
    assert "Traceback" not in first.stderr
    assert instance_count(env["TRIAGE_DATABASE_URL"]) == len(good)

    # Recorded for `status`, with the path (no patient data) and by whom.
    events = rejections(env["TRIAGE_DATABASE_URL"])
    assert sorted(str(detail["path"]) for _actor, detail in events) == sorted(map(str, bad))
    assert {actor for actor, _detail in events} == {"triage-admin import"}
    assert rejected_in_status(env) == len(bad)

    again = admin_with(env, "import", str(folder), "--json", "--allow-rejects")
    assert again.returncode == 0, again.stderr
    report = json.loads(again.stdout)
    assert set(report) == {"counts", "rejected", "files", "seconds", "interrupted"}
    assert report["counts"] == {
        "stored": 0,
        "new-version": 0,
        "duplicate": len(good),
        "rejected": len(bad),
        "out-of-resources": 0,
    }
    assert [r["path"] for r in report["rejected"]] == [str(p) for p in sorted(bad)]
    assert all(r["reason"] for r in report["rejected"])
    assert report["files"] == files
    assert isinstance(report["seconds"], float)
    assert report["seconds"] >= 0
    assert report["interrupted"] is False
    assert rejected_in_status(env) == 2 * len(bad)


def test_json_without_allow_rejects_still_fails(tmp_path: Path, sqlite_url: str) -> None:
    env = upgraded_env(tmp_path / "data", sqlite_url)
    folder = tmp_path / "incoming"
    good = ct_study(folder, 2).paths
    (folder / "junk.bin").write_bytes(b"\x00" * 300)

    result = admin_with(env, "import", str(folder), "--json")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["counts"]["stored"] == len(good)
    assert report["rejected"][0]["path"] == str(folder / "junk.bin")
    assert "--allow-rejects" in result.stderr.strip().splitlines()[-1]


def test_out_of_resources_fails_with_nothing_stored(tmp_path: Path, sqlite_url: str) -> None:
    env = upgraded_env(tmp_path / "data", sqlite_url)
    good = ct_study(tmp_path / "incoming", 3).paths
    beyond_any_disk = {"TRIAGE_SPOOL_MIN_FREE_MB": str(1 << 40)}

    result = admin_with({**env, **beyond_any_disk}, "import", str(tmp_path / "incoming"), "--json")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["counts"]["out-of-resources"] == len(good)
    assert report["counts"]["stored"] == 0
    assert report["interrupted"] is False
    assert "run the same import again" in result.stderr.strip().splitlines()[-1]
    assert instance_count(sqlite_url) == 0


def test_warns_when_no_triage_serve_runs(tmp_path: Path, sqlite_url: str) -> None:
    data_dir = tmp_path / "data"
    env = upgraded_env(data_dir, sqlite_url)
    first = ct_study(tmp_path / "first", 1).paths[0]

    alone = admin_with(env, "import", str(first))
    assert alone.returncode == 0, alone.stderr
    warnings = [line for line in alone.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, alone.stderr
    assert "triage serve is not running" in warnings[0]
    assert str(data_dir) in warnings[0]

    # A fresh heartbeat from a live process (this one) in the same data directory: serving.
    ServeHeartbeat(Settings(data_dir=data_dir, database_url=sqlite_url)).beat()
    second = ct_study(tmp_path / "second", 1).paths[0]
    served = admin_with(env, "import", str(second))
    assert served.returncode == 0, served.stderr
    assert "warning:" not in served.stderr


def interrupt_once_stored_beyond(process: subprocess.Popen[str], url: str, held: int) -> None:
    """SIGINT to ``process`` as soon as the database holds more than ``held`` instances
    (looked at every 10 ms: an import stores hundreds of files a second)."""
    engine = create_db_engine(url)
    deadline = time.monotonic() + 60
    try:
        with engine.connect() as connection:
            while connection.scalar(select(func.count()).select_from(Instance)) <= held:
                connection.rollback()  # a fresh snapshot for the next look
                assert process.poll() is None, (
                    f"import ended before Ctrl-C: {process.communicate()}"
                )
                assert time.monotonic() < deadline, "no instance stored in 60 s"
                time.sleep(0.01)
    finally:
        engine.dispose()
    process.send_signal(signal.SIGINT)


def test_ctrl_c_stops_cleanly_with_counts_and_a_rerun_resumes(
    env: dict[str, str], tmp_path: Path
) -> None:
    url = env["TRIAGE_DATABASE_URL"]
    folder = tmp_path / "incoming"
    files = sum(len(ct_study(folder / f"s{n}", 100).paths) for n in range(4))

    text = start_import(env, str(folder))
    interrupt_once_stored_beyond(text, url, 0)
    out, err = text.communicate(timeout=60)
    assert text.returncode == INTERRUPTED, err
    first = instance_count(url)
    assert 0 < first < files, "interrupted before the last file"
    assert f"interrupted after {first} of {files} files" in out
    assert f"stored {first}" in out
    assert "again" in err
    assert "resume" in err
    assert "Traceback" not in err

    as_json = start_import(env, str(folder), "--json")
    interrupt_once_stored_beyond(as_json, url, first)
    out, err = as_json.communicate(timeout=60)
    assert as_json.returncode == INTERRUPTED, err
    second = instance_count(url)
    assert first < second < files
    report = json.loads(out)
    assert report["interrupted"] is True
    assert report["files"] == files
    assert report["counts"]["duplicate"] == first
    assert report["counts"]["stored"] == second - first
    assert sum(report["counts"].values()) < files

    rest = admin_with(env, "import", str(folder), "--json")
    assert rest.returncode == 0, rest.stderr
    report = json.loads(rest.stdout)
    assert report["interrupted"] is False
    assert report["counts"]["duplicate"] == second
    assert report["counts"]["stored"] == files - second
    assert instance_count(url) == files
