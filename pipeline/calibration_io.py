"""Reading a calibration set (`calibration/<set>/tensors.npy` + `manifest.json`) for quantization."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.paths import CALIBRATION_MANIFEST, CALIBRATION_TENSORS


def load_calibration_tensors(set_dir: Path, imgsz: int) -> np.ndarray:
    """Load (N, 3, imgsz, imgsz) float32 calibration tensors, checking shape, range and provenance."""
    tensors_path, manifest_path = set_dir / CALIBRATION_TENSORS, set_dir / CALIBRATION_MANIFEST
    if not tensors_path.is_file() or not manifest_path.is_file():
        raise ValueError(f"calibration set {set_dir} is missing {CALIBRATION_TENSORS} or {CALIBRATION_MANIFEST}; "
                         "run the calibrate stage (dvc repro calibrate) or fix quantize.calibration_set")
    try:
        tensors = np.load(tensors_path, allow_pickle=False)
        json.loads(manifest_path.read_text())
    except (ValueError, OSError) as e:
        raise ValueError(f"calibration set {set_dir} is unreadable ({e}); re-run the calibrate stage") from e
    if tensors.ndim != 4 or tensors.shape[1:] != (3, imgsz, imgsz) or tensors.dtype != np.float32:
        raise ValueError(f"{tensors_path} holds {tensors.dtype} {tensors.shape}, expected float32 (N, 3, {imgsz}, {imgsz}); "
                         "calibrate.imgsz must equal export.imgsz: re-run the calibrate stage")
    if len(tensors) == 0:
        raise ValueError(f"{tensors_path} is empty: the calibration set has no frames; add camera frames")
    if not np.isfinite(tensors).all() or tensors.min() < 0 or tensors.max() > 1:
        raise ValueError(f"{tensors_path} has values outside [0, 1]: not made by the device preprocessing")
    return tensors
