"""The device runtime installs and runs alone: a fresh venv with only `pip install ./runtime` has
no torch, ultralytics, dvc or mlflow, and runs `health`, `bench`, `run` and the deploy helper on a
release the tests build. Installs numpy, opencv and onnxruntime from the package index (or pip's
cache), so it is `slow`.

Run on this interpreter with the newest dependencies pip picks, on a Python 3.8 (JetPack 5's
Python) where the machine has one besides this one (else skipped: vermin, in CI, holds the runtime
to 3.8), and on this interpreter with the LOWEST versions of numpy, opencv-python-headless and
onnxruntime that runtime/pyproject.toml's floors allow and the package index serves for Python 3.11
(skipped, saying why, on another Python or where the index cannot serve them). The floors and the
field they come from: docs/platforms.md."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict

import pytest

from edge_runtime.manifest import ThermalSettings
from edge_runtime.release import VariantFiles, assemble_release

REPO = Path(__file__).resolve().parents[2]
WORKSTATION_ONLY = {"torch", "torchvision", "ultralytics", "dvc", "mlflow", "onnx", "fabric", "pydantic"}
# The lowest versions the floors in runtime/pyproject.toml allow that the package index serves for
# CPython 3.11 on x86-64 (`pip index versions <name> --python-version 311 --only-binary :all:` and
# manylinux platforms, 2026-12-01): onnxruntime 1.18.0 (= the floor; its cp311 wheels start at 1.15.0,
# but 1.15-1.17 refuse the INT8 models quantize writes), which requires numpy>=1.24.2, above numpy's
# first cp311 wheel (1.23.2); opencv-python-headless's first 4.x wheel usable on 3.11 (cp36-abi3) is
# 4.5.5.64. Pinned together: pip's resolver must accept them as a set, and numpy stays below 2, which
# onnxruntime 1.18 and this OpenCV were not built for.
LOWEST_PYTHON = (3, 11)
LOWEST = {"numpy": "1.24.2", "opencv-python-headless": "4.5.5.64", "onnxruntime": "1.18.0"}
# pip's words for "the index has no such file" or "no index reachable": then the case is skipped.
UNSERVABLE = ("No matching distribution found", "Could not find a version that satisfies",
              "Failed to establish a new connection", "Temporary failure in name resolution",
              "Network is unreachable", "ProxyError", "Read timed out")

pytestmark = pytest.mark.slow


def _python38() -> str | None:
    """A working Python 3.8 interpreter on this machine (pyenv or PATH), or None.

    Each candidate is run once: a pyenv shim is on PATH even where no 3.8 is installed.
    """
    candidates = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.8*/bin/python3.8")))
    candidates += [p for p in (shutil.which("python3.8"),) if p]
    for candidate in candidates:
        probe = subprocess.run([candidate, "-c", "import sys, venv; print(sys.version_info[:2] == (3, 8))"],
                               capture_output=True, text=True)
        if probe.returncode == 0 and probe.stdout.strip() == "True":
            return candidate
    return None


def _floors() -> Dict[str, str]:
    """{distribution: lower bound} from runtime/pyproject.toml's dependencies (all `name>=version`)."""
    import tomllib

    deps = tomllib.loads((REPO / "runtime" / "pyproject.toml").read_text())["project"]["dependencies"]
    return dict(d.replace(" ", "").split(">=", 1) for d in deps)


def _version(text: str) -> tuple:
    """`1.24.2` -> (1, 24, 2); a pre-release or local suffix ends the tuple."""
    import re

    return tuple(int(part) for part in re.match(r"\d+(?:\.\d+)*", text).group(0).split("."))


