"""Every UID triage mints, in one place, under the UUID-derived 2.25 arc.

A UID of the form ``2.25.<integer of a UUID>`` needs no registered organisation root
(ISO/IEC 9834-8, DICOM PS3.5 B.2). Result UIDs come from a name-based UUID (version 5)
over (study, model, version, object kind), so a re-run of the same model version on the
same study yields the same UIDs and replaces its earlier results instead of duplicating them.
"""

from __future__ import annotations

import re
import uuid
from enum import Enum

UUID_ARC = "2.25"
"""The root every triage UID starts with."""

TRIAGE_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:triage:dicom-uids")
"""Namespace of the name-based UUIDs behind triage's deterministic UIDs; never change it."""

MAX_UID_LENGTH = 64

_UID_PATTERN = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")


class ResultUid(Enum):
    """Which UID of a result object is derived from (study, model, version): its series or its
    instance UID, of the SEG or the SR."""

    SEG_SERIES = "seg-series"
    SEG_INSTANCE = "seg-instance"
    SR_SERIES = "sr-series"
    SR_INSTANCE = "sr-instance"
    KOS_SERIES = "kos-series"
    KOS_INSTANCE = "kos-instance"
    REJECTION_SERIES = "rejection-series"
    REJECTION_INSTANCE = "rejection-instance"


def _from_uuid(value: uuid.UUID) -> str:
    return f"{UUID_ARC}.{value.int}"


def _derive(*parts: str) -> str:
    # A separator that cannot occur in the parts keeps ("a b", "c") apart from ("a", "b c").
    return _from_uuid(uuid.uuid5(TRIAGE_NAMESPACE, "\x00".join(parts)))


def result_uid(
    *, study_uid: str, model_name: str, model_version: str, kind: str | ResultUid
) -> str:
    """Deterministic UID of one result object (a SEG or SR series or instance) of a study."""
    kind = ResultUid(kind)
    return _derive("result", study_uid, model_name, model_version, kind.value)


def tracking_uid(*, study_uid: str, model_name: str, model_version: str, finding_index: int) -> str:
    """Deterministic Tracking UID of the finding at ``finding_index`` in a model's output."""
    if finding_index < 0:
        raise ValueError(f"finding_index must not be negative, got {finding_index}")
    return _derive("tracking", study_uid, model_name, model_version, str(finding_index))


def device_uid(*, model_name: str, model_version: str) -> str:
    """Device UID of one model version: the same on every study, so results group by device."""
    return _derive("device", model_name, model_version)


def new_uid() -> str:
    """A random UID, for objects that are not results of a model run."""
    return _from_uuid(uuid.uuid4())


def uid_text(raw: bytes) -> str:
    """A UI value as received: NUL or space padding dropped, non-ASCII bytes replaced."""
    return raw.rstrip(b"\x00 ").decode("ascii", errors="replace")


def is_valid_uid(value: str) -> bool:
    """Whether ``value`` is a well-formed DICOM UID (PS3.5 9.1), e.g. one received from the wire."""
    return len(value) <= MAX_UID_LENGTH and _UID_PATTERN.fullmatch(value) is not None


IMPLEMENTATION_CLASS_UID = _derive("implementation-class")
"""Our Implementation Class UID (PS3.7 D.3.3.2), sent in associations and file meta."""


def implementation_version_name(version: str) -> str:
    """Our Implementation Version Name for ``version``: at most 16 characters (PS3.7 D.3.3.2)."""
    return f"TRIAGE_{version}"[:16]
