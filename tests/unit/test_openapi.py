"""The API documents what it answers: every route that returns JSON has a response schema."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from triage.api.app import create_app
from triage.config import Settings
from triage.db.session import create_db_engine, make_session_factory


def _spec(tmp_path: Path) -> dict[str, Any]:
    settings = Settings(data_dir=tmp_path)
    factory = make_session_factory(create_db_engine(settings.database_url))
    app = create_app(settings, factory, CollectorRegistry())
    spec: dict[str, Any] = TestClient(app).get("/api/openapi.json").json()
    return spec


def test_every_json_response_has_a_schema(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    json_responses = 0
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            for code, response in operation["responses"].items():
                content = response.get("content", {})
                if "application/json" not in content:
                    continue
                json_responses += 1
                schema = content["application/json"]["schema"]
                # FastAPI writes an empty schema for a route that declares no response model.
                assert schema, f"{method.upper()} {path} -> {code}: no response schema"
    assert json_responses >= 10


def test_the_documented_routes_name_their_models(tmp_path: Path) -> None:
    paths = _spec(tmp_path)["paths"]

    def ok_schema(path: str, method: str = "get", code: str = "200") -> str:
        ref: str = paths[path][method]["responses"][code]["content"]["application/json"]["schema"][
            "$ref"
        ]
        return ref.rsplit("/", 1)[-1]

    assert ok_schema("/api/worklist") == "WorklistPage"
    assert ok_schema("/api/studies/{study_uid}") == "StudyRecord"
    assert ok_schema("/api/studies/{study_uid}/claim", "post") == "ReadingStatus"
    assert ok_schema("/api/studies/{study_uid}/reprocess", "post", "202") == "Reprocessing"
    assert ok_schema("/healthz") == "Health"
    assert ok_schema("/healthz", code="503") == "Unhealthy"
    # Non-JSON routes say what they return instead.
    assert "text/plain" in paths["/metrics"]["get"]["responses"]["200"]["content"]
    assert "text/event-stream" in paths["/api/events"]["get"]["responses"]["200"]["content"]
