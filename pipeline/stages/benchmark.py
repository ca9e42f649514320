"""Stage `benchmark` (host): latency, FPS, memory and size of each model variant at each imgsz.

For every size in `benchmark.imgsz` and every variant in `benchmark.variants` (fp32, int8 =
the quantize stage's chosen candidate, dynamic = the dynamic-quantization baseline):

- the models: at the exported size, the stage outputs in models/; at any other size the FP32
  model is exported from models/yolov8n.pt with Ultralytics (in a temp folder), the INT8 model is
  built with the chosen candidate's configuration (named in the INT8 model's metadata) from
  calibration tensors re-made at that size from the calibration manifest's frames, and the
  dynamic baseline is built from that FP32 model;
- latency: the device runtime's own detection path (`edge_runtime` OrtBackend + Detector:
  preprocess, infer, postprocess with a release's thresholds) on real camera frames; warm-up,
  then `rounds` rounds in which the variants take turns for `runs` timed detections each (order
  rotated every round), so a noisy neighbour or a clock change hits all variants alike;
  P50/P95/P99 over all timed runs, FPS = 1000 / mean ms (one stream, one frame at a time);
- peak RSS: each variant loaded and run alone in a fresh subprocess (device code only), so the
  number is that model's, not the sum of everything this process loaded.

Outputs: reports/benchmark/results.json (+ results.csv, and latency_samples.csv: every timed
detection, for the report's latency distribution) and headline.json (the DVC metrics: FP32 and
INT8 P50 and the speed-up at the stage models' size). Latency numbers differ run to run: this
stage is not bit-reproducible (docs/reproducibility.md).
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edge_runtime.backends import OrtBackend
from edge_runtime.detector import Detector
from edge_runtime.fileio import atomic_write_json, atomic_write_text, sha256_file
from edge_runtime.latency import percentiles
from edge_runtime.manifest import OrtSettings
from edge_runtime.postprocess import FORMAT_RAW, spec_from_metadata
from edge_runtime.sysinfo import describe_device
from pipeline.config import paths
from pipeline.config.params import BaseParams, BenchmarkParams, ExportParams, QuantizeParams
from pipeline.config.stage_cli import run_stage, stage_cli, stage_params
from pipeline.imagesets.yolo import decode_image
from pipeline.onnx_models.calibration_sets import calibration_frame_paths, rebuild_calibration_tensors
from pipeline.onnx_models.load import class_names, input_size, load_onnx, onnx_metadata
from pipeline.tracking.mlflow_runs import lineage_tags, log_metrics, set_tags, stage_run

SCHEMA = 1

# Runs in a fresh interpreter with only the device runtime imported: loads one model, runs it,
# prints its peak RSS. Baseline = peak before the model was loaded (interpreter + numpy + ORT).
# VmHWM, not getrusage: Linux carries ru_maxrss across fork+exec, so a child of this (large)
# process would report the parent's peak; VmHWM belongs to the new address space only.
_RSS_PROBE = """
import json, sys
import numpy as np
import onnxruntime  # noqa: F401  (counted in the baseline, as on a device)
from edge_runtime.backends import OrtBackend
from edge_runtime.manifest import OrtSettings


def hwm_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024.0, 1)
    raise RuntimeError("no VmHWM in /proc/self/status")


model, threads, runs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
baseline = hwm_mb()
backend = OrtBackend(model, OrtSettings(threads=threads))
backend.load()
x = np.zeros(tuple(backend.input_shape), np.float32)
for _ in range(runs):
    backend.infer(x)
