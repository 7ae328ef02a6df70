"""bench/capacity: a large hospital's peak hour replayed through triage, with 1, 2, 4 and 8 worker
processes, on Redis + PostgreSQL and on the embedded default: does throughput scale with workers?

The replay: ``--ct-studies`` head CTs of ``--ct-images`` slices each (60 x 500 = 30,000 images,
``--matrix`` 256 to keep the bytes modest) and ``--radiographs`` single-image CR studies, at
arrival times drawn once (seeded) over an hour and compressed by ``--compress`` (60: the hour
in a minute), each study sent by DCMTK's ``storescu`` over its own association, at most
``--associations`` at a time. Results go to a DCMTK ``storescp`` as the PACS.

To measure the orchestration rather than this machine's two cores, the CT studies are routed
to a fixed-latency model (``FixedLatencyModel``, a ``python``-format model this module
provides): it holds its worker for ``--latency`` seconds, as a GPU forward pass would, and
returns the finding the phantom was made with (its known truth, written beside the model). The
rest of the job path is triage's own: series choice, loading the volume, storing findings,
re-ranking, the SR, delivery. With ``--reference`` a last row runs the bundled reference model
instead (CPU-bound here: it measures this machine, not the orchestration).

Per row: CT studies triaged per minute (over the busy window, first job queued to last
findings stored), scaling efficiency (throughput / (workers x the one-worker row's)), p50/p95
time to triage (last image received to findings stored), and where the time goes: queue wait,
loading, the model, the SR, the rest of the job (claim, store and re-rank: the database) and
delivery. It never asserts a speed.

    .venv/bin/python -m bench.capacity [--workers 1,2,4,8] [--backends redis-postgres,embedded]
        [--compress 60] [--latency 8] [--ct-studies 60] [--ct-images 500] [--radiographs 120]
        [--associations 4] [--reference] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import redis
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from sqlalchemy import func, select

from bench.common import (
    LOOPBACK,
    ProcessError,
    argument_parser,
    clean_env,
    emit,
    free_port,
    machine,
    median,
    percentile,
    running,
    today,
    venv_script,
    wait_for_port,
    wait_warm,
)
from bench.e2e import send
from bench.ingest import dcmtk_missing
from triage.catalog import CatalogEntry, ModelDescription
from triage.db.models import Delivery, Job, ResultObject, Study
from triage.db.session import create_db_engine, make_session_factory, session_scope
from triage.domain import WorkState
from workers.models.interface import Code, DetectedFinding, ModelOutput
from workers.models.reference.phantom import TEST_SEEDS, generate_phantom, write_dicom_series
from workers.volume import Volume

MODEL = "fixed-latency"
HOUR_S = 3600.0
DISTINCT_PHANTOMS = 4  # CT studies cycle through these (half with a lesion), each with own UIDs
POSTGRES_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
REDIS = "redis://127.0.0.1:6379/13"  # not 15, the tests' database
PACS_AE = "PACS"
CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


# -- the fixed-latency model (imported by the workers through its python-format sidecar) -------


@dataclass
class FixedLatencyModel:
    """Holds the worker for a set time, then reports the phantom's known truth."""

    description: ModelDescription
    device: torch.device
    latency_s: float
    truth: dict[str, dict[str, Any]]  # study UID -> {"positive": bool, "volume_ml": float}

    def warm_up(self) -> None:
        return None  # nothing to compile: the latency is the model

    def run(self, volume: Volume) -> ModelOutput:
        started = time.perf_counter()
        time.sleep(self.latency_s)
        known = self.truth.get(str(volume.datasets[0].StudyInstanceUID), {"positive": False})
        code = Code.from_description(self.description)
        positive = bool(known["positive"])
        findings = [DetectedFinding("score", MODEL, code, 0.95 if positive else 0.05, positive)]
        if positive:
            findings.append(
                DetectedFinding("lesion", "lesion 1", code, 0.95, True, known["volume_ml"])
            )
        return ModelOutput(findings, None, {"model": time.perf_counter() - started})


def load_fixed_latency(entry: CatalogEntry, device: torch.device) -> FixedLatencyModel:
    """The ``python``-format entry point named in the sidecar this bench writes."""
    assert entry.description is not None
    extra = entry.description.model_extra or {}
    truth = json.loads((entry.path.parent / str(extra["truth"])).read_text())
    return FixedLatencyModel(entry.description, device, float(extra["latency_seconds"]), truth)


