"""`fab provision`: a venv from nothing on a real sshd test host, from a wheelhouse built for its platform.

The wheelhouse needs the package index once (pip's cache afterwards); it is built once per module
(`wheelhouse` fixture) for this machine's python, and the provision reuses it from the cache.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from pipeline.fleet import provision as prov
from pipeline.fleet.artifacts import runtime_bundle
from pipeline.fleet.inventory import load_inventory
from pipeline.fleet.results import format_table

# The device's base python: the interpreter the repo venv was made from, NOT the venv (whose
# torch, ultralytics... must not leak into the device's venv).
BASE_PYTHON = sys._base_executable  # type: ignore[attr-defined]
REPO = Path(__file__).resolve().parents[2]
WORKSTATION_ONLY = ("torch", "ultralytics", "dvc", "mlflow", "onnx", "fabric")


def _target_of(python: str) -> prov.Target:
    """The wheelhouse target of a python on this machine (what the SSH probe finds on the device)."""
    args = {"deploy_dir": ".", "venv": "/nonexistent", "marker": "m"}
    call = f"\nimport json, sys\njson.dump(_device_facts({args!r}), sys.stdout)"
    source = inspect.getsource(prov._device_facts) + call
    out = subprocess.run([python, "-c", source], capture_output=True, text=True, check=True).stdout
    return prov.Target.from_facts(json.loads(out))


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, prov.Wheelhouse]:
    """(runtime source, cache dir, wheelhouse) for this machine's base python: one pip download per module.

    The runtime is a snapshot of runtime/'s shipped files, so edits in the checkout during the
    test cannot change the wheelhouse between the build and the provision.
    """
    runtime = tmp_path_factory.mktemp("runtime-src")
    for rel, path in runtime_bundle(REPO / "runtime").files.items():
        (runtime / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, runtime / rel)
    cache = tmp_path_factory.mktemp("wheelhouse-cache")
    start = time.perf_counter()
    wh = prov.build_wheelhouse(_target_of(BASE_PYTHON), runtime_root=runtime, cache_dir=cache)
    print(f"wheelhouse {wh.name}: {len(wh.pins)} wheels, {wh.size / 1e6:.1f} MB in {time.perf_counter() - start:.1f} s")
    return runtime, cache, wh


def _pip_list(python: Path) -> dict[str, str]:
    out = subprocess.run([str(python), "-m", "pip", "--isolated", "list", "--format", "json"], capture_output=True,
                         text=True, check=True).stdout
    return {p["name"].lower(): p["version"] for p in json.loads(out)}


@pytest.mark.slow
@pytest.mark.ssh
def test_provision_fresh_venv_then_unchanged(sshd_fleet: Any, wheelhouse: tuple[Path, Path, prov.Wheelhouse]) -> None:
    runtime, cache, wh = wheelhouse
    pi, jet = sshd_fleet.start("pi1"), sshd_fleet.start("jet1")
    venvs = {h.name: h.root / "edge-defect-venv" for h in (pi, jet)}
    # jet1 is a Jetson running ONNX Runtime: its venv must see the system's packages (JetPack's tensorrt).
    inv = load_inventory(sshd_fleet.inventory({"pis": [
        (pi, {"python": str(venvs["pi1"] / "bin" / "python")}),
        (jet, {"python": str(venvs["jet1"] / "bin" / "python"), "kind": "jetson"})]}))
    kw: dict[str, Any] = {"base_python": BASE_PYTHON, "runtime_root": runtime, "cache_dir": cache}

    start = time.perf_counter()
    first = prov.provision(inv, group="pis", **kw)
    print(format_table(first.command, first.results, first.wall_s), f"(first: {time.perf_counter() - start:.1f} s)")
    for r in first.results:
        assert r.ok and r.outcome == "provisioned", r.error
        assert r.release == wh.name and r.bytes_sent == wh.size  # the cached wheelhouse, all of it sent
    house = pi.deploy_dir / "wheelhouse" / wh.name
    assert sorted(p.name for p in house.iterdir()) == sorted(wh.bundle.files)
    assert not list((pi.deploy_dir / "wheelhouse").glob(".*.partial"))
    cfg = {name: (v / "pyvenv.cfg").read_text() for name, v in venvs.items()}
    assert "include-system-site-packages = false" in cfg["pi1"]
    assert "include-system-site-packages = true" in cfg["jet1"]

    # The venv runs the runtime from its own site-packages, with only the device's packages.
    python = venvs["pi1"] / "bin" / "python"
    info = json.loads(subprocess.run([str(python), "-m", "edge_runtime", "info"], cwd="/", capture_output=True,
                                     text=True, check=True).stdout)
    assert info["versions"]["onnxruntime"] and info["versions"]["opencv"] and info["versions"]["numpy"]
    where = subprocess.run([str(python), "-c", "import edge_runtime; print(edge_runtime.__file__)"], cwd="/",
                           capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(venvs["pi1"]))
    packages = _pip_list(python)
    assert {"edge-defect-runtime", "numpy", "onnxruntime", "opencv-python-headless"} <= set(packages)
    assert not set(WORKSTATION_ONLY) & set(packages), packages
    assert packages == {p.split("==")[0].split("[")[0].lower(): p.split("==")[1] for p in wh.pins}

    # Again: the markers name this wheelhouse, so nothing is sent and nothing reinstalled.
    second = prov.provision(inv, group="pis", **kw)
    print(format_table(second.command, second.results, second.wall_s))
    for again in second.results:
        assert again.outcome == "unchanged" and again.bytes_sent == 0 and "install" not in again.timings

    # --force reinstalls into the existing venv from the wheelhouse already on the device.
    forced = prov.provision(inv, host="pi1", force=True, **kw).results[0]
    assert forced.outcome == "provisioned" and forced.bytes_sent == 0, forced.error
    assert _pip_list(python) == packages


def test_platform_without_wheels_names_the_package(tmp_path: Path) -> None:
    # No project publishes m68k wheels: pip's failure becomes one line naming the package and the platform.
    target = prov.Target((3, 11), "m68k", (2, 36))
    with pytest.raises(prov.ProvisionError, match=r"no wheel of (numpy|opencv-python-headless|onnxruntime) .*m68k"):
        prov.build_wheelhouse(target, cache_dir=tmp_path)
    with pytest.raises(prov.ProvisionError, match="requires Python >=3.8"):
        prov.build_wheelhouse(prov.Target((3, 7), "x86_64", (2, 36)), cache_dir=tmp_path)


def test_pip_failure_messages() -> None:
    pi32 = prov.Target.from_facts({"implementation": "cpython", "python": [3, 11, 2], "machine": "aarch64", "bits": 32,
                                   "libc": ["glibc", "2.36"], "executable": "/usr/bin/python3"})
    assert pi32.arch == "armv7l" and pi32.platform_tags()[-1] == "manylinux2014_armv7l"
    out = ("ERROR: Could not find a version that satisfies the requirement onnxruntime>=1.16 (from versions: none)\n"
           "ERROR: No matching distribution found for onnxruntime>=1.16\n")
    assert pi32.describe() in prov.pip_failure(out, pi32) and "no wheel of onnxruntime " in prov.pip_failure(out, pi32)
    offline = "WARNING: Retrying ... Failed to establish a new connection: [Errno 101] Network is unreachable\n" + out
    assert "unreachable" in prov.pip_failure(offline, pi32)
    with pytest.raises(prov.ProvisionError, match="only glibc"):
        prov.Target.from_facts({"implementation": "cpython", "python": [3, 11, 2], "machine": "aarch64", "bits": 64,
                                "libc": ["", ""], "executable": "/usr/bin/python3"})


def test_hosts_that_cannot_be_provisioned_are_refused_before_connecting() -> None:
    inv = load_inventory(REPO / "inventory.yaml")
    with pytest.raises(prov.ProvisionInputError, match="kind local"):
        prov.provision(inv, group="local")
    # The committed Jetsons run JetPack's /usr/bin/python3: provision needs a venv path instead.
    with pytest.raises(prov.ProvisionInputError, match=r"not a venv's python .*system-site-packages"):
        prov.provision(inv, group="jetsons")
    pi = inv.groups["pis"][0]
    assert prov.venv_of(pi) == "/home/pi/edge-defect-venv"
    with pytest.raises(prov.ProvisionInputError, match="not a venv"):
        prov.venv_of(replace(pi, python="/usr/local/bin/python3"))
    with pytest.raises(prov.ProvisionInputError, match="--base-python"):
        prov.provision(inv, group="pis", base_python="python3; rm -rf /")


def test_stage_reuses_wheels_of_an_older_wheelhouse(tmp_path: Path) -> None:
    # The device side of the push, run here: a new wheelhouse (say, only the runtime wheel changed)
    # hard-links the wheels an older one already holds and asks only for the rest.
    old = tmp_path / "wheelhouse" / "aaaaaaaaaaaa"
    old.mkdir(parents=True)
    (old / "numpy-2.0-x.whl").write_bytes(b"numpy")
    sha = hashlib.sha256(b"numpy").hexdigest()
    files = {"numpy-2.0-x.whl": [sha, 5], "edge_defect_runtime-0.1.0-py3-none-any.whl": ["0" * 64, 3]}
    args = {"deploy_dir": str(tmp_path), "kind": "wheelhouse", "name": "bbbbbbbbbbbb", "files": files}
    state = prov._device_stage(args)
    assert state["need"] == ["edge_defect_runtime-0.1.0-py3-none-any.whl"] and state["linked"] == ["numpy-2.0-x.whl"]
    staged = Path(state["stage"]) / "numpy-2.0-x.whl"
    assert staged.stat().st_ino == (old / "numpy-2.0-x.whl").stat().st_ino
    assert prov._device_stage(args)["need"] == state["need"] and not prov._device_stage(args)["linked"]
    (tmp_path / "wheelhouse" / "bbbbbbbbbbbb").mkdir()
    assert prov._device_stage(args)["present"]
