"""``triage-admin study show``: one study's record, from a shell.

The text is labelled sections, every time in the local time zone to the second, every UID on a
line of its own (``soft_wrap``: a narrow terminal folds the line, nothing cuts it), and no
patient name, ID or birth date; ``--json`` is the record the API returns.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime
from typing import Annotated

import typer
from rich.console import Console

from triage.cli.common import (
    ConfigOption,
    JsonOption,
    exit_with_error,
    load_settings,
    local_time,
    open_sessions,
)
from triage.db.session import session_scope
from triage.worklist.queries import study_record
from triage.worklist.records import (
    DeliveryRecord,
    FeedbackRecord,
    JobRecord,
    PriorityChangeRecord,
    ResultRecord,
    SeriesRecord,
    StudyRecord,
)

console = Console(highlight=False)

study_app = typer.Typer(help="One study's record.", no_args_is_help=True)


def _field(label: str, value: object, indent: int = 2) -> str:
    return f"{' ' * indent}{label:<12} {value}"


def _section(name: str, count: int, lines: Iterator[str]) -> Iterator[str]:
    """A section of ``count`` items: its header (``NAME: none`` when empty), then ``lines``."""
    yield f"{name} ({count}):" if count else f"{name}: none"
    yield from lines


def study_lines(record: StudyRecord, zone: str) -> Iterator[str]:
    """The study itself and where it stands on the worklist."""
    yield f"study (times in {zone}):"
    yield _field("UID", record.study_uid)
    yield _field("accession", record.accession_number or "-")
    yield _field("modality", record.modalities or "-")
    if record.study_description:
        yield _field("description", record.study_description)
    reason = f" ({record.status_reason})" if record.status_reason else ""
    yield _field("status", f"{record.status}{reason}")
    yield _field("round", record.analysis_round)
    yield _field("received", local_time(record.received_at))
    yield _field("completed", local_time(record.completed_at))
    if (w := record.worklist) is None:
        yield "worklist: none"
        return
    yield "worklist:"
    yield _field("tier", f"{w.tier} (score {w.score:.2f})")
    claimed = f" by {w.claimed_by}" if w.claimed_by else ""
    yield _field("reading", f"{w.reading_state}{claimed}")
    yield _field("reason", w.reason or "-")
    yield _field("due", local_time(w.due_at))
    acknowledged = (
        f"by {w.acknowledged_by} at {local_time(w.acknowledged_at)}" if w.acknowledged_at else "no"
    )
    yield _field("acknowledged", acknowledged)


def series_lines(series: list[SeriesRecord]) -> Iterator[str]:
    for s in series:
        yield f"  {s.series_uid}"
        described = f", description {s.description}" if s.description else ""
        yield f"    modality {s.modality or '-'}, {s.instances} instance(s){described}"


def job_lines(jobs: list[JobRecord]) -> Iterator[str]:
    for job in jobs:
        yield f"  job {job.id}: {job.model} {job.version}, mode {job.mode}, {job.state}"
        if job.reason:
            yield _field("reason", job.reason, 4)
        yield _field("round", job.round, 4)
        yield _field("attempts", job.attempts, 4)
        if job.series_uid:
            yield _field("series UID", job.series_uid, 4)
        yield _field("queued", local_time(job.queued_at), 4)
        yield _field("started", local_time(job.started_at), 4)
        yield _field("finished", local_time(job.finished_at), 4)
        if job.held:
            yield _field("review", "held: results and alerts wait for approval", 4)
        elif job.approved_at:
            yield _field(
                "review", f"approved by {job.approved_by} at {local_time(job.approved_at)}", 4
            )
        if not job.findings:
            yield "    findings: none"
        for f in job.findings:
            yield f"    finding {f.id}: {f.label} ({f.kind}), {f.meaning} ({f.code})"
            volume = f", volume {f.volume_ml:.1f} mL" if f.volume_ml is not None else ""
            yield (
                f"      probability {f.probability:.3f}, {'positive' if f.positive else 'negative'}"
                f"{volume}, key image {'yes' if f.key_image_url else 'no'}"
            )


def result_lines(results: list[ResultRecord]) -> Iterator[str]:
    for r in results:
        yield f"  {r.kind}, round {r.round}"
        yield _field("SOP UID", r.sop_instance_uid, 4)
        yield _field("series UID", r.series_uid, 4)
        if r.retracted_at:
            yield _field("withdrawn", local_time(r.retracted_at), 4)


def delivery_lines(deliveries: list[DeliveryRecord]) -> Iterator[str]:
    for d in deliveries:
        yield f"  delivery {d.id}: {d.result} -> {d.destination}, {d.state}"
        yield _field("SOP UID", d.result_uid, 4)
        yield _field("attempts", d.attempts, 4)
        if d.last_error:
            yield _field("last error", d.last_error, 4)
        if d.next_attempt_at:
            yield _field("next try", local_time(d.next_attempt_at), 4)
        if d.delivered_at:
            yield _field("delivered", local_time(d.delivered_at), 4)


def history_lines(history: list[PriorityChangeRecord]) -> Iterator[str]:
    for h in history:
        tier = f"{h.old_tier} -> {h.new_tier}" if h.old_tier else f"set to {h.new_tier}"
        score = (
            f"{h.new_score:.2f}"
            if h.old_score is None
            else f"{h.old_score:.2f} -> {h.new_score:.2f}"
        )
        yield f"  {local_time(h.at)}  tier {tier}, score {score}, reason: {h.reason}"


def feedback_lines(feedback: list[FeedbackRecord]) -> Iterator[str]:
    for fb in feedback:
        if fb.finding is None:
            target = "the study"
        else:
            target = f"finding {fb.finding} ({fb.label}, {fb.model} {fb.version})"
        yield f"  {local_time(fb.at)}  {fb.reader}: {fb.verdict} on {target}"
        if fb.comment:
            yield _field("comment", fb.comment, 4)


def record_lines(record: StudyRecord, zone: str) -> Iterator[str]:
    """The whole record as labelled sections."""
    yield from study_lines(record, zone)
    yield from _section("series", len(record.series), series_lines(record.series))
    yield from _section("jobs", len(record.jobs), job_lines(record.jobs))
    yield from _section("results", len(record.results), result_lines(record.results))
    yield from _section("deliveries", len(record.deliveries), delivery_lines(record.deliveries))
    history = record.priority_history
    yield from _section("priority history", len(history), history_lines(history))
    yield from _section("feedback", len(record.feedback), feedback_lines(record.feedback))


@study_app.command("show")
def study_show(
    study_uid: Annotated[str, typer.Argument(help="Study Instance UID.")],
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Status and worklist place, series, jobs and findings, result objects, deliveries (with
    their last error), priority history and feedback of a study; times in the local time zone."""
    settings = load_settings(config)
    factory = open_sessions(settings)
    with session_scope(factory) as session:
        record = study_record(db_session=session, study_uid=study_uid)
    if record is None:
        exit_with_error(f"no study {study_uid}")
    if as_json:
        print(json.dumps(record.model_dump(mode="json"), indent=2))
        return
    zone = datetime.now().astimezone().tzname() or "local time"
    for line in record_lines(record, zone):
        header = not line.startswith(" ")
        console.print(line, markup=False, soft_wrap=True, style="bold" if header else None)


def register(app: typer.Typer) -> None:
    app.add_typer(study_app, name="study")
