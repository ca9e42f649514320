"""Stage `camera`: deployment-camera frames -> data/camera_frames/ (frames/<camera-id>/ + labelled/).

INT8 calibration should see what the deployed camera sees, not the training images. This stage
produces those frames from one of two sources (`camera.source`):

- `synthetic` (the embedded default): scenes from the defect generator (`pipeline/imagesets/synthetic.py`,
  in a seed space of their own, so no frame is a training image) seen through camera models the
  training set does not have: exposure, white-balance cast, motion or defocus blur, vignetting,
  shot + read noise, JPEG quality and a non-square sensor size. Each scene is delivered as a
  burst of near-identical frames, as a streaming camera does, so `calibrate`'s deduplication has
  real work to do.
- `ingest`: real frames from `camera.ingest_dir/<camera-id>/` (images, or video files sampled at
  `camera.video_fps`), e.g. pulled from the fleet by `fab collect-frames`.

Output:
  frames/<camera-id>/*     unlabelled frames (calibration candidates); one size per camera
  labelled/                YOLO layout, split `val` only, dataset.yaml with the training class
                           names: the camera-domain split `evaluate` measures accuracy on
                           (synthetic: always; ingest: only when `camera.ingest_labelled_dir` is set)

Everything is built in a temp folder beside the output and swapped in with `os.replace`, so an
error (a corrupt frame, mixed sizes, an empty folder) leaves the previous output untouched.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
import yaml

from edge_runtime.fileio import atomic_write_json
from pipeline.config import paths
from pipeline.config.params import BaseParams, CameraModelParams, CameraParams, DataParams
from pipeline.config.stage_cli import run_stage, stage_cli, stage_params
from pipeline.imagesets import near_duplicates
from pipeline.imagesets.camera_model import camera_frame, encode_jpeg
from pipeline.imagesets.synthetic import CLASS_NAMES, GeneratorConfig, image_rng, render_image
from pipeline.imagesets.yolo import (
    IMAGE_SUFFIXES,
    DatasetError,
    decode_image,
    follow_link,
    format_label,
    import_yolo,
    validate_class_names,
    validate_label_text,
)
from pipeline.tracking.mlflow_runs import lineage_tags, log_metrics, set_tags, stage_run

VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".m4v", ".webm")
FRAMES_SUBDIR = "frames"
LABELLED_SUBDIR = "labelled"
LABELLED_SPLIT = "val"  # the camera evaluation split
LABELLED_TRAIN_SPLIT = "train"  # labelled camera frames of other scenes, for train.camera_frames


# ------------------------------------------------------------------------------------------
# Frame statistics (the metrics that show the camera domain differs from the training set)
# ------------------------------------------------------------------------------------------


@dataclass
class FrameStats:
    """Running per-camera statistics: size, brightness and per-channel colour (BGR)."""

    frames: int = 0
    width: int = 0
    height: int = 0
    _pixels: int = 0
    _sum: np.ndarray = field(default_factory=lambda: np.zeros(3))
    _sumsq: np.ndarray = field(default_factory=lambda: np.zeros(3))
    _gray_sum: float = 0.0
    _gray_sumsq: float = 0.0

    def add(self, img: np.ndarray) -> None:
        """Accumulate one BGR uint8 frame."""
        h, w = img.shape[:2]
        self.frames += 1
        self.width, self.height = w, h
        px = img.reshape(-1, 3).astype(np.float64)
        self._pixels += px.shape[0]
        self._sum += px.sum(0)
        self._sumsq += (px**2).sum(0)
        gray = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY).astype(np.float64)
        self._gray_sum += float(gray.sum())
        self._gray_sumsq += float((gray**2).sum())

    def as_metrics(self) -> dict[str, object]:
        """Means and standard deviations over every pixel of every frame (0-255 scale)."""
        n = max(self._pixels, 1)
        mean = self._sum / n
        std = np.sqrt(np.maximum(self._sumsq / n - mean**2, 0))
        g_mean = self._gray_sum / n
        g_std = float(np.sqrt(max(self._gray_sumsq / n - g_mean**2, 0.0)))
        return {
            "frames": self.frames,
            "width": self.width,
            "height": self.height,
            "brightness_mean": round(g_mean, 4),
            "brightness_std": round(g_std, 4),
            "channel_mean_bgr": [round(float(v), 4) for v in mean],
            "channel_std_bgr": [round(float(v), 4) for v in std],
        }


def scene_settings(rng: np.random.Generator, cam: CameraModelParams, exposure_jitter: float,
                    wb_jitter: float) -> tuple[float, np.ndarray]:
    """This scene's exposure and white balance: the camera's own, jittered (auto-exposure, lamps)."""
    exposure = cam.exposure * (1.0 + rng.uniform(-exposure_jitter, exposure_jitter))
    wb = np.asarray(cam.wb_gains, np.float64) * (1.0 + rng.uniform(-wb_jitter, wb_jitter, 3))
    return float(exposure), wb


# ------------------------------------------------------------------------------------------
# Sources
# ------------------------------------------------------------------------------------------


@dataclass
class CameraResult:
    """What the stage wrote: per-camera frame stats and the labelled split's size."""

    out: Path
    source: str
    cameras: dict[str, FrameStats]
    labelled_images: int
    labelled_instances: int
    labelled_train_images: int = 0  # the `train` split kept for train.camera_frames

    def as_metrics(self) -> dict[str, object]:
        """The metrics document (reports/camera/metrics.json)."""
        return {
            "source": self.source,
            "cameras": {cid: s.as_metrics() for cid, s in sorted(self.cameras.items())},
            "frames_total": sum(s.frames for s in self.cameras.values()),
            "labelled_images": self.labelled_images,
            "labelled_instances": self.labelled_instances,
            "labelled_train_images": self.labelled_train_images,
        }


