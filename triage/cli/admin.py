"""``triage-admin``: see the state of triage and fix what went wrong.

Reads the same configuration as ``triage serve``, so it sees the same database.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from prometheus_client import CollectorRegistry
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from triage.broker import TaskSender
from triage.cli import loop, peers, reading, sources
from triage.cli.common import (
    EXIT_UNHEALTHY,
    ConfigOption,
    JsonOption,
    OneLineErrors,
    add_version_option,
    database_exists,
    database_location,
    err_console,
    exit_with_error,
    load_settings,
    open_database,
)
from triage.db import migrate
from triage.db.session import create_db_engine, make_session_factory, session_scope
from triage.errors import DicomInputError, OutOfResourcesError
from triage.failures import list_failures, requeue
from triage.health import Health, collect_health
from triage.ingest.pipeline import Ingestor
from triage.ingest.reprocess import ReprocessError, reprocess_by_uid
from triage.ingest.sources import import_sources
from triage.metrics import IngestMetrics
from triage.modes import mode_for
from triage.status import StatusReport, collect_status
from triage.storage.spool import Spool

app = OneLineErrors(
    name="triage-admin",
    help=(
        "Administer triage: database, status, studies, peers, sources, models and failures. "
        "Exit status: 0 done, 1 failed, 2 usage or configuration error, 3 (status) unhealthy. "
        "--debug shows the traceback of an unexpected error."
    ),
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


add_version_option(app, "triage-admin")


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
        exit_with_error(f"cannot reach the database {engine.url!r}: {exc.orig}")
    if before == after:
        console.print(f"database already at revision {after}")
    else:
        console.print(f"database upgraded from {before or 'empty'} to {after}")


@app.command("status")
def status(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Whether triage is healthy: `triage serve` (its heartbeat), its DICOM and HTTP listeners,
    the database, the broker, the workers of each queue, and each destination (backlog, last
    success, last error, paused); then counts by state and the latest errors.

    Exit status: 0 healthy; 3 something is down or failing (each such line says what to do);
    1 the database cannot be read; 2 a configuration error."""
    settings = load_settings(config)
    engine = open_database(settings)
    with session_scope(make_session_factory(engine)) as session:
        health = collect_health(session, settings)
        report = collect_status(db_session=session)
    report = dataclasses.replace(report, queue_depth=health.queue_depth)
    if as_json:
        print(json.dumps({**report.as_json(), "health": health.as_json()}, indent=2))
    else:
        _print_health(health)
        _print_status(report)
    if not health.healthy:
        raise typer.Exit(EXIT_UNHEALTHY)


def _print_health(health: Health) -> None:
    marks = {"up": "[green]up[/]", "down": "[bold red]DOWN[/]", "unknown": "[yellow]unknown[/]"}
    verdict = "[green]healthy[/]" if health.healthy else "[bold red]UNHEALTHY[/]"
    console.print(f"triage: {verdict}")
    table = Table(show_header=True, title=None)
    table.add_column("component", no_wrap=True)
    table.add_column("state", no_wrap=True)
    table.add_column("detail", overflow="fold")
    for check in health.checks:
        table.add_row(check.name, marks[check.state], check.detail)
    console.print(table)
    if health.destinations:
        destinations = Table(title="destinations")
        for column in ("destination", "state", "backlog", "failed", "last success", "last error"):
            destinations.add_column(column, no_wrap=column == "destination", overflow="fold")
        for d in health.destinations:
            error = d.last_error or ""
            if d.paused_until:
                error = f"paused until {_local(d.paused_until)}; {error}"
            destinations.add_row(
                d.name,
                marks[d.state],
                str(d.backlog),
                str(d.failed),
                _local(d.last_success_at) if d.last_success_at else "never",
                error,
            )
        console.print(destinations)


def _local(iso: str) -> str:
    """An ISO time in the local zone, to the second."""
    return datetime.fromisoformat(iso).astimezone().strftime("%Y-%m-%d %H:%M:%S")


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
        exit_with_error(f"no files found under {path}")
    open_database(settings).dispose()  # exists, schema current: one line otherwise
    engine = create_db_engine(settings.database_url, rebuildable=True)
    ingestor = Ingestor(
        spool=Spool.for_settings(settings),
        engine=engine,
        metrics=IngestMetrics(CollectorRegistry()),
    )
    outcomes: Counter[str] = Counter()
    with Progress(console=err_console, disable=as_json) as progress:
        task = progress.add_task("importing", total=len(files))
        for file in files:
            outcomes[_import_one(ingestor, file)] += 1
            progress.advance(task)
    ingestor.close()
    engine.dispose()
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


models_app = typer.Typer(help="Detection models.", no_args_is_help=True)
app.add_typer(models_app, name="models")


