"""``triage-admin sources``: archives triage polls for new studies and retrieves them from."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Annotated

import typer
from prometheus_client import CollectorRegistry
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table
from sqlalchemy import select
from sqlalchemy.orm import Session

from triage.cli.common import (
    ConfigOption,
    JsonOption,
    Output,
    OutputOption,
    exit_with_error,
    load_settings,
    open_sessions,
    print_names,
    reply,
    warn,
)
from triage.config import DimseDestination
from triage.db.base import utcnow
from triage.db.models import PulledStudy, Source
from triage.db.session import create_db_engine, session_scope
from triage.destinations import parse_destination
from triage.domain import PeerKind
from triage.health import running_beat

console = Console(highlight=False)
sources_app = typer.Typer(
    help="Archives that cannot push: triage polls them and retrieves new studies.",
    no_args_is_help=True,
)


@sources_app.command("list")
def sources_list(
    config: ConfigOption = None, as_json: JsonOption = False, output: OutputOption = Output.TABLE
) -> None:
    """Every source, with where its polling stands (a failing one says why)."""
    from triage.results.senders.stow import redacted_url  # pynetdicom: not for completion

    settings = load_settings(config)
    with session_scope(open_sessions(settings)) as session:
        rows = [
            {
                "name": source.name,
                "url": redacted_url(str(source.url))
                if source.kind == PeerKind.DICOMWEB
                else f"{source.ae_title}@{source.host}:{source.port}",
                "modalities": source.modalities or "any",
                "enabled": source.enabled,
                "search_from": source.search_from,
                "last_polled_at": source.last_polled_at.isoformat()
                if source.last_polled_at
                else None,
                "next_poll_at": source.next_poll_at.isoformat(),
                "failures": source.failures,
                "last_error": source.last_error,
                "pulled": len(source_pulled(session, source.id)),
            }
            for source in session.scalars(select(Source).order_by(Source.name))
        ]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    if output is Output.NAME:
        print_names([str(row["name"]) for row in rows])
        return
    if not rows:
        console.print("no sources: add one with `triage-admin sources add NAME URL`")
        return
    table = Table(title="sources")
    for column in ("name", "url", "modalities", "studies pulled", "search from", "state"):
        table.add_column(column, no_wrap=column == "name", overflow="fold")
    for row in rows:
        state = (
            f"FAILING ({row['failures']}x): {row['last_error']}"
            if row["failures"]
            else ("ok" if row["last_polled_at"] else "not polled yet")
        )
        table.add_row(
            str(row["name"]),
            str(row["url"]),
            str(row["modalities"]),
            str(row["pulled"]),
            str(row["search_from"]),
            state,
        )
    console.print(table)
    if any(row["failures"] for row in rows):
        raise typer.Exit(1)


def source_pulled(session: Session, source_id: int) -> list[str]:
    statement = select(PulledStudy.study_uid).where(PulledStudy.source_id == source_id)
    return list(session.scalars(statement))


@sources_app.command("add")
def sources_add(
    name: Annotated[str, typer.Argument(help="A short name, e.g. cloud-archive.")],
    target: Annotated[
        str,
        typer.Argument(
            help="The archive's DICOMweb base URL, or AE@host:port (C-FIND, C-MOVE to us)."
        ),
    ],
    token: Annotated[str | None, typer.Option(help="Bearer token.")] = None,
    username: Annotated[str | None, typer.Option(help="HTTP Basic user.")] = None,
    password: Annotated[str | None, typer.Option(help="HTTP Basic password.")] = None,
    modality: Annotated[
        list[str] | None, typer.Option(help="Only studies with this modality (repeatable).")
    ] = None,
    since: Annotated[
        str | None,
        typer.Option(
            help="Search from this StudyDate (YYYYMMDD; default: pull_lookback_days ago)."
        ),
    ] = None,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Add an archive to poll.

    DICOMweb (QIDO-RS to find, WADO-RS to retrieve) or DIMSE
    (C-FIND to find, C-MOVE to triage's AE title, which the archive must know)."""
    settings = load_settings(config)
    try:
        endpoint = parse_destination(target, name=name)
    except ValidationError as exc:
        exit_with_error(f"{target!r}: {exc.errors()[0]['msg']}")
    if since is not None and not (len(since) == 8 and since.isdigit()):
        exit_with_error(f"--since {since!r}: give a date as YYYYMMDD")
    options: dict[str, str] = {}
    if token:
        options["token"] = token
    if username:
        options["username"] = username
        options["password"] = password or ""
    start = since or f"{utcnow() - timedelta(days=settings.pull_lookback_days):%Y%m%d}"
    from triage.results.senders.stow import redacted_url  # pynetdicom: not for completion

    with session_scope(open_sessions(settings)) as session:
        if session.scalar(select(Source.id).where(Source.name == name)) is not None:
            exit_with_error(f"a source named {name} exists; remove it first")
        source = Source(
            name=name,
            options=options,
            modalities="\\".join(m.upper() for m in modality) if modality else None,
            search_from=start,
            next_poll_at=utcnow(),
        )
        if isinstance(endpoint, DimseDestination):
            source.kind = PeerKind.DIMSE
            source.ae_title, source.host, source.port = (
                endpoint.ae_title,
                endpoint.host,
                endpoint.port,
            )
            where = f"{endpoint.ae_title}@{endpoint.host}:{endpoint.port}"
        else:
            source.kind, source.url = PeerKind.DICOMWEB, endpoint.url.rstrip("/")
            where = redacted_url(endpoint.url)
        session.add(source)
    reply(
        as_json,
        {"name": name, "kind": str(source.kind), "where": where, "since": start},
        f"added {name}: {where}, studies from {start} on",
    )


