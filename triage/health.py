"""Is triage healthy? The facts ``triage-admin status``, ``/healthz?detail=true`` and the metrics
give an administrator, each with its state in words and the fix where there is one.

A check is ``up`` (working), ``down`` (not working: triage is unhealthy) or ``unknown`` (it
could not be asked, e.g. the listeners of a ``triage serve`` that is not running here). Triage is
healthy when nothing is down: ``triage serve`` running (its heartbeat fresh), its DICOM and HTTP
listeners answering, the database and the broker reachable, a live worker on every queue, and no
destination paused or failing with results waiting for it.
"""

from __future__ import annotations

import os
import socket
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Literal

import httpx
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from triage.broker import QUEUES, broker_url, queue_depths
from triage.config import Settings
from triage.db.base import utcnow
from triage.db.models import Delivery, DestinationState
from triage.destinations import describe_destination, destinations
from triage.domain import WorkState
from triage.heartbeat import STALE_AFTER_SECONDS, ServeBeat, live_workers, read_serve_beat

State = Literal["up", "down", "unknown"]
PROBE_TIMEOUT_SECONDS = 2.0


@dataclass(frozen=True)
class Check:
    name: str
    state: State
    detail: str


@dataclass(frozen=True)
class WorkerLine:
    name: str
    queues: list[str]
    version: str
    seen_seconds_ago: float


@dataclass(frozen=True)
class DestinationLine:
    name: str
    state: State
    backlog: int
    failed: int
    last_success_at: str | None
    last_error: str | None
    paused_until: str | None


@dataclass(frozen=True)
class Health:
    checks: list[Check]
    workers: list[WorkerLine] = field(default_factory=list)
    destinations: list[DestinationLine] = field(default_factory=list)
    queue_depth: dict[str, int | None] = field(default_factory=dict)
    destination_note: str | None = None
    """Why the destinations listed may not be those the running ``triage serve`` sends to."""

    @property
    def healthy(self) -> bool:
        return all(c.state != "down" for c in self.checks) and all(
            d.state != "down" for d in self.destinations
        )

    def as_json(self) -> dict[str, Any]:
        return {"healthy": self.healthy, **asdict(self)}


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _gone(beat: ServeBeat, now: datetime) -> bool:
    """The process that wrote ``beat`` died without stopping: its heartbeat is stale, or its
    PID is gone on this host."""
    if beat.age(now).total_seconds() > STALE_AFTER_SECONDS:
        return True
    return beat.host == socket.gethostname() and not _pid_alive(beat.pid)


def running_beat(settings: Settings, now: datetime) -> ServeBeat | None:
    """The heartbeat of the ``triage serve`` running on this data directory now, or None."""
    beat = read_serve_beat(settings)
    return None if beat is None or beat.stopped or _gone(beat, now) else beat


def serve_check(settings: Settings, now: datetime) -> tuple[Check, str | None]:
    """``triage serve``: running, stopped, or gone; and the host its listeners are on."""
    beat = read_serve_beat(settings)
    where = f"data directory {settings.data_dir}"
    if beat is None:
        return Check("serve", "down", f"never started in {where}: run `triage serve`"), None
    age = beat.age(now).total_seconds()
    here = beat.host == socket.gethostname()
    if beat.stopped:
        detail = f"stopped {_ago(age)} (PID {beat.pid} on {beat.host}): start `triage serve`"
        return Check("serve", "down", detail), None
    if _gone(beat, now):
        detail = (
            f"not running: PID {beat.pid} on {beat.host} last seen {_ago(age)} and did not "
            "stop cleanly (killed or crashed); check its log and start `triage serve`"
        )
        return Check("serve", "down", detail), None
    uptime = (now - beat.started_at).total_seconds()
    detail = (
        f"running: PID {beat.pid} on {beat.host}, version {beat.version}, up {_ago(uptime)[:-4]},"
        f" DICOM {beat.ae_title} port {beat.dicom_port}, HTTP port {beat.http_port}"
    )
    return Check("serve", "up", detail), ("127.0.0.1" if here else beat.host)


def dicom_check(settings: Settings, host: str | None) -> Check:
    if host is None:
        return Check("dicom listener", "unknown", "triage serve is not running")
    try:
        with socket.create_connection((host, settings.dicom_port), PROBE_TIMEOUT_SECONDS):
            pass
    except OSError as exc:
        detail = f"port {settings.dicom_port} on {host} does not answer: {exc.strerror or exc}"
        return Check("dicom listener", "down", detail)
    return Check("dicom listener", "up", f"accepting connections on {host}:{settings.dicom_port}")


def http_check(settings: Settings, host: str | None) -> Check:
    if host is None:
        return Check("http", "unknown", "triage serve is not running")
    scheme = "https" if settings.http_tls else "http"
    url = f"{scheme}://{host}:{settings.http_port}/healthz"
    try:
        answer = httpx.get(url, timeout=PROBE_TIMEOUT_SECONDS, verify=False)  # noqa: S501
    except httpx.HTTPError as exc:
        return Check("http", "down", f"{url} does not answer: {type(exc).__name__}")
    if answer.status_code != 200:
        return Check("http", "down", f"{url} answered HTTP {answer.status_code}")
    return Check("http", "up", f"{url} answers")


def broker_check(settings: Settings) -> tuple[Check, dict[str, int | None]]:
    if settings.embedded_broker and not (settings.data_dir / "broker.sqlite").exists():
        detail = "the embedded broker has not been created yet: start `triage serve`"
        return Check("broker", "down", detail), dict.fromkeys(QUEUES)
    depths = queue_depths(broker_url(settings))
    if any(depth is None for depth in depths.values()):
        where = (
            "embedded (SQLite in the data directory)" if settings.embedded_broker else "broker_url"
        )
        return Check("broker", "down", f"cannot be reached ({where})"), depths
    waiting = ", ".join(f"{queue} {depth}" for queue, depth in depths.items())
    return Check("broker", "up", f"reachable; waiting: {waiting}"), depths


