"""Stage `quantize`: models/yolov8n.onnx -> INT8 models, chosen by measurement behind an accuracy gate.

For every candidate configuration in params (QDQ/QOperator, U8/S8 activations, which op types,
MinMax/Percentile/Entropy calibration, head decode kept in float or cut out of the graph):
build it with ONNX Runtime static quantization on the calibration set (camera frames by
default), measure its latency on this host (interleaved with FP32 and every other candidate,
repeated, medians), and measure its mAP50-95 with the device's own pre/post processing on the
val split and (`quantize.camera_gate`) on the labelled camera-domain split, where the model will
actually run. Candidates whose mAP50-95 drop vs FP32 exceeds `quantize.max_map_drop` on either
split are rejected; the fastest survivor becomes `models/yolov8n.int8.onnx`. If none survives,
the stage fails with the whole table.

Also written: `models/yolov8n.int8.trt.onnx` (symmetric S8S8 QDQ, head in float: TensorRT's
explicit-quantization input) and `models/yolov8n.dynamic.onnx` (dynamic-quantization baseline).
"""

from __future__ import annotations

import csv
import io
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from edge_runtime.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text, sha256_file
from edge_runtime.postprocess import FORMAT_RAW
from pipeline.accuracy.mean_ap import (
    ImageStats,
    accuracy_from_stats,
    decoder,
    image_stats,
    load_camera_split,
    load_split,
    onnx_session,
    paired_bootstrap_map,
)
from pipeline.config import paths
from pipeline.config.params import BaseParams, QuantizeParams
from pipeline.config.stage_cli import run_stage, stage_cli, stage_params
from pipeline.onnx_models.calibration_sets import load_calibration_tensors
from pipeline.onnx_models.graph import metadata, set_metadata
from pipeline.onnx_models.int8_candidates import (
    PREPROCESSED_NAME,
    build_candidate,
    build_dynamic,
    describe,
    interleaved_latency,
    preprocessed_fp32,
)
from pipeline.onnx_models.load import class_names, input_size, load_onnx, onnx_metadata
from pipeline.tracking.mlflow_runs import lineage_tags, log_artifact, log_metrics, set_tags, stage_run


class AccuracyGateError(RuntimeError):
    """No candidate kept mAP50-95 within `quantize.max_map_drop` of FP32."""


@dataclass
class CandidateResult:
    """One row of reports/quantize/candidates.csv."""

    name: str
    config: str
    map50_95: float
    map50: float
    drop: float
    latency_ms: float
    latency_spread_ms: float
    speedup: float
    size_bytes: int
    passed: bool
    model: bytes | None = None
    map50_95_camera: float | None = None  # on the labelled camera split (None: not gated there)
    drop_camera: float | None = None
    # 95% paired-bootstrap intervals of the drops (None: quantize.bootstrap_resamples is 0). Measured
    # here: +-0.75 points on the 150 val images, +-0.3 on 1000 camera frames (the gate: 0.5).
    drop_ci: tuple[float, float] | None = None
    drop_camera_ci: tuple[float, float] | None = None

    @property
    def worst_drop(self) -> float:
        """The larger of the val and camera-split drops: what the gate compares."""
        return max(self.drop, self.drop_camera) if self.drop_camera is not None else self.drop


@dataclass(frozen=True)
class _SplitScore:
    """One candidate on one split: its accuracy and its drop vs FP32 (with the drop's interval)."""

    map50_95: float
    map50: float
    drop: float
    ci: tuple[float, float] | None


# ------------------------------------------------------------------------------------------
# The stage
# ------------------------------------------------------------------------------------------


@dataclass
class QuantizeResult:
    """The candidate table, the FP32 reference and the chosen candidate."""

    fp32_map50_95: float
    fp32_latency_ms: float
    fp32_size: int
    rows: list[CandidateResult]
    chosen: CandidateResult
    trt_size: int
    dynamic_size: int
    fp32_map50_95_camera: float | None = None
    camera_skipped: str = ""  # why the camera split was not gated ("" = it was)


