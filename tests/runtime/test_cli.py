"""The device CLI contract with pipeline/fleet, run exactly as a device runs it: a subprocess with
cwd = a folder holding only a copy of runtime/edge_runtime/ (the shipped runtime), so a stray import
from the workstation side fails here too."""

from __future__ import annotations

import glob
import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest

from edge_runtime.manifest import ThermalSettings
from edge_runtime.release import VariantFiles, assemble_release


@pytest.fixture
def release(tiny_model: Dict[str, Path], tmp_path: Path) -> Path:
    sample = Path(sorted(glob.glob(str(tiny_model["dataset"] / "images" / "val" / "*")))[0])
    out = tmp_path / "deploy" / "releases" / "r1"
    assemble_release(out, [VariantFiles("big", 64, tiny_model["onnx"]), VariantFiles("small", 64, tiny_model["onnx"])],
                     sample, thermal=ThermalSettings(80.0, 70.0))
    return out


def cli(runtime: Path, *args: str) -> subprocess.CompletedProcess:
    # A clean environment apart from what Python needs: the device has no PYTHONPATH to the repo.
    return subprocess.run([sys.executable, "-m", "edge_runtime", *args], cwd=runtime, capture_output=True,
                          text=True, timeout=300, env={"PATH": "/usr/bin:/bin", "HOME": str(runtime)})


def one_line_error(p: subprocess.CompletedProcess, *needles: str) -> None:
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_info(runtime: Path) -> None:
    p = cli(runtime, "info")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    for key in ("arch", "cores", "ram_mb", "os", "versions", "onnxruntime_providers", "tensorrt", "gpu", "thermal"):
        assert key in doc
    assert doc["versions"]["onnxruntime"]


def test_health_ok_then_tampered(runtime: Path, release: Path) -> None:
    p = cli(runtime, "health", "--release", str(release))
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["ok"] is True and doc["problems"] == [] and isinstance(doc["latency_ms"], float)
    assert doc["output_shape"] == [1, 10, 84] and doc["variant"] == "big"
    assert cli(runtime, "health", "--release", str(release), "--variant", "small").returncode == 0

    model = release / "model-big.onnx"
    model.write_bytes(model.read_bytes()[:-10] + b"0123456789")
    p = cli(runtime, "health", "--release", str(release))
    assert p.returncode == 1
    doc = json.loads(p.stdout)
    assert doc["ok"] is False and doc["problems"] == ["model-big.onnx: sha256 mismatch"]


def test_usage_errors_are_one_line(runtime: Path, release: Path, tmp_path: Path) -> None:
    one_line_error(cli(runtime, "health", "--release", str(tmp_path / "nope")), "not found", "--release")
    one_line_error(cli(runtime, "health", "--release", str(release), "--variant", "huge"),
                   "variant 'huge' not in this release", "big, small")
    one_line_error(cli(runtime, "bench", "--release", str(release), "--out", str(tmp_path / "b.json"),
                       "--iterations", "5", "--seconds", "1"), "not allowed with argument")
    one_line_error(cli(runtime, "frobnicate"), "invalid choice")
    one_line_error(cli(runtime, "run", "--release", str(release), "--source", str(tmp_path / "nope")),
                   "not a camera index, folder, video file")


def test_build_engine_without_tensorrt(runtime: Path, release: Path, tmp_path: Path) -> None:
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here; the gpu tests cover build-engine")
    except ImportError:
        pass
    p = cli(runtime, "build-engine", "--release", str(release), "--engines", str(tmp_path / "engines"))
    one_line_error(p, "TensorRT not available", "pip install pycuda")


def test_bench_writes_json_and_prints_one_line(runtime: Path, release: Path, tmp_path: Path) -> None:
    out = tmp_path / "results" / "bench.json"
    p = cli(runtime, "bench", "--release", str(release), "--out", str(out), "--warmup", "2", "--iterations", "10")
    assert p.returncode == 0, p.stderr
    assert len(p.stdout.strip().splitlines()) == 1 and "p50" in p.stdout
    doc = json.loads(out.read_text())
    assert doc["iterations"] == 10 and doc["latency_ms"]["p50"] > 0 and doc["device"]["cores"] >= 1


def test_run_synthetic_with_jsonl(runtime: Path, release: Path) -> None:
    p = cli(runtime, "run", "--release", str(release), "--source", "synthetic:160x120", "--fps", "100",
            "--max-frames", "15", "--jsonl", "-", "--no-adaptive", "--variant", "small")
    assert p.returncode == 0, p.stderr
    lines: List[dict] = [json.loads(ln) for ln in p.stdout.splitlines()]
    frames, summary = lines[:-1], lines[-1]["summary"]
    assert frames and all(f["variant"] == "small" and "detections" in f for f in frames)
    assert summary["frames_captured"] == 15 and summary["frames_handled"] == len(frames)
    assert summary["adaptive"] is False and summary["thermal_switches"] == []


def test_run_switches_down_on_hot_sensor(runtime: Path, release: Path, tmp_path: Path) -> None:
    zone = tmp_path / "root/sys/class/thermal/thermal_zone0"
    zone.mkdir(parents=True)
    (zone / "type").write_text("cpu-thermal\n")
    (zone / "temp").write_text("91000\n")  # simulated sensor: above throttle_c = 80
    p = cli(runtime, "run", "--release", str(release), "--source", "synthetic:160x120", "--fps", "100",
            "--max-frames", "10", "--thermal-root", str(tmp_path / "root"), "--check-interval", "0",
            "--min-dwell", "0")
    assert p.returncode == 0, p.stderr
    summary = json.loads(p.stdout.splitlines()[-1])["summary"]
    assert summary["adaptive"] is True
    assert [(s["from"], s["to"], s["temp_c"]) for s in summary["thermal_switches"]] == [("big", "small", 91.0)]
    assert set(summary["variant_frames"]) == {"small"}
    assert "thermal switch big -> small" in p.stderr