def generator_config(data: DataParams) -> GeneratorConfig:
    """The defect generator with the training set's knobs: only the camera differs."""
    s = data.synthetic
    return GeneratorConfig(s.image_size, s.max_defects, s.empty_fraction, s.small_fraction,
                           s.min_contrast, s.max_contrast, s.clutter)


def synthesize_frames(frames_dir: Path, p: CameraParams, cfg: GeneratorConfig, seed: int) -> dict[str, FrameStats]:
    """Write bursts of synthetic camera frames to `frames_dir/<camera-id>/`; deterministic from `seed`."""
    s = p.synthetic
    stats: dict[str, FrameStats] = {}
    for cam in s.cameras:
        cam_dir = frames_dir / cam.id
        cam_dir.mkdir(parents=True)
        st = stats.setdefault(cam.id, FrameStats())
        for scene_index in range(s.scenes_per_camera):
            # Own seed space ("camera/<id>"), so no scene is a training/val/test image.
            rng = image_rng(seed, f"camera/{cam.id}", scene_index)
            scene, _ = render_image(rng, cfg)
            exposure, wb = scene_settings(rng, cam, s.exposure_jitter, s.wb_jitter)
            for k in range(s.burst_length):
                shift = (0.0, 0.0) if k == 0 else tuple(
                    float(v) for v in rng.uniform(-s.burst_shift_px, s.burst_shift_px, 2)
                )
                img = camera_frame(scene, cam, rng, exposure, wb, shift)  # type: ignore[arg-type]
                data = encode_jpeg(img, cam.jpeg_quality)
                (cam_dir / f"{scene_index:05d}_{k:02d}.jpg").write_bytes(data)
                st.add(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR))
        print(f"camera: {cam.id}: {s.scenes_per_camera} scenes x {s.burst_length} frames "
              f"at {cam.width}x{cam.height}", flush=True)
    return stats


