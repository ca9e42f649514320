"""Stage `export`: models/yolov8n.pt -> models/yolov8n.onnx (+ .fp16.onnx), parity-checked against PyTorch.

Ultralytics exports the graph (static batch 1, opset and imgsz from params, simplified with
onnxslim). The model then gets metadata a device needs without the workstation: class names,
imgsz, stride (Ultralytics' keys), plus `source_weights_sha256`, `output_format` and the
preprocessing contract. Ultralytics' export timestamp is removed so the bytes are reproducible.

Parity: the same real val images, letterboxed by `runtime/edge_runtime/preprocess.py`, go through
ONNX Runtime and the PyTorch model; the stage fails if boxes or scores differ by more than the
tolerances in params.

FP16: `models/yolov8n.fp16.onnx` is the same graph with float16 weights and activations and float32
input/output (`pipeline/onnx_models/fp16.py`), what TensorRT 11 builds FP16 engines from (TensorRT
8.5/10 build them from the FP32 ONNX). It runs beside the FP32 ONNX in ONNX Runtime CPU on the same
val images; the stage fails if boxes or scores differ by more than `export.fp16`'s tolerances or
the detections agree less than `export.fp16.min_f1`. Both files are written only when both pass.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.fileio import atomic_write_bytes, atomic_write_json, sha256_file
from edge_runtime.postprocess import HeadSpec
from edge_runtime.preprocess import preprocess
from pipeline.config import paths
from pipeline.config.params import BaseParams, ExportParams
from pipeline.config.stage_cli import run_stage, stage_cli, stage_params
from pipeline.config.ultralytics_env import VOLATILE_ONNX_METADATA, import_ultralytics
from pipeline.imagesets.yolo import decode_image, iter_split_files
from pipeline.onnx_models.fp16 import Fp16Parity, compare, to_float16
from pipeline.tracking.mlflow_runs import lineage_tags, log_artifact, log_metrics, set_tags, stage_run

# Raw YOLOv8 head: (1, 4 + nc, anchors), boxes as cx, cy, w, h in input pixels, sigmoid scores.
OUTPUT_FORMAT = "yolov8-raw"
PREPROCESS_CONTRACT = "letterbox-center-pad114 bgr2rgb nchw float32 /255"


class ParityError(RuntimeError):
    """ONNX Runtime and PyTorch (or the FP16 and FP32 ONNX) disagree beyond the tolerance: the export is wrong."""


@dataclass(frozen=True)
class ExportResult:
    """What was exported and how closely ORT matches PyTorch."""

    size_bytes: int
    max_abs_diff_box: float
    max_abs_diff_score: float
    parity_images: int
    nodes: int
    fp16_size_bytes: int
    fp16: Fp16Parity


def _finalize_onnx(onnx_path: Path, weights_sha: str) -> bytes:
    """Add our metadata, drop volatile keys, check the graph; return the serialized model."""
    import onnx

    model = onnx.load(str(onnx_path))
    props = {p.key: p.value for p in model.metadata_props if p.key not in VOLATILE_ONNX_METADATA}
    props.update(
        source_weights_sha256=weights_sha,
        output_format=OUTPUT_FORMAT,
        preprocess=PREPROCESS_CONTRACT,
    )
    del model.metadata_props[:]
    for key in sorted(props):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, props[key]
    onnx.checker.check_model(model)
    return model.SerializeToString()


def parity_check(torch_model: Any, onnx_bytes: bytes, images: list[np.ndarray], imgsz: int,
                 threads: int) -> tuple[float, float]:
    """Run `images` through PyTorch and ONNX Runtime; return max |diff| for boxes and scores."""
    import onnxruntime as ort
    import torch

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    session = ort.InferenceSession(onnx_bytes, so, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    box_diff = score_diff = 0.0
    for image in images:
        tensor, _ = preprocess(image, imgsz)
        with torch.inference_mode():
            ref = torch_model(torch.from_numpy(tensor))
        ref = (ref[0] if isinstance(ref, (list, tuple)) else ref).numpy()
        got = session.run(None, {input_name: tensor})[0]
        if got.shape != ref.shape:
            raise ParityError(f"ONNX output shape {got.shape} != PyTorch output shape {ref.shape}")
        diff = np.abs(got - ref)
        box_diff = max(box_diff, float(diff[:, :4].max()))
        score_diff = max(score_diff, float(diff[:, 4:].max()))
    return box_diff, score_diff


def fp16_gate(r: Fp16Parity, p: ExportParams) -> None:
    """ParityError if the FP16 model differs from FP32 beyond `p.fp16`'s tolerances."""
    t = p.fp16
    f1 = r.f1
    problems = []
    if not r.max_abs_diff_box <= t.atol_box:  # `not <=`: a NaN fails too
        problems.append(f"boxes by {r.max_abs_diff_box:.4g} px (tolerance export.fp16.atol_box={t.atol_box})")
    if not r.max_abs_diff_score <= t.atol_score:
        problems.append(f"scores by {r.max_abs_diff_score:.4g} (tolerance export.fp16.atol_score={t.atol_score})")
    if f1 is not None and f1 < t.min_f1:
        problems.append(f"detections agree with box F1 {f1:.4f} (TP {r.tp}, FP {r.fp}, FN {r.fn} at conf {t.conf}; "
                        f"export.fp16.min_f1={t.min_f1})")
    if problems:
        raise ParityError(
            f"the FP16 ONNX differs from the FP32 ONNX on {r.images} val images (ONNX Runtime CPU): "
            + "; ".join(problems) + ". Some weights or activations of this model do not fit float16; check the "
            "onnxconverter-common version, or relax export.fp16 in params.yaml if TensorRT FP16 on the device is "
            "known to be accurate enough"
        )


