"""The health ``/healthz/detail`` and ``triage-admin status`` give, as Prometheus metrics on
``triage serve``'s ``/metrics``: read at each scrape, as ``/healthz/detail`` reads it.

- ``triage_healthy``: 1 when no component and no destination is down, else 0.
- ``triage_component_up{component}``: 1 up, 0 down, for each check of ``/healthz/detail``
  (``database``, ``serve``, ``broker``, ``workers: inference``, ``workers: dispatch``); a
  component whose state is unknown has no sample.
- ``triage_workers_live{queue}``: live workers consuming the queue.
- ``triage_queue_depth{queue}``: messages waiting in the broker (no sample when the broker
  cannot be asked).
- ``triage_destination_up{destination}``: 1 up, 0 down (paused, failing with results waiting,
  or deliveries failed for good).
- ``triage_destination_backlog{destination}``: deliveries queued or being sent.
- ``triage_destination_failed{destination}``: deliveries failed for good.
- ``triage_destination_last_success_timestamp_seconds{destination}``: Unix time of the last
  delivery that succeeded (no sample before the first).
- ``triage_destination_paused{destination}``: 1 while paused after failures in a row, else 0.

A scrape never fails on the health: when the database cannot be read, ``database`` is 0,
``triage_healthy`` 0, the broker is still asked, and the workers and destinations (read from the
database) have no samples.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import UTC, datetime

from prometheus_client.core import GaugeMetricFamily, Metric
from sqlalchemy.exc import SQLAlchemyError

from triage.broker import QUEUES
from triage.config import Settings
from triage.db.session import SessionFactory, session_scope
from triage.health import Check, Health, broker_check, collect_health
from triage.metrics import DatabaseCollector

log = logging.getLogger(__name__)

_UP = {"up": 1.0, "down": 0.0}  # "unknown": no sample


def _timestamp(iso: str | None) -> float | None:
    if iso is None:
        return None
    moment = datetime.fromisoformat(iso)
    if moment.tzinfo is None:  # stored as UTC
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def read_health(settings: Settings, session_factory: SessionFactory) -> Health:
    """The health as ``/healthz/detail`` gives it; when the database cannot be read, the
    database down and what can be known without it."""
    try:
        with session_scope(session_factory) as session:
            return collect_health(session, settings, serve_self=True)
    except SQLAlchemyError as exc:
        log.warning("health metrics: the database cannot be read: %s", type(exc).__name__)
        detail = f"cannot be read: {type(exc).__name__}"
        broker, depths = broker_check(settings)
        checks = [
            Check("database", "down", detail),
            Check("serve", "up", "running"),
            broker,
        ]
        return Health(checks=checks, queue_depth=depths)


def health_families(health: Health, *, database_read: bool = True) -> list[Metric]:
    """The metric families of ``health`` (``database_read``: its workers and destinations
    were read, so an empty list means none rather than unknown)."""
    healthy = GaugeMetricFamily(
        "triage_healthy",
        "1 when no component and no destination is down (as triage-admin status), else 0",
    )
    healthy.add_metric([], 1.0 if health.healthy else 0.0)

    component = GaugeMetricFamily(
        "triage_component_up",
        "1 up, 0 down, per component of triage-admin status; no sample when unknown",
        labels=["component"],
    )
    for check in health.checks:
        if check.state in _UP:
            component.add_metric([check.name], _UP[check.state])

    workers = GaugeMetricFamily(
        "triage_workers_live", "Live workers consuming the queue", labels=["queue"]
    )
    if database_read:
        for queue in QUEUES:
            live = sum(1 for worker in health.workers if queue in worker.queues)
            workers.add_metric([queue], float(live))

    depth = GaugeMetricFamily(
        "triage_queue_depth",
        "Messages waiting in the broker queue; no sample when the broker cannot be asked",
        labels=["queue"],
    )
    for queue, count in health.queue_depth.items():
        if count is not None:
            depth.add_metric([queue], float(count))

    labels = ["destination"]
    up = GaugeMetricFamily(
        "triage_destination_up",
        "1 up, 0 down (paused, failing with results waiting, or deliveries failed for good)",
        labels=labels,
    )
    backlog = GaugeMetricFamily(
        "triage_destination_backlog", "Deliveries queued or being sent", labels=labels
    )
    failed = GaugeMetricFamily(
        "triage_destination_failed", "Deliveries failed for good", labels=labels
    )
    last_success = GaugeMetricFamily(
        "triage_destination_last_success_timestamp_seconds",
        "Unix time of the last delivery that succeeded; no sample before the first",
        labels=labels,
    )
    paused = GaugeMetricFamily(
        "triage_destination_paused", "1 while paused after failures in a row", labels=labels
    )
    for line in health.destinations:
        key = [line.name]
        if line.state in _UP:
            up.add_metric(key, _UP[line.state])
        backlog.add_metric(key, float(line.backlog))
        failed.add_metric(key, float(line.failed))
        if (seconds := _timestamp(line.last_success_at)) is not None:
            last_success.add_metric(key, seconds)
        paused.add_metric(key, 0.0 if line.paused_until is None else 1.0)
    return [healthy, component, workers, depth, up, backlog, failed, last_success, paused]


class HealthCollector(DatabaseCollector):
    """The health of ``triage serve`` as metrics, read at each scrape."""

    def collect(self) -> Iterator[Metric]:
        try:
            health = read_health(self.settings, self.session_factory)
        except Exception:  # the other metrics still come
            log.exception("health metrics failed")
            return
        database_read = any(c.name == "database" and c.state == "up" for c in health.checks)
        yield from health_families(health, database_read=database_read)
