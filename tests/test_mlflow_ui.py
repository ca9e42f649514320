"""The MLflow UI of a real tracking server, opened in headless Chromium, on what the pipeline wrote.

The pipeline's runs are those of the reproducibility check's second tiny run (the session fixture
`tiny_repro`, tests/tiny_repro.py: `dvc repro` in a temp workspace, MLflow in its SQLite store).
A module fixture copies that workspace, starts a real `mlflow server` on the copy's store, deploys
its INT8 model to the `local` device group with `fab deploy --group local`, as `make run` does,
and re-runs `dvc repro report`, which folds that device in: both log to the server over HTTP. The tests then
open the pipeline experiment's runs page and the compare view of the latest report run's variant
and device children, and check what the page shows: run names, metric names and values (the UI
is a React app, so every check waits, bounded, for text to appear). Screenshots go to
`test-artifacts/` at the repository root (env TEST_ARTIFACTS_DIR overrides), also when a check
fails, so a person can see what the browser saw.

Chromium and chromedriver come from Debian (`scripts/bootstrap.sh --with-browser`, which
`make test` runs). Without them the test skips on a developer machine but fails under CI (env
`CI` set), where bootstrap installs them and their absence is a bug.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import mlflow
import pytest
import yaml
from browser import UI_TIMEOUT_S, artifacts_dir
from mlflow_server import MlflowServer, run_mlflow_server
from support import free_port, run_checked

from edge_runtime.supervisor import stop_supervisor
from pipeline.tools.repro_check import run_env
from pipeline.tracking.mlflow_runs import DEFAULT_EXPERIMENT, EXPERIMENT_ENV

# `browser`, and the session's tiny pipeline runs (shared with test_e2e_repro.py and test_repro_check.py).
pytest_plugins = ["browser", "tiny_repro"]

if TYPE_CHECKING:
    from tiny_repro import TinyRepro

# Slow: the whole tiny pipeline, twice (the session's reproducibility check), unless another module ran it.
pytestmark = [pytest.mark.server, pytest.mark.slow]

# MLflow 3.17 opens an experiment in its GenAI view unless the URL asks for model training (its
# "GenAI / Model training" switch); the pipeline prints links with this, see stages/report.py.
RUNS_VIEW = "?workflowType=machine_learning"


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


# Texts of the visible leaf elements to the right of `anchor`, in the same row (its vertical middle),
# left to right: what a person reads across that row, whatever grid the UI renders it in.
_ROW_TEXTS_JS = """
const r = arguments[0].getBoundingClientRect(), cy = (r.top + r.bottom) / 2, out = [];
for (const el of document.querySelectorAll('body *')) {
  if (el.children.length) continue;
  const b = el.getBoundingClientRect(), text = el.textContent.trim();
  if (text && b.width > 0 && b.top <= cy && cy <= b.bottom && b.left >= r.right - 1) out.push([b.left, text]);
}
return out.sort((a, b) => a[0] - b[0]).map(x => x[1]);
"""


def _row_texts(driver: Any, xpath: str) -> list[str]:
    """The texts shown to the right of the element at `xpath` (waited for), in its row."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    anchor = WebDriverWait(driver, UI_TIMEOUT_S).until(ec.visibility_of_element_located((By.XPATH, xpath)))
    return list(driver.execute_script(_ROW_TEXTS_JS, anchor))


def _shown_as(value: float, shown: str) -> bool:
    """Whether the UI's text `shown` displays `value` (the compare view rounds to 4 significant digits)."""
    if shown == "NaN" or math.isnan(value):
        return shown == "NaN" and math.isnan(value)
    return math.isclose(float(shown), value, rel_tol=1e-3, abs_tol=1e-9)


@dataclass(frozen=True)
class TinyPipeline:
    """What the tiny pipeline wrote and the server that shows it: its experiment and workspace."""

    experiment_id: str
    workspace: Path
    stages: list[str]  # dvc.yaml's stages: one top-level MLflow run each, plus the report's re-run
    server: MlflowServer


@pytest.fixture(scope="module")
def tiny_pipeline(tiny_repro: TinyRepro, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TinyPipeline]:
    """The check's run 2, copied; `mlflow server` on its store; `fab deploy --group local` and
    `dvc repro report` into that server.

    A copy, so the check's workspaces stay as they ran (tests/test_repro_check.py compares them
    again). The deploy starts the device service under the runtime's supervisor, as `make run`
    does; it listens on a free port (not the committed one a user's own service may hold) and is
    stopped after the module.
    """
    root = tmp_path_factory.mktemp("ui_pipeline")
    ws = root / "repo"
    shutil.copytree(tiny_repro.run2, ws, symlinks=True)
    env = run_env(ws)  # MLflow: the copy's SQLite store, until the server below holds it
    env.pop(EXPERIMENT_ENV, None)  # the pipeline's own experiment name, as a user gets it
    run_checked(["dvc", "config", "--local", "cache.dir", str(ws / ".dvc" / "cache")], ws, env)
    # The committed `local` group, pointed at a temp deploy dir and this Python (the workspace has
    # no .venv), with a short on-device benchmark.
    inventory = yaml.safe_load((ws / "inventory.yaml").read_text())
    local = inventory["groups"]["local"]
    local["defaults"].update(deploy_dir=str(root / "device"), python=sys.executable, bench_warmup=2,
                             bench_iterations=20)
    local["defaults"]["service"]["http_port"] = free_port()
    inventory["groups"] = {"local": local}
    (root / "inventory.yaml").write_text(yaml.safe_dump(inventory, sort_keys=False))
    # The server's store is the workspace's own mlflow.db (run_env's), so it serves the pipeline's runs.
    with run_mlflow_server(ws) as server:
        assert server.backend_db == ws / "mlflow.db"
        env["MLFLOW_TRACKING_URI"] = server.uri
        try:
            run_checked(["fab", "deploy", "--group", "local", "--inventory", str(root / "inventory.yaml")], ws, env)
            run_checked(["dvc", "repro", "report"], ws, env)  # a new device result: the report runs again
            exp = mlflow.MlflowClient(server.uri).get_experiment_by_name(DEFAULT_EXPERIMENT)
            assert exp is not None and exp.tags.get("mlflow.experimentKind") == "custom_model_development"
            yield TinyPipeline(exp.experiment_id, ws, list(yaml.safe_load((ws / "dvc.yaml").read_text())["stages"]),
                               server)
        finally:
            stop_supervisor(root / "device")


