"""``triage-admin``: see the state of triage and fix what went wrong.

Reads the same configuration as ``triage serve``, so it sees the same database.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session

from triage.broker import DISPATCH_QUEUE, INFERENCE_QUEUE, TaskSender
from triage.cli import completion, destinations, importing, loop, reading, sources, study
from triage.cli.common import (
    EXIT_UNHEALTHY,
    ConfigOption,
    JsonOption,
    OneLineErrors,
    Output,
    OutputOption,
    add_version_option,
    database_exists,
    database_location,
    exit_with_error,
    load_settings,
    local_time,
    open_database,
    open_sessions,
    print_names,
    reply,
    warn,
)
from triage.config import Settings
from triage.db import migrate
from triage.db.base import utcnow
from triage.db.session import SessionFactory, create_db_engine, make_session_factory, session_scope
from triage.failures import Failure, list_failures, requeue
from triage.health import Health, collect_health, nobody_consumes
from triage.ingest.reprocess import ReprocessError, reprocess_by_uid
from triage.modes import mode_for
from triage.status import StatusReport, collect_status

app = OneLineErrors(
    name="triage-admin",
    help=(
        "Administer triage: health, database, worklist, studies, destinations, sources, "
        "models and failures. "
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


@db_app.command("upgrade")
def db_upgrade(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Create or upgrade the database schema to this version of triage. Safe to run again."""
    settings = load_settings(config)
    engine = create_db_engine(settings.database_url)
    try:
        before = migrate.current_revision(engine)
        migrate.upgrade(engine)
        after = migrate.current_revision(engine)
    except OperationalError as exc:
        exit_with_error(f"cannot reach the {database_location(settings)}: {exc.orig}")
    if as_json:
        print(json.dumps({"before": before, "after": after, "upgraded": before != after}))
        return
    if before == after:
        console.print(f"database already at revision {after}")
    else:
        console.print(f"database upgraded from {before or 'empty'} to {after}")


