"""Stage `camera_profile`: camera frames -> reports/camera_profile/profiles.json (a camera model per camera).

For each camera folder `data/camera_frames/frames/<camera-id>/` (written by stage `camera`:
synthetic frames, or real frames ingested from the fleet), estimate how that camera makes images
look, from its frames alone, relative to the training images (`data/defects/images/train`, the
reference look: the camera sees the same kind of product). The camera stage's own settings are
never read: the same estimates come out of real frames.

Per camera, `camera_profile.frames_per_camera` frames are sampled evenly (sorted names) and
compared with `camera_profile.reference_images` training images (pipeline/imagesets/camera_estimates.py):

  estimates   raw outputs of standard estimators, named with their units: size, JPEG quality from
              the quantization tables, brightness / contrast / grey-world ratios, channel gains and
              vignetting, wavelet noise sigma and its curve over grey level, blur_effect per axis,
              variance of the Laplacian, fit diagnostics;
  model       a renderable camera model (the fields `camera_model.camera_frame` reads: width, height,
              exposure, wb_gains [B, G, R], shot_noise, read_noise, blur, blur_px, vignetting, and
              jpeg_quality, null for lossless frames), fitted by analysis by synthesis: training
              images rendered through candidate models must give the camera's estimator outputs.

Train's camera-matched augmentation renders training images through these models. The file is
written once, at the end, with an atomic rename: a failure leaves the previous one untouched.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from edge_runtime.fileio import atomic_write_json
from pipeline.config import paths
from pipeline.config.params import BaseParams, CameraProfileParams
from pipeline.config.stage_cli import run_stage, stage_cli, stage_params
from pipeline.imagesets import camera_estimates as ce
from pipeline.imagesets.yolo import IMAGE_SUFFIXES, DatasetError, decode_image
from pipeline.tracking.mlflow_runs import lineage_tags, log_metrics, set_tags, stage_run

FRAMES_SUBDIR = "frames"  # inside the camera stage's output
TRAIN_IMAGES = Path("images") / "train"  # inside the dataset


def _images_in(folder: Path) -> list[Path]:
    """The image files directly in `folder`, sorted (hidden files left out)."""
    return sorted(f for f in folder.iterdir()
                  if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in IMAGE_SUFFIXES)


def camera_folders(frames_dir: Path) -> dict[str, list[Path]]:
    """{camera id: its frame files (sorted)} under `frames_dir` (the camera stage's frames/ folder)."""
    if not frames_dir.is_dir():
        raise DatasetError(f"camera frames folder {frames_dir} not found; "
                           "run the camera stage first (dvc repro camera)")
    folders = sorted(d for d in frames_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not folders:
        raise DatasetError(f"{frames_dir}: no camera folders (<camera-id>/); run the camera stage first "
                           "(dvc repro camera) and check camera.source and camera.ingest_dir")
    cameras = {}
    for folder in folders:
        frames = _images_in(folder)
        if not frames:
            raise DatasetError(f"camera folder {folder} holds no frames ({', '.join(IMAGE_SUFFIXES)}); add frames, "
                               "remove the folder, or re-run the camera stage (dvc repro camera)")
        cameras[folder.name] = frames
    return cameras


def reference_images(dataset_dir: Path, count: int) -> tuple[list[Path], int]:
    """`count` training images of the dataset at `dataset_dir`, evenly spaced in sorted order, and
    how many there are."""
    folder = dataset_dir / TRAIN_IMAGES
    if not folder.is_dir():
        raise DatasetError(f"{folder} not found; run the data stage first (dvc repro data)")
    images = sorted(f for f in folder.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise DatasetError(f"{folder} holds no images; rebuild the dataset (dvc repro data)")
    return [images[i] for i in ce.sample_evenly(len(images), count)], len(images)


def build_profiles(frames_dir: Path, dataset_dir: Path, p: CameraProfileParams, base: BaseParams) -> dict[str, Any]:
    """The profiles document for every camera under `frames_dir/frames/` (nothing is written here).

    Raises DatasetError naming the folder or file for a missing or empty folder, an unreadable
    frame or frames of different sizes within one camera.
    """
    cameras = camera_folders(frames_dir / FRAMES_SUBDIR)
    ref_files, ref_total = reference_images(dataset_dir, p.reference_images)
    reference = ce.reference_set([decode_image(f) for f in ref_files])
    doc: dict[str, Any] = {
        "reference": {"source": (dataset_dir / TRAIN_IMAGES).as_posix(), "available": ref_total,
                      "jpeg_quality_ijg": ce.mode([ce.jpeg_quality(f)[0] for f in ref_files]),
                      **ce.rounded(reference.stats)},
        "cameras": {},
    }
    for cid, files in cameras.items():
        started = time.monotonic()
        sample = [files[i] for i in ce.sample_evenly(len(files), p.frames_per_camera)]
        frames = [decode_image(f) for f in sample]  # DatasetError naming the file when unreadable
        ce.frame_size(frames, sample)
        jpeg = [ce.jpeg_quality(f) for f in sample]
        try:
            profile = ce.estimate_camera(frames, jpeg, reference, p.render_images, p.max_blur_px, p.grid_cells,
                                         ce.camera_seed(base.seed, cid))
        except ValueError as e:
            raise DatasetError(f"camera folder {files[0].parent}: {e}") from None
        entry = profile.as_dict()
        entry["estimates"]["frames_in_folder"] = len(files)
        doc["cameras"][cid] = entry
        m = entry["model"]
        print(f"camera_profile: {cid}: {len(frames)} of {len(files)} frames, {m['width']}x{m['height']}, "
              f"exposure {m['exposure']}, wb {m['wb_gains']}, noise {m['shot_noise']}/{m['read_noise']}, "
              f"blur {m['blur']} {m['blur_px']} px, vignetting {m['vignetting']}, JPEG {m['jpeg_quality']} "
              f"({time.monotonic() - started:.1f} s)", flush=True)
    return doc


def flat_metrics(doc: dict[str, Any]) -> dict[str, float]:
    """The few numbers logged to MLflow per camera: noise, blur, exposure, vignetting, JPEG quality."""
    flat: dict[str, float] = {"cameras": len(doc["cameras"])}
    for cid, entry in doc["cameras"].items():
        m, e = entry["model"], entry["estimates"]
        flat[f"{cid}.noise_sigma_wavelet"] = e["noise_sigma_wavelet"]
        flat[f"{cid}.noise_sigma_at_128"] = e["noise_sigma_at_128"]
        flat[f"{cid}.blur_px"] = m["blur_px"]
        flat[f"{cid}.exposure"] = m["exposure"]
        flat[f"{cid}.vignetting"] = m["vignetting"]
        if m["jpeg_quality"] is not None:
            flat[f"{cid}.jpeg_quality"] = m["jpeg_quality"]
    return flat


parse_args = stage_cli(
    "camera_profile", __doc__,
    frames=(paths.CAMERA_FRAMES_DIR, "the camera stage's output (its frames/<camera-id>/ folders are profiled)"),
    dataset=(paths.DATASET_DIR, "the training dataset (images/train is the reference look)"),
    out=paths.CAMERA_PROFILES,
)


def main(argv: list[str] | None = None) -> None:
    """Run the stage: profile every camera, write profiles.json, log one MLflow run."""
    args = parse_args(argv)
    base, p = stage_params(args, "base", "camera_profile")
    with stage_run("camera_profile", base, p, tags=lineage_tags(camera_frames=args.frames, dataset=args.dataset)):
        doc = build_profiles(args.frames, args.dataset, p, base)
        atomic_write_json(args.out, doc)
        log_metrics(flat_metrics(doc))
        set_tags(lineage_tags(camera_profiles=args.out))


if __name__ == "__main__":
    sys.exit(run_stage(main))
