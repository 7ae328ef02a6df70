"""bench/worklist: how fast the worklist answers and a study is re-ranked, on PostgreSQL, against
plain SQL through psycopg measured in the same run on the same rows.

One run creates a schema ``bench_<random>`` in the database ``test`` (dropped at the end, on
failure too), migrates it with ``triage.db.migrate.upgrade``, bulk-loads ``--studies`` studies with
their worklist entries (tiers, scores, due times and reasons computed by the real priority policy),
jobs and findings, then measures side by side, interleaved so drift hits all alike:

- ``GET /api/worklist?limit=50`` with a bearer token against uvicorn serving ``create_app`` in its
  own process on a free loopback port; ``worklist()`` in-process (the same ORM query, no HTTP);
  and the reference, the same rows and order in one SQL statement through psycopg;
- ``reprioritize()`` of a random open study in its own transaction (commit included), against a
  plain ``UPDATE worklist_entries ... WHERE study_id = ...`` and commit.

It prints p50/p99, the ratios ours/reference and what ``EXPLAIN ANALYZE`` says of the ORM query's
plan; it never asserts a speed.

    .venv/bin/python -m bench.worklist [--studies 100000] [--requests 200] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psycopg
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from psycopg import sql
from sqlalchemy import Engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from bench.common import (
    LOOPBACK,
    ProcessError,
    argument_parser,
    clean_env,
    emit,
    free_port,
    machine,
    percentile,
    running,
    today,
    wait_for_port,
)
from triage.api.app import create_app
from triage.api.tokens import create_token
from triage.config import Settings
from triage.db import migrate
from triage.db.models import Study
from triage.db.session import SessionFactory, create_db_engine, make_session_factory, session_scope
from triage.domain import ReadingState, StudyStatus, Tier, TokenRole, WorkState
from triage.worklist.policy import (
    AnalysisState,
    FindingSignal,
    PolicyConfig,
    StudySignals,
    compute_priority,
    tier_rank,
)
from triage.worklist.queries import worklist
from triage.worklist.service import reprioritize

DEFAULT_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
REPO_ROOT = Path(__file__).resolve().parents[1]
LIMIT = 50
WARMUP = 20
SEED = 0
UID_ROOT = "1.2.826.0.1.3680043.8.498.20261122"
MODEL, MODEL_VERSION = "ct-head-hyperdensity", "1.0.0"
THRESHOLD = 0.5818  # the shipped model's operating point (model.json)
POLICY = PolicyConfig()

# Realistic proportions: (value, share).
MODALITIES = (("CT", 0.40), ("MR", 0.15), ("CR", 0.25), ("DX", 0.20))
DESCRIPTIONS = {
    "CT": ("CT HEAD WO CONTRAST", "CT CHEST", "CT ABDOMEN PELVIS W CONTRAST"),
    "MR": ("MR BRAIN", "MR KNEE", "MR LUMBAR SPINE"),
    "CR": ("CHEST PA AND LATERAL", "XR HAND"),
    "DX": ("CHEST AP PORTABLE", "XR ANKLE"),
}
HEAD_CT_SHARE = 0.40  # of CT studies: these are analysed by the head CT model
POSITIVE_SHARE = 0.065  # of analysed studies: a critical finding (about 1% of all studies)
ORDER_PRIORITIES = (("STAT", 0.08), ("HIGH", 0.02), ("ROUTINE", 0.60), (None, 0.30))
READING_STATES = (
    (ReadingState.UNREAD, 0.55),
    (ReadingState.CLAIMED, 0.05),
    (ReadingState.READ, 0.40),
)
READ_HISTORY = timedelta(days=30)  # read studies arrived over the last month
OPEN_OVERDUE = 1.05  # open studies arrived within 105% of their target: a few are escalated
TABLES = ("studies", "worklist_entries", "jobs", "findings", "notifications")  # in load order

WORKLIST_SQL = """
SELECT s.study_uid, s.patient_name, s.patient_id, s.accession_number, s.study_description,
       s.modalities, s.status, w.tier, w.score, w.reason, s.first_received_at, w.due_at,
       w.reading_state, w.claimed_by, w.claim_expires_at