print(json.dumps({"baseline_rss_mb": baseline, "peak_rss_mb": hwm_mb()}))
"""

@dataclass(frozen=True)
class BenchmarkInputs:
    """Every file the stage reads (the CLI's paths)."""

    weights: Path
    fp32: Path
    int8: Path
    dynamic: Path
    calibration: Path  # folder holding calibration/<set>/


@dataclass
class Timings:
    """Seconds per timed detection (whole path and inference only) and each round's median."""

    total: list[float]
    infer: list[float]
    round_medians: list[float]


# ------------------------------------------------------------------------------------------
# Models at each size
# ------------------------------------------------------------------------------------------


def model_imgsz(path: Path) -> int:
    """The square input size of an ONNX model (its static input shape)."""
    return input_size(load_onnx(path, "export", weights=False), path)


def export_fp32(weights: Path, imgsz: int, export: ExportParams, work: Path) -> Path:
    """Export `weights` to a raw FP32 ONNX at `imgsz` with Ultralytics (same settings as stage export)."""
    import onnx

    from pipeline.config.ultralytics_env import VOLATILE_ONNX_METADATA, import_ultralytics
    from pipeline.onnx_models.graph import set_metadata

    ultralytics = import_ultralytics(work)
    local = work / f"fp32-{imgsz}.pt"
    shutil.copyfile(weights, local)  # Ultralytics writes the .onnx beside the .pt
    produced = Path(ultralytics.YOLO(str(local)).export(
        format="onnx", imgsz=imgsz, opset=export.opset, simplify=export.simplify, dynamic=False, batch=1,
        half=False, device="cpu"))
    model = onnx.load(str(produced))
    kept = [p for p in model.metadata_props if p.key not in VOLATILE_ONNX_METADATA]  # same weights, same bytes
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    set_metadata(model, {"output_format": FORMAT_RAW, "source_weights_sha256": sha256_file(weights)})
    out = work / f"yolov8n-{imgsz}.onnx"
    onnx.save(model, str(out))
    return out


def models_at(imgsz: int, inputs: BenchmarkInputs, variants: Sequence[str], q: QuantizeParams,
              export: ExportParams, work: Path) -> dict[str, Path]:
    """variant -> ONNX file at `imgsz`: the stage outputs at their own size, built in `work` otherwise."""
    stage_models = {"fp32": inputs.fp32, "int8": inputs.int8, "dynamic": inputs.dynamic}
    if imgsz == model_imgsz(inputs.fp32):
        return {v: stage_models[v] for v in variants}
    from pipeline.onnx_models.int8_candidates import (
        PREPROCESSED_NAME,
        build_candidate,
        build_dynamic,
        preprocessed_fp32,
    )

    if not inputs.weights.is_file():
        raise ValueError(f"{inputs.weights} not found; run the train stage first (dvc repro train)")
    sub = work / str(imgsz)
    sub.mkdir()
    fp32_path = export_fp32(inputs.weights, imgsz, export, sub)
    out: dict[str, Path] = {"fp32": fp32_path}
    if "int8" in variants or "dynamic" in variants:
        fp32 = preprocessed_fp32(fp32_path, sub)
        pre = sub / PREPROCESSED_NAME
        if "int8" in variants:
            chosen = onnx_metadata(inputs.int8, "quantize").get("quantization_candidate")
            if chosen is None:
                raise ValueError(f"{inputs.int8} has no 'quantization_candidate' metadata; re-run the quantize stage")
            candidate = q.candidate(chosen)
            calib = rebuild_calibration_tensors(inputs.calibration / q.calibration_set, imgsz)
            out["int8"] = sub / f"yolov8n-{imgsz}.int8.onnx"
            out["int8"].write_bytes(build_candidate(fp32, candidate, calib, sub))
            print(f"benchmark: built {candidate.name} at imgsz {imgsz} from {len(calib)} calibration frames",
                  flush=True)
        if "dynamic" in variants:
            out["dynamic"] = sub / f"yolov8n-{imgsz}.dynamic.onnx"
            out["dynamic"].write_bytes(build_dynamic(pre, sub))
    return {v: out[v] for v in variants}


# ------------------------------------------------------------------------------------------
# Measuring
# ------------------------------------------------------------------------------------------


def make_detector(model: Path, imgsz: int, num_classes: int, threads: int, p: BenchmarkParams) -> Detector:
    """The device runtime's detector for one model file (ORT backend, IO binding, release thresholds)."""
    backend = OrtBackend(model, OrtSettings(threads=threads))
    backend.load()
    meta = backend.metadata
    spec = spec_from_metadata(meta, meta.get("output_format", FORMAT_RAW), num_classes, imgsz)
    return Detector(backend, spec, p.conf, p.iou, p.max_det)


def interleaved_detections(detectors: dict[str, Detector], frames: Sequence[np.ndarray], warmup: int, runs: int,
                           rounds: int) -> dict[str, Timings]:
    """Time `runs` detections per variant per round, variants taking turns (first one rotates each round)."""
    if not frames:
        raise ValueError("no frames to benchmark on; the calibration set is empty")
    names = list(detectors)
    for n in names:
        for i in range(warmup):
            detectors[n].detect(frames[i % len(frames)])
    out = {n: Timings([], [], []) for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[: r % len(names)]:
            this_round = []
            for i in range(runs):
                _, t = detectors[n].detect(frames[i % len(frames)])
                out[n].total.append(t.total)
                out[n].infer.append(t.infer)
                this_round.append(t.total)
            out[n].round_medians.append(statistics.median(this_round))
    return out


def peak_rss(model: Path, threads: int, runs: int) -> dict[str, float]:
    """Peak RSS (MiB) of a fresh process that loads and runs only `model`, and its pre-model baseline."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(paths.repo_root()), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _RSS_PROBE, str(model.resolve()), str(threads), str(runs)],
                          capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"the memory probe for {model} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def benchmark(inputs: BenchmarkInputs, p: BenchmarkParams, q: QuantizeParams, export: ExportParams,
              base: BaseParams) -> dict[str, Any]:
    """Measure every variant at every size; returns the results.json document."""
    names = class_names(onnx_metadata(inputs.fp32, "export"), inputs.fp32, "export")
    if not names:
        raise ValueError(f"{inputs.fp32} has no 'names' metadata; re-export it with pipeline.stages.export")
    for v, path, stage in (("int8", inputs.int8, "quantize"), ("dynamic", inputs.dynamic, "quantize")):
        if v in p.variants:
            onnx_metadata(path, stage)  # missing or corrupt: fail before minutes of exporting
    frame_paths = calibration_frame_paths(inputs.calibration / q.calibration_set)[: p.frames]
    frames = [decode_image(f) for f in frame_paths]
    results: dict[str, dict[str, Any]] = {}
    samples: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="benchmark-") as tmp:
        work = Path(tmp)
        for imgsz in p.imgsz:
            t0 = time.monotonic()
            models = models_at(imgsz, inputs, p.variants, q, export, work)
            detectors = {v: make_detector(m, imgsz, len(names), base.threads, p) for v, m in models.items()}
            timings = interleaved_detections(detectors, frames, p.warmup, p.runs, p.rounds)
            row: dict[str, Any] = {}
            samples[str(imgsz)] = {v: [round(s * 1000.0, 4) for s in timings[v].total] for v in models}
            for v, model in models.items():
                t = timings[v]
                described = detectors[v].backend.describe()
                rss = peak_rss(model, base.threads, p.warmup + p.runs)
                lat = percentiles(t.total)
                row[v] = {
                    "model": model.as_posix() if model in (inputs.fp32, inputs.int8, inputs.dynamic)
                    else f"built for this run from {inputs.weights.as_posix()}",
                    "model_sha256": described["model_sha256"],
                    "quantization": detectors[v].backend.metadata.get("quantization", "none (FP32)"),
                    "size_bytes": model.stat().st_size,
                    "threads": described["threads"],
                    "providers": described["providers"],
                    "iterations": len(t.total),
                    "latency_ms": lat,
                    "infer_ms": percentiles(t.infer),
                    "round_p50_spread_ms": round((max(t.round_medians) - min(t.round_medians)) * 1000, 3),
                    "fps": round(len(t.total) / sum(t.total), 2),
                    "peak_rss_mb": rss["peak_rss_mb"],
                    "model_rss_mb": round(rss["peak_rss_mb"] - rss["baseline_rss_mb"], 1),
                }
                detectors[v].backend.close()
            if "fp32" in row:
                for v in row:
                    fp32_p50 = row["fp32"]["latency_ms"]["p50"]
                    row[v]["speedup_p50_vs_fp32"] = round(fp32_p50 / row[v]["latency_ms"]["p50"], 3)
                    row[v]["size_vs_fp32"] = round(row[v]["size_bytes"] / row["fp32"]["size_bytes"], 4)
            results[str(imgsz)] = row
            print(f"benchmark: imgsz {imgsz} ({time.monotonic() - t0:.0f}s): " + ", ".join(
                f"{v} p50 {r['latency_ms']['p50']:.2f} ms" for v, r in row.items()), flush=True)
    return {
        "schema": SCHEMA,
        "kind": "host-benchmark",
        "config": {"warmup": p.warmup, "runs": p.runs, "rounds": p.rounds, "frames": len(frames),
                   "frames_from": (inputs.calibration / q.calibration_set).as_posix(), "conf": p.conf, "iou": p.iou,
                   "max_det": p.max_det, "threads": base.threads,
                   "timed": "whole detection: device preprocess + ORT + postprocess (infer_ms: ORT only)"},
        "device": describe_device(probe_tensorrt=False),
        "results": results,
        # Every timed detection in ms: the latency distribution (the report's CDF). main() writes
        # it to its own CSV and keeps it out of results.json, which the repro check compares key by key.
        "samples_ms": samples,
    }


def results_csv(doc: dict[str, Any]) -> str:
    """reports/benchmark/results.csv: one row per imgsz and variant."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["imgsz", "variant", "p50_ms", "p95_ms", "p99_ms", "mean_ms", "infer_p50_ms", "fps",
                "speedup_p50_vs_fp32", "peak_rss_mb", "model_rss_mb", "size_mb", "threads"])
    for imgsz, row in doc["results"].items():
        for v, r in row.items():
            lat = r["latency_ms"]
            w.writerow([imgsz, v, lat["p50"], lat["p95"], lat["p99"], lat["mean"], r["infer_ms"]["p50"], r["fps"],
                        r.get("speedup_p50_vs_fp32", ""), r["peak_rss_mb"], r["model_rss_mb"],
                        f"{r['size_bytes'] / 1e6:.3f}", r["threads"]])
    return buf.getvalue()