def write_model(models_dir: Path, latency_s: float, truth: dict[str, dict[str, Any]]) -> None:
    models_dir.mkdir(parents=True, exist_ok=True)
    (models_dir / "truth.json").write_text(json.dumps(truth))
    sidecar = {
        "name": MODEL,
        "version": "1",
        "format": "python",
        "entry": "bench.capacity:load_fixed_latency",
        "latency_seconds": latency_s,
        "truth": "truth.json",
        "description": "Not a model: holds its worker for a set time and reports the "
        "synthetic phantom's known finding (bench/capacity only).",
        "applies_to": {"modalities": ["CT"], "body_parts": ["HEAD"]},
        "series": {"orientation": "axial", "min_slices": 8, "modalities": ["CT"]},
        "operating_point": {"study_probability_threshold": 0.5},
        "finding": {"scheme": "SCT", "code": "50960005", "meaning": "Hemorrhage"},
    }
    (models_dir / f"{MODEL}.json").write_text(json.dumps(sidecar, indent=2))


# -- the replay ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sending:
    uid: str
    kind: str  # "ct" or "cr"
    arrival_s: float  # within the uncompressed hour
    directory: Path


def write_replay(work: Path, args: argparse.Namespace) -> tuple[list[Sending], dict[str, Any]]:
    """Every study of the hour on disk once (reused by every row), in arrival order."""
    rng = np.random.default_rng(20261205)
    studies: list[Sending] = []
    truth: dict[str, dict[str, Any]] = {}
    phantoms = [
        generate_phantom(seed, lesion=index % 2 == 0, matrix=args.matrix, slices=args.ct_images)
        for index, seed in enumerate(TEST_SEEDS[:DISTINCT_PHANTOMS])
    ]
    for index in range(args.ct_studies):
        phantom = phantoms[index % len(phantoms)]
        uid = f"2.25.{uuid.uuid4().int}"
        directory = work / "replay" / f"ct-{index:03d}"
        write_dicom_series(phantom, directory, study_uid=uid, series_uid=f"2.25.{uuid.uuid4().int}")
        positive = bool(phantom.lesions)
        truth[uid] = {
            "positive": positive,
            "volume_ml": round(sum(lesion.volume_ml for lesion in phantom.lesions), 2),
        }
        studies.append(Sending(uid, "ct", float(rng.uniform(0, HOUR_S)), directory))
    for index in range(args.radiographs):
        directory = work / "replay" / f"cr-{index:03d}"
        uid = write_radiograph(directory, rng)
        studies.append(Sending(uid, "cr", float(rng.uniform(0, HOUR_S)), directory))
    studies.sort(key=lambda study: study.arrival_s)
    return studies, truth


