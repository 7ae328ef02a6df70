"""Result senders against real peers: a real Orthanc (C-STORE and STOW-RS), pynetdicom SCPs that
answer as a PACS might, and a local HTTP server for STOW-RS answers Orthanc never gives.

Every peer listens on loopback on a free port and is stopped at the end of its test.
"""

from __future__ import annotations

import base64
import json
import logging
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    Comprehensive3DSRStorage,
    CTImageStorage,
    ImplicitVRLittleEndian,
    SegmentationStorage,
)
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.dsutils import split_dataset

from tests.conftest import free_port
from tests.helpers import orthanc as peers
from tests.helpers.ct_series import make_ct_series, negative_result, positive_result
from tests.helpers.orthanc import OrthancPeer
from tests.helpers.tls import make_cert
from triage.config import DicomWebDestination, DimseDestination, TlsFiles
from triage.errors import DestinationUnavailableError, PermanentError
from triage.peers import echo
from triage.results.inputs import ResultInput
from triage.results.seg import build_segmentation
from triage.results.senders import send_files
from triage.results.sr import build_sr

# The Orthanc fixtures, by name.
orthanc = peers.orthanc
orthanc_factory = peers.orthanc_factory

CALLING_AE = "TRIAGE"
TIMEOUT = 10.0
SOURCE_SLICES = 8
Destination = DimseDestination | DicomWebDestination


# -- result files ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SavedResult:
    """A source CT series and the result objects built from it, saved as Part 10 files."""

    study_uid: str
    source: list[Path]
    files: list[Path]  # SEG (if any), then SR
    sop_classes: dict[str, str]  # SOP Instance UID -> SOP Class UID, of the result objects


def _save(directory: Path, make: Callable[[list[Dataset]], ResultInput]) -> SavedResult:
    directory.mkdir()
    series = make_ct_series(slices=SOURCE_SLICES)
    source = []
    for index, dataset in enumerate(series):
        path = directory / f"ct-{index}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        source.append(path)
    result = make(series)
    segmentation = build_segmentation(result)
    objects = [o for o in (segmentation, build_sr(result, segmentation)) if o is not None]
    files = []
    for index, dataset in enumerate(objects):
        path = directory / f"result-{index}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        files.append(path)
    classes = {str(o.SOPInstanceUID): str(o.SOPClassUID) for o in objects}
    return SavedResult(str(series[0].StudyInstanceUID), source, files, classes)


@pytest.fixture(scope="module")
def positive(tmp_path_factory: pytest.TempPathFactory) -> SavedResult:
    saved = _save(tmp_path_factory.mktemp("results") / "positive", positive_result)
    assert set(saved.sop_classes.values()) == {SegmentationStorage, Comprehensive3DSRStorage}
    return saved


@pytest.fixture(scope="module")
def negative(tmp_path_factory: pytest.TempPathFactory) -> SavedResult:
    saved = _save(tmp_path_factory.mktemp("results") / "negative", negative_result)
    assert set(saved.sop_classes.values()) == {Comprehensive3DSRStorage}
    return saved


# -- Orthanc ----------------------------------------------------------------------------------


def orthanc_destination(peer: OrthancPeer, kind: str) -> Destination:
    if kind == "dimse":
        return DimseDestination(ae_title=peer.aet, host="127.0.0.1", port=peer.dicom_port)
    return DicomWebDestination(url=peer.dicomweb_url)


def qido_instances(peer: OrthancPeer, study_uid: str) -> dict[str, str]:
    """SOP Instance UID -> SOP Class UID of every instance QIDO-RS finds in the study."""
    found = peer.qido(f"studies/{study_uid}/instances")
    for instance in found:
        assert instance["0020000D"]["Value"] == [study_uid]
    return {i["00080018"]["Value"][0]: i["00080016"]["Value"][0] for i in found}


def orthanc_instance_count(peer: OrthancPeer, study_uid: str) -> int:
    orthanc_study = peer.find_study(study_uid)
    return 0 if orthanc_study is None else len(peer.instances_of_study(orthanc_study))