FROM worklist_entries w JOIN studies s ON s.id = w.study_id
WHERE w.reading_state IN ('unread', 'claimed')
ORDER BY w.tier_rank, w.score DESC, w.severity_probability DESC, w.severity_volume DESC,
         s.first_received_at, s.study_uid
LIMIT %s
"""
# The model's index for the worklist's order (migration 0004): open entries by tier and score.
ORDER_INDEX = "ix_worklist_open_order"
UPDATE_SQL = "UPDATE worklist_entries SET score = %s, updated_at = %s WHERE study_id = %s"
DROP_INDEX = f"DROP INDEX {ORDER_INDEX}"  # --without-index: what the page costs without it

NOTE = (
    "API: uvicorn (h11, one process) serving triage's create_app; each request authenticates "
    "its bearer token (a SELECT and an UPDATE of last_used_at, committed) and runs the ORM query "
    "in its own session. Reference: the same rows in one SQL statement, psycopg, autocommit. "
    "reprioritize: load the study, compute and store its priority (findings read, history and "
    "notifications written when owed), commit; reference: one UPDATE and commit."
)


# -- data ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Loaded:
    studies: int
    jobs: int
    findings: int
    open_entries: int
    tiers_open: dict[str, int]
    reading_states: dict[str, int]
    modalities: dict[str, int]
    seconds: float  # all of it: building the rows, COPY, VACUUM ANALYZE
    build_seconds: float  # building the rows (the priority policy runs once per study)


def _pick(rng: np.random.Generator, choices: Sequence[tuple[Any, float]], size: int) -> list[Any]:
    values = [value for value, _ in choices]
    shares = np.asarray([share for _, share in choices])
    return [values[i] for i in rng.choice(len(values), size=size, p=shares / shares.sum())]


def _target(signals: StudySignals) -> timedelta:
    """The turnaround of the tier the study starts in (before any escalation)."""
    flagged = any(finding.flags_critical for finding in signals.findings)
    tier = Tier.CRITICAL if flagged else POLICY.order_tier(signals.order_priority)
    return POLICY.target(tier, signals.modalities)


Rows = dict[str, list[dict[str, Any]]]  # table -> rows, each a column -> value mapping


def _analysis_rows(
    rows: Rows, study_id: int, uid: str, finding: FindingSignal, at: datetime
) -> None:
    """The done job of the head CT model, its score finding and, when positive, its lesion and
    the notifications already sent for it."""
    job_id = len(rows["jobs"]) + 1
    finished = at + timedelta(seconds=40)
    rows["jobs"].append(
        {
            "id": job_id,
            "study_id": study_id,
            "model_name": MODEL,
            "model_version": MODEL_VERSION,
            "state": str(WorkState.DONE),
            "round": 1,
            "attempts": 1,
            "series_uid": f"{uid}.1",
            "timings": json.dumps({"load_decode": 0.8, "model": 1.9}),
            "queued_at": at,
            "started_at": at,
            "finished_at": finished,
            "touched_at": finished,
        }
    )
    code = {"code_scheme": "SCT", "code_value": "1386000", "code_meaning": finding.label}
    score = {"job_id": job_id, "ordinal": 0, "kind": "score", "label": MODEL, **code}
    score |= {"probability": finding.probability, "positive": finding.positive}
    rows["findings"].append(score | {"volume_ml": None, "location": None})
    if not finding.positive:
        return
    location = json.dumps({"centroid_voxel": [14.0, 250.5, 301.2]})
    lesion = score | {"ordinal": 1, "kind": "lesion", "label": "lesion 1"}
    rows["findings"].append(lesion | {"volume_ml": finding.volume_ml, "location": location})
    for channel in ("webhook", "hl7"):
        rows["notifications"].append(
            {
                "channel": channel,
                "study_id": study_id,
                "dedup_key": f"{channel}:{uid}:{MODEL}:1",
                "payload": json.dumps({"study_uid": uid, "model": MODEL}),
                "state": str(WorkState.DONE),
                "attempts": 1,
                "next_attempt_at": finished,
                "sent_at": finished,
                "created_at": finished,
            }
        )


def synthesize(studies: int, *, now: datetime, seed: int = SEED) -> Rows:
    """``studies`` studies, one worklist entry each, and the jobs and findings of the analysed
    ones. Tier, score, due time and reason come from the priority policy at ``now`` (open
    studies) or at the moment they were read."""
    rng = np.random.default_rng(seed)
    modalities = _pick(rng, MODALITIES, studies)
    orders = _pick(rng, ORDER_PRIORITIES, studies)
    states = _pick(rng, READING_STATES, studies)
    uniform = rng.random((studies, 6))
    rows: Rows = {table: [] for table in TABLES}
    for index, (modality, order, state, u) in enumerate(
        zip(modalities, orders, states, uniform, strict=True)
    ):
        study_id, descriptions = index + 1, DESCRIPTIONS[modality]
        uid = f"{UID_ROOT}.{study_id}"
        head_ct = modality == "CT" and u[0] < HEAD_CT_SHARE
        description = descriptions[0 if head_ct else 1 + int(u[1] * (len(descriptions) - 1))]
        findings = []
        if head_ct:
            positive = bool(u[2] < POSITIVE_SHARE)
            share = THRESHOLD + (1 - THRESHOLD) * u[3] if positive else THRESHOLD * u[3]
            findings.append(
                FindingSignal(
                    model=MODEL,
                    label="Intracranial hemorrhage",
                    probability=float(share),
                    positive=positive,
                    threshold=0.5,  # what reprioritize(models={}) uses for a model it is not given
                    critical=True,
                    volume_ml=float(1 + 59 * u[4]) if positive else None,
                )
            )
        signals = partial(
            StudySignals,
            study_uid=uid,
            modalities=modality,
            order_priority=order,
            findings=findings,
            analysis=AnalysisState.ANALYZED if head_ct else AnalysisState.PENDING,
        )
        if state is ReadingState.READ:
            received = now - READ_HISTORY * float(u[5])
            ranked_at = read_at = min(received + timedelta(minutes=5 + 600 * float(u[1])), now)
        else:  # waiting: arrived within (a little more than) its target turnaround
            received = now - _target(signals(received_at=now)) * OPEN_OVERDUE * float(u[5])
            ranked_at, read_at = now, None
        priority = compute_priority(signals(received_at=received), now=ranked_at, config=POLICY)
        completed = received + timedelta(minutes=2)
        rows["studies"].append(
            {
                "id": study_id,
                "study_uid": uid,
                "status": str(StudyStatus.ANALYZED if head_ct else StudyStatus.COMPLETE),
                "patient_name": f"BENCH^PATIENT{study_id:07d}",
                "patient_id": f"BP{study_id:07d}",
                "accession_number": f"BA{study_id:08d}",
                "study_date": received.strftime("%Y%m%d"),
                "study_time": received.strftime("%H%M%S"),
                "study_description": description,
                "modalities": modality,
                "order_priority": order,
                "calling_ae": "PACS",
                "analysis_round": 1 if head_ct else 0,
                "first_received_at": received,
                "last_received_at": received,
                "completed_at": completed,
                "updated_at": ranked_at,
            }
        )
        claimed_at = (
            now - timedelta(minutes=20 * float(u[2])) if state is ReadingState.CLAIMED else None
        )
        rows["worklist_entries"].append(
            {
                "id": study_id,
                "study_id": study_id,
                "tier": str(priority.tier),
                "tier_rank": tier_rank(priority.tier),
                "score": priority.score,
                "reason": priority.reason,
                "due_at": priority.due_at,
                "reading_state": str(state),
                "claimed_by": f"rad{study_id % 12:02d}" if claimed_at else None,
                "claimed_at": claimed_at,
                "claim_expires_at": claimed_at + timedelta(minutes=30) if claimed_at else None,
                "read_at": read_at,
                "updated_at": ranked_at,
            }
        )
        if head_ct:
            _analysis_rows(rows, study_id, uid, findings[0], completed)
    return rows


def load(conninfo: str, rows: Rows) -> None:
    """COPY every table, move the id sequences past the ids given, then VACUUM ANALYZE."""
    with psycopg.connect(conninfo) as connection, connection.cursor() as cursor:
        for table in TABLES:
            columns = list(rows[table][0])
            statement = sql.SQL("COPY {table} ({columns}) FROM STDIN").format(
                table=sql.Identifier(table),
                columns=sql.SQL(", ").join(map(sql.Identifier, columns)),
            )
            with cursor.copy(statement) as copy:
                for row in rows[table]:
                    copy.write_row([row[column] for column in columns])
            cursor.execute(
                sql.SQL(
                    "SELECT setval(pg_get_serial_sequence({name}, 'id'), max(id)) FROM {table}"
                ).format(name=sql.Literal(table), table=sql.Identifier(table))
            )
    # A database in service has statistics and a visibility map; so does this one.
    with psycopg.connect(conninfo, autocommit=True) as connection:
        connection.execute("VACUUM ANALYZE")


def fill(conninfo: str, studies: int, *, now: datetime) -> Loaded:
    """Synthesize and load the rows; count what was loaded."""
    started = time.perf_counter()
    rows = synthesize(studies, now=now)
    built = time.perf_counter()
    load(conninfo, rows)
    entries = rows["worklist_entries"]
    open_tiers = [e["tier"] for e in entries if e["reading_state"] != ReadingState.READ]
    states = [e["reading_state"] for e in entries]
    modalities = [s["modalities"] for s in rows["studies"]]
    return Loaded(
        studies=studies,
        jobs=len(rows["jobs"]),
        findings=len(rows["findings"]),
        open_entries=len(open_tiers),
        tiers_open={tier: open_tiers.count(tier) for tier in Tier},
        reading_states={state: states.count(state) for state in ReadingState},
        modalities={value: modalities.count(value) for value, _ in MODALITIES},
        seconds=time.perf_counter() - started,
        build_seconds=built - started,
    )


# -- schema and server --------------------------------------------------------------------------


def database_url(server: str, schema: str) -> str:
    """``server`` with every connection's search_path set to ``schema``."""
    return f"{server}?options=-csearch_path%3D{schema}"