def write_radiograph(directory: Path, rng: np.random.Generator, size: int = 1024) -> str:
    """One chest radiograph (CR, 12-bit noise), a study of its own."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(CR_STORAGE)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = UID(CR_STORAGE)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID = "CAPACITY^BENCH", f"CB{rng.integers(10**6):06d}"
    ds.Modality, ds.BodyPartExamined = "CR", "CHEST"
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.ImagerPixelSpacing = [0.2, 0.2]
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "20261205", "080000", ""
    ds.ReferringPhysicianName, ds.StudyID = "", "1"
    ds.PixelData = rng.integers(0, 4096, (size, size), dtype=np.uint16).tobytes()
    directory.mkdir(parents=True, exist_ok=True)
    ds.save_as(directory / "cr.dcm", enforce_file_format=True)
    return str(ds.StudyInstanceUID)


def replay(studies: Sequence[Sending], port: int, args: argparse.Namespace) -> dict[str, float]:
    """Send every study at its compressed arrival time, ``--associations`` at most at once;
    returns how late the senders started, at worst, behind the schedule (s)."""
    start = time.monotonic() + 1.0
    pending = list(studies)
    lock = threading.Lock()
    late: list[float] = []
    errors: list[str] = []

    def sender() -> None:
        while True:
            with lock:
                if not pending:
                    return
                study = pending.pop(0)
            due = start + study.arrival_s / args.compress
            time.sleep(max(0.0, due - time.monotonic()))
            late.append(max(0.0, time.monotonic() - due))
            try:
                send(port, sorted(study.directory.iterdir()))
            except ProcessError as exc:
                errors.append(str(exc))

    threads = [threading.Thread(target=sender) for _ in range(args.associations)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise ProcessError(f"{len(errors)} studies failed to send: {errors[0]}")
    return {"p50": round(median(late), 2), "max": round(max(late), 2)}


# -- one row: a back end, a worker count, a model -----------------------------------------------


@dataclass(frozen=True)
class Row:
    backend: str  # "redis-postgres" or "embedded"
    workers: int
    model: str  # MODEL or the reference model's name


@contextlib.contextmanager
def backend(row: Row, work: Path) -> Iterator[dict[str, str]]:
    """A fresh database (and broker) for one row: its TRIAGE_* variables."""
    if row.backend == "embedded":
        yield {}
        return
    name = f"bench_capacity_{uuid.uuid4().hex[:8]}"
    admin = POSTGRES_ADMIN.replace("+psycopg", "")
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {name}")
    redis.Redis.from_url(REDIS).flushdb()
    try:
        yield {
            "TRIAGE_DATABASE_URL": POSTGRES_ADMIN.rsplit("/", 1)[0] + f"/{name}",
            "TRIAGE_BROKER_URL": REDIS,
        }
    finally:
        with psycopg.connect(admin, autocommit=True) as connection:
            connection.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        redis.Redis.from_url(REDIS).flushdb()


def run_row(
    row: Row, studies: Sequence[Sending], work: Path, args: argparse.Namespace, progress: bool
) -> dict[str, Any]:
    data_dir = work / f"row-{row.backend}-{row.workers}-{row.model}"
    http_port, dicom_port, pacs_port = free_port(), free_port(), free_port()
    rules = [{"name": "ct", "models": [row.model], "modalities": ["CT"]}]
    with contextlib.ExitStack() as stack:
        extra = stack.enter_context(backend(row, work))
        env = clean_env(
            {
                "TRIAGE_DATA_DIR": str(data_dir),
                "TRIAGE_MODELS_DIR": str(work / "models"),
                "TRIAGE_DICOM_HOST": LOOPBACK,
                "TRIAGE_DICOM_PORT": str(dicom_port),
                "TRIAGE_HTTP_PORT": str(http_port),
                "TRIAGE_SPOOL_MIN_FREE_MB": "1",
                "TRIAGE_LOG_LEVEL": "INFO",
                "TRIAGE_ASSOCIATION_GRACE_SECONDS": "1",
                "TRIAGE_ROUTING_RULES": json.dumps(rules),
                "TRIAGE_DESTINATIONS": json.dumps([f"{PACS_AE}@{LOOPBACK}:{pacs_port}"]),
                "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
                **extra,
            }
        )
        received = data_dir / "pacs"
        received.mkdir(parents=True)
        pacs = ["storescp", "--fork", "-aet", PACS_AE, "-od", str(received), str(pacs_port)]
        stack.enter_context(running(pacs, log_path=work / "storescp.log"))
        local = row.workers if row.backend == "embedded" else 0
        serve = [venv_script("triage"), "serve", "--workers", str(local)]
        process = stack.enter_context(running(serve, env=env, log_path=data_dir / "serve.log"))
        wait_for_port(http_port, process=process, timeout=180)
        wait_for_port(dicom_port, process=process, timeout=60)
        if row.backend != "embedded":
            worker = [venv_script("triage"), "worker", "--concurrency", str(row.workers)]
            stack.enter_context(running(worker, env=env, log_path=data_dir / "worker.log"))
        log = data_dir / "worker.log" if row.backend != "embedded" else None
        wait_warm(data_dir, row.workers, log=log)
        if progress:
            print(f"  {row.backend}, {row.workers} workers, {row.model}: replaying ...",
                  file=sys.stderr, flush=True)  # fmt: skip
        lag = replay(studies, dicom_port, args)
        cts = sum(study.kind == "ct" for study in studies)
        database = extra.get("TRIAGE_DATABASE_URL", f"sqlite:///{data_dir / 'triage.sqlite'}")
        figures = wait_and_measure(database, cts, timeout=args.timeout)
    return {
        "backend": row.backend,
        "workers": row.workers,
        "model": row.model,
        "send_lag_s": lag,
        **figures,
    }


def wait_and_measure(database: str, cts: int, *, timeout: float) -> dict[str, Any]:
    """Wait until every CT study's job is done and its results delivered; then the figures."""
    engine = create_db_engine(database)
    factory = make_session_factory(engine)
    deadline = time.monotonic() + timeout
    try:
        while True:
            with session_scope(factory) as session:
                done = session.scalar(
                    select(func.count(Job.id)).where(
                        Job.state.in_([WorkState.DONE, WorkState.FAILED]),
                        Job.results_pending.is_(False),
                    )
                )
                owed = session.scalar(
                    select(func.count(Delivery.id)).where(
                        Delivery.state.in_([WorkState.QUEUED, WorkState.RUNNING])
                    )
                )
            if done == cts and owed == 0:
                break
            if time.monotonic() > deadline:
                raise ProcessError(f"{done} of {cts} CT jobs done after {timeout:.0f} s")
            time.sleep(0.5)
        return measure(factory)
    finally:
        engine.dispose()


