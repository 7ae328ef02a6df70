"""``triage-admin models mode|stats`` and ``feedback export``: the radiologist's loop from a
shell (deployment modes, monitoring per model version, readers' verdicts)."""

from __future__ import annotations

import csv
import json
import sys
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy import select

from triage.catalog import usable_models
from triage.cli.common import (
    ConfigOption,
    JsonOption,
    exit_with_error,
    load_settings,
    open_sessions,
)
from triage.db.models import Job
from triage.db.session import session_scope
from triage.domain import ModelMode
from triage.feedback import list_feedback
from triage.modes import set_mode
from triage.monitoring import model_stats

console = Console(highlight=False)
feedback_app = typer.Typer(help="Readers' verdicts on the AI's findings.", no_args_is_help=True)


def models_mode(
    name: Annotated[str, typer.Argument(help="The model's name, as `models list` shows it.")],
    mode: Annotated[ModelMode, typer.Argument(help="shadow, review or clinical.")],
    version: Annotated[
        str | None, typer.Option("--version", help="Only this version (default: every version).")
    ] = None,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Set a model version's deployment mode: shadow, review or clinical.

    shadow: findings recorded for admins only, no
    worklist change, nothing sent. review: findings rank the worklist; results and alerts wait
    for an approval. clinical: everything at once (the default). Applies to runs from now on
    (`reprocess` runs a study again); audited."""
    settings = load_settings(config)
    factory = open_sessions(settings)
    with session_scope(factory) as session:
        known = set(usable_models(settings)) | set(
            session.scalars(select(Job.model_name).distinct())
        )
        if name not in known:
            names = ", ".join(sorted(known)) or "none"
            exit_with_error(
                f"no model named {name!r} (known: {names}; see `triage-admin models list`)"
            )
        before = set_mode(
            session, model_name=name, mode=mode, model_version=version, actor="triage-admin"
        )
    target = f"{name} {version}" if version else f"{name} (every version)"
    if as_json:
        print(
            json.dumps(
                {
                    "model": name,
                    "version": version or "*",
                    "mode": str(mode),
                    "previous": str(before) if before else None,
                }
            )
        )
        return
    console.print(f"{target}: {mode}" + (f" (was {before})" if before else ""))


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def models_stats(
    config: ConfigOption = None,
    as_json: JsonOption = False,
    days: Annotated[int, typer.Option(help="How many days back.")] = 30,
) -> None:
    """Monitoring per model version, with drift alarms.

    Per model version: studies analysed, positive and alert rates, feedback, agreement, PPV
    estimate, failures, median run time, and score drift (PSI against the model's reference;
    ALARM above drift_psi_threshold). Exits 3 while any version is in drift alarm."""
    settings = load_settings(config)
    factory = open_sessions(settings)
    with session_scope(factory) as session:
        stats = model_stats(session, settings, days=days)
    alarm = any(item.drift is not None and item.drift.alarm for item in stats)
    if as_json:
        print(json.dumps([item.as_json() for item in stats], indent=2))
    elif not stats:
        console.print(f"no model ran in the last {days} days")
    else:
        table = Table(title=f"models, last {days} days")
        for column in (
            "model", "version", "mode", "studies", "positive", "alerts", "feedback",
            "agreement", "PPV est.", "failures", "median s", "drift PSI",
        ):  # fmt: skip
            table.add_column(column, no_wrap=column in ("model", "version"))
        for item in stats:
            t = item.totals
            drift = "no reference"
            if item.drift is not None:
                psi = "-" if item.drift.psi is None else f"{item.drift.psi:.3f}"
                drift = {"drift": f"ALARM {psi}", "stable": psi}.get(
                    item.drift.verdict or "", f"{psi} ({item.drift.samples} scores, too few)"
                )
            table.add_row(
                item.model,
                item.version,
                str(item.mode),
                str(t["analysed"]),
                _percent(t["positive_rate"]),
                _percent(t["alert_rate"]),
                str(t["feedback"]),
                _percent(t["agreement_rate"]),
                _percent(t["ppv_estimate"]),
                str(t["failures"]),
                "-" if t["median_run_seconds"] is None else f"{t['median_run_seconds']:.2f}",
                drift,
            )
        console.print(table)
    if alarm:
        raise typer.Exit(3)


def _since(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        exit_with_error(f"--since {value!r} is not a date (YYYY-MM-DD) or ISO 8601 time", 2)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


FEEDBACK_FIELDS = (
    "id", "at", "study_uid", "finding", "model", "version", "label", "probability",
    "positive", "verdict", "comment", "reader",
)  # fmt: skip


@feedback_app.command("export")
def feedback_export(
    config: ConfigOption = None,
    as_json: JsonOption = False,
    as_csv: Annotated[
        bool, typer.Option("--csv", help="CSV with a header row (the default).")
    ] = False,
    since: Annotated[
        str | None, typer.Option(help="Only feedback from this date or time on (UTC).")
    ] = None,
) -> None:
    """Readers' verdicts on findings, as CSV or JSON.

    Every verdict readers gave (agree, disagree, unsure), oldest first, with the reader,
    the time, the finding and the model version, as CSV (default) or JSON, on stdout."""
    if as_json and as_csv:
        exit_with_error("choose --json or --csv, not both", 2)
    settings = load_settings(config)
    factory = open_sessions(settings)
    with session_scope(factory) as session:
        rows: list[dict[str, Any]] = [
            {
                "id": row.id,
                "at": row.at.isoformat(),
                "study_uid": row.study_uid,
                "finding": row.finding_id,
                "model": row.model_name,
                "version": row.model_version,
                "label": row.label,
                "probability": row.probability,
                "positive": row.positive,
                "verdict": str(row.verdict),
                "comment": row.comment,
                "reader": row.reader,
            }
            for row in list_feedback(session, since=_since(since))
        ]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    writer = csv.DictWriter(sys.stdout, fieldnames=FEEDBACK_FIELDS)
    writer.writeheader()
    writer.writerows(rows)


def register(app: typer.Typer, models_app: typer.Typer) -> None:
    models_app.command("mode")(models_mode)
    models_app.command("stats")(models_stats)
    app.add_typer(feedback_app, name="feedback")
