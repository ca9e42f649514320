"""Conformance: every TensorRT attribute the backend uses, checked against the REAL `tensorrt` module.

The backend's tests run on `trt_doubles` (one double per API generation). This file checks those
doubles -- and so the backend -- against real TensorRT Python bindings, where they import: it runs
the backend on the double of the real module's generation, recording every attribute looked up
(hits and misses, feature probes included), and asserts that each hit exists in the real module and
each miss is absent from it; that every name a double declares exists for real; and that feature
detection and build plans come out the same on the real module. Only attribute lookups touch the
real module (no builder, no GPU), so it runs on a machine without one.

Where the real module comes from, in order: ``import tensorrt`` (JetPack, a GPU machine, a full pip
install), else ``import tensorrt_bindings`` (the standalone Python-bindings wheel of the same API).
Neither is a project dependency: on CI every test here is skipped with the reason.

Verified on 2026-12-01 on a machine without a GPU, with the bindings wheels from PyPI (the
``tensorrt`` / ``tensorrt-cuXX-libs`` wheels there are placeholders that download libnvinfer from
NVIDIA's own index, which was unreachable): tensorrt-bindings 8.6.1 (the nearest real 8.x on PyPI;
the 8.5 names were also checked against NVIDIA/TensorRT tag 8.5.1, python/src/infer/pyCore.cpp),
tensorrt-cu12-bindings 10.3.0, 10.16.1.11 and 11.4.0.106 -- all four passed. The bindings link
libnvinfer/libnvonnxparser/libnvinfer_plugin, which those wheels do not contain; `prepare` below puts
stub libraries beside ``tensorrt.so`` that define the few C entry points it imports
(``createInferBuilder_INTERNAL``, ``getPluginRegistry``, ...; each returns NULL) so the real Python
module loads for attribute access. Nothing here calls into them. To reproduce (needs pip, binutils, cc)::

    python tests/runtime/test_tensorrt_conformance.py prepare /tmp/trt tensorrt-cu12-bindings==11.4.0.106
    PYTHONPATH=/tmp/trt/tensorrt-cu12-bindings-11.4.0.106 python -m pytest tests/runtime/test_tensorrt_conformance.py

(``tensorrt-bindings==8.6.1`` for 8.x.) With a real TensorRT installed, just run the file.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import pytest
import trt_doubles

from edge_runtime.backends import TensorRTBackend, plan_build, tensorrt_features


def _import_real() -> Tuple[Optional[Any], str]:
    """The real TensorRT module, or None and why not."""
    reasons = []
    for name in ("tensorrt", "tensorrt_bindings"):
        try:
            module = importlib.import_module(name)
        except Exception as e:  # ImportError, or OSError from a missing libnvinfer
            reasons.append(f"import {name}: {type(e).__name__}: {e}")
            continue
        if not isinstance(getattr(module, "__version__", None), str) or not hasattr(module, "Builder"):
            reasons.append(f"{name} is not TensorRT's Python module")
            continue
        return module, ""
    return None, "no real TensorRT Python module here (" + "; ".join(reasons) + \
        "); see this file's docstring to run it against the bindings wheels"


REAL, WHY_NOT = _import_real()
pytestmark = pytest.mark.skipif(REAL is None, reason=WHY_NOT)


def _generation(real: Any) -> str:
    """The double that models `real` (its major version; 8.x -> the 8.5 double, 8.5 being the minimum)."""
    major = str(real.__version__).split(".")[0]
    return {"8": "8.5", "10": "10", "11": "11"}.get(major, "11")


def _owner(real: Any, owner: str) -> Any:
    return real if owner == "tensorrt" else getattr(real, owner)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    return trt_doubles.make_models(tmp_path_factory.mktemp("conformance_models"))


def test_feature_detection_matches_the_double() -> None:
    generation = _generation(REAL)
    double = trt_doubles.make_tensorrt(generation, trt_doubles.FakeGpu())
    assert tensorrt_features(REAL) == tensorrt_features(double), f"TensorRT {REAL.__version__} vs {generation} double"


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_build_plans_on_the_real_module(precision: str) -> None:
    generation = _generation(REAL)
    double = trt_doubles.make_tensorrt(generation, trt_doubles.FakeGpu())
    fp32, fp16 = Path("m.onnx"), Path("m.fp16.onnx")
    assert plan_build(REAL, precision, fp32, fp16) == plan_build(double, precision, fp32, fp16)


def test_every_attribute_the_backend_uses_is_real(models: Dict[str, Path], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    generation = _generation(REAL)
    trt, _ = trt_doubles.install(monkeypatch, generation)
    x = np.zeros((1, 3, 32, 32), np.float32)
    for precision in ("fp32", "fp16", "int8"):
        source = models["qdq"] if precision == "int8" else models["fp32"]
        b = TensorRTBackend(source, tmp_path / precision, precision, 64, fp16_onnx_path=models["fp16"])
        b.infer(x)
        b.describe()
        b.close()
    accessed = trt._recorder.accessed
    assert ("IExecutionContext", "execute_async_v3") in accessed and ("BuilderFlag", "FP16") in accessed
    wrong = []
    for (owner, name), found in sorted(accessed.items()):
        real_has = hasattr(_owner(REAL, owner), name)
        if real_has != found:
            wrong.append(f"{owner}.{name}: double {'has' if found else 'lacks'} it, "
                         f"TensorRT {REAL.__version__} {'has' if real_has else 'lacks'} it")
    assert not wrong, "\n".join(wrong)


def test_the_double_declares_only_real_names() -> None:
    generation = _generation(REAL)
    missing = [f"{owner}.{name}" for owner, names in trt_doubles.api_surface(generation).items()
               for name in names if not hasattr(_owner(REAL, owner), name)]
    assert not missing, f"the {generation} double declares names TensorRT {REAL.__version__} lacks: {missing}"


def prepare(folder: Path, requirement: str) -> Path:
    """Download a TensorRT bindings wheel (`requirement`, e.g. tensorrt-cu12-bindings==11.4.0.106),
    unpack it under `folder`, and put stub libnv* libraries beside tensorrt.so so it imports for
    attribute access. Returns the folder to put on PYTHONPATH. A developer tool (network, cc)."""
    import subprocess
    import zipfile

    wheels = folder / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(wheels),
                    requirement], check=True)
    name, _, version = requirement.partition("==")
    wheel = sorted(wheels.glob(f"{name.replace('-', '_')}-{version}*.whl"))[-1]
    target = folder / f"{name}-{version}"
    zipfile.ZipFile(wheel).extractall(target)
    so = next(target.glob("*/tensorrt.so"))
    undefined = subprocess.run(["nm", "-D", "--undefined-only", str(so)], check=True, capture_output=True,
                               text=True).stdout.split()
    # The TensorRT entry points: not Python's, not libc/libstdc++'s (those carry @VERSION or are Py*/_Py*).
    symbols = sorted({s for s in undefined if s not in ("U", "w") and "@" not in s and not s.startswith(("Py", "_Py"))
                      and s not in ("dlopen", "dlsym", "dlclose", "dlerror", "pthread_once", "__gmon_start__",
                                    "_ITM_deregisterTMCloneTable", "_ITM_registerTMCloneTable",
                                    "__pthread_key_create")})
    stub = so.parent / "stub.c"
    stub.write_text("".join(f"void* {s}(void){{return 0;}}\n" for s in symbols))
    needed = [line.split("[")[1].rstrip("]") for line in subprocess.run(
        ["readelf", "-d", str(so)], check=True, capture_output=True, text=True).stdout.splitlines()
        if "(NEEDED)" in line and "[libnv" in line]
    for lib in needed:  # RPATH is $ORIGIN: the loader finds them next to tensorrt.so
        subprocess.run(["cc", "-shared", "-fPIC", "-o", str(so.parent / lib), str(stub), f"-Wl,-soname,{lib}"],
                       check=True)
    return target


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "prepare":
        sys.exit("usage: python tests/runtime/test_tensorrt_conformance.py prepare FOLDER REQUIREMENT")
    print(prepare(Path(sys.argv[2]), sys.argv[3]))
