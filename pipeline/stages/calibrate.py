"""Stage `calibrate`: build INT8 calibration sets -> calibration/<set>/ (tensors.npy + manifest.json).

Two sets, from fixed sources:
  camera   data/camera_frames/frames/<camera-id>/*  (stage `camera`; the set quantization should use)
  train    data/defects/images/train/*               (the training images, for comparison)

For each set: list the frames (sorted), drop near-duplicates by a DCT perceptual hash (a
streaming camera delivers bursts of nearly identical frames, which would weight calibration
towards whatever the camera looked at longest), choose a diverse subset of `calibrate.size`
frames by greedy farthest-point sampling on a cheap descriptor (grey thumbnail + colour
histogram), and preprocess them with THE device preprocessing (`runtime/edge_runtime/preprocess.py`:
letterbox + to_tensor) at `calibrate.imgsz`, which must equal `export.imgsz`.

Each set folder holds `tensors.npy` (N, 3, imgsz, imgsz) float32 RGB in [0, 1] and
`manifest.json`: source frames (relative paths + sha256), selection method and params, counts,
and per-channel statistics of the tensors. All sets are built in temp folders first and swapped
in at the end, so an error in any set leaves every previous set untouched.
"""

from __future__ import annotations

import io
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edge_runtime import preprocess
from edge_runtime.fileio import atomic_write_bytes, atomic_write_json, sha256_file
from pipeline.config import paths
from pipeline.config.params import BaseParams, CalibrateParams, ExportParams
from pipeline.config.stage_cli import run_stage, stage_cli, stage_params
from pipeline.imagesets.near_duplicates import dedup, phash
from pipeline.imagesets.yolo import IMAGE_SUFFIXES, decode_image
from pipeline.tracking.mlflow_runs import lineage_tags, log_metrics, set_tags, stage_run

SELECTION_METHOD = "phash-dedup + greedy-farthest-point"
PREPROCESS_MODULE = "runtime/edge_runtime/preprocess.py"


class CalibrationError(ValueError):
    """A calibration set cannot be built as configured; the message says why and what to change."""


@dataclass(frozen=True)
class Frame:
    """One calibration candidate: its file, the group it belongs to (camera id or split)."""

    path: Path
    rel: str  # path relative to the set's source folder (what the manifest records)
    group: str


# ------------------------------------------------------------------------------------------
# Listing
# ------------------------------------------------------------------------------------------


def _images_in(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)


