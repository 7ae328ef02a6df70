"""``triage serve``: the daemon's components, started in order and stopped in reverse."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from types import FrameType

import uvicorn
from prometheus_client import CollectorRegistry

from triage import __version__
from triage.api.app import create_app
from triage.broker import TaskSender
from triage.config import Settings
from triage.db import migrate
from triage.db.session import create_db_engine, make_session_factory
from triage.ingest.completion import StudyCompletionWatcher
from triage.ingest.pipeline import Ingestor
from triage.ingest.reconcile import reconcile_spool
from triage.metrics import IngestMetrics
from triage.receiver.scp import DicomListener
from triage.receiver.spool import Spool

log = logging.getLogger(__name__)


class _HttpServer(uvicorn.Server):
    """uvicorn without its own signal handling: TriageService decides when to stop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class TriageService:
    """Owns the database engine, the DICOM listener, the completion watcher and the HTTP server
    of one ``triage serve`` process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engine = create_db_engine(settings.database_url)
        self.session_factory = make_session_factory(self.engine)
        self.registry = CollectorRegistry()
        self.metrics = IngestMetrics(self.registry)
        self.stopping = threading.Event()
        self._http: _HttpServer | None = None
        self.spool = Spool.for_settings(settings)
        self.sender = TaskSender(settings)
        self.watcher = StudyCompletionWatcher(
            settings, self.session_factory, send_job=self.sender.analyze_study
        )
        self.ingestor = Ingestor(
            spool=self.spool, session_factory=self.session_factory, metrics=self.metrics
        )
        self.listener = DicomListener(
            settings,
            ingestor=self.ingestor,
            session_factory=self.session_factory,
            metrics=self.metrics,
            on_association_end=self.watcher.association_ended,
        )

    def stop(self) -> None:
        """Ask every component to finish; safe from a signal handler or another thread."""
        self.stopping.set()
        if self._http is not None:
            self._http.should_exit = True

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        self.stop()

    def run(self) -> None:
        """Upgrade the schema, then serve until SIGINT or SIGTERM (exit status 0)."""
        settings = self.settings
        migrate.upgrade(self.engine)
        reconcile_spool(ingestor=self.ingestor, session_factory=self.session_factory)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        app = create_app(settings, self.session_factory, self.registry)
        self._http = _HttpServer(
            uvicorn.Config(
                app,
                host=settings.http_host,
                port=settings.http_port,
                log_level=settings.log_level.lower(),
                access_log=False,
            )
        )
        log.info(
            "triage %s serving",
            __version__,
            extra={"data_dir": settings.data_dir, "http_port": settings.http_port},
        )
        watcher = threading.Thread(
            target=self.watcher.run, args=(self.stopping,), name="completion", daemon=True
        )
        self.listener.start()
        watcher.start()
        try:
            if not self.stopping.is_set():
                self._http.run()
        finally:
            self.stopping.set()
            self.listener.stop()
            watcher.join(timeout=5)
            self.sender.close()
            self.engine.dispose()
            log.info("triage stopped")
