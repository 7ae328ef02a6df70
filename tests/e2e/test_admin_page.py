"""The administrators' page (``/admin``) in a real headless Chromium against a real
``triage serve``: model monitoring from ``GET /api/models/stats`` with its drift banner.

Runs are written straight into the server's database, as workers would leave them: 60 studies
of the reference model whose scores all sit near 0.3, far from its bimodal reference
distribution (drift), and a few runs of a second "model" whose name is markup. The page must
show the API's numbers, name the drifting model in its banner, draw both plots as described
SVG, show the hostile name as text, and turn a radiologist's token away.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from sqlalchemy.orm import Session

from tests.conftest import free_port
from tests.e2e.support import (
    REPO_ROOT,
    XSS_NAME,
    Server,
    assert_no_alert,
    console_errors,
    screenshot,
    wait_until,
)
from triage.api.tokens import create_token
from triage.catalog import BUNDLED_MODELS_DIR
from triage.db.base import utcnow
from triage.db.models import Feedback, Finding, Job, Study
from triage.db.session import create_db_engine, make_session_factory, session_scope
from triage.domain import ModelMode, StudyStatus, TokenRole, Verdict, WorkState

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

MODEL = "ct-head-hyperdensity"
VERSION = "1.0.0"
HOSTILE_VERSION = "0.0.1"
STUDIES = 60
FAILED = 2
# Bimodal, like the reference model's validation scores: near 0 or near 1, little between.
TEST_REFERENCE = {
    "edges": [0, 0.1, 0.5, 0.9, 1.0],
    "proportions": [0.45, 0.05, 0.05, 0.45],
    "cases": 200,
    "measured_on": "test",
}
DASH = "\u2014"
DONE = WorkState.DONE
SVG_NS = "http://www.w3.org/2000/svg"


def bundled_reference() -> dict[str, Any] | None:
    sidecar = json.loads((BUNDLED_MODELS_DIR / MODEL / "model.json").read_text())
    reference: dict[str, Any] | None = sidecar.get("score_reference")
    return reference


@pytest.fixture
def admin_server(tmp_path: Path, data_dir: Path) -> Iterator[Server]:
    """``triage serve`` on free ports, no workers; the reference model carries a score
    reference (its own when the bundled sidecar has one, else a test sidecar of the same name
    and version in TRIAGE_MODELS_DIR, which takes precedence)."""
    http_port, dicom_port = free_port(), free_port()
    env = {
        "TRIAGE_DATA_DIR": str(data_dir),
        "TRIAGE_DICOM_PORT": str(dicom_port),
        "TRIAGE_HTTP_PORT": str(http_port),
        "TRIAGE_WORKERS": "0",
        "TRIAGE_ROUTING_RULES": "[]",
        "TRIAGE_SPOOL_MIN_FREE_MB": "1",
        # 60 studies give a verdict (the default asks for 100)
        "TRIAGE_DRIFT_MIN_STUDIES": "50",
    }
    if bundled_reference() is None:
        models_dir = tmp_path / "models"
        (models_dir / MODEL).mkdir(parents=True)
        sidecar = {
            "name": MODEL,
            "version": VERSION,
            "format": "python",
            "entry": "tests.helpers.negative_model:load",
            "finding": {"code": "1386000", "scheme": "SCT", "meaning": "Intracranial hemorrhage"},
            "score_reference": TEST_REFERENCE,
        }
        (models_dir / MODEL / "model.json").write_text(json.dumps(sidecar))
        env["TRIAGE_MODELS_DIR"] = str(models_dir)
    server = Server(http_port, dicom_port, data_dir, env, tmp_path / "serve.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def finding(ordinal: int, kind: str, probability: float, positive: bool) -> Finding:
    return Finding(
        ordinal=ordinal,
        kind=kind,
        label="intracranial_hemorrhage",
        code_scheme="SCT",
        code_value="1386000",
        code_meaning="Intracranial hemorrhage",
        probability=probability,
        positive=positive,
    )


def add_run(
    session: Session, index: int, model: str, version: str, *, days_ago: int, state: WorkState
) -> tuple[Study, Job]:
    """A study and its finished run, as a worker leaves them (findings added by the caller)."""
    at = utcnow() - timedelta(days=days_ago, minutes=index)
    study = Study(
        study_uid=f"1.2.826.0.1.3680043.10.999.{index}",
        status=StudyStatus.ANALYZED,
        analysis_round=1,
        first_received_at=at,
        last_received_at=at,
        completed_at=at,
    )
    job = Job(
        model_name=model,
        model_version=version,
        state=state,
        round=1,
        attempts=1,
        mode=ModelMode.CLINICAL,
        started_at=at,
        finished_at=at,
        timings={"load": 0.25, "model": 1.0 + (index % 5) / 10},
        reason="out of memory" if state == WorkState.FAILED else None,
    )
    study.jobs.append(job)
    session.add(study)
    return study, job


@contextmanager
def in_database(data_dir: Path) -> Iterator[Session]:
    """A session on the server's SQLite database, committed at the end."""
    engine = create_db_engine(f"sqlite:///{data_dir / 'triage.sqlite'}")
    try:
        with session_scope(make_session_factory(engine)) as session:
            yield session
    finally:
        engine.dispose()


