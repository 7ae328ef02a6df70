"""The web worklist in a real headless Chromium against a real ``triage serve``.

Studies arrive over DICOM (DCMTK storescu); the page must list them in the API's order, show a
hostile patient name as text, link to the viewer, claim by keyboard, and lift a study that gains
a critical finding to the top without a reload.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver

from tests.e2e.support import (
    READER,
    REPO_ROOT,
    VIEWER_TEMPLATE,
    XSS_NAME,
    Server,
    add_critical_finding,
    assert_no_alert,
    console_errors,
    focused,
    row_of,
    row_uids,
    sign_in,
    study_with,
    table,
    wait_until,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


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