def test_ui_shows_the_pipeline_runs_and_their_metrics(browser: Any, tiny_pipeline: TinyPipeline) -> None:
    mlflow_server = tiny_pipeline.server
    client = mlflow.MlflowClient(mlflow_server.uri)
    runs = client.search_runs([tiny_pipeline.experiment_id])
    top = {r.info.run_name for r in runs if "mlflow.parentRunId" not in r.data.tags}
    assert top == {*tiny_pipeline.stages, "deploy local"}  # the report twice, under one name
    metrics = {r.info.run_name: r.data.metrics for r in runs if r.info.run_name in ("data", "export")}
    out = artifacts_dir()

    browser.get(f"{mlflow_server.uri}/#/experiments/{tiny_pipeline.experiment_id}/runs{RUNS_VIEW}")
    shot = out / "mlflow-ui-runs.png"
    _wait_for_texts(browser, sorted(top) + [f"{len(runs)} matching runs"], "runs page", shot)
    _show_metric_columns(browser, ["images_total", "size_mb"])
    shown = {"images_total": f"{metrics['data']['images_total']:g}", "size_mb": f"{metrics['export']['size_mb']:g}"}
    _wait_for_texts(browser, list(shown) + list(shown.values()), "runs page metric columns", shot)
    browser.save_screenshot(str(shot))
    # Each value in its own run's row: the dataset's size on `data`, the FP32 model's size on `export`.
    link = "//a[normalize-space()='{}']"
    assert shown["images_total"] in _row_texts(browser, link.format("data")), _row_texts(browser, link.format("data"))
    assert shown["size_mb"] in _row_texts(browser, link.format("export")), _row_texts(browser, link.format("export"))
    assert shown["images_total"] == str(json.loads((tiny_pipeline.workspace / "reports/data/headline.json")
                                                   .read_text())["images_total"])  # what DVC shows, too


def test_ui_compares_the_report_variants_and_the_device(browser: Any, tiny_pipeline: TinyPipeline) -> None:
    mlflow_server = tiny_pipeline.server
    client = mlflow.MlflowClient(mlflow_server.uri)
    (report, *_) = client.search_runs([tiny_pipeline.experiment_id], "tags.stage = 'report'",
                                      order_by=["attributes.start_time DESC"])
    children = sorted(client.search_runs([tiny_pipeline.experiment_id],
                                         f"tags.mlflow.parentRunId = '{report.info.run_id}'"),
                      key=lambda r: r.info.run_name)
    names = [c.info.run_name for c in children]
    assert names == ["device workstation", "variant dynamic", "variant fp32", "variant int8", "variant pytorch"]
    ids = json.dumps([c.info.run_id for c in children], separators=(",", ":"))

    browser.get(f"{mlflow_server.uri}/#/compare-runs?runs={ids}&experiments=[\"{tiny_pipeline.experiment_id}\"]"
                f"&{RUNS_VIEW[1:]}")
    shot = artifacts_dir() / "mlflow-ui-compare.png"
    _wait_for_texts(browser, [f"Comparing {len(children)} Runs", *names, "p50_ms", "fps", "mAP50-95_val"],
                    "compare page", shot)
    from selenium.webdriver.common.by import By

    # The run table below the (empty) plots: its names, then the metric rows, in the screenshot.
    browser.execute_script("arguments[0].scrollIntoView()",
                           browser.find_element(By.XPATH, "//*[normalize-space()='Run Name:']"))
    browser.save_screenshot(str(shot))
    assert _row_texts(browser, "//*[normalize-space()='Run Name:']") == names  # one column per run, in order
    # The same metric names on variants and the device: one row each, a value per run (NaN: not measured).
    for metric in ("p50_ms", "fps", "mAP50-95_val"):
        row = _row_texts(browser, f"//a[@title='Plot chart' and normalize-space()='{metric}']")
        logged = [c.data.metrics.get(metric, float("nan")) for c in children]
        assert len(row) == len(children) and all(_shown_as(v, t) for v, t in zip(logged, row)), (metric, row, logged)
    # The device column is the on-device benchmark `fab deploy` brought back, not the host benchmark.
    (result,) = (tiny_pipeline.workspace / "reports/fleet/workstation").glob("*.json")
    assert children[0].data.metrics["p50_ms"] == json.loads(result.read_text())["latency_ms"]["p50"]
