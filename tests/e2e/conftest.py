"""Fixtures of the browser tests: a real ``triage serve`` and a headless Chromium.

The helpers the tests share (studies to send, findings written as a worker would, reading the
page's table) are in ``tests.e2e.support``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.remote.webdriver import WebDriver

from tests.conftest import free_port, service_missing
from tests.e2e.support import CHROMEDRIVER, CHROMIUM, READER, VIEWER_TEMPLATE, Server
from tests.helpers.process import VENV_BIN


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
