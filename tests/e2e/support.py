"""What the browser tests share: the ``triage serve`` under test, studies sent to it over DICOM,
AI findings written as a worker would write them, and readings of the page's table.

The fixtures (``server``, ``browser``) are in ``tests/e2e/conftest.py``.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image, ImageDraw
from pydicom import dcmread
from selenium.common.exceptions import NoAlertPresentException, StaleElementReferenceException
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait
from sqlalchemy import select

from tests.helpers.instances import SentStudy, ct_study
from tests.helpers.process import VENV_BIN, port_open, running, wait_for
from triage.db.base import utcnow
from triage.db.models import Finding, Job, Study
from triage.db.session import create_db_engine, make_session_factory, session_scope
from triage.domain import ModelMode, WorkState
from triage.worklist.policy import PolicyConfig
from triage.worklist.service import reprioritize

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
REPO_ROOT = Path(__file__).resolve().parents[2]
XSS_NAME = "<img src=x onerror=alert(1)>"
READER = "dr.reader"
VIEWER_TEMPLATE = "http://viewer.invalid/?StudyInstanceUIDs={study_uid}"
WAIT_S = 15.0
# Read at import (collection), before the autouse fixture of tests/conftest.py clears TRIAGE_*.
SCREENSHOT_DIR = os.environ.get("TRIAGE_SCREENSHOT_DIR")


@dataclass
class Server:
    """``triage serve`` as a real process; it can be stopped and started again on its ports."""

    http_port: int
    dicom_port: int
    data_dir: Path
    env: dict[str, str]
    log_file: Path
    token: str = ""
    process: ExitStack = field(default_factory=ExitStack)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def start(self) -> None:
        self.process.enter_context(
            running(
                [str(VENV_BIN / "triage"), "serve"],
                env=self.env,
                log_file=self.log_file,
                ready=lambda: port_open(self.http_port) and port_open(self.dicom_port),
            )
        )

    def stop(self) -> None:
        self.process.close()

    def worklist(self) -> list[dict[str, Any]]:
        reply = httpx.get(f"{self.url}/api/worklist?limit=500", headers=self.headers, timeout=5)
        reply.raise_for_status()
        items: list[dict[str, Any]] = reply.json()["items"]
        return items

    def study(self, study_uid: str) -> dict[str, Any]:
        """The study's record, ``GET /api/studies/{uid}``."""
        reply = httpx.get(f"{self.url}/api/studies/{study_uid}", headers=self.headers, timeout=5)
        reply.raise_for_status()
        record: dict[str, Any] = reply.json()
        return record

    def send(self, *studies: SentStudy) -> None:
        """Every instance of ``studies`` in one association (DCMTK storescu)."""
        sent = subprocess.run(
            ["storescu", "-aec", "TRIAGE", "127.0.0.1", str(self.dicom_port)]
            + [str(path) for study in studies for path in study.paths],
            env={**os.environ, "TCP_NODELAY": "1"},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert sent.returncode == 0, sent.stderr

    def wait_listed(self, *study_uids: str) -> list[dict[str, Any]]:
        """Wait until every study is on the worklist; return the worklist then."""
        listed: list[dict[str, Any]] = []

        def all_listed() -> bool:
            nonlocal listed
            listed = self.worklist()
            return set(study_uids) <= {item["study_uid"] for item in listed}

        wait_for(all_listed, timeout=60, what="the studies to reach the worklist")
        return listed


def study_with(
    out_dir: Path, *, name: str, accession: str, description: str, priority: str | None = None
) -> SentStudy:
    """Two CT instances of a new study with the given patient name and order."""
    study = ct_study(out_dir, 2)
    for path in study.paths:
        ds = dcmread(path)
        ds.PatientName = name
        ds.PatientID = f"PID-{accession}"
        ds.AccessionNumber = accession
        ds.StudyDescription = description
        if priority is not None:
            ds.RequestedProcedurePriority = priority
        ds.save_as(path, enforce_file_format=True)
    return study


@dataclass(frozen=True)
class FindingSpec:
    """One finding of a model run, as a worker stores it."""

    kind: str  # "score" or "lesion"
    label: str
    meaning: str
    probability: float
    positive: bool
    volume_ml: float | None = None
    key_image: bool = False  # render a PNG for it, as the worker's key-image step does


HEMORRHAGE_SCORE = FindingSpec(
    "score", "intracranial_hemorrhage", "Intracranial hemorrhage", 0.97, True
)


def write_key_image(data_dir: Path, *, seed: int = 0) -> str:
    """A real PNG where the API looks for key images; returns its file id."""
    file_id = uuid.uuid4().hex
    directory = data_dir / "results" / "key-images"
    directory.mkdir(parents=True, exist_ok=True)
    image = Image.new("L", (256, 256))
    draw = ImageDraw.Draw(image)
    for y in range(256):  # a grey gradient "slice" with an outlined "lesion"
        draw.line([(0, y), (255, y)], fill=(y + 40 * seed) % 200 + 20)
    left = 60 + 30 * (seed % 3)
    draw.ellipse([left, 90, left + 70, 150], outline=255, width=3)
    draw.text((6, 236), "AI preview - not for diagnosis", fill=255)
    image.convert("RGB").save(directory / f"{file_id}.png", format="PNG")
    assert (directory / f"{file_id}.png").stat().st_size > 0
    return file_id


def add_run(
    data_dir: Path,
    study_uid: str,
    findings: tuple[FindingSpec, ...] = (HEMORRHAGE_SCORE,),
    *,
    model: str = "ich-detector",
    version: str = "1.0.0",
    mode: ModelMode = ModelMode.CLINICAL,
) -> list[int]:
    """What a worker does for a finished run (its findings, with key images where asked),
    then the worklist re-ranking; returns the findings' ids in the order given."""
    engine = create_db_engine(f"sqlite:///{data_dir / 'triage.sqlite'}")
    try:
        with session_scope(make_session_factory(engine)) as session:
            study = session.scalars(select(Study).where(Study.study_uid == study_uid)).one()
            now = utcnow()
            job = Job(
                study_id=study.id,
                model_name=model,
                model_version=version,
                state=WorkState.DONE,
                round=study.analysis_round,
                attempts=1,
                started_at=now,
                finished_at=now,
                mode=mode,
            )
            for ordinal, spec in enumerate(findings):
                job.findings.append(
                    Finding(
                        ordinal=ordinal,
                        kind=spec.kind,
                        label=spec.label,
                        code_scheme="SCT",
                        code_value="1386000",
                        code_meaning=spec.meaning,
                        probability=spec.probability,
                        positive=spec.positive,
                        volume_ml=spec.volume_ml,
                        key_image_ref=(
                            write_key_image(data_dir, seed=ordinal) if spec.key_image else None
                        ),
                    )
                )
            session.add(job)
            session.flush()
            ids = [finding.id for finding in job.findings]
            reprioritize(
                db_session=session, study=study, now=utcnow(), config=PolicyConfig(), models={}
            )
            return ids
    finally:
        engine.dispose()


def add_critical_finding(data_dir: Path, study_uid: str) -> None:
    """What a worker does for a positive hemorrhage score, then the worklist re-ranking."""
    add_run(data_dir, study_uid)


# One JavaScript call reads the whole table at once: the page re-renders it on every change,
# so element handles kept across calls could go stale.
_ROWS_JS = """
return Array.from(document.querySelectorAll('#rows > tr'), row => {
  const text = selector => (row.querySelector(selector) || {}).textContent || '';
  const link = row.querySelector('a.viewer-link');
  return {
    uid: row.dataset.uid,
    badge: text('.badge'),
    name: text('.patient-name'),
    reason: text('.reason-text'),
    waited: text('.waited'),
    reading: text('td.reading'),
    href: link ? link.href : null,
    target: link ? link.target : null,
    rel: link ? link.rel : null,
    actions: Array.from(row.querySelectorAll('button[data-action]'), b => b.dataset.action),
  };
});
"""


def table(driver: WebDriver) -> list[dict[str, Any]]:
    snapshot: list[dict[str, Any]] = driver.execute_script(_ROWS_JS)
    return snapshot


def row_uids(driver: WebDriver) -> list[str]:
    return [row["uid"] for row in table(driver)]


def row_of(driver: WebDriver, study_uid: str) -> dict[str, Any]:
    (row,) = [row for row in table(driver) if row["uid"] == study_uid]
    return row


def focused(driver: WebDriver) -> tuple[str | None, str | None, str | None]:
    """The focused element's id, and its row's study UID and action (for row controls)."""
    found: list[str | None] = driver.execute_script(
        "const e = document.activeElement;"
        "return [e.id || null, e.dataset.uid || null, e.dataset.action || null];"
    )
    return found[0], found[1], found[2]


def tab_to(driver: WebDriver, condition: Any, what: str, limit: int = 60) -> None:
    """Press Tab until ``condition(driver)`` holds (keyboard only); fail after ``limit``."""
    keyboard = ActionChains(driver)
    for _ in range(limit):
        if condition(driver):
            return
        keyboard.send_keys(Keys.TAB).perform()
    assert condition(driver), f"{what} is not reachable by Tab"


def wait_until(driver: WebDriver, condition: Any, message: str, timeout: float = WAIT_S) -> Any:
    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition, message)


