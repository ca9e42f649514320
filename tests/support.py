"""Helpers shared by test modules (import them from here, not from conftest).

Two conftest.py files exist (tests/ and tests/fleet/), and both are the module `conftest` to
Python: `from conftest import ...` gets whichever pytest imported last. Plain helpers live here.
"""

from __future__ import annotations

import copy
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

REPO = Path(__file__).resolve().parent.parent


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


def copy_repo(dest: Path) -> Path:
    """Copy the tracked parts of the repository (no venv, no outputs) to `dest`."""
    ignore = shutil.ignore_patterns(".venv", ".git", "__pycache__", ".pytest_cache", "mlflow.db",
                                    "mlartifacts", "runs", "data", "models", "reports", "calibration", "*.egg-info",
                                    "build", "dvc_plots", "cache", "tmp")  # cache/tmp: .dvc's, GBs locally
    shutil.copytree(REPO, dest, ignore=ignore)
    (dest / ".dvc" / "cache").mkdir(parents=True, exist_ok=True)
    return dest


@contextmanager
def mlflow_store(root: Path) -> Iterator[None]:
    """Log to a SQLite MLflow store in `root` inside the block (session fixtures outlive the
    per-test monkeypatch, so they set and restore the variable themselves)."""
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved
