"""The receiver against big, slow and hostile senders (a real ``triage serve``; DCMTK's
``storescu`` and raw sockets as the peers): memory bounded whatever the object size,
deadlines for slow senders, caps on connections that never associate."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom

from bench.multiframe import write_multiframe
from tests.conftest import free_port
from tests.helpers.instances import dataset_bytes_of
from tests.helpers.process import VENV_BIN, create_token, port_open, running

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


def serve_env(data_dir: Path, **extra: str) -> dict[str, str]:
    return {
        "TRIAGE_DATA_DIR": str(data_dir),
        "TRIAGE_HTTP_PORT": str(free_port()),
        "TRIAGE_DICOM_PORT": str(free_port()),
        "TRIAGE_WORKERS": "0",
        **extra,
    }


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
    with running(
        [str(VENV_BIN / "triage"), "serve"],
        env=env,
        log_file=tmp_path / "serve.log",
        ready=lambda: port_open(int(env["TRIAGE_HTTP_PORT"])),
    ) as process:
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
