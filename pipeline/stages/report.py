"""Stage `report`: the page people look at, and the MLflow summary run that compares variants.

Reads what the other stages measured (quantize, evaluate, benchmark) and, when present, the
latest on-device benchmark of every host that `fab deploy`/`fab benchmark` brought back to
reports/fleet/<host>/, and writes:

- reports/report.md with PNG plots in reports/plots/: accuracy vs latency per variant (and per
  device), the latency distribution per variant, per-class AP FP32 vs INT8, and the thermal
  timeline of soak benchmarks;
- reports/report/*.csv: the same data, declared as `dvc plots` (so `dvc plots show|diff` work),
  and reports/report/summary.json, the headline numbers per variant and device, which the end of
  the run (and of `make run`, `print_headline`) prints as a table;
- one MLflow summary run (stage `report`) with the headline metrics side by side, plus one nested
  run per variant and per device carrying the SAME metric names (mAP50-95_val, p50_ms, p95_ms,
  fps, size_mb...), so selecting them in the MLflow compare view answers "which variant wins".

Latency figures are measurements, so this stage is not bit-reproducible
(docs/reproducibility.md).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from edge_runtime.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text, sha256_file
from pipeline.config import paths
from pipeline.config.params import QuantizeParams, ReportParams
from pipeline.config.stage_cli import run_stage, stage_cli, stage_params
from pipeline.fleet.results import bench_metrics
from pipeline.tracking.mlflow_runs import lineage_tags, log_artifact, log_metrics, set_tags, stage_run, tracking_uri

VARIANTS = ("fp32", "int8", "dynamic")  # the ONNX variants the benchmark stage measures
VARIANT_LABELS = {"pytorch": "PyTorch (reference)", "fp32": "FP32 ONNX", "int8": "INT8 ONNX (chosen)",
                  "dynamic": "INT8 dynamic (baseline)"}


class ReportError(ValueError):
    """An input of the report is missing or malformed; the message says which stage to re-run."""


@dataclass(frozen=True)
class ReportInputs:
    """The files the report reads (defaults: the repository layout in paths.py)."""

    quantize_metrics: Path
    candidates: Path
    evaluate_metrics: Path
    per_class: Path
    bench_results: Path
    bench_samples: Path
    fleet_dir: Path
    models: Mapping[str, Path]  # fp32 / int8 / trt_onnx / dynamic: device results are matched by sha256


@dataclass
class Report:
    """Everything the stage writes, computed (no I/O) by `build_report`."""

    imgsz: str
    winner: str
    variants: list[dict[str, Any]]
    devices: list[dict[str, Any]]
    thermal: list[dict[str, Any]]
    shadows: list[dict[str, Any]]
    quantiles: dict[str, list[float]]
    per_class: dict[str, dict[str, float]]
    candidates: list[dict[str, str]]
    summary: dict[str, float | str]
    model_shas: dict[str, str] = field(default_factory=dict)


def read_json(path: Path, stage: str) -> dict[str, Any]:
    """A stage's JSON output, or a ReportError naming the stage to run."""
    if not path.is_file():
        raise ReportError(f"{path} is missing; run `dvc repro {stage}` first")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ReportError(f"{path} is not valid JSON ({e}); run `dvc repro -f {stage}` to rewrite it") from e
    if not isinstance(doc, dict):
        raise ReportError(f"{path}: expected a JSON object; run `dvc repro -f {stage}`")
    return doc


def read_csv(path: Path, stage: str) -> list[dict[str, str]]:
    """A stage's CSV output as rows of strings, or a ReportError naming the stage to run."""
    if not path.is_file():
        raise ReportError(f"{path} is missing; run `dvc repro {stage}` first")
    return list(csv.DictReader(io.StringIO(path.read_text())))


def headline_imgsz(bench: Mapping[str, Any]) -> str:
    """The benchmark size measured with the stage models themselves (the others are built in-run)."""
    results = bench.get("results") or {}
    for imgsz, row in results.items():
        if any(isinstance(r, Mapping) and str(r.get("model", "")).endswith(".onnx") for r in row.values()):
            return str(imgsz)
    if not results:
        raise ReportError("reports/benchmark/results.json has no results; run `dvc repro -f benchmark`")
    return str(next(iter(results)))