def write_runs(data_dir: Path) -> tuple[str, str]:
    """The runs (and a little feedback) workers and readers would leave; returns an admin
    token and a radiologist token."""
    with in_database(data_dir) as session:
        positives: list[tuple[Study, Job]] = []
        for index in range(STUDIES):
            # Scores near 0.3: the reference has 5 % there, so the PSI is far above 0.25.
            study, job = add_run(session, index, MODEL, VERSION, days_ago=index % 4, state=DONE)
            job.findings.append(finding(0, "score", 0.25 + (index % 11) / 100, False))
            if index % 5 == 0:  # a fifth with a positive lesion: a 20 % positive rate
                job.findings.append(finding(1, "lesion", 0.9, True))
                positives.append((study, job))
        for index in range(STUDIES, STUDIES + FAILED):
            add_run(session, index, MODEL, VERSION, days_ago=1, state=WorkState.FAILED)
        for index in range(STUDIES + FAILED, STUDIES + FAILED + 5):  # no score reference
            _, job = add_run(session, index, XSS_NAME, HOSTILE_VERSION, days_ago=0, state=DONE)
            job.findings.append(finding(0, "score", (index % 5) / 5 + 0.1, index % 2 == 0))
        session.flush()
        # Readers' verdicts: on positive findings 2 agree and 1 disagree (PPV 2/3); one more
        # agree on a negative call (agreement 3/4).
        verdicts = [
            (Verdict.AGREE, True),
            (Verdict.AGREE, True),
            (Verdict.DISAGREE, True),
            (Verdict.AGREE, False),
        ]
        for (study, job), (verdict, positive) in zip(positives, verdicts, strict=False):
            session.add(
                Feedback(
                    study_id=study.id,
                    finding_id=job.findings[1 if positive else 0].id,
                    model_name=MODEL,
                    model_version=VERSION,
                    label="intracranial_hemorrhage",
                    probability=0.9 if positive else job.findings[0].probability,
                    positive=positive,
                    verdict=verdict,
                    reader="dr.reader",
                    at=utcnow(),
                )
            )
        admin = create_token(db_session=session, name="e2e.admin", role=TokenRole.ADMIN)
        reader = create_token(db_session=session, name="e2e.reader", role=TokenRole.RADIOLOGIST)
        return admin, reader


def stats(server: Server, token: str) -> httpx.Response:
    return httpx.get(
        f"{server.url}/api/models/stats?days=30",
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )


