"""DICOM TLS on the listener: TLS 1.2 at least, optional mutual certificates."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE

from tests.conftest import StackFactory
from tests.helpers.instances import pydicom_file
from tests.helpers.tls import make_cert
from triage.config import Settings, TlsFiles
from triage.receiver.scp import DicomListener

VERIFICATION = "1.2.840.10008.1.1"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture
def certs(tmp_path: Path) -> dict[str, tuple[Path, Path]]:
    return {name: make_cert(tmp_path, name) for name in ("server", "client")}


@pytest.fixture
def tls_listener(
    settings: Settings, stack_factory: StackFactory
) -> Callable[[TlsFiles], DicomListener]:
    """Starts a listener with the given TLS files; ``stack_factory`` stops it at teardown."""
    return lambda tls: stack_factory(settings.model_copy(update={"tls": tls})).listener()


def echo(port: int, context: ssl.SSLContext | None) -> bool:
    ae = AE(ae_title="TLS_SCU")
    ae.add_requested_context(VERIFICATION)
    ae.acse_timeout = ae.network_timeout = 5
    tls_args = (context, "127.0.0.1") if context else None
    assoc = ae.associate("127.0.0.1", port, ae_title="TRIAGE", tls_args=tls_args)
    if not assoc.is_established:
        return False
    reply = assoc.send_c_echo()
    assoc.release()
    return bool(reply) and reply.Status == 0


def client_context(
    server_cert: Path, client: tuple[Path, Path] | None = None, *, tls: ssl.TLSVersion | None = None
) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(server_cert))
    if client is not None:
        context.load_cert_chain(*client)
    if tls is not None:
        context.minimum_version = context.maximum_version = tls
    return context


def test_tls_echo_and_plain_tcp_refused(
    tls_listener: Callable[[TlsFiles], DicomListener], certs: dict[str, tuple[Path, Path]]
) -> None:
    server_cert, server_key = certs["server"]
    tls = TlsFiles(cert_file=server_cert, key_file=server_key)
    listener = tls_listener(tls)
    assert echo(listener.port, client_context(server_cert))
    assert not echo(listener.port, None)
    assert not echo(listener.port, client_context(server_cert, tls=ssl.TLSVersion.TLSv1_1))


def test_c_store_over_tls_is_stored(
    settings: Settings,
    stack_factory: StackFactory,
    certs: dict[str, tuple[Path, Path]],
) -> None:
    server_cert, server_key = certs["server"]
    tls = TlsFiles(cert_file=server_cert, key_file=server_key)
    # A small maximum PDU: the data set arrives in many PDUs, split across TLS records.
    stack = stack_factory(settings.model_copy(update={"tls": tls, "max_pdu_bytes": 4096}))
    listener = stack.listener()
    path = pydicom_file("CT_small.dcm")
    ae = AE(ae_title="TLS_SCU")
    ae.add_requested_context(CT_IMAGE_STORAGE, ExplicitVRLittleEndian)
    ae.maximum_pdu_size = 4096  # many small PDUs through TLS records
    assoc = ae.associate(
        "127.0.0.1",
        listener.port,
        ae_title="TRIAGE",
        tls_args=(client_context(server_cert), "127.0.0.1"),
    )
    assert assoc.is_established
    assert assoc.send_c_store(dcmread(path)).Status == 0
    assoc.release()
    [stored] = stack.spool.objects.glob("*/*.dcm")
    assert dcmread(stored).SOPInstanceUID == dcmread(path).SOPInstanceUID


def test_mutual_tls_requires_a_trusted_client_certificate(
    tls_listener: Callable[[TlsFiles], DicomListener], certs: dict[str, tuple[Path, Path]]
) -> None:
    server_cert, server_key = certs["server"]
    client_cert, _ = certs["client"]
    tls = TlsFiles(
        cert_file=server_cert, key_file=server_key, ca_file=client_cert, require_client_cert=True
    )
    listener = tls_listener(tls)
    assert echo(listener.port, client_context(server_cert, certs["client"]))
    assert not echo(listener.port, client_context(server_cert))
    assert not echo(listener.port, client_context(server_cert, certs["server"]))
