r"""The embedded defaults' training on an NVIDIA GPU, next to the CPU run of the same params.

Trains with params.yaml as it is except `train.device` (the train stage itself, into a temp
folder), exports the FP32 ONNX (the export stage), scores it on the val split and on the
labelled camera split through the device's pre/post-processing, and writes one JSON with the
wall time, the GPU, both mAPs and, from the checkout's pipeline outputs, the CPU run's figures
(reports/train/metrics.json, reports/evaluate/headline.json, the train stage's MLflow run time).
Run after `dvc repro`, on a machine with CUDA:

    python benchmarks/train_gpu.py [--device cuda:0 | --device 0,1] [--out reports/benchmarks/train_gpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("YOLO_OFFLINE", "1")

from edge_runtime.fileio import atomic_write_json  # noqa: E402
from pipeline.accuracy.mean_ap import evaluate_session, load_camera_split, load_split, onnx_session  # noqa: E402
from pipeline.config import paths  # noqa: E402
from pipeline.imagesets.synthetic import CLASS_NAMES  # noqa: E402


def _device(text: str) -> Any:
    return [int(v) for v in text.split(",")] if "," in text else text


def main(argv: list[str] | None = None) -> None:
    """Train on --device, score, and write the comparison JSON."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda:0", help="cuda:N, N, or N,M for DDP")
    ap.add_argument("--out", type=Path, default=Path("reports/benchmarks/train_gpu.json"))
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run this on a machine with an NVIDIA GPU")
    from pipeline.stages import export, train

    params = yaml.safe_load(paths.PARAMS_FILE.read_text())
    params["train"]["device"] = _device(args.device)
    with tempfile.TemporaryDirectory(prefix="train-gpu-") as tmp:
        t = Path(tmp)
        (t / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        common = ["--params", str(t / "params.yaml")]
        start = time.monotonic()
        train.main(["--out", str(t / "w.pt"), "--metrics", str(t / "train.json"), "--epochs-csv", str(t / "e.csv"),
                    *common])
        seconds = time.monotonic() - start
        export.main(["--weights", str(t / "w.pt"), "--out", str(t / "m.onnx"), "--metrics", str(t / "export.json"),
                     *common])
        session = onnx_session(t / "m.onnx", 2)
        val, _ = evaluate_session(session, load_split(paths.DATASET_DIR, "val", len(CLASS_NAMES)), CLASS_NAMES)
        items, why = load_camera_split(paths.CAMERA_LABELLED, len(CLASS_NAMES))
        camera = evaluate_session(session, items, CLASS_NAMES)[0].map50_95 if items else None
        gpu_train = json.loads((t / "train.json").read_text())
    cpu: dict[str, Any] = {}
    if paths.TRAIN_METRICS.is_file():
        cpu["train"] = json.loads(paths.TRAIN_METRICS.read_text())
    if paths.EVALUATE_HEADLINE.is_file():
        cpu["evaluate"] = json.loads(paths.EVALUATE_HEADLINE.read_text())
    doc = {
        "device": str(args.device), "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version(), "seconds": round(seconds, 1),
        "gpu_run": {"train": gpu_train, "fp32_mAP50-95_val": round(val.map50_95, 4),
                    "fp32_mAP50-95_camera": None if camera is None else round(camera, 4), "camera_note": why},
        "cpu_run": cpu,
    }
    atomic_write_json(args.out, doc)
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
