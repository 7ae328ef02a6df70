"""``triage-admin destinations``: where results go, beside those in the configuration.

``peers`` is the same group under its first name, kept so that scripts written for it work.
"""

from __future__ import annotations

import json
import logging
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table
from sqlalchemy import select

from triage.cli.common import (
    ConfigOption,
    JsonOption,
    Output,
    OutputOption,
    exit_with_error,
    load_settings,
    local_time,
    open_sessions,
    print_names,
    reply,
    warn,
)
from triage.config import DimseDestination
from triage.db.base import utcnow
from triage.db.models import Peer
from triage.db.session import session_scope
from triage.destinations import describe_destination, destinations, parse_destination, target
from triage.domain import PeerKind
from triage.errors import DestinationUnavailableError
from triage.health import destination_lines, destination_view

console = Console(highlight=False)

WIDE_TABLE_COLUMNS = 140
"""Below this many columns destinations are printed as lines: a table would cut addresses."""
destinations_app = typer.Typer(
    help="Destinations: the PACS nodes that receive triage's results (C-STORE or STOW-RS).",
    no_args_is_help=True,
)


@destinations_app.command("list")
def destinations_list(
    config: ConfigOption = None, as_json: JsonOption = False, output: OutputOption = Output.TABLE
) -> None:
    """Every destination the running triage serve sends to, with its health.

    Its configured destinations come from its heartbeat (so a shell with other settings still
    sees the daemon's), then those added with `destinations add`. When triage serve is not
    running, or this configuration differs from its, a warning says so."""
    settings = load_settings(config)
    now = utcnow()
    with session_scope(open_sessions(settings)) as session:
        view = destination_view(session, settings, now)
        lines = {
            line.name: line
            for line in destination_lines(session, [d["name"] for d in view.destinations], now)
        }
    rows: list[dict[str, Any]] = []
    for described in view.destinations:
        line = lines[described["name"]]
        rows.append(
            described
            | {
                "state": line.state,
                "backlog": line.backlog,
                "failed": line.failed,
                "last_success_at": line.last_success_at,
                "last_error": line.last_error,
                "paused_until": line.paused_until,
            }
        )
    if view.note:
        warn(view.note)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    if output is Output.NAME:
        print_names([row["name"] for row in rows])
        return
    if not rows:
        console.print("no destinations: results are built but not sent")
        return
    if output is Output.WIDE:
        console.width = max(console.width, 200)
    if console.width < WIDE_TABLE_COLUMNS:
        _print_lines(rows)
        return
    table = Table(title="destinations")
    for column in ("name", "target", "defined by", "state", "backlog", "last success", "error"):
        table.add_column(
            column,
            no_wrap=column not in ("error",),
            overflow="fold",
            justify="right" if column == "backlog" else "left",
        )
    for row in rows:
        table.add_row(
            row["name"],
            target(row),
            row["defined_by"],
            "[green]up[/]" if row["state"] == "up" else "[bold red]DOWN[/]",
            str(row["backlog"]),
            local_time(row["last_success_at"], none="never"),
            _trouble(row),
        )
    console.print(table)


def _trouble(row: dict[str, Any]) -> str:
    """Failed for good, paused, last error: what is wrong with a destination, in one string."""
    parts = []
    if row["failed"]:
        parts.append(f"{row['failed']} failed for good")
    if row["paused_until"]:
        parts.append(f"paused until {local_time(row['paused_until'])}")
    if row["last_error"]:
        parts.append(row["last_error"])
    return "; ".join(parts)


def _print_lines(rows: list[dict[str, Any]]) -> None:
    """For a narrow terminal: the name and address whole on the first line of each."""
    print("destinations")
    for row in rows:
        state = "up" if row["state"] == "up" else "DOWN"
        print(f"{row['name']}  {target(row)}  ({row['defined_by']})")
        print(
            f"    {state}  backlog {row['backlog']}  "
            f"last success {local_time(row['last_success_at'], none='never')}"
        )
        if trouble := _trouble(row):
            print(f"    {trouble}")


@destinations_app.command("add")
def destinations_add(
    name: Annotated[str, typer.Argument(help="A short name, e.g. main-pacs.")],
    address: Annotated[
        str, typer.Argument(help="AE@host:port (C-STORE) or a DICOMweb base URL (STOW-RS).")
    ],
    token: Annotated[str | None, typer.Option(help="Bearer token for DICOMweb.")] = None,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Add a destination for results (kept in the database; triage serve uses it at once)."""
    settings = load_settings(config)
    try:
        destination = parse_destination(address, name=name, token=token)
    except ValidationError as exc:
        exit_with_error(f"{address!r}: {exc.errors()[0]['msg']}")
    if name in {d.name for d in settings.destinations}:
        exit_with_error(f"a destination named {name} is in the configuration; choose another name")
    with session_scope(open_sessions(settings)) as session:
        if session.scalar(select(Peer.id).where(Peer.name == name)) is not None:
            exit_with_error(f"a destination named {name} exists; remove it first")
        if isinstance(destination, DimseDestination):
            peer = Peer(
                name=name,
                kind=PeerKind.DIMSE,
                ae_title=destination.ae_title,
                host=destination.host,
                port=destination.port,
            )
        else:
            peer = Peer(
                name=name,
                kind=PeerKind.DICOMWEB,
                url=destination.url,
                options={"token": token} if token else {},
            )
        session.add(peer)
    described = describe_destination(destination)
    reply(as_json, described | {"defined_by": "added"}, f"added {name}: {target(described)}")


@destinations_app.command("remove")
def destinations_remove(
    name: Annotated[str, typer.Argument(help="The destination's name.")],
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Remove a destination added with `destinations add`."""
    settings = load_settings(config)
    if name in {d.name for d in settings.destinations}:
        exit_with_error(f"{name} is defined in the configuration; remove it there")
    with session_scope(open_sessions(settings)) as session:
        peer = session.scalar(select(Peer).where(Peer.name == name))
        if peer is None:
            exit_with_error(f"no destination named {name} (`triage-admin destinations list`)")
        session.delete(peer)
    reply(as_json, {"removed": name}, f"removed {name}")


@destinations_app.command("echo")
def destinations_echo(
    name: Annotated[str, typer.Argument(help="The destination's name (see `destinations list`).")],
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Check a destination answers: C-ECHO for DIMSE, a QIDO-RS query for DICOMweb.

    Exit status 1 when it does not, with the reason."""
    settings = load_settings(config)
    with session_scope(open_sessions(settings)) as session:
        destination = destinations(settings, db_session=session).get(name)
    if destination is None:
        exit_with_error(f"no destination named {name} (`triage-admin destinations list`)")
    from triage.peers import echo  # pynetdicom and the senders: only this command needs them

    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # the one line below says it

    described = describe_destination(destination)
    try:
        seconds = echo(destination, calling_ae=settings.ae_title)
    except DestinationUnavailableError as exc:
        if as_json:
            print(json.dumps(described | {"ok": False, "error": str(exc), "milliseconds": None}))
            raise typer.Exit(1) from None
        exit_with_error(f"{name}: {exc}")
    reply(
        as_json,
        described | {"ok": True, "error": None, "milliseconds": seconds * 1000},
        f"{name}: OK in {seconds * 1000:.0f} ms ({target(described)})",
    )


def register(app: typer.Typer) -> None:
    app.add_typer(destinations_app, name="destinations")
    app.add_typer(destinations_app, name="peers", hidden=True)  # the group's first name