KINDS = ["dimse", "stow"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_results_land_in_the_source_study(
    orthanc: OrthancPeer, positive: SavedResult, negative: SavedResult, kind: str
) -> None:
    destination = orthanc_destination(orthanc, kind)
    for saved in (positive, negative):
        orthanc.upload_all(saved.source)
        send_files(destination, saved.files, calling_ae=CALLING_AE, timeout=TIMEOUT)

    for saved in (positive, negative):
        found = qido_instances(orthanc, saved.study_uid)
        results = {uid: cls for uid, cls in found.items() if uid in saved.sop_classes}
        assert results == saved.sop_classes
        assert len(found) == SOURCE_SLICES + len(saved.files)
        assert orthanc_instance_count(orthanc, saved.study_uid) == SOURCE_SLICES + len(saved.files)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_sending_again_keeps_one_copy(
    orthanc: OrthancPeer, positive: SavedResult, kind: str
) -> None:
    other = "stow" if kind == "dimse" else "dimse"
    for how in (kind, kind, other):
        send_files(
            orthanc_destination(orthanc, how),
            positive.files,
            calling_ae=CALLING_AE,
            timeout=TIMEOUT,
        )
    assert qido_instances(orthanc, positive.study_uid) == positive.sop_classes
    assert orthanc_instance_count(orthanc, positive.study_uid) == len(positive.files)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_a_stopped_pacs_is_retryable_until_it_is_back(
    orthanc: OrthancPeer, positive: SavedResult, kind: str
) -> None:
    destination = orthanc_destination(orthanc, kind)
    orthanc.stop()
    with pytest.raises(
        DestinationUnavailableError, match=f"127.0.0.1:{orthanc_port(orthanc, kind)}"
    ):
        send_files(destination, positive.files, calling_ae=CALLING_AE, timeout=TIMEOUT)
    orthanc.start()
    send_files(destination, positive.files, calling_ae=CALLING_AE, timeout=TIMEOUT)
    assert qido_instances(orthanc, positive.study_uid) == positive.sop_classes


def orthanc_port(peer: OrthancPeer, kind: str) -> int:
    return peer.dicom_port if kind == "dimse" else peer.http_port


@pytest.mark.slow
def test_a_dicomweb_url_that_answers_404_is_permanent(
    orthanc: OrthancPeer, positive: SavedResult
) -> None:
    destination = DicomWebDestination(url=f"{orthanc.url}/no-such-root")
    with pytest.raises(PermanentError, match="HTTP 404"):
        send_files(destination, positive.files, calling_ae=CALLING_AE, timeout=TIMEOUT)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_echo_answers_while_the_pacs_is_up_and_names_it_when_down(
    orthanc: OrthancPeer, kind: str
) -> None:
    destination = orthanc_destination(orthanc, kind)
    assert 0 < echo(destination, calling_ae=CALLING_AE, timeout=TIMEOUT) < TIMEOUT
    orthanc.stop()
    try:
        with pytest.raises(
            DestinationUnavailableError, match=f"127.0.0.1:{orthanc_port(orthanc, kind)}"
        ):
            echo(destination, calling_ae=CALLING_AE, timeout=TIMEOUT)
    finally:
        orthanc.start()


@pytest.mark.parametrize("kind", KINDS)
def test_nothing_listening_is_retryable(positive: SavedResult, kind: str) -> None:
    port = free_port()
    destination: Destination = (
        DimseDestination(ae_title="PACS", host="127.0.0.1", port=port)
        if kind == "dimse"
        else DicomWebDestination(url=f"http://127.0.0.1:{port}/dicom-web")
    )
    started = time.monotonic()
    with pytest.raises(DestinationUnavailableError, match=f"127.0.0.1:{port}") as raised:
        send_files(destination, positive.files, calling_ae=CALLING_AE, timeout=TIMEOUT)
    assert time.monotonic() - started < TIMEOUT
    if kind == "dimse":
        assert "PACS" in str(raised.value)


# -- pynetdicom SCPs --------------------------------------------------------------------------


@dataclass
class ScpLog:
    """What a test SCP saw: per association the proposed contexts; every stored instance."""

    requested: list[set[tuple[str, tuple[str, ...]]]] = field(default_factory=list)
    max_pdu: list[int] = field(default_factory=list)
    calling_ae: list[str] = field(default_factory=list)
    stored: dict[str, bytes] = field(default_factory=dict)  # SOP Instance UID -> data set bytes


@contextmanager
def storage_scp(
    *,
    ae_title: str = "PACS",
    status: int = 0x0000,
    sop_classes: list[str] | None = None,
    require_called_aet: bool = False,
    delay: float = 0.0,
    ssl_context: ssl.SSLContext | None = None,
) -> Iterator[tuple[int, ScpLog]]:
    """A pynetdicom Storage SCP on a free port that answers every C-STORE with ``status``."""
    seen = ScpLog()
    ae = AE(ae_title=ae_title)
    ae.require_called_aet = require_called_aet
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT
    classes = sop_classes or [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts]
    for sop_class in classes:
        ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)

    def on_requested(event: Any) -> None:
        requestor = event.assoc.requestor
        seen.requested.append(
            {(cx.abstract_syntax, tuple(cx.transfer_syntax)) for cx in requestor.requested_contexts}
        )
        seen.max_pdu.append(requestor.maximum_length)

    def on_accepted(event: Any) -> None:
        seen.calling_ae.append(event.assoc.requestor.ae_title)

    def on_store(event: Any) -> int:
        time.sleep(delay)
        seen.stored[event.request.AffectedSOPInstanceUID] = event.request.DataSet.getvalue()
        return status

    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port),
        block=False,
        evt_handlers=[
            (evt.EVT_REQUESTED, on_requested),
            (evt.EVT_ACCEPTED, on_accepted),
            (evt.EVT_C_STORE, on_store),
        ],
        ssl_context=ssl_context,
    )
    assert server is not None
    try:
        yield port, seen
    finally:
        server.shutdown()


