"""The C-ECHO / C-STORE listener: association policy, and each data set into the spool.

The protocol runs in ``triage.receiver.upper``; this module decides who may associate and
what happens to each instance. Nothing here raises into the protocol: every outcome is a
named DIMSE status.
"""

from __future__ import annotations

import hmac
import logging
import socket
import ssl
import threading
from collections.abc import Callable

from triage import __version__
from triage.audit import record_rejection
from triage.config import Settings, TlsFiles
from triage.db.session import SessionFactory
from triage.dicom import status
from triage.dicom.dimse import Command
from triage.dicom.part10 import file_meta
from triage.dicom.uids import IMPLEMENTATION_CLASS_UID, implementation_version_name, is_valid_uid
from triage.errors import DatasetMismatchError, DicomInputError, OutOfResourcesError
from triage.ingest.pipeline import Ingestor
from triage.metrics import IngestMetrics
from triage.receiver.accepted import ACCEPTED_TRANSFER_SYNTAXES, STORAGE_SOP_CLASSES
from triage.receiver.acse import (
    CALLED_AE_NOT_RECOGNISED,
    CALLING_AE_NOT_RECOGNISED,
    NO_REASON_GIVEN,
    Rejection,
    rejection,
)
from triage.receiver.policy import CallerPolicy
from triage.receiver.upper import (
    AcceptorServer,
    AcceptorSettings,
    AssociationSlots,
    ConnectionGate,
    Requestor,
    StoreResult,
)
from triage.storage.spool import IncomingFile

log = logging.getLogger(__name__)

VERIFICATION = "1.2.840.10008.1.1"


AssociationEnded = Callable[[set[str]], None]

# A data set goes to its spool file in pieces of this size while it arrives (each piece is a
# write, a hash update and a start of writeback: a release of the GIL each).
WRITE_BYTES = 256 * 1024

# Empty spool files kept ready, so an association does not wait for a file to be created.
SPARE_FILES = 8


def server_tls_context(tls: TlsFiles) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(tls.cert_file, tls.key_file)
    if tls.ca_file is not None:
        context.load_verify_locations(tls.ca_file)
    if tls.require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class DataSetBuffers:
    """The fixed-size buffers data sets are received into, reused from one C-STORE to the
    next (no allocation per instance); at most ``keep`` are kept."""

    def __init__(self, size: int, *, keep: int = 16) -> None:
        self.size = size
        self._free: list[bytearray] = []
        self._keep = keep

    def take(self) -> bytearray:
        try:
            return self._free.pop()  # list.pop and list.append are atomic
        except IndexError:
            return bytearray(self.size)

    def give(self, buffer: bytearray) -> None:
        if len(self._free) < self._keep:
            self._free.append(buffer)


