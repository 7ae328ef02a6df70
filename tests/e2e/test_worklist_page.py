"""The web worklist in a real headless Chromium against a real ``triage serve``.

Studies arrive over DICOM (DCMTK storescu); the page must list them in the API's order, show a
hostile patient name as text, link to the viewer, claim by keyboard, and lift a study that gains
a critical finding to the top without a reload.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread
from selenium import webdriver
from selenium.common.exceptions import NoAlertPresentException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait
from sqlalchemy import select

from tests.conftest import free_port, service_missing
from tests.helpers.instances import SentStudy, ct_study
from tests.helpers.process import VENV_BIN, port_open, running, wait_for
from triage.db.base import utcnow
from triage.db.models import Finding, Job, Study
from triage.db.session import create_db_engine, make_session_factory, session_scope
from triage.domain import WorkState
from triage.worklist.policy import PolicyConfig
from triage.worklist.service import reprioritize

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
REPO_ROOT = Path(__file__).resolve().parents[2]
XSS_NAME = "<img src=x onerror=alert(1)>"
READER = "dr.reader"
VIEWER_TEMPLATE = "http://viewer.invalid/?StudyInstanceUIDs={study_uid}"
WAIT_S = 15.0


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
        reply = httpx.get(
            f"{self.url}/api/worklist",
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=5,
        )
        reply.raise_for_status()
        items: list[dict[str, Any]] = reply.json()["items"]
        return items

    def send(self, study: SentStudy) -> None:
        sent = subprocess.run(
            ["storescu", "-aec", "TRIAGE", "127.0.0.1", str(self.dicom_port)]
            + [str(path) for path in study.paths],
            env={**os.environ, "TCP_NODELAY": "1"},
            capture_output=True,
            text=True,
            timeout=60,
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

        wait_for(all_listed, timeout=30, what="the studies to reach the worklist")
        return listed


@pytest.fixture
def server(tmp_path: Path, data_dir: Path) -> Iterator[Server]:
    """``triage serve`` on free ports, no workers, no routing rules, and a radiologist token."""
    if shutil.which("storescu") is None:
        service_missing("DCMTK storescu")
    http_port, dicom_port = free_port(), free_port()
    env = {
        "TRIAGE_DATA_DIR": str(data_dir),
        "TRIAGE_DICOM_PORT": str(dicom_port),
        "TRIAGE_HTTP_PORT": str(http_port),
        "TRIAGE_WORKERS": "0",
        "TRIAGE_ROUTING_RULES": "[]",  # a complete study goes straight to "analyzed"
        "TRIAGE_ASSOCIATION_GRACE_SECONDS": "0.5",
        "TRIAGE_SPOOL_MIN_FREE_MB": "1",
        "TRIAGE_VIEWER_URL_TEMPLATE": VIEWER_TEMPLATE,
    }
    server = Server(http_port, dicom_port, data_dir, env, tmp_path / "serve.log")
    server.start()
    try:
        created = subprocess.run(
            [str(VENV_BIN / "triage-admin"), "tokens", "create", READER, "--role", "radiologist"],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert created.returncode == 0, created.stderr
        server.token = created.stdout.strip().splitlines()[-1]
        yield server
    finally:
        server.stop()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    """Headless Chromium through the system chromedriver; nothing is downloaded."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        service_missing("Chromium")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1600,1000",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(
        executable_path=str(CHROMEDRIVER), log_output=str(tmp_path / "chromedriver.log")
    )
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(10)
    try:
        yield driver
    finally:
        driver.quit()


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