def worker_checks(db_session: Session, now: datetime) -> tuple[list[Check], list[WorkerLine]]:
    workers = live_workers(db_session, now)
    lines = [
        WorkerLine(
            name=w.name,
            queues=[q for q in w.queues.split(",") if q],
            version=w.version,
            seen_seconds_ago=round((now - w.seen_at).total_seconds(), 1),
        )
        for w in workers
    ]
    checks = []
    for queue in QUEUES:
        serving = [line.name for line in lines if queue in line.queues]
        if serving:
            checks.append(
                Check(f"workers: {queue}", "up", f"{len(serving)} live: {', '.join(serving)}")
            )
        else:
            checks.append(
                Check(
                    f"workers: {queue}",
                    "down",
                    f"no live worker consumes {queue}: start `triage serve` (local workers) "
                    "or `triage worker`",
                )
            )
    return checks, lines


def nobody_consumes(db_session: Session, queue: str, now: datetime) -> str | None:
    """A warning when no live worker consumes ``queue``: work sent there waits."""
    if any(queue in w.queues.split(",") for w in live_workers(db_session, now)):
        return None
    return (
        f"no worker has consumed the {queue} queue in the last {STALE_AFTER_SECONDS:.0f} s: "
        "the work waits until `triage serve` (local workers) or `triage worker` runs"
    )


@dataclass(frozen=True)
class DestinationView:
    """The destinations results go to, as the running ``triage serve`` sends them: its
    configured ones (from its heartbeat) and those added with ``destinations add``."""

    destinations: list[dict[str, Any]]
    """``describe_destination`` fields plus ``defined_by``: ``configuration`` or ``added``."""
    note: str | None
    """Why these may not be the daemon's: it is not running, or this configuration differs."""


def destination_view(db_session: Session, settings: Settings, now: datetime) -> DestinationView:
    """The destinations of the ``triage serve`` running on this data directory, or of this
    configuration (with a note saying so) when none runs."""
    ours = [describe_destination(d) for d in settings.destinations]
    configured = {d["name"] for d in ours}
    added = [
        describe_destination(d) | {"defined_by": "added"}
        for name, d in destinations(settings, db_session=db_session).items()
        if name not in configured
    ]
    beat = running_beat(settings, now)
    note = None
    if beat is None or beat.destinations is None:
        theirs = ours
        note = (
            "triage serve is not running: these are this configuration's destinations"
            if beat is None
            else f"triage serve {beat.version} does not report its destinations: these are "
            "this configuration's"
        )
    else:
        theirs = [dict(d) for d in beat.destinations]
        if theirs != ours:
            note = (
                "the configuration here differs from the running triage serve's: these are "
                "triage serve's (check --config and TRIAGE_DESTINATIONS)"
            )
    names = {d["name"] for d in theirs}
    listed = [d | {"defined_by": "configuration"} for d in theirs]
    listed += [d for d in added if d["name"] not in names]
    return DestinationView(listed, note if listed else None)


def destination_lines(
    db_session: Session, names: list[str], now: datetime
) -> list[DestinationLine]:
    """Backlog, failures, last success, last error and pause of each destination in
    ``names``, then of any other destination that still has deliveries."""
    counts: dict[tuple[str, WorkState], int] = {
        (name, state): count
        for name, state, count in db_session.execute(
            select(Delivery.destination, Delivery.state, func.count()).group_by(
                Delivery.destination, Delivery.state
            )
        )
    }
    states = {s.name: s for s in db_session.scalars(select(DestinationState))}
    lines = []
    for name in names + sorted({n for n, _ in counts} - set(names)):
        backlog = counts.get((name, WorkState.QUEUED), 0) + counts.get((name, WorkState.RUNNING), 0)
        failed = counts.get((name, WorkState.FAILED), 0)
        state = states.get(name)
        paused = (
            state.paused_until
            if state and state.paused_until and state.paused_until > now
            else None
        )
        last_success = state.last_success_at if state else None
        last_error = state.last_error if state and state.consecutive_failures else None
        down = paused is not None or (last_error is not None and backlog > 0) or failed > 0
        lines.append(
            DestinationLine(
                name=name,
                state="down" if down else "up",
                backlog=backlog,
                failed=failed,
                last_success_at=last_success.isoformat() if last_success else None,
                last_error=last_error,
                paused_until=paused.isoformat() if paused else None,
            )
        )
    return lines


def collect_health(db_session: Session, settings: Settings, *, serve_self: bool = False) -> Health:
    """Everything ``status`` reports on health. ``serve_self``: asked by ``triage serve`` itself
    (``/healthz``), whose own listeners are known to be up."""
    now = utcnow()
    checks = [Check("database", "up", "reachable, schema current")]
    if serve_self:
        checks.append(Check("serve", "up", f"running: PID {os.getpid()}"))
    else:
        serve, host = serve_check(settings, now)
        checks += [serve, dicom_check(settings, host), http_check(settings, host)]
    broker, depths = broker_check(settings)
    checks.append(broker)
    worker_lines_checks, workers = worker_checks(db_session, now)
    checks += worker_lines_checks
    if serve_self:
        names, note = list(destinations(settings, db_session=db_session)), None
    else:
        view = destination_view(db_session, settings, now)
        names, note = [d["name"] for d in view.destinations], view.note
    return Health(
        checks=checks,
        workers=workers,
        destinations=destination_lines(db_session, names, now),
        queue_depth=depths,
        destination_note=note,
    )