def samples_csv(samples: dict[str, dict[str, list[float]]]) -> str:
    """reports/benchmark/latency_samples.csv: one row per timed detection (imgsz, variant, run, ms)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["imgsz", "variant", "run", "latency_ms"])
    for imgsz, per_variant in samples.items():
        for v, values in per_variant.items():
            w.writerows([imgsz, v, i, ms] for i, ms in enumerate(values))
    return buf.getvalue()


def headline(doc: dict[str, Any], imgsz: int) -> dict[str, float]:
    """reports/benchmark/headline.json (DVC metrics): FP32 and INT8 P50 latency (ms) and INT8's P50
    speed-up over FP32, at `imgsz` (the stage models' own size; the first size measured when
    `benchmark.imgsz` does not include it). Every other size and statistic stays in results.json.
    """
    results = doc["results"]
    row = results.get(str(imgsz)) or next(iter(results.values()), {})
    out = {f"{v}_p50_ms": row[v]["latency_ms"]["p50"] for v in ("fp32", "int8") if v in row}
    if "speedup_p50_vs_fp32" in row.get("int8", {}):
        out["int8_speedup"] = row["int8"]["speedup_p50_vs_fp32"]
    return out


def mlflow_metrics(doc: dict[str, Any]) -> dict[str, float]:
    """Flat `<variant>_<imgsz>.<metric>` keys for MLflow."""
    out: dict[str, float] = {}
    for imgsz, row in doc["results"].items():
        for v, r in row.items():
            key = f"{v}_{imgsz}"
            out.update({f"{key}.p50_ms": r["latency_ms"]["p50"], f"{key}.p95_ms": r["latency_ms"]["p95"],
                        f"{key}.p99_ms": r["latency_ms"]["p99"], f"{key}.fps": r["fps"],
                        f"{key}.peak_rss_mb": r["peak_rss_mb"], f"{key}.size_bytes": r["size_bytes"]})
            if "speedup_p50_vs_fp32" in r:
                out[f"{key}.speedup_p50_vs_fp32"] = r["speedup_p50_vs_fp32"]
    return out


parse_args = stage_cli(
    "benchmark", __doc__,
    weights=paths.WEIGHTS,
    model=paths.ONNX_MODEL,
    int8=paths.INT8_MODEL,
    dynamic=paths.DYNAMIC_MODEL,
    calibration=paths.CALIBRATION_DIR,
    results=paths.BENCHMARK_RESULTS,
    csv=paths.BENCHMARK_CSV,
    samples=paths.BENCHMARK_SAMPLES,
    headline=paths.BENCHMARK_HEADLINE,
)


def main(argv: list[str] | None = None) -> None:
    """Run the stage: build/measure every variant at every size, write results JSON + CSV, one MLflow run."""
    args = parse_args(argv)
    base, p, q, export = stage_params(args, "base", "benchmark", "quantize", "export")
    inputs = BenchmarkInputs(args.weights, args.model, args.int8, args.dynamic, args.calibration)
    tags = lineage_tags(weights=args.weights, onnx=args.model, int8=args.int8, dynamic=args.dynamic)
    with stage_run("benchmark", base, p, q, export, tags=tags):
        doc = benchmark(inputs, p, q, export, base)
        atomic_write_text(args.samples, samples_csv(doc.pop("samples_ms")))
        atomic_write_json(args.results, doc)
        atomic_write_json(args.headline, headline(doc, model_imgsz(args.model)))
        atomic_write_text(args.csv, results_csv(doc))
        log_metrics(mlflow_metrics(doc))
        tags = {f"model_sha256.{v}": r["model_sha256"] for v, r in next(iter(doc["results"].values())).items()}
        set_tags(tags)


if __name__ == "__main__":
    sys.exit(run_stage(main))