def variant_rows(evaluate: Mapping[str, Any], bench: Mapping[str, Any], imgsz: str) -> list[dict[str, Any]]:
    """One row per model: accuracy on both splits, drop vs FP32, latency at `imgsz`, size."""
    rows = []
    timed = (bench.get("results") or {}).get(imgsz, {})
    for v in ("pytorch",) + VARIANTS:
        if v not in evaluate.get("val", {}):
            continue
        row: dict[str, Any] = {"variant": v, "label": VARIANT_LABELS[v]}
        for split in ("val", "camera"):
            m = (evaluate.get(split) or {}).get(v)
            if isinstance(m, Mapping):
                row[f"mAP50-95_{split}"] = m.get("mAP50-95")
                row[f"mAP50_{split}"] = m.get("mAP50")
                row[f"drop_{split}"] = m.get("drop_vs_fp32")
        b = timed.get(v)
        if isinstance(b, Mapping):
            row.update(p50_ms=b["latency_ms"]["p50"], p95_ms=b["latency_ms"]["p95"], p99_ms=b["latency_ms"]["p99"],
                       fps=b["fps"], speedup_p50=b.get("speedup_p50_vs_fp32"), size_mb=round(b["size_bytes"] / 1e6, 3),
                       peak_rss_mb=b["peak_rss_mb"], model_sha256=b["model_sha256"])
        rows.append(row)
    return rows


def choose_winner(rows: Sequence[Mapping[str, Any]], split: str, max_drop: float) -> str:
    """The fastest ONNX variant whose mAP50-95 drop on `split` is within the accuracy gate."""
    eligible = [r for r in rows if r["variant"] in VARIANTS and r.get("p50_ms") is not None
                and r.get(f"drop_{split}") is not None and r[f"drop_{split}"] <= max_drop]
    return min(eligible, key=lambda r: r["p50_ms"])["variant"] if eligible else ""


def latency_quantiles(samples: Sequence[Mapping[str, str]], imgsz: str, points: int) -> dict[str, list[float]]:
    """Per variant, the latency (ms) at `points` evenly spaced percentiles (an inverse CDF)."""
    by_variant: dict[str, list[float]] = {}
    for s in samples:
        if s["imgsz"] == imgsz:
            by_variant.setdefault(s["variant"], []).append(float(s["latency_ms"]))
    qs = np.linspace(0.0, 100.0, points)
    return {v: [round(float(x), 4) for x in np.percentile(np.asarray(vals), qs)] for v, vals in by_variant.items()}


def per_class_ap(rows: Sequence[Mapping[str, str]], split: str) -> dict[str, dict[str, float]]:
    """{model: {class: AP50-95}} for one split, from evaluate's per_class.csv."""
    out: dict[str, dict[str, float]] = {}
    for r in rows:
        if r["split"] == split:
            out.setdefault(r["model"], {})[r["class"]] = float(r["AP50-95"])
    return out


