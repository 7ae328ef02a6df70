"""Real Celery workers run the bundled reference model: on Redis, on the embedded broker, and
after a worker is killed mid-job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pynetdicom import AE, AllStoragePresentationContexts, evt
from sqlalchemy import select

from tests.conftest import StackFactory, free_port
from tests.helpers.phantoms import phantom_study
from tests.helpers.process import VENV_BIN, port_open, running, wait_for
from triage.broker import TaskSender
from triage.config import Settings
from triage.db.base import utcnow
from triage.db.models import Delivery, Finding, Job, Study
from triage.db.session import SessionFactory, create_db_engine, make_session_factory, session_scope
from triage.domain import StudyStatus, WorkState
from triage.ingest.completion import StudyCompletionWatcher

pytestmark = pytest.mark.slow

LESION_SEED = 100_011  # from the test range: never seen in training or threshold choice


def job_state(factory: SessionFactory) -> WorkState | None:
    with session_scope(factory) as session:
        return session.scalar(select(Job.state))


def wait_job(
    factory: SessionFactory, wanted: Callable[[WorkState | None], bool], *, timeout: float
) -> None:
    wait_for(lambda: wanted(job_state(factory)), timeout=timeout, what="the job's state")


def assert_one_run_of_findings(factory: SessionFactory) -> None:
    with session_scope(factory) as session:
        findings = session.scalars(select(Finding).order_by(Finding.ordinal)).all()
        assert [f.ordinal for f in findings] == list(range(len(findings)))
        kinds = [f.kind for f in findings]
        assert kinds.count("score") == 1
        score = findings[0]
        assert score.positive, f"lesion phantom scored {score.probability:.3f}"
        lesions = [f for f in findings if f.kind == "lesion"]
        assert lesions
        assert all(f.volume_ml and f.volume_ml > 0 and f.mask_ref for f in lesions)
        assert session.scalars(select(Study.status)).one() == StudyStatus.ANALYZED


def worker_env(settings: Settings) -> dict[str, str]:
    return {
        "TRIAGE_DATA_DIR": str(settings.data_dir),
        "TRIAGE_DATABASE_URL": settings.database_url,
        "TRIAGE_BROKER_URL": settings.broker_url,
        "TRIAGE_VISIBILITY_TIMEOUT_SECONDS": str(settings.visibility_timeout_seconds),
    }


def queue_study(settings: Settings, stack_factory: StackFactory, tmp_path: Path) -> SessionFactory:
    """Ingest a lesion phantom, complete it and send its job to the broker."""
    stack = stack_factory(settings)
    stack.ingest(*phantom_study(tmp_path / "study", LESION_SEED, lesion=True).paths)
    sender = TaskSender(settings)
    watcher = StudyCompletionWatcher(settings, stack.session_factory, send_job=sender.analyze_study)
    assert len(watcher.poll(now=utcnow().replace(year=utcnow().year + 1))) == 1
    sender.close()
    return stack.session_factory


def test_redis_worker_runs_the_reference_model(
    settings: Settings, tmp_path: Path, stack_factory: StackFactory, redis_url: str
) -> None:
    """The job waits on the broker before the worker starts: the worker's processes load and
    warm the model first, so the job's timings have no model load."""
    settings = settings.model_copy(update={"broker_url": redis_url})
    factory = queue_study(settings, stack_factory, tmp_path)
    log_file = tmp_path / "worker.log"
    with running([str(VENV_BIN / "triage"), "worker"], env=worker_env(settings), log_file=log_file):
        wait_job(factory, lambda state: state == WorkState.DONE, timeout=180)
    assert_one_run_of_findings(factory)
    with session_scope(factory) as session:
        timings = session.scalars(select(Job.timings)).one()
    assert "model" in timings
    assert "model_load" not in timings
    text = log_file.read_text()
    assert "models warm" in text
    assert text.index("models warm") < text.index("job done")


def test_worker_killed_mid_job_is_redelivered_and_completes_once(
    settings: Settings, tmp_path: Path, stack_factory: StackFactory, redis_url: str
) -> None:
    settings = settings.model_copy(
        update={"broker_url": redis_url, "visibility_timeout_seconds": 3.0}
    )
    factory = queue_study(settings, stack_factory, tmp_path)
    argv = [str(VENV_BIN / "triage"), "worker"]
    with running(argv, env=worker_env(settings), log_file=tmp_path / "worker-1.log") as first:
        wait_job(factory, lambda state: state == WorkState.RUNNING, timeout=120)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert job_state(factory) == WorkState.RUNNING  # killed before it could finish
    with running(argv, env=worker_env(settings), log_file=tmp_path / "worker-2.log"):
        wait_job(factory, lambda state: state == WorkState.DONE, timeout=180)
    with session_scope(factory) as session:
        job = session.scalars(select(Job)).one()
        assert job.attempts == 2
    assert_one_run_of_findings(factory)


