"""Where results go: destinations from the settings plus those added with
``triage-admin destinations add`` (rows of the ``peers`` table), by name."""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter
from sqlalchemy import select
from sqlalchemy.orm import Session

from triage.config import Destination, DicomWebDestination, DimseDestination, Settings
from triage.db.models import Peer
from triage.domain import PeerKind

AnyDestination = DimseDestination | DicomWebDestination
_ADAPTER: TypeAdapter[AnyDestination] = TypeAdapter(Destination)


def parse_destination(target: str, *, name: str, token: str | None = None) -> AnyDestination:
    """A destination from its short form (AE@host:port or a DICOMweb URL), named ``name``."""
    destination = _ADAPTER.validate_python(target)
    update: dict[str, object] = {"name": name}
    if token is not None:
        update["token"] = token
    return _ADAPTER.validate_python({**destination.model_dump(), **update})


def peer_destination(peer: Peer) -> AnyDestination:
    values = {"name": peer.name, **peer.options}
    if peer.kind == PeerKind.DIMSE:
        values |= {"kind": "dimse", "ae_title": peer.ae_title, "host": peer.host, "port": peer.port}
    else:
        values |= {"kind": "dicomweb", "url": peer.url}
    return _ADAPTER.validate_python(values)


def destinations(settings: Settings, *, db_session: Session) -> dict[str, AnyDestination]:
    """Every destination results go to, by name; configured ones first."""
    found: dict[str, AnyDestination] = {d.name: d for d in settings.destinations}
    peers = db_session.scalars(
        select(Peer).where(Peer.enabled.is_(True), Peer.is_destination.is_(True))
    )
    for peer in peers:
        found.setdefault(peer.name, peer_destination(peer))
    return found


def describe_destination(destination: AnyDestination) -> dict[str, Any]:
    """A destination's address as stable JSON fields, secrets left out: ``name``, ``kind``
    (``dimse`` or ``dicomweb``), ``ae_title``, ``host``, ``port`` (DIMSE), ``url`` (DICOMweb),
    ``tls`` (TLS for DIMSE, https for DICOMweb); fields that do not apply are null."""
    if isinstance(destination, DimseDestination):
        return {
            "name": destination.name,
            "kind": destination.kind,
            "ae_title": destination.ae_title,
            "host": destination.host,
            "port": destination.port,
            "url": None,
            "tls": destination.tls is not None,
        }
    return {
        "name": destination.name,
        "kind": destination.kind,
        "ae_title": None,
        "host": None,
        "port": None,
        "url": destination.url,
        "tls": destination.url.startswith("https://"),
    }


def target(described: dict[str, Any]) -> str:
    """The address in one short string: ``C-STORE AE@host:port (TLS)`` or ``STOW-RS URL``."""
    if described["kind"] == "dimse":
        tls = " (TLS)" if described["tls"] else ""
        return f"C-STORE {described['ae_title']}@{described['host']}:{described['port']}{tls}"
    return f"STOW-RS {described['url']}"