def add_critical_finding(data_dir: Path, study_uid: str) -> None:
    """What a worker does for a positive hemorrhage score, then the worklist re-ranking."""
    engine = create_db_engine(f"sqlite:///{data_dir / 'triage.sqlite'}")
    try:
        with session_scope(make_session_factory(engine)) as session:
            study = session.scalars(select(Study).where(Study.study_uid == study_uid)).one()
            now = utcnow()
            job = Job(
                study_id=study.id,
                model_name="ich-detector",
                model_version="1.0.0",
                state=WorkState.DONE,
                round=study.analysis_round,
                attempts=1,
                started_at=now,
                finished_at=now,
            )
            job.findings.append(
                Finding(
                    ordinal=0,
                    kind="score",
                    label="intracranial_hemorrhage",
                    code_scheme="SCT",
                    code_value="1386000",
                    code_meaning="Intracranial hemorrhage",
                    probability=0.97,
                    positive=True,
                )
            )
            session.add(job)
            session.flush()
            change = reprioritize(
                db_session=session, study=study, now=utcnow(), config=PolicyConfig(), models={}
            )
            assert change is not None
    finally:
        engine.dispose()


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


def wait_until(driver: WebDriver, condition: Any, message: str, timeout: float = WAIT_S) -> Any:
    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition, message)


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


def test_worklist_page_in_a_real_browser(
    server: Server, browser: WebDriver, tmp_path: Path
) -> None:
    shots = tmp_path / "screenshots"
    shots.mkdir()
    driver = browser

    routine = study_with(
        tmp_path / "routine", name="DOE^JANE", accession="E2E0001", description="CT HEAD"
    )
    urgent = study_with(
        tmp_path / "urgent",
        name="ROE^RICHARD",
        accession="E2E0002",
        description="CT HEAD WITHOUT CONTRAST",
        priority="STAT",
    )
    hostile = study_with(
        tmp_path / "hostile", name=XSS_NAME, accession="E2E0003", description="CT BRAIN"
    )
    for study in (routine, urgent, hostile):
        server.send(study)
    listed = server.wait_listed(routine.study_uid, urgent.study_uid, hostile.study_uid)
    api_order = [item["study_uid"] for item in listed]
    assert api_order[0] == urgent.study_uid  # STAT first

    # First visit: a sign-in form; the token typed there opens the worklist.
    sign_in(driver, server, shots)
    wait_until(driver, lambda d: row_uids(d) == api_order, "rows not in the API's order")
    assert driver.execute_script("return window.__loaded_once === true;")
    driver.execute_script("window.__e2e_marker = 'same page';")
    first = table(driver)[0]
    assert first["badge"].lower() == "urgent"
    assert "STAT" in first["reason"]
    assert first["waited"].endswith("/ 1 h"), first["waited"]  # the urgent target is 60 min
    driver.save_screenshot(str(shots / "01-signed-in.png"))

    # The hostile name is text, not markup: no image, no alert.
    assert row_of(driver, hostile.study_uid)["name"] == XSS_NAME
    assert driver.find_elements(By.CSS_SELECTOR, "#worklist img") == []
    assert driver.execute_script("return document.images.length;") == 0
    assert_no_alert(driver)

    # Each row opens its study in the viewer, in a new tab, without handing over the opener.
    link = row_of(driver, hostile.study_uid)
    assert link["href"] == VIEWER_TEMPLATE.format(study_uid=hostile.study_uid)
    assert link["target"] == "_blank"
    assert "noopener" in (link["rel"] or "").split()

    # Claim with the keyboard alone: Tab from the heading to the routine study's Claim button.
    assert focused(driver)[0] == "worklist-title"
    keyboard = ActionChains(driver)
    for _ in range(40):
        if focused(driver)[1:] == (routine.study_uid, "claim"):
            break
        keyboard.send_keys(Keys.TAB).perform()
    assert focused(driver)[1:] == (routine.study_uid, "claim"), "Claim is not reachable by Tab"
    keyboard.send_keys(Keys.ENTER).perform()
    wait_until(
        driver,
        lambda d: row_of(d, routine.study_uid)["reading"].startswith(f"Claimed by {READER}"),
        "the claim does not show",
    )
    claimed = {item["study_uid"]: item for item in server.worklist()}[routine.study_uid]
    assert (claimed["reading_state"], claimed["claimed_by"]) == ("claimed", READER)
    # Focus stays in the row, on the control that took Claim's place.
    assert focused(driver)[1:] == (routine.study_uid, "release")
    driver.save_screenshot(str(shots / "02-claimed.png"))

    # A fourth study arrives and gains a critical finding; the open page lifts it to the top.
    critical = study_with(
        tmp_path / "critical",
        name="POE^EDGAR",
        accession="E2E0004",
        description="CT HEAD TRAUMA",
    )
    server.send(critical)
    server.wait_listed(critical.study_uid)
    wait_until(
        driver, lambda d: critical.study_uid in row_uids(d), "the new study does not appear live"
    )
    add_critical_finding(server.data_dir, critical.study_uid)
    top = server.worklist()[0]
    assert (top["study_uid"], top["tier"]) == (critical.study_uid, "critical")
    assert "Intracranial hemorrhage" in top["reason"]
    wait_until(
        driver,
        lambda d: row_uids(d)[:1] == [critical.study_uid],
        "the critical study does not rise to the top without a reload",
        timeout=10,
    )
    top_row = table(driver)[0]
    assert top_row["badge"].lower() == "critical"
    assert top_row["reason"] == top["reason"]
    assert row_uids(driver) == [item["study_uid"] for item in server.worklist()]
    wait_until(
        driver,
        lambda d: "critical" in d.find_element(By.ID, "announcer").text.lower(),
        "no announcement of the new critical study",
    )
    assert driver.execute_script("return window.__e2e_marker;") == "same page"  # not reloaded
    assert driver.execute_script("return window.__loaded_once === true;")
    assert_no_alert(driver)
    assert console_errors(driver) == []

    final = shots / "03-critical-on-top.png"
    driver.save_screenshot(str(final))
    output = REPO_ROOT / "test-output"
    output.mkdir(exist_ok=True)
    shutil.copyfile(final, output / "worklist.png")


