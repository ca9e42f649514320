"""TensorRT on a real NVIDIA GPU: FP16, INT8 and FP32 engines through the device runtime, in one run.

    python benchmarks/tensorrt_gpu.py --out reports/tensorrt/gpu.json [--limit N] [--iterations 200]

Prepared so that GPU minutes go to running it, not to writing it (it has been dry-run end to end on
the `tests/runtime/trt_doubles.py` doubles of TensorRT 8.5, 10 and 11). Needs TensorRT's Python
bindings and pycuda on a machine with an NVIDIA GPU, and the pipeline's models:
``models/yolov8n.onnx`` (`dvc repro export`), ``models/yolov8n.fp16.onnx`` (export; needed where
TensorRT has no FP16 builder flag, i.e. 11), ``models/yolov8n.int8.trt.onnx`` (`dvc repro quantize`),
and the val split of ``data/defects``.

1. Engines: `edge_runtime.backends.TensorRTBackend` -- the device code, so the build is the
   feature-detected plan (`plan_build`: FP16 flag or strongly typed FP16 ONNX, INT8 from the QDQ
   model, EXPLICIT_BATCH on 8.x) and the engine cache is the device's.
2. Accuracy: each engine on the val split through an `edge_runtime.detector.Detector`'s backend,
   scored by `pipeline.accuracy.mean_ap` exactly as the evaluate stage scores ONNX Runtime
   (val-style multi-label NMS, COCO 101-point AP); the reference is ONNX Runtime FP32 on the CPU.
   Check: FP16 mAP50-95 within 0.005 of it. INT8's drop is reported.
3. Latency: `edge_runtime.latency.run_benchmark` (warm-up, then a steady window: P50/P95/P99 of the
   whole detection and of inference alone, FPS) on a val image, for the three engines and ONNX
   Runtime on the CPU (FP32, and the INT8 model where present).
4. Engine cache: every engine is loaded a second time and must be reused (same key, no build).

Writes the JSON document to --out and a Markdown table beside it (same name, ``.md``). Exit 0 when
every check passes, 1 when one fails, 2 when there is no GPU, TensorRT, pycuda, model or dataset
(one line on stderr says which and how to fix it).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from edge_runtime.backends import (  # noqa: E402
    Backend,
    BackendError,
    OrtBackend,
    TensorRTBackend,
    TensorRTUnavailable,
    gpu_name,
    import_tensorrt,
    tensorrt_features,
)
from edge_runtime.detector import Detector  # noqa: E402
from edge_runtime.fileio import atomic_write_json  # noqa: E402
from edge_runtime.latency import run_benchmark  # noqa: E402
from edge_runtime.manifest import OrtSettings  # noqa: E402
from edge_runtime.postprocess import FORMAT_RAW, spec_from_metadata  # noqa: E402
from edge_runtime.release import model_class_names  # noqa: E402
from pipeline.accuracy.mean_ap import Labelled, evaluate_session, load_split, onnx_session  # noqa: E402
from pipeline.config import paths  # noqa: E402

FP16_MAP_TOLERANCE = 0.005  # |mAP50-95(TensorRT FP16) - mAP50-95(ONNX Runtime FP32)| allowed
PRECISIONS = ("fp16", "int8", "fp32")  # build order: the engines the devices run first


class Unavailable(RuntimeError):
    """What this machine lacks to run the script (exit 2)."""


class BackendSession:
    """An ONNX Runtime session look-alike over a runtime backend, so `mean_ap.evaluate_session`
    scores a TensorRT engine with exactly the code the evaluate stage scores ONNX Runtime with."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def get_inputs(self) -> List[Any]:
        """One input, named as the engine's, with the engine's static shape."""
        return [SimpleNamespace(name="images", shape=list(self.backend.input_shape))]

    def get_modelmeta(self) -> Any:
        """The source ONNX's metadata (output format, names) as ORT's model meta offers it."""
        return SimpleNamespace(custom_metadata_map=self.backend.metadata)

    def run(self, output_names: Optional[Sequence[str]], feeds: Dict[str, Any]) -> List[Any]:
        """Infer the one input: the backend's outputs in order."""
        (batch,) = feeds.values()
        return self.backend.infer(batch)


