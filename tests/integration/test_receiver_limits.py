"""The receiver against big, slow and hostile senders (a real ``triage serve``; DCMTK's
``storescu`` and raw sockets as the peers): memory bounded whatever the object size,
deadlines for slow senders, caps on connections that never associate."""

from __future__ import annotations

import contextlib
import logging
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest

from bench.multiframe import write_multiframe
from tests.conftest import StackFactory
from tests.helpers.dul import (
    A_ABORT,
    A_ASSOCIATE_AC_TYPE,
    P_DATA_TF,
    RawAssociation,
    association_request,
    c_store_rq,
    pdu,
    pdv,
)
from tests.helpers.instances import dataset_bytes_of
from tests.helpers.process import create_token, serve_env, serving
from triage.config import Settings

MIB = 1 << 20


def peak_resident_bytes(pid: int) -> int:
    """The process's peak resident set (VmHWM), from the kernel."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc status")


def reset_peak(pid: int) -> None:
    """Start VmHWM again from the current resident set (Linux 4.0+: write 5 to clear_refs)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def storescu(port: int, *paths: Path, extra: tuple[str, ...] = ()) -> None:
    subprocess.run(
        [
            "storescu",
            "-aet",
            "BIG",
            "-aec",
            "TRIAGE",
            *extra,
            "127.0.0.1",
            str(port),
            *map(str, paths),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )


def stow_streamed(http_port: int, token: str, path: Path) -> None:
    """STOW-RS of one file, sent from disk piece by piece (the client holds none of it)."""
    boundary = "bigobjectboundary"

    def body() -> Iterator[bytes]:
        yield f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        with path.open("rb") as file:
            while piece := file.read(MIB):
                yield piece
        yield f"\r\n--{boundary}--\r\n".encode()

    reply = httpx.post(
        f"http://127.0.0.1:{http_port}/dicom-web/studies",
        content=body(),
        headers={
            "Authorization": f"Bearer {token}",
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        },
        timeout=120,
    )
    assert reply.status_code == 200, reply.text


def stored_file(data_dir: Path, sop_instance_uid: str) -> Path:
    for path in (data_dir / "spool" / "objects").glob("*/*.dcm"):
        if pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID == sop_instance_uid:
            return path
    raise AssertionError(f"{sop_instance_uid} is not in the spool")


def test_a_large_object_is_received_in_bounded_memory(tmp_path: Path, data_dir: Path) -> None:
    """A 192 MiB multiframe, sent twice over DIMSE and once with STOW-RS (re-sends compared
    with the held file): the receiver's peak resident memory grows by far less than the
    object."""
    big = tmp_path / "big.dcm"
    sop_instance_uid = write_multiframe(big, 192 * MIB)
    small = tmp_path / "small.dcm"
    write_multiframe(small, 2 * MIB, seed=1)
    env = serve_env(data_dir)
    port = int(env["TRIAGE_DICOM_PORT"])
    with serving(env, tmp_path / "serve.log") as process:
        storescu(port, small)  # everything the C-STORE path imports and builds, once
        reset_peak(process.pid)
        before = peak_resident_bytes(process.pid)
        storescu(port, big)
        storescu(port, big)
        dimse = peak_resident_bytes(process.pid) - before
        stow_streamed(int(env["TRIAGE_HTTP_PORT"]), create_token(env, "big", "sender"), big)
        stow = peak_resident_bytes(process.pid) - before
    assert dimse < 32 * MIB, f"peak resident memory grew by {dimse / MIB:.0f} MiB over DIMSE"
    assert stow < 32 * MIB, f"peak resident memory grew by {stow / MIB:.0f} MiB with STOW-RS"
    held = stored_file(data_dir, sop_instance_uid)
    assert dataset_bytes_of(held) == dataset_bytes_of(big)


# -- deadlines and caps, driven byte by byte (an in-process listener) -------------------------


CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def _listener(stack_factory: StackFactory, settings: Settings, **update: object) -> int:
    stack = stack_factory(settings.model_copy(update={"allowed_callers": [], **update}))
    return stack.listener().port


def _trickle(peer: RawAssociation, data: bytes, every: float) -> threading.Thread:
    """Send ``data`` a byte at a time, ``every`` seconds apart, until done or cut off."""

    def run() -> None:
        for index in range(len(data)):
            try:
                peer.send(data[index : index + 1])
            except OSError:
                return
            time.sleep(every)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _a_abort(received: bytes) -> bool:
    return received[:1] == bytes([A_ABORT])


def test_idle_connections_do_not_hold_association_slots(
    settings: Settings, stack_factory: StackFactory
) -> None:
    """Connections that never send an A-ASSOCIATE-RQ are not associations: with
    max_associations = 2, four of them leave room for two real ones (a third is rejected)."""
    port = _listener(stack_factory, settings, max_associations=2, acse_timeout_seconds=30)
    idle = [RawAssociation(port) for _ in range(4)]
    real = [RawAssociation(port) for _ in range(3)]
    assert real[0].associate([CT_IMAGE_STORAGE]).pdu_type == A_ASSOCIATE_AC_TYPE
    assert real[1].associate([CT_IMAGE_STORAGE]).pdu_type == A_ASSOCIATE_AC_TYPE
    assert RawAssociation.rejection(real[2].associate([CT_IMAGE_STORAGE])) == (2, 3, 2)
    for peer in idle + real:
        peer.close()


def test_a_connection_that_never_asks_is_closed_at_the_artim_deadline(
    settings: Settings, stack_factory: StackFactory
) -> None:
    """PS3.8: ARTIM expiry before an A-ASSOCIATE-RQ closes the transport connection (no
    A-ABORT); the network timeout (30 s here) is not what ends it."""
    port = _listener(stack_factory, settings, acse_timeout_seconds=1, network_timeout_seconds=30)
    peer = RawAssociation(port)
    seconds, received = peer.until_closed(within=5)
    assert 0.8 <= seconds < 3
    assert received == b""


def test_a_request_trickled_byte_by_byte_is_cut_at_the_artim_deadline(
    settings: Settings, stack_factory: StackFactory
) -> None:
    port = _listener(stack_factory, settings, acse_timeout_seconds=1.5, network_timeout_seconds=30)
    peer = RawAssociation(port)
    _trickle(peer, association_request([CT_IMAGE_STORAGE]), every=0.2)
    seconds, received = peer.until_closed(within=6)
    assert 1.3 <= seconds < 4
    assert received == b""


def test_a_pdu_trickled_after_association_is_aborted_at_its_deadline(
    settings: Settings, stack_factory: StackFactory
) -> None:
    """Each byte comes well inside the network timeout (1 s), but the PDU is not whole within
    the timeout plus its length at dicom_min_bytes_per_second: A-ABORT."""
    port = _listener(stack_factory, settings, network_timeout_seconds=1, dimse_timeout_seconds=1)
    peer = RawAssociation(port)
    assert peer.associate([CT_IMAGE_STORAGE]).pdu_type == A_ASSOCIATE_AC_TYPE
    whole = pdu(P_DATA_TF, pdv(1, 0x01, bytes(2000)))  # a command fragment
    peer.send(whole[:12])
    _trickle(peer, whole[12:], every=0.2)
    seconds, received = peer.until_closed(within=8)
    assert seconds < 4
    assert _a_abort(received)


def test_a_message_trickled_in_whole_tiny_pdus_is_aborted_at_its_deadline(
    settings: Settings, stack_factory: StackFactory
) -> None:
    """Every PDU is whole and quick; the message they make is not whole within the DIMSE
    timeout plus its length at the minimum rate: A-ABORT."""
    port = _listener(stack_factory, settings, network_timeout_seconds=1, dimse_timeout_seconds=1)
    peer = RawAssociation(port)
    assert peer.associate([CT_IMAGE_STORAGE]).pdu_type == A_ASSOCIATE_AC_TYPE
    command = c_store_rq(1, CT_IMAGE_STORAGE, "1.2.3.4")

    def send_slowly() -> None:
        for index in range(len(command) - 1):
            try:
                peer.send(pdu(P_DATA_TF, pdv(1, 0x01, command[index : index + 1])))
            except OSError:
                return
            time.sleep(0.2)

    threading.Thread(target=send_slowly, daemon=True).start()
    seconds, received = peer.until_closed(within=8)
    assert seconds < 4
    assert _a_abort(received)


def test_a_command_set_past_the_cap_is_aborted(
    settings: Settings, stack_factory: StackFactory
) -> None:
    """No command set is 64 KiB long: command fragments past that are not buffered on."""
    port = _listener(stack_factory, settings)
    peer = RawAssociation(port)
    assert peer.associate([CT_IMAGE_STORAGE]).pdu_type == A_ASSOCIATE_AC_TYPE
    with contextlib.suppress(OSError):
        for _ in range(5):  # 80 KiB of command fragments, none the last
            peer.send(pdu(P_DATA_TF, pdv(1, 0x01, bytes(16 * 1024))))
    _seconds, received = peer.until_closed(within=5)
    assert _a_abort(received)


def test_connections_still_negotiating_are_capped_per_address(
    settings: Settings, stack_factory: StackFactory
) -> None:
    """Two connections from 127.0.0.1 that have not associated: a third is closed unread and
    counted; once one associates, there is room again."""
    stack = stack_factory(
        settings.model_copy(update={"allowed_callers": [], "max_negotiating_per_address": 2})
    )
    port = stack.listener().port
    first, second = RawAssociation(port), RawAssociation(port)
    time.sleep(0.2)  # both accepted before the third
    third = RawAssociation(port)
    seconds, received = third.until_closed(within=3)
    assert seconds < 1
    assert received == b""
    refused = stack.registry.get_sample_value(
        "triage_rejections_total", {"reason": "connection-refused"}
    )
    assert refused == 1
    assert first.associate([CT_IMAGE_STORAGE]).pdu_type == A_ASSOCIATE_AC_TYPE
    fourth = RawAssociation(port)
    assert fourth.associate([CT_IMAGE_STORAGE]).pdu_type == A_ASSOCIATE_AC_TYPE
    for peer in (first, second, fourth):
        peer.close()


# -- negotiation: cheap and quiet whatever is proposed ------------------------------------------


def _raw_request(contexts: int, syntaxes: int, *, called: str = "TRIAGE") -> bytes:
    """An A-ASSOCIATE-RQ built byte by byte (PS3.8 9.3.2): ``contexts`` CT contexts, each with
    ``syntaxes`` transfer syntax UIDs that are not valid UIDs, then Explicit VR Little Endian."""

    def item(kind: int, value: bytes) -> bytes:
        return struct.pack(">BxH", kind, len(value)) + value

    body = b"".join(
        item(
            0x20,
            bytes([(2 * index + 1) % 256, 0, 0, 0])
            + item(0x30, CT_IMAGE_STORAGE.encode())
            + b"".join(item(0x40, f"9.9.{n}.x".encode()) for n in range(syntaxes))
            + item(0x40, b"1.2.840.10008.1.2.1"),
        )
        for index in range(contexts)
    )
    fixed = struct.pack(">HH16s16s32x", 1, 0, called.ljust(16).encode(), b"HOSTILE".ljust(16))
    items = item(0x10, b"1.2.840.10008.3.1.1.1") + body + item(0x50, item(0x51, bytes(4)))
    return pdu(0x01, fixed + items)


@pytest.mark.parametrize(
    ("contexts", "syntaxes", "called", "expected"),
    [
        (128, 100, "TRIAGE", (1, 1, 1)),  # 12,800 syntaxes: no reason given, nothing decoded on
        (130, 1, "TRIAGE", (1, 1, 1)),  # more contexts than there are context IDs
        (128, 100, "NOT_US", (1, 1, 7)),  # refused by its called AE title before decoding
    ],
)
def test_an_absurd_request_is_refused_cheaply_and_quietly(
    settings: Settings,
    stack_factory: StackFactory,
    caplog: pytest.LogCaptureFixture,
    contexts: int,
    syntaxes: int,
    called: str,
    expected: tuple[int, int, int],
) -> None:
    port = _listener(stack_factory, settings)
    peer = RawAssociation(port)
    with caplog.at_level(logging.DEBUG):
        peer.send(_raw_request(contexts, syntaxes, called=called))
        assert RawAssociation.rejection(peer.read()) == expected
        peer.close()
        # Then a real sender, proposing a sane request, is served as ever.
        real = RawAssociation(port)
        assert real.associate([CT_IMAGE_STORAGE]).pdu_type == A_ASSOCIATE_AC_TYPE
        real.close()
    assert len(caplog.records) < 10, "a log line per proposed syntax"


def test_a_sane_request_with_invalid_syntaxes_is_negotiated_without_a_log_line_each(
    settings: Settings, stack_factory: StackFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Syntax UIDs we cannot use are skipped in silence; the one we take is accepted."""
    port = _listener(stack_factory, settings)
    peer = RawAssociation(port)
    with caplog.at_level(logging.DEBUG):
        peer.send(_raw_request(16, 20))
        reply = peer.read()
    assert reply.pdu_type == A_ASSOCIATE_AC_TYPE
    peer.close()
    assert len(caplog.records) < 10