def latest_fleet_docs(fleet_dir: Path, kind: str) -> list[dict[str, Any]]:
    """The newest JSON document of `kind` (device-benchmark, shadow) of each host under
    reports/fleet/<host>/ (by created_utc, then file name)."""
    latest: dict[str, tuple[str, dict[str, Any]]] = {}
    if not fleet_dir.is_dir():
        return []
    for path in sorted(fleet_dir.glob("*/*.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ReportError(f"{path}: unreadable device result ({e}); delete it or re-run "
                              f"`fab benchmark --host {path.parent.name}`") from e
        if not isinstance(doc, dict) or doc.get("kind") != kind:
            continue
        key = (str(doc.get("created_utc", "")), path.name)
        host = path.parent.name
        if host not in latest or key > (latest[host][0], latest[host][1]["_file"]):
            latest[host] = (key[0], {**doc, "_file": path.name, "_host": host})
    return [doc for _, (_, doc) in sorted(latest.items())]


def latest_device_results(fleet_dir: Path) -> list[dict[str, Any]]:
    """The newest on-device benchmark JSON of each host under reports/fleet/<host>/ (by created_utc)."""
    return latest_fleet_docs(fleet_dir, "device-benchmark")


def shadow_rows(docs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per host: its latest shadow run (`fab shadow`, a canary), candidate vs current."""
    rows = []
    for doc in docs:
        res = doc.get("result") if isinstance(doc.get("result"), Mapping) else {}
        agreement = res.get("agreement") if isinstance(res.get("agreement"), Mapping) else {}
        counts = res.get("counts") if isinstance(res.get("counts"), Mapping) else {}
        latency = res.get("latency_ms") if isinstance(res.get("latency_ms"), Mapping) else {}
        rows.append({
            "host": doc["_host"], "candidate": str(doc.get("candidate", ""))[:12],
            "current": str(doc.get("current", ""))[:12], "passed": bool(doc.get("passed")),
            "frames": res.get("frames_compared"), "f1": agreement.get("f1"),
            "count_delta": counts.get("mean_delta_per_frame"),
            "p95_current_ms": (latency.get("current") or {}).get("p95"),
            "p95_candidate_ms": (latency.get("candidate") or {}).get("p95"), "errors": res.get("errors"),
            "reasons": "; ".join(map(str, doc.get("reasons") or [])), "measured_utc": doc.get("created_utc", ""),
        })
    return rows


def device_rows(docs: Sequence[Mapping[str, Any]], model_shas: Mapping[str, str]) -> list[dict[str, Any]]:
    """One row per host: what it runs (matched to this pipeline's models by sha256) and how fast."""
    by_sha = {sha: name for name, sha in model_shas.items()}
    rows = []
    for doc in docs:
        m = bench_metrics(doc)
        sha = str((doc.get("source") or {}).get("model_sha256", ""))
        stages = doc.get("stages_ms") or {}
        rows.append({
            "host": doc["_host"],
            "backend": doc.get("backend", ""), "precision": doc.get("precision", ""),
            "model": by_sha.get(sha, "other (not this pipeline's current models)"), "release": doc.get("release", ""),
            "p50_ms": m.get("latency_p50_ms"), "p95_ms": m.get("latency_p95_ms"), "fps": m.get("fps"),
            "peak_rss_mb": m.get("peak_rss_mb"), "temp_max_c": m.get("temp_max_c"), "throttled": m.get("throttled"),
            # None (shown "–") where the device has no power sensors or the document predates them.
            "power_idle_w": m.get("power_idle_w"), "power_mean_w": m.get("power_mean_w"),
            "energy_mj_per_inference": m.get("energy_mj_per_inference"), "cpu_percent": m.get("cpu_percent"),
            "preprocess_p50_ms": (stages.get("preprocess") or {}).get("p50"),
            "infer_p50_ms": (stages.get("infer") or {}).get("p50"),
            "postprocess_p50_ms": (stages.get("postprocess") or {}).get("p50"),
            "measured_utc": doc.get("created_utc", ""), "soak": doc.get("soak"),
        })
    return rows


def thermal_rows(devices: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The soak windows of every device that ran a soak benchmark: time, p50, max temperature."""
    rows = []
    for d in devices:
        for w in ((d.get("soak") or {}).get("windows") or []):
            rows.append({"host": d["host"], "t_end_s": w["t_end_s"], "p50_ms": w["p50_ms"],
                         "p95_ms": w["p95_ms"], "fps": w["fps"], "temp_max_c": w["temp_max_c"]})
    return rows


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(float(x))


def summary_metrics(rows: Sequence[Mapping[str, Any]], devices: Sequence[Mapping[str, Any]],
                    evaluate: Mapping[str, Any], quantize: Mapping[str, Any], imgsz: str) -> dict[str, float | str]:
    """The headline numbers, flat (DVC metrics and the MLflow summary run)."""
    out: dict[str, float | str] = {"imgsz": int(imgsz), "chosen_candidate": str(quantize.get("chosen", ""))}
    for r in rows:
        for key in ("mAP50-95_val", "mAP50-95_camera", "drop_val", "drop_camera", "p50_ms", "p95_ms", "fps",
                    "size_mb", "speedup_p50"):
            if _finite(r.get(key)):
                out[f"{r['variant']}.{key}"] = r[key]
    if _finite(quantize.get("size_ratio")):
        out["int8.size_ratio"] = quantize["size_ratio"]
    if _finite(evaluate.get("camera_calibration_gain_on_camera")):
        out["int8.camera_calibration_gain"] = evaluate["camera_calibration_gain_on_camera"]
    for d in devices:
        for key in ("p50_ms", "p95_ms", "fps", "temp_max_c"):
            if _finite(d.get(key)):
                out[f"device.{d['host']}.{key}"] = d[key]
    return out


def build_report(inputs: ReportInputs, p: ReportParams, q: QuantizeParams) -> Report:
    """Read every input and compute the report (tables, quantiles, winner, summary); writes nothing."""
    quantize = read_json(inputs.quantize_metrics, "quantize")
    evaluate = read_json(inputs.evaluate_metrics, "evaluate")
    bench = read_json(inputs.bench_results, "benchmark")
    if p.split not in evaluate:
        raise ReportError(f"{inputs.evaluate_metrics} has no '{p.split}' split (report.split in params.yaml); "
                          f"it has: {', '.join(k for k, v in evaluate.items() if isinstance(v, dict))}")
    imgsz = headline_imgsz(bench)
    rows = variant_rows(evaluate, bench, imgsz)
    model_shas = {name: sha256_file(path) for name, path in inputs.models.items() if path.is_file()}
    devices = device_rows(latest_device_results(inputs.fleet_dir), model_shas) if p.fleet else []
    return Report(
        imgsz=imgsz,
        winner=choose_winner(rows, p.split, q.max_map_drop),
        variants=rows,
        devices=devices,
        thermal=thermal_rows(devices),
        shadows=shadow_rows(latest_fleet_docs(inputs.fleet_dir, "shadow")) if p.fleet else [],
        quantiles=latency_quantiles(read_csv(inputs.bench_samples, "benchmark"), imgsz, p.cdf_points),
        per_class=per_class_ap(read_csv(inputs.per_class, "evaluate"), p.split),
        candidates=read_csv(inputs.candidates, "quantize"),
        summary=summary_metrics(rows, devices, evaluate, quantize, imgsz),
        model_shas=model_shas,
    )


def _csv(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(["" if v is None else v for v in row] for row in rows)
    return buf.getvalue()


def plot_tables(r: Report) -> dict[str, str]:
    """The `dvc plots` CSVs: file name -> text (a header row even when there is no data yet)."""
    pct = np.linspace(0.0, 100.0, len(next(iter(r.quantiles.values()), [])) or 2)
    variants = [v for v in VARIANTS if v in r.quantiles]
    per_class = {m: r.per_class.get(m, {}) for m in ("fp32", "int8")}
    return {
        "accuracy_latency.csv": _csv(["name", "kind", "p50_ms", "mAP50-95"], [
            [row["variant"], "variant", row.get("p50_ms"), row.get("mAP50-95_val")]
            for row in r.variants if row.get("p50_ms") is not None]),
        "latency_quantiles.csv": _csv(["percentile"] + [f"{v}_ms" for v in variants], [
            [round(float(x), 2)] + [r.quantiles[v][i] for v in variants] for i, x in enumerate(pct)]
            if variants else []),
        "per_class_fp32.csv": _csv(["class", "AP50-95"], sorted(per_class["fp32"].items())),
        "per_class_int8.csv": _csv(["class", "AP50-95"], sorted(per_class["int8"].items())),
        "devices.csv": _csv(["host", "model", "backend", "precision", "p50_ms", "p95_ms", "fps", "temp_max_c",
                             "throttled", "power_idle_w", "power_mean_w", "energy_mj_per_inference", "cpu_percent"],
                            [[d["host"], d["model"], d["backend"], d["precision"], d["p50_ms"], d["p95_ms"], d["fps"],
                              d["temp_max_c"], d["throttled"], d.get("power_idle_w"), d.get("power_mean_w"),
                              d.get("energy_mj_per_inference"), d.get("cpu_percent")] for d in r.devices]),
        "thermal.csv": _csv(["host", "t_end_s", "p50_ms", "p95_ms", "fps", "temp_max_c"],
                            [[t["host"], t["t_end_s"], t["p50_ms"], t["p95_ms"], t["fps"], t["temp_max_c"]]
                             for t in r.thermal]),
    }


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    # No creation date or software version in the file: the same report draws the same bytes.
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def draw_plots(r: Report) -> dict[str, bytes]:
    """The report's figures as PNG bytes: file name -> image."""
    import matplotlib

    matplotlib.use("Agg")  # headless: CI and SSH sessions have no display
    import matplotlib.pyplot as plt

    out: dict[str, bytes] = {}
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for row in r.variants:
        if row.get("p50_ms") is not None and row.get("mAP50-95_val") is not None:
            ax.scatter(row["p50_ms"], row["mAP50-95_val"], s=60, zorder=3)
            ax.annotate(row["label"], (row["p50_ms"], row["mAP50-95_val"]), textcoords="offset points",
                        xytext=(6, 4), fontsize=8)
    fp32_map = next((row.get("mAP50-95_val") for row in r.variants if row["variant"] == "fp32"), None)
    for d in r.devices:
        acc = next((row.get("mAP50-95_val") for row in r.variants if row["variant"] == d["model"]), None)
        if d.get("p50_ms") is not None and acc is not None:
            ax.scatter(d["p50_ms"], acc, marker="s", s=40, zorder=3)
            ax.annotate(f"{d['host']} ({d['model']})", (d["p50_ms"], acc), textcoords="offset points",
                        xytext=(6, -10), fontsize=7)
    if fp32_map is not None:
        ax.axhline(fp32_map, color="grey", lw=0.8, ls="--", label="FP32 mAP50-95")
        ax.legend(fontsize=8, loc="best")
    ax.set(xlabel=f"P50 latency per detection, ms (imgsz {r.imgsz}; squares: devices)", ylabel="mAP50-95 (val)",
           title="Accuracy vs latency")
    ax.grid(alpha=0.3)
    out["accuracy_vs_latency.png"] = _png(fig)

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for v, qs in r.quantiles.items():
        ax.plot(qs, np.linspace(0.0, 1.0, len(qs)), label=VARIANT_LABELS.get(v, v))
    ax.set(xlabel=f"latency per detection, ms (imgsz {r.imgsz})", ylabel="fraction of detections",
           title="Latency distribution (CDF)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    out["latency_cdf.png"] = _png(fig)

    classes = sorted(set(r.per_class.get("fp32", {})) | set(r.per_class.get("int8", {})))
    fig, ax = plt.subplots(figsize=(6.4, 0.45 * max(len(classes), 2) + 1.2))
    y = np.arange(len(classes))
    for i, (model, label) in enumerate((("fp32", "FP32"), ("int8", "INT8"))):
        ax.barh(y + (i - 0.5) * 0.38, [r.per_class.get(model, {}).get(c, 0.0) for c in classes], height=0.38,
                label=label)
    ax.set_yticks(y, classes)
    ax.set(xlabel="AP50-95", title="Per-class AP, FP32 vs INT8", xlim=(0, 1))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="x")
    out["per_class_ap.png"] = _png(fig)

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    hosts = sorted({t["host"] for t in r.thermal})
    if hosts:
        ax2 = ax.twinx()
        for h in hosts:
            pts = [t for t in r.thermal if t["host"] == h]
            ax.plot([t["t_end_s"] for t in pts], [t["temp_max_c"] for t in pts], marker="o", label=f"{h} temp")
            ax2.plot([t["t_end_s"] for t in pts], [t["p50_ms"] for t in pts], ls="--", label=f"{h} p50")
        ax.set(xlabel="soak time, s", ylabel="max temperature, C")
        ax2.set_ylabel("P50 latency, ms (dashed)")
        ax.legend(fontsize=8, loc="upper left")
    else:
        ax.text(0.5, 0.5, "No soak benchmarks yet.\nRun `fab benchmark --group G --soak-minutes 10`,\n"
                "then `dvc repro report`.", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    ax.set_title("Thermal timeline of soak benchmarks")
    out["thermal_timeline.png"] = _png(fig)
    return out


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None or x == "":
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}".rstrip("0").rstrip(".") if digits > 2 else f"{x:.{digits}f}"
    return str(x)


def render_markdown(r: Report, p: ReportParams, q: QuantizeParams, plots_rel: str) -> str:
    """reports/report.md: headline, variants, devices, per-class AP, candidates, plots."""
    by = {row["variant"]: row for row in r.variants}
    lines = ["# Edge defect detection: report", "",
             "Generated by `dvc repro report` from the quantize, evaluate and benchmark stages"
             + (" and the latest on-device benchmarks in reports/fleet/." if r.devices else
                ". No device results yet: run `fab deploy --group local` (or a real group), then `dvc repro report`."),
             ""]
    win = by.get(r.winner)
    if win:
        lines += [f"**Winner: {win['label']}** — the fastest variant within the accuracy gate "
                  f"(mAP50-95 drop ≤ {q.max_map_drop} on {p.split}): P50 {_fmt(win.get('p50_ms'), 2)} ms at imgsz "
                  f"{r.imgsz}, {_fmt(win.get('speedup_p50'), 2)}x FP32, "
                  f"mAP50-95 {_fmt(win.get(f'mAP50-95_{p.split}'))} "
                  f"(drop {_fmt(win.get(f'drop_{p.split}'))}), {_fmt(win.get('size_mb'), 2)} MB.", ""]
    else:
        lines += [f"**No variant passes the accuracy gate** (drop ≤ {q.max_map_drop} on {p.split}).", ""]
    lines += ["## Variants", "",
              f"Latency: the device runtime's whole detection (preprocess + inference + postprocess) on this "
              f"workstation, imgsz {r.imgsz}, interleaved rounds (benchmark stage).", "",
              "| variant | mAP50-95 val | drop val | mAP50-95 camera | drop camera | P50 ms | P95 ms | FPS | "
              "speed-up | size MB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in r.variants:
        lines.append(f"| {row['label']} | {_fmt(row.get('mAP50-95_val'))} | {_fmt(row.get('drop_val'))} | "
                     f"{_fmt(row.get('mAP50-95_camera'))} | {_fmt(row.get('drop_camera'))} | "
                     f"{_fmt(row.get('p50_ms'), 2)} | {_fmt(row.get('p95_ms'), 2)} | {_fmt(row.get('fps'), 1)} | "
                     f"{_fmt(row.get('speedup_p50'), 2)} | {_fmt(row.get('size_mb'), 2)} |")
    lines += ["", f"![accuracy vs latency]({plots_rel}/accuracy_vs_latency.png) "
                  f"![latency CDF]({plots_rel}/latency_cdf.png)", ""]
    lines += ["## Devices", ""]
    if r.devices:
        lines += ["Latest on-device benchmark per host (reports/fleet/<host>/). Power from the device's own "
                  "sensors (Jetson INA3221 rails, Pi 5 PMIC), idle before the window and mean during it; "
                  "\"–\" where the device has none. CPU %: the benchmark process, 100 = one core.", "",
                  "| host | model | backend | precision | P50 ms | P95 ms | FPS | pre / infer / post P50 ms | "
                  "max °C | throttled | idle W | mean W | mJ / inference | CPU % | measured (UTC) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for d in r.devices:
            throttled = "–" if d["throttled"] is None else ("yes" if d["throttled"] else "no")
            lines.append(f"| {d['host']} | {d['model']} | {d['backend']} | {d['precision']} | {_fmt(d['p50_ms'], 2)} | "
                         f"{_fmt(d['p95_ms'], 2)} | {_fmt(d['fps'], 1)} | {_fmt(d['preprocess_p50_ms'], 2)} / "
                         f"{_fmt(d['infer_p50_ms'], 2)} / {_fmt(d['postprocess_p50_ms'], 2)} | "
                         f"{_fmt(d['temp_max_c'], 1)} | {throttled} | {_fmt(d.get('power_idle_w'), 2)} | "
                         f"{_fmt(d.get('power_mean_w'), 2)} | {_fmt(d.get('energy_mj_per_inference'), 1)} | "
                         f"{_fmt(d.get('cpu_percent'), 1)} | {d['measured_utc']} |")
    else:
        lines.append("No device results in reports/fleet/ yet.")
    if r.shadows:
        lines += ["", "Latest shadow run per host: the candidate beside the current release on live frames "
                      "(`fab shadow`, a staged deploy's canaries).", "",
                  "| host | candidate | current | passed | frames | F1 @ IoU 0.5 | count Δ/frame | P95 ms current / "
                  "candidate | errors | measured (UTC) | why not |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for s in r.shadows:
            lines.append(f"| {s['host']} | {s['candidate']} | {s['current'] or '–'} | {'yes' if s['passed'] else 'NO'} "
                         f"| {s['frames'] if s['frames'] is not None else '–'} | {_fmt(s['f1'], 3)} | "
                         f"{_fmt(s['count_delta'], 2)} | {_fmt(s['p95_current_ms'], 1)} / "
                         f"{_fmt(s['p95_candidate_ms'], 1)} | {s['errors'] if s['errors'] is not None else '–'} | "
                         f"{s['measured_utc']} | {s['reasons'] or '–'} |")
    lines += ["", f"![thermal timeline]({plots_rel}/thermal_timeline.png)", "",
              f"## Per-class AP50-95 ({p.split})", "", "| class | FP32 | INT8 | Δ |", "|---|---|---|---|"]
    fp32, int8 = r.per_class.get("fp32", {}), r.per_class.get("int8", {})
    for c in sorted(set(fp32) | set(int8)):
        delta = int8.get(c, float("nan")) - fp32.get(c, float("nan"))
        lines.append(f"| {c} | {_fmt(fp32.get(c))} | {_fmt(int8.get(c))} | {delta:+.4f} |")
    lines += ["", f"![per-class AP]({plots_rel}/per_class_ap.png)", "",
              "## Quantization candidates (accuracy-gated, fastest passing wins)", "",
              "| candidate | mAP50-95 | drop (95% interval) | camera mAP50-95 | camera drop (95% interval) "
              "| latency ms | speed-up | size MB | passed |", "|---|---|---|---|---|---|---|---|---|"]
    for c in r.candidates:
        lines.append(f"| {c['name']} | {c['mAP50-95'] or '-'} | {_drop(c, 'drop', 'val')} | "
                     f"{c.get('mAP50-95_camera') or '-'} | {_drop(c, 'drop_camera', 'camera')} | {c['latency_ms']} | "
                     f"{c['speedup']} | {c['size_mb']} | {c['passed']} |")
    if any(c.get("stopped_early") in ("yes", "True", "true") for c in r.candidates):
        lines += ["", "*stopped*: quantize's statistical early stop (docs/int8-and-calibration.md): the candidate's "
                  "drop interval on the images scored so far lay wholly above the gate, so it was not scored on the "
                  "rest; the figure is that partial estimate, not a whole-split one."]
    lines += ["", "## Models", "", "| model | sha256 |", "|---|---|"]
    lines += [f"| {name} | `{sha[:16]}` |" for name, sha in sorted(r.model_shas.items())]
    lines += ["", "Walk any MLflow run back to its data with `python -m pipeline.tools.lineage RUN_ID`.", ""]
    return "\n".join(lines)


def _drop(row: Mapping[str, str], key: str, split: str) -> str:
    """A candidates.csv drop with its bootstrap interval when the row has one ("-" when empty).

    A candidate quantize stopped early on `split` shows its partial estimate, marked as such.
    """
    if row.get("stop_split") == split and row.get("stop_partial_drop"):
        return (f"*stopped* after {row.get('stop_images')} images: {row['stop_partial_drop']} "
                f"[{row.get('stop_ci_low')}, {row.get('stop_ci_high')}] ({row.get('stop_level')})")
    value = row.get(key) or ""
    low, high = row.get(f"{key}_ci_low") or "", row.get(f"{key}_ci_high") or ""
    if not value:
        return "-"
    return f"{value} [{low}, {high}]" if low and high else value


def log_summary_run(r: Report, md_path: Path, plots: Mapping[str, Path]) -> None:
    """Headline metrics on the active (summary) run; one nested run per variant and per device."""
    import mlflow

    log_metrics({k: v for k, v in r.summary.items() if _finite(v)})
    set_tags({"winner": r.winner, "imgsz": r.imgsz})
    log_artifact(md_path)
    for path in plots.values():
        log_artifact(path, "plots")
    # Same metric names on every child: the compare view puts variants and devices in one table.
    experiment_id = mlflow.active_run().info.experiment_id  # children beside the summary, not in "Default"
    for row in r.variants:
        with mlflow.start_run(run_name=f"variant {row['variant']}", nested=True, experiment_id=experiment_id,
                              tags={"stage": "report-variant", "variant": row["variant"],
                                    "model_sha256": str(row.get("model_sha256", ""))}):
            log_metrics({k: row[k] for k in ("mAP50-95_val", "mAP50-95_camera", "drop_val", "drop_camera", "p50_ms",
                                             "p95_ms", "p99_ms", "fps", "speedup_p50", "size_mb", "peak_rss_mb")
                         if _finite(row.get(k))})
    for d in r.devices:
        with mlflow.start_run(run_name=f"device {d['host']}", nested=True, experiment_id=experiment_id,
                              tags={"stage": "report-device", "device": d["host"], "variant": d["model"],
                                    "backend": str(d["backend"]), "precision": str(d["precision"])}):
            log_metrics({k: d[k] for k in ("p50_ms", "p95_ms", "fps", "peak_rss_mb", "temp_max_c", "throttled",
                                           "preprocess_p50_ms", "infer_p50_ms", "postprocess_p50_ms")
                         if _finite(d.get(k))})


# The terminal table's columns: summary key suffix, header, decimals. Short headers keep a row of
# the longest label (24) plus every column under 100 characters.
_HEADLINE_COLUMNS = (("mAP50-95_val", "val mAP", 4), ("drop_val", "drop", 4), ("mAP50-95_camera", "cam mAP", 4),
                     ("drop_camera", "drop", 4), ("p50_ms", "P50 ms", 2), ("speedup_p50", "x FP32", 2),
                     ("size_mb", "MB", 2))
_LABEL_WIDTH = 24
# MLflow 3.17's UI opens an experiment in its GenAI view unless the URL (or the user's "GenAI / Model
# training" switch) says otherwise; the experiment's `mlflow.experimentKind` tag is what 3.4 reads.
_RUNS_VIEW = "/#/experiments/{}/runs?workflowType=machine_learning"


def mlflow_ui_lines(uri: str, experiment_id: str | None = None, cwd: Path | None = None) -> list[str]:
    """Where a person looks at the runs: for a SQLite store the `mlflow ui` command (the path relative
    to `cwd` when it is inside it) and the page to open, for a tracking server its page; the page is
    the experiment's training runs when `experiment_id` is known."""
    from urllib.parse import urlsplit

    page = _RUNS_VIEW.format(experiment_id) if experiment_id else ""
    if uri.startswith(("http://", "https://")):
        parts = urlsplit(uri)  # the netloc without user:password: never print credentials
        return [f"MLflow: {parts.scheme}://{parts.netloc.rsplit('@', 1)[-1]}{parts.path.rstrip('/')}{page}"]
    shown = uri
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        here = (cwd or Path.cwd()).resolve()
        try:
            shown = f"sqlite:///{(here / db).resolve().relative_to(here).as_posix()}"
        except ValueError:  # outside the current folder: keep it absolute
            pass
    return [f"MLflow: mlflow ui --backend-store-uri {shown}", f"        then open http://127.0.0.1:5000{page}"]


def headline_table(summary: Mapping[str, Any]) -> str:
    """summary.json as a plain-text table for a terminal (under 100 columns): one row per variant
    (accuracy on val and the camera split, P50, speed-up, size) and one per device (its P50)."""
    variants = [v for v in ("pytorch",) + VARIANTS if any(str(k).startswith(f"{v}.") for k in summary)]
    hosts = sorted({str(k)[len("device."):].rsplit(".", 1)[0] for k in summary if str(k).startswith("device.")})
    rows: list[list[str]] = []
    for label, prefix in [(VARIANT_LABELS[v], v) for v in variants] + [(f"device {h}", f"device.{h}") for h in hosts]:
        cells = [label[:_LABEL_WIDTH]]
        for key, _, digits in _HEADLINE_COLUMNS:
            x = summary.get(f"{prefix}.{key}")
            cells.append(f"{x:.{digits}f}" if _finite(x) else "-")
        rows.append(cells)
    header = ["variant"] + [h for _, h, _ in _HEADLINE_COLUMNS]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join([cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:])])

    title = f"Headline: imgsz {summary.get('imgsz', '?')}, INT8 candidate {summary.get('chosen_candidate') or '?'}"
    legend = "(mAP = mAP50-95; drop = FP32 minus the variant; cam = the labelled camera split)"
    return "\n".join([title, legend, line(header), *(line(r) for r in rows)])


def headline_text(summary: Mapping[str, Any], markdown: Path, plots: Path, mlflow_uri: str,
                  experiment_id: str | None = None) -> str:
    """What the end of a run prints: the headline table, then where the report, plots and MLflow are."""
    return "\n".join([headline_table(summary), "", f"Report: {markdown.as_posix()} (plots in {plots.as_posix()}/)",
                      *mlflow_ui_lines(mlflow_uri, experiment_id)])


def _pipeline_experiment_id(uri: str) -> str | None:
    """The pipeline experiment's id in the store at `uri`; None when there is no store (a SQLite
    file is never created just to look), no such experiment, or the server does not answer."""
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        return None
    import mlflow
    from mlflow.exceptions import MlflowException

    from pipeline.tracking.mlflow_runs import TrackingServerUnreachable, check_server_reachable, experiment_name

    try:
        check_server_reachable(uri, timeout_s=2.0)  # not MLflow's minutes of retries against a closed port
        exp = mlflow.MlflowClient(uri).get_experiment_by_name(experiment_name())
    except (TrackingServerUnreachable, MlflowException):
        return None
    return exp.experiment_id if exp is not None else None


def print_headline(tables: Path = paths.REPORT_TABLES_DIR, markdown: Path = paths.REPORT_MARKDOWN,
                   plots: Path = paths.REPORT_PLOTS_DIR) -> int:
    """Print the last report's headline (its summary.json) and where to look next; the exit status
    for `make run`, which calls it last: 1 when no report has been written yet."""
    import sys

    path = tables / "summary.json"
    if not path.is_file():
        print(f"no report yet ({path} is missing): run `make run` or `dvc repro`", file=sys.stderr)
        return 1
    uri = tracking_uri()
    print(headline_text(read_json(path, "report"), markdown, plots, uri, _pipeline_experiment_id(uri)), flush=True)
    return 0


def _source_run_tags(int8_sha: str) -> dict[str, str]:
    """`source_run_id` = the quantize run that produced the current INT8 model (lineage walks on from it)."""
    import mlflow

    from pipeline.tracking.mlflow_runs import find_producer, tracking_uri

    client = mlflow.MlflowClient(tracking_uri())
    exps = [e.experiment_id for e in client.search_experiments()]
    run = find_producer(client, exps, "int8_sha256", int8_sha) if int8_sha else None
    return {"source_run_id": run.info.run_id} if run is not None else {}


parse_args = stage_cli(
    "report", __doc__,
    quantize_metrics=paths.QUANTIZE_METRICS,
    candidates=paths.QUANTIZE_CANDIDATES,
    evaluate_metrics=paths.EVALUATE_METRICS,
    per_class=paths.EVALUATE_PER_CLASS,
    bench_results=paths.BENCHMARK_RESULTS,
    bench_samples=paths.BENCHMARK_SAMPLES,
    fleet=paths.FLEET_RESULTS_DIR,
    models=paths.ONNX_MODEL.parent,
    markdown=paths.REPORT_MARKDOWN,
    plots=paths.REPORT_PLOTS_DIR,
    tables=paths.REPORT_TABLES_DIR,
)


def main(argv: list[str] | None = None) -> None:
    """Run the stage: build the report, write markdown + plots + tables + summary, one MLflow summary run."""
    args = parse_args(argv)
    p, q = stage_params(args, "report", "quantize")
    models = {"fp32": args.models / paths.ONNX_MODEL.name, "int8": args.models / paths.INT8_MODEL.name,
              "trt_onnx": args.models / paths.INT8_TRT_MODEL.name, "dynamic": args.models / paths.DYNAMIC_MODEL.name}
    inputs = ReportInputs(args.quantize_metrics, args.candidates, args.evaluate_metrics, args.per_class,
                          args.bench_results, args.bench_samples, args.fleet, models)
    tags = lineage_tags(onnx=models["fp32"], int8=models["int8"], trt_onnx=models["trt_onnx"],
                        dynamic=models["dynamic"])
    tags.update(_source_run_tags(tags.get("int8_sha256", "")))
    with stage_run("report", p, q, tags=tags):
        r = build_report(inputs, p, q)
        plot_files = {name: args.plots / name for name in ("accuracy_vs_latency.png", "latency_cdf.png",
                                                          "per_class_ap.png", "thermal_timeline.png")}
        for name, png in draw_plots(r).items():
            atomic_write_bytes(plot_files[name], png)
        for name, text in plot_tables(r).items():
            atomic_write_text(args.tables / name, text)
        atomic_write_json(args.tables / "summary.json", r.summary)
        plots_rel = Path(os.path.relpath(args.plots, args.markdown.parent)).as_posix()
        atomic_write_text(args.markdown, render_markdown(r, p, q, plots_rel))
        log_summary_run(r, args.markdown, plot_files)
        print(f"report: winner {r.winner or 'none'}; {len(r.devices)} device(s); -> {args.markdown}", flush=True)
        import mlflow  # the summary run is active: its experiment is the one to open

        experiment = mlflow.active_run().info.experiment_id
        print(headline_text(r.summary, args.markdown, args.plots, tracking_uri(), experiment), flush=True)


if __name__ == "__main__":
    sys.exit(run_stage(main))