def measure(factory: Any) -> dict[str, Any]:
    with session_scope(factory) as session:
        rows = session.execute(select(Job, Study.last_received_at).join(Study)).all()
        delivered = dict(
            session.execute(
                select(ResultObject.job_id, func.max(Delivery.delivered_at))
                .join(Delivery, Delivery.result_id == ResultObject.id)
                .group_by(ResultObject.job_id)
            ).all()
        )
        failed = sum(job.state == WorkState.FAILED for job, _ in rows)
        jobs = [(job, last) for job, last in rows if job.state == WorkState.DONE]

        def seconds(start: datetime | None, end: datetime | None) -> float:
            return (end - start).total_seconds() if start and end else float("nan")

        first_queued = min(job.queued_at for job, _ in jobs)
        last_done = max(job.finished_at for job, _ in jobs if job.finished_at)
        window = seconds(first_queued, last_done)
        to_triage = [seconds(last, job.finished_at) for job, last in jobs]
        queue = [seconds(job.queued_at, job.started_at) for job, _ in jobs]
        run = [seconds(job.started_at, job.finished_at) for job, _ in jobs]
        staged = {
            stage: [float(job.timings.get(stage, 0.0)) for job, _ in jobs]
            for stage in ("load_decode", "preprocess", "model", "postprocess", "results")
        }
        own = ("load_decode", "preprocess", "model", "postprocess")
        other = [total - sum(staged[s][i] for s in own) for i, total in enumerate(run)]
        delivery = [
            seconds(job.finished_at, delivered.get(job.id)) - float(job.timings.get("results", 0))
            for job, _ in jobs
        ]
    return {
        "ct_jobs": len(jobs),
        "failed": failed,
        "window_s": round(window, 2),
        "studies_per_min": round(60 * len(jobs) / window, 2),
        "time_to_triage_s": {
            "p50": round(median(to_triage), 2),
            "p95": round(percentile(to_triage, 0.95), 2),
        },
        "where_p50_s": {
            "queue_wait": round(median(queue), 3),
            "load_decode": round(median(staged["load_decode"]), 3),
            "model": round(median(staged["model"]), 3),
            "pre_post": round(
                median(
                    [
                        a + b
                        for a, b in zip(staged["preprocess"], staged["postprocess"], strict=True)
                    ]
                ),
                3,
            ),
            "claim_store_rank": round(median(other), 3),
            "results": round(median(staged["results"]), 3),
            "delivery": round(median(delivery), 3),
        },
        "queue_wait_p95_s": round(percentile(queue, 0.95), 2),
    }


# -- report -------------------------------------------------------------------------------------


def efficiencies(rows: list[dict[str, Any]]) -> None:
    """Throughput over (workers x the same back end's one-worker throughput), in place."""
    for row in rows:
        same = (row["backend"], row["model"], 1)
        base = next((r for r in rows if (r["backend"], r["model"], r["workers"]) == same), None)
        row["efficiency"] = (
            round(row["studies_per_min"] / (row["workers"] * base["studies_per_min"]), 2)
            if base
            else None
        )


