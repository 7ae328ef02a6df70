"""The FastAPI application, built from Settings and a session factory (no globals)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from importlib.resources import files
from typing import Any

from fastapi import FastAPI, HTTPException, Response
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from triage import __version__
from triage.api import dicomweb, results
from triage.api.deps import AdminCaller
from triage.api.metrics_auth import MetricsCaller, RecentTokens
from triage.api.routes import router
from triage.api.schemas import Health, Unhealthy
from triage.broker import TaskSender
from triage.config import Settings
from triage.db.session import SessionFactory, session_scope
from triage.health import collect_health
from triage.health_metrics import HealthCollector
from triage.ingest.pipeline import Ingestor
from triage.monitoring import ModelStatsCollector
from triage.storage.spool import Spool

# The files under static/ that both pages load, with their media types; /static/ serves these
# and nothing else (not the pages themselves, which have their own routes).
SHARED_STATIC = {"common.css": "text/css", "common.js": "text/javascript"}


def create_app(
    settings: Settings,
    session_factory: SessionFactory,
    registry: CollectorRegistry,
    sender: TaskSender | None = None,
    stopping: threading.Event | None = None,
    *,
    ingestor: Ingestor | None = None,
    on_request_end: Callable[[set[str]], None] | None = None,
) -> FastAPI:
    """``stopping`` ends open event streams when the service shuts down. ``ingestor`` takes
    STOW-RS instances (without it STOW-RS answers 503); ``on_request_end`` is told the studies
    a STOW-RS request stored into, as an association's end is."""
    app = FastAPI(
        title="triage",
        version=__version__,
        docs_url="/api/docs",
        openapi_url="/api/openapi.json",
        description="The reading worklist, most urgent first, with the AI findings behind it.",
    )
    app.state.settings = settings
    app.state.session_factory = session_factory
    app.state.sender = sender or TaskSender(settings)
    app.state.stopping = stopping or threading.Event()
    app.state.ingestor = ingestor
    app.state.spool = ingestor.spool if ingestor is not None else Spool.for_settings(settings)
    app.state.on_request_end = on_request_end
    app.state.metrics_tokens = RecentTokens()
    registry.register(ModelStatsCollector(settings, session_factory))
    registry.register(HealthCollector(settings, session_factory))
    app.include_router(router)
    app.include_router(dicomweb.router)
    app.include_router(results.router)
    static = files("triage.api").joinpath("static")

    @app.get(
        "/healthz",
        tags=["operations"],
        response_model=Health,
        responses={503: {"model": Unhealthy, "description": "The database does not answer."}},
    )
    def healthz() -> Health | JSONResponse:
        """200 when the database answers; 503 otherwise. Needs no token."""
        try:
            with session_scope(session_factory) as session:
                session.execute(text("SELECT 1"))
        except SQLAlchemyError as exc:
            down = Unhealthy(database=type(exc).__name__)
            return JSONResponse(down.model_dump(), status_code=503)
        return Health(version=__version__)

    @app.get("/healthz/detail", tags=["operations"])
    def healthz_detail(caller: AdminCaller) -> dict[str, Any]:
        """Health in detail, as `triage-admin status` gives it (admin token): the database,
        the broker, the workers of each queue, each destination's backlog and last error.
        HTTP 200 either way; ``healthy`` says whether anything is down."""
        with session_scope(session_factory) as session:
            return collect_health(session, settings, serve_self=True).as_json()

    @app.get("/metrics", tags=["operations"], response_class=PlainTextResponse)
    def metrics(caller: MetricsCaller) -> Response:
        """Prometheus exposition of triage's counters and gauges, and of its health as
        `/healthz/detail` gives it. It answers while the database is down, for a token it
        verified in the last hour."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def worklist_page() -> HTMLResponse:
        """The web worklist; it asks for a token and keeps it in the browser."""
        page = static.joinpath("worklist.html").read_text()
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    @app.get("/admin", response_class=HTMLResponse, include_in_schema=False)
    def admin_page() -> HTMLResponse:
        """The administrators' page: model monitoring and drift alarms (admin token)."""
        page = static.joinpath("admin.html").read_text()
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    @app.get("/static/{name}", include_in_schema=False)
    def shared_static(name: str) -> Response:
        """The style sheet and script both pages share. Like the pages, they need no token and
        are not kept in caches, so a page and its shared code always come from the same release."""
        media_type = SHARED_STATIC.get(name)
        if media_type is None:
            raise HTTPException(status_code=404)
        return Response(
            static.joinpath(name).read_bytes(),
            media_type=media_type,
            headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"},
        )

    return app