def synthesize_labelled(labelled_dir: Path, p: CameraParams, cfg: GeneratorConfig, seed: int,
                        class_names: tuple[str, ...]) -> tuple[int, int]:
    """Write the labelled camera-domain splits (cameras round-robin); return the val split's (images, instances).

    `val` is the evaluation split; `train` (`labelled_train_images`, seed space of its own, so
    no scene is in both) is what `train.camera_frames` fine-tunes on.
    """
    s = p.synthetic
    writer = _LabelledWriter(labelled_dir, class_names)
    for split, space, count in ((LABELLED_SPLIT, "camera-labelled", s.labelled_images),
                                (LABELLED_TRAIN_SPLIT, "camera-labelled-train", s.labelled_train_images)):
        for i in range(count):
            cam = s.cameras[i % len(s.cameras)]
            rng = image_rng(seed, space, i)
            scene, boxes = render_image(rng, cfg)
            exposure, wb = scene_settings(rng, cam, s.exposure_jitter, s.wb_jitter)
            img = camera_frame(scene, cam, rng, exposure, wb, (0.0, 0.0))
            labels = [b.yolo(cfg.image_size, cfg.image_size) for b in boxes]  # normalised: resize-invariant
            writer.add(f"{cam.id}_{i:05d}", encode_jpeg(img, cam.jpeg_quality), ".jpg", labels, split)
    return writer.finish()


class _LabelledWriter:
    """A YOLO folder with the evaluation split `val` and, when frames are kept for fine-tuning,
    `train`. DatasetWriter insists on a train split; this one does not, and it writes into the
    stage's temp folder (the whole output is swapped at once)."""

    def __init__(self, root: Path, class_names: tuple[str, ...]) -> None:
        self.root, self.class_names = root, class_names
        self.images, self.instances = 0, 0  # the evaluation split's
        self.train_images = 0
        (root / "images" / LABELLED_SPLIT).mkdir(parents=True)
        (root / "labels" / LABELLED_SPLIT).mkdir(parents=True)

    def add(self, name: str, image_bytes: bytes, suffix: str,
            labels: list[tuple[int, float, float, float, float]]
            | tuple[tuple[int, float, float, float, float], ...], split: str = LABELLED_SPLIT) -> None:
        """Add one image and its labels to `split`; the label text is re-validated as any import would be."""
        (self.root / "images" / split).mkdir(parents=True, exist_ok=True)
        (self.root / "labels" / split).mkdir(parents=True, exist_ok=True)
        image_path = self.root / "images" / split / f"{name}{suffix.lower()}"
        if image_path.exists():
            raise DatasetError(f"two labelled camera images named '{name}'; rename one")
        text = format_label(labels)
        label_path = self.root / "labels" / split / f"{name}.txt"
        validate_label_text(text, label_path, len(self.class_names))
        image_path.write_bytes(image_bytes)
        label_path.write_text(text)
        if split == LABELLED_SPLIT:
            self.images += 1
            self.instances += len(labels)
        else:
            self.train_images += 1

    def finish(self) -> tuple[int, int]:
        """Write dataset.yaml; return the evaluation split's (images, instances)."""
        # Ultralytics refuses a data YAML without `train:`; pointing it at the val images keeps
        # `model.val(data=...)` working when there is no train split. `train` (the stage) adds
        # images/train to its training set only with train.camera_frames on, after checking
        # that none of them is a near-duplicate of a val frame.
        train = LABELLED_TRAIN_SPLIT if self.train_images else LABELLED_SPLIT
        doc = {"train": f"images/{train}", "val": f"images/{LABELLED_SPLIT}",
               "nc": len(self.class_names), "names": dict(enumerate(self.class_names))}
        header = ("# Camera-domain splits (pipeline/stages/camera.py): evaluate on `val` only; `train` is for "
                  "train.camera_frames.\n")
        (self.root / "dataset.yaml").write_text(header + yaml.safe_dump(doc, sort_keys=False))
        return self.images, self.instances


