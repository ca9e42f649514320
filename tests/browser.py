"""Headless Chromium for the tests that look at pages (the MLflow UI, the device service's live view).

A pytest plugin: a test module that needs the `browser` fixture says `pytest_plugins = ["browser"]`.
Chromium and chromedriver come from Debian (`scripts/bootstrap.sh --with-browser`, which
`make test` runs). Without them a test skips on a developer machine but fails under CI (env `CI`
set), where bootstrap installs them and their absence is a bug.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from typing import Any, Iterator, NoReturn

import pytest
from support import REPO

UI_TIMEOUT_S = 60  # a cold UI load on a busy 2-core machine takes a few seconds; bound a hang
INSTALL_HINT = "run `scripts/bootstrap.sh --with-browser` (apt-get install chromium chromium-driver)"


def artifacts_dir() -> Path:
    """Where test artifacts (screenshots) go: $TEST_ARTIFACTS_DIR or <repo>/test-artifacts."""
    out = Path(os.environ.get("TEST_ARTIFACTS_DIR") or REPO / "test-artifacts")
    out.mkdir(parents=True, exist_ok=True)
    return out


def skip_or_fail(reason: str) -> NoReturn:
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI installs it through bootstrap, so this is a bug in the setup ({INSTALL_HINT})")
    pytest.skip(f"{reason}; {INSTALL_HINT}")


def find_browser() -> tuple[str, str]:
    """Paths of the system Chromium and its matching chromedriver (skip/fail if absent)."""
    if importlib.util.find_spec("selenium") is None:
        skip_or_fail("the selenium package is not installed (pip install -e '.[test]')")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        skip_or_fail(f"headless Chromium not found (chromium: {chromium}, chromedriver: {driver})")
    return chromium, driver


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """A headless Chromium session driven by selenium through Debian's chromedriver.

    Session-scoped so that a test listing it before `mlflow_server` skips (or fails) before a
    server is started for nothing: pytest sets up same-scope fixtures in argument order.
    """
    chromium, driver_path = find_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = chromium
    # --no-sandbox: CI runs as root, where Chromium refuses to start sandboxed.
    # --disable-dev-shm-usage: containers often have a 64 MB /dev/shm, too small for renderers.
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1920,1000"):
        options.add_argument(arg)
    # Passing the driver path explicitly keeps Selenium Manager from trying to download one.
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    driver.set_page_load_timeout(UI_TIMEOUT_S)
    # The MLflow Assistant side panel opens on first visit and covers a third of the page;
    # closing it up front (before the app's scripts run) keeps the screenshots readable.
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {
        "source": "try { localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"
                  " localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true'); } catch (e) {}"})
    try:
        yield driver
    finally:
        driver.quit()
