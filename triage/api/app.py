"""The FastAPI application, built from Settings and a session factory (no globals)."""

from __future__ import annotations

from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from triage import __version__
from triage.config import Settings
from triage.db.session import SessionFactory, session_scope


def create_app(
    settings: Settings, session_factory: SessionFactory, registry: CollectorRegistry
) -> FastAPI:
    app = FastAPI(title="triage", version=__version__, docs_url="/api/docs")
    app.state.settings = settings

    @app.get("/healthz", tags=["operations"])
    def healthz() -> JSONResponse:
        """200 when the database answers; 503 otherwise. Needs no token."""
        try:
            with session_scope(session_factory) as session:
                session.execute(text("SELECT 1"))
        except SQLAlchemyError as exc:
            return JSONResponse(
                {"status": "unavailable", "database": type(exc).__name__}, status_code=503
            )
        return JSONResponse({"status": "ok", "version": __version__})

    @app.get("/metrics", tags=["operations"])
    def metrics() -> Response:
        """Prometheus exposition of triage's counters and gauges."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app
