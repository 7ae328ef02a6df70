"""``triage-admin``: see the state of triage and fix what went wrong.

Reads the same configuration as ``triage serve``, so it sees the same database.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path
from typing import Annotated, Any

import typer
from prometheus_client import CollectorRegistry
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError

from triage.broker import broker_url, queue_depths
from triage.cli.common import ConfigOption, JsonOption, err_console, fail, load_settings
from triage.db import migrate
from triage.db.session import create_db_engine, make_session_factory, session_scope
from triage.errors import DicomInputError, OutOfResourcesError
from triage.ingest.pipeline import Ingestor
from triage.ingest.sources import import_sources
from triage.metrics import IngestMetrics
from triage.receiver.spool import Spool
from triage.status import StatusReport, collect_status

app = typer.Typer(
    name="triage-admin",
    help="Administer triage: database, status, studies, peers, models and failures.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
app.add_typer(db_app, name="db")

console = Console(highlight=False)


def _engine(config: Any) -> Engine:
    settings = load_settings(config)
    return create_db_engine(settings.database_url)


@db_app.command("upgrade")
def db_upgrade(config: ConfigOption = None) -> None:
    """Create or upgrade the database schema to this version of triage. Safe to run again."""
    engine = _engine(config)
    try:
        before = migrate.current_revision(engine)
        migrate.upgrade(engine)
        after = migrate.current_revision(engine)
    except OperationalError as exc:
        fail(f"cannot reach the database {engine.url!r}: {exc.orig}")
    if before == after:
        console.print(f"database already at revision {after}")
    else:
        console.print(f"database upgraded from {before or 'empty'} to {after}")


@app.command("status")
def status(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Counts by state (studies, jobs, deliveries), queue depths and the latest errors."""
    settings = load_settings(config)
    engine = create_db_engine(settings.database_url)
    try:
        if not migrate.is_up_to_date(engine):
            fail("the database schema is not current: run `triage-admin db upgrade`")
        with session_scope(make_session_factory(engine)) as session:
            report = collect_status(db_session=session)
    except OperationalError as exc:
        fail(f"cannot reach the database {engine.url!r}: {exc.orig}")
    report = dataclasses.replace(report, queue_depth=queue_depths(broker_url(settings)))
    if as_json:
        print(json.dumps(report.as_json(), indent=2))
    else:
        _print_status(report)


def _print_status(report: StatusReport) -> None:
    table = Table(title="triage status", show_header=True)
    table.add_column("what")
    table.add_column("count", justify="right")
    table.add_row("instances indexed", str(report.instances))
    for title, counts in (
        ("studies", report.studies),
        ("jobs", report.jobs),
        ("deliveries", report.deliveries),
        ("rejections (24 h)", report.rejections_24h),
    ):
        for state, count in sorted(counts.items()) or [("-", 0)]:
            table.add_row(f"{title}: {state}", str(count))
    for queue, depth in report.queue_depth.items():
        table.add_row(f"queue {queue}", "unreachable" if depth is None else str(depth))
    console.print(table)
    if report.last_errors:
        errors = Table(title="latest errors")
        for column in ("when (UTC)", "kind", "study", "reason"):
            errors.add_column(column)
        for line in report.last_errors:
            errors.add_row(
                line.at.strftime("%Y-%m-%d %H:%M:%S"), line.kind, line.study_uid or "", line.reason
            )
        console.print(errors)
    else:
        console.print("no errors recorded")


@app.command("import")
def import_files(
    path: Annotated[
        Path,
        typer.Argument(help="A folder of DICOM files (searched recursively) or a DICOMDIR."),
    ],
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Ingest files through the same path as the DICOM listener (for back-loading, or testing
    without a PACS). A running `triage serve` sees the studies complete as usual."""
    settings = load_settings(config)
    files = list(import_sources(path))
    if not files:
        fail(f"no files found under {path}")
    engine = create_db_engine(settings.database_url)
    if not migrate.is_up_to_date(engine):
        fail("the database schema is not current: run `triage-admin db upgrade`")
    ingestor = Ingestor(
        spool=Spool.for_settings(settings),
        session_factory=make_session_factory(engine),
        metrics=IngestMetrics(CollectorRegistry()),
    )
    outcomes: Counter[str] = Counter()
    with Progress(console=err_console, disable=as_json) as progress:
        task = progress.add_task("importing", total=len(files))
        for file in files:
            outcomes[_import_one(ingestor, file)] += 1
            progress.advance(task)
    if as_json:
        print(json.dumps(dict(outcomes), indent=2, sort_keys=True))
    else:
        for outcome, count in sorted(outcomes.items()):
            console.print(f"{outcome}: {count}")
    if outcomes.get("out-of-resources"):
        raise typer.Exit(1)


def _import_one(ingestor: Ingestor, file: Path) -> str:
    try:
        return str(
            ingestor.ingest(file.read_bytes(), calling_ae=None, source="import").result.outcome
        )
    except DicomInputError:
        return "rejected"
    except OutOfResourcesError:
        return "out-of-resources"
