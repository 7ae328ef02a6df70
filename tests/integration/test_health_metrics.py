"""``triage serve``'s /metrics gives the health ``triage-admin status`` and /healthz/detail give:
components, workers and each destination's state, backlog, failures, last success and pause;
and a scrape still answers when the database cannot be read (for a token it verified before)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, make_url, select, text

from tests.conftest import StackFactory, free_port
from tests.helpers.pipeline import analysed_phantom
from tests.helpers.process import admin_with, create_token, serve_env, serving, wait_for
from triage.config import DimseDestination, Settings
from triage.db.models import Delivery
from triage.db.session import session_scope
from workers.dispatch import dispatch

pytestmark = pytest.mark.slow

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(env: dict[str, str], token: str) -> Samples:
    answer = httpx.get(
        f"http://127.0.0.1:{env['TRIAGE_HTTP_PORT']}/metrics",
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def status_json(env: dict[str, str]) -> dict[str, object]:
    result = admin_with(env, "status", "--json")
    assert result.returncode in (0, 3), result.stderr
    health: dict[str, object] = json.loads(result.stdout)["health"]
    return health


def test_metrics_give_what_status_gives_of_a_destination_with_results_waiting(
    settings: Settings, tmp_path: Path, stack_factory: StackFactory
) -> None:
    closed = DimseDestination(ae_title="PACS", host="127.0.0.1", port=free_port())  # nothing there
    settings = settings.model_copy(update={"destinations": [closed]})
    _, factory, context = analysed_phantom(settings, stack_factory, tmp_path)
    with session_scope(factory) as session:
        deliveries = list(session.scalars(select(Delivery.id)))
    assert deliveries  # SEG, SR and KOS for the destination
    assert dispatch(context, deliveries[0]).state == "retrying"  # its last error recorded

    env = serve_env(
        settings.data_dir,
        database_url=settings.database_url,
        destinations=json.dumps([closed.name]),  # AE@host:port, the same name
    )
    with serving(env, tmp_path / "serve.log"):
        token = create_token(env, "prometheus", "admin")
        # The embedded broker exists once serve has created it; nothing consumes it (no workers),
        # so the backlog stays as it is while both are asked.
        wait_for(
            lambda: value(scrape(env, token), "triage_component_up", component="broker") == 1,
            timeout=60,
            what="the broker to be up in the metrics",
        )
        samples = scrape(env, token)
        health = status_json(env)

    assert value(samples, "triage_component_up", component="database") == 1
    assert value(samples, "triage_component_up", component="serve") == 1
    assert value(samples, "triage_healthy") == 0  # the destination is down, no workers

    checks = {c["name"]: c["state"] for c in health["checks"]}  # type: ignore[attr-defined]
    shared = {"database", "serve", "broker", "workers: inference", "workers: dispatch"}
    assert shared <= checks.keys()
    for name in shared:
        expected = {"up": 1.0, "down": 0.0}.get(checks[name])
        assert value(samples, "triage_component_up", component=name) == expected, name
    for queue in ("inference", "dispatch"):
        live = sum(1 for w in health["workers"] if queue in w["queues"])  # type: ignore[attr-defined]
        assert value(samples, "triage_workers_live", queue=queue) == live == 0

    (line,) = health["destinations"]  # type: ignore[misc]
    assert line["name"] == closed.name
    assert line["state"] == "down"
    assert line["backlog"] == len(deliveries)
    dest = {"destination": closed.name}
    assert value(samples, "triage_destination_up", **dest) == 0
    assert value(samples, "triage_destination_backlog", **dest) == line["backlog"]
    assert value(samples, "triage_destination_failed", **dest) == line["failed"] == 0
    assert value(samples, "triage_destination_paused", **dest) == (
        0 if line["paused_until"] is None else 1
    )
    assert line["last_success_at"] is None
    assert value(samples, "triage_destination_last_success_timestamp_seconds", **dest) is None
    # The other metrics are still there beside the health.
    assert value(samples, "triage_bytes_received_total") is not None


@pytest.mark.postgres
def test_a_scrape_with_the_database_unreadable_says_the_database_is_down(
    tmp_path: Path, postgres_url: str, postgres_admin_engine: Engine
) -> None:
    schema = make_url(postgres_url).query["options"].rpartition("=")[2]
    assert schema.startswith("t_")
    env = serve_env(tmp_path / "data", database_url=postgres_url)
    with serving(env, tmp_path / "serve.log"):
        token = create_token(env, "prometheus", "admin")
        unseen = create_token(env, "never-scraped", "admin")
        before = scrape(env, token)
        assert value(before, "triage_component_up", component="database") == 1
        assert value(before, "triage_workers_live", queue="inference") == 0

        # The schema gone from the search path: every query of triage fails.
        with postgres_admin_engine.begin() as connection:
            connection.execute(text(f'ALTER SCHEMA "{schema}" RENAME TO "{schema}_away"'))
        try:
            during = scrape(env, token)  # verified before: remembered
            refused = httpx.get(
                f"http://127.0.0.1:{env['TRIAGE_HTTP_PORT']}/metrics",
                headers={"Authorization": f"Bearer {unseen}"},
                timeout=30,
            )
        finally:
            with postgres_admin_engine.begin() as connection:
                connection.execute(text(f'ALTER SCHEMA "{schema}_away" RENAME TO "{schema}"'))
        after = scrape(env, token)

    assert refused.status_code == 503  # a token it cannot check now is not taken
    assert value(during, "triage_component_up", component="database") == 0
    assert value(during, "triage_healthy") == 0
    assert value(during, "triage_component_up", component="serve") == 1
    assert value(during, "triage_workers_live", queue="inference") is None  # unknown
    assert value(during, "triage_bytes_received_total") is not None  # the rest still comes
    assert value(after, "triage_component_up", component="database") == 1
