"""Stage `evaluate`: accuracy of every model variant on the val split and the labelled camera split.

Models (keys in the outputs):
  pytorch              models/yolov8n.pt through Ultralytics' own `val` (the PyTorch reference)
  fp32                 models/yolov8n.onnx
  int8                 models/yolov8n.int8.onnx (the quantize stage's chosen candidate)
  dynamic              models/yolov8n.dynamic.onnx (dynamic-quantization baseline)
  int8_calib_<set>     the chosen candidate's configuration rebuilt from calibration/<set>
                       (`evaluate.calibration_sets`: train images vs camera frames, side by side)

The ONNX models run through the device's own preprocessing and decode, scored by
`pipeline/accuracy/mean_ap.py` (Ultralytics-compatible mAP). Splits: `evaluate.split` of the defect
dataset, and the labelled camera-domain split `data/camera_frames/labelled` (split val) when the
camera stage wrote one; without it (camera.source ingest without labels) that split is skipped
and the metrics say so.

Outputs: reports/evaluate/metrics.json (per split per model: mAP50-95, mAP50, precision,
recall, drop vs FP32), reports/evaluate/per_class.csv (model, split, class, AP50, AP50-95) and
reports/evaluate/headline.json (the DVC metrics: FP32 and INT8 mAP50-95 and the drop per split).
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from edge_runtime.fileio import atomic_write_json, atomic_write_text, sha256_file
from edge_runtime.postprocess import FORMAT_RAW
from pipeline.accuracy.mean_ap import (
    CAMERA_SPLIT_FOLDER,
    VAL_CONF,
    VAL_IOU,
    VAL_MAX_DET,
    Accuracy,
    evaluate_session,
    load_camera_split,
    load_split,
    onnx_session,
)
from pipeline.config import paths
from pipeline.config.params import BaseParams, EvaluateParams, QuantizeParams
from pipeline.config.stage_cli import run_stage, stage_cli, stage_params
from pipeline.config.ultralytics_env import import_ultralytics
from pipeline.onnx_models.calibration_sets import load_calibration_tensors
from pipeline.onnx_models.graph import set_metadata
from pipeline.onnx_models.int8_candidates import build_candidate, preprocessed_fp32
from pipeline.onnx_models.load import class_names, onnx_metadata
from pipeline.tracking.mlflow_runs import lineage_tags, log_artifact, log_metrics, set_tags, stage_run

CAMERA_SPLIT = "camera"  # key of the labelled camera-domain split in the outputs


@dataclass(frozen=True)
class EvaluateInputs:
    """Every file the stage reads (the CLI's paths)."""

    weights: Path
    fp32: Path
    int8: Path
    dynamic: Path
    calibration: Path  # folder holding calibration/<set>/
    quantize_metrics: Path
    dataset: Path
    camera: Path  # the labelled camera split's folder (may be absent)


@dataclass
class EvaluateResult:
    """Accuracy per split per model, the chosen candidate, and why a split was skipped."""

    accuracy: dict[str, dict[str, Accuracy]]  # split -> model -> Accuracy
    chosen: str
    skipped: dict[str, str] = field(default_factory=dict)  # split -> reason


# ------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------


def _require(path: Path, stage: str) -> None:
    if not path.is_file():
        raise ValueError(f"{path} not found; run the {stage} stage first (dvc repro {stage})")


def chosen_candidate_name(quantize_metrics: Path, int8_model: Path) -> str:
    """The quantize stage's chosen candidate, cross-checked against the INT8 model's metadata."""
    _require(quantize_metrics, "quantize")
    try:
        chosen = json.loads(quantize_metrics.read_text())["chosen"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{quantize_metrics} is unreadable or has no 'chosen' ({e!r}); "
                         "re-run the quantize stage") from e
    meta = onnx_metadata(int8_model, "quantize")
    if meta.get("quantization_candidate") != chosen:
        raise ValueError(f"{int8_model} was built by candidate {meta.get('quantization_candidate')!r} but "
                         f"{quantize_metrics} says {chosen!r}: the quantize outputs are out of sync; re-run it")
    return str(chosen)


def class_names_of(model_path: Path) -> list[str]:
    """Class names from an exported model's metadata; a raw-export ONNX is required."""
    meta = onnx_metadata(model_path, "export")
    if meta.get("output_format", FORMAT_RAW) != FORMAT_RAW:
        raise ValueError(f"{model_path} has output_format {meta['output_format']}; evaluate expects the raw FP32 "
                         "export")
    return list(class_names(meta, model_path, "export"))


def load_splits(inputs: EvaluateInputs, p: EvaluateParams, num_classes: int) -> tuple[dict[str, Any], dict[str, str]]:
    """The evaluation splits (name -> images) and the skipped ones (name -> why)."""
    limit = p.images or None
    splits: dict[str, Any] = {p.split: load_split(inputs.dataset, p.split, num_classes, limit)}
    skipped: dict[str, str] = {}
    camera, why = load_camera_split(inputs.camera, num_classes, limit)
    if camera:
        splits[CAMERA_SPLIT] = camera
    else:
        skipped[CAMERA_SPLIT] = why
        print(f"evaluate: skipping the camera split: {why}", flush=True)
    return splits, skipped


# ------------------------------------------------------------------------------------------
# PyTorch reference: Ultralytics' own val
# ------------------------------------------------------------------------------------------


def ultralytics_val(model: Path, dataset_dir: Path, split: str, imgsz: int, batch: int, limit: int | None,
                    work: Path) -> Accuracy:
    """Accuracy of `model` (.pt or .onnx) by Ultralytics' own `val` on `split` of a YOLO folder.

    The split is copied into `work` first: Ultralytics writes label caches beside the labels,
    which would modify a DVC output. `rect=False` so every image is letterboxed to the square
    `imgsz` input, as the device (and Ultralytics' val of an ONNX model) does; thresholds are
    val's own (conf 0.001, IoU 0.7, 300 detections).
    """
    import yaml

    from pipeline.imagesets.yolo import iter_split_files

    files = list(iter_split_files(dataset_dir, split))[:limit]
    if not files:
        raise ValueError(f"{dataset_dir}/images/{split} has no images to evaluate on; run the stage that writes it")
    copy = work / f"data-{dataset_dir.name}-{split}"
    for sub in ("images", "labels"):
        (copy / sub / "val").mkdir(parents=True, exist_ok=True)
    for image, label in files:
        shutil.copyfile(image, copy / "images" / "val" / image.name)
        if label.is_file():
            shutil.copyfile(label, copy / "labels" / "val" / label.name)
    names = yaml.safe_load((dataset_dir / "dataset.yaml").read_text())["names"]
    (copy / "dataset.yaml").write_text(yaml.safe_dump(
        {"path": str(copy), "train": "images/val", "val": "images/val", "names": names}))
    ultralytics = import_ultralytics(work)
    metrics = ultralytics.YOLO(str(model), task="detect").val(
        data=str(copy / "dataset.yaml"), split="val", imgsz=imgsz, batch=batch, conf=VAL_CONF, iou=VAL_IOU,
        max_det=VAL_MAX_DET, rect=False, device="cpu", workers=0, plots=False, save_json=False,
        verbose=False, project=str(work / "runs"), name="val", exist_ok=True)
    box = metrics.box
    class_names = [names[i] for i in sorted(names)] if isinstance(names, dict) else list(names)
    present = [class_names[int(c)] for c in box.ap_class_index]
    all_ap = box.all_ap
    return Accuracy(
        precision=float(box.mp), recall=float(box.mr), map50=float(box.map50), map50_95=float(box.map),
        per_class_ap50_95={n: round(float(a), 6) for n, a in zip(present, all_ap.mean(1))},
        per_class_ap50={n: round(float(a), 6) for n, a in zip(present, all_ap[:, 0])},
        images=len(files),
    )


# ------------------------------------------------------------------------------------------
# The stage
# ------------------------------------------------------------------------------------------


def build_calibrated_int8(fp32_path: Path, calibration: Path, sets: Sequence[str], candidate: Any, imgsz: int,
                          work: Path) -> dict[str, bytes]:
    """The chosen candidate's configuration built from each calibration set: `int8_calib_<set>` -> model bytes."""
    import onnx

    fp32 = preprocessed_fp32(fp32_path, work)
    out = {}
    for name in sets:
        tensors = load_calibration_tensors(calibration / name, imgsz)
        sub = work / f"calib-{name}"
        sub.mkdir()
        model = onnx.load_from_string(build_candidate(fp32, candidate, tensors, sub))
        set_metadata(model, {"calibration_set": name})
        out[f"int8_calib_{name}"] = model.SerializeToString()
        print(f"evaluate: built {candidate.name} from calibration/{name} ({len(tensors)} frames)", flush=True)
    return out


def evaluate(inputs: EvaluateInputs, p: EvaluateParams, q: QuantizeParams, base: BaseParams) -> EvaluateResult:
    """Measure every model on every available split (see the module docstring)."""
    import torch

    torch.set_num_threads(base.threads)
    names = class_names_of(inputs.fp32)
    for path, stage in ((inputs.weights, "train"), (inputs.int8, "quantize"), (inputs.dynamic, "quantize")):
        _require(path, stage)
    chosen = chosen_candidate_name(inputs.quantize_metrics, inputs.int8)
    candidate = q.candidate(chosen)
    fp32_session = onnx_session(inputs.fp32, base.threads)
    imgsz = int(fp32_session.get_inputs()[0].shape[2])
    splits, skipped = load_splits(inputs, p, len(names))

    with tempfile.TemporaryDirectory(prefix="evaluate-") as tmp:
        work = Path(tmp)
        sessions: dict[str, Any] = {
            "fp32": fp32_session,
            "int8": onnx_session(inputs.int8, base.threads),
            "dynamic": onnx_session(inputs.dynamic, base.threads),
        }
        for key, model in build_calibrated_int8(inputs.fp32, inputs.calibration, p.calibration_sets, candidate,
                                                imgsz, work).items():
            sessions[key] = onnx_session(model, base.threads)
        accuracy: dict[str, dict[str, Accuracy]] = {}
        for split, items in splits.items():
            folder, sub = (inputs.camera, CAMERA_SPLIT_FOLDER) if split == CAMERA_SPLIT else (inputs.dataset, split)
            accuracy[split] = {"pytorch": ultralytics_val(inputs.weights, folder, sub, imgsz, p.pytorch_batch,
                                                          p.images or None, work)}
            for key, session in sessions.items():
                accuracy[split][key], _ = evaluate_session(session, items, names)
            print(f"evaluate: {split} ({len(items)} images): " + ", ".join(
                f"{k} {a.map50_95:.4f}" for k, a in accuracy[split].items()), flush=True)
    return EvaluateResult(accuracy, chosen, skipped)


def summary(r: EvaluateResult) -> dict[str, Any]:
    """reports/evaluate/metrics.json: per split per model P/R/mAP and the drop vs FP32."""
    out: dict[str, Any] = {"chosen_candidate": r.chosen}
    for split, models in r.accuracy.items():
        fp32 = models["fp32"].map50_95
        out[split] = {
            "images": models["fp32"].images,
            "instances": models["fp32"].instances,
            **{key: {**acc.as_dict(), "drop_vs_fp32": round(fp32 - acc.map50_95, 6)} for key, acc in models.items()},
        }
    for split, reason in r.skipped.items():
        out[split] = {"skipped": reason}
    cam = r.accuracy.get(CAMERA_SPLIT, {})
    if "int8_calib_camera" in cam and "int8_calib_train" in cam:
        # The claim: on camera frames, camera calibration is at least as accurate as train.
        out["camera_calibration_gain_on_camera"] = round(
            cam["int8_calib_camera"].map50_95 - cam["int8_calib_train"].map50_95, 6)
    return out


def headline(r: EvaluateResult) -> dict[str, float]:
    """reports/evaluate/headline.json (DVC metrics): per split, FP32 and INT8 mAP50-95 and the drop.

    Six numbers (`fp32_mAP50-95_val`, `int8_mAP50-95_val`, `int8_drop_val`, the same for `camera`);
    a skipped split has none. Everything else (P/R/mAP50, PyTorch, dynamic, the rebuilt
    calibrations) is in `summary` (reports/evaluate/metrics.json).
    """
    out: dict[str, float] = {}
    for split, models in r.accuracy.items():
        fp32 = models["fp32"].map50_95
        out[f"fp32_mAP50-95_{split}"] = round(fp32, 6)
        if "int8" in models:
            out[f"int8_mAP50-95_{split}"] = round(models["int8"].map50_95, 6)
            # as summary's drop_vs_fp32: FP32 minus INT8, from the unrounded values
            out[f"int8_drop_{split}"] = round(fp32 - models["int8"].map50_95, 6)
    return out


def per_class_csv(r: EvaluateResult) -> str:
    """reports/evaluate/per_class.csv: one row per model, split and class present in the labels."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["model", "split", "class", "AP50", "AP50-95"])
    for split, models in r.accuracy.items():
        for key, acc in models.items():
            for cls in sorted(acc.per_class_ap50_95):
                w.writerow([key, split, cls, f"{acc.per_class_ap50[cls]:.6f}", f"{acc.per_class_ap50_95[cls]:.6f}"])
    return buf.getvalue()


def mlflow_metrics(r: EvaluateResult) -> dict[str, float]:
    """Flat `<split>.<model>.<metric>` keys for MLflow."""
    out: dict[str, float] = {}
    for split, models in r.accuracy.items():
        for key, acc in models.items():
            out.update({f"{split}.{key}.{k}": v for k, v in acc.as_dict().items()})
    return out


parse_args = stage_cli(
    "evaluate", __doc__,
    weights=paths.WEIGHTS,
    model=paths.ONNX_MODEL,
    int8=paths.INT8_MODEL,
    dynamic=paths.DYNAMIC_MODEL,
    calibration=paths.CALIBRATION_DIR,
    quantize_metrics=paths.QUANTIZE_METRICS,
    data=paths.DATASET_DIR,
    camera=paths.CAMERA_LABELLED,
    metrics=paths.EVALUATE_METRICS,
    per_class=paths.EVALUATE_PER_CLASS,
    headline=paths.EVALUATE_HEADLINE,
)


def main(argv: list[str] | None = None) -> None:
    """Run the stage: evaluate every model on every split, write metrics + per-class CSV, one MLflow run."""
    args = parse_args(argv)
    base, p, q = stage_params(args, "base", "evaluate", "quantize")
    inputs = EvaluateInputs(args.weights, args.model, args.int8, args.dynamic, args.calibration,
                            args.quantize_metrics, args.data, args.camera)
    tags = {**({"source_model_sha256": sha256_file(args.int8)} if args.int8.is_file() else {}),
            **lineage_tags(weights=args.weights, onnx=args.model, int8=args.int8, dynamic=args.dynamic,
                           dataset=args.data)}
    with stage_run("evaluate", base, p, q, tags=tags):
        r = evaluate(inputs, p, q, base)
        atomic_write_json(args.metrics, summary(r))
        atomic_write_json(args.headline, headline(r))
        atomic_write_text(args.per_class, per_class_csv(r))
        log_metrics(mlflow_metrics(r))
        set_tags({"chosen": r.chosen, **{f"skipped.{k}": v[:250] for k, v in r.skipped.items()}})
        log_artifact(args.per_class)


if __name__ == "__main__":
    sys.exit(run_stage(main))