def gpu_environment() -> Dict[str, Any]:
    """TensorRT, pycuda and GPU 0 as the backend will see them, or Unavailable naming the fix."""
    try:
        trt, cuda = import_tensorrt()
    except TensorRTUnavailable as e:
        raise Unavailable(f"{e}; this script needs an NVIDIA GPU machine with TensorRT") from e
    try:
        cuda.init()
        device = cuda.Device(0)
        name = gpu_name(device)
        capability = ".".join(str(v) for v in device.compute_capability())
    except Exception as e:  # pycuda.driver.Error & co: no driver, no device
        raise Unavailable(f"no usable NVIDIA GPU ({type(e).__name__}: {e}); run on a machine with an NVIDIA GPU "
                          "and driver (nvidia-smi must list it)") from e
    f = tensorrt_features(trt)
    return {"tensorrt": str(trt.__version__), "gpu": name, "compute_capability": capability,
            "features": {"fp16_flag": f.fp16_flag, "int8_flag": f.int8_flag, "implicit_batch": f.implicit_batch,
                         "strongly_typed_flag": f.strongly_typed_flag, "tensor_io": f.tensor_io}}


def _map(acc: Any) -> Dict[str, Any]:
    return {"mAP50-95": round(acc.map50_95, 6), "mAP50": round(acc.map50, 6), "precision": round(acc.precision, 6),
            "recall": round(acc.recall, 6), "images": acc.images}


def _latency(detector: Detector, image: Any, warmup: int, iterations: int) -> Dict[str, Any]:
    doc = run_benchmark(detector, image, warmup, iterations=iterations)
    return {"latency_ms": doc["latency_ms"], "infer_ms": doc["stages_ms"]["infer"], "fps": doc["fps"],
            "iterations": doc["iterations"]}


def _detector(backend: Backend, names: Sequence[str]) -> Detector:
    meta = backend.metadata
    shape = backend.input_shape
    spec = spec_from_metadata(meta, meta.get("output_format", FORMAT_RAW), len(names), int(shape[2]))
    return Detector(backend, spec, conf=0.25, iou=0.45, max_det=100)


def run_engine(precision: str, source: Path, fp16_onnx: Optional[Path], engines: Path, workspace_mb: int,
               items: List[Labelled], names: Sequence[str], warmup: int, iterations: int) -> Dict[str, Any]:
    """Build (or reuse) one engine, score it, time it, load it again; one row of the report."""
    t0 = time.perf_counter()
    backend = TensorRTBackend(source, engines, precision, workspace_mb, True, fp16_onnx)
    try:
        backend.load()
    except BackendError as e:
        return {"precision": precision, "error": str(e)}
    row: Dict[str, Any] = {"precision": precision, "first_load_s": round(time.perf_counter() - t0, 3)}
    try:
        row["engine"] = backend.describe()
        acc, ms = evaluate_session(BackendSession(backend), items, names)
        row["accuracy"] = _map(acc)
        row["eval_ms_per_image"] = round(ms, 3)
        row["latency"] = _latency(_detector(backend, names), items[0].image, warmup, iterations)
    finally:
        backend.close()
    t1 = time.perf_counter()
    again = TensorRTBackend(source, engines, precision, workspace_mb, True, fp16_onnx)
    again.load()
    row["second_load_s"] = round(time.perf_counter() - t1, 3)
    first, second = row["engine"], again.engine_result
    row["cache_reused"] = bool(second is not None and second.reused and second.key == first["engine_key"]
                               and second.sha256 == first["engine_sha256"])
    again.close()
    return row


def run_ort(model: Path, label: str, threads: int, items: List[Labelled], names: Sequence[str], warmup: int,
            iterations: int, score: bool) -> Dict[str, Any]:
    """ONNX Runtime on the CPU: the reference accuracy (FP32) and the latency to compare against."""
    row: Dict[str, Any] = {"precision": label, "model_file": model.name, "threads": threads}
    if score:
        acc, ms = evaluate_session(onnx_session(model, threads), items, names)
        row["accuracy"] = _map(acc)
        row["eval_ms_per_image"] = round(ms, 3)
    backend = OrtBackend(model, OrtSettings(threads=threads, graph_optimization="all"))
    backend.load()
    row["latency"] = _latency(_detector(backend, names), items[0].image, warmup, iterations)
    backend.close()
    return row


