"""STOW-RS, PS3.18 10.5: a ``multipart/related; type="application/dicom"`` body of instances,
each part streamed into the spool and indexed like a C-STORE before the response is sent.

``StowRequest`` is fed the body piece by piece (``feed``) from the HTTP layer and parses it
as it arrives (python-multipart). A part's bytes go straight into a spool file; when the part
ends, the file is read back mapped (page cache, not process memory) to check and index it,
and a re-send is compared with the held file on disk, in pieces. Memory per request is the
parser's buffer and one piece, whatever the body size. Every part gets an outcome: stored
(duplicates of an instance held are stored, as over DIMSE) or failed with a PS3.18 failure
reason. Nothing of a part that fails is kept.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from email.message import Message

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser

from triage.audit import record_rejection
from triage.db.session import SessionFactory
from triage.dicom import status
from triage.dicom.header import InstanceHeader, parse_header
from triage.errors import DatasetMismatchError, DicomInputError, OutOfResourcesError
from triage.ingest.pipeline import Ingestor
from triage.receiver.accepted import ACCEPTED_TRANSFER_SYNTAXES, STORAGE_SOP_CLASSES
from triage.storage.spool import IncomingFile

log = logging.getLogger(__name__)

_STORAGE_SOP_CLASSES = frozenset(STORAGE_SOP_CLASSES)

DICOM = "application/dicom"

# Failure Reason (0008,1197) values of a Store Instances Response (PS3.18 10.5.3): the DIMSE
# statuses of PS3.4 Annex B, and for an instance of another study than the one in the target
# URL, 0xC409 as dcm4chee-arc answers it (PS3.18 names no code of its own for it).
TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122
STUDY_INSTANCE_UID_MISMATCH = 0xC409


class StowSyntaxError(ValueError):
    """The body is not a multipart/related message we can read (answered 400)."""


@dataclass(frozen=True)
class StoredInstance:
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str


@dataclass(frozen=True)
class FailedInstance:
    reason: int
    message: str
    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None


@dataclass
class StowResult:
    stored: list[StoredInstance] = field(default_factory=list)
    failed: list[FailedInstance] = field(default_factory=list)
    syntax_error: str | None = None
    """Why the body could not be read to its end (parts before the fault keep their outcome)."""

    @property
    def studies(self) -> set[str]:
        return {instance.study_uid for instance in self.stored}

    def http_status(self) -> int:
        """PS3.18 10.5.3: 200 all stored, 202 some stored and failures for others, 409 none
        stored though the request was readable, 400 a request we could not read."""
        if self.stored:
            return 202 if self.failed or self.syntax_error else 200
        if self.syntax_error is not None or not self.failed:
            return 400
        return 409


def media_type(value: str) -> tuple[str, dict[str, str]]:
    """A Content-Type header as (type/subtype in lower case, parameters)."""
    message = Message()
    message["content-type"] = value
    params = {key.lower(): val for key, val in message.get_params(failobj=[])[1:]}
    return message.get_content_type(), params


class StowRequest:
    """One STOW-RS request body: ``feed`` its pieces, then ``finish``; ``abort`` on a cut-off."""

    def __init__(
        self,
        *,
        ingestor: Ingestor,
        session_factory: SessionFactory,
        boundary: str,
        study_uid: str | None,
        caller: str,
        address: str | None,
    ) -> None:
        if not boundary:
            raise StowSyntaxError("multipart/related without a boundary parameter")
        self.ingestor = ingestor
        self.session_factory = session_factory
        self.study_uid = study_uid
        self.caller = caller
        self.address = address
        self.result = StowResult()
        self._ended = False
        self._headers: dict[str, str] = {}
        self._field = b""
        self._value = b""
        self._incoming: IncomingFile | None = None
        self._size = 0
        self._failure: FailedInstance | None = None
        self._parser = MultipartParser(
            boundary.encode("latin-1"),
            {
                "on_part_begin": self._part_begin,
                "on_header_field": self._header_field,
                "on_header_value": self._header_value,
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
                "on_part_data": self._part_data,
                "on_part_end": self._part_end,
                "on_end": self._end,
            },
        )

    # -- the HTTP layer's side ---------------------------------------------------------------

    def feed(self, piece: bytes) -> None:
        if self.result.syntax_error is not None or self._ended:
            return  # the rest after an error, or an epilogue: not read further
        try:
            self._parser.write(piece)
        except MultipartParseError as exc:
            self._drop_part()
            self.result.syntax_error = f"malformed multipart body: {exc}"

    def finish(self) -> StowResult:
        if not self._ended and self.result.syntax_error is None:
            self._drop_part()
            self.result.syntax_error = (
                "the body ended inside a part (no closing boundary)"
                if self.result.stored or self.result.failed or self._incoming is not None
                else "no part found: the body holds no boundary delimiter"
            )
        self._drop_part()
        return self.result

    def abort(self) -> None:
        """The request was cut off (limit, timeout, disconnect): drop the part in progress."""
        self._drop_part()

    # -- parser callbacks ----------------------------------------------------------------------

    def _part_begin(self) -> None:
        self._headers = {}
        self._field = self._value = b""
        self._incoming = None
        self._size = 0
        self._failure = None

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        name = self._field.decode("latin-1").strip().lower()
        self._headers[name] = self._value.decode("latin-1").strip()
        self._field = self._value = b""

    def _headers_finished(self) -> None:
        content_type = self._headers.get("content-type")
        if content_type is None:
            self._failure = FailedInstance(status.CANNOT_UNDERSTAND, "a part has no Content-Type")
            return
        kind, params = media_type(content_type)
        if kind != DICOM:
            self._failure = FailedInstance(
                status.CANNOT_UNDERSTAND, f"a part is {kind}, not {DICOM}"
            )
            return
        if params.get("transfer-syntax") not in (None, *ACCEPTED_TRANSFER_SYNTAXES):
            self._failure = FailedInstance(
                TRANSFER_SYNTAX_NOT_SUPPORTED, "a part's transfer syntax is not accepted"
            )
            return
        try:
            self._incoming = self.ingestor.spool.open()
        except OutOfResourcesError as exc:
            self._failure = FailedInstance(status.OUT_OF_RESOURCES, str(exc))

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._incoming is None:
            return  # a part already failed: its bytes are skipped
        try:
            self._incoming.write(memoryview(data)[start:end])
        except OutOfResourcesError as exc:  # the file is discarded
            self._incoming = None
            self._failure = FailedInstance(status.OUT_OF_RESOURCES, str(exc))
        else:
            self._size += end - start

    def _part_end(self) -> None:
        incoming, self._incoming = self._incoming, None
        if incoming is None:
            assert self._failure is not None
            self._fail(self._failure)
            return
        if self._size == 0:
            incoming.discard()
            self._fail(FailedInstance(status.CANNOT_UNDERSTAND, "an empty part"))
            return
        self._store(incoming)

    def _end(self) -> None:
        self._ended = True

    # -- one instance ----------------------------------------------------------------------------

    def _store(self, incoming: IncomingFile) -> None:
        try:
            with incoming.mapped() as data:
                header = parse_header(data)
        except DicomInputError as exc:
            incoming.discard()
            self._fail(FailedInstance(status.CANNOT_UNDERSTAND, str(exc)))
            return
        except OutOfResourcesError as exc:  # the written part could not be read back
            incoming.discard()
            self._fail(FailedInstance(status.PROCESSING_FAILURE, str(exc)))
            return
        refusal = self._refusal(header)
        if refusal is not None:
            incoming.discard()
            self._fail(refusal)
            return
        uids = (header.sop_class_uid, header.sop_instance_uid)
        try:
            ingested = self.ingestor.ingest(
                None, calling_ae=None, source="stow", incoming=incoming, header=header
            )
        except DatasetMismatchError as exc:
            failure = FailedInstance(status.DATASET_DOES_NOT_MATCH_SOP_CLASS, str(exc), *uids)
        except DicomInputError as exc:
            failure = FailedInstance(status.CANNOT_UNDERSTAND, str(exc), *uids)
        except OutOfResourcesError as exc:
            failure = FailedInstance(status.OUT_OF_RESOURCES, str(exc), *uids)
        except Exception as exc:  # an answer for this part, not a 500 for the request
            log.exception("STOW-RS part failed", extra={"sop_instance_uid": uids[1]})
            failure = FailedInstance(status.PROCESSING_FAILURE, type(exc).__name__, *uids)
        else:
            self.result.stored.append(
                StoredInstance(*uids, ingested.header.study_uid, ingested.header.series_uid)
            )
            return
        self._fail(failure)

    def _refusal(self, header: InstanceHeader) -> FailedInstance | None:
        uids = (header.sop_class_uid, header.sop_instance_uid)
        if header.sop_class_uid not in _STORAGE_SOP_CLASSES:
            return FailedInstance(
                status.SOP_CLASS_NOT_SUPPORTED, "not a storage SOP class we accept", *uids
            )
        if header.transfer_syntax_uid not in ACCEPTED_TRANSFER_SYNTAXES:
            return FailedInstance(
                TRANSFER_SYNTAX_NOT_SUPPORTED, "transfer syntax not accepted", *uids
            )
        if self.study_uid is not None and header.study_uid != self.study_uid:
            return FailedInstance(
                STUDY_INSTANCE_UID_MISMATCH, "instance of another study than the URL's", *uids
            )
        return None

    def _fail(self, failure: FailedInstance) -> None:
        self.result.failed.append(failure)
        reason = _REASONS.get(failure.reason, "processing-failure")
        log.warning(
            "STOW-RS instance refused: %s",
            failure.message,
            extra={
                "caller": self.caller,
                "status": f"0x{failure.reason:04X}",
                "sop_instance_uid": failure.sop_instance_uid,
            },
        )
        self.ingestor.metrics.rejections.labels(reason=reason).inc()
        record_rejection(
            self.session_factory,
            reason=reason,
            actor=self.caller,
            address=self.address,
            status=failure.reason,
            message=failure.message,
            sop_instance_uid=failure.sop_instance_uid,
            protocol="stow-rs",
        )

    def _drop_part(self) -> None:
        incoming, self._incoming = self._incoming, None
        if incoming is not None:
            incoming.discard()


_REASONS = {
    status.CANNOT_UNDERSTAND: "cannot-understand",
    status.DATASET_DOES_NOT_MATCH_SOP_CLASS: "dataset-mismatch",
    status.OUT_OF_RESOURCES: "out-of-resources",
    status.SOP_CLASS_NOT_SUPPORTED: "sop-class-not-supported",
    TRANSFER_SYNTAX_NOT_SUPPORTED: "transfer-syntax-not-supported",
    STUDY_INSTANCE_UID_MISMATCH: "study-mismatch",
}


def response_body(result: StowResult, base_url: str, study_uid: str | None) -> dict[str, object]:
    """The Store Instances Response Module (PS3.18 10.5.3) as DICOM JSON (PS3.18 F.2)."""

    def uid(value: str) -> dict[str, object]:
        return {"vr": "UI", "Value": [value]}

    def url(value: str) -> dict[str, object]:
        return {"vr": "UR", "Value": [value]}

    body: dict[str, object] = {}
    root = base_url.rstrip("/")
    if study_uid is not None and result.stored:
        body["00081190"] = url(f"{root}/studies/{study_uid}")
    if result.failed:
        items = []
        for failed in result.failed:
            item: dict[str, object] = {}
            if failed.sop_class_uid is not None:
                item["00081150"] = uid(failed.sop_class_uid)
            if failed.sop_instance_uid is not None:
                item["00081155"] = uid(failed.sop_instance_uid)
            item["00081197"] = {"vr": "US", "Value": [failed.reason]}
            items.append(item)
        body["00081198"] = {"vr": "SQ", "Value": items}
    if result.stored:
        body["00081199"] = {
            "vr": "SQ",
            "Value": [
                {
                    "00081150": uid(stored.sop_class_uid),
                    "00081155": uid(stored.sop_instance_uid),
                    "00081190": url(
                        f"{root}/studies/{stored.study_uid}/series/{stored.series_uid}"
                        f"/instances/{stored.sop_instance_uid}"
                    ),
                }
                for stored in result.stored
            ],
        }
    return body
