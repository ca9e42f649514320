"""Real-time loop vs inference alone, and why the slot of one matters -- in one run, on this machine.

    python benchmarks/realtime.py [--model PATH] [--seconds 10] [--threads 2] [--camera-fps F]

Three measurements with the same model, backend settings and frame size:

1. inference only: `Detector.detect` (preprocess + infer + postprocess) in a loop on one thread;
2. the real-time loop (`edge_runtime.realtime`): capture, infer and handle threads joined by
   size-one slots, fed by a synthetic camera that outruns the model (default 1.5x the
   inference-only FPS), so the loop is inference-bound;
3. the same loop with a naive unbounded FIFO between capture and inference.

Targets (issue 4): loop FPS >= 95% of inference-only FPS; mean frame age at inference <= one
camera frame interval. The naive queue keeps every frame, so its frame age grows for as long as
the camera outruns the model.

Model: --model, else models/yolov8n.int8.onnx (the INT8 model, once the quantize stage exists),
else models/yolov8n.onnx (after `dvc repro export`), else a tiny model built like the tests'
`tiny_model` fixture (synthetic data, 1 epoch at 64 px) in a temp folder.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from edge_runtime.backends import OrtBackend  # noqa: E402
from edge_runtime.detector import Detector  # noqa: E402
from edge_runtime.manifest import OrtSettings  # noqa: E402
from edge_runtime.postprocess import spec_from_metadata  # noqa: E402
from edge_runtime.realtime import LatestSlot, RealtimeLoop, SyntheticSource, UnboundedQueue  # noqa: E402
from edge_runtime.release import model_class_names  # noqa: E402

FRAME_W, FRAME_H = 640, 480


def build_tiny_model(work: Path) -> Path:
    """Data -> train (1 epoch, 64 px) -> export through the real stages, like tests/conftest.py."""
    import yaml

    from pipeline.stages import data, export, train

    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_CONFIG_DIR", str(work / "yolo"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    p = yaml.safe_load((REPO / "params.yaml").read_text())
    p["data"]["synthetic"].update(train_images=24, val_images=8, test_images=4, image_size=96)
    p["train"].update(imgsz=64, epochs=1, batch=8, nbs=8, workers=0, close_mosaic=0)
    p["export"].update(imgsz=64, parity_images=2)
    params = work / "params.yaml"
    params.write_text(yaml.safe_dump(p, sort_keys=False))
    data.main(["--out", str(work / "defects"), "--metrics", str(work / "d.json"), "--headline", str(work / "dh.json"),
               "--params", str(params)])
    train.main(["--data", str(work / "defects" / "dataset.yaml"), "--out", str(work / "m.pt"), "--metrics",
                str(work / "t.json"), "--epochs-csv", str(work / "e.csv"), "--params", str(params)])
    export.main(["--weights", str(work / "m.pt"), "--data", str(work / "defects"), "--out", str(work / "m.onnx"),
                 "--metrics", str(work / "x.json"), "--params", str(params)])
    return work / "m.onnx"


def pick_model(arg: Optional[str], work: Path) -> Path:
    """The model to measure (see the module docstring for the order)."""
    if arg:
        return Path(arg)
    for candidate in (REPO / "models" / "yolov8n.int8.onnx", REPO / "models" / "yolov8n.onnx"):
        if candidate.is_file():
            return candidate
    print("no models/yolov8n*.onnx (run `dvc repro`); building a tiny model for the comparison ...", flush=True)
    return build_tiny_model(work)


def make_detector(model: Path, threads: int) -> Detector:
    """The same detector settings for every mode."""
    backend = OrtBackend(model, OrtSettings(threads=threads))
    backend.load()
    meta = backend.metadata
    imgsz = int(backend.input_shape[2])
    spec = spec_from_metadata(meta, meta.get("output_format", "yolov8-raw"), len(model_class_names(model)), imgsz)
    return Detector(backend, spec, 0.25, 0.45, 100)


def inference_only(detector: Detector, seconds: float) -> float:
    """Frames per second of detect() alone on a synthetic camera frame."""
    frame = SyntheticSource(FRAME_W, FRAME_H, fps=None).read()
    for _ in range(10):
        detector.detect(frame)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        detector.detect(frame)
        n += 1
    return n / (time.perf_counter() - t0)


def loop(detector: Detector, camera_fps: float, seconds: float, slot_factory: Any) -> Dict[str, Any]:
    """Run the real-time loop on a synthetic camera for `seconds`."""
    source = SyntheticSource(FRAME_W, FRAME_H, fps=camera_fps)
    return RealtimeLoop({"m": detector}, source, [], slot_factory=slot_factory, max_seconds=seconds).run()


def main(argv: Optional[List[str]] = None) -> None:
    """Measure and print the comparison table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="ONNX model (default: see module docstring)")
    ap.add_argument("--seconds", type=float, default=10.0, help="duration of each measurement")
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    ap.add_argument("--camera-fps", type=float, help="synthetic camera rate (default 1.5x inference-only FPS)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="rt-bench-") as tmp:
        model = pick_model(args.model, Path(tmp))
        detector = make_detector(model, args.threads)
        fps_inf = inference_only(detector, args.seconds)
        camera_fps = args.camera_fps or round(1.5 * fps_inf, 1)
        interval_ms = 1000.0 / camera_fps
        slot = loop(detector, camera_fps, args.seconds, LatestSlot)
        naive = loop(detector, camera_fps, args.seconds, UnboundedQueue)
    print(f"\nmodel {model.name} imgsz {detector.spec.imgsz}, ORT threads {args.threads}, {os.cpu_count()} cores, "
          f"frames {FRAME_W}x{FRAME_H}, camera {camera_fps} FPS (interval {interval_ms:.1f} ms), "
          f"{args.seconds:g} s each")
    header = f"{'mode':<26}{'FPS':>8}{'% of inf-only':>15}{'mean age ms':>13}{'age/interval':>14}" \
             f"{'p95 age ms':>12}{'dropped':>9}{'max queue':>11}"
    print(header)
    print("-" * len(header))
    print(f"{'inference only':<26}{fps_inf:>8.1f}{100.0:>14.1f}%{'-':>13}{'-':>14}{'-':>12}{'-':>9}{'-':>11}")
    for name, s in (("real-time loop (slot of 1)", slot), ("naive unbounded queue", naive)):
        age = s["frame_age_ms"]
        print(f"{name:<26}{s['fps']:>8.1f}{100.0 * s['fps'] / fps_inf:>14.1f}%{age['mean']:>13.1f}"
              f"{age['mean'] / interval_ms:>14.2f}{age['p95']:>12.1f}{s['frames_dropped']:>9}"
              f"{s['max_queue_depth']:>11}")
    print("(dropped: frames replaced in the slot; for the naive queue, frames still queued -- never inferred --"
          " when the run stopped)")
    ok_fps = slot["fps"] >= 0.95 * fps_inf
    ok_age = slot["frame_age_ms"]["mean"] <= interval_ms
    print(f"\ntargets: loop FPS >= 95% of inference-only: {'met' if ok_fps else 'NOT met'}; "
          f"mean frame age <= 1 frame interval: {'met' if ok_age else 'NOT met'}")


if __name__ == "__main__":
    main()
