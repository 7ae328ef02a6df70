"""``triage-admin import``: ingest files from a folder or DICOMDIR through the listener's path.

Each file found has one outcome: ``stored``; ``new-version`` (a SOP Instance UID held already,
other content: kept beside the old); ``duplicate`` (the same data set held already: nothing
added); ``rejected`` (not usable DICOM, or not readable: listed with its reason, and recorded as
a ``rejection`` audit event that ``triage-admin status`` counts); ``out-of-resources`` (not
stored for now: the spool is below its free-space reserve or the index is busy).

Exit status: 0 when every file was imported; 1 when a file was rejected (0 with
``--allow-rejects``) or out of resources; 130 when Ctrl-C stopped the import. Ctrl-C stops
after the file in progress (a second one at once); running the same import again resumes, as
the files stored already come back as duplicates.

``--json`` prints one object:

- ``counts``: ``{outcome: number of files}``, every outcome above, zeros included;
- ``rejected``: ``[{"path": str, "reason": str}]``, the rejected files in import order;
- ``files``: the number of files found under PATH (more than the counts' sum if interrupted);
- ``seconds``: how long the import took;
- ``interrupted``: true when Ctrl-C stopped the import before its last file.
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any

import typer
from prometheus_client import CollectorRegistry
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from triage.audit import add_event
from triage.cli.common import (
    ConfigOption,
    JsonOption,
    err_console,
    exit_with_error,
    load_settings,
    open_database,
    warn,
)
from triage.config import Settings
from triage.db.base import utcnow
from triage.db.session import create_db_engine
from triage.domain import IndexOutcome
from triage.errors import DicomInputError, OutOfResourcesError
from triage.health import running_beat

if TYPE_CHECKING:
    from triage.ingest.pipeline import Ingestor

console = Console(highlight=False)

REJECTED = "rejected"
OUT_OF_RESOURCES = "out-of-resources"
OUTCOMES = (*(str(outcome) for outcome in IndexOutcome), REJECTED, OUT_OF_RESOURCES)
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C
ACTOR = "triage-admin import"

HELP = (
    "Ingest files through the same path as the DICOM listener (for back-loading, or testing "
    "without a PACS). A running `triage serve` sees the studies complete as usual.\n\n"
    "Each rejected file is listed with its reason and recorded for `triage-admin status`. "
    "Exit status: 0 done; 1 a file rejected (0 with --allow-rejects) or out of resources; "
    "130 interrupted. Ctrl-C stops after the file in progress: run the same import again to "
    "resume (the files stored already come back as duplicates).\n\n"
    "--json prints counts (files per outcome: stored, new-version, duplicate, rejected, "
    "out-of-resources), rejected (a list of path and reason), files (found), seconds and "
    "interrupted."
)

AllowRejectsOption = Annotated[
    bool,
    typer.Option(
        "--allow-rejects",
        help="Exit 0 even when files were rejected (they are still listed and recorded).",
    ),
]


@dataclass(frozen=True)
class Rejected:
    """A file that will not import as it is: ``reason`` for the administrator, ``code`` (a
    short machine reason, as the listener's) for the audit event."""

    path: Path
    reason: str
    code: str


@dataclass
class ImportRun:
    """What an import did so far."""

    files: int
    counts: Counter[str] = field(default_factory=Counter)
    rejected: list[Rejected] = field(default_factory=list)
    short_of_resources: str | None = None  # the first out-of-resources reason
    seconds: float = 0.0

    @property
    def done(self) -> int:
        return self.counts.total()

    @property
    def interrupted(self) -> bool:
        return self.done < self.files

    def reject(self, path: Path, reason: str, code: str) -> None:
        self.counts[REJECTED] += 1
        self.rejected.append(Rejected(path, reason, code))

    def as_json(self) -> dict[str, Any]:
        return {
            "counts": {outcome: self.counts[outcome] for outcome in OUTCOMES},
            "rejected": [{"path": str(r.path), "reason": r.reason} for r in self.rejected],
            "files": self.files,
            "seconds": round(self.seconds, 3),
            "interrupted": self.interrupted,
        }

    def counts_text(self) -> str:
        shown = [
            f"{outcome} {self.counts[outcome]}" for outcome in OUTCOMES if self.counts[outcome]
        ]
        return ", ".join(shown) or "nothing imported"


class RateColumn(ProgressColumn):
    """Files imported per second."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        shown = "- files/s" if speed is None else f"{speed:.0f} files/s"
        return Text(shown, style="progress.data.speed")


def import_files(
    path: Annotated[
        Path,
        typer.Argument(help="A folder of DICOM files (searched recursively) or a DICOMDIR."),
    ],
    config: ConfigOption = None,
    as_json: JsonOption = False,
    allow_rejects: AllowRejectsOption = False,
) -> None:
    """Ingest the files under ``path``; the command's help is ``HELP``."""
    from triage.ingest.sources import import_sources  # pydicom: not for --help or completion

    settings = load_settings(config)
    files = list(import_sources(path))
    if not files:
        exit_with_error(f"no files found under {path}")
    checked = open_database(settings)  # exists, schema current: one line otherwise
    run = ImportRun(files=len(files))
    try:
        _warn_unless_serving(settings)
        _import_all(settings, files, run, show_progress=not as_json)
    finally:
        _record_rejections(checked, run.rejected)
        checked.dispose()
    if as_json:
        print(json.dumps(run.as_json(), indent=2))
    else:
        _print_text(run)
    _exit(run, allow_rejects=allow_rejects, listed="in the JSON" if as_json else "above")


def _warn_unless_serving(settings: Settings) -> None:
    """Imported studies are analysed by `triage serve`: say when it is not running."""
    if running_beat(settings, utcnow()) is None:
        warn(
            f"triage serve is not running (data directory "
            f"{settings.data_dir}): the imported studies will be analysed when it starts",
        )


def _import_all(
    settings: Settings, files: list[Path], run: ImportRun, *, show_progress: bool
) -> None:
    """Ingest ``files`` in order, counting in ``run``, until the last or Ctrl-C."""
    from triage.ingest.pipeline import Ingestor
    from triage.metrics import IngestMetrics
    from triage.storage.spool import Spool

    engine = create_db_engine(settings.database_url, rebuildable=True)
    ingestor = Ingestor(
        spool=Spool.for_settings(settings),
        engine=engine,
        metrics=IngestMetrics(CollectorRegistry()),
        writers_lock=settings.data_dir / "ingest.lock",  # queue with triage serve's receivers
    )
    progress = Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        disable=not show_progress,
    )
    started = time.monotonic()
    try:
        with progress, _stop_on_interrupt() as stop:
            task = progress.add_task("importing", total=len(files))
            try:
                for file in files:
                    if stop.is_set():
                        break
                    _import_one(ingestor, file, run)
                    progress.advance(task)
                    if run.rejected:
                        progress.update(
                            task, description=f"importing, {len(run.rejected)} rejected"
                        )
            except KeyboardInterrupt:
                pass  # a second Ctrl-C: the file in progress is not counted (a re-run is exact)
    finally:
        run.seconds = time.monotonic() - started
        ingestor.close()
        engine.dispose()


