"""``triage-admin peers``: the PACS nodes results go to, beside those in the configuration."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table
from sqlalchemy import select

from triage.cli.common import (
    ConfigOption,
    JsonOption,
    exit_with_error,
    load_settings,
    open_database,
)
from triage.config import DimseDestination, Settings
from triage.db.models import Peer
from triage.db.session import (
    SessionFactory,
    make_session_factory,
    session_scope,
)
from triage.destinations import AnyDestination, destinations, parse_destination
from triage.domain import PeerKind
from triage.errors import DestinationUnavailableError

console = Console(highlight=False)
peers_app = typer.Typer(help="PACS nodes that receive results.", no_args_is_help=True)


def _factory(settings: Settings) -> SessionFactory:
    return make_session_factory(open_database(settings))


def _describe(destination: AnyDestination) -> str:
    if isinstance(destination, DimseDestination):
        tls = " (TLS)" if destination.tls else ""
        return f"C-STORE {destination.ae_title}@{destination.host}:{destination.port}{tls}"
    return f"STOW-RS {destination.url}"


@peers_app.command("list")
def peers_list(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Every destination: from the configuration and added with `peers add`."""
    settings = load_settings(config)
    configured = {d.name for d in settings.destinations}
    with session_scope(_factory(settings)) as session:
        found = destinations(settings, db_session=session)
    rows = [
        {
            "name": name,
            "kind": destination.kind,
            "target": _describe(destination),
            "source": "configuration" if name in configured else "peers add",
        }
        for name, destination in found.items()
    ]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title="destinations")
    for column in ("name", "kind", "target", "defined by"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["name"], row["kind"], row["target"], row["source"])
    console.print(table if rows else "no destinations: results are built but not sent")


@peers_app.command("add")
def peers_add(
    name: Annotated[str, typer.Argument(help="A short name, e.g. main-pacs.")],
    target: Annotated[
        str, typer.Argument(help="AE@host:port (C-STORE) or a DICOMweb base URL (STOW-RS).")
    ],
    token: Annotated[str | None, typer.Option(help="Bearer token for DICOMweb.")] = None,
    config: ConfigOption = None,
) -> None:
    """Add a destination for results (stored in the database)."""
    settings = load_settings(config)
    try:
        destination = parse_destination(target, name=name, token=token)
    except ValidationError as exc:
        exit_with_error(f"{target!r}: {exc.errors()[0]['msg']}")
    with session_scope(_factory(settings)) as session:
        if session.scalar(select(Peer.id).where(Peer.name == name)) is not None:
            exit_with_error(f"a peer named {name} exists; remove it first")
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
    console.print(f"added {name}: {_describe(destination)}")


@peers_app.command("remove")
def peers_remove(
    name: Annotated[str, typer.Argument(help="The peer's name.")], config: ConfigOption = None
) -> None:
    """Remove a destination added with `peers add`."""
    settings = load_settings(config)
    if name in {d.name for d in settings.destinations}:
        exit_with_error(f"{name} is defined in the configuration; remove it there")
    with session_scope(_factory(settings)) as session:
        peer = session.scalar(select(Peer).where(Peer.name == name))
        if peer is None:
            exit_with_error(f"no peer named {name}")
        session.delete(peer)
    console.print(f"removed {name}")


@peers_app.command("echo")
def peers_echo(
    name: Annotated[str, typer.Argument(help="The destination's name (see `peers list`).")],
    config: ConfigOption = None,
) -> None:
    """Check a destination answers: C-ECHO for DIMSE, a QIDO-RS query for DICOMweb."""
    settings = load_settings(config)
    with session_scope(_factory(settings)) as session:
        destination = destinations(settings, db_session=session).get(name)
    if destination is None:
        exit_with_error(f"no destination named {name}")
    from triage.peers import echo  # pynetdicom and the senders: only this command needs them

    try:
        seconds = echo(destination, calling_ae=settings.ae_title)
    except DestinationUnavailableError as exc:
        exit_with_error(str(exc))
    console.print(f"{name}: OK in {seconds * 1000:.0f} ms")


def register(app: typer.Typer) -> None:
    app.add_typer(peers_app, name="peers")
