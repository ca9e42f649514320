"""Shared fixtures. Every test gets its own MLflow store and Ultralytics config dir in tmp,
so tests never write into the repository's mlflow.db or the user's ~/.config."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def isolated_env(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point MLflow and Ultralytics at a per-test temp folder."""
    root = tmp_path_factory.mktemp("env")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    monkeypatch.setenv("YOLO_CONFIG_DIR", str(root / "yolo"))
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    monkeypatch.setenv("GIT_PYTHON_REFRESH", "quiet")
    return root


@pytest.fixture
def repo_params() -> dict[str, Any]:
    """The committed params.yaml as a dict (tests copy and shrink it)."""
    return yaml.safe_load((REPO / "params.yaml").read_text())


def tiny_params(params: dict[str, Any]) -> dict[str, Any]:
    """params.yaml shrunk so data/train/export run in about a minute on 2 cores."""
    p = copy.deepcopy(params)
    p["data"]["synthetic"].update(train_images=24, val_images=8, test_images=4, image_size=96)
    p["train"].update(imgsz=64, epochs=1, batch=8, nbs=8, workers=0, close_mosaic=0)
    p["export"].update(imgsz=64, parity_images=2)
    if "quantize" in p:
        p["quantize"].update(eval_images=8, latency_warmup=1, latency_runs=2, latency_rounds=1,
                             candidates=p["quantize"]["candidates"][:2], max_map_drop=0.5)
    if "camera" in p:  # issue 3: deployment-camera frames and calibration sets
        p["camera"]["synthetic"].update(scenes_per_camera=4, burst_length=3, labelled_images=6)
    if "calibrate" in p:
        p["calibrate"].update(imgsz=64, size=6)
    if "evaluate" in p:  # issue 3: evaluation and host benchmark (64 = export.imgsz above, 96 is exported in-run)
        p["evaluate"].update(images=8)
    if "benchmark" in p:
        p["benchmark"].update(imgsz=[64, 96], warmup=1, runs=3, rounds=2, frames=2)
    return p


@pytest.fixture
def write_params(tmp_path: Path) -> Callable[[dict[str, Any]], Path]:
    """Write a params dict to tmp_path/params.yaml and return the path."""

    def _write(params: dict[str, Any]) -> Path:
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump(params, sort_keys=False))
        return path

    return _write


def copy_repo(dest: Path) -> Path:
    """Copy the tracked parts of the repository (no venv, no outputs) to `dest`."""
    ignore = shutil.ignore_patterns(".venv", ".git", "__pycache__", ".pytest_cache", "mlflow.db",
                                    "mlartifacts", "runs", "data", "models", "reports", "calibration", "*.egg-info")
    shutil.copytree(REPO, dest, ignore=ignore)
    (dest / ".dvc" / "cache").mkdir(parents=True, exist_ok=True)
    return dest


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A real (barely trained) YOLOv8n: tiny synthetic data, 1 epoch at 64 px, exported to ONNX.

    Built once per test session through the real stage functions (about 30 s). Returns paths:
    `dataset` (YOLO folder), `weights` (.pt), `onnx` (FP32, imgsz 64), `params` (params.yaml).
    Untrained models detect little: tests that need boxes use a low confidence threshold.
    """
    import os

    from pipeline import data, export, train

    root = tmp_path_factory.mktemp("tiny_model")
    os.environ.setdefault("YOLO_CONFIG_DIR", str(root / "yolo"))
    params = tiny_params(yaml.safe_load((REPO / "params.yaml").read_text()))
    params_path = root / "params.yaml"
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    mlflow_uri = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    try:
        out = {"dataset": root / "defects", "weights": root / "yolov8n.pt", "onnx": root / "yolov8n.onnx",
               "params": params_path}
        data.main(["--out", str(out["dataset"]), "--metrics", str(root / "data.json"), "--params", str(params_path)])
        train.main(["--data", str(out["dataset"] / "dataset.yaml"), "--out", str(out["weights"]),
                    "--metrics", str(root / "train.json"), "--epochs-csv", str(root / "epochs.csv"),
                    "--params", str(params_path)])
        export.main(["--weights", str(out["weights"]), "--data", str(out["dataset"]), "--out", str(out["onnx"]),
                     "--metrics", str(root / "export.json"), "--params", str(params_path)])
    finally:
        if mlflow_uri is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = mlflow_uri
    return out