def quantize(model_path: Path, calib_dir: Path, dataset_dir: Path, outs: dict[str, Path], p: QuantizeParams,
             base: BaseParams, camera_dir: Path | None = None) -> QuantizeResult:
    """Build, measure and gate every candidate; write the chosen, TRT and dynamic models to `outs`.

    `camera_dir` is the labelled camera split (YOLO folder, split `val`); with `p.camera_gate` the
    gate also holds every candidate to `max_map_drop` there. Without a labelled camera split the
    gate uses the val split alone and the result says why.
    """
    import onnx

    fp32_raw = load_onnx(model_path, "export")
    meta = metadata(fp32_raw)
    if meta.get("output_format", FORMAT_RAW) != FORMAT_RAW:
        raise ValueError(f"{model_path} has output_format {meta.get('output_format')}; quantize expects the raw export")
    names = list(class_names(meta, model_path, "export"))
    calib = load_calibration_tensors(calib_dir, input_size(fp32_raw, model_path))
    items = load_split(dataset_dir, p.eval_split, len(names), p.eval_images or None)
    cam_items, camera_skipped = _camera_split(camera_dir, p, len(names))

    with tempfile.TemporaryDirectory(prefix="quantize-") as tmp:
        work = Path(tmp)
        fp32 = preprocessed_fp32(model_path, work)
        fp32_session = onnx_session(model_path, base.threads)
        fp32_stats = image_stats(fp32_session, items, names)[0]
        fp32_cam_stats = image_stats(fp32_session, cam_items, names)[0] if cam_items else []
        fp32_map = accuracy_from_stats(fp32_stats, names).map50_95
        fp32_cam = accuracy_from_stats(fp32_cam_stats, names).map50_95 if cam_items else None
        print(f"quantize: FP32 mAP50-95 {fp32_map:.4f} on {len(items)} {p.eval_split} images"
              + (f", {fp32_cam:.4f} on {len(cam_items)} camera images" if cam_items else ""), flush=True)

        def score(session: Any, split: Sequence[Any], ref: Sequence[ImageStats], ref_map: float) -> _SplitScore:
            stats = image_stats(session, split, names)[0]
            acc = accuracy_from_stats(stats, names)
            return _SplitScore(acc.map50_95, acc.map50, ref_map - acc.map50_95,
                               drop_interval(ref, stats, names, p.bootstrap_resamples, base.seed))

        built: dict[str, tuple[bytes, _SplitScore, _SplitScore | None]] = {}
        for c in p.candidates:
            t0 = time.monotonic()
            model = build_candidate(fp32, c, calib, work)
            session = onnx_session(model, base.threads)
            val = score(session, items, fp32_stats, fp32_map)
            cam = score(session, cam_items, fp32_cam_stats, fp32_cam) if fp32_cam is not None else None
            built[c.name] = (model, val, cam)
            line = f"drop {val.drop:+.4f}" + (f"; camera {cam.map50_95:.4f}, drop {cam.drop:+.4f}" if cam else "")
            print(f"quantize: {c.name:<24} mAP50-95 {val.map50_95:.4f} ({line}) built+evaluated in "
                  f"{time.monotonic() - t0:.0f}s", flush=True)

        sessions = {"fp32": fp32_session, **{n: onnx_session(b[0], base.threads) for n, b in built.items()}}
        inputs = [calib[i] [None] for i in range(min(8, len(calib)))]
        decode = {name: decoder(s, len(names), p.latency_conf, p.latency_iou, p.latency_max_det)
                  for name, s in sessions.items()}
        latency = interleaved_latency(sessions, inputs, p.latency_warmup, p.latency_runs, p.latency_rounds, decode)
        fp32_ms = latency["fp32"][0]
        rows = []
        for c in p.candidates:
            ms, spread = latency[c.name]
            model, val, cam = built[c.name]
            row = CandidateResult(
                c.name, describe(c), val.map50_95, val.map50, val.drop, ms, spread, fp32_ms / ms, len(model), False,
                model, cam.map50_95 if cam else None, cam.drop if cam else None, val.ci, cam.ci if cam else None)
            row.passed = row.worst_drop <= p.max_map_drop
            rows.append(row)
        table = candidates_csv(rows, fp32_map, fp32_ms, model_path.stat().st_size, fp32_cam)
        atomic_write_text(outs["candidates"], table)
        chosen = accuracy_gate(rows, p.max_map_drop, fp32_map, table, p.latency_tie)
        chosen_model = onnx.load_from_string(chosen.model)
        set_metadata(chosen_model, {"fp32_sha256": sha256_file(model_path),
                                    "calibration_set": calib_dir.name})
        atomic_write_bytes(outs["int8"], chosen_model.SerializeToString())

        trt = build_candidate(fp32, p.trt, calib, work)
        atomic_write_bytes(outs["trt"], trt)
        dyn = build_dynamic(work / PREPROCESSED_NAME, work)
        atomic_write_bytes(outs["dynamic"], dyn)
    return QuantizeResult(fp32_map, fp32_ms, model_path.stat().st_size, rows, chosen, len(trt), len(dyn),
                          fp32_cam, camera_skipped)


