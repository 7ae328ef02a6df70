"""The radiologist's loop in a real headless Chromium against a real ``triage serve``.

A study with AI findings shows its key image in its row; its study panel opens by keyboard and
by mouse, shows the findings and the key image, takes feedback by keyboard alone (a hostile
comment stays text), acknowledges the critical alert and approves a run held for review. The
worklist fits a reading station: 1280 px wide without a cut-off column, 15+ rows on a 1920x1080
screen, and a side monitor 800 px wide.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions

from tests.e2e.support import (
    READER,
    XSS_NAME,
    FindingSpec,
    Server,
    add_run,
    assert_no_alert,
    click,
    console_errors,
    focused,
    row_of,
    row_uids,
    screenshot,
    sign_in,
    study_with,
    tab_to,
    wait_until,
)
from triage.domain import ModelMode

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

HOSTILE_COMMENT = XSS_NAME
SCORE = FindingSpec(
    "score", "intracranial_hemorrhage", "Intracranial hemorrhage", 0.97, True, 14.2, True
)
LESION = FindingSpec("lesion", "hemorrhage", "Hemorrhage", 0.91, True, 14.2, True)
SMALL_LESION = FindingSpec("lesion", "hemorrhage", "Hemorrhage", 0.62, True, 1.3, True)

_THUMB_JS = """
const row = Array.from(document.querySelectorAll('#rows > tr'))
  .find(r => r.dataset.uid === arguments[0]);
const img = row && row.querySelector('button.thumb img');
if (!img) return null;
const box = img.getBoundingClientRect();
return {alt: img.alt, natural: img.naturalWidth, blob: img.src.startsWith('blob:'),
        height: box.height, rowHeight: row.getBoundingClientRect().height};
"""

_PANEL_JS = """
const dialog = document.getElementById('panel');
const active = document.activeElement;
const img = dialog.querySelector('figure.key-image img');
return {
  open: dialog.open,
  role: dialog.getAttribute('role'),
  labelledBy: dialog.getAttribute('aria-labelledby'),
  title: document.getElementById('panel-title').textContent,
  focusInside: dialog.contains(active),
  image: img ? {natural: img.naturalWidth, alt: img.alt} : null,
  loaded: document.querySelector('#panel-give form') !== null,
  text: dialog.innerText,
  alert: document.getElementById('panel-alert').innerText,
  comments: Array.from(dialog.querySelectorAll('#panel-feedback p.comment'), p => p.textContent),
  buttons: Array.from(dialog.querySelectorAll('button'), b => b.textContent.trim()),
};
"""

_ACTIVE_JS = """
const a = document.activeElement;
return {id: a.id || null, type: a.type || null, name: a.name || null,
        finding: a.dataset.finding || null, value: a.value || null,
        checked: a.checked === true, inPanel: document.getElementById('panel').contains(a)};
