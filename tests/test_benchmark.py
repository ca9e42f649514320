"""Stage `benchmark` (host): interleaving, result schema and CSV, per-model peak RSS in a fresh
process, calibration tensors re-made from the manifest, clear errors, the stage on a tiny pipeline.
No test asserts a time: only that every number is there and consistent."""

from __future__ import annotations

import csv
import fnmatch
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support import tiny_params

from edge_runtime.detector import StageTimes
from pipeline.config.params import (
    BaseParams,
    BenchmarkParams,
    ExportParams,
    QuantizeParams,
    ReproCheckParams,
    build,
    load_params,
)
from pipeline.onnx_models.calibration_sets import (
    calibration_frame_paths,
    load_calibration_tensors,
    rebuild_calibration_tensors,
)
from pipeline.stages import benchmark as bm

F = Path("params.yaml")


class _FakeDetector:
    """Records the order of calls; each detection 'takes' a fixed time per variant."""

    def __init__(self, name: str, log: list[str], seconds: float) -> None:
        self.name, self.log, self.seconds = name, log, seconds

    def detect(self, image: np.ndarray) -> tuple[None, StageTimes]:
        self.log.append(self.name)
        return None, StageTimes(0.0, self.seconds, self.seconds / 2)


def test_interleaving_rotates_and_counts() -> None:
    log: list[str] = []
    dets: dict[str, Any] = {n: _FakeDetector(n, log, s)
                            for n, s in (("fp32", 0.010), ("int8", 0.004), ("dynamic", 0.02))}
    t = bm.interleaved_detections(dets, [np.zeros((4, 4, 3), np.uint8)], warmup=2, runs=3, rounds=3)
    assert log[:6] == ["fp32"] * 2 + ["int8"] * 2 + ["dynamic"] * 2  # warm-up, untimed
    timed = log[6:]
    blocks = [timed[i] for i in range(0, len(timed), 3)]
    assert blocks == ["fp32", "int8", "dynamic", "int8", "dynamic", "fp32", "dynamic", "fp32", "int8"]
    for n in dets:
        assert len(t[n].total) == 9 and len(t[n].round_medians) == 3
    assert t["int8"].total[0] == pytest.approx(0.006) and t["int8"].infer[0] == pytest.approx(0.004)
    with pytest.raises(ValueError, match="no frames"):
        bm.interleaved_detections(dets, [], 0, 1, 1)


def _doc() -> dict[str, Any]:
    lat = {"p50": 10.0, "p95": 12.0, "p99": 13.0, "mean": 10.5, "min": 9.0, "max": 13.5, "std": 1.0}

    def row(scale: float, size: int) -> dict[str, Any]:
        return {"model": "m", "model_sha256": "0" * 64, "quantization": "q", "size_bytes": size, "threads": 2,
                "providers": ["CPUExecutionProvider"], "iterations": 9,
                "latency_ms": {k: v * scale for k, v in lat.items()}, "infer_ms": lat, "round_p50_spread_ms": 0.5,
                "fps": 95.2, "peak_rss_mb": 80.0, "model_rss_mb": 30.0,
                "speedup_p50_vs_fp32": round(1 / scale, 3), "size_vs_fp32": size / 12e6}

    return {"schema": 1, "results": {"256": {"fp32": row(1.0, 12_000_000), "int8": row(0.5, 3_000_000)}}}


def test_results_csv_and_mlflow_metrics() -> None:
    rows = list(csv.DictReader(io.StringIO(bm.results_csv(_doc()))))
    assert [(r["imgsz"], r["variant"]) for r in rows] == [("256", "fp32"), ("256", "int8")]
    assert rows[1]["p50_ms"] == "5.0" and rows[1]["speedup_p50_vs_fp32"] == "2.0" and rows[1]["size_mb"] == "3.000"
    assert set(rows[0]) >= {"p95_ms", "p99_ms", "fps", "peak_rss_mb", "threads"}
    m = bm.mlflow_metrics(_doc())
    assert m["int8_256.p50_ms"] == 5.0 and m["int8_256.speedup_p50_vs_fp32"] == 2.0 and m["fp32_256.peak_rss_mb"] == 80