@models_app.command("list")
def models_list(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Every model found (bundled and in models_dir): version, what it applies to, the device it
    runs on and whether it loads. Loads each model once, as a worker would."""
    settings = load_settings(config)  # one clear line, exit 2, on a bad configuration
    env = dict(os.environ)
    if config is not None:
        env["TRIAGE_CONFIG"] = str(config)
    result = subprocess.run(
        [sys.executable, "-m", "workers.describe"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if result.returncode != 0:
        exit_with_error(f"could not load the models: {result.stderr.strip().splitlines()[-1:]}")
    statuses = json.loads(result.stdout)
    try:
        if not database_exists(settings):
            raise FileNotFoundError(database_location(settings))
        with session_scope(make_session_factory(create_db_engine(settings.database_url))) as s:
            for status in statuses:
                status["mode"] = str(mode_for(s, status["name"], status["version"] or ""))
    except (SQLAlchemyError, FileNotFoundError) as exc:
        err_console.print(
            f"[yellow]warning:[/] modes unknown: cannot read the {database_location(settings)} "
            f"({type(exc).__name__}); run `triage-admin db upgrade`",
            soft_wrap=True,
        )
        for status in statuses:
            status["mode"] = None
    if as_json:
        print(json.dumps(statuses, indent=2))
        return
    table = Table(title="models")
    for column in ("name", "version", "mode", "format", "applies to", "device", "state"):
        table.add_column(column, no_wrap=column in ("name", "version"))
    for status in statuses:
        state = status["state"] if not status["error"] else f"error: {status['error']}"
        table.add_row(
            status["name"],
            status["version"] or "",
            status["mode"] or "?",
            status["format"] or "",
            status["applies_to"],
            status["device"] or "",
            state,
        )
    console.print(table)


@app.command("reprocess")
def reprocess(
    study_uid: Annotated[str, typer.Argument(help="Study Instance UID.")],
    model: Annotated[
        str | None, typer.Option("--model", help="Only this model (default: every routed one).")
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Analyse a study again. Results replace the earlier ones (same DICOM UIDs)."""
    settings = load_settings(config)
    try:
        job_ids = reprocess_by_uid(
            settings=settings,
            session_factory=make_session_factory(open_database(settings)),
            study_uid=study_uid,
            model=model,
            actor="triage-admin",
        )
    except ReprocessError as exc:
        exit_with_error(str(exc))
    sender = TaskSender(settings)
    sent = sum(sender.analyze_study(job_id) for job_id in job_ids)
    sender.close()
    console.print(f"queued {len(job_ids)} job(s) for {study_uid}; {sent} sent to the broker")


failures_app = typer.Typer(help="Failed jobs and deliveries.", no_args_is_help=True)
app.add_typer(failures_app, name="failures")


@failures_app.command("list")
def failures_list(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Jobs and deliveries that failed for good, with the reason."""
    settings = load_settings(config)
    with session_scope(make_session_factory(open_database(settings))) as session:
        failures = list_failures(db_session=session)
    if as_json:
        rows = [
            {**dataclasses.asdict(f), "at": f.at.isoformat() if f.at else None} for f in failures
        ]
        print(json.dumps(rows, indent=2))
        return
    if not failures:
        console.print("no failures")
        return
    table = Table(title="failures")
    for column in ("kind", "id", "study", "what", "attempts", "reason"):
        table.add_column(column)
    for f in failures:
        table.add_row(f.kind, str(f.id), f.study_uid, f.what, str(f.attempts), f.reason)
    console.print(table)


@failures_app.command("retry")
def failures_retry(
    job: Annotated[list[int] | None, typer.Option("--job", help="A failed job id.")] = None,
    delivery: Annotated[
        list[int] | None, typer.Option("--delivery", help="A failed delivery id.")
    ] = None,
    retry_all: Annotated[bool, typer.Option("--all", help="Every failure listed.")] = False,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Queue failed jobs and deliveries again (see `failures list` for their ids)."""
    settings = load_settings(config)
    if not (job or delivery or retry_all):
        exit_with_error("name --job ID, --delivery ID or --all")
    with session_scope(make_session_factory(open_database(settings))) as session:
        if retry_all:
            failures = list_failures(db_session=session)
            job = [f.id for f in failures if f.kind == "job"]
            delivery = [f.id for f in failures if f.kind == "delivery"]
        jobs, deliveries = requeue(
            db_session=session, jobs=job or [], deliveries=delivery or [], actor="triage-admin"
        )
        missing = [f"job {i}" for i in job or [] if i not in jobs] + [
            f"delivery {i}" for i in delivery or [] if i not in deliveries
        ]
        if missing and not retry_all:
            session.rollback()
            exit_with_error(
                f"not failed, or no such id: {', '.join(missing)}; nothing re-queued "
                "(`triage-admin failures list` shows the failed ones)"
            )
    sender = TaskSender(settings)
    for job_id in jobs:
        sender.analyze_study(job_id)
    for delivery_id in deliveries:
        sender.dispatch_result(delivery_id)
    sender.close()
    if as_json:
        print(json.dumps({"jobs": jobs, "deliveries": deliveries}))
        return
    console.print(f"re-queued {len(jobs)} job(s) and {len(deliveries)} delivery(ies)")


reading.register(app)
loop.register(app, models_app)
peers.register(app)
sources.register(app)
