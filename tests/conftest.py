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
