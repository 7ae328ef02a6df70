"""``triage serve`` and ``triage worker`` start, answer and stop as real processes."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

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
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5) as reply:
            assert reply.status == 200
            assert reply.headers["Content-Type"].startswith("text/plain")
    assert process.returncode == 0  # SIGTERM is a clean stop
    assert (data_dir / "triage.sqlite").exists()


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
