"""bench/ingest: how fast ``triage serve`` takes in a CT series over DICOM, against DCMTK's
``storescp`` measured in the same run on the same files.

One run generates a 512x512 CT series (16-bit, explicit VR little endian), then for each run and
for 1 and 4 concurrent associations sends it with ``storescu`` (TCP_NODELAY=1) to a fresh
``storescp`` and to a fresh ``triage serve`` (own data directory, so nothing is a duplicate), and
checks that each receiver holds every instance. It prints medians and the ratio ours/storescp;
it never asserts a speed.

    .venv/bin/python -m bench.ingest [--slices 300] [--runs 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from bench.common import (
    LOOPBACK,
    ProcessError,
    argument_parser,
    children_cpu_seconds,
    clean_env,
    cpu_seconds,
    emit,
    filesystem,
    free_port,
    machine,
    machine_cpu_seconds,
    median,
    run_all,
    running,
    today,
    venv_script,
    wait_for_port,
)

ROWS = COLUMNS = 512
ASSOCIATIONS = (1, 4)
# ours/storescp throughput we aim for, per association count. The four-association target
# (0.8) is retired: the receiver is some fifty times faster than a large hospital's peak hour
# needs (bench/README), and raw intake speed is no longer worked on for its own sake.
TARGETS: dict[int, float] = {1: 0.5}
MAX_PDU = 131072  # storescp gets the same maximum PDU as triage's default max_pdu_bytes
CALLING_AE = "BENCH"
STORESCP_AE = "STORESCP"
TRIAGE_AE = "TRIAGE"
NODELAY = {"TCP_NODELAY": "1"}  # DCMTK reads it from the environment
RECEIVERS = ("storescp", "triage")
NOTE = (
    "triage writes each instance to a temporary file, fsyncs it, renames it, fsyncs the "
    "directory and commits its index rows (SQLite WAL, synchronous=NORMAL: rebuilt from the "
    "files after a power cut) before it answers Success; storescp writes the file without "
    "fsync and indexes nothing."
)


@dataclass(frozen=True)
class Series:
    files: list[Path]
    total_bytes: int


@dataclass(frozen=True)
class Sample:
    seconds: float
    cpu_seconds: float | None = None  # the receiver process's own (triage), where it can be read
    sender_cpu_seconds: float | None = None  # the storescu processes'
    other_cpu_seconds: float | None = None  # the machine's busy time less the senders'
    idle_fraction: float | None = None  # of the machine's CPU time (all cores) during the send


class MachineClock:
    """CPU time of the senders and of the whole machine across one timed send."""

    def __init__(self) -> None:
        self._children = children_cpu_seconds()
        self._machine = machine_cpu_seconds()

    def sample(self, seconds: float, receiver_cpu: float | None = None) -> Sample:
        senders = children_cpu_seconds() - self._children
        after = machine_cpu_seconds()
        if self._machine is None or after is None:
            return Sample(seconds, receiver_cpu, senders)
        busy, idle = (end - start for end, start in zip(after, self._machine, strict=True))
        return Sample(
            seconds,
            receiver_cpu,
            senders,
            max(busy - senders, 0.0),
            idle / (busy + idle) if busy + idle > 0 else None,
        )


@dataclass(frozen=True)
class Result:
    receiver: str
    associations: int
    seconds: list[float]
    median_seconds: float
    instances_per_second: float
    mb_per_second: float
    cpu_ms_per_instance: float | None
    sender_cpu_ms_per_instance: float | None
    other_cpu_ms_per_instance: float | None
    idle_percent: float | None


def generate_series(directory: Path, slices: int, *, seed: int = 0) -> Series:
    """``slices`` CT images, 512x512 int16, one study and series, new SOP Instance UIDs.

    The header is pydicom's CT_small.dcm; pixels are a disc plus noise, so nothing compresses.
    """
    template_path = get_testdata_file("CT_small.dcm")
    if template_path is None:
        raise RuntimeError("pydicom's CT_small.dcm test file is missing")
    template = dcmread(template_path)
    template.Rows, template.Columns = ROWS, COLUMNS
    template.BitsAllocated, template.BitsStored, template.HighBit = 16, 16, 15
    template.PixelRepresentation = 1
    template.SamplesPerPixel = 1
    template.PhotometricInterpretation = "MONOCHROME2"
    template.StudyInstanceUID = generate_uid()
    template.SeriesInstanceUID = generate_uid()
    template.FrameOfReferenceUID = generate_uid()
    template.SeriesDescription = "bench ingest series"
    template.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:ROWS, :COLUMNS]
    disc = (yy - ROWS / 2) ** 2 + (xx - COLUMNS / 2) ** 2 < (ROWS / 2.4) ** 2
    base = np.where(disc, 40, -1000).astype(np.int16)

    directory.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    total = 0
    for index in range(slices):
        ds: Dataset = template.copy()
        ds.file_meta = FileMetaDataset(template.file_meta)
        uid = generate_uid()
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.InstanceNumber = index + 1
        ds.ImagePositionPatient = [-125.0, -125.0, round(index * 1.25, 2)]
        ds.SliceLocation = round(index * 1.25, 2)
        noise = rng.integers(-20, 21, size=(ROWS, COLUMNS), dtype=np.int16)
        ds.PixelData = (base + noise).astype("<i2").tobytes()
        path = directory / f"slice-{index:04d}.dcm"
        dcmwrite(path, ds, enforce_file_format=True)
        files.append(path)
        total += path.stat().st_size
    return Series(files, total)


def split(files: Sequence[Path], parts: int) -> list[list[Path]]:
    """``files`` in ``parts`` contiguous chunks of nearly equal size."""
    size, extra = divmod(len(files), parts)
    chunks, start = [], 0
    for part in range(parts):
        end = start + size + (1 if part < extra else 0)
        chunks.append(list(files[start:end]))
        start = end
    return [chunk for chunk in chunks if chunk]


def storescu_commands(
    series: Series, *, port: int, called_ae: str, associations: int
) -> list[list[str]]:
    """One storescu per association, each sending its share of the files on one association."""
    return [
        [
            "storescu",
            "-aet", CALLING_AE,
            "-aec", called_ae,
            "-ta", "30",
            "-ts", "60",
            "-td", "60",
            LOOPBACK,
            str(port),
            *map(str, chunk),
        ]
        for chunk in split(series.files, associations)
    ]  # fmt: skip


def measure_storescp(series: Series, work: Path, *, associations: int, timeout: float) -> Sample:
    """Seconds to send ``series`` to a fresh storescp (``--fork`` for more than one association)."""
    received = work / "received"
    received.mkdir(parents=True)
    port = free_port()
    argv = ["storescp", "-aet", STORESCP_AE, "-od", str(received), "--max-pdu", str(MAX_PDU)]
    if associations > 1:
        argv.append("--fork")
    argv.append(str(port))
    env = clean_env(NODELAY)
    with running(argv, env=env, log_path=work / "storescp.log") as server:
        wait_for_port(port, process=server, timeout=30)
        clock = MachineClock()
        elapsed = run_all(
            storescu_commands(series, port=port, called_ae=STORESCP_AE, associations=associations),
            env=env,
            timeout=timeout,
            log_dir=work,
        )
        sample = clock.sample(elapsed)  # before storescp stops: its CPU is not the senders'
    held = sum(1 for path in received.iterdir() if path.is_file())
    if held != len(series.files):
        raise ProcessError(f"storescp holds {held} files, {len(series.files)} were sent")
    return sample


def triage_env(
    data_dir: Path, *, dicom_port: int, http_port: int, processes: int = 1
) -> dict[str, str]:
    return clean_env(
        {
            "TRIAGE_DICOM_PROCESSES": str(processes),
            "TRIAGE_DATA_DIR": str(data_dir),
            "TRIAGE_DICOM_HOST": LOOPBACK,
            "TRIAGE_DICOM_PORT": str(dicom_port),
            "TRIAGE_HTTP_PORT": str(http_port),
            "TRIAGE_SPOOL_MIN_FREE_MB": "1",
            "TRIAGE_LOG_LEVEL": "WARNING",
            "TRIAGE_STUDY_QUIET_SECONDS": "3600",
            # Intake only: no local inference worker importing torch beside the receiver
            # (GPU workers run elsewhere in a real deployment).
            "TRIAGE_WORKERS": "0",
        }
    )


def indexed_instances(env: dict[str, str]) -> int:
    """The total ``instances`` that ``triage-admin status --json`` reports."""
    completed = subprocess.run(
        [venv_script("triage-admin"), "status", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if completed.returncode != 0:
        raise ProcessError(f"triage-admin status failed: {completed.stderr[-2000:]}")
    return int(json.loads(completed.stdout)["instances"])


def measure_triage(
    series: Series, work: Path, *, associations: int, timeout: float, processes: int = 1
) -> Sample:
    """Seconds to send ``series`` to a fresh ``triage serve`` with its own data directory."""
    dicom_port, http_port = free_port(), free_port()
    while http_port == dicom_port:
        http_port = free_port()
    env = triage_env(work / "data", dicom_port=dicom_port, http_port=http_port, processes=processes)
    with running([venv_script("triage"), "serve"], env=env, log_path=work / "triage.log") as server:
        wait_for_port(dicom_port, process=server, timeout=120)
        cpu_before = cpu_seconds(server.pid)
        clock = MachineClock()
        elapsed = run_all(
            storescu_commands(
                series, port=dicom_port, called_ae=TRIAGE_AE, associations=associations
            ),
            env=clean_env(NODELAY),
            timeout=timeout,
            log_dir=work,
        )
        cpu_after = cpu_seconds(server.pid)
        sample = clock.sample(
            elapsed,
            None if cpu_before is None or cpu_after is None else cpu_after - cpu_before,
        )
        held = indexed_instances(env)
    if held != len(series.files):
        raise ProcessError(f"triage indexed {held} instances, {len(series.files)} were sent")
    return sample


def measure(
    series: Series, root: Path, *, runs: int, timeout: float, progress: bool, processes: int = 1
) -> list[Result]:
    """Every (receiver, associations) case ``runs`` times, interleaved so drift hits all alike."""
    samples: dict[tuple[str, int], list[Sample]] = {
        (receiver, n): [] for n in ASSOCIATIONS for receiver in RECEIVERS
    }
    for run in range(1, runs + 1):
        for associations in ASSOCIATIONS:
            for receiver in RECEIVERS:
                work = root / f"run{run}-{receiver}-{associations}"
                work.mkdir()
                # Start from a clean page cache: storescp leaves ~160 MB unflushed and the
                # previous run's files were just deleted; that writeback would otherwise fall
                # on whichever run comes next.
                os.sync()
                if receiver == "storescp":
                    sample = measure_storescp(
                        series, work, associations=associations, timeout=timeout
                    )
                else:
                    sample = measure_triage(
                        series,
                        work,
                        associations=associations,
                        timeout=timeout,
                        processes=processes,
                    )
                shutil.rmtree(work, ignore_errors=True)
                samples[(receiver, associations)].append(sample)
                if progress:
                    print(
                        f"  run {run}/{runs}: {receiver:<8} x{associations}: "
                        f"{sample.seconds:6.2f} s",
                        file=sys.stderr,
                        flush=True,
                    )
    count, megabytes = len(series.files), series.total_bytes / 1e6
    results = []

    def per_instance_ms(values: list[float | None]) -> float | None:
        known = [value for value in values if value is not None]
        return round(1000 * median(known) / count, 2) if known else None

    for (receiver, associations), taken in samples.items():
        values = [sample.seconds for sample in taken]
        idle = [s.idle_fraction for s in taken if s.idle_fraction is not None]
        middle = median(values)
        results.append(
            Result(
                receiver=receiver,
                associations=associations,
                seconds=[round(value, 3) for value in values],
                median_seconds=round(middle, 3),
                instances_per_second=round(count / middle, 1),
                mb_per_second=round(megabytes / middle, 1),
                cpu_ms_per_instance=per_instance_ms([s.cpu_seconds for s in taken]),
                sender_cpu_ms_per_instance=per_instance_ms([s.sender_cpu_seconds for s in taken]),
                other_cpu_ms_per_instance=per_instance_ms([s.other_cpu_seconds for s in taken]),
                idle_percent=round(100 * median(idle), 1) if idle else None,
            )
        )
    return results


def ratios(results: Sequence[Result]) -> list[dict[str, Any]]:
    """Throughput of triage over storescp per association count, against its target."""
    by_case = {(r.receiver, r.associations): r for r in results}
    lines = []
    for associations in ASSOCIATIONS:
        ours = by_case[("triage", associations)]
        reference = by_case[("storescp", associations)]
        ratio = reference.median_seconds / ours.median_seconds
        # The two receivers take turns within each run: the ratio of each run's pair is
        # less exposed to the machine's drift over the whole benchmark than the medians are.
        paired = median(
            [theirs / mine for theirs, mine in zip(reference.seconds, ours.seconds, strict=True)]
        )
        target = TARGETS.get(associations)
        lines.append(
            {
                "associations": associations,
                "ratio": round(ratio, 3),
                "paired_ratio": round(paired, 3),
                "target": target,
                "met": None if target is None else ratio >= target,
            }
        )
    return lines


def report(
    series: Series,
    results: Sequence[Result],
    runs: int,
    workdir: Path,
    load_before: tuple[float, float, float],
    processes: int = 1,
) -> dict[str, Any]:
    return {
        "benchmark": "bench/ingest",
        "date": today(),
        "machine": machine(),
        "filesystem": filesystem(workdir),
        # The machine may be shared: a busy CPU slows our Python receiver more than storescp.
        "load_average_1min": {"before": load_before[0], "after": os.getloadavg()[0]},
        "slices": len(series.files),
        "rows": ROWS,
        "columns": COLUMNS,
        "transfer_syntax": "explicit VR little endian",
        "total_bytes": series.total_bytes,
        "runs": runs,
        "sender": "storescu, TCP_NODELAY=1, one association per storescu process",
        "storescp_max_pdu": MAX_PDU,
        "triage_dicom_processes": processes,
        "results": [asdict(result) for result in results],
        "ratios": ratios(results),
        "note": NOTE,
    }


def print_text(data: dict[str, Any]) -> None:
    megabytes = data["total_bytes"] / 1e6
    print(f"bench/ingest  {data['date']}  {data['machine']}")
    print(
        f"series: {data['slices']} CT slices {data['rows']}x{data['columns']} int16, "
        f"{data['transfer_syntax']}, {megabytes:.1f} MB; disk: {data['filesystem']}"
    )
    print(
        f"sender: {data['sender']}; loopback; storescp --max-pdu {data['storescp_max_pdu']}; "
        f"triage dicom_processes = {data['triage_dicom_processes']}; median of {data['runs']} runs"
    )
    load = data["load_average_1min"]
    print(f"1-min load average: {load['before']:.2f} before, {load['after']:.2f} after")
    print()

    def figure(value: float | None, digits: int = 2) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    print(
        f"{'receiver':<10}{'assoc':>6}{'median s':>10}{'inst/s':>9}{'MB/s':>8}"
        f"{'CPU ms/inst':>13}{'rest':>7}{'senders':>9}{'idle %':>8}   runs (s)"
    )
    for result in data["results"]:
        runs = " ".join(f"{value:.2f}" for value in result["seconds"])
        print(
            f"{result['receiver']:<10}{result['associations']:>6}"
            f"{result['median_seconds']:>10.2f}{result['instances_per_second']:>9.0f}"
            f"{result['mb_per_second']:>8.0f}{figure(result['cpu_ms_per_instance']):>13}"
            f"{figure(result['other_cpu_ms_per_instance']):>7}"
            f"{figure(result['sender_cpu_ms_per_instance']):>9}"
            f"{figure(result['idle_percent'], 0):>8}   {runs}"
        )
    print()
    print("throughput ratio triage/storescp:")
    for line in data["ratios"]:
        plural = "association" if line["associations"] == 1 else "associations"
        if line["target"] is None:
            verdict = "no target"
        else:
            met = "met" if line["met"] else "NOT met"
            verdict = f"target >= {line['target']:.1f}: {met}"
        print(
            f"  {line['associations']} {plural:<13} {line['ratio']:.2f}   "
            f"(median of each run's ratio {line['paired_ratio']:.2f})   {verdict}"
        )
    print()
    print(f"note: {data['note']}")
    print(
        "CPU ms/inst: user+system CPU of the triage serve process during the send, per "
        "instance (steadier than wall time on a shared machine; not read for storescp). "
        "rest: the whole machine's busy CPU less the senders' (the receiver, storescp's forks "
        "included, and anything else running), per instance. senders: the storescu "
        "processes'. idle %: of all cores' time during the send."
    )


def add_send_options(parser: argparse.ArgumentParser, *, send_timeout: float) -> None:
    """The options every storescu-against-storescp-and-triage benchmark takes."""
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    parser.add_argument(
        "--send-timeout",
        type=float,
        default=send_timeout,
        help=f"seconds one send may take ({send_timeout:g})",
    )
    parser.add_argument(
        "--workdir", type=Path, default=None, help="where objects and receivers write (a temp dir)"
    )
    parser.add_argument(
        "--dicom-processes",
        type=int,
        default=1,
        help="triage's dicom_processes setting: receiver processes behind triage serve (1)",
    )


def dcmtk_missing(benchmark: str) -> bool:
    """Whether DCMTK's storescu or storescp is missing from PATH (said on stderr)."""
    for tool in ("storescu", "storescp"):
        if shutil.which(tool) is None:
            print(f"{benchmark} needs DCMTK's {tool} on PATH", file=sys.stderr)
            return True
    return False


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argument_parser("bench.ingest", __doc__)
    parser.add_argument("--slices", type=int, default=300, help="images in the series (300)")
    parser.add_argument(
        "--runs", type=int, default=3, help="runs per case; the median is shown (3)"
    )
    add_send_options(parser, send_timeout=300.0)
    args = parser.parse_args(argv)
    if args.slices < 4 or args.runs < 1 or args.dicom_processes < 1:
        parser.error("--slices must be at least 4, --runs and --dicom-processes at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if dcmtk_missing("bench/ingest"):
        return 2
    load_before = os.getloadavg()
    root = Path(tempfile.mkdtemp(prefix="bench-ingest-", dir=args.workdir))
    try:
        print(f"generating {args.slices} slices in {root} ...", file=sys.stderr, flush=True)
        series = generate_series(root / "series", args.slices)
        results = measure(
            series,
            root,
            runs=args.runs,
            timeout=args.send_timeout,
            progress=not args.json,
            processes=args.dicom_processes,
        )
        data = report(series, results, args.runs, root, load_before, args.dicom_processes)
    except (ProcessError, subprocess.SubprocessError, OSError) as exc:
        print(f"bench/ingest failed: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return emit(data, as_json=args.json, text=print_text)


if __name__ == "__main__":
    sys.exit(main())
