"""DICOMweb of a real ``triage serve``: STOW-RS and QIDO-RS, with dicomweb-client and raw HTTP
as the clients.

Expected failure reasons come from the standard, not from triage: 0xC000 is PS3.4's "Cannot
understand" (the Cxxx class PS3.18 10.5.3 lists for a Store Instances failure), 0x0122 "SOP
Class not supported"; an instance of another study than the URL's is answered 0xC409 as
dcm4chee-arc answers it (PS3.18 names no code of its own). HTTP statuses are PS3.18 10.5.3's:
200 all stored, 202 some, 409 none.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from dicomweb_client.api import DICOMwebClient
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.pixels.processing import apply_modality_lut, apply_windowing
from pydicom.uid import generate_uid
from requests import HTTPError
from sqlalchemy import func, select

from tests.conftest import free_port
from tests.helpers.instances import ct_study
from tests.helpers.process import VENV_BIN, create_token, port_open, running, wait_for
from tests.helpers.tls import make_cert
from triage.db.models import Instance, Study
from triage.db.session import create_db_engine, make_session_factory, session_scope
from triage.domain import StudyStatus

CANNOT_UNDERSTAND = 0xC000  # PS3.4 C.4.2.1.4 (Error: Cannot understand)
SOP_CLASS_NOT_SUPPORTED = 0x0122  # PS3.7 C.4 (Refused: SOP Class not supported)
STUDY_MISMATCH = 0xC409  # dcm4chee-arc's DIFF_STUDY_INSTANCE_UID
LIMIT = 4 << 20  # dicomweb_max_request_bytes for these tests
BOUNDARY = "b0undary-7d3f"


@dataclass(frozen=True)
class Server:
    url: str
    port: int
    data_dir: Path
    sender: str
    sender_token: str
    radiologist_token: str

    def count(self) -> int:
        engine = create_db_engine(f"sqlite:///{self.data_dir / 'triage.sqlite'}")
        try:
            with session_scope(make_session_factory(engine)) as session:
                return int(session.scalar(select(func.count(Instance.id))) or 0)
        finally:
            engine.dispose()

    def study_status(self, study_uid: str) -> StudyStatus | None:
        engine = create_db_engine(f"sqlite:///{self.data_dir / 'triage.sqlite'}")
        try:
            with session_scope(make_session_factory(engine)) as session:
                return session.scalar(select(Study.status).where(Study.study_uid == study_uid))
        finally:
            engine.dispose()

    def leftovers(self) -> list[Path]:
        """Partial spool files: what a refused or cut-off part would leave behind (the empty
        files the listener keeps ready are not)."""
        tmp = self.data_dir / "spool" / "tmp"
        return [path for path in tmp.rglob("*") if path.is_file() and path.stat().st_size]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("stow")
    data_dir = root / "data"
    http_port = free_port()
    env = {
        "TRIAGE_DATA_DIR": str(data_dir),
        "TRIAGE_DICOM_PORT": str(free_port()),
        "TRIAGE_HTTP_PORT": str(http_port),
        "TRIAGE_SPOOL_MIN_FREE_MB": "1",
        "TRIAGE_STUDY_QUIET_SECONDS": "600",
        "TRIAGE_ASSOCIATION_GRACE_SECONDS": "1",
        "TRIAGE_WORKERS": "0",
        "TRIAGE_DICOMWEB_MAX_REQUEST_BYTES": str(LIMIT),
        "TRIAGE_DICOMWEB_TIMEOUT_SECONDS": "2",
        "TRIAGE_PUBLIC_URL": f"http://127.0.0.1:{http_port}",
    }
    with running(
        [str(VENV_BIN / "triage"), "serve"],
        env=env,
        log_file=root / "serve.log",
        ready=lambda: port_open(http_port),
    ):
        yield Server(
            url=f"http://127.0.0.1:{http_port}",
            port=http_port,
            data_dir=data_dir,
            sender="archive",
            sender_token=create_token(_admin(data_dir), "archive", "sender"),
            radiologist_token=create_token(
                {"TRIAGE_DATA_DIR": str(data_dir)}, "dr.who", "radiologist"
            ),
        )


def _admin(data_dir: Path) -> dict[str, str]:
    return {"TRIAGE_DATA_DIR": str(data_dir)}


def client(server: Server) -> DICOMwebClient:
    return DICOMwebClient(
        f"{server.url}/dicom-web",
        headers={"Authorization": f"Bearer {server.sender_token}"},
    )


def multipart(*parts: bytes, content_type: str | None = "application/dicom") -> bytes:
    body = b""
    for part in parts:
        body += f"--{BOUNDARY}\r\n".encode()
        if content_type is not None:
            body += f"Content-Type: {content_type}\r\n".encode()
        body += b"\r\n" + part + b"\r\n"
    return body + f"--{BOUNDARY}--\r\n".encode()


def post(
    server: Server,
    body: bytes,
    *,
    path: str = "/dicom-web/studies",
    token: str | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    all_headers = {
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}',
        "Authorization": f"Bearer {token or server.sender_token}",
        **(headers or {}),
    }
    return httpx.post(server.url + path, content=body, headers=all_headers, timeout=30)


def reasons(answer: Dataset) -> dict[str | None, int]:
    return {
        getattr(item, "ReferencedSOPInstanceUID", None): int(item.FailureReason)
        for item in getattr(answer, "FailedSOPSequence", [])
    }


def test_a_batch_gets_an_answer_per_instance_and_the_study_completes(
    server: Server, tmp_path: Path
) -> None:
    study = ct_study(tmp_path / "a", 3)
    good = [dcmread(path) for path in study.paths]
    other = dcmread(ct_study(tmp_path / "b", 1).paths[0])  # another study
    no_uid = dcmread(ct_study(tmp_path / "c", 1, study_uid=study.study_uid).paths[0])
    del no_uid.SOPInstanceUID  # cannot be indexed

    before = server.count()
    answer = client(server).store_instances(good, study_instance_uid=study.study_uid)
    assert [item.ReferencedSOPInstanceUID for item in answer.ReferencedSOPSequence] == [
        ds.SOPInstanceUID for ds in good
    ]
    assert answer.RetrieveURL.endswith(f"/dicom-web/studies/{study.study_uid}")
    retrieve = answer.ReferencedSOPSequence[0].RetrieveURL
    assert retrieve.endswith(
        f"/studies/{study.study_uid}/series/{study.series_uid}/instances/{good[0].SOPInstanceUID}"
    )
    assert "FailedSOPSequence" not in answer
    assert server.count() == before + 3

    # The end of the request is the end of an association: the grace period (1 s), then
    # complete, though the quiet period is ten minutes.
    wait_for(
        lambda: server.study_status(study.study_uid) not in (None, StudyStatus.RECEIVING),
        timeout=15,
        what="the study to complete after the STOW-RS request",
    )

    # Mixed: a duplicate (stored again = Success, nothing added), one of another study, one
    # that cannot be indexed. Some stored, some failed: 202.
    answer = client(server).store_instances(
        [good[0], other, no_uid], study_instance_uid=study.study_uid
    )
    assert [item.ReferencedSOPInstanceUID for item in answer.ReferencedSOPSequence] == [
        good[0].SOPInstanceUID
    ]
    failed = reasons(answer)
    assert failed[other.SOPInstanceUID] == STUDY_MISMATCH
    assert CANNOT_UNDERSTAND in failed.values()
    assert len(failed) == 2
    assert server.count() == before + 3
    assert server.leftovers() == []

    # None stored: 409 Conflict.
    with pytest.raises(HTTPError) as refused:
        client(server).store_instances([other], study_instance_uid=study.study_uid)
    assert refused.value.response.status_code == 409


def test_what_is_stored_is_the_part_byte_for_byte(server: Server, tmp_path: Path) -> None:
    path = ct_study(tmp_path, 1).paths[0]
    reply = post(server, multipart(path.read_bytes()))
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"].startswith("application/dicom+json")
    sop_uid = dcmread(path).SOPInstanceUID
    engine = create_db_engine(f"sqlite:///{server.data_dir / 'triage.sqlite'}")
    with session_scope(make_session_factory(engine)) as session:
        file_id = session.scalar(
            select(Instance.file_id).where(Instance.sop_instance_uid == sop_uid)
        )
    engine.dispose()
    stored = next((server.data_dir / "spool").rglob(f"{file_id}*"))
    assert stored.read_bytes() == path.read_bytes()


def test_http_basic_with_the_token_as_password(server: Server, tmp_path: Path) -> None:
    path = ct_study(tmp_path, 1).paths[0]
    basic = base64.b64encode(f"{server.sender}:{server.sender_token}".encode()).decode()
    reply = post(server, multipart(path.read_bytes()), headers={"Authorization": f"Basic {basic}"})
    assert reply.status_code == 200, reply.text
    wrong_user = base64.b64encode(f"someone:{server.sender_token}".encode()).decode()
    reply = post(server, multipart(b"x"), headers={"Authorization": f"Basic {wrong_user}"})
    assert reply.status_code == 401


def test_bad_requests_get_a_clear_status_and_nothing_is_kept(
    server: Server, tmp_path: Path
) -> None:
    good = ct_study(tmp_path, 1).paths[0].read_bytes()
    before = server.count()
    not_dicom = b"this is not a DICOM file at all " * 20

    def status(body: bytes, **kwargs: object) -> int:
        return post(server, body, **kwargs).status_code  # type: ignore[arg-type]

    # Who may call.
    assert httpx.post(server.url + "/dicom-web/studies", content=b"").status_code == 401
    assert status(multipart(good), token="not-a-token") == 401
    assert status(multipart(good), token=server.radiologist_token) == 403
    # The request as a whole.
    assert status(multipart(good), headers={"Content-Type": "application/dicom"}) == 415
    assert status(multipart(good), headers={"Content-Type": "multipart/related"}) == 400
    assert status(multipart(good), path="/dicom-web/studies/1.2.abc") == 400
    unterminated = f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + good
    assert status(unterminated) == 400
    assert status(b"no boundary in here") == 400
    # Parts that cannot be stored: none stored, 409, each named.
    assert status(multipart(good, content_type=None)) == 409
    assert status(multipart(not_dicom)) == 409
    assert status(multipart(not_dicom, content_type="text/plain")) == 409
    assert status(multipart(good[: len(good) // 2])) == 409  # truncated
    # Sizes: declared, and inflated from a small gzip body.
    assert status(multipart(good + bytes(LIMIT))) == 413
    bomb = gzip.compress(multipart(good + bytes(2 * LIMIT)))
    assert len(bomb) < LIMIT
    assert status(bomb, headers={"Content-Encoding": "gzip"}) == 413
    assert status(gzip.compress(multipart(good)), headers={"Content-Encoding": "gzip"}) == 200

    assert server.count() == before + 1  # only the gzip-encoded good one
    assert server.leftovers() == []
    assert httpx.get(server.url + "/healthz").status_code == 200


def test_a_client_sending_a_byte_a_second_is_timed_out(server: Server, tmp_path: Path) -> None:
    body = multipart(ct_study(tmp_path, 1).paths[0].read_bytes())
    head = (
        f"POST /dicom-web/studies HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {server.sender_token}\r\n"
        f'Content-Type: multipart/related; type="application/dicom"; boundary={BOUNDARY}\r\n'
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    before = server.count()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(head)
        started = time.monotonic()
        answer = b""
        for byte in body:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            sock.settimeout(1.0)
            try:
                answer += sock.recv(4096)
            except TimeoutError:
                continue
            if answer:
                break
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert time.monotonic() - started < 15
    assert server.count() == before
    assert server.leftovers() == []
    assert httpx.get(server.url + "/healthz").status_code == 200


def test_a_new_study_uid_in_the_path_need_not_exist(server: Server, tmp_path: Path) -> None:
    study_uid = generate_uid()
    datasets = [dcmread(path) for path in ct_study(tmp_path, 2, study_uid=study_uid).paths]
    answer = client(server).store_instances(datasets, study_instance_uid=study_uid)
    assert len(answer.ReferencedSOPSequence) == 2


def test_https_served_by_triage_itself(tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path, "server")
    data_dir, http_port = tmp_path / "data", free_port()
    env = {
        "TRIAGE_DATA_DIR": str(data_dir),
        "TRIAGE_DICOM_PORT": str(free_port()),
        "TRIAGE_HTTP_PORT": str(http_port),
        "TRIAGE_HTTP_TLS": json.dumps({"cert_file": str(cert), "key_file": str(key)}),
        "TRIAGE_SPOOL_MIN_FREE_MB": "1",
        "TRIAGE_WORKERS": "0",
    }
    with running(
        [str(VENV_BIN / "triage"), "serve"],
        env=env,
        log_file=tmp_path / "serve.log",
        ready=lambda: port_open(http_port),
    ):
        token = create_token(_admin(data_dir), "archive", "sender")
        path = ct_study(tmp_path / "s", 1).paths[0]
        with httpx.Client(verify=ssl.create_default_context(cafile=str(cert))) as https:
            wait_for(
                lambda: https.get(f"https://127.0.0.1:{http_port}/healthz").status_code == 200,
                timeout=20,
                what="HTTPS to answer",
            )
            reply = https.post(
                f"https://127.0.0.1:{http_port}/dicom-web/studies",
                content=multipart(path.read_bytes()),
                headers={
                    "Content-Type": (
                        f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
                    ),
                    "Authorization": f"Bearer {token}",
                },
            )
            assert reply.status_code == 200, reply.text
        # Plain HTTP on the same port gets no answer it could take for one.
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{http_port}/healthz", timeout=5).raise_for_status()


def test_qido_rs_over_http(server: Server, tmp_path: Path) -> None:
    study = ct_study(tmp_path, 2)
    datasets = [dcmread(path) for path in study.paths]
    client(server).store_instances(datasets)
    reader = DICOMwebClient(
        f"{server.url}/dicom-web",
        headers={"Authorization": f"Bearer {server.radiologist_token}"},
    )
    found = reader.search_for_studies(search_filters={"StudyInstanceUID": study.study_uid})
    assert len(found) == 1
    assert found[0]["00201208"]["Value"] == [2]
    # Built on public_url: dicomweb-client (requests) sends a Host header without the port.
    assert found[0]["00081190"]["Value"] == [f"{server.url}/dicom-web/studies/{study.study_uid}"]
    instances = reader.search_for_instances(
        study_instance_uid=study.study_uid, series_instance_uid=study.series_uid
    )
    assert {item["00080018"]["Value"][0] for item in instances} == {
        ds.SOPInstanceUID for ds in datasets
    }
    # Quotes and wildcard characters in a name are data, not SQL: answered, nothing matched.
    for name in ("O'Brien*", "%", "_", "\\", "Robert'); DROP TABLE studies;--"):
        odd = httpx.get(
            f"{server.url}/dicom-web/studies",
            params={"PatientName": name},
            headers={"Authorization": f"Bearer {server.radiologist_token}"},
        )
        assert odd.status_code == 200, name
        assert odd.json() == [], name
    assert reader.search_for_studies(search_filters={"StudyInstanceUID": study.study_uid})
    bad = httpx.get(
        f"{server.url}/dicom-web/studies?NoSuchAttribute=1",
        headers={"Authorization": f"Bearer {server.radiologist_token}"},
    )
    assert bad.status_code == 400
    assert "NoSuchAttribute" in bad.json()["detail"]
    sender = httpx.get(
        f"{server.url}/dicom-web/studies",
        headers={"Authorization": f"Bearer {server.sender_token}"},
    )
    assert sender.status_code == 403  # a sender stores, and reads nothing


def _parts(reply: httpx.Response) -> list[bytes]:
    """The bodies of a multipart/related answer (RFC 2046), split by hand."""
    boundary = reply.headers["content-type"].split("boundary=")[1].split(";")[0].strip('"')
    delimiter = f"--{boundary}".encode()
    pieces = reply.content.split(b"\r\n" + delimiter)
    first = pieces[0].removeprefix(delimiter)
    bodies = []
    for piece in [first, *pieces[1:]]:
        if piece.startswith(b"--"):
            break  # the close delimiter
        bodies.append(piece.split(b"\r\n\r\n", 1)[1])
    return bodies


def test_wado_rs_gives_back_what_was_stored(server: Server, tmp_path: Path) -> None:
    study = ct_study(tmp_path, 3)
    sent = {dcmread(path).SOPInstanceUID: path.read_bytes() for path in study.paths}
    assert post(server, multipart(*sent.values())).status_code == 200
    reader = DICOMwebClient(
        f"{server.url}/dicom-web",
        headers={"Authorization": f"Bearer {server.radiologist_token}"},
    )
    auth = {"Authorization": f"Bearer {server.radiologist_token}"}
    base = f"{server.url}/dicom-web/studies/{study.study_uid}"

    # The study, byte for byte, in the order stored.
    reply = httpx.get(
        base, headers={**auth, "Accept": 'multipart/related; type="application/dicom"'}
    )
    assert reply.status_code == 200
    assert _parts(reply) == list(sent.values())
    # dicomweb-client reads the same as data sets.
    datasets = reader.retrieve_study(study.study_uid)
    assert [ds.SOPInstanceUID for ds in datasets] == list(sent)
    one_uid = next(iter(sent))
    one = reader.retrieve_instance(study.study_uid, study.series_uid, one_uid)
    assert one.SOPInstanceUID == one_uid
    assert len(reader.retrieve_series(study.study_uid, study.series_uid)) == 3

    # Metadata: attributes, the pixel data by reference to the frames.
    metadata = reader.retrieve_series_metadata(study.study_uid, study.series_uid)
    assert len(metadata) == 3
    first = metadata[0]
    assert first["00080018"]["Value"] == [one_uid]
    assert "Value" not in first["7FE00010"]
    assert first["7FE00010"]["BulkDataURI"].endswith(f"/instances/{one_uid}/frames/1")
    # Frames as stored (CT_small is uncompressed).
    frames = reader.retrieve_instance_frames(study.study_uid, study.series_uid, one_uid, [1])
    assert frames == [dcmread(study.paths[0]).PixelData]

    # A transfer syntax other than the one held: 406; nothing held: 404.
    jpeg = 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50'
    assert httpx.get(base, headers={**auth, "Accept": jpeg}).status_code == 406
    assert httpx.get(base, headers={**auth, "Accept": "text/html"}).status_code == 406
    missing = f"{server.url}/dicom-web/studies/{generate_uid()}"
    assert httpx.get(missing, headers=auth).status_code == 404
    assert httpx.get(f"{server.url}/dicom-web/studies/1.2.x", headers=auth).status_code == 400
    sender = {"Authorization": f"Bearer {server.sender_token}"}
    assert httpx.get(base, headers=sender).status_code == 403


def test_a_rendered_png_of_a_ct_slice(server: Server, tmp_path: Path) -> None:
    path = ct_study(tmp_path, 1).paths[0]
    ds = dcmread(path)
    assert post(server, multipart(path.read_bytes())).status_code == 200
    auth = {"Authorization": f"Bearer {server.radiologist_token}"}
    instance = (
        f"{server.url}/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}"
    )
    reply = httpx.get(
        f"{instance}/rendered", params={"window": "40,80"}, headers={**auth, "Accept": "image/png"}
    )
    assert reply.status_code == 200
    assert reply.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(reply.content))
    assert image.format == "PNG"
    assert image.size == (ds.Columns, ds.Rows)
    # pydicom's own VOI windowing (PS3.3 C.11.2.1.2) of the same window, scaled to 8 bits.
    windowed = ds.copy()
    windowed.WindowCenter, windowed.WindowWidth = 40, 80
    values = apply_windowing(apply_modality_lut(ds.pixel_array, ds), windowed)
    low, high = values.min(), values.max()
    expected = np.round((values - low) / (high - low) * 255)
    assert np.abs(np.asarray(image, dtype=np.float64) - expected).max() <= 1

    jpeg = httpx.get(f"{instance}/frames/1/rendered", headers={**auth, "Accept": "image/jpeg"})
    assert jpeg.status_code == 200
    assert Image.open(io.BytesIO(jpeg.content)).format == "JPEG"
    assert (
        httpx.get(f"{instance}/rendered", params={"window": "x"}, headers=auth).status_code == 400
    )
    assert httpx.get(f"{instance}/frames/2/rendered", headers=auth).status_code == 400
    assert (
        httpx.get(f"{instance}/rendered", headers={**auth, "Accept": "image/gif"}).status_code
        == 406
    )