@pytest.fixture(scope="module", params=["this-python", "python3.8", "lowest"])
def runtime_venv(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new venv holding the runtime distribution and its dependencies, nothing else."""
    python = _python38() if request.param == "python3.8" else sys.executable
    if python is None:
        pytest.skip("no Python 3.8 on this machine (JetPack 5's Python); vermin checks the runtime's syntax")
    pins: list = []
    if request.param == "lowest":
        if sys.version_info[:2] != LOWEST_PYTHON:
            pytest.skip(f"the lowest-versions pins are the cp{LOWEST_PYTHON[0]}{LOWEST_PYTHON[1]} wheels; this is "
                        f"Python {sys.version_info[0]}.{sys.version_info[1]}")
        pins = [f"{name}=={version}" for name, version in LOWEST.items()]
    root = tmp_path_factory.mktemp(f"standalone-{request.param}")
    # Build from a copy: a non-editable install may leave build/ and *.egg-info in the source folder.
    src = root / "runtime-src"
    shutil.copytree(REPO / "runtime", src, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    venv = root / "venv"
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    p = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *pins, str(src)],
                       capture_output=True, text=True, timeout=900)
    if p.returncode != 0 and pins and any(s in p.stderr for s in UNSERVABLE):
        why = next(line for line in p.stderr.splitlines() if any(s in line for s in UNSERVABLE))
        pytest.skip(f"the package index cannot serve the lowest versions {' '.join(pins)}: {why.strip()[:300]}")
    assert p.returncode == 0, p.stderr[-3000:]
    return venv


def test_lowest_pins_are_the_floors() -> None:
    """The lowest-versions case tests the floors: each pin satisfies its floor, and onnxruntime's is
    the floor itself (numpy's is what that onnxruntime requires; opencv's the first wheel for 3.11)."""
    floors = _floors()
    assert set(floors) == set(LOWEST)
    for name, version in LOWEST.items():
        assert _version(version) >= _version(floors[name]), (name, version, floors[name])
    assert _version(LOWEST["onnxruntime"])[:2] == _version(floors["onnxruntime"])[:2]


def _run(venv: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    # cwd outside the repository and no PYTHONPATH: only the installed distribution can be imported.
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(cwd)}
    return subprocess.run([str(venv / "bin" / "python"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=env)


def test_only_the_runtime_and_its_three_dependencies(runtime_venv: Path, tmp_path: Path) -> None:
    p = _run(runtime_venv, "-m", "pip", "list", "--format", "json", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    versions = {d["name"].lower().replace("_", "-"): d["version"] for d in json.loads(p.stdout)}
    names = set(versions)
    assert {"edge-defect-runtime", "numpy", "opencv-python-headless", "onnxruntime"} <= names
    if "lowest" in runtime_venv.parent.name:
        assert {n: versions[n] for n in LOWEST} == LOWEST
    floors = _floors()
    assert all(_version(versions[n]) >= _version(v) for n, v in floors.items()), versions
    assert not names & WORKSTATION_ONLY, sorted(names & WORKSTATION_ONLY)
    where = _run(runtime_venv, "-c", "import edge_runtime, sys; print(edge_runtime.__file__)", cwd=tmp_path)
    assert str(runtime_venv) in where.stdout, where.stdout  # the installed copy, not the repository's


def test_health_bench_run_and_deploy_helper(runtime_venv: Path, tiny_model: Dict[str, Path], tmp_path: Path) -> None:
    sample = Path(sorted(glob.glob(str(tiny_model["dataset"] / "images" / "val" / "*")))[0])
    deploy = tmp_path / "deploy"
    release = deploy / "releases" / "r1"
    assemble_release(release, [VariantFiles("64", 64, tiny_model["onnx"])], sample, thermal=ThermalSettings(80.0, 70.0))
    os.symlink("releases/r1", deploy / "current")

    health = _run(runtime_venv, "-m", "edge_runtime", "health", "--release", str(deploy / "current"), cwd=tmp_path)
    assert health.returncode == 0, health.stderr
    assert json.loads(health.stdout.strip().splitlines()[-1])["ok"] is True

    out = tmp_path / "bench.json"
    bench = _run(runtime_venv, "-m", "edge_runtime", "bench", "--release", str(release), "--out", str(out),
                 "--warmup", "2", "--iterations", "10", cwd=tmp_path)
    assert bench.returncode == 0, bench.stderr
    assert json.loads(out.read_text())["iterations"] == 10

    run = _run(runtime_venv, "-m", "edge_runtime", "run", "--release", str(release), "--source", "synthetic:160x120",
               "--fps", "100", "--max-frames", "8", "--jsonl", "-", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout.splitlines()[-1])["summary"]["frames_captured"] == 8

    # The deploy helper, as the fleet runs it on a device before the runtime is there: source via -c.
    source = (REPO / "runtime" / "edge_runtime" / "deploy_ops.py").read_text()
    status = _run(runtime_venv, "-c", source, "status", json.dumps({"deploy_dir": str(deploy)}), cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    doc = json.loads(status.stdout)
    assert doc["current"] == "r1" and doc["exists"] is True


def test_int8_release(runtime_venv: Path, quantized: Dict[str, Path], tmp_path: Path) -> None:
    """The quantize stage's INT8 model (what a Pi runs), written by the workstation's onnxruntime
    quantizer, loads and passes `health` in this venv's onnxruntime (the lowest one included)."""
    import onnx

    model = quantized["int8"]
    meta = {p.key: p.value for p in onnx.load(str(model), load_external_data=False).metadata_props}
    sample = Path(sorted(glob.glob(str(quantized["dataset"] / "images" / "val" / "*")))[0])
    release = tmp_path / "releases" / "int8"
    assemble_release(release, [VariantFiles("64", 64, model)], sample, precision="int8",
                     output_format=meta.get("output_format", "yolov8-raw"))
    health = _run(runtime_venv, "-m", "edge_runtime", "health", "--release", str(release), cwd=tmp_path)
    assert health.returncode == 0, health.stderr
    assert json.loads(health.stdout.strip().splitlines()[-1])["ok"] is True