def _media_files(cam_dir: Path, root_real: Path) -> tuple[list[Path], list[Path]]:
    """Sorted (images, videos) in one camera folder; any other file is an error naming it.

    A symlink is followed only to a file inside the ingest folder `root_real` (`follow_link`): a
    dangling one or one leading out is an error, never a frame that silently goes missing.
    """
    images, videos = [], []
    for f in sorted(cam_dir.iterdir()):
        if f.name.startswith("."):
            continue  # .gitkeep, editor/OS droppings, partial downloads
        if f.is_symlink():
            follow_link(f, root_real)
        suffix = f.suffix.lower()
        if f.is_dir():
            raise DatasetError(f"{f}: a folder inside camera folder {cam_dir}; put frames directly in "
                               f"{cam_dir}/ (one folder per camera, no nesting)")
        if suffix in IMAGE_SUFFIXES:
            images.append(f)
        elif suffix in VIDEO_SUFFIXES:
            videos.append(f)
        else:
            raise DatasetError(f"{f}: not an image ({', '.join(IMAGE_SUFFIXES)}) or video "
                               f"({', '.join(VIDEO_SUFFIXES)}); remove it from {cam_dir}/")
    return images, videos


def sample_video(video: Path, fps: float) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (frame index, BGR frame) from `video` at `fps` frames per second of video time."""
    cap = cv2.VideoCapture(str(video))
    try:
        if not cap.isOpened():
            raise DatasetError(f"video {video}: OpenCV cannot open it (corrupt or unsupported codec); "
                               "re-encode it (e.g. ffmpeg -i in -c:v mjpeg out.avi) or extract frames as images")
        native = cap.get(cv2.CAP_PROP_FPS)
        if not native or not np.isfinite(native) or native <= 0:
            raise DatasetError(f"video {video}: no frame rate in the file, so camera.video_fps cannot be applied; "
                               "re-encode it with a frame rate or extract frames as images")
        index, taken, next_time = 0, 0, 0.0
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            # Time-based sampling (not every n-th frame) so a non-integer rate ratio does not drift.
            if index / native + 1e-9 >= next_time:
                taken += 1
                next_time = taken / fps
                yield index, frame
            index += 1
        if index == 0:
            raise DatasetError(f"video {video}: no frame could be decoded (empty, corrupt or unsupported codec); "
                               "re-encode it or extract frames as images")
    finally:
        cap.release()


def ingest_frames(ingest_dir: Path, frames_dir: Path, video_fps: float) -> dict[str, FrameStats]:
    """Copy/sample `ingest_dir/<camera-id>/` into `frames_dir/<camera-id>/`, validating every frame.

    Images are copied byte for byte (no re-encoding loss); video frames are written as PNG.
    Raises DatasetError naming the file for an unreadable frame, an empty camera folder, or a
    frame whose size differs from the camera's first frame.
    """
    if not ingest_dir.is_dir():
        raise DatasetError(f"camera.ingest_dir {ingest_dir} is not a folder; pull frames with "
                           "`fab collect-frames` or set camera.source: synthetic")
    entries = sorted(e for e in ingest_dir.iterdir() if not e.name.startswith("."))
    loose = [e for e in entries if e.is_file()]
    if loose:
        raise DatasetError(f"{loose[0]}: a file directly in {ingest_dir}; frames go in one folder per camera "
                           f"({ingest_dir}/<camera-id>/), move it there")
    cameras = [e for e in entries if e.is_dir()]
    if not cameras:
        raise DatasetError(f"{ingest_dir}: no camera folders; add {ingest_dir}/<camera-id>/ with images or a video "
                           "(`fab collect-frames` does) or set camera.source: synthetic")
    stats: dict[str, FrameStats] = {}
    for cam_dir in cameras:
        images, videos = _media_files(cam_dir, ingest_dir.resolve())
        if not images and not videos:
            raise DatasetError(f"camera folder {cam_dir} is empty; add frames or delete the folder")
        out = frames_dir / cam_dir.name
        out.mkdir(parents=True)
        st = stats.setdefault(cam_dir.name, FrameStats())
        first: tuple[Path, tuple[int, int]] | None = None

        def check_size(img: np.ndarray, where: Path) -> None:
            nonlocal first
            hw = img.shape[:2]
            if first is None:
                first = (where, hw)
            elif hw != first[1]:
                raise DatasetError(
                    f"frame {where} is {hw[1]}x{hw[0]} but {first[0]} is {first[1][1]}x{first[1][0]}: a camera's "
                    f"frames must share one size; move frames of another camera/resolution to their own folder"
                )

        for f in images:
            img = decode_image(f)
            check_size(img, f)
            shutil.copyfile(f, out / f.name)
            st.add(img)
        for v in videos:
            for index, frame in sample_video(v, video_fps):
                where = Path(f"{v}#frame{index}")
                check_size(frame, where)
                ok, buf = cv2.imencode(".png", frame)
                if not ok:
                    raise RuntimeError(f"OpenCV could not encode frame {index} of {v} as PNG")
                name = f"{v.stem}_{index:06d}.png"
                if (out / name).exists():
                    raise DatasetError(f"{v}: its frame file {name} collides with an image of {cam_dir}; rename one")
                (out / name).write_bytes(buf.tobytes())
                st.add(frame)
        print(f"camera: ingested {st.frames} frames of {cam_dir.name} ({st.width}x{st.height})", flush=True)
    return stats


def ingest_labelled(src: Path, labelled_dir: Path, class_names: tuple[str, ...], train_fraction: float = 0.0,
                    seed: int = 0) -> tuple[int, int]:
    """Copy a labelled YOLO folder of camera frames into the `val` split, validated like any import.

    With `train_fraction` > 0, about that share of the frames goes to a `train` split instead,
    by whole near-duplicate groups (a burst, a scene re-encoded: `near_duplicates.groups`)
    drawn with `seed`, so no scene is on both sides.
    """
    if not src.is_dir():
        raise DatasetError(f"camera.ingest_labelled_dir {src} is not a folder; point it at a YOLO folder "
                           "(images/, labels/, data.yaml) or set it to \"\"")
    # import_yolo validates names, labels and orphans; its train/val assignment is irrelevant
    # here (every image goes to val), so the fractions passed are placeholders.
    names, samples = import_yolo(src, 0.5, 0.0, 0)
    if names != class_names:
        raise DatasetError(f"{src}: class names {list(names)} differ from the training set's {list(class_names)}; "
                           "relabel the camera frames with the training classes (same order)")
    writer = _LabelledWriter(labelled_dir, class_names)
    to_train = _train_share([s.image for s in samples], train_fraction, seed)
    for sample, train in zip(samples, to_train):
        decode_image(sample.image)
        writer.add(sample.name, sample.image.read_bytes(), sample.image.suffix, sample.labels,
                   LABELLED_TRAIN_SPLIT if train else LABELLED_SPLIT)
    return writer.finish()


def _train_share(images: list[Path], fraction: float, seed: int) -> list[bool]:
    """Per image: True for the train split. Whole near-duplicate groups, seeded, about `fraction` of them."""
    if fraction <= 0 or not images:
        return [False] * len(images)
    group = near_duplicates.groups(near_duplicates.hashes_of(images), near_duplicates.SAME_SCENE_BITS)
    n_groups = max(group) + 1
    order = np.random.default_rng(seed).permutation(n_groups)
    chosen = set(order[: int(round(fraction * n_groups))].tolist())
    if len(chosen) == n_groups:  # keep an evaluation split
        chosen.discard(int(order[-1]))
    return [g in chosen for g in group]


def read_class_names(dataset_yaml: Path) -> tuple[str, ...]:
    """The training set's class names, from its dataset.yaml (written by stage `data`)."""
    if not dataset_yaml.is_file():
        raise DatasetError(f"{dataset_yaml} not found; run the data stage first (dvc repro data)")
    doc = yaml.safe_load(dataset_yaml.read_text()) or {}
    names = doc.get("names")
    if isinstance(names, dict):
        names = [names[k] for k in sorted(names)]
    if not isinstance(names, list):
        raise DatasetError(f"{dataset_yaml}: no 'names' list; rebuild it with the data stage")
    return validate_class_names(names, dataset_yaml)