# One JavaScript call reads every card: what each shows, as text and as the raw values.
_CARDS_JS = """
return Array.from(document.querySelectorAll('#cards > article.card'), card => {
  const text = selector => (card.querySelector(selector) || {}).textContent || '';
  const svg = selector => {
    const node = card.querySelector(selector);
    return node ? {
      role: node.getAttribute('role'),
      label: node.getAttribute('aria-label') || '',
      bars: Array.from(node.querySelectorAll('rect.bar'), r => ({
        cls: r.getAttribute('class'), height: r.getBBox().height,
        day: r.dataset.day || null, analysed: r.dataset.analysed || null,
        bin: r.dataset.bin || null, count: r.dataset.count || null,
      })),
      width: node.getBoundingClientRect().width,
      ns: node.namespaceURI,
    } : null;
  };
  const stats = {};
  for (const item of card.querySelectorAll('dl.totals > div')) {
    stats[item.dataset.stat] = {
      text: item.querySelector('dd .value').textContent,
      value: JSON.parse(item.querySelector('dd').dataset.value),
    };
  }
  const tables = Array.from(card.querySelectorAll('details.numbers table'), table =>
    Array.from(table.querySelectorAll('tbody tr'), tr =>
      Array.from(tr.children, cell => cell.textContent)));
  return {
    model: card.dataset.model,
    version: card.dataset.version,
    name: text('.model-name'),
    versionText: text('.model-version'),
    mode: text('.mode'),
    chip: text('.chip'),
    verdict: text('.drift-verdict'),
    stats,
    days: svg('svg.plot-days'),
    scores: svg('svg.plot-scores'),
    tables,
    top: card.getBoundingClientRect().top,
    right: card.getBoundingClientRect().right,
  };
});
"""


def cards(driver: WebDriver) -> dict[tuple[str, str], dict[str, Any]]:
    found: list[dict[str, Any]] = driver.execute_script(_CARDS_JS)
    return {(card["model"], card["version"]): card for card in found}


def rate(value: float | None) -> str:
    """The page's percentage: at most one decimal, none when it is whole; rounded as the
    page's Number.prototype.toFixed does (an exact tie goes up, where round() goes to even)."""
    if value is None:
        return DASH
    tenths = Decimal(value * 100).quantize(Decimal("0.1"), rounding=ROUND_HALF_UP)
    return f"{tenths:f}".removesuffix(".0") + "%"


