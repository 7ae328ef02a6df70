"""A DIMSE source: C-FIND at study level (Study Root) to search, C-MOVE to triage's own AE
title to retrieve. The archive must know triage's AE title, host and DICOM port as a move
destination; the instances then arrive through the DICOM listener like any C-STORE, and the
end of that association completes the study."""

from __future__ import annotations

import logging

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
)

from triage.config import Settings
from triage.errors import RetryableError
from triage.sockets import set_nodelay

log = logging.getLogger(__name__)

PENDING = (0xFF00, 0xFF01)
SUCCESS = 0x0000
WARNING = 0xB000  # sub-operations complete, one or more failed or had warnings (PS3.4 C.4.2)
TIMEOUT = 60.0


class DimseSourceError(RetryableError):
    """The source refused, failed or could not be reached this time."""


def _associate(
    settings: Settings, ae_title: str, host: str, port: int, model: object
) -> Association:
    ae = AE(ae_title=settings.ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT
    ae.add_requested_context(model)  # type: ignore[arg-type]
    assoc = ae.associate(
        host, port, ae_title=ae_title, evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)]
    )
    if not assoc.is_established:
        raise DimseSourceError(
            f"{ae_title}@{host}:{port} refused or did not answer the association"
        )
    return assoc


def find_studies(
    settings: Settings,
    ae_title: str,
    host: str,
    port: int,
    *,
    study_dates: str,
    modalities: str | None,
) -> list[str]:
    """Study Instance UIDs of the studies matching a StudyDate range (and modalities)."""
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyDate = study_dates
    query.StudyInstanceUID = ""
    if modalities:
        query.ModalitiesInStudy = modalities
    assoc = _associate(settings, ae_title, host, port, StudyRootQueryRetrieveInformationModelFind)
    found: list[str] = []
    try:
        for status, identifier in assoc.send_c_find(
            query, StudyRootQueryRetrieveInformationModelFind
        ):
            code = int(getattr(status, "Status", -1))
            if code in PENDING and identifier is not None:
                uid = str(identifier.get("StudyInstanceUID", "") or "")
                if uid and uid not in found:
                    found.append(uid)
            elif code != SUCCESS:
                raise DimseSourceError(f"C-FIND answered status 0x{code & 0xFFFF:04X}")
    finally:
        assoc.release()
    return found


def move_study(settings: Settings, ae_title: str, host: str, port: int, study_uid: str) -> int:
    """C-MOVE a study to our own AE title; the instances the archive says it sent."""
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid
    assoc = _associate(settings, ae_title, host, port, StudyRootQueryRetrieveInformationModelMove)
    completed = 0
    try:
        for status, _identifier in assoc.send_c_move(
            query, settings.ae_title, StudyRootQueryRetrieveInformationModelMove
        ):
            code = int(getattr(status, "Status", -1))
            if code in PENDING:
                continue
            completed = int(getattr(status, "NumberOfCompletedSuboperations", 0) or 0)
            if code not in (SUCCESS, WARNING):
                raise DimseSourceError(
                    f"C-MOVE to {settings.ae_title} answered status 0x{code & 0xFFFF:04X} "
                    "(does the archive know our AE title, host and port?)"
                )
            if code == WARNING:
                failed = int(getattr(status, "NumberOfFailedSuboperations", 0) or 0)
                log.warning(
                    "C-MOVE completed with failures",
                    extra={"study_uid": study_uid, "completed": completed, "failed": failed},
                )
    finally:
        assoc.release()
    return completed
