r"""FP32 vs our INT8 vs Ultralytics' INT8 ONNX export vs dynamic quantization, in one run.

For the default imgsz (export.imgsz) and 640: latency of each model measured interleaved
(models take turns in every round; median of per-round medians, spread = max - min of the
round medians), ratio vs FP32, mAP50-95 through the device pre/post processing on the val
split and on val+test (twice the images), and file size. For "ours vs Ultralytics INT8" and
"ours vs FP32" it also prints the mAP50-95 difference on val+test with a 95% paired-bootstrap
interval: an interval that contains 0 means the two are not distinguishable on these images.
All INT8 variants calibrate on the same frames: the camera calibration set's selected frames
(calibration/camera/manifest.json).

Run after `dvc repro` (it needs models/, calibration/ and data/):

    python benchmarks/quantization.py [--imgsz 256 640] [--rounds 7] [--runs 20] \
        [--out reports/benchmarks/quantization.md]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("YOLO_OFFLINE", "1")

from edge_runtime.fileio import atomic_write_text  # noqa: E402
from edge_runtime.preprocess import preprocess  # noqa: E402
from pipeline.accuracy.mean_ap import (  # noqa: E402
    accuracy_from_stats,
    decoder,
    image_stats,
    load_split,
    onnx_session,
    paired_bootstrap_map,
)
from pipeline.config import paths  # noqa: E402
from pipeline.config.params import BaseParams, ExportParams, QuantizeCandidate, QuantizeParams, load_params  # noqa: E402
from pipeline.config.ultralytics_env import import_ultralytics  # noqa: E402
from pipeline.onnx_models.calibration_sets import calibration_frame_paths, rebuild_calibration_tensors  # noqa: E402
from pipeline.onnx_models.int8_candidates import build_candidate, build_dynamic, interleaved_latency  # noqa: E402


def export_fp32(weights: Path, imgsz: int, opset: int, work: Path) -> Path:
    """FP32 ONNX at `imgsz` from the trained weights (Ultralytics, in `work`)."""
    yolo = import_ultralytics(work).YOLO
    local = work / f"fp32_{imgsz}.pt"
    shutil.copyfile(weights, local)
    return Path(yolo(str(local)).export(format="onnx", imgsz=imgsz, opset=opset, simplify=True, dynamic=False,
                                        batch=1, device="cpu"))


def export_ultralytics_int8(weights: Path, imgsz: int, opset: int, frames: list[Path], names: list[str],
                            work: Path) -> Path:
    """Ultralytics' own `export(format="onnx", int8=True)`, calibrated on the same frames."""
    yolo = import_ultralytics(work).YOLO
    calib = work / f"ucalib_{imgsz}"
    (calib / "images" / "val").mkdir(parents=True)
    for f in frames:
        shutil.copyfile(f, calib / "images" / "val" / f.name)
    (calib / "data.yaml").write_text(json.dumps({"path": str(calib), "train": "images/val", "val": "images/val",
                                                 "names": dict(enumerate(names))}))
    local = work / f"ultra_{imgsz}.pt"
    shutil.copyfile(weights, local)
    return Path(yolo(str(local)).export(format="onnx", int8=True, data=str(calib / "data.yaml"), imgsz=imgsz,
                                        opset=opset, simplify=True, dynamic=False, batch=1, device="cpu",
                                        fraction=1.0))


def prepare(imgsizes: list[int] | None) -> list[int]:
    """chdir to the repo, exit with the fix if the pipeline's outputs are missing, and return
    the sizes to measure (default: export.imgsz and 640)."""
    os.chdir(REPO)
    for need in (paths.WEIGHTS, paths.ONNX_MODEL, paths.INT8_MODEL, paths.QUANTIZE_METRICS):
        if not (REPO / need).is_file():
            sys.exit(f"{need} is missing: run `dvc repro` first")
    return imgsizes or [load_params("export", ExportParams).imgsz, 640]


def chosen_candidate() -> QuantizeCandidate:
    """The candidate the quantize stage picked (reports/quantize/metrics.json), from params."""
    quant_p = load_params("quantize", QuantizeParams)
    chosen_name = json.loads((REPO / paths.QUANTIZE_METRICS).read_text())["chosen"]
    return next(c for c in quant_p.candidates if c.name == chosen_name)


def pipeline_models(imgsz: int, work: Path) -> tuple[Path, Path, Path]:
    """FP32, our INT8 and the dynamic baseline at `imgsz`: the stage outputs at export.imgsz,
    else exported from the trained weights and quantized here with the chosen candidate and the
    same calibration frames (re-letterboxed to `imgsz`)."""
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if imgsz == load_params("export", ExportParams).imgsz:
        return REPO / paths.ONNX_MODEL, REPO / paths.INT8_MODEL, REPO / paths.DYNAMIC_MODEL
    quant_p = load_params("quantize", QuantizeParams)
    fp32 = export_fp32(REPO / paths.WEIGHTS, imgsz, load_params("export", ExportParams).opset, work)
    pre = work / f"fp32_{imgsz}.pre.onnx"
    quant_pre_process(str(fp32), str(pre))
    model = onnx.load(str(pre))
    model.metadata_props.extend(onnx.load(str(fp32)).metadata_props)
    calib = rebuild_calibration_tensors(REPO / paths.CALIBRATION_DIR / quant_p.calibration_set, imgsz)
    ours = work / f"ours_{imgsz}.onnx"
    ours.write_bytes(build_candidate(model, chosen_candidate(), calib, work))
    dynamic = work / f"dynamic_{imgsz}.onnx"
    dynamic.write_bytes(build_dynamic(pre, work))
    return fp32, ours, dynamic