def list_camera_frames(frames_dir: Path) -> list[Frame]:
    """Every frame under `frames_dir/<camera-id>/`, sorted by camera then name."""
    if not frames_dir.is_dir():
        raise CalibrationError(f"camera frames folder {frames_dir} not found; run the camera stage (dvc repro camera)")
    cameras = sorted(d for d in frames_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not cameras:
        raise CalibrationError(f"{frames_dir}: no camera folders; the camera stage writes frames/<camera-id>/ "
                               "(check camera.source and camera.ingest_dir)")
    frames = []
    for cam in cameras:
        images = _images_in(cam)
        if not images:
            raise CalibrationError(f"camera folder {cam} holds no images ({', '.join(IMAGE_SUFFIXES)}); "
                                   "add frames or remove the folder")
        frames += [Frame(f, f.relative_to(frames_dir).as_posix(), cam.name) for f in images]
    return frames


def list_train_images(dataset_dir: Path) -> list[Frame]:
    """Every training image of the dataset at `dataset_dir` (images/train/), sorted."""
    folder = dataset_dir / "images" / "train"
    if not folder.is_dir():
        raise CalibrationError(f"{folder} not found; run the data stage first (dvc repro data)")
    images = sorted(f for f in folder.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise CalibrationError(f"{folder} holds no images; rebuild the dataset (dvc repro data)")
    return [Frame(f, f.relative_to(dataset_dir).as_posix(), "train") for f in images]


# ------------------------------------------------------------------------------------------
# Descriptor, farthest-point selection (the perceptual hash and dedup: imagesets/near_duplicates.py)
# ------------------------------------------------------------------------------------------


def descriptor(img: np.ndarray, thumb_size: int, hist_bins: int, hist_weight: float) -> np.ndarray:
    """A cheap appearance descriptor: grey thumbnail (layout, brightness) + colour histogram (cast).

    The thumbnail is scaled so its part of a Euclidean distance is an RMS grey difference in
    [0, 1]; each channel's histogram sums to 1 and is weighted by `hist_weight`.
    """
    gray = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    thumb = cv2.resize(gray, (thumb_size, thumb_size), interpolation=cv2.INTER_AREA).astype(np.float64) / 255.0
    hists = [cv2.calcHist([img], [c], None, [hist_bins], [0, 256]).reshape(-1) for c in range(3)]
    hist = np.concatenate([h / max(h.sum(), 1.0) for h in hists])
    return np.concatenate([thumb.reshape(-1) / thumb_size, hist_weight * hist])


def farthest_point_order(desc: np.ndarray, k: int) -> list[int]:
    """Greedy farthest-point sampling of `k` rows of `desc` (N, D); deterministic.

    Starts at the row nearest the mean (the most typical frame), then repeatedly adds the row
    farthest from everything chosen so far; ties go to the lowest index.
    """
    if not 1 <= k <= len(desc):
        raise ValueError(f"cannot choose {k} of {len(desc)} frames")
    start = int(np.argmin(np.linalg.norm(desc - desc.mean(0), axis=1)))
    chosen = [start]
    min_d = np.linalg.norm(desc - desc[start], axis=1)
    for _ in range(k - 1):
        nxt = int(np.argmax(min_d))
        chosen.append(nxt)
        min_d = np.minimum(min_d, np.linalg.norm(desc - desc[nxt], axis=1))
    return chosen


# ------------------------------------------------------------------------------------------
# One set
# ------------------------------------------------------------------------------------------


@dataclass
class CalibrationSet:
    """A built (not yet swapped-in) calibration set: where its temp folder is and its summary."""

    name: str
    tmp_dir: Path
    manifest: dict[str, Any]


def check_imgsz(p: CalibrateParams, export: ExportParams) -> None:
    """The tensors feed the exported model, so their size must be the model's input size."""
    if p.imgsz != export.imgsz:
        raise CalibrationError(
            f"calibrate.imgsz is {p.imgsz} but export.imgsz is {export.imgsz}: calibration tensors must match "
            f"the exported model's input; set calibrate.imgsz: {export.imgsz} in params.yaml"
        )


def _scan(frames: list[Frame], p: CalibrateParams) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """Decode every frame once: pHashes, descriptors and sizes; mixed sizes within a group fail."""
    hashes, descs, sizes = [], [], []
    first: dict[str, tuple[Frame, tuple[int, int]]] = {}
    for f in frames:
        img = decode_image(f.path)  # DatasetError naming the file when corrupt or empty
        hw = (int(img.shape[0]), int(img.shape[1]))
        if f.group in first and first[f.group][1] != hw:
            other, ohw = first[f.group]
            raise CalibrationError(
                f"frame {f.path} is {hw[1]}x{hw[0]} but {other.path} is {ohw[1]}x{ohw[0]}: frames of one camera "
                f"({f.group}) must share one size; move frames of another camera or resolution to their own folder"
            )
        first.setdefault(f.group, (f, hw))
        hashes.append(phash(img, p.phash_size, p.phash_highfreq))
        descs.append(descriptor(img, p.thumb_size, p.hist_bins, p.hist_weight))
        sizes.append(hw)
    return np.array(hashes), np.array(descs), sizes


def tensor_stats(tensors: np.ndarray) -> dict[str, Any]:
    """Per-channel (RGB) mean/std over all pixels, and per-frame brightness spread, of (N, 3, H, W)."""
    x = tensors.astype(np.float64)
    per_frame = x.mean(axis=(1, 2, 3))
    return {
        "channel_mean_rgb": [round(float(v), 6) for v in x.mean(axis=(0, 2, 3))],
        "channel_std_rgb": [round(float(v), 6) for v in x.std(axis=(0, 2, 3))],
        "brightness_mean": round(float(per_frame.mean()), 6),
        "brightness_std_across_frames": round(float(per_frame.std()), 6),
        "min": round(float(x.min()), 6),
        "max": round(float(x.max()), 6),
    }


def build_calibration_set(name: str, frames: list[Frame], source_dir: Path, work_dir: Path,
                          p: CalibrateParams, seed: int) -> CalibrationSet:
    """Dedup, select and preprocess `frames` into a temp folder under `work_dir` (not yet swapped in)."""
    if not frames:
        raise CalibrationError(f"calibration set '{name}': no frames in {source_dir}; add frames")
    hashes, descs, sizes = _scan(frames, p)
    kept, dropped = dedup(hashes, p.dedup_hamming)
    if len(kept) < p.size:
        raise CalibrationError(
            f"calibration set '{name}': only {len(kept)} distinct frames in {source_dir} ({len(frames)} candidates, "
            f"{len(dropped)} near-duplicates dropped) but calibrate.size is {p.size}; lower calibrate.size or "
            "add frames (camera.synthetic.scenes_per_camera, or collect more with `fab collect-frames`)"
        )
    order = farthest_point_order(descs[kept], p.size)
    rank = {kept[j]: r for r, j in enumerate(order)}
    selected = sorted(rank)  # tensors in file order; the manifest records each frame's pick rank
    boxed = [preprocess.letterbox(decode_image(frames[i].path), p.imgsz)[0] for i in selected]
    tensors = preprocess.to_tensor(boxed)

    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=work_dir))
    try:
        manifest = _write_set(tmp, name, frames, source_dir, selected, rank, sizes, dropped, tensors, p, seed)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"calibrate: {name}: {len(frames)} candidates, {len(dropped)} near-duplicates dropped, "
          f"{len(selected)} selected -> {tuple(tensors.shape)}", flush=True)
    return CalibrationSet(name, tmp, manifest)


