r"""Where the camera-domain accuracy goes: one model scored on the camera split's scenes, effect by effect.

The labelled camera split (stage `camera`, synthetic source) is scenes from the defect
generator seen through the deployment cameras. This script re-renders the same scenes (same
seeds, same boxes) with the camera model switched off one part at a time, and scores each
model (FP32 ONNX, the device's pre/post-processing, Ultralytics-compatible mAP) on:

- `val`: the training domain's val split (data/defects);
- `scenes`: the scenes as the generator draws them (256 px square, no camera);
- `geometry`: the scenes stretched to each camera's sensor size, nothing else (the letterbox then
  shrinks them: 320x240 -> 256x192, 416x240 -> 256x148);
- `geometry+<effect>`: geometry plus one photometric effect (exposure and white balance, blur,
  vignetting, noise, JPEG);
- `camera`: everything, which is the labelled camera split itself (checked byte for byte
  against data/camera_frames/labelled for the first images).

The difference between `scenes` and `camera` is the gap; `geometry` bounds what any
photometric matching can recover. Run after `dvc repro camera` (synthetic camera source):

    python benchmarks/camera_gap.py --model base=models/yolov8n.onnx [--model other=path.onnx|.pt ...] \
        [--images 600] [--out reports/benchmarks/camera_gap.md]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("YOLO_OFFLINE", "1")

from edge_runtime.fileio import atomic_write_text  # noqa: E402
from pipeline.accuracy.mean_ap import Labelled, accuracy_from_stats, image_stats, load_split, onnx_session  # noqa: E402
from pipeline.config import paths  # noqa: E402
from pipeline.config.params import CameraModelParams, ParamsFile, load_all  # noqa: E402
from pipeline.imagesets.camera_model import camera_frame, decode_jpeg, encode_jpeg  # noqa: E402
from pipeline.imagesets.synthetic import CLASS_NAMES, image_rng, render_image  # noqa: E402
from pipeline.stages.camera import generator_config, scene_settings  # noqa: E402

# Each variant: which parts of the camera model stay on.
PARTS = ("geometry", "exposure", "blur", "vignetting", "noise", "jpeg")
VARIANTS: dict[str, tuple[str, ...]] = {
    "scenes": (),
    "geometry": ("geometry",),
    "geometry+exposure/wb": ("geometry", "exposure"),
    "geometry+blur": ("geometry", "blur"),
    "geometry+vignetting": ("geometry", "vignetting"),
    "geometry+noise": ("geometry", "noise"),
    "geometry+jpeg": ("geometry", "jpeg"),
    "camera": PARTS,
}


def _partial(cam: CameraModelParams, on: tuple[str, ...]) -> CameraModelParams:
    """`cam` with the parts not in `on` switched off."""
    changes: dict[str, Any] = {}
    if "blur" not in on:
        changes.update(blur="none", blur_px=0.0)
    if "vignetting" not in on:
        changes["vignetting"] = 0.0
    if "noise" not in on:
        changes.update(shot_noise=0.0, read_noise=0.0)
    return cam.replace(**changes) if changes else cam


def camera_scenes(on: tuple[str, ...], count: int,
                  pf: ParamsFile) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(BGR image, xyxy boxes in its pixels, classes) of the first `count` labelled camera scenes,
    rendered with only the camera parts in `on`. All parts on reproduces the camera stage's split."""
    s, cfg = pf.camera.synthetic, generator_config(pf.data)
    for i in range(count):
        cam = s.cameras[i % len(s.cameras)]
        rng = image_rng(pf.base.seed, "camera-labelled", i)  # the camera stage's own seed space
        scene, boxes = render_image(rng, cfg)
        exposure, wb = scene_settings(rng, cam, s.exposure_jitter, s.wb_jitter)
        if not on:
            img = scene
        else:
            model = _partial(cam, on)
            if "exposure" not in on:
                exposure, wb = 1.0, np.ones(3)
            img = camera_frame(scene, model, rng, exposure, wb, (0.0, 0.0))  # always at the sensor size
            if "jpeg" in on:
                img = decode_jpeg(encode_jpeg(img, cam.jpeg_quality))
        h, w = img.shape[:2]
        rows = np.array([b.yolo(cfg.image_size, cfg.image_size) for b in boxes], np.float64).reshape(-1, 5)
        yolo = rows[:, 1:]
        xyxy = np.stack([(yolo[:, 0] - yolo[:, 2] / 2) * w, (yolo[:, 1] - yolo[:, 3] / 2) * h,
                         (yolo[:, 0] + yolo[:, 2] / 2) * w, (yolo[:, 1] + yolo[:, 3] / 2) * h], 1)
        classes = rows[:, 0].astype(np.int64)
        yield img, xyxy, classes


