"""bench/ingest, large objects: one multiframe object of 1 GiB over one association, and four
of 256 MiB over four, sent with ``storescu`` to a fresh ``storescp`` and to a fresh ``triage
serve`` in turn. For each it prints the time, and the receiver's resident memory (all its
processes) when idle and at its peak during the send; for triage, whether the peak stays within
64 MiB of the idle figure plus ``receive_buffer_kb`` per association. It never asserts.

    .venv/bin/python -m bench.ingest_large [--runs 1] [--scale 1.0] [--json]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    ProcessError,
    argument_parser,
    clean_env,
    descendants,
    emit,
    filesystem,
    free_port,
    machine,
    median,
    run_all,
    running,
    today,
    venv_script,
    wait_for_port,
)
from bench.ingest import (
    MAX_PDU,
    NODELAY,
    STORESCP_AE,
    TRIAGE_AE,
    Series,
    add_send_options,
    dcmtk_missing,
    indexed_instances,
    storescu_commands,
    triage_env,
)
from bench.multiframe import write_multiframe

MIB = 1 << 20
CASES = ((1, 1024), (4, 256))  # (associations, MiB per object): one object per association
RECEIVE_BUFFER_KB = 1024  # triage's default receive_buffer_kb
SLACK_MIB = 64  # what the peak may exceed idle by, besides the buffers


def resident_bytes(pid: int) -> int:
    """VmRSS of ``pid`` and every process below it (storescp's forks, triage's receivers)."""
    total = 0
    for process in [pid, *descendants(pid)]:
        try:
            status = Path(f"/proc/{process}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
    return total


class PeakSampler:
    """The largest ``resident_bytes`` seen, sampled every 10 ms while the block runs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = resident_bytes(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, resident_bytes(self.pid))

    @contextmanager
    def sampling(self) -> Iterator[PeakSampler]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, resident_bytes(self.pid))


@dataclass(frozen=True)
class Sample:
    receiver: str
    associations: int
    seconds: float
    idle_mib: float
    peak_mib: float

    @property
    def growth_mib(self) -> float:
        return self.peak_mib - self.idle_mib


def _send(
    files: list[Path], pid: int, port: int, called_ae: str, work: Path, timeout: float
) -> tuple[float, float, float]:
    """(seconds, idle MiB, peak MiB) of sending ``files``, one association each."""
    idle = resident_bytes(pid)
    series = Series(files, sum(path.stat().st_size for path in files))
    commands = storescu_commands(series, port=port, called_ae=called_ae, associations=len(files))
    with PeakSampler(pid).sampling() as sampler:
        seconds = run_all(commands, env=clean_env(NODELAY), timeout=timeout, log_dir=work)
    return seconds, idle / MIB, sampler.peak / MIB


def measure_storescp(files: list[Path], warm_up: Path, work: Path, timeout: float) -> Sample:
    received = work / "received"
    received.mkdir(parents=True)
    port = free_port()
    argv = ["storescp", "-aet", STORESCP_AE, "-od", str(received), "--max-pdu", str(MAX_PDU)]
    if len(files) > 1:
        argv.append("--fork")
    with running([*argv, str(port)], env=clean_env(NODELAY), log_path=work / "scp.log") as scp:
        wait_for_port(port, process=scp, timeout=30)
        _send([warm_up], scp.pid, port, STORESCP_AE, work, timeout)
        seconds, idle, peak = _send(files, scp.pid, port, STORESCP_AE, work, timeout)
    held = sum(1 for path in received.iterdir() if path.is_file())
    if held != len(files) + 1:
        raise ProcessError(f"storescp holds {held} files, {len(files) + 1} were sent")
    return Sample("storescp", len(files), seconds, idle, peak)


def measure_triage(
    files: list[Path], warm_up: Path, work: Path, timeout: float, processes: int
) -> Sample:
    dicom_port, http_port = free_port(), free_port()
    env = triage_env(work / "data", dicom_port=dicom_port, http_port=http_port, processes=processes)
    with running([venv_script("triage"), "serve"], env=env, log_path=work / "triage.log") as serve:
        wait_for_port(dicom_port, process=serve, timeout=120)
        _send([warm_up], serve.pid, dicom_port, TRIAGE_AE, work, timeout)
        seconds, idle, peak = _send(files, serve.pid, dicom_port, TRIAGE_AE, work, timeout)
        held = indexed_instances(env)
    if held != len(files) + 1:
        raise ProcessError(f"triage indexed {held} instances, {len(files) + 1} were sent")
    return Sample("triage", len(files), seconds, idle, peak)