def _write_set(tmp: Path, name: str, frames: list[Frame], source_dir: Path, selected: list[int], rank: dict[int, int],
               sizes: list[tuple[int, int]], dropped: list[tuple[int, int, int]], tensors: np.ndarray,
               p: CalibrateParams, seed: int) -> dict[str, Any]:
    """Write tensors.npy and manifest.json into the set's temp folder; return the manifest."""
    buf = io.BytesIO()
    np.save(buf, tensors, allow_pickle=False)
    atomic_write_bytes(tmp / paths.CALIBRATION_TENSORS, buf.getvalue())
    manifest: dict[str, Any] = {
        "set": name,
        "source_dir": source_dir.as_posix(),
        "imgsz": p.imgsz,
        "tensors": {
            "file": paths.CALIBRATION_TENSORS,
            "shape": list(tensors.shape),
            "dtype": str(tensors.dtype),
            "layout": "NCHW, RGB, float32 in [0, 1], letterboxed (pad 114)",
            "sha256": sha256_file(tmp / paths.CALIBRATION_TENSORS),
        },
        "preprocess": {
            "module": PREPROCESS_MODULE,
            "functions": ["letterbox", "to_tensor"],
            "pad_value": preprocess.PAD_VALUE,
        },
        "selection": {
            "method": SELECTION_METHOD,
            "dedup": "DCT pHash; a frame within dedup_hamming bits of an earlier kept frame is dropped",
            "descriptor": "grey thumb_size^2 thumbnail / thumb_size + hist_weight * hist_bins-per-channel histogram",
            "start": "frame nearest the descriptor mean; then farthest from the chosen, ties to the lowest index",
            "params": p.model_dump(),
            "seed": seed,
        },
        "counts": {
            "candidates": len(frames),
            "duplicates_dropped": len(dropped),
            "distinct": len(frames) - len(dropped),
            "selected": len(selected),
        },
        "frames": [
            {"path": frames[i].rel, "sha256": sha256_file(frames[i].path), "group": frames[i].group,
             "width": sizes[i][1], "height": sizes[i][0], "pick_rank": rank[i]}
            for i in selected
        ],
        "duplicates": [
            {"path": frames[i].rel, "duplicate_of": frames[j].rel, "hamming": d} for i, j, d in dropped
        ],
        "groups": {g: sum(1 for i in selected if frames[i].group == g) for g in sorted({f.group for f in frames})},
        "stats": tensor_stats(tensors),
    }
    atomic_write_json(tmp / paths.CALIBRATION_MANIFEST, manifest)
    return manifest


