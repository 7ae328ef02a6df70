"""Heartbeats: how ``triage-admin status`` and ``/healthz`` tell a running triage from a dead one.

``triage serve`` rewrites ``<data_dir>/serve-heartbeat.json`` every ``PERIOD_SECONDS`` (its PID,
host, version, start time, ports) and marks it stopped when it shuts down cleanly. A heartbeat
older than ``STALE_AFTER_SECONDS`` (three periods) means the process died without stopping: a
SIGKILL, a crash, a power cut. Each Celery worker (local or remote) upserts a row in
``worker_heartbeats`` every ``PERIOD_SECONDS`` with the queues it consumes; a row older than the
stale time is a worker that is gone.

Reading a heartbeat never creates anything.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from triage import __version__
from triage.config import Settings
from triage.db.base import utcnow
from triage.db.models import WorkerHeartbeat
from triage.db.session import SessionFactory, session_scope
from triage.destinations import describe_destination
from triage.storage.spool import write_durably

log = logging.getLogger(__name__)

PERIOD_SECONDS = 5.0
STALE_AFTER_SECONDS = 3 * PERIOD_SECONDS
FILE_NAME = "serve-heartbeat.json"


@dataclass(frozen=True)
class ServeBeat:
    """What ``triage serve`` says of itself."""

    pid: int
    host: str
    version: str
    started_at: datetime
    updated_at: datetime
    ae_title: str
    dicom_port: int
    http_host: str
    http_port: int
    stopped: bool = False
    destinations: tuple[dict[str, Any], ...] | None = None
    """The configured destinations this process sends to (as ``describe_destination`` gives
    them); None in a heartbeat from a version that did not write them."""

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["started_at"] = self.started_at.isoformat()
        data["updated_at"] = self.updated_at.isoformat()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ServeBeat:
        return cls(
            **{
                **data,
                "started_at": datetime.fromisoformat(data["started_at"]),
                "updated_at": datetime.fromisoformat(data["updated_at"]),
                "destinations": (
                    tuple(data["destinations"]) if data.get("destinations") is not None else None
                ),
            }
        )

    def age(self, now: datetime) -> timedelta:
        return now - self.updated_at


def heartbeat_path(settings: Settings) -> Path:
    return settings.data_dir / FILE_NAME


def read_serve_beat(settings: Settings) -> ServeBeat | None:
    """The last heartbeat ``triage serve`` wrote in this data directory, or None."""
    try:
        return ServeBeat.from_json(json.loads(heartbeat_path(settings).read_text()))
    except (OSError, ValueError, TypeError, KeyError):
        return None


class ServeHeartbeat:
    """Writes ``triage serve``'s heartbeat on a timer; ``stop`` marks it stopped."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.started_at = utcnow()

    def beat(self, *, stopped: bool = False) -> None:
        settings = self.settings
        beat = ServeBeat(
            pid=os.getpid(),
            host=socket.gethostname(),
            version=__version__,
            started_at=self.started_at,
            updated_at=utcnow(),
            ae_title=settings.ae_title,
            dicom_port=settings.dicom_port,
            http_host=settings.http_host,
            http_port=settings.http_port,
            stopped=stopped,
            destinations=tuple(describe_destination(d) for d in settings.destinations),
        )
        path = heartbeat_path(settings)
        write_durably(
            path, json.dumps(beat.as_json()).encode(), temporary=path.with_suffix(".part")
        )

    def run(self, stopping: threading.Event) -> None:
        while True:
            try:
                self.beat()
            except OSError as exc:  # a full disk: status will call the heartbeat stale
                log.warning("heartbeat not written: %s", exc)
            if stopping.wait(PERIOD_SECONDS):
                break
        with contextlib.suppress(OSError):
            self.beat(stopped=True)


def beat_worker(db_session: Session, *, name: str, queues: list[str]) -> None:
    """Record that the worker ``name`` (host:pid) is alive and consumes ``queues``."""
    now = utcnow()
    row = db_session.scalar(select(WorkerHeartbeat).where(WorkerHeartbeat.name == name))
    if row is None:
        row = WorkerHeartbeat(name=name, started_at=now)
        db_session.add(row)
    row.queues = ",".join(sorted(queues))
    row.version = __version__
    row.seen_at = now


class WorkerHeartbeatThread:
    """A Celery worker's heartbeat, every ``PERIOD_SECONDS`` until the process ends."""

    def __init__(self, session_factory: SessionFactory, queues: list[str]) -> None:
        self.session_factory = session_factory
        self.queues = queues
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    def start(self) -> None:
        threading.Thread(target=self._run, name="heartbeat", daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                with session_scope(self.session_factory) as session:
                    beat_worker(session, name=self.name, queues=self.queues)
            except Exception as exc:  # the database is down: status says so on its own
                log.warning("worker heartbeat not recorded: %s", type(exc).__name__)
            time.sleep(PERIOD_SECONDS)


def live_workers(db_session: Session, now: datetime) -> list[WorkerHeartbeat]:
    """Workers seen within the stale time, most recent first."""
    since = now - timedelta(seconds=STALE_AFTER_SECONDS)
    return list(
        db_session.scalars(
            select(WorkerHeartbeat)
            .where(WorkerHeartbeat.seen_at >= since)
            .order_by(WorkerHeartbeat.seen_at.desc())
        )
    )