def test_headline_is_three_latency_numbers_the_repro_check_ignores() -> None:
    doc = _doc()
    doc["results"]["640"] = {"fp32": doc["results"]["256"]["fp32"]}  # another size: not the headline
    h = bm.headline(doc, 256)
    assert h == {"fp32_p50_ms": 10.0, "int8_p50_ms": 5.0, "int8_speedup": 2.0}
    assert bm.headline(doc, 320) == h  # the stage models' size not measured: the first size
    # Latency is not bit-reproducible: every headline key must be one the repro check skips.
    ignored = load_params("repro_check", ReproCheckParams).ignore_metrics
    assert all(any(fnmatch.fnmatchcase(k, pat) for pat in ignored) for k in h), (h, ignored)


def test_params_validation(repo_params: dict) -> None:
    p = dict(tiny_params(repo_params)["benchmark"])
    assert build(BenchmarkParams, p, "benchmark", F).imgsz == (64, 96)
    for bad, msg in (({"imgsz": [100]}, "multiples of 32"), ({"imgsz": [64, 64]}, "twice"),
                     ({"imgsz": []}, "multiples"),
                     ({"variants": ["fp32", "fp32"]}, "distinct"), ({"variants": ["fp16"]}, "choose one of"),
                     ({"runs": 0}, ">= 1"), ({"conf": 1.5}, r"\(0, 1\)"), ({"frames": 0}, ">= 1")):
        with pytest.raises(ValueError, match=msg):
            build(BenchmarkParams, {**p, **bad}, "benchmark", F)


# ------------------------------------------------------------------------------------------
# With real models (the tiny pipeline, about a minute: slow)
# ------------------------------------------------------------------------------------------


def _inputs(q: dict[str, Path], **over: Path) -> bm.BenchmarkInputs:
    fields = {"weights": q["weights"], "fp32": q["onnx"], "int8": q["int8"], "dynamic": q["dynamic"],
              "calibration": q["calibration"]}
    return bm.BenchmarkInputs(**{**fields, **over})


@pytest.mark.slow
def test_rebuilt_calibration_tensors_match_the_calibrate_stage(quantized: dict[str, Path], tmp_path: Path) -> None:  # noqa: F811
    set_dir = quantized["calibration"] / "camera"
    same = rebuild_calibration_tensors(set_dir, 64)
    assert np.array_equal(same, load_calibration_tensors(set_dir, 64)), "helper must reproduce the stage's tensors"
    assert rebuild_calibration_tensors(set_dir, 96).shape == (len(same), 3, 96, 96)
    # A frame that changed since calibration is an error, not a silently different set.
    manifest = json.loads((set_dir / "manifest.json").read_text())
    copy = tmp_path / "camera"
    copy.mkdir()
    frames = calibration_frame_paths(set_dir)
    manifest["frames"][0]["sha256"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="changed since.*re-run the calibrate stage"):
        rebuild_calibration_tensors(copy, 64)
    manifest["frames"][0]["path"] = "nope.jpg"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="nope.jpg.*not found"):
        calibration_frame_paths(copy)
    manifest["frames"] = []
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="no frames"):
        calibration_frame_paths(copy)
    assert frames[0].is_file()


@pytest.mark.slow
def test_peak_rss_is_per_model(quantized: dict[str, Path]) -> None:  # noqa: F811
    fp32 = bm.peak_rss(quantized["onnx"], 1, 2)
    int8 = bm.peak_rss(quantized["int8"], 1, 2)
    for r in (fp32, int8):
        assert 0 < r["baseline_rss_mb"] < r["peak_rss_mb"] < 2000
    # A fresh process each: not this (large) test process's peak, and the 4x smaller model needs less.
    assert int8["peak_rss_mb"] - int8["baseline_rss_mb"] < fp32["peak_rss_mb"] - fp32["baseline_rss_mb"]