def conninfo(url: str) -> str:
    """The libpq connection string psycopg takes for a SQLAlchemy ``url``."""
    parsed = make_url(url)
    parts = {
        "host": parsed.host,
        "port": parsed.port,
        "dbname": parsed.database,
        "user": parsed.username,
        "password": parsed.password,
    }
    text = " ".join(f"{key}={value}" for key, value in parts.items() if value)
    options = parsed.query.get("options")
    if options:
        text += f" options='{options}'"
    return text


@contextlib.contextmanager
def bench_schema(server: str) -> Iterator[str]:
    """A fresh schema ``bench_<random>``, dropped with everything in it when the block ends."""
    schema = f"bench_{secrets.token_hex(4)}"
    admin = conninfo(server)
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    try:
        yield schema
    finally:
        with psycopg.connect(admin, autocommit=True) as connection:
            connection.execute(
                sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema))
            )


def bench_app() -> FastAPI:
    """The API as ``triage serve`` builds it, from TRIAGE_* variables (uvicorn's ``--factory``)."""
    settings = Settings()
    return create_app(
        settings,
        make_session_factory(create_db_engine(settings.database_url)),
        CollectorRegistry(),
    )


@contextlib.contextmanager
def api_server(url: str, data_dir: Path) -> Iterator[str]:
    """uvicorn serving :func:`bench_app` in its own process on a free port; yields its base URL."""
    port = free_port()
    env = clean_env(
        {
            "TRIAGE_DATABASE_URL": url,
            "TRIAGE_DATA_DIR": str(data_dir),
            "TRIAGE_LOG_LEVEL": "WARNING",
        }
    )
    argv = [
        sys.executable, "-m", "uvicorn", "bench.worklist:bench_app", "--factory",
        "--host", LOOPBACK, "--port", str(port), "--log-level", "warning", "--no-access-log",
    ]  # fmt: skip
    with running(argv, env=env, log_path=data_dir / "uvicorn.log", cwd=REPO_ROOT) as server:
        try:
            wait_for_port(port, process=server, timeout=120)
        except ProcessError as exc:
            log = (data_dir / "uvicorn.log").read_text(errors="replace")[-2000:]
            raise ProcessError(f"{exc}\n{log}") from exc
        yield f"http://{LOOPBACK}:{port}"