# ------------------------------------------------------------------------------------------
# The stage
# ------------------------------------------------------------------------------------------


def build_calibration_sets(frames_dir: Path, dataset_dir: Path, outs: dict[str, Path], p: CalibrateParams,
                           export: ExportParams, base: BaseParams) -> dict[str, dict[str, Any]]:
    """Build every set in `outs` (name -> folder: `camera`, `train`); all or nothing.

    Returns each set's manifest.
    """
    check_imgsz(p, export)
    sources = {
        "camera": (frames_dir / "frames", lambda: list_camera_frames(frames_dir / "frames")),
        "train": (dataset_dir, lambda: list_train_images(dataset_dir)),
    }
    unknown = sorted(set(outs) - set(sources))
    if unknown:
        raise CalibrationError(f"unknown calibration set '{unknown[0]}'; the sets are {', '.join(sources)}")
    built: list[tuple[CalibrationSet, Path]] = []
    try:
        for name, out in outs.items():
            source_dir, lister = sources[name]
            out.parent.mkdir(parents=True, exist_ok=True)
            built.append((build_calibration_set(name, lister(), source_dir, out.parent, p, base.seed), out))
        for cs, out in built:
            _swap_in(cs.tmp_dir, out)
    finally:
        for cs, _ in built:
            shutil.rmtree(cs.tmp_dir, ignore_errors=True)  # no-op for the ones swapped in
    return {cs.name: cs.manifest for cs, _ in built}


def _swap_in(tmp: Path, target: Path) -> None:
    """Replace folder `target` with the finished `tmp` folder (a rename on one file system)."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def calibrate_metrics(manifests: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """reports/calibrate/metrics.json: per-set counts and stats, and camera-minus-train differences."""
    out: dict[str, Any] = {
        name: {**m["counts"], **{k: m["stats"][k] for k in ("channel_mean_rgb", "channel_std_rgb", "brightness_mean")}}
        for name, m in manifests.items()
    }
    if "camera" in manifests and "train" in manifests:
        cam, tr = manifests["camera"]["stats"], manifests["train"]["stats"]
        out["camera_minus_train"] = {
            "brightness_mean": round(cam["brightness_mean"] - tr["brightness_mean"], 6),
            "channel_mean_rgb": [round(a - b, 6) for a, b in zip(cam["channel_mean_rgb"], tr["channel_mean_rgb"])],
            "channel_std_rgb": [round(a - b, 6) for a, b in zip(cam["channel_std_rgb"], tr["channel_std_rgb"])],
        }
    return out


parse_args = stage_cli(
    "calibrate", __doc__,
    frames=(paths.CAMERA_FRAMES_DIR, "the camera stage's output (its frames/ folder is the camera set's source)"),
    dataset=(paths.DATASET_DIR, "the training dataset (images/train is the train set's source)"),
    camera_out=paths.CALIBRATION_CAMERA,
    train_out=paths.CALIBRATION_TRAIN,
    metrics=paths.CALIBRATE_METRICS,
)


def main(argv: list[str] | None = None) -> None:
    """Run the stage: build both calibration sets, write metrics, log one MLflow run."""
    args = parse_args(argv)
    base, p, export = stage_params(args, "base", "calibrate", "export")
    with stage_run("calibrate", base, p, tags=lineage_tags(camera_frames=args.frames, dataset=args.dataset)):
        manifests = build_calibration_sets(args.frames, args.dataset,
                                           {"camera": args.camera_out, "train": args.train_out}, p, export, base)
        metrics = calibrate_metrics(manifests)
        atomic_write_json(args.metrics, metrics)
        flat: dict[str, Any] = {}
        for name, m in manifests.items():
            flat.update({f"{name}.{k}": v for k, v in m["counts"].items()})
            flat[f"{name}.brightness_mean"] = m["stats"]["brightness_mean"]
        if "camera_minus_train" in metrics:
            flat["camera_minus_train.brightness_mean"] = metrics["camera_minus_train"]["brightness_mean"]
        log_metrics(flat)
        set_tags(lineage_tags(calibration_camera=args.camera_out, calibration_train=args.train_out))


if __name__ == "__main__":
    sys.exit(run_stage(main))
