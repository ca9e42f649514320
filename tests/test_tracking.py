"""MLflow conventions: URI from the env, one run per stage, lineage tags, params logged."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from pipeline.config.params import BaseParams, load_params
from pipeline.config.paths import repo_root
from pipeline.tracking import mlflow_runs as tracking


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


def test_lineage_tags_files_folders_and_bad_names(tmp_path: Path) -> None:
    from edge_runtime.fileio import sha256_file, tree_sha256
    from pipeline.tracking.mlflow_runs import lineage_tags

    data = tmp_path / "defects"
    (data / "labels").mkdir(parents=True)
    (data / "labels" / "a.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    (data / "labels" / "train.cache").write_bytes(b"ultralytics litter")  # not part of the dataset
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"weights")
    tags = lineage_tags(dataset=data, weights=weights, onnx=tmp_path / "missing.onnx", int8=None)
    assert tags == {"dataset_sha256": tree_sha256(data, exclude_suffixes=(".cache",)),
                    "weights_sha256": sha256_file(weights)}
    (data / "labels" / "train.cache").write_bytes(b"different litter")
    assert lineage_tags(dataset=data)["dataset_sha256"] == tags["dataset_sha256"]
    with pytest.raises(ValueError, match="unknown lineage artifact 'model'"):
        lineage_tags(model=weights)


def test_walk_lineage_from_quantize_back_to_data(tmp_path: Path) -> None:
    """Stage runs linked only by their sha256 tags; the walk finds each producer, newest first."""
    import mlflow

    from pipeline.tracking.mlflow_runs import lineage_tags, set_tags, stage_run, tracking_uri, walk_lineage

    files = {}
    for name in ("weights", "onnx", "int8", "calib", "frames"):
        files[name] = tmp_path / name
        files[name].write_bytes(name.encode())
    data = tmp_path / "data"
    data.mkdir()
    (data / "x.txt").write_text("x")
    with stage_run("data") as _:
        set_tags(lineage_tags(dataset=data))
    with stage_run("data") as data_run:  # the newer producer of the same dataset wins
        set_tags(lineage_tags(dataset=data))
    with stage_run("camera") as camera_run:
        set_tags(lineage_tags(camera_frames=files["frames"]))
    with stage_run("calibrate", tags=lineage_tags(camera_frames=files["frames"])) as calib_run:
        set_tags(lineage_tags(calibration_camera=files["calib"]))
    with stage_run("train", tags=lineage_tags(dataset=data)) as train_run:
        set_tags(lineage_tags(weights=files["weights"]))
    with stage_run("export", tags=lineage_tags(weights=files["weights"])) as export_run:
        set_tags(lineage_tags(onnx=files["onnx"]))
    with stage_run("quantize", tags=lineage_tags(onnx=files["onnx"], calibration=files["calib"])) as q_run:
        set_tags(lineage_tags(int8=files["int8"]))
    chain = walk_lineage(q_run.info.run_id, mlflow.MlflowClient(tracking_uri()))
    got = {c["stage"]: c["run_id"] for c in chain}
    assert got == {"quantize": q_run.info.run_id, "export": export_run.info.run_id, "train": train_run.info.run_id,
                   "data": data_run.info.run_id, "calibrate": calib_run.info.run_id,
                   "camera": camera_run.info.run_id}
    assert chain[0]["stage"] == "quantize" and all(c["git_commit"] and c["params_hash"] == "" for c in chain)


def test_experiment_is_tagged_for_mlflow_3_model_training_view(isolated_env: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow 3.4's UI opens an experiment on its training runs when `mlflow.experimentKind` says so
    (3.17.2 goes by a URL parameter instead, docs/results-at-the-terminal.md):
    a new experiment is created with it, and an existing one without it (made by an older version
    of this code, or by hand) gets it on the next stage run or fleet deploy."""
    client = mlflow.MlflowClient(tracking.tracking_uri())
    with tracking.stage_run("data"):
        pass
    exp = client.get_experiment_by_name(tracking.experiment_name())
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"

    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "made-elsewhere")
    old = client.create_experiment("made-elsewhere")
    assert "mlflow.experimentKind" not in client.get_experiment(old).tags
    assert tracking.experiment_id() == old  # what the fleet's MLflow logging calls
    assert client.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"