# ------------------------------------------------------------------------------------------
# The stage
# ------------------------------------------------------------------------------------------


def build_camera_frames(out: Path, dataset_yaml: Path, p: CameraParams, data: DataParams,
                        base: BaseParams) -> CameraResult:
    """Build `out` (frames/ + labelled/) from the source in `p`; all-or-nothing (temp folder swap)."""
    class_names = read_class_names(dataset_yaml)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        frames_dir = tmp / FRAMES_SUBDIR
        frames_dir.mkdir()
        if p.source == "synthetic":
            if class_names != CLASS_NAMES:
                raise DatasetError(
                    f"{dataset_yaml}: the training classes {list(class_names)} are not the synthetic generator's "
                    f"{list(CLASS_NAMES)}, so synthetic camera frames cannot be labelled for them; set "
                    "camera.source: ingest with camera frames (and camera.ingest_labelled_dir) of your classes"
                )
            cfg = generator_config(data)
            stats = synthesize_frames(frames_dir, p, cfg, base.seed)
            n_img, n_inst = synthesize_labelled(tmp / LABELLED_SUBDIR, p, cfg, base.seed, class_names)
        else:
            stats = ingest_frames(Path(p.ingest_dir), frames_dir, p.video_fps)
            n_img = n_inst = 0
            if p.ingest_labelled_dir:
                n_img, n_inst = ingest_labelled(Path(p.ingest_labelled_dir), tmp / LABELLED_SUBDIR, class_names,
                                                p.labelled_train_fraction, base.seed)
        train_dir = tmp / LABELLED_SUBDIR / "images" / LABELLED_TRAIN_SPLIT
        n_train = sum(1 for _ in train_dir.iterdir()) if train_dir.is_dir() else 0
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return CameraResult(out, p.source, stats, n_img, n_inst, n_train)


