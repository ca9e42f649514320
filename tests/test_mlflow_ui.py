"""The MLflow UI of a real tracking server, opened in headless Chromium: runs and metrics visible.

Runs with known metrics are logged to the session's test server; the experiment's runs page and
one run's page must render them (the UI is a React app, so every check waits, bounded, for text
to appear). Screenshots go to `test-artifacts/` at the repository root (env TEST_ARTIFACTS_DIR
overrides), also when a check fails, so a person can see what the browser saw.

Chromium and chromedriver come from Debian (`scripts/bootstrap.sh --with-browser`, which
`make test` runs). Without them the test skips on a developer machine but fails under CI (env
`CI` set), where bootstrap installs them and their absence is a bug.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, NoReturn

import mlflow
import pytest
from support import REPO

# The session-scoped `mlflow_server` fixture, shared with test_mlflow_server.py (one server).
pytest_plugins = ["mlflow_server"]

if TYPE_CHECKING:
    from mlflow_server import MlflowServer

UI_TIMEOUT_S = 60  # a cold UI load on a busy 2-core machine takes a few seconds; bound a hang
EXPERIMENT = "ui-check"
# Distinct values with at most 4 decimals, so each shows verbatim in the runs table.
RUNS: dict[str, dict[str, float]] = {
    "fp32-baseline": {"mAP50-95": 0.6414, "latency_ms": 9.97},
    "int8-qdq": {"mAP50-95": 0.6379, "latency_ms": 6.81},
    "int8-dynamic": {"mAP50-95": 0.6442, "latency_ms": 13.38},
}
INSTALL_HINT = "run `scripts/bootstrap.sh --with-browser` (apt-get install chromium chromium-driver)"


def artifacts_dir() -> Path:
    """Where test artifacts (screenshots) go: $TEST_ARTIFACTS_DIR or <repo>/test-artifacts."""
    out = Path(os.environ.get("TEST_ARTIFACTS_DIR") or REPO / "test-artifacts")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _skip_or_fail(reason: str) -> NoReturn:
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI installs it through bootstrap, so this is a bug in the setup ({INSTALL_HINT})")
    pytest.skip(f"{reason}; {INSTALL_HINT}")


def _find_browser() -> tuple[str, str]:
    """Paths of the system Chromium and its matching chromedriver (skip/fail if absent)."""
    if importlib.util.find_spec("selenium") is None:
        _skip_or_fail("the selenium package is not installed (pip install -e '.[test]')")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        _skip_or_fail(f"headless Chromium not found (chromium: {chromium}, chromedriver: {driver})")
    return chromium, driver


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """A headless Chromium session driven by selenium through Debian's chromedriver.

    Session-scoped so that a test listing it before `mlflow_server` skips (or fails) before a
    server is started for nothing: pytest sets up same-scope fixtures in argument order.
    """
    chromium, driver_path = _find_browser()
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


def _wait_for_texts(driver: Any, texts: list[str], page: str, shot: Path) -> None:
    """Wait until every string in `texts` is in the page's visible text; on timeout, fail with a
    screenshot and what was missing."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def body() -> str:
        return str(driver.find_element(By.TAG_NAME, "body").text)

    try:
        WebDriverWait(driver, UI_TIMEOUT_S).until(lambda d: all(t in body() for t in texts))
    except TimeoutException:
        driver.save_screenshot(str(shot))
        missing = [t for t in texts if t not in body()]
        pytest.fail(f"{page}: {missing} not visible after {UI_TIMEOUT_S} s at {driver.current_url} "
                    f"(screenshot {shot}); page text starts:\n{body()[:1500]}")


def _show_metric_columns(driver: Any, metrics: list[str]) -> None:
    """Tick the metrics in the runs table's column selector, as a user does (MLflow 3 shows no
    metric columns by default)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, UI_TIMEOUT_S)
    button = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "[data-testid='column-selection-dropdown']")))
    button.click()
    panel_id = button.get_attribute("aria-controls")  # the selector's popup, to scope the search
    for metric in metrics:
        wait.until(ec.element_to_be_clickable((By.XPATH, f"//*[@id='{panel_id}']//*[@title='{metric}']"))).click()
    driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)


@pytest.mark.server
def test_ui_shows_runs_and_metrics(browser: Any, mlflow_server: MlflowServer) -> None:
    client = mlflow.MlflowClient(mlflow_server.uri)
    exp_id = client.create_experiment(EXPERIMENT)
    run_ids: dict[str, str] = {}
    for name, metrics in RUNS.items():
        run = client.create_run(exp_id, run_name=name, tags={"stage": "evaluate"})
        for key, value in metrics.items():
            client.log_metric(run.info.run_id, key, value)
        client.set_terminated(run.info.run_id)
        run_ids[name] = run.info.run_id
    out = artifacts_dir()

    # workflowType: MLflow 3 opens experiments in its GenAI view unless asked for model training.
    browser.get(f"{mlflow_server.uri}/#/experiments/{exp_id}/runs?workflowType=machine_learning")
    runs_shot = out / "mlflow-ui-runs.png"
    _wait_for_texts(browser, list(RUNS), "runs page", runs_shot)
    metric_names = list(next(iter(RUNS.values())))
    _show_metric_columns(browser, metric_names)
    values = [f"{m[k]:g}" for m in RUNS.values() for k in metric_names]
    _wait_for_texts(browser, metric_names + values, "runs page metric columns", runs_shot)
    browser.save_screenshot(str(runs_shot))

    name = "int8-qdq"
    browser.get(f"{mlflow_server.uri}/#/experiments/{exp_id}/runs/{run_ids[name]}?workflowType=machine_learning")
    run_shot = out / "mlflow-ui-run.png"
    _wait_for_texts(browser, [name, run_ids[name], "mAP50-95", f"{RUNS[name]['mAP50-95']:g}"], "run page", run_shot)
    browser.save_screenshot(str(run_shot))
    assert runs_shot.stat().st_size > 0 and run_shot.stat().st_size > 0
