"""The C-ECHO / C-STORE listener. Handlers are thin, never raise, and answer named statuses."""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections.abc import Callable
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AllStoragePresentationContexts, evt
from pynetdicom.transport import ThreadedAssociationServer

from triage.config import Settings, TlsFiles
from triage.db.session import SessionFactory
from triage.dicom import status
from triage.errors import DatasetMismatchError, DicomInputError, OutOfResourcesError
from triage.ingest.audit import record_rejection
from triage.ingest.pipeline import Ingestor
from triage.metrics import IngestMetrics
from triage.receiver.policy import CallerPolicy, TriageAE

log = logging.getLogger(__name__)

VERIFICATION = "1.2.840.10008.1.1"

# The transfer syntaxes modalities and PACS send, compressed ones included. Accepting every one
# pynetdicom knows would make each association copy 170 x 45 contexts (~60 ms of CPU).
COMMON_TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent)
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51",  # JPEG Extended
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202",  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203",  # HTJ2K
    "1.2.840.10008.1.2.5",  # RLE Lossless
    "1.2.840.10008.1.2.4.100",  # MPEG2 Main Profile (video storage)
    "1.2.840.10008.1.2.4.102",  # MPEG-4 AVC/H.264
    "1.2.840.10008.1.2.4.107",  # HEVC/H.265
]

AssociationEnded = Callable[[set[str]], None]


def set_nodelay(event: Any) -> None:
    """TCP_NODELAY on every DICOM socket: Nagle against delayed ACKs stalls DIMSE to ~17/s."""
    sock = event.assoc.dul.socket.socket if event.assoc.dul.socket else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def server_tls_context(tls: TlsFiles) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(tls.cert_file, tls.key_file)
    if tls.ca_file is not None:
        context.load_verify_locations(tls.ca_file)
    if tls.require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _failure(code: int, comment: str) -> Dataset:
    reply = Dataset()
    reply.Status = code
    reply.ErrorComment = comment[:64]
    return reply


class DicomListener:
    """Accepts associations from the PACS and hands every instance to the Ingestor."""

    def __init__(
        self,
        settings: Settings,
        *,
        ingestor: Ingestor,
        session_factory: SessionFactory,
        metrics: IngestMetrics,
        on_association_end: AssociationEnded | None = None,
    ) -> None:
        self.settings = settings
        self.ingestor = ingestor
        self.session_factory = session_factory
        self.metrics = metrics
        self.on_association_end = on_association_end
        self._studies: dict[int, set[str]] = {}
        self._lock = threading.Lock()
        self._server: ThreadedAssociationServer | None = None
        self.ae = self._build_ae()
        metrics.associations.set_function(lambda: len(self.ae.active_associations))

    def _build_ae(self) -> TriageAE:
        settings = self.settings
        ae = TriageAE(settings.ae_title, CallerPolicy(settings.allowed_callers))
        ae.require_called_aet = True
        ae.maximum_associations = settings.max_associations
        ae.maximum_pdu_size = settings.max_pdu_bytes
        ae.network_timeout = settings.network_timeout_seconds
        ae.dimse_timeout = settings.dimse_timeout_seconds
        ae.acse_timeout = settings.network_timeout_seconds
        ae.add_supported_context(VERIFICATION, COMMON_TRANSFER_SYNTAXES[:3])
        for context in AllStoragePresentationContexts:
            assert context.abstract_syntax is not None
            ae.add_supported_context(context.abstract_syntax, COMMON_TRANSFER_SYNTAXES)
        return ae

    def start(self) -> None:
        settings = self.settings
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, set_nodelay),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_REJECTED, self._on_rejected),
        ]
        tls = server_tls_context(settings.tls) if settings.tls else None
        self._server = self.ae.start_server(
            (settings.dicom_host, settings.dicom_port),
            block=False,
            evt_handlers=handlers,
            ssl_context=tls,
        )
        log.info(
            "DICOM listener started",
            extra={"ae_title": settings.ae_title, "port": self.port, "tls": tls is not None},
        )

    @property
    def port(self) -> int:
        if self._server is None:
            return self.settings.dicom_port
        return int(self._server.server_address[1])

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
            log.info("DICOM listener stopped")

    # -- handlers ---------------------------------------------------------------------------

    def _on_echo(self, event: Any) -> int:
        return status.SUCCESS

    def _reject(self, event: Any, code: int, reason: str, message: str, **uids: str) -> Dataset:
        calling = event.assoc.requestor.ae_title
        self.metrics.rejections.labels(reason=reason).inc()
        log.warning(
            "C-STORE refused: %s",
            message,
            extra={"calling_ae": calling, "status": f"0x{code:04X}", **uids},
        )
        record_rejection(
            self.session_factory, reason=reason, actor=calling, status=code, message=message, **uids
        )
        return _failure(code, message)

    def _on_store(self, event: Any) -> int | Dataset:
        request = event.request
        requested = (str(request.AffectedSOPClassUID), str(request.AffectedSOPInstanceUID))
        uids = {"sop_instance_uid": requested[1][:64]}
        try:
            data = event.encoded_dataset(include_meta=True)
            ingested = self.ingestor.ingest(
                data,
                calling_ae=event.assoc.requestor.ae_title,
                source="dimse",
                requested=requested,
            )
        except DatasetMismatchError as exc:
            return self._reject(
                event, status.DATASET_DOES_NOT_MATCH_SOP_CLASS, "dataset-mismatch", str(exc), **uids
            )
        except DicomInputError as exc:
            return self._reject(
                event, status.CANNOT_UNDERSTAND, "cannot-understand", str(exc), **uids
            )
        except OutOfResourcesError as exc:
            return self._reject(
                event, status.OUT_OF_RESOURCES, "out-of-resources", str(exc), **uids
            )
        except Exception as exc:  # the handler never raises: pynetdicom would abort
            log.exception("C-STORE failed", extra=uids)
            return self._reject(
                event, status.PROCESSING_FAILURE, "processing-failure", type(exc).__name__, **uids
            )
        with self._lock:
            self._studies.setdefault(id(event.assoc), set()).add(ingested.header.study_uid)
        return status.SUCCESS

    def _end(self, event: Any, *, released: bool) -> None:
        with self._lock:
            studies = self._studies.pop(id(event.assoc), set())
        if released and studies and self.on_association_end is not None:
            self.on_association_end(studies)

    def _on_released(self, event: Any) -> None:
        self._end(event, released=True)

    def _on_aborted(self, event: Any) -> None:
        self._end(event, released=False)

    def _on_rejected(self, event: Any) -> None:
        requestor = event.assoc.requestor
        self.metrics.rejections.labels(reason="association-rejected").inc()
        log.warning(
            "association rejected",
            extra={"calling_ae": requestor.ae_title, "address": requestor.address},
        )
        record_rejection(
            self.session_factory,
            reason="association-rejected",
            actor=str(requestor.ae_title)[:64],
            address=str(requestor.address),
        )
