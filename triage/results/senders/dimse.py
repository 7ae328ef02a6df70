"""C-STORE to a DIMSE destination: one association per batch, proposing exactly the files'
(SOP Class, Transfer Syntax) pairs, TCP_NODELAY, 128 KiB PDUs, optional TLS 1.2+.

Each file is decoded with ``dcmread`` and sent as a Dataset in its own transfer syntax (the only
one proposed for it, so nothing is converted; unchanged elements are written back as read).
pynetdicom can stream a file path undecoded, but only behind the process-wide flag
``_config.STORE_SEND_CHUNKED_DATASET``, which would change every other sender in the process;
result objects are small enough to hold one at a time.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID
from pynetdicom import AE, build_context, evt
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

from triage.config import DimseDestination, TlsFiles
from triage.errors import DestinationUnavailableError, PermanentError, TriageError
from triage.results.senders.base import ResultFile, sends
from triage.sockets import set_nodelay

log = logging.getLogger(__name__)

MAX_PDU_BYTES = 128 * 1024
MAX_PRESENTATION_CONTEXTS = 128  # PS3.8 9.3.2.2: odd context ids 1-255

# C-STORE statuses (PS3.4 B.2.3, PS3.7 C), by what the sender does about them.
SUCCESS = 0x0000
ATTRIBUTE_LIST_WARNING = 0x0107
ATTRIBUTE_OUT_OF_RANGE_WARNING = 0x0116
WARNINGS = range(0xB000, 0xC000)  # coercion, element discarded, does not match SOP class
OUT_OF_RESOURCES = range(0xA700, 0xA800)
RESOURCE_LIMITATION = 0x0213
DATASET_DOES_NOT_MATCH = range(0xA900, 0xAA00)
CANNOT_UNDERSTAND = range(0xC000, 0xD000)


class StatusCategory(Enum):
    """What the status of a C-STORE response we got means for the delivery."""

    SUCCESS = "success"
    WARNING = "warning"  # stored; logged
    RETRY = "retry"  # the PACS is out of resources: try the batch again later
    FAILURE = "failure"  # refused for good


def status_category(code: int) -> StatusCategory:
    """What a C-STORE response status means for the delivery."""
    if code == SUCCESS:
        return StatusCategory.SUCCESS
    if code in WARNINGS or code in (ATTRIBUTE_LIST_WARNING, ATTRIBUTE_OUT_OF_RANGE_WARNING):
        return StatusCategory.WARNING
    if code in OUT_OF_RESOURCES or code == RESOURCE_LIMITATION:
        return StatusCategory.RETRY
    return StatusCategory.FAILURE


def describe_status(code: int) -> str:
    """``0xC000 (cannot understand)``: the code in hex and its meaning, never the comment."""
    if code in OUT_OF_RESOURCES:
        meaning = "out of resources"
    elif code in DATASET_DOES_NOT_MATCH:
        meaning = "data set does not match SOP class"
    elif code in CANNOT_UNDERSTAND:
        meaning = "cannot understand"
    else:
        meaning = str(STORAGE_SERVICE_CLASS_STATUS.get(code, ("", "unknown status"))[1]).lower()
    return f"0x{code:04X} ({meaning})"


def client_tls_context(tls: TlsFiles) -> ssl.SSLContext:
    """TLS 1.2 or later; the server is verified against ``ca_file`` (else the system's CAs)."""
    cafile = str(tls.ca_file) if tls.ca_file is not None else None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(tls.cert_file, tls.key_file)
    return context


@dataclass
class _Connection:
    """Whether the TCP (and TLS) connection opened, to tell 'unreachable' from 'aborted'."""

    opened: bool = False

    def on_open(self, event: Any) -> None:
        self.opened = True


def _peer(destination: DimseDestination) -> str:
    return f"{destination.ae_title} at {destination.host}:{destination.port}"


def _context_name(sop_class_uid: str, transfer_syntax_uid: str) -> str:
    return f"{UID(sop_class_uid).name} in {UID(transfer_syntax_uid).name}"


def _association_error(
    assoc: Any, destination: DimseDestination, connection: _Connection, timeout: float
) -> TriageError:
    peer = _peer(destination)
    if assoc.is_rejected:
        answer = assoc.acceptor.primitive
        return DestinationUnavailableError(
            f"{peer} rejected the association ({answer.result_str}, {answer.source_str}: "
            f"{answer.reason_str})"
        )
    if assoc.rejected_contexts and not assoc.accepted_contexts:
        names = sorted(
            {
                _context_name(cx.abstract_syntax, cx.transfer_syntax[0])
                for cx in assoc.rejected_contexts
            }
        )
        return PermanentError(
            f"{peer} accepted none of the presentation contexts: {'; '.join(names)}"
        )
    if not connection.opened:
        return DestinationUnavailableError(
            f"cannot connect to {peer}: refused, unreachable, TLS handshake failed "
            f"or no answer within {timeout:g} s"
        )
    return DestinationUnavailableError(
        f"{peer} aborted the association or did not answer it within {timeout:g} s"
    )


def _read_dataset(file: ResultFile) -> Dataset:
    try:
        return dcmread(file.path)
    except (OSError, InvalidDicomError, ValueError) as exc:
        raise PermanentError(f"result file {file.path} cannot be read: {exc}") from exc


def _store(assoc: Any, file: ResultFile, message_id: int, peer: str, timeout: float) -> int:
    """Send one file; its response status. Raises DestinationUnavailableError if none came."""
    dataset = _read_dataset(file)
    if not assoc.is_established:
        raise DestinationUnavailableError(f"{peer} aborted the association during the batch")
    try:
        reply = assoc.send_c_store(dataset, msg_id=message_id)
    except (AttributeError, ValueError) as exc:
        raise PermanentError(f"{file.sop_instance_uid} cannot be sent: {exc}") from exc
    if "Status" not in reply:
        raise DestinationUnavailableError(
            f"{peer} gave no C-STORE response for {file.sop_instance_uid} within {timeout:g} s"
        )
    return int(reply.Status)


def _store_all(
    assoc: Any, files: Sequence[ResultFile], destination: DimseDestination, timeout: float
) -> list[str]:
    """Send every file whose context was accepted; what the PACS refused, one line each."""
    peer = _peer(destination)
    accepted = {(cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
    refused: list[str] = []
    for index, file in enumerate(files):
        uid = file.sop_instance_uid
        if (file.sop_class_uid, file.transfer_syntax_uid) not in accepted:
            name = _context_name(file.sop_class_uid, file.transfer_syntax_uid)
            refused.append(f"{uid}: presentation context {name} rejected")
            continue
        code = _store(assoc, file, index % 0xFFFF + 1, peer, timeout)
        outcome = status_category(code)
        if outcome is StatusCategory.RETRY:
            raise DestinationUnavailableError(
                f"{peer} answered C-STORE of {uid} with {describe_status(code)}"
            )
        if outcome is StatusCategory.FAILURE:
            refused.append(f"{uid}: status {describe_status(code)}")
        elif outcome is StatusCategory.WARNING:
            log.warning(
                "C-STORE stored with a warning",
                extra={
                    "sop_instance_uid": uid,
                    "status": f"0x{code:04X}",
                    "called_ae": destination.ae_title,
                },
            )
    return refused


def _requested_contexts(files: Sequence[ResultFile], peer: str) -> list[Any]:
    pairs = sorted({(file.sop_class_uid, file.transfer_syntax_uid) for file in files})
    if len(pairs) > MAX_PRESENTATION_CONTEXTS:
        raise PermanentError(
            f"{len(pairs)} (SOP Class, Transfer Syntax) pairs for {peer}: one association "
            f"carries at most {MAX_PRESENTATION_CONTEXTS}"
        )
    return [build_context(sop_class, [syntax]) for sop_class, syntax in pairs]


@sends(DimseDestination)
def send_by_c_store(
    destination: DimseDestination,
    files: Sequence[ResultFile],
    *,
    calling_ae: str,
    timeout: float,
) -> None:
    """C-STORE every file on one association; see ``send_files`` for what it raises."""
    peer = _peer(destination)
    contexts = _requested_contexts(files, peer)
    tls_args = None
    if destination.tls is not None:
        try:
            tls_args = (client_tls_context(destination.tls), destination.host)
        except (OSError, ssl.SSLError) as exc:
            raise PermanentError(f"TLS files for {peer} cannot be used: {exc}") from exc

    try:
        ae = AE(ae_title=calling_ae)
    except ValueError as exc:
        raise PermanentError(f"calling AE title {calling_ae!r} is not valid: {exc}") from exc
    ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    connection = _Connection()
    assoc = ae.associate(
        destination.host,
        destination.port,
        contexts,
        ae_title=destination.ae_title,
        max_pdu=MAX_PDU_BYTES,
        tls_args=tls_args,
        evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay), (evt.EVT_CONN_OPEN, connection.on_open)],
    )
    if not assoc.is_established:
        raise _association_error(assoc, destination, connection, timeout)
    try:
        refused = _store_all(assoc, files, destination, timeout)
    finally:
        if assoc.is_established:
            assoc.release()
    if refused:
        raise PermanentError(
            f"{peer} refused {len(refused)} of {len(files)} instance(s): {'; '.join(refused)}"
        )
    log.info(
        "C-STORE delivered",
        extra={"called_ae": destination.ae_title, "calling_ae": calling_ae, "count": len(files)},
    )