def drop_interval(fp32_stats: Sequence[ImageStats], int8_stats: Sequence[ImageStats], names: Sequence[str],
                  resamples: int, seed: int) -> tuple[float, float] | None:
    """95% paired-bootstrap interval of the mAP50-95 drop (FP32 minus INT8) on these images, or
    None when `resamples` is 0. The gate decides on the point estimate; the interval says how far
    that estimate could move on another sample of images of the same kind."""
    if resamples == 0:
        return None
    b = paired_bootstrap_map(fp32_stats, int8_stats, names, resamples, seed)
    return b["ci_low"], b["ci_high"]


def _camera_split(camera_dir: Path | None, p: QuantizeParams, num_classes: int) -> tuple[list[Any], str]:
    """The labelled camera split's images for the gate, or [] and why it is not gated."""
    if not p.camera_gate:
        return [], "quantize.camera_gate is false"
    items, why = (load_camera_split(camera_dir, num_classes, p.eval_images or None) if camera_dir
                  else ([], "no --camera"))
    if not items:
        why += "; the gate checks the val split only"
        print(f"quantize: {why}", flush=True)
    return items, why


def accuracy_gate(rows: Sequence[CandidateResult], max_map_drop: float, fp32_map: float, table: str,
                  latency_tie: float = 0.0) -> CandidateResult:
    """The fastest candidate whose drop (the worse of val and camera split) is within `max_map_drop`;
    else AccuracyGateError with the table.

    Candidates the measurement cannot tell apart from the fastest passing one count as equally fast,
    and the most accurate of them wins, then the smallest: otherwise the pick between near-twins
    would be decided by noise. "Cannot tell apart": within `latency_tie` (a fraction) of it, or
    their ranges of round medians (latency ± half the spread) overlap.
    """
    passed = [r for r in rows if r.worst_drop <= max_map_drop]
    if not passed:
        drops = ", ".join(f"{r.name} {r.drop:+.4f}"
                          + (f" (camera {r.drop_camera:+.4f})" if r.drop_camera is not None else "") for r in rows)
        raise AccuracyGateError(
            f"no INT8 candidate kept mAP50-95 within quantize.max_map_drop={max_map_drop} of FP32 ({fp32_map:.4f}); "
            f"drops: {drops}\n{table}{gate_verdict(rows, max_map_drop)}Relax max_map_drop, add candidates "
            "(Percentile calibration, more float_layers, fewer op_types) or use a larger calibration set in params.yaml"
        )
    fastest = min(passed, key=lambda r: r.latency_ms)
    fastest_high = fastest.latency_ms + fastest.latency_spread_ms / 2
    tied = [r for r in passed if r.latency_ms <= fastest.latency_ms * (1.0 + latency_tie)
            or r.latency_ms - r.latency_spread_ms / 2 <= fastest_high]
    # Equal accuracy too (e.g. the QDQ and QOperator forms of one configuration score the same to
    # the last digit): the smaller file, which does not depend on timing noise; latency last.
    return min(tied, key=lambda r: (round(r.worst_drop, 6), r.size_bytes, r.latency_ms))