# -- measurements -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Latency:
    name: str
    samples: int
    p50_ms: float
    p99_ms: float
    min_ms: float
    max_ms: float


def latency(name: str, seconds: Sequence[float]) -> Latency:
    ms = [value * 1000 for value in seconds]
    return Latency(
        name,
        len(ms),
        round(percentile(ms, 0.50), 3),
        round(percentile(ms, 0.99), 3),
        round(min(ms), 3),
        round(max(ms), 3),
    )


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def measure_reads(
    client: httpx.Client, factory: SessionFactory, reference: psycopg.Connection[Any], *, n: int
) -> dict[str, list[float]]:
    """The first page three ways, interleaved: over HTTP, the ORM query in-process, plain SQL.
    Every API page must list the same studies, in the same order, as the reference's."""
    pages: set[tuple[str, ...]] = set()

    def api() -> None:
        response = client.get("/api/worklist", params={"limit": LIMIT})
        response.raise_for_status()
        pages.add(tuple(item["study_uid"] for item in response.json()["items"]))

    def orm() -> None:
        with session_scope(factory) as session:
            worklist(db_session=session, limit=LIMIT)

    def sql() -> None:
        reference.execute(WORKLIST_SQL, (LIMIT,)).fetchall()

    samples: dict[str, list[float]] = {"api": [], "orm": [], "sql": []}
    for index in range(WARMUP + n):
        taken = {"api": timed(api), "orm": timed(orm), "sql": timed(sql)}
        if index >= WARMUP:
            for key, value in taken.items():
                samples[key].append(value)
    expected = tuple(row[0] for row in reference.execute(WORKLIST_SQL, (LIMIT,)).fetchall())
    if pages != {expected} or len(expected) != LIMIT:
        raise ProcessError("the API's first page differs from the reference query's")
    return samples


