"""The repository's file layout, in one place.

Stage modules take these as their CLI defaults; `dvc.yaml` declares the same paths as deps and
outs, and `tests/test_dvc_yaml.py` checks that the two agree, so a stage cannot write a file DVC
does not know about.
"""

from __future__ import annotations

from pathlib import Path

PARAMS_FILE = Path("params.yaml")

DATASET_DIR = Path("data/defects")
DATASET_YAML = DATASET_DIR / "dataset.yaml"
DATA_METRICS = Path("reports/data/metrics.json")

WEIGHTS = Path("models/yolov8n.pt")
TRAIN_METRICS = Path("reports/train/metrics.json")
TRAIN_EPOCHS = Path("reports/train/epochs.csv")

ONNX_MODEL = Path("models/yolov8n.onnx")
EXPORT_METRICS = Path("reports/export/metrics.json")


def repo_root() -> Path:
    """The repository root: the folder that holds the `pipeline` package (and dvc.yaml)."""
    return Path(__file__).resolve().parent.parent