def to(port: int, ae_title: str = "PACS", tls: TlsFiles | None = None) -> DimseDestination:
    return DimseDestination(ae_title=ae_title, host="127.0.0.1", port=port, tls=tls)


def test_only_the_files_contexts_are_proposed_and_sent_as_on_disk(
    positive: SavedResult, tmp_path: Path
) -> None:
    # One more file in another transfer syntax: each file's own syntax is what is proposed.
    implicit = tmp_path / "ct-implicit.dcm"
    source = dcmread(positive.source[0])
    source.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    source.save_as(implicit, implicit_vr=True, little_endian=True)
    files = [*positive.files, implicit]

    with storage_scp() as (port, seen):
        send_files(to(port), files, calling_ae=CALLING_AE, timeout=TIMEOUT)

    expected = set()
    for path in files:
        meta = dcmread(path, stop_before_pixels=True).file_meta
        expected.add((meta.MediaStorageSOPClassUID, (meta.TransferSyntaxUID,)))
    assert (CTImageStorage, (ImplicitVRLittleEndian,)) in expected
    assert seen.requested == [expected]  # one association, exactly these contexts
    assert seen.max_pdu == [128 * 1024]
    assert seen.calling_ae == [CALLING_AE]
    for path in files:
        uid = dcmread(path, stop_before_pixels=True).SOPInstanceUID
        _, offset = split_dataset(path)
        assert seen.stored[uid] == path.read_bytes()[offset:], "re-encoded on the way"


def test_a_rejected_association_is_retryable(positive: SavedResult) -> None:
    with storage_scp(ae_title="PACS", require_called_aet=True) as (port, seen):
        with pytest.raises(DestinationUnavailableError, match="rejected the association") as raised:
            send_files(to(port, "NOT-PACS"), positive.files, calling_ae=CALLING_AE, timeout=TIMEOUT)
        assert seen.stored == {}
    assert f"NOT-PACS at 127.0.0.1:{port}" in str(raised.value)


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (0xA700, DestinationUnavailableError),
        (0xA7FE, DestinationUnavailableError),
        (0xC000, PermanentError),
        (0xA900, PermanentError),
        (0x0122, PermanentError),
    ],
    ids=lambda v: f"0x{v:04X}" if isinstance(v, int) else v.__name__,
)
def test_failure_statuses_map_to_retryable_or_permanent(
    positive: SavedResult, status: int, error: type[Exception]
) -> None:
    with storage_scp(status=status) as (port, _), pytest.raises(error) as raised:
        send_files(to(port), positive.files, calling_ae=CALLING_AE, timeout=TIMEOUT)
    assert f"0x{status:04X}" in str(raised.value)
    assert type(raised.value) is error


def test_a_warning_status_is_success_and_logged(
    positive: SavedResult, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.WARNING, "triage.results.senders"),
        storage_scp(status=0xB000) as (port, seen),
    ):
        send_files(to(port), positive.files, calling_ae=CALLING_AE, timeout=TIMEOUT)
    assert set(seen.stored) == set(positive.sop_classes)
    warned = [r for r in caplog.records if getattr(r, "status", None) == "0xB000"]
    assert {r.__dict__["sop_instance_uid"] for r in warned} == set(positive.sop_classes)


def test_a_refused_sop_class_is_permanent_and_the_rest_is_delivered(
    positive: SavedResult,
) -> None:
    (sr_uid,) = [u for u, c in positive.sop_classes.items() if c == Comprehensive3DSRStorage]
    with storage_scp(sop_classes=[Comprehensive3DSRStorage]) as (port, seen):
        with pytest.raises(PermanentError, match="Segmentation Storage") as raised:
            send_files(to(port), positive.files, calling_ae=CALLING_AE, timeout=TIMEOUT)
        assert set(seen.stored) == {sr_uid}
    assert "rejected" in str(raised.value)


def test_no_accepted_context_is_permanent(positive: SavedResult) -> None:
    with storage_scp(sop_classes=[CTImageStorage]) as (port, seen):
        with pytest.raises(PermanentError, match="accepted none of the presentation contexts"):
            send_files(to(port), positive.files, calling_ae=CALLING_AE, timeout=TIMEOUT)
        assert seen.stored == {}


def test_no_c_store_response_in_time_is_retryable(positive: SavedResult) -> None:
    with (
        storage_scp(delay=2.5) as (port, _),
        pytest.raises(DestinationUnavailableError, match="no C-STORE response"),
    ):
        send_files(to(port), positive.files, calling_ae=CALLING_AE, timeout=1)


def test_a_file_that_is_not_dicom_is_permanent(tmp_path: Path) -> None:
    path = tmp_path / "not.dcm"
    path.write_bytes(b"not dicom")
    with pytest.raises(PermanentError, match="cannot be read") as raised:
        send_files(to(free_port()), [path], calling_ae=CALLING_AE, timeout=TIMEOUT)
    assert isinstance(raised.value.__cause__, InvalidDicomError)


# -- TLS --------------------------------------------------------------------------------------


def test_tls_with_a_client_certificate(positive: SavedResult, tmp_path: Path) -> None:
    server_cert, server_key = make_cert(tmp_path, "server")
    client_cert, client_key = make_cert(tmp_path, "client")
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.minimum_version = ssl.TLSVersion.TLSv1_2
    server.load_cert_chain(server_cert, server_key)
    server.load_verify_locations(client_cert)
    server.verify_mode = ssl.CERT_REQUIRED
    trusted = TlsFiles(cert_file=client_cert, key_file=client_key, ca_file=server_cert)
    untrusted = TlsFiles(cert_file=client_cert, key_file=client_key, ca_file=client_cert)

    with storage_scp(ssl_context=server) as (port, seen):
        send_files(to(port, tls=trusted), positive.files, calling_ae=CALLING_AE, timeout=TIMEOUT)
        assert set(seen.stored) == set(positive.sop_classes)
        with pytest.raises(DestinationUnavailableError, match="cannot connect"):
            send_files(
                to(port, tls=untrusted), positive.files, calling_ae=CALLING_AE, timeout=TIMEOUT
            )
        with pytest.raises(DestinationUnavailableError):
            send_files(to(port), positive.files, calling_ae=CALLING_AE, timeout=TIMEOUT)


# -- STOW-RS answers Orthanc does not give ---------------------------------------------------


@dataclass
class HttpAnswer:
    status: int
    body: bytes = b""
    content_type: str = "application/dicom+json"
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


@dataclass
class HttpLog:
    paths: list[str] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)