def export(weights: Path, dataset_dir: Path, out: Path, p: ExportParams, base: BaseParams,
           fp16_out: Path | None = None) -> ExportResult:
    """Export `weights` to ONNX at `out` after checking parity on `p.parity_images` val images; its FP16
    copy, gated against it on the same images, goes to `fp16_out` (default: beside `out`, `.fp16.onnx`)."""
    if not weights.is_file():
        raise ValueError(f"{weights} not found; run the train stage first (dvc repro train)")
    val = [img for img, _ in iter_split_files(dataset_dir, "val")][: p.parity_images]
    if not val:
        raise ValueError(f"{dataset_dir}/images/val has no images for the parity check; run the data stage")
    import torch

    torch.set_num_threads(base.threads)
    weights_sha = sha256_file(weights)
    with tempfile.TemporaryDirectory(prefix="export-") as tmp:
        work = Path(tmp)
        ultralytics = import_ultralytics(work)
        local = work / "model.pt"
        shutil.copyfile(weights, local)  # Ultralytics writes the .onnx beside the .pt
        yolo = ultralytics.YOLO(str(local))
        produced = yolo.export(format="onnx", imgsz=p.imgsz, opset=p.opset, simplify=p.simplify,
                               dynamic=False, batch=1, half=False, device="cpu")
        onnx_bytes = _finalize_onnx(Path(produced), weights_sha)
    reference = ultralytics.YOLO(str(weights)).model.float().eval()
    images = [decode_image(path) for path in val]
    box_diff, score_diff = parity_check(reference, onnx_bytes, images, p.imgsz, base.threads)
    if box_diff > p.parity_atol_box or score_diff > p.parity_atol_score:
        raise ParityError(
            f"ONNX Runtime differs from PyTorch on {len(images)} val images: boxes by {box_diff:.4g} px "
            f"(tolerance {p.parity_atol_box}), scores by {score_diff:.4g} (tolerance {p.parity_atol_score}); "
            "the export is wrong: check opset/simplify in params.yaml, or the onnx/onnxslim versions"
        )
    import onnx

    fp32_model = onnx.load_from_string(onnx_bytes)
    fp16_bytes = to_float16(fp32_model, hashlib.sha256(onnx_bytes).hexdigest())
    tensors = [preprocess(image, p.imgsz)[0] for image in images]
    spec = HeadSpec(OUTPUT_FORMAT, len(reference.names), p.imgsz)
    half = compare(onnx_bytes, fp16_bytes, tensors, spec, base.threads, p.fp16.conf, p.fp16.iou, p.fp16.max_det)
    fp16_gate(half, p)
    atomic_write_bytes(fp16_out or fp16_path(out), fp16_bytes)
    atomic_write_bytes(out, onnx_bytes)
    return ExportResult(len(onnx_bytes), box_diff, score_diff, len(images), len(fp32_model.graph.node),
                        len(fp16_bytes), half)