def gate_verdict(rows: Sequence[CandidateResult], max_map_drop: float) -> str:
    """Whether the failed candidates failed for certain or within the noise of the split sizes.

    A candidate fails for certain when the 95% interval of its val or camera drop lies wholly above
    `max_map_drop`; otherwise its point estimate failed but more labelled images could turn it
    either way. "" when the rows carry no intervals.
    """
    def certain(r: CandidateResult) -> bool:
        return any(ci is not None and ci[0] > max_map_drop for ci in (r.drop_ci, r.drop_camera_ci))

    if all(r.drop_ci is None and r.drop_camera_ci is None for r in rows):
        return ""
    unsure = [r.name for r in rows if not certain(r)]
    if not unsure:
        return ("Every candidate fails for certain: for each, the 95% interval of its val or camera drop lies wholly "
                f"above {max_map_drop}, so this model loses more than the gate allows with these configurations; "
                "more images would not change that.\n")
    return (f"Within the noise: {', '.join(unsure)} failed on the point estimate, but their 95% intervals reach "
            f"{max_map_drop}; more labelled images (a larger val split, camera.synthetic.labelled_images or your own "
            "labelled camera frames) would decide them.\n")


def candidates_csv(rows: Sequence[CandidateResult], fp32_map: float, fp32_ms: float, fp32_size: int,
                   fp32_map_camera: float | None = None) -> str:
    """The candidate table as CSV text (FP32 reference first); camera columns empty when not gated
    there, interval columns empty without bootstrap resamples."""
    def f4(x: float | None) -> str:
        return "" if x is None else f"{x:.4f}"

    def ci(x: tuple[float, float] | None) -> list[str]:
        return ["", ""] if x is None else [f"{x[0]:.4f}", f"{x[1]:.4f}"]

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["name", "config", "mAP50-95", "mAP50", "drop", "drop_ci_low", "drop_ci_high", "mAP50-95_camera",
                "drop_camera", "drop_camera_ci_low", "drop_camera_ci_high", "latency_ms", "spread_ms", "speedup",
                "size_mb", "passed"])
    cam_ref = "" if fp32_map_camera is None else "0.0000"
    w.writerow(["fp32", "FP32 ONNX", f"{fp32_map:.4f}", "", "0.0000", "", "", f4(fp32_map_camera), cam_ref, "", "",
                f"{fp32_ms:.2f}", "", "1.00", f"{fp32_size / 1e6:.2f}", "reference"])
    for r in rows:
        w.writerow([r.name, r.config, f"{r.map50_95:.4f}", f"{r.map50:.4f}", f"{r.drop:.4f}", *ci(r.drop_ci),
                    f4(r.map50_95_camera), f4(r.drop_camera), *ci(r.drop_camera_ci), f"{r.latency_ms:.2f}",
                    f"{r.latency_spread_ms:.2f}", f"{r.speedup:.2f}", f"{r.size_bytes / 1e6:.2f}",
                    "yes" if r.passed else "no"])
    return buf.getvalue()


parse_args = stage_cli(
    "quantize", __doc__,
    model=paths.ONNX_MODEL,
    calibration=paths.CALIBRATION_DIR,
    data=paths.DATASET_DIR,
    camera=(paths.CAMERA_LABELLED, "labelled camera split (YOLO folder)"),
    int8=paths.INT8_MODEL,
    trt=paths.INT8_TRT_MODEL,
    dynamic=paths.DYNAMIC_MODEL,
    candidates=paths.QUANTIZE_CANDIDATES,
    metrics=paths.QUANTIZE_METRICS,
    headline=paths.QUANTIZE_HEADLINE,
)


def headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """reports/quantize/headline.json (DVC metrics) from the stage's full metrics document: the
    chosen candidate and the FP32 and INT8 file sizes in MB.

    Accuracy is left to evaluate's headline (the same splits, every model); `chosen` must stay:
    params.yaml `repro_check.choice` reads the pick from this file.
    """
    return {"chosen": metrics["chosen"],
            "fp32_size_mb": round(metrics["size_fp32_bytes"] / 1e6, 3),
            "int8_size_mb": round(metrics["size_int8_bytes"] / 1e6, 3)}