@contextmanager
def stow_server(answer: HttpAnswer) -> Iterator[tuple[str, HttpLog]]:
    """A real HTTP server on loopback answering every POST with ``answer``; its base URL."""
    seen = HttpLog()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            seen.paths.append(self.path)
            seen.headers.append(dict(self.headers.items()))
            seen.bodies.append(self.rfile.read(length))
            time.sleep(answer.delay)
            try:
                self.send_response(answer.status)
                self.send_header("Content-Type", answer.content_type)
                self.send_header("Content-Length", str(len(answer.body)))
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(answer.body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up waiting, as the timeout test wants

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/dicom-web", seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def failed_json(*reasons: int) -> bytes:
    items = [
        {
            "00081150": {"vr": "UI", "Value": [SegmentationStorage]},
            "00081155": {"vr": "UI", "Value": [f"1.2.3.{i}"]},
            "00081197": {"vr": "US", "Value": [reason]},
        }
        for i, reason in enumerate(reasons)
    ]
    return json.dumps({"00081198": {"vr": "SQ", "Value": items}}).encode()


FAILED_XML = b"""<?xml version="1.0" encoding="UTF-8"?>
<NativeDicomModel><DicomAttribute tag="00081198" vr="SQ" keyword="FailedSOPSequence">
<Item number="1"><DicomAttribute tag="00081155" vr="UI"><Value number="1">1.2.3.4</Value>
</DicomAttribute><DicomAttribute tag="00081197" vr="US"><Value number="1">272</Value>
</DicomAttribute></Item></DicomAttribute></NativeDicomModel>"""


@pytest.mark.parametrize(
    ("answer", "error", "message"),
    [
        (HttpAnswer(503), DestinationUnavailableError, "HTTP 503"),
        (HttpAnswer(500), DestinationUnavailableError, "HTTP 500"),
        (HttpAnswer(429), DestinationUnavailableError, "HTTP 429"),
        (HttpAnswer(408), DestinationUnavailableError, "HTTP 408"),
        (HttpAnswer(400), PermanentError, "HTTP 400"),
        (HttpAnswer(401), PermanentError, "HTTP 401"),
        (HttpAnswer(302, headers={"Location": "/elsewhere"}), PermanentError, "HTTP 302"),
        (HttpAnswer(202, failed_json(0xC000)), PermanentError, "1 of 2 instance.*0xC000"),
        (HttpAnswer(409, failed_json(0xC000, 0xA900)), PermanentError, "0xA900"),
        (HttpAnswer(409), PermanentError, "HTTP 409"),
        (HttpAnswer(202, failed_json(0xA700)), DestinationUnavailableError, "0xA700"),
        (
            HttpAnswer(409, FAILED_XML, content_type="application/dicom+xml"),
            PermanentError,
            "1.2.3.4: reason 0x0110",
        ),
    ],
    ids=lambda v: str(v.status) if isinstance(v, HttpAnswer) else None,
)
def test_stow_answers_map_to_retryable_or_permanent(
    positive: SavedResult, answer: HttpAnswer, error: type[Exception], message: str
) -> None:
    with stow_server(answer) as (url, seen), pytest.raises(error, match=message) as raised:
        send_files(DicomWebDestination(url=url), positive.files, calling_ae="T", timeout=TIMEOUT)
    assert type(raised.value) is error
    assert seen.paths == ["/dicom-web/studies"]  # no retry, no redirect followed


def test_stow_posts_multipart_with_credentials(positive: SavedResult) -> None:
    ok = HttpAnswer(200, json.dumps({"00081199": {"vr": "SQ", "Value": []}}).encode())
    with stow_server(ok) as (url, seen):
        token = DicomWebDestination(url=url, token="s3cret-token")
        basic = DicomWebDestination(url=url, username="triage", password="pa:ss")
        for destination in (token, basic):
            send_files(destination, positive.files, calling_ae=CALLING_AE, timeout=TIMEOUT)
    assert seen.headers[0]["Authorization"] == "Bearer s3cret-token"
    assert seen.headers[1]["Authorization"] == "Basic " + base64.b64encode(b"triage:pa:ss").decode()
    content_type = seen.headers[0]["Content-Type"]
    assert content_type.startswith('multipart/related; type="application/dicom"; boundary=')
    boundary = content_type.rpartition("boundary=")[2].encode()
    parts = seen.bodies[0].split(b"--" + boundary)
    assert parts[0] == b""
    assert parts[-1] == b"--\r\n"
    sent = [part.partition(b"\r\n\r\n")[2].removesuffix(b"\r\n") for part in parts[1:-1]]
    assert sent == [path.read_bytes() for path in positive.files]


def test_stow_no_answer_in_time_is_retryable(positive: SavedResult) -> None:
    with (
        stow_server(HttpAnswer(200, delay=2.5)) as (url, _),
        pytest.raises(DestinationUnavailableError, match="within 1 s"),
    ):
        send_files(DicomWebDestination(url=url), positive.files, calling_ae="T", timeout=1)
