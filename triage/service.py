"""``triage serve``: the daemon's components, started in order and stopped in reverse."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn
from prometheus_client import CollectorRegistry

from triage import __version__
from triage.api.app import create_app
from triage.broker import TaskSender
from triage.config import Settings, TlsFiles
from triage.db import migrate
from triage.db.session import create_db_engine, make_session_factory
from triage.embedded import LocalWorkers
from triage.errors import DataDirInUseError
from triage.heartbeat import ServeHeartbeat
from triage.ingest.completion import StudyCompletionWatcher
from triage.ingest.pipeline import Ingestor
from triage.ingest.reconcile import reconcile_spool
from triage.ingest.sweeper import Sweeper
from triage.metrics import IngestMetrics, count_across_processes
from triage.monitoring import DriftMonitor
from triage.notify import Notifier
from triage.pull.poller import Puller
from triage.receiver.processes import ReceiverPool
from triage.receiver.scp import DicomListener
from triage.storage.spool import Spool
from triage.worklist.service import WorklistClock

log = logging.getLogger(__name__)


class _HttpServer(uvicorn.Server):
    """uvicorn without its own signal handling: TriageService decides when to stop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def hold_data_dir(data_dir: Path) -> int:
    """Lock ``data_dir/serve.lock`` for the life of this process (the descriptor returned).

    A second ``triage serve`` on the same directory would delete the first one's partial
    spool files at start-up and reconcile the spool under its feet; it is refused instead.
    Raises DataDirInUseError.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(data_dir / "serve.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DataDirInUseError(f"another triage serve is using {data_dir}") from None
    return fd


def _https(tls: TlsFiles | None) -> dict[str, Any]:
    """uvicorn's TLS options for ``http_tls`` (a client certificate checked against ``ca_file``
    when ``require_client_cert``)."""
    if tls is None:
        return {}
    return {
        "ssl_certfile": str(tls.cert_file),
        "ssl_keyfile": str(tls.key_file),
        "ssl_ca_certs": str(tls.ca_file) if tls.ca_file else None,
        "ssl_cert_reqs": ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_NONE,
    }


class TriageService:
    """Owns the database engine, the DICOM listener, the completion watcher, the sweeper, the
    local workers (embedded default) and the HTTP server of one ``triage serve`` process."""

    def __init__(self, settings: Settings, *, config_file: Path | None = None) -> None:
        self.settings = settings
        # Held from here: nothing below may touch the data directory of another triage serve.
        self._held = hold_data_dir(settings.data_dir)
        self.engine = create_db_engine(settings.database_url)
        self.session_factory = make_session_factory(self.engine)
        if settings.dicom_processes > 1:
            # The receiver processes count into files /metrics adds up; what this process
            # counts lands there too, so its own registry is not read.
            self.registry = count_across_processes(settings.data_dir / "metrics")
            self.metrics = IngestMetrics(CollectorRegistry())
        else:
            self.registry = CollectorRegistry()
            self.metrics = IngestMetrics(self.registry)
        self.stopping = threading.Event()
        self._signalled: int | None = None
        self._http: _HttpServer | None = None
        self.spool = Spool.for_settings(settings)
        self.sender = TaskSender(settings)
        self.watcher = StudyCompletionWatcher(
            settings, self.session_factory, send_job=self.sender.analyze_study
        )
        self.ingestor = Ingestor(
            spool=self.spool,
            engine=create_db_engine(settings.database_url, rebuildable=True),
            metrics=self.metrics,
            # STOW-RS writes here beside the receiver processes: queue on their lock.
            writers_lock=(
                settings.data_dir / "ingest.lock" if settings.dicom_processes > 1 else None
            ),
        )
        self.listener: DicomListener | ReceiverPool
        if settings.dicom_processes > 1:
            self.listener = ReceiverPool(
                settings,
                config_file=config_file,
                on_association_end=self.watcher.association_ended,
                on_refused=self.metrics.rejections.labels(reason="connection-refused").inc,
            )
        else:
            self.listener = DicomListener(
                settings,
                ingestor=self.ingestor,
                session_factory=self.session_factory,
                metrics=self.metrics,
                on_association_end=self.watcher.association_ended,
            )
        self.puller = Puller(
            settings,
            self.session_factory,
            self.ingestor,
            on_pulled=self.watcher.association_ended,
        )
        self.sweeper = Sweeper(
            settings,
            self.session_factory,
            self.sender.analyze_study,
            self.sender.dispatch_result,
        )
        # Embedded default: this process runs the workers too. With a broker configured,
        # workers are started on their own machines with `triage worker`.
        self.local_workers = (
            LocalWorkers(
                settings.workers, config_file=config_file, log_dir=settings.data_dir / "logs"
            )
            if settings.embedded_broker and settings.workers
            else None
        )

    def stop(self) -> None:
        """Ask every component to finish; safe from a signal handler or another thread."""
        self.stopping.set()
        if self._http is not None:
            self._http.should_exit = True

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        """Only record the request. The handler runs in the main thread between any two of
        its bytecodes, a second signal inside the first handler included: taking a lock here
        (Event.set, logging) could wait for itself. ``_relay_signals``, in a thread of its own,
        turns the request into ``stop()``."""
        if self._signalled is None:
            self._signalled = signum
        if self._http is not None:
            self._http.should_exit = True

    def _relay_signals(self, stopping: threading.Event) -> None:
        while not stopping.wait(0.1):
            if self._signalled is not None:
                log.info("received %s, stopping", signal.Signals(self._signalled).name)
                self.stop()
                return

    def run(self) -> None:
        """Upgrade the schema, then serve until SIGINT or SIGTERM (exit status 0)."""
        try:
            self._serve()
        finally:
            os.close(self._held)

    def _serve(self) -> None:
        settings = self.settings
        migrate.upgrade(self.engine)
        reconcile_spool(ingestor=self.ingestor, session_factory=self.session_factory)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        app = create_app(
            settings,
            self.session_factory,
            self.registry,
            self.sender,
            self.stopping,
            ingestor=self.ingestor,
            on_request_end=self.watcher.association_ended,
        )
        self._http = _HttpServer(
            uvicorn.Config(
                app,
                host=settings.http_host,
                port=settings.http_port,
                log_level=settings.log_level.lower(),
                access_log=False,
                timeout_graceful_shutdown=5,
                **_https(settings.http_tls),
            )
        )
        log.info(
            "triage %s serving",
            __version__,
            extra={"data_dir": settings.data_dir, "http_port": settings.http_port},
        )
        loops = [
            threading.Thread(target=loop, args=(self.stopping,), name=name, daemon=True)
            for name, loop in (
                ("signals", self._relay_signals),
                ("completion", self.watcher.run),
                ("pull", self.puller.run),
                ("sweeper", self.sweeper.run),
                ("worklist-clock", WorklistClock(settings, self.session_factory).run),
                ("notifier", Notifier(settings, self.session_factory).run),
                ("drift", DriftMonitor(settings, self.session_factory).run),
                ("heartbeat", ServeHeartbeat(settings).run),
            )
        ]
        if self.local_workers is not None:
            self.local_workers.start()
            loops.append(
                threading.Thread(
                    target=self.local_workers.watch, args=(self.stopping,), name="workers"
                )
            )
        self.listener.start()
        for loop in loops:
            loop.start()
        try:
            if not self.stopping.is_set() and self._signalled is None:
                self._http.run()
        finally:
            self.stopping.set()
            self.listener.stop()
            for loop in loops:
                loop.join(timeout=5)
            if self.local_workers is not None:
                self.local_workers.stop()
            self.sender.close()
            self.ingestor.close()
            self.ingestor.engine.dispose()
            self.engine.dispose()
            log.info("triage stopped")
