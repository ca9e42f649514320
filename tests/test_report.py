"""Stage `report`: tables, winner, device folding, plots (valid PNGs), markdown and the MLflow summary run.

Inputs are small files in the formats the quantize/evaluate/benchmark stages and the device
benchmark write (the real stages feed this stage in tests/test_e2e_repro.py's `dvc repro`).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from pipeline.config.params import QuantizeParams, ReportParams, load_params
from pipeline.stages import report as rp

CLASSES = ("crazing", "scratches")


def _bench_row(p50: float, size: int, sha: str, model: str) -> dict[str, Any]:
    lat = {"p50": p50, "p95": p50 * 1.2, "p99": p50 * 1.3, "mean": p50, "min": p50 * 0.9, "max": p50 * 1.4, "std": 0.1}
    return {"model": model, "model_sha256": sha, "latency_ms": lat, "infer_ms": lat, "fps": round(1000 / p50, 2),
            "size_bytes": size, "peak_rss_mb": 80.0, "model_rss_mb": 20.0, "threads": 2, "providers": 1,
            "iterations": 6, "quantization": "q", "round_p50_spread_ms": 0.1}


def _device_doc(host_sha: str, p50: float, stamp: str, soak: bool = False) -> dict[str, Any]:
    doc = {"kind": "device-benchmark", "schema": 1, "backend": "onnxruntime", "precision": "int8",
           "created_utc": stamp, "release": "abc123", "source": {"model_sha256": host_sha},
           "latency_ms": {"p50": p50, "p95": p50 * 1.1, "p99": p50 * 1.2}, "fps": 1000 / p50, "peak_rss_mb": 120.0,
           "stages_ms": {k: {"p50": v} for k, v in (("preprocess", 0.6), ("infer", p50 - 1.1), ("postprocess", 0.5))},
           "thermal": {"start_c": 48.0, "max_c": 61.5, "end": {"throttled": {"soft_temp_limit": False}}},
           "soak": None}
    if soak:
        doc["soak"] = {"window_s": 6.0, "p50_drift_pct": 4.0, "windows": [
            {"t_start_s": 6.0 * i, "t_end_s": 6.0 * (i + 1), "iterations": 50, "p50_ms": p50 + 0.1 * i,
             "p95_ms": p50 + 1, "fps": 100.0, "temp_max_c": 55.0 + i} for i in range(4)]}
    return doc


@pytest.fixture
def stage_outputs(tmp_path: Path) -> dict[str, Path]:
    """quantize/evaluate/benchmark outputs and a models/ folder, as those stages write them."""
    models = tmp_path / "models"
    models.mkdir()
    for name, content in (("yolov8n.onnx", b"fp32"), ("yolov8n.int8.onnx", b"int8"),
                          ("yolov8n.int8.trt.onnx", b"trt"), ("yolov8n.dynamic.onnx", b"dyn")):
        (models / name).write_bytes(content)
    from edge_runtime.fileio import sha256_file

    sha = {n: sha256_file(models / f) for n, f in (("fp32", "yolov8n.onnx"), ("int8", "yolov8n.int8.onnx"),
                                                  ("dynamic", "yolov8n.dynamic.onnx"))}
    rep = tmp_path / "reports"
    for d in ("quantize", "evaluate", "benchmark", "fleet"):
        (rep / d).mkdir(parents=True)
    (rep / "quantize/metrics.json").write_text(json.dumps({"chosen": "rr_minmax", "size_ratio": 0.28}))
    (rep / "quantize/candidates.csv").write_text(
        "name,config,mAP50-95,mAP50,drop,drop_ci_low,drop_ci_high,mAP50-95_camera,drop_camera,drop_camera_ci_low,"
        "drop_camera_ci_high,latency_ms,spread_ms,speedup,size_mb,passed\n"
        "fp32,FP32 ONNX,0.6414,,0.0000,,,0.3500,0.0000,,,10.61,,1.00,12.13,reference\n"
        "rr_minmax,QDQ U8S8,0.6379,0.8577,0.0035,-0.0010,0.0080,0.3460,0.0040,0.0001,0.0079,7.56,0.64,1.40,3.37,yes\n")

    def acc(m: float, drop: float) -> dict[str, float]:
        return {"mAP50-95": m, "mAP50": m + 0.2, "precision": 0.8, "recall": 0.8, "drop_vs_fp32": drop}

    evaluate = {split: {"pytorch": acc(base + 0.001, -0.001), "fp32": acc(base, 0.0), "int8": acc(base - 0.004, 0.004),
                        "dynamic": acc(base - 0.03, 0.03), "images": 8, "instances": 20}
                for split, base in (("val", 0.64), ("camera", 0.32))}
    evaluate["camera_calibration_gain_on_camera"] = 0.0147
    (rep / "evaluate/metrics.json").write_text(json.dumps(evaluate))
    with (rep / "evaluate/per_class.csv").open("w") as f:
        f.write("model,split,class,AP50,AP50-95\n")
        for model, shift in (("fp32", 0.0), ("int8", -0.01)):
            for i, c in enumerate(CLASSES):
                for split in ("val", "camera"):
                    f.write(f"{model},{split},{c},0.9,{0.6 + 0.1 * i + shift:.6f}\n")
    bench = {"schema": 1, "kind": "host-benchmark", "results": {
        "256": {"fp32": _bench_row(10.0, 12_000_000, sha["fp32"], "models/yolov8n.onnx"),
                "int8": _bench_row(6.8, 3_300_000, sha["int8"], "models/yolov8n.int8.onnx"),
                "dynamic": _bench_row(13.4, 3_200_000, sha["dynamic"], "models/yolov8n.dynamic.onnx")},
        "640": {"fp32": _bench_row(60.0, 12_000_000, "x", "built for this run from models/yolov8n.pt")}}}
    for row in bench["results"]["256"].values():
        row["speedup_p50_vs_fp32"] = round(10.0 / row["latency_ms"]["p50"], 3)
    (rep / "benchmark/results.json").write_text(json.dumps(bench))
    rng = np.random.default_rng(0)
    with (rep / "benchmark/latency_samples.csv").open("w") as f:
        f.write("imgsz,variant,run,latency_ms\n")
        for v, center in (("fp32", 10.0), ("int8", 6.8), ("dynamic", 13.4)):
            for i, x in enumerate(center + rng.gamma(2.0, 0.3, 200)):
                f.write(f"256,{v},{i},{x:.4f}\n")
    return {"root": tmp_path, "models": models, "reports": rep, "int8_sha": Path(sha["int8"])}


def _args(o: dict[str, Path]) -> list[str]:
    rep = o["reports"]
    return ["--quantize-metrics", str(rep / "quantize/metrics.json"),
            "--candidates", str(rep / "quantize/candidates.csv"),
            "--evaluate-metrics", str(rep / "evaluate/metrics.json"),
            "--per-class", str(rep / "evaluate/per_class.csv"),
            "--bench-results", str(rep / "benchmark/results.json"),
            "--bench-samples", str(rep / "benchmark/latency_samples.csv"), "--fleet", str(rep / "fleet"),
            "--models", str(o["models"]), "--markdown", str(rep / "report.md"), "--plots", str(rep / "plots"),
            "--tables", str(rep / "report")]


def _inputs(o: dict[str, Path]) -> rp.ReportInputs:
    a = rp.parse_args(_args(o))
    m = a.models
    return rp.ReportInputs(a.quantize_metrics, a.candidates, a.evaluate_metrics, a.per_class, a.bench_results,
                           a.bench_samples, a.fleet, {"fp32": m / "yolov8n.onnx", "int8": m / "yolov8n.int8.onnx",
                                                      "dynamic": m / "yolov8n.dynamic.onnx"})


def _params() -> tuple[ReportParams, QuantizeParams]:
    return load_params("report", ReportParams), load_params("quantize", QuantizeParams)


def test_tables_winner_and_devices(stage_outputs: dict[str, Path]) -> None:
    from edge_runtime.fileio import sha256_file

    fleet = stage_outputs["reports"] / "fleet"
    int8_sha = sha256_file(stage_outputs["models"] / "yolov8n.int8.onnx")
    (fleet / "pi1").mkdir()
    (fleet / "pi1/20261101T000000Z.json").write_text(json.dumps(_device_doc(int8_sha, 40.0, "2026-11-01T00:00:00Z")))
    (fleet / "pi1/20261102T000000Z.json").write_text(
        json.dumps(_device_doc(int8_sha, 38.0, "2026-11-02T00:00:00Z", soak=True)))
    (fleet / "old").mkdir()
    (fleet / "old/20261101T000000Z.json").write_text(json.dumps(_device_doc("f" * 64, 90.0, "2026-11-01T00:00:00Z")))
    (fleet / "pi1/notes.json").write_text(json.dumps({"kind": "something-else"}))  # not a device benchmark

    r = rp.build_report(_inputs(stage_outputs), *_params())
    assert r.imgsz == "256"  # the size measured with the stage models, not the in-run export
    assert r.winner == "int8"  # fastest, and its 0.004 drop is within the 0.005 gate
    by = {row["variant"]: row for row in r.variants}
    assert list(by) == ["pytorch", "fp32", "int8", "dynamic"] and "p50_ms" not in by["pytorch"]
    assert by["int8"]["speedup_p50"] == pytest.approx(10.0 / 6.8, abs=1e-3)
    devices = {d["host"]: d for d in r.devices}
    assert devices["pi1"]["p50_ms"] == 38.0 and devices["pi1"]["model"] == "int8"  # the newest result wins
    assert devices["old"]["model"].startswith("other")  # not one of this pipeline's current models
    assert devices["pi1"]["throttled"] == 0.0 and devices["pi1"]["infer_p50_ms"] == pytest.approx(36.9)
    assert [t["temp_max_c"] for t in r.thermal] == [55.0, 56.0, 57.0, 58.0]
    q = r.quantiles["int8"]
    assert len(q) == 101 and q == sorted(q) and q[0] >= 6.8
    assert r.summary["int8.drop_val"] == 0.004 and r.summary["device.pi1.p50_ms"] == 38.0
    assert r.summary["int8.camera_calibration_gain"] == 0.0147

    tables = rp.plot_tables(r)
    rows = list(csv.DictReader(io.StringIO(tables["latency_quantiles.csv"])))
    assert len(rows) == 101 and set(rows[0]) == {"percentile", "fp32_ms", "int8_ms", "dynamic_ms"}
    assert float(rows[-1]["percentile"]) == 100.0
    assert len(list(csv.DictReader(io.StringIO(tables["thermal.csv"])))) == 4
    for name, png in rp.draw_plots(r).items():
        img = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and img is not None and min(img.shape[:2]) > 200, name
    md = rp.render_markdown(r, *_params(), "plots")
    assert "**Winner: INT8 ONNX (chosen)**" in md and "| pi1 | int8 |" in md and "plots/latency_cdf.png" in md
    # The candidate table: both splits' drops with their bootstrap intervals.
    assert "| rr_minmax | 0.6379 | 0.0035 [-0.0010, 0.0080] | 0.3460 | 0.0040 [0.0001, 0.0079] | 7.56 |" in md
    assert "| fp32 | 0.6414 | 0.0000 | 0.3500 | 0.0000 | 10.61 |" in md


def test_no_variant_within_gate_and_no_devices(stage_outputs: dict[str, Path]) -> None:
    path = stage_outputs["reports"] / "evaluate/metrics.json"
    doc = json.loads(path.read_text())
    for v in ("int8", "dynamic"):
        doc["val"][v]["drop_vs_fp32"] = 0.2
    doc["val"]["fp32"]["drop_vs_fp32"] = None  # only a variant with a measured drop can win
    path.write_text(json.dumps(doc))
    r = rp.build_report(_inputs(stage_outputs), *_params())
    assert r.winner == "" and r.devices == [] and r.thermal == []
    assert "No variant passes the accuracy gate" in rp.render_markdown(r, *_params(), "plots")
    assert rp.plot_tables(r)["thermal.csv"] == "host,t_end_s,p50_ms,p95_ms,fps,temp_max_c\n"  # header, no rows


def test_missing_or_corrupt_inputs_name_the_stage(stage_outputs: dict[str, Path]) -> None:
    (stage_outputs["reports"] / "benchmark/results.json").unlink()
    with pytest.raises(rp.ReportError, match=r"results.json is missing; run `dvc repro benchmark`"):
        rp.build_report(_inputs(stage_outputs), *_params())
    (stage_outputs["reports"] / "evaluate/metrics.json").write_text("{not json")
    with pytest.raises(rp.ReportError, match=r"not valid JSON .*dvc repro -f evaluate"):
        rp.build_report(_inputs(stage_outputs), *_params())


def test_main_writes_outputs_and_mlflow_summary_run(stage_outputs: dict[str, Path]) -> None:
    import mlflow

    from edge_runtime.fileio import sha256_file
    from pipeline.tracking.mlflow_runs import experiment_name, tracking_uri

    rep = stage_outputs["reports"]
    rp.main(_args(stage_outputs))
    assert (rep / "report.md").is_file() and len(list((rep / "plots").glob("*.png"))) == 4
    assert json.loads((rep / "report/summary.json").read_text())["int8.p50_ms"] == 6.8
    assert (rep / "report/devices.csv").read_text().count("\n") == 1  # no devices yet: header only

    # A device result lands (fab deploy): the report regenerates with it.
    int8_sha = sha256_file(stage_outputs["models"] / "yolov8n.int8.onnx")
    (rep / "fleet/jetson1").mkdir()
    (rep / "fleet/jetson1/20261122T000000Z.json").write_text(
        json.dumps(_device_doc(int8_sha, 9.0, "2026-11-22T00:00Z")))
    rp.main(_args(stage_outputs))
    assert "| jetson1 | int8 |" in (rep / "report.md").read_text()

    client = mlflow.MlflowClient(tracking_uri())
    exp = client.get_experiment_by_name(experiment_name())
    summaries = client.search_runs([exp.experiment_id], "tags.stage = 'report'",
                                   order_by=["attributes.start_time DESC"])
    assert len(summaries) == 2
    latest = summaries[0]
    assert latest.data.metrics["int8.p50_ms"] == 6.8 and latest.data.metrics["device.jetson1.p50_ms"] == 9.0
    assert latest.data.tags["winner"] == "int8" and latest.data.tags["int8_sha256"] == int8_sha
    assert {a.path for a in client.list_artifacts(latest.info.run_id)} >= {"report.md", "plots"}
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{latest.info.run_id}'")
    names = sorted(c.info.run_name for c in children)
    assert names == ["device jetson1", "variant dynamic", "variant fp32", "variant int8", "variant pytorch"]
    # The same metric names on variant and device runs: the compare view lines them up.
    for c in children:
        if c.info.run_name != "variant pytorch":
            assert {"p50_ms", "p95_ms", "fps"} <= set(c.data.metrics), c.info.run_name


def test_main_ends_with_a_narrow_headline_table(stage_outputs: dict[str, Path], capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The run ends with the variants (and devices) table, the report's paths and how to open MLflow;
    `print_headline` (what `make run` calls last) prints the same from summary.json."""
    import mlflow

    from edge_runtime.fileio import sha256_file
    from pipeline.tracking.mlflow_runs import experiment_name

    rep = stage_outputs["reports"]
    int8_sha = sha256_file(stage_outputs["models"] / "yolov8n.int8.onnx")
    (rep / "fleet/workstation").mkdir()
    (rep / "fleet/workstation/20261122T000000Z.json").write_text(
        json.dumps(_device_doc(int8_sha, 9.0, "2026-11-22T00:00Z")))
    db = stage_outputs["root"] / "mlflow.db"  # outside the working directory: shown absolute
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    rp.main(_args(stage_outputs))
    printed = capsys.readouterr().out
    tail = printed[printed.index("Headline: imgsz 256, INT8 candidate rr_minmax"):].rstrip("\n").splitlines()
    table = tail[:tail.index("")]  # then the paths, which are this test's long temp paths
    assert len(table) == 3 + 5 and max(len(line) for line in table) <= 100, table
    exp = mlflow.MlflowClient(f"sqlite:///{db}").get_experiment_by_name(experiment_name()).experiment_id
    rows = {line.split("  ")[0]: line.split() for line in tail[3:] if line and "  " in line}
    assert rows["INT8 ONNX (chosen)"][-7:] == ["0.6360", "0.0040", "0.3160", "0.0040", "6.80", "1.47", "3.30"]
    assert rows["PyTorch (reference)"][-3:] == ["-", "-", "-"]  # not timed: no latency, no size
    assert rows["device workstation"][-7:] == ["-", "-", "-", "-", "9.00", "-", "-"]
    assert tail[-3:] == [f"Report: {rep / 'report.md'} (plots in {rep / 'plots'}/)",
                         f"MLflow: mlflow ui --backend-store-uri sqlite:///{db}",  # outside the cwd: absolute
                         f"        then open http://127.0.0.1:5000/#/experiments/{exp}/runs?workflowType=machine_learning"]

    assert rp.print_headline(rep / "report", rep / "report.md", rep / "plots") == 0
    assert capsys.readouterr().out.splitlines() == tail
    assert rp.print_headline(rep / "nowhere") == 1
    assert "no report yet" in capsys.readouterr().err


def test_mlflow_ui_lines(tmp_path: Path) -> None:
    assert rp.mlflow_ui_lines(f"sqlite:///{tmp_path / 'm.db'}", "3", cwd=tmp_path) == [
        "MLflow: mlflow ui --backend-store-uri sqlite:///m.db",
        "        then open http://127.0.0.1:5000/#/experiments/3/runs?workflowType=machine_learning"]
    outside = rp.mlflow_ui_lines(f"sqlite:///{tmp_path / 'm.db'}", cwd=tmp_path / "sub")
    assert outside == [f"MLflow: mlflow ui --backend-store-uri sqlite:///{tmp_path / 'm.db'}",
                       "        then open http://127.0.0.1:5000"]
    assert rp.mlflow_ui_lines("https://user:secret@mlflow.example:8443/", "7") == [
        "MLflow: https://mlflow.example:8443/#/experiments/7/runs?workflowType=machine_learning"]