def run(imgsizes: list[int], rounds: int, runs: int, eval_images: int, resamples: int
        ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Build every variant at every size, then measure; returns one row per (imgsz, model) and the
    paired-bootstrap comparisons."""
    base = load_params("base", BaseParams)
    export_p = load_params("export", ExportParams)
    quant_p = load_params("quantize", QuantizeParams)
    chosen = chosen_candidate()
    calib_dir = REPO / paths.CALIBRATION_DIR / quant_p.calibration_set
    frames = calibration_frame_paths(calib_dir)  # sha256-checked against the manifest
    dataset_names = yaml.safe_load((REPO / paths.DATASET_YAML).read_text())["names"]
    names = [dataset_names[i] for i in sorted(dataset_names)]
    val = load_split(REPO / paths.DATASET_DIR, "val", len(names), eval_images)
    items = val + load_split(REPO / paths.DATASET_DIR, "test", len(names), eval_images)
    rows, comparisons = [], []
    with tempfile.TemporaryDirectory(prefix="bench-quant-") as tmp:
        work = Path(tmp)
        for imgsz in imgsizes:
            fp32, ours, dynamic = pipeline_models(imgsz, work)
            ultra = export_ultralytics_int8(REPO / paths.WEIGHTS, imgsz, export_p.opset, frames, names, work)
            models = {"FP32": fp32, f"ours INT8 ({chosen.name})": ours, "Ultralytics INT8": ultra,
                      "ORT dynamic": dynamic}
            sessions = {k: onnx_session(v, base.threads) for k, v in models.items()}
            stats = {k: image_stats(s, items, names)[0] for k, s in sessions.items()}  # val first, then test
            accs = {k: accuracy_from_stats(st[: len(val)], names) for k, st in stats.items()}
            accs_all = {k: accuracy_from_stats(st, names) for k, st in stats.items()}
            ours_key = f"ours INT8 ({chosen.name})"
            for other in ("Ultralytics INT8", "FP32"):
                cmp = paired_bootstrap_map(stats[ours_key], stats[other], names, resamples, base.seed)
                comparisons.append({"imgsz": imgsz, "a": "ours INT8", "b": other, **cmp})
            inputs = [preprocess(it.image, imgsz)[0] for it in items[:8]]
            # Inference + the device's decode/NMS: a head-cut model pays for its decode there.
            decode = {k: decoder(s, len(names), quant_p.latency_conf, quant_p.latency_iou, quant_p.latency_max_det)
                      for k, s in sessions.items()}
            latency = interleaved_latency(sessions, inputs, warmup=10, runs=runs, rounds=rounds, decode=decode)
            fp32_ms = latency["FP32"][0]
            for k in models:
                ms, spread = latency[k]
                rows.append({"imgsz": imgsz, "model": k, "latency_ms": ms, "spread_ms": spread,
                             "speedup": fp32_ms / ms, "map50_95": accs[k].map50_95,
                             "drop": accs["FP32"].map50_95 - accs[k].map50_95,
                             "map50_95_all": accs_all[k].map50_95,
                             "drop_all": accs_all["FP32"].map50_95 - accs_all[k].map50_95,
                             "size_mb": models[k].stat().st_size / 1e6})
                print(f"  {imgsz:>4} {k:<40} {ms:7.2f} ms  {fp32_ms / ms:4.2f}x  mAP50-95 {accs[k].map50_95:.4f}",
                      flush=True)
    return rows, comparisons


def table(rows: list[dict[str, Any]], comparisons: list[dict[str, Any]], threads: int) -> str:
    """The result as markdown: the variants table, then the paired-bootstrap comparisons."""
    images = comparisons[0]["images"] if comparisons else 0
    lines = ["| imgsz | model | latency ms (median, spread) | vs FP32 | mAP50-95 val | drop val | "
             f"mAP50-95 val+test ({images} img) | drop val+test | size MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['imgsz']} | {r['model']} | {r['latency_ms']:.2f} (±{r['spread_ms'] / 2:.2f}) | "
                     f"{r['speedup']:.2f}x | {r['map50_95']:.4f} | {r['drop']:+.4f} | {r['map50_95_all']:.4f} | "
                     f"{r['drop_all']:+.4f} | {r['size_mb']:.2f} |")
    lines += ["", "| imgsz | mAP50-95 difference on val+test | value | 95% paired-bootstrap interval | resamples |",
              "|---|---|---|---|---|"]
    for c in comparisons:
        lines.append(f"| {c['imgsz']} | {c['a']} − {c['b']} | {c['diff']:+.4f} | "
                     f"[{c['ci_low']:+.4f}, {c['ci_high']:+.4f}] | {c['resamples']} |")
    lines.append(f"\nONNX Runtime CPU, {threads} threads, batch 1; latency = inference + decode/NMS; mAP through the "
                 "device pre/post processing (Ultralytics-compatible). An interval containing 0: not distinguishable "
                 "on these images.")
    return "\n".join(lines) + "\n"


def main() -> None:
    """Parse options, measure, print the table (and write it with --out)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--imgsz", type=int, nargs="+", default=None, help="default: export.imgsz and 640")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--eval-images", type=int, default=0, help="per split (val, test); 0 = all")
    ap.add_argument("--resamples", type=int, default=300, help="paired-bootstrap resamples")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    sizes = prepare(args.imgsz)
    rows, comparisons = run(sizes, args.rounds, args.runs, args.eval_images or None, args.resamples)
    text = table(rows, comparisons, load_params("base", BaseParams).threads)
    print("\n" + text)
    if args.out:
        atomic_write_text(args.out, text)


if __name__ == "__main__":
    main()