def check_against_split(labelled: Path, pf: ParamsFile, n: int = 6) -> None:
    """The all-parts render must equal the camera stage's labelled frames (else the variants mean nothing)."""
    files = sorted((labelled / "images" / "val").glob("*.jpg"))[:n]
    by_index = {int(f.stem.rsplit("_", 1)[1]): f for f in files}
    for i, (img, _, _) in enumerate(camera_scenes(PARTS, max(by_index) + 1, pf)):
        if i in by_index:
            ref = decode_jpeg(by_index[i].read_bytes())
            if not np.array_equal(ref, img):
                raise SystemExit(f"re-rendered scene {i} differs from {by_index[i]}: the camera split was built with "
                                 "other params than these; re-run `dvc repro camera`")


def model_path(spec: str, work: Path, imgsz: int, opset: int) -> tuple[str, Path]:
    """`name=path`: an ONNX file as is, or .pt weights exported to ONNX at `imgsz` in `work`."""
    name, _, path = spec.partition("=")
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"--model {spec}: {p} not found")
    if p.suffix == ".onnx":
        return name, p
    from pipeline.config.ultralytics_env import import_ultralytics

    local = work / f"{name}.pt"
    shutil.copyfile(p, local)
    yolo = import_ultralytics(work).YOLO
    return name, Path(yolo(str(local)).export(format="onnx", imgsz=imgsz, opset=opset, simplify=True, batch=1,
                                              device="cpu"))


def score(session: Any, items: list[Labelled]) -> dict[str, Any]:
    """mAP50-95, mAP50 and per-class AP50-95 of one session on `items`."""
    stats, _ = image_stats(session, items, CLASS_NAMES)
    acc = accuracy_from_stats(stats, CLASS_NAMES)
    return {"mAP50-95": round(acc.map50_95, 4), "mAP50": round(acc.map50, 4),
            "per_class_mAP50-95": {k: round(v, 4) for k, v in acc.per_class_ap50_95.items()}}


def main(argv: list[str] | None = None) -> None:
    """Score every --model on val and on each camera variant; print and write a markdown table + JSON."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True, help="name=path (.onnx, or .pt to export)")
    ap.add_argument("--params", type=Path, default=paths.PARAMS_FILE)
    ap.add_argument("--data", type=Path, default=paths.DATASET_DIR)
    ap.add_argument("--camera", type=Path, default=paths.CAMERA_LABELLED)
    ap.add_argument("--images", type=int, default=600, help="camera scenes per variant (cameras round-robin)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--out", type=Path, default=Path("reports/benchmarks/camera_gap.md"))
    args = ap.parse_args(argv)
    pf = load_all(args.params)
    if pf.camera.source != "synthetic":
        raise SystemExit("camera_gap needs camera.source: synthetic (it re-renders the camera scenes)")
    check_against_split(args.camera, pf)
    splits: dict[str, Callable[[], list[Labelled]]] = {"val": lambda: load_split(args.data, "val", len(CLASS_NAMES))}
    for v in args.variants:
        splits[v] = (lambda on: lambda: [Labelled(Path(f"scene{i}"), img, b, c) for i, (img, b, c)
                                          in enumerate(camera_scenes(on, args.images, pf))])(VARIANTS[v])
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="camera-gap-") as tmp:
        sessions = {name: onnx_session(path, pf.base.threads) for name, path in
                    (model_path(m, Path(tmp), pf.export.imgsz, pf.export.opset) for m in args.model)}
        for split, load in splits.items():
            items = load()
            for name, session in sessions.items():
                results.setdefault(name, {})[split] = score(session, items)
                print(f"{name:>16} {split:<22} mAP50-95 {results[name][split]['mAP50-95']:.4f}", flush=True)
    header = "| split | " + " | ".join(results) + " |\n|---|" + "---|" * len(results) + "\n"
    rows = "".join(f"| {split} | " + " | ".join(f"{results[m][split]['mAP50-95']:.3f}" for m in results) + " |\n"
                   for split in splits)
    note = (f"\nmAP50-95, FP32 ONNX through the device's pre/post-processing; camera variants on the first "
            f"{args.images} labelled camera scenes (cameras round-robin), val on data/defects val.\n")
    atomic_write_text(args.out, header + rows + note)
    atomic_write_text(args.out.with_suffix(".json"), json.dumps(results, indent=1, sort_keys=True) + "\n")
    print("\n" + header + rows + note)


if __name__ == "__main__":
    main()