def test_embedded_default_end_to_end(tmp_path: Path, data_dir: Path) -> None:
    """`triage serve` alone: DICOM in, its own worker process, findings stored."""
    dicom_port = free_port()
    env = {
        "TRIAGE_DATA_DIR": str(data_dir),
        "TRIAGE_DICOM_PORT": str(dicom_port),
        "TRIAGE_HTTP_PORT": str(free_port()),
        "TRIAGE_SPOOL_MIN_FREE_MB": "1",
        "TRIAGE_ASSOCIATION_GRACE_SECONDS": "1",
    }
    study = phantom_study(tmp_path / "study", LESION_SEED, lesion=True)
    with running(
        [str(VENV_BIN / "triage"), "serve", "--workers", "1"],
        env=env,
        log_file=tmp_path / "serve.log",
        ready=lambda: port_open(dicom_port),
    ):
        sent = subprocess.run(
            ["storescu", "-aec", "TRIAGE", "127.0.0.1", str(dicom_port), *map(str, study.paths)],
            env={**os.environ, "TCP_NODELAY": "1"},
            capture_output=True,
            timeout=120,
            check=False,
        )
        assert sent.returncode == 0, sent.stderr
        engine = create_db_engine(f"sqlite:///{data_dir / 'triage.sqlite'}")
        factory = make_session_factory(engine)
        wait_job(factory, lambda state: state == WorkState.DONE, timeout=240)
    assert_one_run_of_findings(factory)
    engine.dispose()


def test_a_delivery_is_retried_by_its_own_task_with_the_settings_backoff(
    settings: Settings, tmp_path: Path, stack_factory: StackFactory, redis_url: str
) -> None:
    """A real worker delivers the study's SEG and SR to two peers. FLAKY answers Refused: Out
    of Resources (0xA700, PS3.4 B.2.3: try again) twice per instance, then Success: the task's
    own retries deliver each on its third attempt, after the waits the settings give (no
    sweeper runs here). BROKEN answers Error: Cannot understand (0xC000): failed at once."""
    attempts: dict[tuple[str, str], list[float]] = {}

    def handler(flaky: bool) -> Callable[[evt.Event], int]:
        def on_store(event: evt.Event) -> int:
            uid = str(event.request.AffectedSOPInstanceUID)
            seen = attempts.setdefault(("FLAKY" if flaky else "BROKEN", uid), [])
            seen.append(time.monotonic())
            if not flaky:
                return 0xC000
            return 0xA700 if len(seen) <= 2 else 0x0000

        return on_store

    servers = []
    for title, flaky in (("FLAKY", True), ("BROKEN", False)):
        ae = AE(ae_title=title)
        ae.supported_contexts = AllStoragePresentationContexts
        port = free_port()
        handlers = [(evt.EVT_C_STORE, handler(flaky))]
        servers.append(ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers))
        servers[-1].port = port  # type: ignore[attr-defined]
    settings = settings.model_copy(update={"broker_url": redis_url})
    factory = queue_study(settings, stack_factory, tmp_path)
    env = {
        **worker_env(settings),
        "TRIAGE_DESTINATIONS": json.dumps(
            [f"FLAKY@127.0.0.1:{servers[0].port}", f"BROKEN@127.0.0.1:{servers[1].port}"]  # type: ignore[attr-defined]
        ),
        "TRIAGE_RETRY_BACKOFF_SECONDS": "1",
        "TRIAGE_RETRY_BACKOFF_MAX_SECONDS": "4",
        "TRIAGE_DELIVERY_MAX_ATTEMPTS": "5",
        "TRIAGE_DESTINATION_PAUSE_AFTER_FAILURES": "20",
    }

    def deliveries() -> list[tuple[str, WorkState, int]]:
        with session_scope(factory) as session:
            rows = session.execute(select(Delivery.destination, Delivery.state, Delivery.attempts))
            return sorted((str(d), s, int(a)) for d, s, a in rows)

    def settled() -> bool:
        found = deliveries()
        return len(found) == 6 and all(s in (WorkState.DONE, WorkState.FAILED) for _, s, _ in found)

    try:
        with running(
            [str(VENV_BIN / "triage"), "worker"], env=env, log_file=tmp_path / "worker.log"
        ):
            wait_for(settled, timeout=240, what="every delivery done or failed")
    finally:
        for server in servers:
            server.shutdown()
    found = deliveries()
    # SEG, SR and KOS to each
    assert [(s, a) for d, s, a in found if d.startswith("BROKEN")] == [(WorkState.FAILED, 1)] * 3
    assert [(s, a) for d, s, a in found if d.startswith("FLAKY")] == [(WorkState.DONE, 3)] * 3
    for (peer, _uid), times in attempts.items():
        if peer == "BROKEN":
            assert len(times) == 1
            continue
        assert len(times) == 3
        first, second = times[1] - times[0], times[2] - times[1]
        # Backoff: base 1 s doubled per attempt, jitter over the upper half of each wait.
        assert 0.45 <= first <= 10
        assert 0.95 <= second <= 10