def measure_updates(
    factory: SessionFactory,
    reference: psycopg.Connection[Any],
    study_ids: Sequence[int],
    *,
    now: datetime,
) -> dict[str, list[float]]:
    """One reprioritization per study, each in its own transaction, each followed by the
    reference: a plain UPDATE and commit of the same study's entry (the least the same change
    of the same row could cost)."""
    samples: dict[str, list[float]] = {"reprioritize": [], "update": []}
    rng = np.random.default_rng(SEED + 1)
    for index, ours in enumerate(study_ids):
        at = now + timedelta(seconds=index)

        def ranked(study_id: int = ours, at: datetime = at) -> None:
            with session_scope(factory) as session:
                study = session.get(Study, study_id)
                assert study is not None
                reprioritize(db_session=session, study=study, now=at, config=POLICY, models={})

        def updated(study_id: int = ours, at: datetime = at) -> None:
            reference.execute(UPDATE_SQL, (float(rng.random()), at, study_id))
            reference.commit()

        taken = {"reprioritize": timed(ranked), "update": timed(updated)}
        if index >= WARMUP:
            for key, value in taken.items():
                samples[key].append(value)
    return samples


def open_study_ids(reference: psycopg.Connection[Any], count: int) -> list[int]:
    rows = reference.execute(
        "SELECT study_id FROM worklist_entries WHERE reading_state IN ('unread', 'claimed')"
    ).fetchall()
    reference.commit()
    rng = np.random.default_rng(SEED + 2)
    picked = rng.choice(len(rows), size=min(count, len(rows)), replace=False)
    return [int(rows[i][0]) for i in picked]


# -- the plan -----------------------------------------------------------------------------------


