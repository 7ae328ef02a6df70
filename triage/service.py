"""``triage serve``: the daemon's components, started in order and stopped in reverse."""

from __future__ import annotations

import logging

import uvicorn
from prometheus_client import CollectorRegistry

from triage import __version__
from triage.api.app import create_app
from triage.config import Settings
from triage.db import migrate
from triage.db.session import create_db_engine, make_session_factory

log = logging.getLogger(__name__)


class TriageService:
    """Owns the database engine and the HTTP server for one ``triage serve`` process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engine = create_db_engine(settings.database_url)
        self.session_factory = make_session_factory(self.engine)
        self.registry = CollectorRegistry()

    def run(self) -> None:
        """Upgrade the schema, then serve until SIGINT or SIGTERM."""
        settings = self.settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        migrate.upgrade(self.engine)
        log.info(
            "triage %s starting",
            __version__,
            extra={"data_dir": settings.data_dir, "http_port": settings.http_port},
        )
        app = create_app(settings, self.session_factory, self.registry)
        server = uvicorn.Server(
            uvicorn.Config(
                app,
                host=settings.http_host,
                port=settings.http_port,
                log_level=settings.log_level.lower(),
                access_log=False,
            )
        )
        try:
            server.run()
        finally:
            self.engine.dispose()
            log.info("triage stopped")
