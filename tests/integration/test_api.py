"""The HTTP API against PostgreSQL: order, filters, reading states, tokens and roles."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from sqlalchemy import Engine

from tests.conftest import migrated_engine
from triage.api.app import create_app
from triage.api.tokens import create_token
from triage.config import Settings
from triage.db.base import utcnow
from triage.db.models import Finding, Job, Study
from triage.db.session import SessionFactory, make_session_factory, session_scope
from triage.domain import StudyStatus, TokenRole, WorkState
from triage.worklist.policy import PolicyConfig
from triage.worklist.service import reprioritize

pytestmark = pytest.mark.postgres


@pytest.fixture
def pg_engine(postgres_url: str) -> Iterator[Engine]:
    yield from migrated_engine(postgres_url)


@pytest.fixture
def factory(pg_engine: Engine) -> SessionFactory:
    return make_session_factory(pg_engine)


@pytest.fixture
def client(factory: SessionFactory, data_dir: Path, postgres_url: str) -> Iterator[TestClient]:
    settings = Settings(
        data_dir=data_dir,
        database_url=postgres_url,
        viewer_url_template="https://viewer.example/?StudyInstanceUIDs={study_uid}",
    )
    app = create_app(settings, factory, CollectorRegistry())
    with TestClient(app) as test_client:
        yield test_client


def token(factory: SessionFactory, name: str, role: TokenRole) -> dict[str, str]:
    with session_scope(factory) as session:
        secret = create_token(db_session=session, name=name, role=role)
    return {"Authorization": f"Bearer {secret}"}


def add_study(
    factory: SessionFactory,
    uid: str,
    *,
    minutes_ago: float,
    modality: str = "CT",
    priority: str | None = None,
    critical_probability: float | None = None,
    name: str = "DOE^JANE",
) -> None:
    """A study as the pipeline leaves it, then ranked by the real worklist service."""
    now = utcnow()
    with session_scope(factory) as session:
        study = Study(
            study_uid=uid,
            status=StudyStatus.ANALYZED,
            patient_name=name,
            modalities=modality,
            order_priority=priority,
            analysis_round=1,
            first_received_at=now - timedelta(minutes=minutes_ago),
            last_received_at=now - timedelta(minutes=minutes_ago),
        )
        session.add(study)
        session.flush()
        if critical_probability is not None:
            job = Job(
                study_id=study.id, model_name="ich", model_version="1", state=WorkState.DONE,
                round=1,
            )  # fmt: skip
            session.add(job)
            session.flush()
            session.add(
                Finding(
                    job_id=job.id, ordinal=0, kind="score", label="ich", code_scheme="SCT",
                    code_value="1386000", code_meaning="Intracranial hemorrhage",
                    probability=critical_probability, positive=critical_probability >= 0.5,
                )
            )  # fmt: skip
            session.flush()
        reprioritize(db_session=session, study=study, now=now, config=PolicyConfig(), models={})


@pytest.fixture
def seeded(factory: SessionFactory) -> None:
    add_study(factory, "1.2.1", minutes_ago=300)  # routine, oldest
    add_study(factory, "1.2.2", minutes_ago=5)  # routine, newest
    add_study(factory, "1.2.3", minutes_ago=1, priority="STAT", modality="MR")  # urgent
    add_study(factory, "1.2.4", minutes_ago=0.5, critical_probability=0.97)  # critical
    add_study(factory, "1.2.5", minutes_ago=2, critical_probability=0.10)  # negative


def uids(response: dict[str, object]) -> list[str]:
    items = response["items"]
    assert isinstance(items, list)
    return [item["study_uid"] for item in items]


def test_tokens_and_roles(client: TestClient, factory: SessionFactory, seeded: None) -> None:
    assert client.get("/healthz").status_code == 200
    assert client.get("/api/worklist").status_code == 401
    assert client.get("/metrics").status_code == 401
    bad = {"Authorization": "Bearer trg_not-a-real-token"}
    assert client.get("/api/worklist", headers=bad).status_code == 401
    radiologist = token(factory, "dr.a", TokenRole.RADIOLOGIST)
    admin = token(factory, "admin", TokenRole.ADMIN)
    assert client.get("/api/worklist", headers=radiologist).status_code == 200
    assert client.get("/metrics", headers=radiologist).status_code == 200
    assert client.post("/api/studies/1.2.1/reprocess", headers=radiologist).status_code == 403
    # An admin may ask; there is no routing rule for this study, which the answer says.
    answer = client.post("/api/studies/1.2.1/reprocess", headers=admin)
    assert answer.status_code == 409
    assert "routing rule" in answer.json()["detail"]
    # A token query parameter is accepted only by the event stream.
    secret = radiologist["Authorization"].removeprefix("Bearer ")
    assert client.get(f"/api/worklist?token={secret}").status_code == 401


def test_order_filters_and_pagination(
    client: TestClient, factory: SessionFactory, seeded: None
) -> None:
    headers = token(factory, "dr.a", TokenRole.RADIOLOGIST)
    listing = client.get("/api/worklist", headers=headers).json()
    assert uids(listing) == ["1.2.4", "1.2.3", "1.2.1", "1.2.2", "1.2.5"]
    first = listing["items"][0]
    assert first["tier"] == "critical"
    assert "Intracranial hemorrhage" in first["reason"]
    assert first["viewer_url"] == "https://viewer.example/?StudyInstanceUIDs=1.2.4"
    assert listing["items"][1]["tier"] == "urgent"

    def get(query: str) -> list[str]:
        return uids(client.get(f"/api/worklist?{query}", headers=headers).json())

    assert get("tier=routine") == ["1.2.1", "1.2.2", "1.2.5"]
    assert get("modality=MR") == ["1.2.3"]
    assert get("limit=2") == ["1.2.4", "1.2.3"]
    assert get("limit=2&offset=2") == ["1.2.1", "1.2.2"]
    assert client.get("/api/worklist?limit=0", headers=headers).status_code == 422
    assert client.get("/api/worklist?tier=bogus", headers=headers).status_code == 422


def test_claim_release_read(client: TestClient, factory: SessionFactory, seeded: None) -> None:
    alice = token(factory, "dr.alice", TokenRole.RADIOLOGIST)
    bob = token(factory, "dr.bob", TokenRole.RADIOLOGIST)
    admin = token(factory, "admin", TokenRole.ADMIN)
    claimed = client.post("/api/studies/1.2.4/claim", headers=alice)
    assert claimed.status_code == 200
    assert claimed.json()["claimed_by"] == "dr.alice"
    assert client.post("/api/studies/1.2.4/claim", headers=bob).status_code == 409
    assert client.post("/api/studies/1.2.4/release", headers=bob).status_code == 403
    assert client.post("/api/studies/1.2.4/read", headers=bob).status_code == 403
    assert client.post("/api/studies/1.2.4/release", headers=admin).status_code == 200
    assert client.post("/api/studies/1.2.4/claim", headers=bob).status_code == 200
    assert client.post("/api/studies/1.2.4/read", headers=bob).status_code == 200
    assert "1.2.4" not in uids(client.get("/api/worklist", headers=alice).json())
    read = client.get("/api/worklist?state=read", headers=alice).json()
    assert uids(read) == ["1.2.4"]
    assert client.post("/api/studies/1.2.4/claim", headers=alice).status_code == 409
    assert client.post("/api/studies/9.9.9/claim", headers=alice).status_code == 404


def test_study_record(client: TestClient, factory: SessionFactory, seeded: None) -> None:
    headers = token(factory, "dr.a", TokenRole.RADIOLOGIST)
    record = client.get("/api/studies/1.2.4", headers=headers).json()
    assert record["status"] == "analyzed"
    (job,) = record["jobs"]
    assert job["findings"][0]["meaning"] == "Intracranial hemorrhage"
    (change,) = record["priority_history"]
    assert change["new_tier"] == "critical"
    assert change["old_tier"] is None
    assert client.get("/api/studies/9.9.9", headers=headers).status_code == 404
    assert client.get("/api/openapi.json").status_code == 200


def test_pages_and_their_shared_files_need_no_token(client: TestClient) -> None:
    for path in ("/", "/admin"):
        page = client.get(path)
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert '<link rel="stylesheet" href="/static/common.css">' in page.text
        assert '<script src="/static/common.js"></script>' in page.text
    for name, media_type, sample in (
        ("common.css", "text/css", ".signin"),
        ("common.js", "text/javascript", "async function api("),
    ):
        shared = client.get(f"/static/{name}")
        assert shared.status_code == 200
        assert shared.headers["content-type"] == f"{media_type}; charset=utf-8"
        assert shared.headers["cache-control"] == "no-store"
        assert shared.headers["x-content-type-options"] == "nosniff"
        assert sample in shared.text
    # Only the shared files: not the pages, not other files, not a way out of the folder.
    for path in ("/static/unknown.js", "/static/worklist.html", "/static/..%2Fapp.py"):
        assert client.get(path).status_code == 404