def _weights_tag(onnx_path: Path) -> dict[str, str]:
    """`weights_sha256` from the FP32 ONNX's metadata (export records its source weights)."""
    if not onnx_path.is_file():
        return {}  # quantize() itself then fails with the fix
    meta = onnx_metadata(onnx_path, "export")
    return {"weights_sha256": meta["source_weights_sha256"]} if meta.get("source_weights_sha256") else {}


def main(argv: list[str] | None = None) -> None:
    """Run the stage: candidates, gate, outputs, metrics, one MLflow run."""
    args = parse_args(argv)
    base, p = stage_params(args, "base", "quantize")
    calib_dir = args.calibration / p.calibration_set
    tags = {**lineage_tags(onnx=args.model, calibration=calib_dir, dataset=args.data),
            **_weights_tag(args.model)}
    with stage_run("quantize", base, p, tags=tags):
        outs = {"int8": args.int8, "trt": args.trt, "dynamic": args.dynamic, "candidates": args.candidates}
        r = quantize(args.model, calib_dir, args.data, outs, p, base, args.camera)
        metrics = {
            "chosen": r.chosen.name,
            "chosen_config": r.chosen.config,
            "fp32_mAP50-95": round(r.fp32_map50_95, 6),
            "int8_mAP50-95": round(r.chosen.map50_95, 6),
            "map_drop": round(r.chosen.drop, 6),
            **({"fp32_mAP50-95_camera": round(r.fp32_map50_95_camera, 6),
                "int8_mAP50-95_camera": round(r.chosen.map50_95_camera or 0.0, 6),
                "map_drop_camera": round(r.chosen.drop_camera or 0.0, 6)}
               if r.fp32_map50_95_camera is not None else {"camera_gate_skipped": r.camera_skipped}),
            **({"map_drop_ci95": [round(v, 6) for v in r.chosen.drop_ci]} if r.chosen.drop_ci else {}),
            **({"map_drop_camera_ci95": [round(v, 6) for v in r.chosen.drop_camera_ci]}
               if r.chosen.drop_camera_ci else {}),
            "size_fp32_bytes": r.fp32_size,
            "size_int8_bytes": r.chosen.size_bytes,
            "size_ratio": round(r.chosen.size_bytes / r.fp32_size, 4),
            "size_trt_bytes": r.trt_size,
            "size_dynamic_bytes": r.dynamic_size,
            "candidates_passed": sum(row.passed for row in r.rows),
            "candidates": len(r.rows),
        }
        # Latency is noisy by nature: it goes to MLflow and the CSV, not to the metrics files
        # (which must be reproducible), except as the chosen config's name.
        atomic_write_json(args.metrics, metrics)
        atomic_write_json(args.headline, headline(metrics))
        log_metrics({k: v for k, v in metrics.items() if not isinstance(v, str)})
        log_metrics({"speedup": r.chosen.speedup, "int8_latency_ms": r.chosen.latency_ms,
                     "fp32_latency_ms": r.fp32_latency_ms})
        set_tags({"model_sha256": sha256_file(args.int8), "chosen": r.chosen.name,
                  "calibration_set": p.calibration_set})
        set_tags(lineage_tags(int8=args.int8, trt_onnx=args.trt, dynamic=args.dynamic))
        log_artifact(args.candidates)
        # The models themselves, one folder each: a model-registry version (fab deploy) points at
        # a folder, and `mlflow artifacts download -u models:/edge-defect-detector@pis` fetches it.
        for folder, model in (("int8", args.int8), ("int8_trt", args.trt), ("dynamic", args.dynamic)):
            log_artifact(model, f"models/{folder}")
        print(f"quantize: chose {r.chosen.name} ({r.chosen.config}): {r.chosen.speedup:.2f}x FP32, "
              f"mAP50-95 drop {r.chosen.drop:+.4f}"
              + (f" (camera {r.chosen.drop_camera:+.4f})" if r.chosen.drop_camera is not None else "")
              + f", {r.chosen.size_bytes / r.fp32_size:.0%} of FP32 size", flush=True)


if __name__ == "__main__":
    sys.exit(run_stage(main))