def fp16_path(out: Path) -> Path:
    """Where the FP16 copy of the ONNX model `out` goes: `<stem>.fp16.onnx` beside it."""
    return out.with_name(out.name.removesuffix(".onnx") + ".fp16.onnx")


parse_args = stage_cli(
    "export", __doc__,
    weights=paths.WEIGHTS,
    data=paths.DATASET_DIR,
    out=paths.ONNX_MODEL,
    fp16=(paths.FP16_MODEL, "the FP16 ONNX (default: beside --out, <name>.fp16.onnx)"),
    metrics=paths.EXPORT_METRICS,
)


def fp16_out(args: Any) -> Path:
    """`--fp16`, or beside `--out` when only `--out` was moved (so an export elsewhere never
    overwrites the checkout's models/yolov8n.fp16.onnx)."""
    if args.fp16 == paths.FP16_MODEL and args.out != paths.ONNX_MODEL:
        return fp16_path(args.out)
    return args.fp16


def main(argv: list[str] | None = None) -> None:
    """Run the stage: export, parity-check, write model + metrics, log one MLflow run."""
    args = parse_args(argv)
    base, p = stage_params(args, "base", "export")
    with stage_run("export", base, p, tags=lineage_tags(weights=args.weights, dataset=args.data)):
        half_out = fp16_out(args)
        r = export(args.weights, args.data, args.out, p, base, half_out)
        metrics = {
            "size_bytes": r.size_bytes,
            "size_mb": round(r.size_bytes / 1e6, 3),
            "max_abs_diff_box": float(f"{r.max_abs_diff_box:.3g}"),
            "max_abs_diff_score": float(f"{r.max_abs_diff_score:.3g}"),
            "parity_images": r.parity_images,
            "nodes": r.nodes,
            # The FP16 copy vs the FP32 ONNX (ORT CPU, the same images); f1 null: neither detected anything.
            "fp16_size_bytes": r.fp16_size_bytes,
            "fp16_max_abs_diff_box": float(f"{r.fp16.max_abs_diff_box:.3g}"),
            "fp16_max_abs_diff_score": float(f"{r.fp16.max_abs_diff_score:.3g}"),
            "fp16_f1": r.fp16.f1,
            "fp16_detections_fp32": r.fp16.detections_fp32,
            "fp16_detections_fp16": r.fp16.detections_fp16,
            "fp16_tp": r.fp16.tp,
            "fp16_fp": r.fp16.fp,
            "fp16_fn": r.fp16.fn,
        }
        atomic_write_json(args.metrics, metrics)
        log_metrics(metrics)
        set_tags({"model_sha256": sha256_file(args.out), **lineage_tags(onnx=args.out)})
        log_artifact(args.out, "model")
        log_artifact(half_out, "model_fp16")
        f1 = "no detections" if r.fp16.f1 is None else f"detection F1 {r.fp16.f1:.4f}"
        print(f"export: {args.out} ({metrics['size_mb']} MB), parity on {r.parity_images} val images: "
              f"boxes {r.max_abs_diff_box:.2e} px, scores {r.max_abs_diff_score:.2e}; {half_out} "
              f"({r.fp16_size_bytes / 1e6:.3f} MB) vs FP32: boxes {r.fp16.max_abs_diff_box:.2e} px, "
              f"scores {r.fp16.max_abs_diff_score:.2e}, {f1}", flush=True)


if __name__ == "__main__":
    sys.exit(run_stage(main))
