"""Peers administrators add with ``triage-admin peers``, and the echo that checks one."""

from __future__ import annotations

import time

import httpx
from pynetdicom import AE, evt

from triage.config import DicomWebDestination, DimseDestination
from triage.errors import DestinationUnavailableError
from triage.results.senders.dimse import client_tls_context
from triage.results.senders.stow import http_client, redacted_url
from triage.sockets import set_nodelay

VERIFICATION = "1.2.840.10008.1.1"


def echo(
    destination: DimseDestination | DicomWebDestination, *, calling_ae: str, timeout: float = 10
) -> float:
    """Round-trip seconds of a C-ECHO (DIMSE) or a QIDO-RS query (DICOMweb).

    Raises DestinationUnavailableError with what went wrong.
    """
    started = time.perf_counter()
    if isinstance(destination, DimseDestination):
        _c_echo(destination, calling_ae=calling_ae, timeout=timeout)
    else:
        _qido(destination, timeout=timeout)
    return time.perf_counter() - started


def _c_echo(destination: DimseDestination, *, calling_ae: str, timeout: float) -> None:
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(VERIFICATION)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    tls = (client_tls_context(destination.tls), destination.host) if destination.tls else None
    where = f"{destination.ae_title} at {destination.host}:{destination.port}"
    assoc = ae.associate(
        destination.host,
        destination.port,
        ae_title=destination.ae_title,
        tls_args=tls,
        evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)],
    )
    if not assoc.is_established:
        reason = "rejected the association" if assoc.is_rejected else "could not be reached"
        raise DestinationUnavailableError(f"{where} {reason}")
    try:
        reply = assoc.send_c_echo()
    finally:
        assoc.release()
    if not reply or int(reply.get("Status", -1)) != 0:
        raise DestinationUnavailableError(f"{where} did not answer the C-ECHO with Success")


def _qido(destination: DicomWebDestination, *, timeout: float) -> None:
    url = destination.url.rstrip("/") + "/studies?limit=1"
    try:
        with http_client(destination, timeout=timeout) as client:
            client.get(url, headers={"Accept": "application/dicom+json"}).raise_for_status()
    except httpx.HTTPError as exc:  # no answer, or an error status
        raise DestinationUnavailableError(f"{redacted_url(url)}: {exc}") from exc
