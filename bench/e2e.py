"""bench/e2e: time to triage on the real system, from the last image acknowledged to the study
critical on the worklist, the webhook received and the SEG and SR stored in the PACS.

One run starts Orthanc (the PACS that receives the results, by C-STORE), a webhook listener in
this process, and ``triage serve`` on the embedded default (SQLite, its own worker processes,
the bundled reference model) with ``association_grace_seconds`` set to ``--grace``. For each
size (``--sizes``, slices of 512x512 head CT; the reference phantom with a lesion, resliced to
that many slices) it sends ``--runs`` studies one at a time with DCMTK's ``storescu`` and then
one burst of ``--burst`` studies sent together (one storescu each). From the moment a study's
storescu has its last image acknowledged (it exits after the release) it times:

- (a) critical: ``GET /api/studies/{uid}`` (polled every 50 ms) shows the worklist tier critical;
- (b) webhook: the critical-finding webhook reaches the listener;
- (c) results: Orthanc's QIDO-RS lists the study's SEG and SR series (polled every 100 ms).

Beside each figure it prints the floor measured in the same run, before triage starts: the
grace period plus the model's own run (``model.run(volume)``: preprocess, forward pass,
post-process) on the same volume, called directly in this process, warm, median of three. The
stage breakdown comes from triage's database afterwards: completion wait (last image received
to study complete), queue wait (job queued to started), the job's own timings, and delivery
(results recorded to delivered). It never asserts a speed.

    .venv/bin/python -m bench.e2e [--sizes 32,300] [--runs 5] [--burst 10] [--grace 1]
                                  [--workers 1] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import torch
from sqlalchemy import select

from bench.common import (
    LOOPBACK,
    ORTHANC_AE,
    ProcessError,
    Server,
    argument_parser,
    clean_env,
    emit,
    free_port,
    machine,
    median,
    orthanc_server,
    percentile,
    running,
    today,
    venv_script,
    wait_for_port,
    wait_warm,
)
from bench.inference import load_model, pick_seed
from bench.ingest import dcmtk_missing
from triage.db.models import Delivery, Instance, Job, ResultObject, Series, Study
from triage.db.session import create_db_engine, make_session_factory, session_scope
from workers.models.reference.phantom import generate_phantom, write_dicom_series
from workers.volume import load_volume

MATRIX = 512
MODEL_RUNS = 3
SEG_MODALITY, SR_MODALITY = "SEG", "SR"
STAGES = ("completion_wait", "queue_wait", "load_decode", "preprocess", "model", "postprocess")
AFTER = ("results", "delivery")


@dataclass
class Sent:
    """One study on its way: when storescu finished, and when each milestone was seen."""

    study_uid: str
    size: int
    mode: str  # "single" or "burst"
    acknowledged: float  # time.time() when storescu exited after its last image
    seen: dict[str, float] = field(default_factory=dict)  # critical, webhook, results


class Webhooks:
    """An HTTP listener on loopback that notes when each study's first webhook arrived."""

    def __init__(self) -> None:
        self.arrived: dict[str, float] = {}
        self._lock = threading.Lock()
        arrived, lock = self.arrived, self._lock

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                when = time.time()
                with lock:
                    arrived.setdefault(str(json.loads(body)["study_uid"]), when)
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.url = f"http://{LOOPBACK}:{self.server.server_address[1]}/hook"

    @contextlib.contextmanager
    def serving(self) -> Iterator[Webhooks]:
        thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.server.shutdown()
            self.server.server_close()