def measure(
    root: Path, *, runs: int, scale: float, timeout: float, processes: int, progress: bool
) -> list[dict[str, Any]]:
    warm_up = root / "warm-up.dcm"
    write_multiframe(warm_up, 2 * MIB, seed=99)
    cases = []
    for associations, mib in CASES:
        size = max(1, int(mib * scale))
        objects = root / f"objects-{associations}"
        objects.mkdir()
        files = []
        for index in range(associations):
            path = objects / f"object-{index}.dcm"
            write_multiframe(path, size * MIB, seed=index)
            files.append(path)
        taken: dict[str, list[Sample]] = {"storescp": [], "triage": []}
        for run in range(1, runs + 1):
            for receiver in taken:
                work = root / f"run{run}-{receiver}-{associations}"
                work.mkdir()
                os.sync()
                if receiver == "storescp":
                    sample = measure_storescp(files, warm_up, work, timeout)
                else:
                    sample = measure_triage(files, warm_up, work, timeout, processes)
                shutil.rmtree(work, ignore_errors=True)
                taken[receiver].append(sample)
                if progress:
                    print(
                        f"  run {run}/{runs}: {receiver:<8} {associations} x {size} MiB: "
                        f"{sample.seconds:6.2f} s, peak +{sample.growth_mib:.0f} MiB",
                        file=sys.stderr,
                        flush=True,
                    )
        shutil.rmtree(objects, ignore_errors=True)
        bound = SLACK_MIB + associations * RECEIVE_BUFFER_KB / 1024
        summary: dict[str, Any] = {
            "associations": associations,
            "object_mib": size,
            "total_mib": size * associations,
        }
        for receiver, samples in taken.items():
            summary[receiver] = {
                "seconds": [round(s.seconds, 3) for s in samples],
                "median_seconds": round(median([s.seconds for s in samples]), 3),
                "mb_per_second": round(
                    size * associations * MIB / 1e6 / median([s.seconds for s in samples]), 1
                ),
                "idle_mib": round(median([s.idle_mib for s in samples]), 1),
                "peak_mib": round(max(s.peak_mib for s in samples), 1),
                "growth_mib": round(max(s.growth_mib for s in samples), 1),
            }
        summary["ratio"] = round(
            summary["storescp"]["median_seconds"] / summary["triage"]["median_seconds"], 3
        )
        summary["triage_bound_mib"] = round(bound, 2)
        summary["triage_within_bound"] = summary["triage"]["growth_mib"] <= bound
        cases.append(summary)
    return cases


def print_text(data: dict[str, Any]) -> None:
    print(f"bench/ingest_large  {data['date']}  {data['machine']}")
    print(
        f"objects: 16-bit multiframe, explicit VR little endian; disk: {data['filesystem']}; "
        f"sender: storescu, one object per association; storescp --max-pdu "
        f"{data['storescp_max_pdu']}; triage dicom_processes = {data['triage_dicom_processes']}; "
        f"median of {data['runs']} runs"
    )
    print()
    print(
        f"{'case':<16}{'receiver':<10}{'median s':>10}{'MB/s':>8}{'idle MiB':>10}"
        f"{'peak MiB':>10}{'growth':>8}"
    )
    for case in data["cases"]:
        name = f"{case['associations']} x {case['object_mib']} MiB"
        for receiver in ("storescp", "triage"):
            r = case[receiver]
            print(
                f"{name:<16}{receiver:<10}{r['median_seconds']:>10.2f}{r['mb_per_second']:>8.0f}"
                f"{r['idle_mib']:>10.0f}{r['peak_mib']:>10.0f}{r['growth_mib']:>8.0f}"
            )
        verdict = "within" if case["triage_within_bound"] else "NOT within"
        print(
            f"{'':<16}throughput ratio triage/storescp {case['ratio']:.2f}; triage's peak "
            f"{verdict} idle + {case['triage_bound_mib']:.2f} MiB"
        )
    print()
    print(f"note: {data['note']}")


NOTE = (
    "resident memory: VmRSS summed over the receiver's processes, sampled every 10 ms; idle "
    "is taken after a 2 MiB warm-up object. storescp (no --bit-preserving) reads each data "
    "set whole into memory before it writes the file; triage streams it to the spool through "
    "a fixed buffer (receive_buffer_kb, 1 MiB) and fsyncs it before Success."
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argument_parser("bench.ingest_large", __doc__)
    parser.add_argument("--runs", type=int, default=1, help="runs per case (1)")
    parser.add_argument(
        "--scale", type=float, default=1.0, help="object sizes times this (1.0: 1 GiB, 256 MiB)"
    )
    add_send_options(parser, send_timeout=600.0)
    args = parser.parse_args(argv)
    if args.runs < 1 or args.scale <= 0 or args.dicom_processes < 1:
        parser.error("--runs and --dicom-processes at least 1, --scale above 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if dcmtk_missing("bench/ingest_large"):
        return 2
    root = Path(tempfile.mkdtemp(prefix="bench-large-", dir=args.workdir))
    try:
        cases = measure(
            root,
            runs=args.runs,
            scale=args.scale,
            timeout=args.send_timeout,
            processes=args.dicom_processes,
            progress=not args.json,
        )
        data = {
            "benchmark": "bench/ingest_large",
            "date": today(),
            "machine": machine(),
            "filesystem": filesystem(root),
            "runs": args.runs,
            "storescp_max_pdu": MAX_PDU,
            "triage_dicom_processes": args.dicom_processes,
            "cases": cases,
            "note": NOTE,
        }
    except (ProcessError, subprocess.SubprocessError, OSError) as exc:
        print(f"bench/ingest_large failed: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return emit(data, as_json=args.json, text=print_text)


if __name__ == "__main__":
    sys.exit(main())