"""

# Where every column of the table is, at the current window size.
_LAYOUT_JS = """
const vw = window.innerWidth, vh = window.innerHeight;
const shown = node => node.getClientRects().length > 0;
const right = node => node.getBoundingClientRect().right;
const rows = Array.from(document.querySelectorAll('#rows > tr'));
const first = rows[0];
const cells = Array.from(first.children).filter(shown).map(c => {
  const b = c.getBoundingClientRect();
  return {left: b.left, right: b.right, overflow: c.scrollWidth - c.clientWidth};
});
const buttons = Array.from(first.querySelectorAll('.actions button')).map(b => {
  const box = b.getBoundingClientRect();
  return {left: box.left, right: box.right, top: box.top, bottom: box.bottom,
          action: b.dataset.action};
});
const heights = rows.map(r => r.getBoundingClientRect().height).sort((a, b) => a - b);
return {
  vw, vh,
  density: document.documentElement.dataset.density,
  tableRight: document.querySelector('table').getBoundingClientRect().right,
  scrollWidth: document.documentElement.scrollWidth,
  headers: Array.from(document.querySelectorAll('#worklist thead th'))
    .filter(shown).map(th => [th.textContent.trim(), right(th)]),
  cells, buttons,
  rows: rows.length,
  reasonWidth: first.querySelector('td.reason').getBoundingClientRect().width,
  rowHeight: heights[Math.floor(heights.length / 2)],
  fullyVisible: rows.filter(r => {
    const b = r.getBoundingClientRect();
    return b.top >= 0 && b.bottom <= vh;
  }).length,
};
"""


def panel(driver: WebDriver) -> dict[str, Any]:
    found: dict[str, Any] = driver.execute_script(_PANEL_JS)
    return found


def active(driver: WebDriver) -> dict[str, Any]:
    found: dict[str, Any] = driver.execute_script(_ACTIVE_JS)
    return found


def layout(driver: WebDriver) -> dict[str, Any]:
    driver.execute_script("window.scrollTo(0, 0);")
    found: dict[str, Any] = driver.execute_script(_LAYOUT_JS)
    return found


def resize(driver: WebDriver, width: int, height: int) -> None:
    driver.set_window_size(width, height)
    wait_until(
        driver,
        lambda d: d.execute_script("return window.innerWidth;") == width,
        f"the window does not become {width} px wide",
    )


def assert_fits(found: dict[str, Any]) -> None:
    """No column cut off or reached only by scrolling sideways; no cell overlapping another."""
    vw = found["vw"]
    assert found["tableRight"] <= vw, found
    assert found["scrollWidth"] <= vw, found
    for name, right in found["headers"]:
        assert right <= vw, f"column {name!r} ends at {right} px, beyond {vw} px"
    cells = sorted(found["cells"], key=lambda cell: cell["left"])
    for before, after in itertools.pairwise(cells):
        assert before["right"] <= after["left"] + 0.5, cells
    assert all(cell["overflow"] <= 1 for cell in cells), cells
    buttons = found["buttons"]
    assert buttons, "the first row has no actions"
    for button in buttons:
        assert button["left"] >= 0, buttons
        assert button["right"] <= vw, buttons
        assert button["top"] >= 0, buttons
        assert button["bottom"] <= found["vh"], buttons


def test_study_panel_feedback_and_acknowledgment(
    server: Server, browser: WebDriver, tmp_path: Path
) -> None:
    shots = tmp_path / "screenshots"
    driver = browser

    positive = study_with(
        tmp_path / "positive", name="POE^EDGAR", accession="E2E0201", description="CT HEAD"
    )
    held = study_with(
        tmp_path / "held", name="ROE^RICHARD", accession="E2E0202", description="CT HEAD TRAUMA"
    )
    plain = study_with(tmp_path / "plain", name="DOE^JANE", accession="E2E0203", description="CT")
    server.send(positive, held, plain)
    server.wait_listed(positive.study_uid, held.study_uid, plain.study_uid)
    score_id, lesion_id = add_run(server.data_dir, positive.study_uid, (SCORE, LESION))
    add_run(server.data_dir, held.study_uid, (SCORE,), model="ich-next", mode=ModelMode.REVIEW)
    listed = {item["study_uid"]: item for item in server.worklist()}
    first = listed[positive.study_uid]
    assert first["tier"] == "critical"
    assert first["key_image_url"] == f"/api/studies/{positive.study_uid}/key-image"
    assert first["needs_acknowledgment"] is True
    assert listed[held.study_uid]["awaiting_approval"] is True
    assert listed[plain.study_uid]["key_image_url"] is None

    sign_in(driver, server, shots)
    api_order = [item["study_uid"] for item in server.worklist()]
    wait_until(driver, lambda d: row_uids(d) == api_order, "rows not in the API's order")

    # The positive study's row shows its key image, fetched with the token.
    thumb = wait_until(
        driver,
        lambda d: (t := d.execute_script(_THUMB_JS, positive.study_uid)) and t["natural"] > 0 and t,
        "the key image thumbnail does not load",
    )
    assert thumb["alt"] == "AI key image (not for diagnosis)"
    assert thumb["blob"]
    assert 0 < thumb["height"] <= thumb["rowHeight"]
    assert driver.execute_script(_THUMB_JS, plain.study_uid) is None
    assert "acknowledge" in row_of(driver, positive.study_uid)["actions"]
    assert "acknowledge" not in row_of(driver, plain.study_uid)["actions"]
    screenshot(driver, shots, "panel-01-thumbnails.png")

    # By keyboard: Tab to the patient's name, Enter opens the panel, focus goes into it.
    tab_to(
        driver,
        lambda d: focused(d)[1:] == (positive.study_uid, "details"),
        "the study details of the positive study",
    )
    ActionChains(driver).send_keys(Keys.ENTER).perform()
    wait_until(driver, lambda d: panel(d)["open"] and panel(d)["loaded"], "no panel")
    state = panel(driver)
    assert state["role"] == "dialog"
    assert state["labelledBy"] == "panel-title"
    assert state["focusInside"]
    assert "POE, EDGAR" in state["title"]
    assert "ich-detector 1.0.0" in state["text"]
    assert "97%" in state["text"]
    assert "14.2 mL" in state["text"]
    wait_until(
        driver,
        lambda d: (panel(d)["image"] or {}).get("natural", 0) > 0,
        "the key image does not load in the panel",
    )
    # Two findings have a key image: the panel offers both.
    assert any(text.startswith("2. Hemorrhage") for text in panel(driver)["buttons"])

    # Escape closes it; focus returns to the control that opened it.
    ActionChains(driver).send_keys(Keys.ESCAPE).perform()
    wait_until(driver, lambda d: not panel(d)["open"], "Escape does not close the panel")
    assert focused(driver)[1:] == (positive.study_uid, "details")

    # Feedback by keyboard alone: Enter again, Tab to the lesion's verdicts, Space picks
    # "Agree", the arrow key moves on to "Disagree"; a comment; Tab to Submit and Enter.
    ActionChains(driver).send_keys(Keys.ENTER).perform()
    wait_until(driver, lambda d: panel(d)["open"] and panel(d)["loaded"], "no panel again")
    tab_to(
        driver,
        lambda d: active(d)["type"] == "radio" and active(d)["finding"] == str(lesion_id),
        "the lesion's verdict",
    )
    ActionChains(driver).send_keys(Keys.SPACE).perform()
    assert (active(driver)["value"], active(driver)["checked"]) == ("agree", True)
    ActionChains(driver).send_keys(Keys.ARROW_RIGHT).perform()
    assert (active(driver)["value"], active(driver)["checked"]) == ("disagree", True)
    screenshot(driver, shots, "panel-02-verdict-by-keyboard.png")
    tab_to(driver, lambda d: active(d)["id"] == "panel-comment", "the comment")
    ActionChains(driver).send_keys(HOSTILE_COMMENT).perform()
    tab_to(driver, lambda d: active(d)["id"] == "panel-submit", "Submit")
    assert active(driver)["inPanel"]
    ActionChains(driver).send_keys(Keys.ENTER).perform()

    def stored(d: WebDriver) -> list[tuple[int | None, str, str | None, str]]:
        return [
            (given["finding"], given["verdict"], given["comment"], given["reader"])
            for given in server.study(positive.study_uid)["feedback"]
        ]

    wait_until(
        driver,
        lambda d: stored(d) == [(lesion_id, "disagree", HOSTILE_COMMENT, READER)],
        "the feedback is not stored",
    )
    wait_until(
        driver,
        lambda d: panel(d)["comments"] == [HOSTILE_COMMENT],
        "the panel does not list the new feedback",
    )
    wait_until(
        driver,
        lambda d: "Feedback sent" in d.find_element(By.ID, "panel-announcer").text,
        "the feedback is not announced",
    )
    assert "Feedback sent" in driver.execute_script(
        "return document.getElementById('announcer').textContent;"
    )
    # The comment is text: no image element from it, no alert.
    assert driver.execute_script("return document.querySelectorAll('img[src=\"x\"]').length;") == 0
    assert driver.execute_script(
        "return Array.from(document.images).every(i => i.src.startsWith('blob:'));"
    )
    assert_no_alert(driver)
    assert HOSTILE_COMMENT in panel(driver)["text"]
    screenshot(driver, shots, "panel-03-feedback.png")
    assert active(driver)["inPanel"]  # focus stays in the panel after submitting
    ActionChains(driver).send_keys(Keys.ESCAPE).perform()
    wait_until(driver, lambda d: not panel(d)["open"], "the panel does not close")

    # The study-level score, by mouse this time, and "AI missed something" (no finding).
    click(
        driver, f'#rows tr[data-uid="{positive.study_uid}"] button.thumb', "no thumbnail to click"
    )
    wait_until(driver, lambda d: panel(d)["open"] and panel(d)["loaded"], "no panel by mouse")
    driver.find_element(
        By.CSS_SELECTOR, f'#panel input[name="verdict-{score_id}"][value="agree"]'
    ).click()
    driver.find_element(By.CSS_SELECTOR, '#panel input[name="missed"]').click()
    driver.find_element(By.ID, "panel-submit").click()
    wait_until(
        driver,
        lambda d: (
            {(f, v) for f, v, _, _ in stored(d)}
            == {(lesion_id, "disagree"), (score_id, "agree"), (None, "disagree")}
        ),
        "the score's verdict and the miss are not stored",
    )
    wait_until(driver, lambda d: len(panel(d)["comments"]) == 1, "comments repeated")
    ActionChains(driver).send_keys(Keys.ESCAPE).perform()
    wait_until(driver, lambda d: not panel(d)["open"], "the panel does not close")
    assert focused(driver)[1:] == (positive.study_uid, "thumb")

    # Acknowledge the critical alert from the row.
    assert server.study(positive.study_uid)["worklist"]["acknowledged_by"] is None
    click(
        driver,
        f'#rows tr[data-uid="{positive.study_uid}"] [data-action="acknowledge"]',
        "no acknowledge button to click",
    )
    wait_until(
        driver,
        lambda d: server.study(positive.study_uid)["worklist"]["acknowledged_by"] == READER,
        "the acknowledgment is not stored",
    )
    wait_until(
        driver,
        lambda d: "acknowledge" not in row_of(d, positive.study_uid)["actions"],
        "the row still asks for an acknowledgment",
    )
    wait_until(  # the page says it a tick later, so that a screen reader repeats it
        driver,
        lambda d: "acknowledged" in d.find_element(By.ID, "announcer").text.lower(),
        "the acknowledgment is not announced",
    )

    # A run held for review: approve it in the panel; its alert then asks to be acknowledged.
    click(driver, f'#rows tr[data-uid="{held.study_uid}"] button.open-study', "no study to open")
    wait_until(driver, lambda d: panel(d)["open"] and panel(d)["loaded"], "no panel (held)")
    state = panel(driver)
    assert "Held for review" in state["text"]
    assert "Approve results" in state["buttons"]
    assert "Acknowledge alert" not in state["buttons"]  # held: no alert went out
    driver.find_element(By.CSS_SELECTOR, '#panel [data-panel-action="approve"]').click()
    wait_until(driver, expected_conditions.alert_is_present(), "no confirmation")
    driver.switch_to.alert.accept()
    wait_until(
        driver,
        lambda d: all(job["approved_at"] for job in server.study(held.study_uid)["jobs"]),
        "the approval is not stored",
    )
    wait_until(
        driver,
        lambda d: (
            "Acknowledge alert" in panel(d)["buttons"]
            and "Approve results" not in panel(d)["buttons"]
        ),
        "the panel does not move on to the alert",
    )
    driver.find_element(By.CSS_SELECTOR, '#panel [data-panel-action="acknowledge"]').click()
    wait_until(
        driver,
        lambda d: server.study(held.study_uid)["worklist"]["acknowledged_by"] == READER,
        "the acknowledgment from the panel is not stored",
    )
    wait_until(
        driver,
        lambda d: f"acknowledged by {READER} at" in panel(d)["alert"],
        "the panel does not show the acknowledgment",
    )
    assert panel(driver)["focusInside"]
    screenshot(driver, shots, "panel-04-approved.png")
    ActionChains(driver).send_keys(Keys.ESCAPE).perform()
    wait_until(driver, lambda d: not panel(d)["open"], "the panel does not close")
    assert focused(driver)[1:] == (held.study_uid, "details")
    assert_no_alert(driver)
    assert console_errors(driver) == []


def test_worklist_fits_a_reading_station(
    server: Server, browser: WebDriver, tmp_path: Path
) -> None:
    shots = tmp_path / "screenshots"
    driver = browser
    studies = [
        study_with(
            tmp_path / f"s{number:02d}",
            name=f"PATIENT{number:02d}^TEST^{'LONGMIDDLENAME' if number == 3 else 'A'}",
            accession=f"E2E1{number:03d}",
            description="CT HEAD WITHOUT CONTRAST AND ANGIOGRAPHY OF THE CIRCLE OF WILLIS"
            if number % 4 == 0
            else "CT HEAD",
            priority="STAT" if number % 5 == 0 else None,
        )
        for number in range(22)
    ]
    server.send(*studies)
    server.wait_listed(*(study.study_uid for study in studies))
    for study in studies[:3]:
        add_run(server.data_dir, study.study_uid, (SCORE, SMALL_LESION))
    api_order = [item["study_uid"] for item in server.worklist()]
    assert len(api_order) == 22

    sign_in(driver, server, shots)
    wait_until(driver, lambda d: row_uids(d) == api_order, "rows not in the API's order")
    wait_until(
        driver,
        lambda d: (d.execute_script(_THUMB_JS, api_order[0]) or {}).get("natural", 0) > 0,
        "no thumbnail",
    )

    # A reading station: 1920x1080, compact rows by default, 15 studies or more in view.
    resize(driver, 1920, 1080)
    wide = layout(driver)
    assert wide["density"] == "compact"
    assert wide["rows"] == 22
    assert wide["fullyVisible"] >= 15, wide
    assert_fits(wide)
    screenshot(driver, shots, "layout-1920x1080-compact.png")

    # Comfortable rows: taller, remembered across a reload.
    driver.find_element(By.ID, "density").click()
    comfortable = layout(driver)
    assert comfortable["density"] == "comfortable"
    assert comfortable["rowHeight"] > wide["rowHeight"]
    assert_fits(comfortable)
    screenshot(driver, shots, "layout-1920x1080-comfortable.png")
    driver.refresh()
    wait_until(driver, lambda d: row_uids(d) == api_order, "no rows after the reload")
    assert layout(driver)["density"] == "comfortable"
    assert driver.find_element(By.ID, "density").get_attribute("aria-pressed") == "false"
    driver.find_element(By.ID, "density").click()
    assert layout(driver)["density"] == "compact"

    # 1280 px wide: every column in view, nothing to scroll sideways.
    resize(driver, 1280, 800)
    narrow = layout(driver)
    assert_fits(narrow)
    assert len(narrow["headers"]) == 9  # no column dropped at this width
    screenshot(driver, shots, "layout-1280x800.png")

    # A side monitor 800 px wide: fewer columns, actions in view.
    resize(driver, 800, 900)
    side = layout(driver)
    assert_fits(side)
    assert {"claim", "read"} <= {button["action"] for button in side["buttons"]}
    for button in driver.find_elements(By.CSS_SELECTOR, "#rows > tr:first-child .actions button"):
        assert button.is_displayed()
    screenshot(driver, shots, "layout-800x900.png")
    # The study panel takes the whole width there, and closes back onto the row.
    click(driver, "#rows > tr:first-child button.open-study", "no first study to open")
    wait_until(driver, lambda d: panel(d)["open"] and panel(d)["loaded"], "no panel at 800 px")
    box = driver.execute_script("return document.getElementById('panel').getBoundingClientRect();")
    assert box["left"] >= 0
    assert box["right"] <= side["vw"]
    assert driver.execute_script("return document.documentElement.scrollWidth;") <= side["vw"]
    screenshot(driver, shots, "layout-800x900-panel.png")
    ActionChains(driver).send_keys(Keys.ESCAPE).perform()
    wait_until(driver, lambda d: not panel(d)["open"], "the panel does not close at 800 px")
    assert focused(driver)[1:] == (api_order[0], "details")
    print(  # the numbers, for the record (pytest -s)
        {
            "1920x1080": (wide["vh"], wide["rowHeight"], wide["fullyVisible"]),
            "comfortable": comfortable["rowHeight"],
            "1280": (narrow["tableRight"], narrow["rowHeight"], narrow["reasonWidth"]),
            "800": (side["tableRight"], side["rowHeight"], len(side["headers"])),
        }
    )
    assert console_errors(driver) == []