@contextlib.contextmanager
def _stop_on_interrupt() -> Iterator[threading.Event]:
    """Ctrl-C sets the event rather than raise, so that the file in progress is finished and
    counted; a second Ctrl-C raises KeyboardInterrupt."""
    stop = threading.Event()

    def interrupted(_signal: int, _frame: FrameType | None) -> None:
        stop.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = signal.signal(signal.SIGINT, interrupted)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def _import_one(ingestor: Ingestor, file: Path, run: ImportRun) -> None:
    try:
        data = file.read_bytes()
    except OSError as exc:
        run.reject(file, f"cannot read the file: {exc.strerror or exc}", "unreadable")
        return
    try:
        ingested = ingestor.ingest(data, calling_ae=None, source="import")
    except DicomInputError as exc:
        run.reject(file, str(exc), "cannot-understand")
    except OutOfResourcesError as exc:
        run.counts[OUT_OF_RESOURCES] += 1
        run.short_of_resources = run.short_of_resources or str(exc)
    else:
        run.counts[str(ingested.result.outcome)] += 1


def _record_rejections(engine: Engine, rejected: list[Rejected]) -> None:
    """A ``rejection`` audit event per rejected file, in one transaction: ``triage-admin
    status`` counts them by reason. The path and the reason only: no patient data."""
    if not rejected:
        return
    try:
        with engine.begin() as connection:
            for file in rejected:
                add_event(
                    db_session=connection,
                    kind="rejection",
                    actor=ACTOR,
                    reason=file.code,
                    message=file.reason,
                    path=str(file.path.absolute()),
                    protocol="import",
                )
    except SQLAlchemyError as exc:
        warn(
            f"the rejections are not recorded for `triage-admin status`: {type(exc).__name__}",
        )


def _print_text(run: ImportRun) -> None:
    for file in run.rejected:
        console.print(f"rejected {file.path}: {file.reason}", markup=False, soft_wrap=True)
    if run.interrupted:
        console.print(
            f"interrupted after {run.done} of {run.files} files ({run.seconds:.1f} s): "
            f"{run.counts_text()}",
            soft_wrap=True,
        )
    else:
        console.print(f"{run.files} files in {run.seconds:.1f} s: {run.counts_text()}")


def _exit(run: ImportRun, *, allow_rejects: bool, listed: str) -> None:
    """The closing line on stderr and the exit status, where the import did not simply end."""
    if run.interrupted:
        err_console.print(
            f"[yellow]interrupted:[/] {run.done} of {run.files} files done ({run.counts_text()}): "
            "run the same import again to resume, the files stored already come back as "
            "duplicates",
            soft_wrap=True,
        )
        raise typer.Exit(EXIT_INTERRUPTED)
    if run.counts[OUT_OF_RESOURCES]:
        message = (
            f"{run.counts[OUT_OF_RESOURCES]} of {run.files} files not stored, out of resources "
            f"({run.short_of_resources}): make room and run the same import again"
        )
        if run.rejected and not allow_rejects:
            message += f"; {len(run.rejected)} rejected (listed {listed})"
        exit_with_error(message)
    if run.rejected and not allow_rejects:
        rest = "the others imported" if len(run.rejected) < run.files else "none imported"
        exit_with_error(
            f"{len(run.rejected)} of {run.files} files rejected (listed {listed}), {rest}: "
            "pass --allow-rejects to accept rejections with exit status 0"
        )


def register(app: typer.Typer) -> None:
    app.command("import", help=HELP)(import_files)