def test_admin_page_shows_model_monitoring_and_drift(
    admin_server: Server, browser: WebDriver, tmp_path: Path
) -> None:
    driver = browser
    shots = tmp_path / "screenshots"
    server = admin_server
    admin, reader = write_runs(server.data_dir)

    # The API's answer: the page must show exactly these numbers.
    assert stats(server, reader).status_code == 403
    reply = stats(server, admin)
    reply.raise_for_status()
    api = {(item["model"], item["version"]): item for item in reply.json()}
    assert set(api) == {(MODEL, VERSION), (XSS_NAME, HOSTILE_VERSION)}
    watched, hostile = api[(MODEL, VERSION)], api[(XSS_NAME, HOSTILE_VERSION)]
    assert watched["totals"]["analysed"] == STUDIES
    assert watched["totals"]["failures"] == FAILED
    assert watched["totals"]["positive_rate"] == 0.2
    assert (watched["totals"]["agreement_rate"], watched["totals"]["ppv_estimate"]) == (
        0.75,
        0.6667,
    )
    drift = watched["drift"]
    assert drift is not None
    assert (drift["alarm"], drift["verdict"], drift["samples"]) == (True, "drift", STUDIES), drift
    assert drift["psi"] > drift["threshold"]
    assert len(watched["scores"]) == STUDIES
    assert hostile["drift"] is None

    # Sign in on the page with the admin token.
    driver.get(server.url + "/admin")
    field = wait_until(driver, lambda d: d.find_element(By.ID, "token"), "no token field")
    assert field.is_displayed()
    assert not driver.find_element(By.ID, "app").is_displayed()
    field.send_keys(admin, Keys.ENTER)
    wait_until(driver, lambda d: len(cards(d)) == 2, "no model cards after sign-in")
    assert driver.execute_script("return window.localStorage.getItem('triage.token');") == admin
    shown = cards(driver)
    assert list(shown) == [(MODEL, VERSION), (XSS_NAME, HOSTILE_VERSION)]  # alarms first

    # The banner names the drifting version, with the API's PSI, threshold and sample count.
    banner = driver.find_element(By.ID, "drift-banner")
    assert banner.is_displayed()
    assert banner.get_attribute("role") == "alert"
    lines = [p.text for p in banner.find_elements(By.TAG_NAME, "p")]
    assert lines == [
        f"Score drift: {MODEL} {VERSION} PSI {drift['psi']:.2f} above threshold "
        f"{drift['threshold']:.2f} over {STUDIES} studies \u2014 check the input data "
        "(scanner, protocol) before trusting its findings"
    ]

    # The card: the API's totals, as text and as raw values.
    card = shown[(MODEL, VERSION)]
    assert (card["name"], card["versionText"], card["mode"]) == (MODEL, VERSION, "clinical")
    assert card["chip"] == "Drift"
    assert card["stats"]["analysed"]["text"] == "60"
    for name, value in watched["totals"].items():
        if name in card["stats"]:
            assert card["stats"][name]["value"] == value, name
    for name in ("positive_rate", "alert_rate", "agreement_rate", "ppv_estimate"):
        assert card["stats"][name]["text"] == rate(watched["totals"][name]), name
    assert card["stats"]["failures"]["text"] == str(FAILED)
    assert card["stats"]["feedback"]["text"] == "4"
    assert card["stats"]["median_run_seconds"]["text"] == (
        f"{watched['totals']['median_run_seconds']:g} s"
    )
    assert card["verdict"] == (
        f"PSI {drift['psi']:.2f} over {STUDIES} studies, threshold {drift['threshold']:.2f}: DRIFT"
    )

    # Plot 1: a bar per day with runs, each as high as the API's count; described in words.
    days = card["days"]
    assert (days["ns"], days["role"]) == (SVG_NS, "img")
    assert days["label"].startswith("Studies per day, last 30 days")
    for day in watched["days"]:
        assert (
            f"{day['analysed']} on {day['day']} ({rate(day['positive_rate'])} positive"
            in (days["label"])
        )
    analysed_bars = {b["day"]: int(b["analysed"]) for b in days["bars"] if "analysed" in b["cls"]}
    assert analysed_bars == {d["day"]: d["analysed"] for d in watched["days"] if d["analysed"]}
    assert all(b["height"] > 0 for b in days["bars"])
    assert any("failed" in b["cls"] for b in days["bars"])
    # ... and the same numbers in its table.
    per_day, per_bin = card["tables"]
    assert [row[:3] for row in per_day] == [
        [d["day"], str(d["analysed"]), rate(d["positive_rate"])] for d in watched["days"]
    ]

    # Plot 2: the recent scores binned on the reference's edges, beside the reference.
    scores = card["scores"]
    assert (scores["ns"], scores["role"]) == (SVG_NS, "img")
    edges = drift["reference_edges"]
    bins = len(edges) - 1
    counts = [0] * bins
    for score in watched["scores"]:
        counts[min(sum(score >= e for e in edges) - 1, bins - 1)] += 1
    recent = [b for b in scores["bars"] if "recent" in b["cls"]]
    reference = [b for b in scores["bars"] if "reference" in b["cls"]]
    assert [int(b["count"]) for b in recent] == counts
    assert len(reference) == bins
    assert max(recent, key=lambda b: b["height"])["bin"] == str(counts.index(max(counts)))
    assert scores["label"].startswith(f"Score distribution, recent {STUDIES} scores against")
    assert f"reference of {drift['reference_cases']} cases" in scores["label"]
    assert [row[1] for row in per_bin] == [str(n) for n in counts]
    assert [row[3] for row in per_bin] == [rate(p) for p in drift["reference_proportions"]]

    # The hostile model name is text: no image, no alert; no reference, so no drift verdict.
    other = shown[(XSS_NAME, HOSTILE_VERSION)]
    assert other["name"] == XSS_NAME
    assert other["stats"]["analysed"]["text"] == str(hostile["totals"]["analysed"])
    assert other["chip"] == "No reference"
    assert other["verdict"].startswith("No reference distribution")
    assert "no reference distribution" in other["scores"]["label"]
    assert other["scores"]["bars"]
    assert other["days"]["bars"]
    assert driver.execute_script("return document.images.length;") == 0
    assert driver.find_elements(By.CSS_SELECTOR, "#cards img") == []
    assert_no_alert(driver)
    screenshot(driver, shots, "admin-1600.png")

    # Refresh: a new run shows without a reload; the table opened stays open.
    driver.execute_script("window.__e2e_marker = 'same page';")
    driver.execute_script("document.querySelector('#cards details.numbers').open = true;")
    with in_database(server.data_dir) as session:
        _, job = add_run(session, 999, MODEL, VERSION, days_ago=0, state=DONE)
        job.findings.append(finding(0, "score", 0.3, False))
    driver.find_element(By.ID, "refresh").click()
    wait_until(
        driver,
        lambda d: cards(d)[(MODEL, VERSION)]["stats"]["analysed"]["text"] == str(STUDIES + 1),
        "Refresh does not show the new run",
    )
    assert driver.execute_script("return window.__e2e_marker;") == "same page"
    assert driver.execute_script("return document.querySelector('#cards details.numbers').open;")

    # 1920 px: the cards sit side by side; 800 px: one column, nothing wider than the window.
    driver.set_window_size(1920, 1080)
    wide = cards(driver)
    assert wide[(MODEL, VERSION)]["top"] == wide[(XSS_NAME, HOSTILE_VERSION)]["top"]
    screenshot(driver, shots, "admin-1920.png")
    driver.execute_script("document.querySelector('#cards figure.plot-scores').scrollIntoView();")
    screenshot(driver, shots, "admin-1920-scores.png")
    driver.execute_script("window.scrollTo(0, 0);")
    driver.set_window_size(800, 1000)
    narrow = cards(driver)
    assert narrow[(MODEL, VERSION)]["top"] != narrow[(XSS_NAME, HOSTILE_VERSION)]["top"]
    assert driver.execute_script(
        "return document.documentElement.scrollWidth <= document.documentElement.clientWidth;"
    )
    width = driver.execute_script("return document.documentElement.clientWidth;")
    assert all(card["right"] <= width for card in narrow.values())
    assert all(card["days"]["width"] > 300 for card in narrow.values())
    screenshot(driver, shots, "admin-800.png")
    assert console_errors(driver) == []

    # A radiologist's token: the page says it needs an admin token and offers to sign in.
    driver.set_window_size(1600, 1000)
    driver.execute_script("window.localStorage.setItem('triage.token', arguments[0]);", reader)
    driver.get(server.url + "/admin")
    wait_until(
        driver,
        lambda d: "needs an admin token" in d.find_element(By.ID, "forbidden").text,
        "no 'needs an admin token' message for a radiologist's token",
    )
    assert driver.find_element(By.ID, "token").is_displayed()
    assert not driver.find_element(By.ID, "app").is_displayed()
    assert not driver.find_element(By.ID, "drift-banner").is_displayed()
    assert driver.find_elements(By.CSS_SELECTOR, "#cards > article") == []
    # The radiologist stays signed in on the worklist; an admin token typed here replaces it.
    assert driver.execute_script("return window.localStorage.getItem('triage.token');") == reader
    screenshot(driver, shots, "admin-forbidden.png")
    driver.find_element(By.ID, "token").send_keys(admin, Keys.ENTER)
    wait_until(driver, lambda d: len(cards(d)) == 2, "signing in again does not show the cards")
    assert not driver.find_element(By.ID, "forbidden").is_displayed()

    output = REPO_ROOT / "test-output"
    output.mkdir(exist_ok=True)
    shutil.copyfile(shots / "admin-1920.png", output / "admin.png")
    assert os.path.getsize(output / "admin.png") > 0