class Watcher:
    """Polls triage's API and Orthanc's QIDO-RS for every study not yet seen at each milestone."""

    def __init__(self, api: str, token: str, pacs: Server, webhooks: Webhooks) -> None:
        self.api, self.pacs, self.webhooks = api, pacs, webhooks
        self.headers = {"Authorization": f"Bearer {token}"}
        self.studies: list[Sent] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def add(self, sent: Sent) -> None:
        with self._lock:
            self.studies.append(sent)

    def _pending(self, milestone: str) -> list[Sent]:
        with self._lock:
            return [sent for sent in self.studies if milestone not in sent.seen]

    def _critical(self) -> None:
        with httpx.Client(headers=self.headers, timeout=30) as client:
            while not self._stop.wait(0.05):
                for sent in self._pending("critical"):
                    record = client.get(f"{self.api}/api/studies/{sent.study_uid}")
                    worklist = record.json().get("worklist") if record.status_code == 200 else None
                    if worklist and worklist["tier"] == "critical":
                        sent.seen.setdefault("critical", time.time())
                for sent in self._pending("webhook"):
                    if (when := self.webhooks.arrived.get(sent.study_uid)) is not None:
                        sent.seen["webhook"] = when

    def _results(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self._stop.wait(0.1):
                for sent in self._pending("results"):
                    found = client.get(f"{self.pacs.base}/studies/{sent.study_uid}/series")
                    if found.status_code != 200:
                        continue
                    modalities = {row["00080060"]["Value"][0] for row in found.json()}
                    if {SEG_MODALITY, SR_MODALITY} <= modalities:
                        sent.seen.setdefault("results", time.time())

    def wait(self, studies: Sequence[Sent], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        wanted = ("critical", "webhook", "results")
        while not all(all(m in s.seen for m in wanted) for s in studies):
            if time.monotonic() > deadline:
                missing = [s.study_uid for s in studies if not all(m in s.seen for m in wanted)]
                raise ProcessError(f"{len(missing)} studies not triaged in {timeout:.0f} s")
            time.sleep(0.1)

    @contextlib.contextmanager
    def watching(self) -> Iterator[Watcher]:
        threads = [threading.Thread(target=t, daemon=True) for t in (self._critical, self._results)]
        for thread in threads:
            thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            for thread in threads:
                thread.join(30)


def write_study(work: Path, size: int, index: int) -> tuple[str, list[Path]]:
    """A lesion phantom resliced to ``size`` slices, with its own study and series UIDs."""
    phantom = generate_phantom(pick_seed(), lesion=True, matrix=MATRIX, slices=size)
    study_uid = f"1.2.826.0.1.3680043.10.1299.{os.getpid()}.{size}.{index}.1"
    series_uid = f"{study_uid}.1"
    directory = work / f"study-{size}-{index}"
    paths = write_dicom_series(phantom, directory, study_uid=study_uid, series_uid=series_uid)
    return study_uid, paths


def model_floor(work: Path, size: int) -> dict[str, float]:
    """The model's own run on this size's volume, in this process, warm: median seconds."""
    model, _ = load_model(work / "floor-data")
    _, paths = write_study(work / "floor", size, 0)
    volume = load_volume(paths)
    model.warm_up()
    runs = []
    for _ in range(MODEL_RUNS):
        started = time.perf_counter()
        output = model.run(volume)
        runs.append(time.perf_counter() - started)
    if not output.positive:
        raise ProcessError(f"the reference model missed the lesion of the {size}-slice phantom")
    shutil.rmtree(work / "floor")
    return {"model_run": median(runs), "model_run_min": min(runs)}


def send(port: int, paths: Sequence[Path]) -> float:
    """storescu every file on one association; the time it exited (after the release)."""
    result = subprocess.run(
        ["storescu", "-aec", "TRIAGE", "-aet", "MODALITY", LOOPBACK, str(port), *map(str, paths)],
        env={**os.environ, "TCP_NODELAY": "1"},
        capture_output=True,
        timeout=600,
        check=False,
    )
    done = time.time()
    if result.returncode != 0:
        raise ProcessError(f"storescu failed: {result.stderr.decode(errors='replace')[-300:]}")
    return done


def send_burst(
    port: int, watcher: Watcher, studies: Sequence[tuple[str, list[Path]]], size: int
) -> list[Sent]:
    """Every study at once, one storescu each; each watched from its own acknowledgement."""
    sent: list[Sent] = []
    errors: list[Exception] = []

    def one(study_uid: str, paths: list[Path]) -> None:
        try:
            item = Sent(study_uid, size, "burst", send(port, paths))
        except Exception as exc:
            errors.append(exc)
            return
        sent.append(item)
        watcher.add(item)

    threads = [threading.Thread(target=one, args=study) for study in studies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise ProcessError(f"{len(errors)} of the burst's sends failed: {errors[0]}")
    return sent


@contextlib.contextmanager
def triage_serve(work: Path, args: argparse.Namespace, pacs: Server, hook: str) -> Iterator[Any]:
    data_dir, http_port, dicom_port = work / "triage", free_port(), free_port()
    env = clean_env(
        {
            "TRIAGE_DATA_DIR": str(data_dir),
            "TRIAGE_DICOM_HOST": LOOPBACK,
            "TRIAGE_DICOM_PORT": str(dicom_port),
            "TRIAGE_HTTP_PORT": str(http_port),
            "TRIAGE_SPOOL_MIN_FREE_MB": "1",
            "TRIAGE_ASSOCIATION_GRACE_SECONDS": str(args.grace),
            "TRIAGE_DESTINATIONS": json.dumps([f"{ORTHANC_AE}@{LOOPBACK}:{pacs.dicom_port}"]),
            "TRIAGE_WEBHOOK_URL": hook,
        }
    )
    argv = [venv_script("triage"), "serve", "--workers", str(args.workers)]
    with running(argv, env=env, log_path=work / "triage.log") as process:
        wait_for_port(http_port, process=process, timeout=180)
        wait_for_port(dicom_port, process=process, timeout=60)
        token = subprocess.run(
            [venv_script("triage-admin"), "tokens", "create", "bench", "--role", "radiologist"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout.strip()
        wait_warm(data_dir, args.workers)
        yield f"http://{LOOPBACK}:{http_port}", token, dicom_port, data_dir


def breakdown(data_dir: Path, studies: Sequence[Sent]) -> dict[str, dict[str, float]]:
    """Seconds per stage per study, from triage's own database."""
    engine = create_db_engine(f"sqlite:///{data_dir / 'triage.sqlite'}")
    stages: dict[str, dict[str, float]] = {}
    try:
        with session_scope(make_session_factory(engine)) as session:
            for sent in studies:
                where = Study.study_uid == sent.study_uid
                study = session.scalars(select(Study).where(where)).one()
                last_received = session.scalar(
                    select(Instance.received_at)
                    .join(Series, Instance.series_id == Series.id)
                    .where(Series.study_id == study.id)
                    .order_by(Instance.received_at.desc())
                    .limit(1)
                )
                job = session.scalars(select(Job).where(Job.study_id == study.id)).one()
                recorded = session.scalar(
                    select(ResultObject.created_at).where(ResultObject.job_id == job.id).limit(1)
                )
                delivered = session.scalar(
                    select(Delivery.delivered_at)
                    .join(ResultObject, Delivery.result_id == ResultObject.id)
                    .where(ResultObject.job_id == job.id)
                    .order_by(Delivery.delivered_at.desc())
                    .limit(1)
                )

                def span(start: datetime | None, end: datetime | None) -> float:
                    return (end - start).total_seconds() if start and end else float("nan")

                stages[sent.study_uid] = {
                    "completion_wait": span(last_received, study.completed_at),
                    "queue_wait": span(job.queued_at, job.started_at),
                    **{k: job.timings.get(k, float("nan")) for k in STAGES[2:]},
                    "results": job.timings.get("results", float("nan")),
                    "delivery": span(recorded, delivered),
                }
    finally:
        engine.dispose()
    return stages


def summarize(
    studies: Sequence[Sent], stages: dict[str, dict[str, float]], floor: float
) -> dict[str, Any]:
    def figures(values: list[float]) -> dict[str, float]:
        return {
            "p50": round(median(values), 3),
            "p95": round(percentile(values, 0.95), 3),
            "max": round(max(values), 3),
        }

    rows: dict[str, Any] = {"studies": len(studies), "floor_s": round(floor, 3)}
    for milestone in ("critical", "webhook", "results"):
        rows[milestone] = figures([s.seen[milestone] - s.acknowledged for s in studies])
    rows["results_after_critical"] = figures(
        [s.seen["results"] - s.seen["critical"] for s in studies]
    )
    rows["stages_p50"] = {
        stage: round(median([stages[s.study_uid][stage] for s in studies]), 3)
        for stage in (*STAGES, *AFTER)
    }
    return rows


def run(args: argparse.Namespace, work: Path, progress: bool) -> dict[str, Any]:
    floors = {}
    for size in args.sizes:
        if progress:
            print(f"floor: the model on {size} slices ...", file=sys.stderr, flush=True)
        floors[size] = model_floor(work, size)
    sent: list[Sent] = []
    webhooks = Webhooks()
    with (
        orthanc_server(work) as pacs,
        webhooks.serving(),
        triage_serve(work, args, pacs, webhooks.url) as (api, token, port, data_dir),
        Watcher(api, token, pacs, webhooks).watching() as watcher,
    ):
        for size in args.sizes:
            timeout = 120 + 30 * args.burst * size / 32
            for index in range(args.runs):
                study_uid, paths = write_study(work, size, index + 1)
                one = Sent(study_uid, size, "single", send(port, paths))
                watcher.add(one)
                watcher.wait([one], timeout)
                shutil.rmtree(paths[0].parent)
                if progress:
                    took = one.seen["critical"] - one.acknowledged
                    print(f"  {size} slices, study {index + 1}: critical after {took:.2f} s",
                          file=sys.stderr, flush=True)  # fmt: skip
            burst = [write_study(work, size, 1000 + index) for index in range(args.burst)]
            burst_sent = send_burst(port, watcher, burst, size)
            watcher.wait(burst_sent, timeout)
            for _, paths in burst:
                shutil.rmtree(paths[0].parent)
            if progress:
                print(f"  {size} slices, burst of {args.burst} done", file=sys.stderr, flush=True)
            sent += [s for s in watcher.studies if s.size == size]
    stages = breakdown(data_dir, sent)
    results = []
    for size in args.sizes:
        for mode in ("single", "burst"):
            chosen = [s for s in sent if s.size == size and s.mode == mode]
            if chosen:
                floor = args.grace + floors[size]["model_run"]
                results.append({"slices": size, "mode": mode, **summarize(chosen, stages, floor)})
    return {
        "benchmark": "bench/e2e",
        "date": today(),
        "machine": machine(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "grace_s": args.grace,
        "workers": args.workers,
        "model_run_s": {str(size): floors[size] for size in args.sizes},
        "results": results,
        "samples": [
            {
                "study_uid": s.study_uid,
                "slices": s.size,
                "mode": s.mode,
                **{k: round(v - s.acknowledged, 3) for k, v in s.seen.items()},
                "stages": {k: round(v, 4) for k, v in stages[s.study_uid].items()},
            }
            for s in sent
        ],
    }


def print_text(data: dict[str, Any]) -> None:
    print(f"bench/e2e  {data['date']}  {data['machine']}")
    print(
        f"torch {data['torch']} ({data['torch_threads']} threads), grace {data['grace_s']} s, "
        f"{data['workers']} worker process(es); seconds from the last image acknowledged"
    )
    header = f"{'':<22}{'p50':>8}{'p95':>8}{'max':>8}{'floor':>8}{'p95-floor':>11}"
    for row in data["results"]:
        print(f"\n{row['slices']} slices, {row['mode']} ({row['studies']} studies)")
        print(header)
        for milestone, label in (
            ("critical", "(a) critical"),
            ("webhook", "(b) webhook"),
            ("results", "(c) SEG+SR in PACS"),
        ):
            f = row[milestone]
            print(
                f"{label:<22}{f['p50']:>8.2f}{f['p95']:>8.2f}{f['max']:>8.2f}"
                f"{row['floor_s']:>8.2f}{f['p95'] - row['floor_s']:>11.2f}"
            )
        f = row["results_after_critical"]
        print(f"{'SEG+SR after critical':<22}{f['p50']:>8.2f}{f['p95']:>8.2f}{f['max']:>8.2f}")
        stages = "  ".join(f"{k} {v:.2f}" for k, v in row["stages_p50"].items())
        print(f"stages, p50 s: {stages}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argument_parser("bench.e2e", __doc__)
    parser.add_argument(
        "--sizes",
        type=lambda text: [int(v) for v in text.split(",")],
        default=[32, 300],
        help="slices per study, comma-separated (32,300)",
    )
    parser.add_argument("--runs", type=int, default=5, help="studies sent one at a time (5)")
    parser.add_argument("--burst", type=int, default=10, help="studies sent together (10)")
    parser.add_argument("--grace", type=float, default=1.0, help="association grace, s (1)")
    parser.add_argument("--workers", type=int, default=1, help="triage's worker processes (1)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if dcmtk_missing("bench/e2e"):
        return 1
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as work:
        try:
            data = run(args, Path(work), progress=not args.json)
        except (ProcessError, OSError, subprocess.SubprocessError) as exc:
            print(f"bench/e2e failed: {exc}", file=sys.stderr)
            return 1
    return emit(data, as_json=args.json, text=print_text)


if __name__ == "__main__":
    sys.exit(main())
