"""The device runtime installs and runs alone: a fresh venv with only `pip install ./runtime` has
no torch, ultralytics, dvc or mlflow, and runs `health`, `bench`, `run` and the deploy helper on a
release the tests build. Installs numpy, opencv and onnxruntime from the package index (or pip's
cache), so it is `slow`.

Run twice where the machine has a Python 3.8 (JetPack 5's Python) besides this one: once on this
interpreter, once on 3.8. Where there is none, the 3.8 case is skipped and vermin (in CI) is
what holds the runtime to 3.8."""

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


@pytest.fixture(scope="module", params=["this-python", "python3.8"])
def runtime_venv(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new venv holding the runtime distribution and its dependencies, nothing else."""
    python = sys.executable if request.param == "this-python" else _python38()
    if python is None:
        pytest.skip("no Python 3.8 on this machine (JetPack 5's Python); vermin checks the runtime's syntax")
    root = tmp_path_factory.mktemp("standalone")
    # Build from a copy: a non-editable install may leave build/ and *.egg-info in the source folder.
    src = root / "runtime-src"
    shutil.copytree(REPO / "runtime", src, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    venv = root / "venv"
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    p = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(src)],
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    return venv


def _run(venv: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    # cwd outside the repository and no PYTHONPATH: only the installed distribution can be imported.
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(cwd)}
    return subprocess.run([str(venv / "bin" / "python"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=env)


def test_only_the_runtime_and_its_three_dependencies(runtime_venv: Path, tmp_path: Path) -> None:
    p = _run(runtime_venv, "-m", "pip", "list", "--format", "json", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    names = {d["name"].lower().replace("_", "-") for d in json.loads(p.stdout)}
    assert {"edge-defect-runtime", "numpy", "opencv-python-headless", "onnxruntime"} <= names
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
