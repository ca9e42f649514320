"""The repository's file layout, in one place.

Stage modules take these as their CLI defaults; `dvc.yaml` declares the same paths as deps and
outs, and `tests/test_dvc_yaml.py` checks that the two agree, so a stage cannot write a file DVC
does not know about.

Metrics: each stage's `reports/<stage>/metrics.json` is its full record (per split, per class,
per candidate...), declared in dvc.yaml as an `outs` entry with `cache: false`; the DVC metrics
(`dvc metrics show`, `dvc exp show`) are the few `reports/<stage>/headline.json` files, about a
dozen numbers across the pipeline, so they fit a terminal.
"""

from __future__ import annotations

from pathlib import Path

PARAMS_FILE = Path("params.yaml")
RUNTIME_DIR = Path("runtime")  # the device runtime distribution (edge-defect-runtime)

DATASET_DIR = Path("data/defects")
DATASET_YAML = DATASET_DIR / "dataset.yaml"
DATA_METRICS = Path("reports/data/metrics.json")
DATA_HEADLINE = Path("reports/data/headline.json")  # DVC metrics: images_total

WEIGHTS = Path("models/yolov8n.pt")
TRAIN_METRICS = Path("reports/train/metrics.json")
TRAIN_EPOCHS = Path("reports/train/epochs.csv")

ONNX_MODEL = Path("models/yolov8n.onnx")
FP16_MODEL = Path("models/yolov8n.fp16.onnx")  # stage export: float16 weights/activations, float32 I/O (TensorRT 11)
EXPORT_METRICS = Path("reports/export/metrics.json")

CAMERA_FRAMES_DIR = Path("data/camera_frames")  # stage camera: frames/<camera-id>/*.jpg + labelled/
CAMERA_FRAMES = CAMERA_FRAMES_DIR / "frames"
CAMERA_LABELLED = CAMERA_FRAMES_DIR / "labelled"  # YOLO layout, split val, dataset.yaml
CAMERA_LABELLED_YAML = CAMERA_LABELLED / "dataset.yaml"
CAMERA_METRICS = Path("reports/camera/metrics.json")
CAMERA_PROFILES = Path("reports/camera_profile/profiles.json")  # stage camera_profile: a camera model per camera

CALIBRATION_DIR = Path("calibration")  # calibration/<set>/tensors.npy + manifest.json
CALIBRATION_CAMERA = CALIBRATION_DIR / "camera"  # from CAMERA_FRAMES (the default for quantize)
CALIBRATION_TRAIN = CALIBRATION_DIR / "train"  # from the training images (for comparison)
CALIBRATION_TENSORS = "tensors.npy"  # file names inside a set folder
CALIBRATION_MANIFEST = "manifest.json"
CALIBRATE_METRICS = Path("reports/calibrate/metrics.json")


def repo_root() -> Path:
    """The repository root: the folder that holds the `pipeline` package, `runtime/` and dvc.yaml."""
    return Path(__file__).resolve().parents[2]

INT8_MODEL = Path("models/yolov8n.int8.onnx")  # stage quantize: the chosen CPU INT8 model
INT8_TRT_MODEL = Path("models/yolov8n.int8.trt.onnx")  # symmetric QDQ for TensorRT
DYNAMIC_MODEL = Path("models/yolov8n.dynamic.onnx")  # dynamic-quantization baseline
QUANTIZE_CANDIDATES = Path("reports/quantize/candidates.csv")
QUANTIZE_METRICS = Path("reports/quantize/metrics.json")
QUANTIZE_HEADLINE = Path("reports/quantize/headline.json")  # DVC metrics: chosen, model sizes

EVALUATE_METRICS = Path("reports/evaluate/metrics.json")  # stage evaluate: per split per model summary
EVALUATE_PER_CLASS = Path("reports/evaluate/per_class.csv")  # model, split, class, AP50, AP50-95
EVALUATE_HEADLINE = Path("reports/evaluate/headline.json")  # DVC metrics: FP32/INT8 mAP50-95 and drop per split
BENCHMARK_RESULTS = Path("reports/benchmark/results.json")  # stage benchmark (host): per imgsz per variant
BENCHMARK_CSV = Path("reports/benchmark/results.csv")
BENCHMARK_SAMPLES = Path("reports/benchmark/latency_samples.csv")  # every timed detection (imgsz, variant, ms)
BENCHMARK_HEADLINE = Path("reports/benchmark/headline.json")  # DVC metrics: FP32/INT8 P50 and speed-up

FLEET_RESULTS_DIR = Path("reports/fleet")  # fab deploy/benchmark: <host>/<utc-stamp>.json (git keeps the README)
REPORT_MARKDOWN = Path("reports/report.md")  # stage report: the page people read
REPORT_PLOTS_DIR = Path("reports/plots")  # its PNG figures
REPORT_TABLES_DIR = Path("reports/report")  # its dvc-plots CSVs + summary.json (what `make run` prints)