@app.command("status")
def status(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Whether triage is healthy, and counts by state.

    Whether triage is healthy: `triage serve` (its heartbeat), its DICOM and HTTP listeners,
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
                error = f"paused until {local_time(d.paused_until)}; {error}"
            destinations.add_row(
                d.name,
                marks[d.state],
                str(d.backlog),
                str(d.failed),
                local_time(d.last_success_at, none="never"),
                error,
            )
        console.print(destinations)
    if health.destination_note:
        warn(health.destination_note)


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
        for column in ("when", "kind", "study", "reason"):
            errors.add_column(column, no_wrap=column == "study", overflow="fold")
        for line in report.last_errors:
            errors.add_row(
                local_time(line.at.isoformat()), line.kind, line.study_uid or "", line.reason
            )
        console.print(errors)
    else:
        console.print("no errors recorded")


models_app = typer.Typer(help="Detection models.", no_args_is_help=True)
app.add_typer(models_app, name="models")


@models_app.command("list")
def models_list(
    config: ConfigOption = None, as_json: JsonOption = False, output: OutputOption = Output.TABLE
) -> None:
    """Every model, its version, mode and whether it loads.

    Every model found (bundled and in models_dir): version, what it applies to, the device it
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
        warn(
            f"modes unknown: cannot read the {database_location(settings)} "
            f"({type(exc).__name__}); run `triage-admin db upgrade`",
        )
        for status in statuses:
            status["mode"] = None
    if as_json:
        print(json.dumps(statuses, indent=2))
        return
    if output is Output.NAME:
        print_names([status["name"] for status in statuses])
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
    as_json: JsonOption = False,
) -> None:
    """Analyse a study again. Results replace the earlier ones (same DICOM UIDs).

    Warns when no worker consumes the inference queue: the jobs then wait for one."""
    settings = load_settings(config)
    factory = open_sessions(settings)
    try:
        job_ids = reprocess_by_uid(
            settings=settings,
            session_factory=factory,
            study_uid=study_uid,
            model=model,
            actor="triage-admin",
        )
    except ReprocessError as exc:
        exit_with_error(str(exc))
    sent = _send(settings, jobs=job_ids, deliveries=[])
    _warn_unattended(factory, [INFERENCE_QUEUE])
    reply(
        as_json,
        {"study_uid": study_uid, "jobs": job_ids, "sent": sent},
        f"queued {len(job_ids)} job(s) for {study_uid}; {sent} sent to the broker",
    )


def _send(settings: Settings, *, jobs: list[int], deliveries: list[int]) -> int:
    """Send the tasks; return how many the broker took (the sweeper re-sends the others)."""
    sender = TaskSender(settings)
    sent = sum(sender.analyze_study(job_id) for job_id in jobs)
    sent += sum(sender.dispatch_result(delivery_id) for delivery_id in deliveries)
    sender.close()
    if sent < len(jobs) + len(deliveries):
        warn(
            f"the broker took {sent} of {len(jobs) + len(deliveries)} "
            "task(s): the rest stay queued in the database and triage serve sends them again "
            "once the broker answers (`triage-admin status` shows the broker)",
        )
    return sent


def _warn_unattended(factory: SessionFactory, queues: list[str]) -> None:
    with session_scope(factory) as session:
        warnings = [nobody_consumes(session, queue, utcnow()) for queue in queues]
    for warning in filter(None, warnings):
        warn(warning)


failures_app = typer.Typer(help="Failed jobs and deliveries.", no_args_is_help=True)
app.add_typer(failures_app, name="failures")


def _failures(session: Session, settings: Settings) -> list[Failure]:
    return list_failures(
        db_session=session,
        job_max_attempts=settings.job_max_attempts,
        delivery_max_attempts=settings.delivery_max_attempts,
    )


@failures_app.command("list")
def failures_list(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Jobs and deliveries that failed for good, with the reason.

    "permanent" marks one that failed before its last attempt, with an error that retrying
    does not fix: mend the cause (the study, the model, the destination) before a retry."""
    settings = load_settings(config)
    with session_scope(open_sessions(settings)) as session:
        failures = _failures(session, settings)
    if as_json:
        rows = [
            {
                **dataclasses.asdict(f),
                "permanent": f.permanent,
                "at": f.at.isoformat() if f.at else None,
            }
            for f in failures
        ]
        print(json.dumps(rows, indent=2))
        return
    if not failures:
        console.print("no failures")
        return
    print(f"failures ({len(failures)}), oldest first")
    for f in failures:  # lines, not a table: a table would cut the Study UID at 80 columns
        when = local_time(f.at.isoformat() if f.at else None)
        kind = "permanent" if f.permanent else f"after {f.attempts} attempts"
        print(f"{f.kind} {f.id}  {f.study_uid}")
        print(f"    {when}  {f.what}  {kind}")
        print(f"    {f.reason}")


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
    """Queue failed jobs and deliveries again (see `failures list` for their ids).

    Warns about a permanent failure (it will fail again unless its cause was mended) and when
    no worker consumes the queue the work goes to."""
    settings = load_settings(config)
    if not (job or delivery or retry_all):
        exit_with_error("name --job ID, --delivery ID or --all")
    factory = open_sessions(settings)
    with session_scope(factory) as session:
        failures = _failures(session, settings)
        if retry_all:
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
    retried = {("job", i) for i in jobs} | {("delivery", i) for i in deliveries}
    permanent = [f for f in failures if f.permanent and (f.kind, f.id) in retried]
    for f in permanent:
        warn(
            f"{f.kind} {f.id} failed on attempt {f.attempts} of "
            f"{f.max_attempts} with an error that retrying does not fix ({f.reason[:200]}): "
            "it will fail again unless that was mended",
        )
    sent = _send(settings, jobs=jobs, deliveries=deliveries)
    queues = [INFERENCE_QUEUE] * bool(jobs) + [DISPATCH_QUEUE] * bool(deliveries)
    _warn_unattended(factory, queues)
    if as_json:
        print(
            json.dumps(
                {
                    "jobs": jobs,
                    "deliveries": deliveries,
                    "sent": sent,
                    "permanent": [{"kind": f.kind, "id": f.id} for f in permanent],
                }
            )
        )
        return
    console.print(f"re-queued {len(jobs)} job(s) and {len(deliveries)} delivery(ies)")


reading.register(app)
importing.register(app)
study.register(app)
loop.register(app, models_app)
destinations.register(app)
sources.register(app)
completion.register(app)
