"""Stages against a real MLflow tracking server (`mlflow server`, SQLite backend, proxied artifacts).

The local default (a SQLite file) is covered by test_tracking.py; here the same conventions must
hold over HTTP: a stage run as a user runs it (`python -m pipeline.stages.data`, a subprocess) logs its
lineage tags, params and metrics to the server, artifacts uploaded through the server land in
its artifact root, and an unreachable server fails the stage at once with a message that says
what to do.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import pytest
import yaml
from support import REPO, tiny_params

from pipeline.config.params import BaseParams, DataParams, load_params, params_hash
from pipeline.tracking import mlflow_runs as tracking

# Registers the session-scoped `mlflow_server` fixture once for all modules that name it. The
# module itself is imported only through this line (below: lazily, or for types), so pytest can
# still assertion-rewrite it as a plugin.
pytest_plugins = ["mlflow_server"]

if TYPE_CHECKING:
    from mlflow_server import MlflowServer

STAGE_TIMEOUT_S = 300  # the tiny data stage takes seconds; this only bounds a hang


def _stage_env(uri: str, experiment: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(MLFLOW_TRACKING_URI=uri, MLFLOW_EXPERIMENT_NAME=experiment, YOLO_OFFLINE="1",
               PIPELINE_RUN_ID="server-test-pipeline")
    return env


def _run_data_stage(tmp_path: Path, params: dict[str, Any], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    # Run from the repository (its git commit is the lineage tag) but write only into tmp_path.
    cmd = [sys.executable, "-m", "pipeline.stages.data", "--out", str(tmp_path / "defects"),
           "--metrics", str(tmp_path / "metrics.json"), "--headline", str(tmp_path / "headline.json"),
           "--params", str(params_path)]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=STAGE_TIMEOUT_S)


@pytest.mark.server
def test_data_stage_logs_run_to_tracking_server(mlflow_server: MlflowServer, tmp_path: Path,
                                                repo_params: dict[str, Any]) -> None:
    params = tiny_params(repo_params)
    proc = _run_data_stage(tmp_path, params, _stage_env(mlflow_server.uri, "server-stage"))
    assert proc.returncode == 0, (f"data stage failed against {mlflow_server.uri}:\n{proc.stdout}\n{proc.stderr}\n"
                                  f"server log tail:\n{mlflow_server.log_tail()}")

    client = mlflow.MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name("server-stage")
    assert exp is not None, "the stage did not create its experiment on the server"
    # Proxied artifacts: the experiment points at the server, not at a path on the client's disk.
    assert exp.artifact_location.startswith("mlflow-artifacts:"), exp.artifact_location
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "data"

    tags = run.data.tags
    params_path = tmp_path / "params.yaml"
    expected_hash = params_hash(load_params("base", BaseParams, params_path),
                                load_params("data", DataParams, params_path))
    assert tags["stage"] == "data"
    assert tags["params_hash"] == expected_hash
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", tags["git_commit"]), tags["git_commit"]
    assert tags["pipeline_run"] == "server-test-pipeline"
    assert tags["data_source"] == "synthetic"
    assert len(tags["dataset_sha256"]) == 64  # lineage: the dataset it produced

    synthetic = params["data"]["synthetic"]
    assert run.data.params["base.seed"] == str(params["base"]["seed"])
    assert run.data.params["data.synthetic.train_images"] == str(synthetic["train_images"])
    written = yaml.safe_load((tmp_path / "metrics.json").read_text())  # JSON is YAML
    total = synthetic["train_images"] + synthetic["val_images"] + synthetic["test_images"]
    assert run.data.metrics["images_total"] == total == written["images_total"]
    assert run.data.metrics["instances_total"] == written["instances_total"]


@pytest.mark.server
def test_stage_artifact_lands_in_server_artifact_root(mlflow_server: MlflowServer, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """`tracking.log_artifact` (what train/export/quantize call) uploads through the server."""
    per_test_store = os.environ["MLFLOW_TRACKING_URI"]  # isolated_env's SQLite store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "server-artifacts")
    model = tmp_path / "tiny.onnx"
    model.write_bytes(os.urandom(4096))
    try:
        with tracking.stage_run("export", load_params("base", BaseParams)) as run:
            tracking.log_artifact(model, "model")
    finally:
        # mlflow keeps the URI stage_run set in a process global: leave no server there that
        # stops at the end of the session.
        mlflow.set_tracking_uri(per_test_store)
    run_id = run.info.run_id

    landed = sorted(mlflow_server.artifact_root.rglob("tiny.onnx"))
    assert len(landed) == 1, f"expected one upload under {mlflow_server.artifact_root}, found {landed}"
    assert run_id in landed[0].parts and landed[0].parent.name == "model", landed[0]
    assert landed[0].read_bytes() == model.read_bytes()
    # And a client reads it back over HTTP (what `fab deploy` does when it resolves a run's model).
    fetched = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="model/tiny.onnx",
                                                  dst_path=str(tmp_path / "back"),
                                                  tracking_uri=mlflow_server.uri)
    assert Path(fetched).read_bytes() == model.read_bytes()


def test_stage_fails_fast_when_tracking_server_unreachable(tmp_path: Path, repo_params: dict[str, Any]) -> None:
    """No server: the stage stops before doing any work, with the URI and the fix in its error."""
    from mlflow_server import free_port

    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    proc = _run_data_stage(tmp_path, tiny_params(repo_params), _stage_env(uri, "unreachable"))
    assert proc.returncode != 0
    last_line = proc.stderr.strip().splitlines()[-1]
    assert "TrackingServerUnreachable" in last_line and uri in last_line, proc.stderr
    assert "mlflow server" in last_line and "MLFLOW_TRACKING_URI" in last_line, last_line
    assert not (tmp_path / "defects").exists(), "the stage wrote its output although it could not log"
