"""bench/dicomweb: triage's DICOMweb server against Orthanc's, measured in the same run with the
same client (httpx) on the same files. Both servers start fresh on loopback: ``triage serve``
(own data directory, SQLite, no local worker) and Orthanc from Debian's packages with its
DICOMweb plugin (SQLite index, storage uncompressed, ``SyncStorageArea`` on: it fsyncs every
file, as triage does). For each run a new 512x512 CT series is stored by one STOW-RS request to
each, then retrieved whole by WADO-RS five times (as stored: ``transfer-syntax=*``). Then each
server is loaded with 10,000 one-image studies by STOW-RS, left to finish what a load sets off
(until it uses no CPU for 3 s), and searched by QIDO-RS: a PatientID that matches one study,
and a StudyDate range with ``limit=100``. It prints medians, p50/p99 and the ratio
Orthanc/triage (above 1: triage is faster); it never asserts a speed.

    .venv/bin/python -m bench.dicomweb [--slices 300] [--runs 3] [--studies 10000] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from bench.common import (
    LOOPBACK,
    ProcessError,
    Server,
    argument_parser,
    clean_env,
    cpu_seconds,
    emit,
    filesystem,
    free_port,
    machine,
    median,
    orthanc_server,
    percentile,
    running,
    today,
    venv_script,
    wait_for_port,
)
from bench.ingest import generate_series

SERVERS = ("orthanc", "triage")
BATCH = 250  # instances per STOW-RS request while loading the QIDO studies
QUERIES = 200  # timed QIDO-RS requests of each kind, after WARMUP
WARMUP = 20
READS = 5  # WADO-RS reads of each stored series, servers in turn
DICOM_ALL = 'multipart/related; type="application/dicom"; transfer-syntax=*'
NOTE = (
    "triage answers STOW-RS after each instance is fsynced (file and directory) and indexed "
    "(SQLite WAL); Orthanc with SyncStorageArea fsyncs each file and commits its SQLite index. "
    "Every triage request also checks its bearer token (a SELECT); Orthanc has authentication "
    "off."
)


@contextlib.contextmanager
def triage_server(work: Path) -> Iterator[Server]:
    data_dir, http_port = work / "triage", free_port()
    env = clean_env(
        {
            "TRIAGE_DATA_DIR": str(data_dir),
            "TRIAGE_DICOM_HOST": LOOPBACK,
            "TRIAGE_DICOM_PORT": str(free_port()),
            "TRIAGE_HTTP_PORT": str(http_port),
            "TRIAGE_SPOOL_MIN_FREE_MB": "1",
            "TRIAGE_LOG_LEVEL": "WARNING",
            "TRIAGE_STUDY_QUIET_SECONDS": "3600",
            "TRIAGE_WORKERS": "0",
        }
    )
    with running(
        [venv_script("triage"), "serve"], env=env, log_path=work / "triage.log"
    ) as process:
        wait_for_port(http_port, process=process, timeout=120)
        token = subprocess.run(
            [venv_script("triage-admin"), "tokens", "create", "bench", "--role", "admin"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout.strip()
        yield Server(
            "triage",
            f"http://{LOOPBACK}:{http_port}/dicom-web",
            {"Authorization": f"Bearer {token}"},
            process.pid,
        )


def _multipart(files: Sequence[bytes], boundary: str) -> Iterator[bytes]:
    for data in files:
        yield f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        yield data
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()


def stow(client: httpx.Client, server: Server, files: Sequence[bytes]) -> float:
    """Seconds to store ``files`` in one STOW-RS request; every one must be stored."""
    boundary = uuid.uuid4().hex
    headers = {
        **server.headers,
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json",
    }
    started = time.perf_counter()
    reply = client.post(
        f"{server.base}/studies", content=_multipart(files, boundary), headers=headers
    )
    elapsed = time.perf_counter() - started
    if reply.status_code != 200:
        raise ProcessError(
            f"{server.name} STOW-RS answered {reply.status_code}: {reply.text[:500]}"
        )
    stored = reply.json().get("00081199", {}).get("Value", [])
    if len(stored) != len(files):
        raise ProcessError(f"{server.name} stored {len(stored)} of {len(files)} instances")
    return elapsed


def retrieve(client: httpx.Client, server: Server, study: str, series: str, size: int) -> float:
    """Seconds to read a whole series by WADO-RS; at least ``size`` bytes must come back."""
    headers = {**server.headers, "Accept": DICOM_ALL}
    started = time.perf_counter()
    received = 0
    url = f"{server.base}/studies/{study}/series/{series}"
    with client.stream("GET", url, headers=headers) as reply:
        if reply.status_code != 200:
            raise ProcessError(f"{server.name} WADO-RS answered {reply.status_code}")
        for piece in reply.iter_bytes(1 << 20):
            received += len(piece)
    elapsed = time.perf_counter() - started
    if received < size:
        raise ProcessError(f"{server.name} sent {received} bytes of a {size}-byte series")
    return elapsed


def small_studies(count: int, seed: int = 1) -> list[bytes]:
    """``count`` one-image studies (no pixel data), each its own patient, dates over a year."""
    template_path = get_testdata_file("CT_small.dcm")
    if template_path is None:
        raise ProcessError("pydicom's CT_small.dcm test file is missing")
    template = dcmread(template_path, stop_before_pixels=True)
    template.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out = []
    for index in range(count):
        ds: Dataset = template.copy()
        ds.file_meta = FileMetaDataset(template.file_meta)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.PatientID = f"BENCH{index:06d}"
        ds.PatientName = f"PATIENT^{index:06d}"
        ds.AccessionNumber = f"A{index:06d}"
        ds.StudyDate = f"2024{1 + index % 12:02d}{1 + index % 28:02d}"
        buffer = BytesIO()
        dcmwrite(buffer, ds, enforce_file_format=True)
        out.append(buffer.getvalue())
    return out


def settle(pid: int, *, idle: float = 0.05, quiet: int = 3, limit: float = 600) -> float:
    """Seconds until process ``pid`` used under ``idle`` CPU seconds a second, ``quiet``
    seconds running (at most ``limit``)."""
    started = time.monotonic()
    calm = 0
    before = cpu_seconds(pid) or 0.0
    while calm < quiet and time.monotonic() - started < limit:
        time.sleep(1)
        now = cpu_seconds(pid) or 0.0
        calm = calm + 1 if now - before < idle else 0
        before = now
    return time.monotonic() - started


def searches(client: httpx.Client, server: Server, count: int) -> dict[str, list[float]]:
    """Milliseconds of each timed QIDO-RS request, by kind."""

    def by_patient(n: int) -> dict[str, str]:
        return {"PatientID": f"BENCH{(n * 37) % count:06d}"}

    def by_date(n: int) -> dict[str, str]:
        month = 1 + n % 12
        return {"StudyDate": f"2024{month:02d}01-2024{month:02d}28", "limit": "100"}

    kinds: dict[str, Callable[[int], dict[str, str]]] = {
        "PatientID (1 match)": by_patient,
        "StudyDate range, limit=100": by_date,
    }
    timings: dict[str, list[float]] = {}
    headers = {**server.headers, "Accept": "application/dicom+json"}
    for kind, params in kinds.items():
        values = []
        for n in range(WARMUP + QUERIES):
            started = time.perf_counter()
            reply = client.get(f"{server.base}/studies", params=params(n), headers=headers)
            elapsed = (time.perf_counter() - started) * 1000
            if reply.status_code != 200 or not reply.json():
                raise ProcessError(f"{server.name} QIDO-RS {kind} answered {reply.status_code}")
            if n >= WARMUP:
                values.append(elapsed)
        timings[kind] = values
    return timings


def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    series_list = [
        generate_series(work / f"series-{run}", args.slices, seed=run) for run in range(args.runs)
    ]
    studies = small_studies(args.studies)
    figures: dict[str, dict[str, Any]] = {}
    with contextlib.ExitStack() as stack:
        servers = [
            stack.enter_context(orthanc_server(work)),
            stack.enter_context(triage_server(work)),
        ]
        client = stack.enter_context(httpx.Client(timeout=600))
        for server in servers:
            figures[server.name] = {"stow": [], "wado": []}
        for series in series_list:
            files = [path.read_bytes() for path in series.files]
            first = dcmread(series.files[0], stop_before_pixels=True)
            for server in servers:  # interleaved, run by run
                figures[server.name]["stow"].append(stow(client, server, files))
            for _ in range(READS):
                for server in servers:
                    figures[server.name]["wado"].append(
                        retrieve(
                            client,
                            server,
                            first.StudyInstanceUID,
                            first.SeriesInstanceUID,
                            series.total_bytes,
                        )
                    )
        for server in servers:
            started = time.perf_counter()
            for start in range(0, len(studies), BATCH):
                stow(client, server, studies[start : start + BATCH])
            figures[server.name]["load_seconds"] = time.perf_counter() - started
        # What each does after a load (triage completes its studies, Orthanc marks them
        # stable) is not what a search costs: both settle first.
        for server in servers:
            figures[server.name]["settle_seconds"] = settle(server.pid)
        for server in servers:
            figures[server.name]["qido_ms"] = searches(client, server, len(studies))
    return figures


def report(args: argparse.Namespace, figures: dict[str, Any], work: Path) -> dict[str, Any]:
    rows = []
    for what in ("stow", "wado"):
        orthanc, ours = median(figures["orthanc"][what]), median(figures["triage"][what])
        rows.append(
            {
                "measure": f"{what.upper()}-RS {args.slices} slices, median s",
                "orthanc": orthanc,
                "triage": ours,
                "ratio": orthanc / ours,
                "runs": {name: figures[name][what] for name in SERVERS},
            }
        )
    for kind in figures["triage"]["qido_ms"]:
        for label, fraction in (("p50", 0.5), ("p99", 0.99)):
            orthanc = percentile(figures["orthanc"]["qido_ms"][kind], fraction)
            ours = percentile(figures["triage"]["qido_ms"][kind], fraction)
            rows.append(
                {
                    "measure": f"QIDO-RS {kind}, {label} ms",
                    "orthanc": orthanc,
                    "triage": ours,
                    "ratio": orthanc / ours,
                }
            )
    return {
        "benchmark": "bench/dicomweb",
        "date": today(),
        "machine": machine(),
        "filesystem": filesystem(work),
        "load_average_1min_after": os.getloadavg()[0],
        "slices": args.slices,
        "runs": args.runs,
        "qido_studies": args.studies,
        "load_seconds": {name: figures[name]["load_seconds"] for name in SERVERS},
        "settle_seconds": {name: figures[name]["settle_seconds"] for name in SERVERS},
        "rows": rows,
        "note": NOTE,
    }


def print_text(data: dict[str, Any]) -> None:
    print(f"bench/dicomweb  {data['date']}  {data['machine']}")
    print(
        f"{data['slices']}-slice CT series, {data['runs']} runs; QIDO-RS over "
        f"{data['qido_studies']} studies ({QUERIES} timed requests each, after {WARMUP}); "
        f"disk: {data['filesystem']}; 1-min load after: {data['load_average_1min_after']:.2f}"
    )
    loads = data["load_seconds"]
    print(
        f"loading the QIDO studies by STOW-RS ({BATCH} a request): orthanc "
        f"{loads['orthanc']:.1f} s, triage {loads['triage']:.1f} s; then idle after "
        f"{data['settle_seconds']['orthanc']:.0f} s and {data['settle_seconds']['triage']:.0f} s"
    )
    print()
    print(f"{'':<48}{'orthanc':>10}{'triage':>10}{'orthanc/triage':>16}")
    for row in data["rows"]:
        print(
            f"{row['measure']:<48}{row['orthanc']:>10.2f}{row['triage']:>10.2f}"
            f"{row['ratio']:>16.2f}"
        )
    print()
    print(f"note: {data['note']}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argument_parser("bench.dicomweb", __doc__)
    parser.add_argument("--slices", type=int, default=300, help="images in the series (300)")
    parser.add_argument("--runs", type=int, default=3, help="series stored and read (3)")
    parser.add_argument("--studies", type=int, default=10_000, help="studies for QIDO-RS")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    parser.add_argument("--workdir", type=Path, help="where servers write (a temp dir)")
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        work = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        figures = measure(args, work)
        data = report(args, figures, work)
    return emit(data, as_json=args.json, text=print_text)


if __name__ == "__main__":
    sys.exit(main())