class SpoolSink:
    """One C-STORE data set, into its spool file while it arrives, then through the Ingestor.

    The file (file meta, then the data set) fills one buffer of fixed size
    (``receive_buffer_kb``) and is written to the spool file every WRITE_BYTES while it
    arrives, so writing overlaps receiving. An object that fits in the buffer (a CT or MR
    slice) is handed to the Ingestor from memory; a larger one wraps the buffer round, so an
    association holds that much memory whatever the object's size, and the Ingestor reads its
    header back from the file. A request that cannot be stored (invalid UIDs, a full spool)
    still has its data set read to the end, into the same buffer over and over, then gets its
    status.
    """

    def __init__(
        self, listener: DicomListener, requestor: Requestor, command: Command, transfer_syntax: str
    ) -> None:
        self.listener = listener
        self.requestor = requestor
        self.command = command
        self._incoming: IncomingFile | None = None
        self._refusal: StoreResult | None = None
        self._buffer: bytearray | None = listener.buffers.take()
        self._filled = 0  # bytes of the file in the buffer
        self._written = 0  # ...of which written to the spool file
        self._wrapped = False  # the buffer went round: the file is whole only on disk
        self._pending = 0  # bytes the last buffer() gave room for
        sop_class, sop_instance = command.affected_sop_class_uid, command.affected_sop_instance_uid
        if not (is_valid_uid(sop_class) and is_valid_uid(sop_instance)):
            self._refusal = listener.refuse(
                requestor,
                status.CANNOT_UNDERSTAND,
                "cannot-understand",
                "invalid SOP Class or Instance UID in the C-STORE request",
                sop_instance_uid=sop_instance[:64],
            )
            return
        try:
            self._incoming = listener.ingestor.spool.open()
        except OutOfResourcesError as exc:
            self._out_of_resources(exc)
            return
        meta = file_meta(
            sop_class_uid=sop_class,
            sop_instance_uid=sop_instance,
            transfer_syntax_uid=transfer_syntax,
            implementation_class_uid=IMPLEMENTATION_CLASS_UID,
            implementation_version_name=implementation_version_name(__version__),
            source_ae_title=requestor.calling_ae if requestor.calling_ae.isascii() else None,
        )
        self.buffer(len(meta))[:] = meta  # written with the data set's first bytes
        self.received()

    def _out_of_resources(self, exc: OutOfResourcesError) -> None:
        self._incoming = None
        self._refusal = self.listener.refuse(
            self.requestor,
            status.OUT_OF_RESOURCES,
            "out-of-resources",
            str(exc),
            sop_instance_uid=self.command.affected_sop_instance_uid,
        )

    def buffer(self, size: int) -> memoryview:
        if self._buffer is None:
            raise ValueError("data set already finished or abandoned")
        if self._filled == len(self._buffer):
            self._write_received()
            self._filled = self._written = 0
            self._wrapped = True
        end = min(self._filled + size, len(self._buffer))
        self._pending = end - self._filled
        return memoryview(self._buffer)[self._filled : end]

    def received(self) -> None:
        self._filled += self._pending
        self._pending = 0
        if self._filled - self._written >= WRITE_BYTES:
            self._write_received()

    def _write_received(self) -> None:
        """What the buffer holds beyond the last write, into the spool file (nothing is kept
        after a refusal)."""
        incoming, buffer = self._incoming, self._buffer
        if incoming is not None and buffer is not None and self._filled > self._written:
            try:
                incoming.write(memoryview(buffer)[self._written : self._filled])
            except OutOfResourcesError as exc:
                self._out_of_resources(exc)
        self._written = self._filled

    def finish(self) -> StoreResult:
        self._write_received()
        buffer, self._buffer = self._buffer, None
        if buffer is None:
            raise ValueError("data set already finished or abandoned")
        try:
            if self._refusal is not None:
                return self._refusal
            assert self._incoming is not None  # no spool file is always a refusal
            whole = None if self._wrapped else memoryview(buffer)[: self._filled]
            return self.listener.store(self.requestor, self.command, whole, self._incoming)
        finally:
            self.listener.buffers.give(buffer)

    def abandon(self) -> None:
        if self._incoming is not None:
            self._incoming.discard()
            self._incoming = None
        buffer, self._buffer = self._buffer, None
        if buffer is not None:
            self.listener.buffers.give(buffer)


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
        self.callers = CallerPolicy(settings.allowed_callers)
        self.buffers = DataSetBuffers(settings.receive_buffer_kb * 1024)
        self._studies: dict[int, set[str]] = {}
        self._lock = threading.Lock()
        self._server: AcceptorServer | None = None
        self._contexts = {
            VERIFICATION: frozenset(ACCEPTED_TRANSFER_SYNTAXES[:3]),
            **{
                sop_class: frozenset(ACCEPTED_TRANSFER_SYNTAXES)
                for sop_class in STORAGE_SOP_CLASSES
            },
        }
        metrics.associations.set_function(
            lambda: self._server.active_count() if self._server is not None else 0
        )

    def start(self, *, listen: bool = True, slots: AssociationSlots | None = None) -> None:
        """Listen on the DICOM port; or, with ``listen=False``, serve only the connections
        handed over with ``adopt`` (a receiver process behind ``triage serve``, which gates
        them, with ``slots`` shared with the other receiver processes)."""
        settings = self.settings
        tls = server_tls_context(settings.tls) if settings.tls else None
        self._server = AcceptorServer(
            (settings.dicom_host, settings.dicom_port) if listen else None,
            settings=AcceptorSettings(
                max_pdu_bytes=settings.max_pdu_bytes,
                network_timeout=settings.network_timeout_seconds,
                dimse_timeout=settings.dimse_timeout_seconds,
                implementation_class_uid=IMPLEMENTATION_CLASS_UID,
                implementation_version_name=implementation_version_name(__version__),
                identities_checked=bool(settings.user_identities),
                max_associations=settings.max_associations,
                acse_timeout=settings.acse_timeout_seconds,
                min_bytes_per_second=settings.dicom_min_bytes_per_second,
            ),
            policy=self,
            contexts=self._contexts,
            tls=tls,
            gate=ConnectionGate(
                per_address=settings.max_negotiating_per_address, total=settings.max_negotiating
            )
            if listen
            else None,
            slots=slots,
        )
        self.ingestor.spool.keep_ready(SPARE_FILES)
        self._server.start()
        if listen:
            log.info(
                "DICOM listener started",
                extra={"ae_title": settings.ae_title, "port": self.port, "tls": tls is not None},
            )

    def adopt(
        self,
        sock: socket.socket,
        address: tuple[str, int],
        *,
        on_negotiated: Callable[[], None],
        on_closed: Callable[[], None],
    ) -> None:
        """Serve a connection accepted by another process (see ``triage.receiver.processes``)."""
        if self._server is None:
            raise ValueError("listener not started")
        self._server.adopt(sock, address, on_negotiated=on_negotiated, on_closed=on_closed)

    @property
    def port(self) -> int:
        if self._server is None:
            return self.settings.dicom_port
        return self._server.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None
            self.ingestor.spool.close()
            log.info("DICOM listener stopped")

    # -- the AcceptorPolicy -----------------------------------------------------------------

    def check_titles(self, requestor: Requestor) -> Rejection | None:
        if requestor.called_ae != self.settings.ae_title:
            return rejection(CALLED_AE_NOT_RECOGNISED, "called AE title is not ours")
        if not self.callers.open and requestor.calling_ae not in self.callers.titles_for(
            requestor.address
        ):
            return rejection(CALLING_AE_NOT_RECOGNISED, "calling AE title not allowed")
        return None

    def check_identity(self, requestor: Requestor) -> Rejection | None:
        if not self._identity_accepted(requestor):
            return rejection(NO_REASON_GIVEN, "user identity not accepted")
        return None

    def _identity_accepted(self, requestor: Requestor) -> bool:
        """A calling AE with user identities configured must send one of them."""
        wanted = [i for i in self.settings.user_identities if i.ae_title == requestor.calling_ae]
        if not wanted:
            return True
        sent = requestor.identity
        if sent is None or sent.kind not in (1, 2):
            return False
        for identity in wanted:
            passcode = identity.passcode.get_secret_value() if identity.passcode else None
            if not hmac.compare_digest(sent.primary, identity.username.encode()):
                continue
            if passcode is None or (
                sent.kind == 2 and hmac.compare_digest(sent.secondary, passcode.encode())
            ):
                return True
        return False

    def rejected(self, requestor: Requestor, refusal: Rejection) -> None:
        log.warning(
            "association rejected: %s",
            refusal.why,
            extra={"calling_ae": requestor.calling_ae, "address": requestor.address},
        )
        self._count_and_record(requestor, "association-rejected", why=refusal.why)

    def aborted(self, requestor: Requestor, why: str) -> None:
        self._count_and_record(requestor, "association-aborted", why=why[:200])

    def connection_refused(self, address: str, why: str) -> None:
        # Counted, not recorded one by one: a flood of connections must not become one of
        # database writes (the gate logs it, a line per few seconds).
        self.metrics.rejections.labels(reason="connection-refused").inc()

    def open_store(self, requestor: Requestor, command: Command, transfer_syntax: str) -> SpoolSink:
        return SpoolSink(self, requestor, command, transfer_syntax)

    def ended(self, requestor: Requestor, *, released: bool) -> None:
        with self._lock:
            studies = self._studies.pop(id(requestor), set())
        if released and studies and self.on_association_end is not None:
            self.on_association_end(studies)

    def _count_and_record(self, requestor: Requestor, reason: str, **detail: object) -> None:
        """Every refusal: the rejections metric by reason, and an audit event for admins."""
        self.metrics.rejections.labels(reason=reason).inc()
        record_rejection(
            self.session_factory,
            reason=reason,
            actor=requestor.calling_ae[:64] or None,
            address=requestor.address,
            **detail,
        )

    # -- storing ------------------------------------------------------------------------------

    def refuse(
        self, requestor: Requestor, code: int, reason: str, message: str, **uids: str
    ) -> StoreResult:
        """Count, log and record a refused C-STORE; the result to answer with."""
        log.warning(
            "C-STORE refused: %s",
            message,
            extra={"calling_ae": requestor.calling_ae, "status": f"0x{code:04X}", **uids},
        )
        self._count_and_record(requestor, reason, status=code, message=message, **uids)
        return StoreResult(code, message[:64])

    def store(
        self,
        requestor: Requestor,
        command: Command,
        data: memoryview | None,
        incoming: IncomingFile,
    ) -> StoreResult:
        """Ingest one received instance, whole in ``incoming`` (uncommitted), and in ``data``
        (valid during the call) where it fitted in the receive buffer."""
        requested = (command.affected_sop_class_uid, command.affected_sop_instance_uid)
        uids = {"sop_instance_uid": requested[1]}
        try:
            ingested = self.ingestor.ingest(
                data,
                calling_ae=requestor.calling_ae,
                source="dimse",
                requested=requested,
                incoming=incoming,
            )
        except DatasetMismatchError as exc:
            return self.refuse(
                requestor,
                status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                "dataset-mismatch",
                str(exc),
                **uids,
            )
        except DicomInputError as exc:
            return self.refuse(
                requestor, status.CANNOT_UNDERSTAND, "cannot-understand", str(exc), **uids
            )
        except OutOfResourcesError as exc:
            return self.refuse(
                requestor, status.OUT_OF_RESOURCES, "out-of-resources", str(exc), **uids
            )
        except Exception as exc:  # never into the protocol: answer a failure instead
            log.exception("C-STORE failed", extra=uids)
            return self.refuse(
                requestor,
                status.PROCESSING_FAILURE,
                "processing-failure",
                type(exc).__name__,
                **uids,
            )
        with self._lock:
            self._studies.setdefault(id(requestor), set()).add(ingested.header.study_uid)
        return StoreResult(status.SUCCESS)
