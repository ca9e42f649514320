"""Stage `export`: models/yolov8n.pt -> models/yolov8n.onnx, parity-checked against PyTorch.

Ultralytics exports the graph (static batch 1, opset and imgsz from params, simplified with
onnxslim). The model then gets metadata a device needs without the workstation: class names,
imgsz, stride (Ultralytics' keys), plus `source_weights_sha256`, `output_format` and the
preprocessing contract. Ultralytics' export timestamp is removed so the bytes are reproducible.

Parity: the same real val images, letterboxed by `runtime/edge_runtime/preprocess.py`, go through
ONNX Runtime and the PyTorch model; the stage fails if boxes or scores differ by more than the
tolerances in params.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.fileio import atomic_write_bytes, atomic_write_json, sha256_file
from edge_runtime.preprocess import preprocess
from pipeline.config import paths
from pipeline.config.params import BaseParams, ExportParams
from pipeline.config.stage_cli import run_stage, stage_cli, stage_params
from pipeline.config.ultralytics_env import VOLATILE_ONNX_METADATA, import_ultralytics
from pipeline.imagesets.yolo import decode_image, iter_split_files
from pipeline.tracking.mlflow_runs import lineage_tags, log_artifact, log_metrics, set_tags, stage_run

# Raw YOLOv8 head: (1, 4 + nc, anchors), boxes as cx, cy, w, h in input pixels, sigmoid scores.
OUTPUT_FORMAT = "yolov8-raw"
PREPROCESS_CONTRACT = "letterbox-center-pad114 bgr2rgb nchw float32 /255"


class ParityError(RuntimeError):
    """ONNX Runtime and PyTorch disagree beyond the tolerance: the export is wrong."""


@dataclass(frozen=True)
class ExportResult:
    """What was exported and how closely ORT matches PyTorch."""

    size_bytes: int
    max_abs_diff_box: float
    max_abs_diff_score: float
    parity_images: int
    nodes: int


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


def export(weights: Path, dataset_dir: Path, out: Path, p: ExportParams, base: BaseParams) -> ExportResult:
    """Export `weights` to ONNX at `out` after checking parity on `p.parity_images` val images."""
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
    atomic_write_bytes(out, onnx_bytes)
    import onnx

    nodes = len(onnx.load_from_string(onnx_bytes).graph.node)
    return ExportResult(len(onnx_bytes), box_diff, score_diff, len(images), nodes)


parse_args = stage_cli(
    "export", __doc__,
    weights=paths.WEIGHTS,
    data=paths.DATASET_DIR,
    out=paths.ONNX_MODEL,
    metrics=paths.EXPORT_METRICS,
)


def main(argv: list[str] | None = None) -> None:
    """Run the stage: export, parity-check, write model + metrics, log one MLflow run."""
    args = parse_args(argv)
    base, p = stage_params(args, "base", "export")
    with stage_run("export", base, p, tags=lineage_tags(weights=args.weights, dataset=args.data)):
        r = export(args.weights, args.data, args.out, p, base)
        metrics = {
            "size_bytes": r.size_bytes,
            "size_mb": round(r.size_bytes / 1e6, 3),
            "max_abs_diff_box": float(f"{r.max_abs_diff_box:.3g}"),
            "max_abs_diff_score": float(f"{r.max_abs_diff_score:.3g}"),
            "parity_images": r.parity_images,
            "nodes": r.nodes,
        }
        atomic_write_json(args.metrics, metrics)
        log_metrics(metrics)
        set_tags({"model_sha256": sha256_file(args.out), **lineage_tags(onnx=args.out)})
        log_artifact(args.out, "model")
        print(f"export: {args.out} ({metrics['size_mb']} MB), parity on {r.parity_images} val images: "
              f"boxes {r.max_abs_diff_box:.2e} px, scores {r.max_abs_diff_score:.2e}", flush=True)


if __name__ == "__main__":
    sys.exit(run_stage(main))
