"""``triage-admin worklist``, ``study show`` and ``tokens``: the reading side, from a shell."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy import select

from triage.api.tokens import create_token, revoke_token
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
)
from triage.db.base import utcnow
from triage.db.models import ApiToken
from triage.db.session import session_scope
from triage.domain import TokenRole
from triage.worklist.queries import worklist
from triage.worklist.records import WorklistRow

console = Console(highlight=False)

tokens_app = typer.Typer(
    help="Bearer tokens for the HTTP API and the web page.", no_args_is_help=True
)


def _minutes(seconds: float | None) -> str:
    if seconds is None:
        return ""
    sign, seconds = ("-" if seconds < 0 else ""), abs(seconds)
    hours, minutes = divmod(int(seconds // 60), 60)
    return f"{sign}{hours}h{minutes:02d}" if hours else f"{sign}{minutes} min"


WorklistOutput = Annotated[
    Output,
    typer.Option(
        "--output",
        "-o",
        help="table (fits the terminal; IDs are never cut, the reason is), wide (everything), "
        "or name (one Study UID per line, for scripts).",
    ),
]


WIDE_TABLE_COLUMNS = 160
"""Below this many columns the worklist is printed as lines: a table would cut the UIDs."""


def _print_worklist_lines(rows: list[WorklistRow], width: int) -> None:
    """Two lines per study: rank, tier, the full Study UID and accession (never cut: a narrow
    terminal wraps them whole); then modality, times, state, and the reason cut to fit."""
    print("worklist (most urgent first)")
    for rank, row in enumerate(rows, start=1):
        print(f"{rank:>3} {row.tier:<8} {row.study_uid}  acc {row.accession_number or '-'}")
        state = row.reading_state + (f" ({row.claimed_by})" if row.claimed_by else "")
        facts = (
            f"    {row.modalities or '-'}  waited {_minutes(row.waited_seconds)}"
            f"  due in {_minutes(row.due_in_seconds)}  {state}  "
        )
        room = max(width - len(facts) - 1, 10)
        reason = row.reason if len(row.reason) <= room else row.reason[: room - 1] + "…"
        print(facts + reason)


def worklist_command(
    config: ConfigOption = None,
    as_json: JsonOption = False,
    limit: Annotated[int, typer.Option(help="How many studies.")] = 50,
    output: WorklistOutput = Output.TABLE,
) -> None:
    """The reading worklist in the same order as the web page: most urgent first."""
    settings = load_settings(config)
    factory = open_sessions(settings)
    with session_scope(factory) as session:
        items = worklist(db_session=session, limit=limit)
    now = utcnow()
    rows = [item.row(now=now, viewer_url_template=settings.viewer_url_template) for item in items]
    if as_json:
        print(json.dumps([row.model_dump(mode="json") for row in rows], indent=2))
        return
    if output is Output.NAME:
        for row in rows:
            print(row.study_uid)
        return
    if output is Output.TABLE and console.width < WIDE_TABLE_COLUMNS:
        _print_worklist_lines(rows, console.width)
        return
    table = Table(title="worklist (most urgent first)")
    for column in (
        "#",
        "tier",
        "study",
        "accession",
        "modality",
        "waited",
        "due in",
        "state",
        "reason",
    ):
        wide = output is Output.WIDE
        table.add_column(
            column,
            no_wrap=column in ("study", "accession", "tier") or wide,
            overflow="fold" if wide else ("ellipsis" if column == "reason" else "fold"),
            max_width=None if wide or column != "reason" else 60,
        )
    if output is Output.WIDE:
        console.width = max(console.width, 400)
    for rank, row in enumerate(rows, start=1):
        table.add_row(
            str(rank),
            row.tier,
            row.study_uid,
            row.accession_number or "",
            row.modalities or "",
            _minutes(row.waited_seconds),
            _minutes(row.due_in_seconds),
            row.reading_state + (f" ({row.claimed_by})" if row.claimed_by else ""),
            row.reason,
        )
    console.print(table)


@tokens_app.command("create")
def tokens_create(
    name: Annotated[str, typer.Argument(help="Who or what uses the token, e.g. dr.smith.")],
    role: Annotated[
        TokenRole,
        typer.Option(
            help=(
                "radiologist, admin, sender (STOW-RS only, for archives) or worker "
                "(images and results over HTTP)."
            )
        ),
    ] = TokenRole.RADIOLOGIST,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create a token and print it once, alone on the last line; only its hash is kept."""
    settings = load_settings(config)
    factory = open_sessions(settings)
    try:
        with session_scope(factory) as session:
            token = create_token(db_session=session, name=name, role=role)
    except ValueError as exc:
        exit_with_error(str(exc))
    if as_json:
        print(json.dumps({"name": name, "role": str(role), "token": token}))
        return
    print(token)


@tokens_app.command("list")
def tokens_list(
    config: ConfigOption = None, as_json: JsonOption = False, output: OutputOption = Output.TABLE
) -> None:
    """Every token: name, role, created, last used, revoked. Never the token itself."""
    settings = load_settings(config)
    factory = open_sessions(settings)
    with session_scope(factory) as session:
        rows: list[dict[str, Any]] = [
            {
                "name": t.name,
                "role": str(t.role),
                "created_at": t.created_at.isoformat(),
                "last_used_at": t.last_used_at.isoformat() if t.last_used_at else None,
                "revoked_at": t.revoked_at.isoformat() if t.revoked_at else None,
            }
            for t in session.scalars(select(ApiToken).order_by(ApiToken.name))
        ]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    if output is Output.NAME:
        print_names([row["name"] for row in rows])
        return
    if not rows:
        console.print("no tokens: `triage-admin tokens create NAME --role ROLE` makes one")
        return
    table = Table(title="tokens")
    for column in ("name", "role", "created", "last used", "revoked"):
        table.add_column(column, no_wrap=column == "name")
    for row in rows:
        table.add_row(
            row["name"],
            row["role"],
            local_time(row["created_at"]),
            local_time(row["last_used_at"], none="never"),
            local_time(row["revoked_at"], none=""),
        )
    console.print(table)


@tokens_app.command("revoke")
def tokens_revoke(
    name: Annotated[str, typer.Argument(help="The token's name.")],
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Revoke a token at once."""
    settings = load_settings(config)
    factory = open_sessions(settings)
    with session_scope(factory) as session:
        if not revoke_token(db_session=session, name=name):
            exit_with_error(f"no live token named {name} (`triage-admin tokens list`)")
    reply(as_json, {"revoked": name}, f"revoked {name}")


def register(app: typer.Typer) -> None:
    app.command("worklist")(worklist_command)
    app.add_typer(tokens_app, name="tokens")