def orm_statement(engine: Engine, factory: SessionFactory) -> tuple[str, Any]:
    """The SQL and parameters ``worklist()`` sends, caught on their way to the driver."""
    caught: list[tuple[str, Any]] = []

    def catch(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        caught.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", catch)
    try:
        with session_scope(factory) as session:
            worklist(db_session=session, limit=LIMIT)
    finally:
        event.remove(engine, "before_cursor_execute", catch)
    return next(item for item in caught if "worklist_entries" in item[0])


def explain(engine: Engine, statement: str, parameters: Any) -> dict[str, Any]:
    with engine.connect() as connection:
        plan = connection.exec_driver_sql(
            "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + statement, parameters
        ).scalar_one()
    return dict((json.loads(plan) if isinstance(plan, str) else plan)[0])


def _nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from _nodes(child)


def _describe_node(node: dict[str, Any]) -> str:
    text = str(node["Node Type"])
    if "Index Name" in node:
        text += f" {node['Index Name']}"
    elif "Relation Name" in node:
        text += f" {node['Relation Name']}"
    details = []
    if "Sort Method" in node:
        details.append(str(node["Sort Method"]))
    if "Presorted Key" in node:
        details.append("presorted " + ", ".join(node["Presorted Key"]))
    if node["Node Type"] not in ("Limit", "Hash"):
        details.append(f"{node['Actual Rows'] * node.get('Actual Loops', 1):,} rows")
    return text + (f" ({'; '.join(details)})" if details else "")


def summarize_plan(plan: dict[str, Any]) -> dict[str, Any]:
    """The plan in one line; which indexes it reads; whether it sorts every candidate entry (a
    Sort node) or reads the first page in index order (at most an Incremental Sort of ties)."""
    nodes = list(_nodes(plan["Plan"]))
    sorted_rows = [
        int(child["Actual Rows"]) * int(child.get("Actual Loops", 1))
        for node in nodes
        if node["Node Type"] == "Sort"
        for child in node.get("Plans", [])
    ]
    return {
        "plan": " > ".join(_describe_node(node) for node in nodes),
        "indexes_used": sorted({str(node["Index Name"]) for node in nodes if "Index Name" in node}),
        "uses_order_index": any(n.get("Index Name") == ORDER_INDEX for n in nodes),
        "reads_in_index_order": not sorted_rows,
        "rows_sorted": sum(sorted_rows),
        "worklist_entries_rows_read": sum(
            int(node["Actual Rows"]) * int(node.get("Actual Loops", 1))
            for node in nodes
            if node.get("Relation Name") == "worklist_entries"
        ),
        "execution_ms": round(float(plan["Execution Time"]), 3),
        "planning_ms": round(float(plan["Planning Time"]), 3),
    }


# -- run and report -----------------------------------------------------------------------------


def ratio(ours: Latency, reference: Latency) -> dict[str, float]:
    return {
        "p50": round(ours.p50_ms / reference.p50_ms, 2),
        "p99": round(ours.p99_ms / reference.p99_ms, 2),
    }


def measure_all(
    url: str, data_dir: Path, *, requests: int, now: datetime, without_index: bool
) -> dict[str, Any]:
    engine = create_db_engine(url)
    factory = make_session_factory(engine)
    results: dict[str, Any] = {}
    try:
        with session_scope(factory) as session:
            token = create_token(db_session=session, name="bench", role=TokenRole.RADIOLOGIST)
        with (
            psycopg.connect(conninfo(url), autocommit=True) as reader,
            psycopg.connect(conninfo(url)) as writer,
            api_server(url, data_dir) as base_url,
            httpx.Client(
                base_url=base_url, headers={"Authorization": f"Bearer {token}"}, timeout=60
            ) as client,
        ):
            reads = measure_reads(client, factory, reader, n=requests)
            results["api"] = latency("GET /api/worklist?limit=50 (HTTP)", reads["api"])
            results["orm"] = latency("worklist() in-process (ORM, no HTTP)", reads["orm"])
            results["sql"] = latency("reference: the same SELECT, psycopg", reads["sql"])
            studies = open_study_ids(writer, WARMUP + requests)
            updates = measure_updates(factory, writer, studies, now=now)
            results["reprioritize"] = latency(
                "reprioritize() + commit, own transaction", updates["reprioritize"]
            )
            results["update"] = latency("reference: UPDATE + commit, psycopg", updates["update"])
            statement, parameters = orm_statement(engine, factory)
            results["plan"] = summarize_plan(explain(engine, statement, parameters))
            results["sql_plan"] = summarize_plan(explain(engine, WORKLIST_SQL, (LIMIT,)))
            if without_index:
                writer.execute(DROP_INDEX)
                writer.execute("ANALYZE worklist_entries")
                writer.commit()
                reads = measure_reads(client, factory, reader, n=requests)
                results["without_index"] = {
                    "index": ORDER_INDEX,
                    "api": latency("GET /api/worklist?limit=50 (HTTP)", reads["api"]),
                    "orm": latency("worklist() in-process (ORM, no HTTP)", reads["orm"]),
                    "sql": latency("reference: the same SELECT, psycopg", reads["sql"]),
                    "plan": summarize_plan(explain(engine, statement, parameters)),
                }
    finally:
        engine.dispose()
    return results


def report(
    loaded: Loaded,
    results: dict[str, Any],
    *,
    requests: int,
    server_version: str,
    load_before: tuple[float, float, float],
) -> dict[str, Any]:
    data: dict[str, Any] = {
        "benchmark": "bench/worklist",
        "date": today(),
        "machine": machine(),
        "postgresql": server_version,
        "load_average_1min": {"before": load_before[0], "after": os.getloadavg()[0]},
        "data": asdict(loaded),
        "requests": requests,
        "warmup": WARMUP,
        "results": {
            key: asdict(results[key]) for key in ("api", "orm", "sql", "reprioritize", "update")
        },
        "ratios": {
            "api_over_sql": ratio(results["api"], results["sql"]),
            "orm_over_sql": ratio(results["orm"], results["sql"]),
            "reprioritize_over_update": ratio(results["reprioritize"], results["update"]),
        },
        "orm_plan": results["plan"],
        "sql_plan": results["sql_plan"],
        "order_index": ORDER_INDEX,
        "note": NOTE,
    }
    if "without_index" in results:
        extra = results["without_index"]
        data["without_order_index"] = {
            "index": extra["index"],
            "results": {key: asdict(extra[key]) for key in ("api", "orm", "sql")},
            "ratios": {
                "api_over_sql": ratio(extra["api"], extra["sql"]),
                "orm_over_sql": ratio(extra["orm"], extra["sql"]),
            },
            "orm_plan": extra["plan"],
        }
    return data


def _print_latencies(rows: Sequence[dict[str, Any]]) -> None:
    print(f"{'':<44}{'p50 ms':>9}{'p99 ms':>9}{'min ms':>9}{'max ms':>9}")
    for row in rows:
        print(
            f"{row['name']:<44}{row['p50_ms']:>9.2f}{row['p99_ms']:>9.2f}"
            f"{row['min_ms']:>9.2f}{row['max_ms']:>9.2f}"
        )


def _print_plan(label: str, plan: dict[str, Any]) -> None:
    indexes = ", ".join(plan["indexes_used"]) or "none"
    verdict = "uses" if plan["uses_order_index"] else "does NOT use"
    if plan["reads_in_index_order"]:
        how = f"reads the first {LIMIT} in index order"
    else:
        how = f"sorts {plan['rows_sorted']:,} joined rows to return {LIMIT}"
    print(
        f"{label}: {verdict} {ORDER_INDEX}; {how}; {plan['worklist_entries_rows_read']:,} "
        f"worklist_entries rows read; indexes used: {indexes}; {plan['execution_ms']:.2f} ms, "
        f"planning {plan['planning_ms']:.2f} ms"
    )
    print(f"  plan: {plan['plan']}")


def print_text(data: dict[str, Any]) -> None:
    loaded = data["data"]
    print(f"bench/worklist  {data['date']}  {data['machine']}")
    print(f"PostgreSQL {data['postgresql']}")
    load = data["load_average_1min"]
    print(f"1-min load average: {load['before']:.2f} before, {load['after']:.2f} after")
    tiers = ", ".join(f"{tier} {count:,}" for tier, count in loaded["tiers_open"].items())
    states = ", ".join(f"{state} {count:,}" for state, count in loaded["reading_states"].items())
    modalities = ", ".join(f"{name} {count:,}" for name, count in loaded["modalities"].items())
    print(
        f"data: {loaded['studies']:,} studies ({modalities}), {loaded['jobs']:,} jobs, "
        f"{loaded['findings']:,} findings; loaded in {loaded['seconds']:.1f} s "
        f"({loaded['build_seconds']:.1f} s of it building the rows)"
    )
    print(f"  reading states: {states}; open entries by tier: {tiers}")
    print(f"{data['requests']} timed operations of each kind after {data['warmup']} warm-up")
    print()
    results = data["results"]
    _print_latencies([results[key] for key in ("api", "orm", "sql", "reprioritize", "update")])
    print()
    print(f"{'ratio ours/reference':<44}{'p50':>9}{'p99':>9}")
    for key, label in (
        ("api_over_sql", "GET /api/worklist / SELECT"),
        ("orm_over_sql", "worklist() / SELECT"),
        ("reprioritize_over_update", "reprioritize() / UPDATE"),
    ):
        values = data["ratios"][key]
        print(f"{label:<44}{values['p50']:>9.2f}{values['p99']:>9.2f}")
    print()
    _print_plan("ORM query (EXPLAIN ANALYZE)", data["orm_plan"])
    _print_plan("reference SELECT", data["sql_plan"])
    extra = data.get("without_order_index")
    if extra:
        print()
        print(f"without the order index ({extra['index']} dropped):")
        _print_latencies([extra["results"][key] for key in ("api", "orm", "sql")])
        print(f"{'ratio ours/reference':<44}{'p50':>9}{'p99':>9}")
        for key, label in (
            ("api_over_sql", "GET /api/worklist / SELECT"),
            ("orm_over_sql", "worklist() / SELECT"),
        ):
            values = extra["ratios"][key]
            print(f"{label:<44}{values['p50']:>9.2f}{values['p99']:>9.2f}")
        _print_plan("ORM query (EXPLAIN ANALYZE)", extra["orm_plan"])
    print()
    print(f"note: {data['note']}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argument_parser("bench.worklist", __doc__)
    parser.add_argument("--studies", type=int, default=100_000, help="studies loaded (100000)")
    parser.add_argument(
        "--requests",
        type=int,
        default=200,
        help=f"timed operations of each kind, after {WARMUP} warm-up ones (200)",
    )
    parser.add_argument(
        "--server",
        default=DEFAULT_SERVER,
        help=f"PostgreSQL database the bench schema is created in ({DEFAULT_SERVER})",
    )
    parser.add_argument(
        "--without-index",
        action="store_true",
        help=f"afterwards, drop {ORDER_INDEX} in the bench schema and measure reads again",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    args = parser.parse_args(argv)
    if args.studies < 1000 or args.requests < 10:
        parser.error("--studies must be at least 1000 and --requests at least 10")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    load_before = os.getloadavg()
    progress = not args.json
    try:
        with (
            bench_schema(args.server) as schema,
            tempfile.TemporaryDirectory(prefix="bench-worklist-") as work,
        ):
            url = database_url(args.server, schema)
            engine = create_db_engine(url)
            try:
                migrate.upgrade(engine)
            finally:
                engine.dispose()
            now = datetime.now(UTC)
            if progress:
                print(f"loading {args.studies:,} studies into {schema} ...", file=sys.stderr)
            loaded = fill(conninfo(url), args.studies, now=now)
            if progress:
                print(f"  loaded in {loaded.seconds:.1f} s; measuring ...", file=sys.stderr)
            results = measure_all(
                url, Path(work), requests=args.requests, now=now, without_index=args.without_index
            )
            with psycopg.connect(conninfo(url)) as connection:
                row = connection.execute("SHOW server_version").fetchone()
            version = str(row[0]) if row else "?"
    except (ProcessError, psycopg.Error, SQLAlchemyError, httpx.HTTPError, OSError) as exc:
        print(f"bench/worklist failed: {exc}", file=sys.stderr)
        return 1
    data = report(
        loaded, results, requests=args.requests, server_version=version, load_before=load_before
    )
    return emit(data, as_json=args.json, text=print_text)


if __name__ == "__main__":
    sys.exit(main())
