"""``triage-admin status`` tells a healthy triage from a dead one and names a failing
destination; read commands create nothing and fail with one line (issue 20)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from tests.conftest import StackFactory, free_port
from tests.helpers import orthanc as peers
from tests.helpers.orthanc import OrthancFactory
from tests.helpers.pipeline import analysed_phantom
from tests.helpers.process import admin_with, run_admin, serve_env, serving, wait_for
from triage.config import DimseDestination, Settings
from triage.db.models import Delivery
from triage.db.session import session_scope
from workers.dispatch import dispatch

pytestmark = pytest.mark.slow

orthanc_factory = peers.orthanc_factory

UNHEALTHY = 3  # documented: `triage-admin status` when something is down or failing


@pytest.mark.parametrize(
    "argv",
    [
        ("status",),
        ("worklist",),
        ("study", "show", "1.2.3"),
        ("failures", "list"),
        ("models", "stats"),
        ("feedback", "export"),
        ("reprocess", "1.2.3"),
    ],
)
def test_read_commands_before_any_database_create_nothing_and_say_so_in_one_line(
    tmp_path: Path, argv: tuple[str, ...]
) -> None:
    data_dir = tmp_path / "elsewhere" / "triage-data"
    result = admin_with({"TRIAGE_DATA_DIR": str(data_dir)}, *argv)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "no database at" in lines[0]
    assert str(data_dir) in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "elsewhere").exists()


def test_a_database_without_schema_is_one_line_naming_the_fix(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "triage.sqlite").touch()  # a database, but empty
    result = admin_with({"TRIAGE_DATA_DIR": str(data_dir)}, "worklist")
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1
    assert "triage-admin db upgrade" in result.stderr


def test_a_postgresql_database_without_schema_is_one_line_naming_the_fix(
    tmp_path: Path, postgres_url: str
) -> None:
    env = {"TRIAGE_DATA_DIR": str(tmp_path / "data"), "TRIAGE_DATABASE_URL": postgres_url}
    for argv in (("worklist",), ("status",), ("failures", "list"), ("destinations", "list")):
        result = admin_with(env, *argv)
        assert result.returncode == 1, argv
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "triage-admin db upgrade" in result.stderr
        assert "Traceback" not in result.stderr


def test_status_says_serve_is_down_after_sigkill_and_exits_unhealthy(
    tmp_path: Path, database_url: str
) -> None:
    env = serve_env(tmp_path / "data", workers="1", database_url=database_url)
    with serving(env, tmp_path / "serve.log") as serve:

        def healthy() -> bool:
            return admin_with(env, "status").returncode == 0

        wait_for(healthy, timeout=120, what="status to report triage healthy")
        report = json.loads(admin_with(env, "status", "--json").stdout)["health"]
        states = {check["name"]: check["state"] for check in report["checks"]}
        assert states == dict.fromkeys(
            ["database", "serve", "dicom listener", "http", "broker", "workers: inference",
             "workers: dispatch"],
            "up",
        )  # fmt: skip
        os.killpg(serve.pid, signal.SIGKILL)
        serve.wait()
        killed_at = time.monotonic()
        result = admin_with(env, "status")
    assert time.monotonic() - killed_at < 15  # within the heartbeat's stale time
    assert result.returncode == UNHEALTHY
    assert "UNHEALTHY" in result.stdout
    report = json.loads(admin_with(env, "status", "--json").stdout)["health"]
    serve_line = next(c for c in report["checks"] if c["name"] == "serve")
    assert serve_line["state"] == "down"
    assert "did not stop cleanly" in serve_line["detail"]
    assert report["healthy"] is False


def test_status_names_a_destination_that_is_down_with_its_backlog_and_last_error(
    settings: Settings,
    tmp_path: Path,
    stack_factory: StackFactory,
    orthanc_factory: OrthancFactory,
    database_url: str,
) -> None:
    pacs = orthanc_factory()
    destination = DimseDestination(ae_title="ORTHANC", host="127.0.0.1", port=pacs.dicom_port)
    settings = settings.model_copy(
        update={"destinations": [destination], "database_url": database_url}
    )
    _, factory, context = analysed_phantom(settings, stack_factory, tmp_path)
    pacs.stop()
    with session_scope(factory) as session:
        deliveries = list(session.scalars(select(Delivery.id)))
    assert dispatch(context, deliveries[0]).state == "retrying"

    result = run_admin(settings, "status", "--json")
    assert result.returncode == UNHEALTHY, result.stderr
    (line,) = json.loads(result.stdout)["health"]["destinations"]
    assert line["name"] == destination.name
    assert line["state"] == "down"
    assert line["backlog"] == len(deliveries)  # SEG, SR and KOS waiting
    assert str(pacs.dicom_port) in line["last_error"]
    assert line["last_success_at"] is None
    table = run_admin(settings, "status")
    assert destination.name in table.stdout
    assert "never" in table.stdout  # no success yet


def test_status_with_the_broker_unreachable_is_unhealthy_naming_broker_url(
    tmp_path: Path, database_url: str
) -> None:
    env = {
        "TRIAGE_DATA_DIR": str(tmp_path / "data"),
        "TRIAGE_DATABASE_URL": database_url,
        "TRIAGE_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0",  # nothing listens there
    }
    assert admin_with(env, "db", "upgrade").returncode == 0
    result = admin_with(env, "status", "--json")
    assert result.returncode == UNHEALTHY, result.stderr
    report = json.loads(result.stdout)
    broker = next(c for c in report["health"]["checks"] if c["name"] == "broker")
    assert broker["state"] == "down"
    assert "broker_url" in broker["detail"]
    assert report["queue_depth"] == {"inference": None, "dispatch": None}
    assert "warning" not in result.stderr  # no destinations: nothing to say of them
