"""Prometheus collectors, registered on the registry the service owns (no global registry).

With receiver processes (``dicom_processes`` above 1), every process counts into memory-mapped
files in one directory, prometheus_client's multiprocess mode, and ``triage serve``'s
``/metrics`` adds them up: a receiver process that died still counts for what it stored.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values
from prometheus_client.core import Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from triage.config import Settings
from triage.db.session import SessionFactory

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
"""Where prometheus_client looks for the directory; receiver processes inherit it."""


def count_across_processes(directory: Path) -> CollectorRegistry:
    """Make every metric created from now on, in this process and in the processes it starts,
    count into ``directory`` (emptied first: what an earlier run counted is not this run's),
    and return a registry that reads them all. Call it once, before any metric is created."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    os.environ[MULTIPROCESS_ENV] = str(directory)
    # prometheus_client picked its value class from the environment when it was imported.
    values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    return registry


def process_ended(pid: int) -> None:
    """Drop what an ended process held in gauges (its counters and histograms still count)."""
    if MULTIPROCESS_ENV in os.environ:
        mark_process_dead(pid)  # type: ignore[no-untyped-call]


class IngestMetrics:
    """What the listener and the importer count."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.instances = Counter(
            "triage_instances_received",
            "Instances stored and indexed (identical re-sends excluded).",
            ["source"],
            registry=registry,
        )
        self.duplicates = Counter(
            "triage_instances_duplicate",
            "Identical re-sends of an instance already held.",
            registry=registry,
        )
        self.bytes = Counter(
            "triage_bytes_received", "Bytes of instances stored.", registry=registry
        )
        self.rejections = Counter(
            "triage_rejections",
            "Instances or associations refused, by reason.",
            ["reason"],
            registry=registry,
        )
        self.associations = Gauge(
            "triage_associations_active",
            "DICOM associations open now.",
            registry=registry,
            multiprocess_mode="livesum",  # processes that ended hold none
        )
        self.spool_seconds = Histogram(
            "triage_spool_seconds",
            "From dataset received to Success: parse, write, fsync and index commit.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=registry,
        )


class DatabaseCollector(Collector):
    """A collector whose metrics are read from the database at each scrape."""

    def __init__(self, settings: Settings, session_factory: SessionFactory) -> None:
        self.settings = settings
        self.session_factory = session_factory

    def describe(self) -> list[Metric]:
        return []  # nothing read at registration: the database may not be there yet