@pytest.mark.slow
def test_stage_results_schema(quantized: dict[str, Path], tmp_path: Path) -> None:  # noqa: F811
    results, table = tmp_path / "b" / "results.json", tmp_path / "b" / "results.csv"
    samples = tmp_path / "b" / "latency_samples.csv"
    bm.main(["--weights", str(quantized["weights"]), "--model", str(quantized["onnx"]),
             "--int8", str(quantized["int8"]),
             "--dynamic", str(quantized["dynamic"]), "--calibration", str(quantized["calibration"]),
             "--results", str(results), "--csv", str(table), "--samples", str(samples),
             "--headline", str(tmp_path / "b" / "headline.json"), "--params", str(quantized["params"])])
    assert samples.read_text().startswith("imgsz,variant,run,latency_ms\n")
    doc = json.loads(results.read_text())
    p = load_params("benchmark", BenchmarkParams, quantized["params"])
    threads = load_params("base", BaseParams, quantized["params"]).threads
    assert doc["schema"] == 1 and doc["config"]["threads"] == threads
    assert sorted(doc["results"]) == sorted(str(s) for s in p.imgsz) == ["64", "96"]
    for row in doc["results"].values():
        assert sorted(row) == sorted(p.variants)  # JSON keys are sorted (stable bytes)
        for r in row.values():
            lat = r["latency_ms"]
            assert 0 < lat["min"] <= lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
            assert r["iterations"] == p.runs * p.rounds and r["fps"] > 0 and r["threads"] == doc["config"]["threads"]
            assert r["size_bytes"] > 0 and r["peak_rss_mb"] > r["model_rss_mb"] > 0 and len(r["model_sha256"]) == 64
        assert row["fp32"]["speedup_p50_vs_fp32"] == 1.0
        assert row["int8"]["size_bytes"] < 0.35 * row["fp32"]["size_bytes"]
    assert doc["results"]["64"]["int8"]["model"] == quantized["int8"].as_posix()  # the stage's own model at export size
    at64 = doc["results"]["64"]  # export.imgsz: the stage models' own size is the headline
    assert json.loads((tmp_path / "b" / "headline.json").read_text()) == {
        "fp32_p50_ms": at64["fp32"]["latency_ms"]["p50"], "int8_p50_ms": at64["int8"]["latency_ms"]["p50"],
        "int8_speedup": at64["int8"]["speedup_p50_vs_fp32"]}
    assert doc["results"]["96"]["fp32"]["model"].startswith("built for this run")
    assert "head=" in doc["results"]["96"]["int8"]["quantization"]  # the chosen candidate's config at the other size
    rows = list(csv.DictReader(table.open()))
    assert len(rows) == len(p.imgsz) * len(p.variants)


@pytest.mark.slow
def test_missing_or_corrupt_model_fails_before_building(quantized: dict[str, Path], tmp_path: Path) -> None:  # noqa: F811
    p = load_params("benchmark", BenchmarkParams, quantized["params"])
    q = load_params("quantize", QuantizeParams, quantized["params"])
    e = load_params("export", ExportParams, quantized["params"])
    base = load_params("base", BaseParams, quantized["params"])
    with pytest.raises(ValueError, match="missing.onnx not found; run the quantize stage"):
        bm.benchmark(_inputs(quantized, int8=tmp_path / "missing.onnx"), p, q, e, base)
    bad = tmp_path / "corrupt.onnx"
    bad.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ValueError, match="not a readable ONNX model"):
        bm.benchmark(_inputs(quantized, dynamic=bad), p, q, e, base)
    with pytest.raises(ValueError, match="not a readable ONNX model.*export"):
        bm.benchmark(_inputs(quantized, fp32=bad), p, q, e, base)