def click(driver: WebDriver, css: str, message: str) -> None:
    """Click the element at ``css``, finding it again when a live update redrew it between
    finding and clicking (the worklist re-renders its rows on every change)."""

    def clicked(d: WebDriver) -> bool:
        try:
            d.find_element(By.CSS_SELECTOR, css).click()
        except StaleElementReferenceException:
            return False
        return True

    wait_until(driver, clicked, message)


def assert_no_alert(driver: WebDriver) -> None:
    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert  # noqa: B018 - the property raises when no alert is open


def console_errors(driver: WebDriver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def sign_in(driver: WebDriver, server: Server, shots: Path) -> None:
    driver.get(server.url + "/")
    field = wait_until(
        driver, lambda d: d.find_element(By.ID, "token"), "no token field on first visit"
    )
    assert field.is_displayed()
    assert focused(driver)[0] == "token"
    assert not driver.find_element(By.ID, "sign-out").is_displayed()
    assert not driver.find_element(By.ID, "worklist").is_displayed()
    driver.save_screenshot(str(shots / "00-sign-in.png"))
    ActionChains(driver).send_keys(server.token, Keys.ENTER).perform()


def screenshot(driver: WebDriver, shots: Path, name: str) -> Path:
    """Save a screenshot under ``shots`` and, when TRIAGE_SCREENSHOT_DIR is set, there too."""
    shots.mkdir(parents=True, exist_ok=True)
    path = shots / name
    assert driver.save_screenshot(str(path)), f"no screenshot {name}"
    assert path.stat().st_size > 0
    if SCREENSHOT_DIR:
        Path(SCREENSHOT_DIR).mkdir(parents=True, exist_ok=True)
        (Path(SCREENSHOT_DIR) / name).write_bytes(path.read_bytes())
    return path
