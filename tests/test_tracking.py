"""MLflow conventions: URI from the env, one run per stage, lineage tags, params logged."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from pipeline import tracking
from pipeline.params import BaseParams, load_params
from pipeline.paths import repo_root


def test_uri_defaults_to_repo_sqlite(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri() == f"sqlite:///{repo_root() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking.tracking_uri() == "http://127.0.0.1:5999"


def test_stage_run_tags_params_and_failure(isolated_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIPELINE_RUN_ID", "pipe-1")
    base = load_params("base", BaseParams)
    with tracking.stage_run("data", base, tags={"data_source": "synthetic"}) as run:
        tracking.log_metrics({"metrics/mAP50-95(B)": 0.5, "skip": float("nan"), "flag": True})
    client = mlflow.MlflowClient(tracking.tracking_uri())
    got = client.get_run(run.info.run_id)
    assert got.info.status == "FINISHED"
    assert got.data.tags["stage"] == "data" and got.data.tags["pipeline_run"] == "pipe-1"
    assert got.data.tags["data_source"] == "synthetic"
    assert len(got.data.tags["params_hash"]) == 16 and got.data.tags["git_commit"]
    assert got.data.params == {"base.seed": str(base.seed), "base.threads": str(base.threads)}
    assert got.data.metrics == {"mAP50-95": 0.5}

    with pytest.raises(RuntimeError):
        with tracking.stage_run("train", base) as failed:
            raise RuntimeError("boom")
    assert client.get_run(failed.info.run_id).info.status == "FAILED"
    exp = client.get_experiment_by_name(tracking.experiment_name())
    assert exp is not None and exp.artifact_location.startswith("file://")
    assert len(client.search_runs([exp.experiment_id])) == 2
    assert mlflow.active_run() is None


def test_sanitize_metric_names() -> None:
    assert tracking.sanitize_metric_name("metrics/mAP50-95(B)") == "mAP50-95"
    assert tracking.sanitize_metric_name("train/box_loss") == "train_box_loss"
    assert tracking.sanitize_metric_name("a(b)c") == "a_b_c"
