"""Reading a calibration set (`calibration/<set>/tensors.npy` + `manifest.json`) for quantization."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.config.paths import CALIBRATION_MANIFEST, CALIBRATION_TENSORS


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
        raise ValueError(f"{tensors_path} holds {tensors.dtype} {tensors.shape}, "
                         f"expected float32 (N, 3, {imgsz}, {imgsz}); "
                         "calibrate.imgsz must equal export.imgsz: re-run the calibrate stage")
    if len(tensors) == 0:
        raise ValueError(f"{tensors_path} is empty: the calibration set has no frames; add camera frames")
    if not np.isfinite(tensors).all() or tensors.min() < 0 or tensors.max() > 1:
        raise ValueError(f"{tensors_path} has values outside [0, 1]: not made by the device preprocessing")
    return tensors



def calibration_frame_paths(set_dir: Path) -> list[Path]:
    """The source frames a calibration set was made from, in manifest order, checked against their sha256.

    The manifest records each selected frame's path relative to `source_dir` (relative to the
    working directory, as the calibrate stage wrote it) and its sha256, so a frame that moved or
    changed since is an error rather than a silently different calibration set.
    """
    from edge_runtime.fileio import sha256_file

    manifest_path = set_dir / CALIBRATION_MANIFEST
    if not manifest_path.is_file():
        raise ValueError(f"calibration set {set_dir} has no {CALIBRATION_MANIFEST}; run the calibrate stage "
                         "(dvc repro calibrate)")
    try:
        manifest = json.loads(manifest_path.read_text())
        source_dir = Path(manifest["source_dir"])
        frames = [(str(f["path"]), str(f["sha256"])) for f in manifest["frames"]]
    except (ValueError, OSError, KeyError, TypeError) as e:
        raise ValueError(f"{manifest_path} is unreadable or lacks source_dir/frames ({e!r}); re-run the calibrate "
                         "stage") from e
    if not frames:
        raise ValueError(f"{manifest_path} lists no frames: the calibration set is empty; add camera frames")
    out = []
    for rel, sha in frames:
        path = source_dir / rel
        if not path.is_file():
            raise ValueError(f"calibration frame {path} (listed in {manifest_path}) not found; the frames moved or "
                             "the camera/data stage rewrote them: re-run the calibrate stage")
        if sha256_file(path) != sha:
            raise ValueError(f"calibration frame {path} changed since {manifest_path} was written (sha256 differs); "
                             "re-run the calibrate stage")
        out.append(path)
    return out


def rebuild_calibration_tensors(set_dir: Path, imgsz: int) -> np.ndarray:
    """Re-make a calibration set's tensors at another input size from the frames its manifest lists.

    Same frames (hash-checked), same device letterbox/normalisation as the calibrate stage, only
    `imgsz` differs: for quantizing a model exported at another size. Returns (N, 3, imgsz,
    imgsz) float32 in manifest order.
    """
    from edge_runtime import preprocess
    from pipeline.imagesets.yolo import decode_image

    boxed = [preprocess.letterbox(decode_image(path), imgsz)[0] for path in calibration_frame_paths(set_dir)]
    return preprocess.to_tensor(boxed)