def test_worklist_page_asks_again_and_survives_an_outage(
    server: Server, browser: WebDriver, tmp_path: Path
) -> None:
    driver = browser
    study = study_with(tmp_path / "one", name="DOE^JOHN", accession="E2E0101", description="CT")
    server.send(study)
    server.wait_listed(study.study_uid)
    stored_token = "return window.localStorage.getItem('triage.token');"

    # A token the server refuses sends the reader back to the form, with a reason.
    driver.get(server.url + "/")
    field = wait_until(driver, lambda d: d.find_element(By.ID, "token"), "no token field")
    field.send_keys("trg_not-a-real-token", Keys.ENTER)
    wait_until(
        driver,
        lambda d: "not accept" in d.find_element(By.ID, "signin-error").text,
        "a refused token does not bring the form back",
    )
    assert driver.find_element(By.ID, "token").is_displayed()
    assert driver.execute_script(stored_token) is None

    driver.find_element(By.ID, "token").send_keys(server.token, Keys.ENTER)
    wait_until(driver, lambda d: row_uids(d) == [study.study_uid], "no rows after sign-in")
    wait_until(driver, lambda d: d.find_element(By.ID, "live").text == "Live", "not live")

    # The server goes away: a visible banner; it comes back: the banner goes, the list stays.
    server.stop()
    wait_until(
        driver,
        lambda d: "Cannot reach" in d.find_element(By.ID, "banner").text,
        "no banner while the server is down",
    )
    assert driver.find_element(By.ID, "banner").is_displayed()
    assert driver.find_element(By.ID, "live").text == "Reconnecting"
    driver.save_screenshot(str(tmp_path / "server-down.png"))
    server.start()
    wait_until(
        driver,
        lambda d: (
            not d.find_element(By.ID, "banner").is_displayed()
            and d.find_element(By.ID, "live").text == "Live"
        ),
        "the page does not recover when the server returns",
        timeout=30,
    )
    assert row_uids(driver) == [study.study_uid]

    # Signing out forgets the token and shows the form again.
    driver.find_element(By.ID, "sign-out").click()
    wait_until(driver, lambda d: d.find_element(By.ID, "token").is_displayed(), "no form")
    assert driver.execute_script(stored_token) is None
    assert row_uids(driver) == []
