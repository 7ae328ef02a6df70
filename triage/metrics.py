"""Prometheus collectors, registered on the registry the service owns (no global registry)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


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
            "triage_associations_active", "DICOM associations open now.", registry=registry
        )
        self.spool_seconds = Histogram(
            "triage_spool_seconds",
            "From dataset received to Success: parse, write, fsync and index commit.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=registry,
        )