def checks(doc: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The pass/fail checks over a finished document."""
    ref = doc["onnxruntime"]["fp32"].get("accuracy", {}).get("mAP50-95")
    engines = doc["tensorrt"]["engines"]
    out = []
    fp16 = engines.get("fp16", {})
    fp16_map = fp16.get("accuracy", {}).get("mAP50-95")
    if fp16_map is None or ref is None:
        out.append({"check": "fp16_map_within_tolerance", "ok": False,
                    "detail": fp16.get("error", "no FP16 accuracy measured")})
    else:
        delta = fp16_map - ref
        out.append({"check": "fp16_map_within_tolerance", "ok": abs(delta) <= FP16_MAP_TOLERANCE,
                    "detail": f"FP16 {fp16_map:.4f} vs ONNX Runtime FP32 {ref:.4f}: {delta:+.4f} "
                              f"(allowed +-{FP16_MAP_TOLERANCE})"})
    for precision in PRECISIONS:
        row = engines.get(precision, {})
        if "error" in row:
            out.append({"check": f"{precision}_engine_built", "ok": False, "detail": row["error"]})
        elif row:
            out.append({"check": f"{precision}_engine_cache_reused", "ok": row["cache_reused"],
                        "detail": f"first load {row['first_load_s']} s, second {row['second_load_s']} s"})
    return out


def _cell(value: Any, fmt: str = "{}") -> str:
    return "–" if value is None else fmt.format(value)


def markdown(doc: Dict[str, Any]) -> str:
    """The human-readable table: accuracy, latency, build and cache per engine, then the checks."""
    env = doc["environment"]
    ref = doc["onnxruntime"]["fp32"].get("accuracy", {}).get("mAP50-95")
    lines = [f"# TensorRT {env['tensorrt']} on {env['gpu']} (sm {env['compute_capability']})", "",
             f"Val split: {doc['dataset']['images']} images of {doc['dataset']['path']}; latency: "
             f"{doc['config']['iterations']} detections after {doc['config']['warmup']} warm-up, on one val image.",
             "", "| runtime | precision | build | mAP50-95 | Δ vs ORT FP32 | P50 ms | P95 ms | infer P50 ms | FPS "
             "| first load s | reused on 2nd load |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = [("TensorRT", r) for r in doc["tensorrt"]["engines"].values()]
    rows += [("ONNX Runtime CPU", r) for r in doc["onnxruntime"].values()]
    for runtime, r in rows:
        if "error" in r:
            lines.append(f"| {runtime} | {r['precision']} | error: {r['error']} | | | | | | | | |")
            continue
        build = r.get("engine", {}).get("engine_build")
        build_s = (f"{build['typing']}ly typed, {build['onnx_file']}, "
                   f"{'+'.join(build['network_flags'] + build['builder_flags']) or 'no flags'}") if build else \
            f"{r.get('model_file')}, {r.get('threads')} threads"
        m = r.get("accuracy", {}).get("mAP50-95")
        delta = None if m is None or ref is None else m - ref
        lat = r["latency"]
        lines.append(f"| {runtime} | {r['precision']} | {build_s} | {_cell(m, '{:.4f}')} | {_cell(delta, '{:+.4f}')} "
                     f"| {_cell(lat['latency_ms']['p50'])} | {_cell(lat['latency_ms']['p95'])} "
                     f"| {_cell(lat['infer_ms']['p50'])} | {_cell(lat['fps'])} | {_cell(r.get('first_load_s'))} "
                     f"| {_cell(r.get('cache_reused'))} |")
    lines += ["", "| check | ok | detail |", "|---|---|---|"]
    lines += [f"| {c['check']} | {'yes' if c['ok'] else '**NO**'} | {c['detail']} |" for c in doc["checks"]]
    return "\n".join(lines) + "\n"


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="JSON document (a .md table is written beside it)")
    p.add_argument("--fp32", type=Path, default=REPO / paths.ONNX_MODEL)
    p.add_argument("--fp16", type=Path, default=REPO / paths.FP16_MODEL,
                   help="FP16 ONNX (used where TensorRT has no FP16 builder flag)")
    p.add_argument("--int8-trt", type=Path, default=REPO / paths.INT8_TRT_MODEL, help="symmetric-QDQ ONNX")
    p.add_argument("--int8-ort", type=Path, default=REPO / paths.INT8_MODEL, help="CPU INT8 model (latency only)")
    p.add_argument("--dataset", type=Path, default=REPO / paths.DATASET_DIR)
    p.add_argument("--split", default="val")
    p.add_argument("--limit", type=int, default=None, help="first N images of the split (default: all)")
    p.add_argument("--engines", type=Path, default=None, help="engine cache (default: <out folder>/engines)")
    p.add_argument("--workspace-mb", type=int, default=4096)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--iterations", type=int, default=200)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 4, help="ONNX Runtime CPU threads")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run everything; exit 0 (all checks pass), 1 (a check failed), 2 (this machine cannot run it)."""
    args = parse_args(argv)
    try:
        env = gpu_environment()
        if not args.fp32.is_file():
            raise Unavailable(f"{args.fp32} not found; run `dvc repro export` (or pass --fp32)")
        if not (args.dataset / "images" / args.split).is_dir():
            raise Unavailable(f"{args.dataset}/images/{args.split} not found; run `dvc repro data` (or pass --dataset)")
    except Unavailable as e:
        sys.stderr.write(f"tensorrt_gpu: {e}\n")
        return 2
    names = model_class_names(args.fp32)
    items = load_split(args.dataset, args.split, len(names), args.limit)
    engines_dir = args.engines or args.out.parent / "engines"
    fp16 = args.fp16 if args.fp16.is_file() else None
    int8 = args.int8_trt if args.int8_trt.is_file() else None
    print(f"tensorrt_gpu: TensorRT {env['tensorrt']} on {env['gpu']}; {len(items)} {args.split} images", flush=True)

    engines: Dict[str, Dict[str, Any]] = {}
    for precision in PRECISIONS:
        if precision == "int8" and int8 is None:
            engines[precision] = {"precision": precision, "error": f"{args.int8_trt} not found; run `dvc repro "
                                                                   "quantize`"}
            continue
        source = int8 if precision == "int8" and int8 is not None else args.fp32
        engines[precision] = run_engine(precision, source, fp16, engines_dir, args.workspace_mb, items, names,
                                        args.warmup, args.iterations)
        print(f"tensorrt_gpu: {precision}: " + (engines[precision].get("error") or
              f"mAP50-95 {engines[precision]['accuracy']['mAP50-95']:.4f}, "
              f"P50 {engines[precision]['latency']['latency_ms']['p50']} ms"), flush=True)
    ort_rows = {"fp32": run_ort(args.fp32, "fp32", args.threads, items, names, args.warmup, args.iterations, True)}
    if args.int8_ort.is_file():
        ort_rows["int8"] = run_ort(args.int8_ort, "int8", args.threads, items, names, args.warmup, args.iterations,
                                   True)
    ref = ort_rows["fp32"]["accuracy"]["mAP50-95"]
    for row in engines.values():
        if "accuracy" in row:
            row["map_drop_vs_ort_fp32"] = round(ref - row["accuracy"]["mAP50-95"], 6)
    doc: Dict[str, Any] = {
        "schema": 1,
        "environment": env,
        "config": {"warmup": args.warmup, "iterations": args.iterations, "workspace_mb": args.workspace_mb,
                   "fp16_map_tolerance": FP16_MAP_TOLERANCE, "engines_dir": str(engines_dir)},
        "dataset": {"path": str(args.dataset), "split": args.split, "images": len(items)},
        "models": {"fp32": args.fp32.name, "fp16": fp16.name if fp16 else None,
                   "int8_trt": int8.name if int8 else None},
        "tensorrt": {"engines": engines},
        "onnxruntime": ort_rows,
    }
    int8_row = engines.get("int8", {})
    doc["int8_drop"] = int8_row.get("map_drop_vs_ort_fp32")
    doc["checks"] = checks(doc)
    doc["ok"] = all(c["ok"] for c in doc["checks"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, doc)
    md = args.out.with_suffix(".md")
    md.write_text(markdown(doc))
    print(md.read_text(), flush=True)
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
