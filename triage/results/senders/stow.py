"""STOW-RS to a DICOMweb destination: one multipart/related POST of the files as they are on disk.

The POST goes through httpx; the body is built here because httpx writes multipart/form-data
only, and it carries the files' bytes unchanged (dicomweb-client would decode and re-encode
them, and retries by itself, which is the dispatch queue's job). Redirects are not followed: a
POST that is redirected loses its body, so the configured URL must be the final one.
"""

from __future__ import annotations

import json
import logging
import ssl
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from triage.config import DicomWebDestination
from triage.errors import DestinationUnavailableError, PermanentError
from triage.results.senders.base import ResultFile, sends

log = logging.getLogger(__name__)

DICOM_JSON = "application/dicom+json"
RETRYABLE_HTTP = frozenset({408, 429})  # and every 5xx
CONFLICT = 409  # PS3.18 10.5.3: none of the instances was stored

# PS3.18 10.5.3 Store Instances Response Module, as DICOM JSON / XML tags
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_INSTANCE_UID = "00081155"
FAILURE_REASON = "00081197"
OUT_OF_RESOURCES = range(0xA700, 0xA800)


@dataclass(frozen=True)
class _Answer:
    status: int
    content_type: str
    body: bytes


@dataclass(frozen=True)
class FailedInstance:
    """One FailedSOPSequence item: the instance and its Failure Reason (None if not given)."""

    sop_instance_uid: str
    reason: int | None

    def __str__(self) -> str:
        reason = "no reason given" if self.reason is None else f"reason 0x{self.reason:04X}"
        return f"{self.sop_instance_uid}: {reason}"


def redacted_url(url: str) -> str:
    """The URL for messages: no user information, query or fragment."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


def http_client(destination: DicomWebDestination, *, timeout: float) -> httpx.Client:
    """An HTTP client for the destination: its credentials (bearer token or HTTP Basic), its CA
    file, TLS 1.2 at least, no redirects. Raises PermanentError when the CA file is unusable."""
    cafile = str(destination.ca_file) if destination.ca_file is not None else None
    try:
        context = ssl.create_default_context(cafile=cafile)
    except (OSError, ssl.SSLError) as exc:
        where = redacted_url(destination.url)
        raise PermanentError(f"CA file for {where} cannot be used: {exc}") from exc
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    headers, auth = {}, None
    if destination.token is not None:
        headers["Authorization"] = f"Bearer {destination.token.get_secret_value()}"
    elif destination.username is not None:
        password = destination.password.get_secret_value() if destination.password else ""
        auth = httpx.BasicAuth(destination.username, password)
    return httpx.Client(
        verify=context, auth=auth, headers=headers, timeout=timeout, follow_redirects=False
    )


def _multipart(files: Sequence[ResultFile]) -> tuple[bytes, str]:
    """The multipart/related body of the files' bytes and its Content-Type."""
    try:
        parts = [file.path.read_bytes() for file in files]
    except OSError as exc:
        raise PermanentError(f"result file cannot be read: {exc}") from exc
    boundary = uuid.uuid4().hex
    while any(boundary.encode() in part for part in parts):
        boundary = uuid.uuid4().hex
    delimiter = b"--" + boundary.encode()
    body = b"".join(
        delimiter + b"\r\nContent-Type: application/dicom\r\n\r\n" + part + b"\r\n"
        for part in parts
    )
    content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
    return body + delimiter + b"--\r\n", content_type


def _post(
    destination: DicomWebDestination, body: bytes, content_type: str, timeout: float
) -> _Answer:
    where = redacted_url(destination.url)
    with http_client(destination, timeout=timeout) as client:
        try:
            response = client.post(
                f"{destination.url.rstrip('/')}/studies",
                content=body,
                headers={"Content-Type": content_type, "Accept": DICOM_JSON},
            )
        except httpx.TransportError as exc:  # refused, reset, timed out, TLS failures
            raise DestinationUnavailableError(
                f"cannot reach STOW-RS at {where} within {timeout:g} s: {exc}"
            ) from exc
    media_type = response.headers.get("Content-Type", "").partition(";")[0].strip().lower()
    return _Answer(response.status_code, media_type, response.content)


def _failed_from_json(body: bytes) -> list[FailedInstance]:
    document: Any = json.loads(body)
    if isinstance(document, list):
        document = document[0] if document else {}
    items = document.get(FAILED_SOP_SEQUENCE, {}).get("Value", [])
    failed = []
    for item in items:
        uid = item.get(REFERENCED_SOP_INSTANCE_UID, {}).get("Value", ["?"])[0]
        reason = item.get(FAILURE_REASON, {}).get("Value", [None])[0]
        failed.append(FailedInstance(str(uid), None if reason is None else int(reason)))
    return failed


def _failed_from_xml(body: bytes) -> list[FailedInstance]:
    # The peer is a configured PACS; Python's expat (>= 2.4.1) bounds entity expansion and
    # ElementTree resolves no external entities.
    root = ET.fromstring(body)  # noqa: S314
    failed = []
    for item in root.findall(f"DicomAttribute[@tag='{FAILED_SOP_SEQUENCE}']/Item"):
        uid = item.findtext(f"DicomAttribute[@tag='{REFERENCED_SOP_INSTANCE_UID}']/Value")
        reason = item.findtext(f"DicomAttribute[@tag='{FAILURE_REASON}']/Value")
        failed.append(FailedInstance(uid or "?", int(reason) if reason else None))
    return failed


def failed_instances(answer: _Answer) -> list[FailedInstance]:
    """The FailedSOPSequence of a STOW-RS response body; [] when it has none or no body."""
    if not answer.body.strip():
        return []
    try:
        if answer.content_type.endswith("xml"):
            return _failed_from_xml(answer.body)
        return _failed_from_json(answer.body)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, ET.ParseError):
        return []


def _check(answer: _Answer, destination: DicomWebDestination, count: int) -> None:
    where = redacted_url(destination.url)
    if answer.status in RETRYABLE_HTTP or answer.status >= 500:
        raise DestinationUnavailableError(f"STOW-RS at {where} answered HTTP {answer.status}")
    if not 200 <= answer.status < 300 and answer.status != CONFLICT:
        raise PermanentError(f"STOW-RS at {where} answered HTTP {answer.status}")
    failed = failed_instances(answer)
    if failed:
        listed = "; ".join(str(instance) for instance in failed)
        message = (
            f"STOW-RS at {where} answered HTTP {answer.status}: "
            f"{len(failed)} of {count} instance(s) failed: {listed}"
        )
        if all(instance.reason in OUT_OF_RESOURCES for instance in failed):
            raise DestinationUnavailableError(message)
        raise PermanentError(message)
    if answer.status == CONFLICT:
        raise PermanentError(f"STOW-RS at {where} answered HTTP 409: no instance was stored")


@sends(DicomWebDestination)
def send_by_stow_rs(
    destination: DicomWebDestination,
    files: Sequence[ResultFile],
    *,
    calling_ae: str,
    timeout: float,
) -> None:
    """POST every file in one STOW-RS request; see ``send_files`` for what it raises."""
    body, content_type = _multipart(files)
    answer = _post(destination, body, content_type, timeout)
    _check(answer, destination, len(files))
    if answer.status != 200:
        log.warning(
            "STOW-RS stored with warnings",
            extra={"http_status": answer.status, "count": len(files)},
        )
    log.info("STOW-RS delivered", extra={"http_status": answer.status, "count": len(files)})