def _swap_in(tmp: Path, target: Path) -> None:
    """Replace `target` with the finished `tmp` folder (same file system, so the swap is a rename)."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


parse_args = stage_cli(
    "camera", __doc__,
    dataset_yaml=(paths.DATASET_YAML, "the training set's dataset.yaml (class names for the labelled split)"),
    out=paths.CAMERA_FRAMES_DIR,
    metrics=paths.CAMERA_METRICS,
)


def main(argv: list[str] | None = None) -> None:
    """Run the stage: build the camera frames, write per-camera stats as DVC metrics, log to MLflow."""
    args = parse_args(argv)
    base, data, p = stage_params(args, "base", "data", "camera")
    tags = {"camera_source": p.source, **lineage_tags(dataset=args.dataset_yaml.parent)}
    with stage_run("camera", base, p, tags=tags):
        result = build_camera_frames(args.out, args.dataset_yaml, p, data, base)
        metrics = result.as_metrics()
        atomic_write_json(args.metrics, metrics)
        flat: dict[str, object] = {"frames_total": metrics["frames_total"], "labelled_images": result.labelled_images}
        for cid, st in result.cameras.items():
            m = st.as_metrics()
            flat[f"{cid}.brightness_mean"] = m["brightness_mean"]
            flat[f"{cid}.brightness_std"] = m["brightness_std"]
        log_metrics(flat)  # type: ignore[arg-type]
        set_tags(lineage_tags(camera_frames=args.out))


if __name__ == "__main__":
    sys.exit(run_stage(main))
