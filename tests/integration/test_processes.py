"""``triage serve`` and ``triage worker`` start, answer and stop as real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from celery import Celery

from tests.conftest import free_port
from tests.helpers.process import VENV_BIN, port_open, running, wait_for


def test_serve_answers_health_and_metrics(tmp_path: Path, data_dir: Path) -> None:
    http_port = free_port()
    env = {
        "TRIAGE_DATA_DIR": str(data_dir),
        "TRIAGE_HTTP_PORT": str(http_port),
        "TRIAGE_DICOM_PORT": str(free_port()),
    }
    with running(
        [str(VENV_BIN / "triage"), "serve"],
        env=env,
        log_file=tmp_path / "serve.log",
        ready=lambda: port_open(http_port),
    ) as process:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/healthz", timeout=5) as reply:
            assert reply.status == 200
            assert json.load(reply)["status"] == "ok"
        metrics = f"http://127.0.0.1:{http_port}/metrics"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(metrics, timeout=5)
        assert refused.value.code == 401
        token = subprocess.run(
            [str(VENV_BIN / "triage-admin"), "tokens", "create", "prometheus", "--role", "admin"],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout.strip()
        request = urllib.request.Request(metrics, headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=5) as reply:
            assert reply.status == 200
            assert reply.headers["Content-Type"].startswith("text/plain")
            exposition = reply.read().decode()
        for name in ("triage_instances_received", "triage_associations_active"):
            assert name in exposition
    assert process.returncode == 0  # SIGTERM is a clean stop
    assert (data_dir / "triage.sqlite").exists()


def test_second_serve_on_the_same_data_dir_is_refused(tmp_path: Path, data_dir: Path) -> None:
    def env() -> dict[str, str]:
        return {
            "TRIAGE_DATA_DIR": str(data_dir),
            "TRIAGE_HTTP_PORT": str(free_port()),
            "TRIAGE_DICOM_PORT": str(free_port()),
            "TRIAGE_WORKERS": "0",
        }

    first = env()
    with running(
        [str(VENV_BIN / "triage"), "serve"],
        env=first,
        log_file=tmp_path / "serve.log",
        ready=lambda: port_open(int(first["TRIAGE_HTTP_PORT"])),
    ):
        second = subprocess.run(
            [str(VENV_BIN / "triage"), "serve"],
            env={**os.environ, **env(), "COLUMNS": "200"},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert second.returncode == 1
        assert f"another triage serve is using {data_dir}" in second.stderr
        assert "Traceback" not in second.stderr
        url = f"http://127.0.0.1:{first['TRIAGE_HTTP_PORT']}/healthz"
        with urllib.request.urlopen(url, timeout=5) as reply:
            assert reply.status == 200


def test_worker_consumes_from_redis(tmp_path: Path, data_dir: Path, redis_url: str) -> None:
    env = {"TRIAGE_DATA_DIR": str(data_dir), "TRIAGE_BROKER_URL": redis_url}
    client = Celery(broker=redis_url, set_as_current=False)

    def answers_ping() -> bool:
        return bool(client.control.ping(timeout=0.5))

    with running(
        [str(VENV_BIN / "triage"), "worker", "--queues", "inference,dispatch"],
        env=env,
        log_file=tmp_path / "worker.log",
        ready=answers_ping,
        timeout=90,
    ):
        queues = client.control.inspect(timeout=2).active_queues()
        assert queues is not None
        (names,) = ([q["name"] for q in worker_queues] for worker_queues in queues.values())
        assert sorted(names) == ["dispatch", "inference"]
        stats = client.control.inspect(timeout=2).stats()
        (worker_stats,) = stats.values()
        assert worker_stats["prefetch_count"] == 1
    client.close()
    wait_for(lambda: not answers_ping(), timeout=20, what="the worker to stop")


def _local_workers(serve_pid: int) -> list[int]:
    """Pids of the `python -m workers` processes whose parent is ``serve_pid``."""
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(
                line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line
            )
            cmdline = (status.parent / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(fields.get("PPid", "0")) == serve_pid and b"workers" in cmdline:
            found.append(int(status.parent.name))
    return found


def test_local_workers_die_with_a_killed_serve(tmp_path: Path, data_dir: Path) -> None:
    http_port = free_port()
    env = {
        "TRIAGE_DATA_DIR": str(data_dir),
        "TRIAGE_HTTP_PORT": str(http_port),
        "TRIAGE_DICOM_PORT": str(free_port()),
    }
    with running(
        [str(VENV_BIN / "triage"), "serve", "--workers", "1"],
        env=env,
        log_file=tmp_path / "serve.log",
        ready=lambda: port_open(http_port),
    ) as serve:
        wait_for(lambda: len(_local_workers(serve.pid)) == 1, timeout=30, what="a local worker")
        (worker,) = _local_workers(serve.pid)
        os.kill(serve.pid, signal.SIGKILL)  # not the group: the worker must notice by itself
        serve.wait()
        wait_for(
            lambda: (
                not Path(f"/proc/{worker}").exists()
                or "Z" in (Path(f"/proc/{worker}/stat").read_text().split()[2:3] or [""])
            ),
            timeout=30,
            what="the orphaned worker to exit",
        )


def test_serve_stops_on_a_storm_of_signals(tmp_path: Path, data_dir: Path) -> None:
    """Any number of SIGTERM and SIGINT at any moment: triage serve still stops, exit 0."""
    http_port = free_port()
    env = {
        "TRIAGE_DATA_DIR": str(data_dir),
        "TRIAGE_DICOM_PORT": str(free_port()),
        "TRIAGE_HTTP_PORT": str(http_port),
        "TRIAGE_SPOOL_MIN_FREE_MB": "1",
        "TRIAGE_WORKERS": "0",
    }
    with running(
        [str(VENV_BIN / "triage"), "serve"],
        env=env,
        log_file=tmp_path / "serve.log",
        ready=lambda: port_open(http_port),
    ) as process:
        for n in range(2000):
            try:
                os.kill(process.pid, signal.SIGTERM if n % 2 else signal.SIGINT)
            except ProcessLookupError:
                break
        assert process.wait(timeout=30) == 0