def print_text(data: dict[str, Any]) -> None:
    print(f"bench/capacity  {data['date']}  {data['machine']}")
    replay_info = data["replay"]
    print(
        f"replay: {replay_info['ct_studies']} CT studies x {replay_info['ct_images']} images "
        f"({replay_info['matrix']}x{replay_info['matrix']}) + {replay_info['radiographs']} "
        f"radiographs = {replay_info['images']} images; the hour compressed {data['compress']}x "
        f"({3600 / data['compress']:.0f} s), {data['associations']} associations at most; "
        f"fixed latency {data['latency_s']} s"
    )
    print(
        f"\n{'back end':<16}{'workers':>8}{'model':>22}{'CT/min':>9}{'eff.':>6}"
        f"{'p50 s':>8}{'p95 s':>8}{'queue p50':>11}{'load':>7}{'model':>7}{'db':>7}"
        f"{'SR':>7}{'deliv.':>8}{'lag max':>9}"
    )
    for row in data["rows"]:
        where = row["where_p50_s"]
        efficiency = f"{row['efficiency']:.2f}" if row["efficiency"] is not None else "-"
        print(
            f"{row['backend']:<16}{row['workers']:>8}{row['model']:>22}"
            f"{row['studies_per_min']:>9.1f}{efficiency:>6}"
            f"{row['time_to_triage_s']['p50']:>8.1f}{row['time_to_triage_s']['p95']:>8.1f}"
            f"{where['queue_wait']:>11.2f}{where['load_decode']:>7.2f}{where['model']:>7.2f}"
            f"{where['claim_store_rank']:>7.2f}{where['results']:>7.2f}{where['delivery']:>8.2f}"
            f"{row['send_lag_s']['max']:>9.1f}"
        )
    print(
        "\nCT/min over the busy window (first job queued to last findings stored); eff. = "
        "CT/min / (workers x the one-worker row's); p50/p95: last image received to findings "
        "stored; db = job run minus load, model and its pre/post-processing (claim, store, "
        "re-rank); lag max: how far the senders fell behind the schedule."
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    def numbers(text: str) -> list[int]:
        return [int(value) for value in text.split(",")]

    parser = argument_parser("bench.capacity", __doc__)
    parser.add_argument("--workers", type=numbers, default=[1, 2, 4, 8], help="1,2,4,8")
    parser.add_argument(
        "--backends",
        type=lambda text: text.split(","),
        default=["redis-postgres", "embedded"],
        help="redis-postgres,embedded",
    )
    parser.add_argument("--compress", type=float, default=60.0, help="hour / replay time (60)")
    parser.add_argument("--latency", type=float, default=8.0, help="fixed model latency, s (8)")
    parser.add_argument("--ct-studies", type=int, default=60, help="CT studies in the hour (60)")
    parser.add_argument("--ct-images", type=int, default=500, help="slices per CT study (500)")
    parser.add_argument("--matrix", type=int, default=256, help="CT matrix (256)")
    parser.add_argument("--radiographs", type=int, default=120, help="CR studies (120)")
    parser.add_argument("--associations", type=int, default=4, help="senders at once (4)")
    parser.add_argument(
        "--reference",
        action="store_true",
        help="add a row with the reference model (embedded, 2 workers)",
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="per row, s (1800)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if dcmtk_missing("bench/capacity"):
        return 1
    progress = not args.json
    with tempfile.TemporaryDirectory(prefix="bench-capacity-") as temporary:
        work = Path(temporary)
        try:
            if progress:
                print("writing the replay ...", file=sys.stderr, flush=True)
            studies, truth = write_replay(work, args)
            write_model(work / "models", args.latency, truth)
            plan = [Row(b, n, MODEL) for b in args.backends for n in args.workers]
            if args.reference:
                plan.append(Row("embedded", 2, "ct-head-hyperdensity"))
            rows = [run_row(row, studies, work, args, progress) for row in plan]
        except (ProcessError, OSError, subprocess.SubprocessError, psycopg.Error) as exc:
            print(f"bench/capacity failed: {exc}", file=sys.stderr)
            return 1
    efficiencies(rows)
    images = args.ct_studies * args.ct_images + args.radiographs
    data = {
        "benchmark": "bench/capacity",
        "date": today(),
        "machine": machine(),
        "compress": args.compress,
        "latency_s": args.latency,
        "associations": args.associations,
        "replay": {
            "ct_studies": args.ct_studies,
            "ct_images": args.ct_images,
            "matrix": args.matrix,
            "radiographs": args.radiographs,
            "images": images,
        },
        "rows": rows,
    }
    return emit(data, as_json=args.json, text=print_text)


if __name__ == "__main__":
    sys.exit(main())
