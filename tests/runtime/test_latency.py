"""Benchmark: percentile maths, argument validation, the JSON document's schema, soak windows.

Temperatures come from a fake /sys tree in tmp (this machine may have no thermal zones)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_runtime.latency import BenchError, benchmark_release, percentiles, summary_line
from edge_runtime.thermal import ThermalReader


def fake_sys(root: Path, celsius: float) -> ThermalReader:
    zone = root / "sys/class/thermal/thermal_zone0"
    zone.mkdir(parents=True, exist_ok=True)
    (zone / "type").write_text("cpu-thermal\n")
    (zone / "temp").write_text(f"{int(celsius * 1000)}\n")
    return ThermalReader(root, runner=lambda argv: None)


def test_percentiles() -> None:
    p = percentiles([i / 1000 for i in range(1, 101)])  # 1..100 ms
    assert p["p50"] == 50.5 and p["p99"] == 99.01 and p["min"] == 1.0 and p["max"] == 100.0 and p["mean"] == 50.5
    assert percentiles([])["p50"] is None


@pytest.mark.parametrize("kwargs,message", [
    ({"iterations": 5, "seconds": 1.0}, "--iterations and --seconds both set"),
    ({}, "no steady-state window"),
    ({"iterations": 0}, "--iterations 0 must be >= 1"),
    ({"soak_minutes": -1.0}, "--soak-minutes -1.0 must be > 0"),
    ({"iterations": 5, "warmup": -1}, "--warmup -1"),
])
def test_bad_arguments(kwargs: dict, message: str, tmp_path: Path) -> None:
    with pytest.raises(BenchError, match=message):
        benchmark_release(tmp_path, **kwargs)


def test_document_schema(release: Path, tmp_path: Path) -> None:
    reader = fake_sys(tmp_path / "root", 47.5)
    doc = benchmark_release(release, warmup=2, iterations=20, thermal=reader, sample_interval_s=0.01)
    json.dumps(doc)  # JSON-able as is
    assert doc["schema"] == 1 and doc["kind"] == "device-benchmark" and doc["variant"] == "64"
    assert doc["iterations"] == 20 and doc["fps"] > 0 and doc["peak_rss_mb"] > 0
    lat = doc["latency_ms"]
    assert lat["min"] <= lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert set(doc["stages_ms"]) == {"preprocess", "infer", "postprocess"}
    assert doc["input"]["image"].startswith("health_sample:")
    th = doc["thermal"]
    assert th["start_c"] == th["end_c"] == th["max_c"] == 47.5 and th["samples"] >= 2
    assert th["start"]["zones"] == {"cpu-thermal": 47.5} and "freq_ratio" in th["end"]
    dev = doc["device"]
    for key in ("arch", "cores", "ram_mb", "os", "versions", "tensorrt", "gpu", "model"):
        assert key in dev
    assert dev["versions"]["onnxruntime"] and dev["versions"]["numpy"] and dev["versions"]["opencv"]
    assert doc["backend_info"]["backend"] == "onnxruntime" and len(doc["backend_info"]["model_sha256"]) == 64
    assert doc["soak"] is None
    assert "p50" in summary_line(doc) and "47.5" in summary_line(doc)


def test_soak_reports_windows_and_drift(release: Path, tmp_path: Path) -> None:
    reader = fake_sys(tmp_path / "root", 50.0)
    doc = benchmark_release(release, warmup=1, soak_minutes=0.01, thermal=reader, sample_interval_s=0.05)
    soak = doc["soak"]
    assert len(soak["windows"]) == 10
    assert sum(w["iterations"] for w in soak["windows"]) == doc["iterations"]
    assert isinstance(soak["p50_drift_pct"], float)
    assert soak["windows"][0]["t_start_s"] == 0.0
    assert "soak p50 drift" in summary_line(doc)