@sources_app.command("remove")
def sources_remove(
    name: Annotated[str, typer.Argument(help="The source's name.")],
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Stop polling an archive (what was retrieved from it stays)."""
    settings = load_settings(config)
    with session_scope(open_sessions(settings)) as session:
        source = session.scalar(select(Source).where(Source.name == name))
        if source is None:
            exit_with_error(f"no source named {name} (`triage-admin sources list`)")
        session.delete(source)
    reply(as_json, {"removed": name}, f"removed {name}")


@sources_app.command("poll")
def sources_poll(
    name: Annotated[str, typer.Argument(help="The source's name.")],
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Search an archive now and retrieve what is new.

    Exit status 1 if it fails. Studies
    retrieved here complete after the quiet period, as triage serve learns of them then."""
    from triage.ingest.pipeline import Ingestor
    from triage.metrics import IngestMetrics
    from triage.pull.poller import Puller
    from triage.storage.spool import Spool

    settings = load_settings(config)
    factory = open_sessions(settings)
    with session_scope(factory) as session:
        source_id = session.scalar(select(Source.id).where(Source.name == name))
    if source_id is None:
        exit_with_error(f"no source named {name}")
    ingestor = Ingestor(
        spool=Spool.for_settings(settings),
        engine=create_db_engine(settings.database_url, rebuildable=True),
        metrics=IngestMetrics(CollectorRegistry()),
        writers_lock=settings.data_dir / "ingest.lock",
    )
    try:
        report = Puller(settings, factory, ingestor).poll(source_id)
    finally:
        ingestor.close()
    if as_json:
        print(json.dumps(report.__dict__, indent=2))
    else:
        console.print(
            f"{name}: {report.found} studies found, {len(report.pulled)} retrieved"
            + (f"; FAILED: {report.error}" if report.error else "")
        )
    if report.pulled and running_beat(settings, utcnow()) is None:
        warn(
            "triage serve is not running: the studies retrieved complete "
            "and are analysed once it runs",
        )
    if report.error:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.add_typer(sources_app, name="sources")
