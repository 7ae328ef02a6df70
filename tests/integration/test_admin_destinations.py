"""``triage-admin destinations list`` shows what the running ``triage serve`` sends to, not the
shell's own configuration; ``status`` lists the same; on SQLite and PostgreSQL (issue 20)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.helpers.process import admin_with, serve_env, serving, wait_for

pytestmark = pytest.mark.slow


def test_destinations_are_the_daemons_and_an_added_one_with_its_health(
    tmp_path: Path, database_url: str
) -> None:
    daemon_port = free_port()  # nothing listens there: the destination has no deliveries yet
    daemon_destination = f"DAEMON@127.0.0.1:{daemon_port}"
    env = serve_env(
        tmp_path / "data",
        database_url=database_url,
        destinations=json.dumps([daemon_destination]),
    )
    shell = {k: v for k, v in env.items() if k != "TRIAGE_DESTINATIONS"}  # another shell

    with serving(env, tmp_path / "serve.log") as serve:

        def serve_seen() -> bool:
            report = json.loads(admin_with(shell, "status", "--json", columns=200).stdout)["health"]
            return any(c["name"] == "serve" and c["state"] == "up" for c in report["checks"])

        wait_for(serve_seen, timeout=60, what="status to see triage serve")
        added = admin_with(
            shell,
            "destinations",
            "add",
            "archive",
            "https://archive.example/dicom-web",
            columns=200,
        )
        assert added.returncode == 0, added.stderr

        listed = admin_with(shell, "destinations", "list", "--json", columns=200)
        assert listed.returncode == 0, listed.stderr
        rows = json.loads(listed.stdout)
        assert [(r["name"], r["defined_by"]) for r in rows] == [
            (daemon_destination, "configuration"),
            ("archive", "added"),
        ]
        daemon_row = rows[0]
        assert (daemon_row["ae_title"], daemon_row["host"], daemon_row["port"]) == (
            "DAEMON",
            "127.0.0.1",
            daemon_port,
        )
        assert daemon_row["url"] is None
        assert rows[1]["url"] == "https://archive.example/dicom-web"
        assert rows[1]["tls"] is True
        assert "differs from the running triage serve's" in listed.stderr

        # the daemon's own settings
        same = admin_with(env, "destinations", "list", "--json", columns=200)
        assert json.loads(same.stdout) == rows
        assert "warning" not in same.stderr

        table = admin_with(shell, "destinations", "list", columns=200)
        assert daemon_destination in table.stdout
        assert f"C-STORE DAEMON@127.0.0.1:{daemon_port}" in table.stdout
        names = admin_with(shell, "destinations", "list", "-o", "name")
        assert names.stdout.splitlines() == [daemon_destination, "archive"]
        narrow = admin_with(shell, "destinations", "list", columns=80)  # lines, nothing cut
        assert f"{daemon_destination}  C-STORE DAEMON@127.0.0.1:{daemon_port}" in narrow.stdout

        health = json.loads(admin_with(shell, "status", "--json", columns=200).stdout)["health"]
        assert [d["name"] for d in health["destinations"]] == [daemon_destination, "archive"]
        assert "differs" in health["destination_note"]

        os.killpg(serve.pid, signal.SIGTERM)
        serve.wait(timeout=30)

    stopped = admin_with(shell, "destinations", "list", "--json", columns=200)
    assert [r["name"] for r in json.loads(stopped.stdout)] == ["archive"]
    assert "triage serve is not running" in stopped.stderr
