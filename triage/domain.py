"""The states and kinds the whole system shares, free of the database and the network.

The ORM (``triage.db.models``) stores them; the pure policy (``triage.worklist.policy``), the API
and the CLI use them without importing SQLAlchemy.
"""

from __future__ import annotations

import enum


class IndexOutcome(enum.StrEnum):
    """What indexing a received instance did."""

    STORED = "stored"
    DUPLICATE = "duplicate"  # identical content already held: nothing added
    NEW_VERSION = "new-version"  # same SOP Instance UID, other content: kept beside the old


class StudyStatus(enum.StrEnum):
    RECEIVING = "receiving"
    COMPLETE = "complete"
    ANALYZING = "analyzing"
    ANALYZED = "analyzed"
    FAILED = "failed"


class InstanceState(enum.StrEnum):
    STORED = "stored"
    MISSING = "missing"  # indexed, but its spool file was not found at reconciliation


class WorkState(enum.StrEnum):
    """State of a job or a delivery."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class ResultKind(enum.StrEnum):
    SEG = "seg"
    SR = "sr"
    KOS = "kos"  # Key Object Selection: the key slices with the SEG and SR (IHE AI Results)
    REJECTION = "rejection"  # rejection note withdrawing an earlier run's objects (IHE IOCM)


class ModelMode(enum.StrEnum):
    """How a model version's findings are used (``triage-admin models mode``)."""

    SHADOW = "shadow"  # for admins only: no worklist change, no results, no alerts
    REVIEW = "review"  # raises the worklist; results and alerts wait for an approval
    CLINICAL = "clinical"  # raises the worklist, sends results and alerts at once


class Verdict(enum.StrEnum):
    """A reader's verdict on a finding, or on a study the model called negative."""

    AGREE = "agree"
    DISAGREE = "disagree"
    UNSURE = "unsure"


class Tier(enum.StrEnum):
    CRITICAL = "critical"
    URGENT = "urgent"
    ROUTINE = "routine"


class ReadingState(enum.StrEnum):
    UNREAD = "unread"
    CLAIMED = "claimed"
    READ = "read"


class PeerKind(enum.StrEnum):
    DIMSE = "dimse"
    DICOMWEB = "dicomweb"


class TokenRole(enum.StrEnum):
    RADIOLOGIST = "radiologist"
    ADMIN = "admin"
    SENDER = "sender"  # an archive or modality: may store by STOW-RS, nothing else
    WORKER = "worker"  # a worker without the data directory: reads images, hands back results
