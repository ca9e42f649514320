"""Backends: ONNX Runtime on the tiny model, clear errors, TensorRT engine key + build/reuse logic.

No GPU here: the TensorRT engine-cache logic runs against `FakeTensorRT`, a test double for the
`tensorrt` module ONLY (its builder returns fixed bytes); everything else -- hashing, keys, the
reuse decision, atomic writes, sidecars, timing cache files -- is the real code. Real engine
builds are in the `gpu`-marked test, skipped where TensorRT/CUDA are missing.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pytest

from edge_runtime.backends import (
    BackendError,
    InputShapeError,
    OrtBackend,
    TensorRTBackend,
    TensorRTUnavailable,
    create_backend,
    engine_key,
    ensure_engine,
    import_tensorrt,
    parse_names,
    plan_engine,
)
from edge_runtime.manifest import OrtSettings
from edge_runtime.preprocess import preprocess

SHA = "ab" * 32


# --------------------------------------------------------------------------- ONNX Runtime

def test_ort_backend_runs_and_describes(tiny_model: Dict[str, Path]) -> None:
    import onnxruntime as ort

    image = np.full((80, 120, 3), 90, np.uint8)
    tensor, _ = preprocess(image, 64)
    plain = ort.InferenceSession(str(tiny_model["onnx"]), providers=["CPUExecutionProvider"])
    want = plain.run(None, {plain.get_inputs()[0].name: tensor})[0]
    for io_binding in (True, False):
        b = OrtBackend(tiny_model["onnx"], OrtSettings(threads=1, graph_optimization="extended"), io_binding=io_binding)
        b.load()
        out = b.infer(tensor)
        assert len(out) == 1 and out[0].shape == (1, 10, 84)
        np.testing.assert_allclose(out[0], want, atol=1e-4)
        d = b.describe()
        assert d["io_binding"] is io_binding and d["providers"] == ["CPUExecutionProvider"]
        assert d["input_shape"] == [1, 3, 64, 64] and d["threads"] == 1 and len(d["model_sha256"]) == 64
        assert b.metadata["output_format"] == "yolov8-raw"
        assert parse_names(b.metadata["names"])[0] == "crazing"
    # copy=True hands out independent arrays; copy=False the reused output buffer.
    b = OrtBackend(tiny_model["onnx"], OrtSettings(threads=1))
    first, second = b.infer(tensor)[0], b.infer(tensor)[0]
    assert first is not second
    assert b.infer(tensor, copy=False)[0] is b.infer(tensor, copy=False)[0]


def test_ort_errors(tiny_model: Dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="not found; redeploy"):
        OrtBackend(tmp_path / "missing.onnx", OrtSettings(threads=1)).load()
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx model")
    with pytest.raises(BackendError, match="cannot load"):
        OrtBackend(bad, OrtSettings(threads=1)).load()
    b = OrtBackend(tiny_model["onnx"], OrtSettings(threads=1))
    with pytest.raises(InputShapeError, match=r"expects \(1, 3, 64, 64\)"):
        b.infer(np.zeros((1, 3, 32, 32), np.float32))
    with pytest.raises(InputShapeError, match="expects float32"):
        b.infer(np.zeros((1, 3, 64, 64), np.float64))
    with pytest.raises(BackendError, match="add CPUExecutionProvider"):
        OrtBackend(tiny_model["onnx"], OrtSettings(threads=1, providers=("NoSuchExecutionProvider",))).load()
    with pytest.raises(BackendError, match="graph_optimization 'max' unknown"):
        OrtBackend(tiny_model["onnx"], OrtSettings(threads=1, graph_optimization="max")).load()
    with pytest.raises(BackendError, match="threads is 0"):
        OrtBackend(tiny_model["onnx"], OrtSettings(threads=0)).load()
    # Providers the device lacks are filtered out, keeping the manifest's order for the rest.
    b = OrtBackend(tiny_model["onnx"], OrtSettings(threads=1, providers=("NoSuchExecutionProvider",
                                                                         "CPUExecutionProvider")))
    b.load()
    assert b.describe()["providers"] == ["CPUExecutionProvider"]


def test_backend_selection(tmp_path: Path) -> None:
    assert isinstance(create_backend("onnxruntime", tmp_path / "m.onnx", OrtSettings(threads=1)), OrtBackend)
    assert isinstance(create_backend("tensorrt", tmp_path / "m.onnx", OrtSettings(threads=1), tmp_path, "fp16", 256),
                      TensorRTBackend)
    with pytest.raises(BackendError, match="needs an engines folder"):
        create_backend("tensorrt", tmp_path / "m.onnx", OrtSettings(threads=1))
    with pytest.raises(BackendError, match="backend 'openvino' unknown"):
        create_backend("openvino", tmp_path / "m.onnx", OrtSettings(threads=1))


# --------------------------------------------------------------------------- TensorRT without a GPU

def test_tensorrt_missing_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` fail on any machine
    with pytest.raises(TensorRTUnavailable, match="TensorRT not available.*pip install pycuda"):
        import_tensorrt()
    with pytest.raises(TensorRTUnavailable, match="TensorRT not available"):
        TensorRTBackend(tmp_path / "m.onnx", tmp_path, "fp16", 256).load()


def test_engine_key() -> None:
    key = engine_key(SHA, "10.3.0", "Orin (nvgpu)", "fp16")
    assert key == f"{SHA[:16]}-trt10.3.0-orin-nvgpu-fp16"
    assert key == engine_key(SHA, "10.3.0", "Orin (nvgpu)", "fp16")
    variants = {engine_key("cd" * 32, "10.3.0", "Orin", "fp16"), engine_key(SHA, "10.4.0", "Orin", "fp16"),
                engine_key(SHA, "10.3.0", "Xavier", "fp16"), engine_key(SHA, "10.3.0", "Orin", "int8"),
                engine_key(SHA, "10.3.0", "Orin", "fp16")}
    assert len(variants) == 5  # each of the four parts changes the key
    with pytest.raises(BackendError, match="precision 'bf16' unknown"):
        engine_key(SHA, "10.3.0", "Orin", "bf16")
    with pytest.raises(BackendError, match="not 64 hex digits"):
        engine_key("abc", "10.3.0", "Orin", "fp16")


class FakeTensorRT:
    """Test double for the `tensorrt` module: records what the builder was asked to do."""

    class Logger:
        WARNING = 2

        def __init__(self, level: int) -> None:
            self.level = level

    class MemoryPoolType:
        WORKSPACE = "workspace"

    class BuilderFlag:
        FP16 = "fp16"
        INT8 = "int8"

    def __init__(self, version: str = "10.3.0", parse_ok: bool = True) -> None:
        self.__version__ = version
        self.parse_ok = parse_ok
        self.builds: List[Dict[str, Any]] = []
        fake = self

        class Config:
            def __init__(self) -> None:
                self.flags: List[str] = []
                self.pool: Dict[str, int] = {}
                self.cache: Any = None

            def set_memory_pool_limit(self, pool: str, size: int) -> None:
                self.pool[pool] = size

            def set_flag(self, flag: str) -> None:
                self.flags.append(flag)

            def create_timing_cache(self, blob: bytes) -> Any:
                return type("Cache", (), {"serialize": lambda s: blob + b"+timing"})()

            def set_timing_cache(self, cache: Any, ignore_mismatch: bool) -> bool:
                self.cache = cache
                return True

        class Builder:
            def __init__(self, logger: Any) -> None:
                pass

            def create_network(self, flags: int) -> str:
                return "network"

            def create_builder_config(self) -> Config:
                return Config()

            def build_serialized_network(self, network: str, config: Config) -> bytes:
                fake.builds.append({"flags": list(config.flags), "workspace": config.pool.get("workspace"),
                                    "timing_cache": config.cache is not None})
                return f"engine-{fake.__version__}-{len(fake.builds)}".encode()

        class OnnxParser:
            num_errors = 1

            def __init__(self, network: str, logger: Any) -> None:
                pass

            def parse_from_file(self, path: str) -> bool:
                return fake.parse_ok

            def get_error(self, i: int) -> str:
                return "unsupported operator FooBar"

        self.Builder, self.OnnxParser = Builder, OnnxParser


def test_engine_build_then_reuse_then_rebuild(tmp_path: Path) -> None:
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"fake onnx")
    engines = tmp_path / "engines"
    trt = FakeTensorRT()
    first = ensure_engine(onnx, engines, "fp16", 512, True, trt, "Orin")
    assert not first.reused and first.path == engines / f"{first.key}.engine" and first.path.is_file()
    assert first.sha256 == hashlib.sha256(first.path.read_bytes()).hexdigest()
    assert trt.builds == [{"flags": ["fp16"], "workspace": 512 << 20, "timing_cache": True}]
    sidecar = json.loads((engines / f"{first.key}.json").read_text())
    assert sidecar["onnx_sha256"] == hashlib.sha256(b"fake onnx").hexdigest() and sidecar["gpu"] == "Orin"
    assert list(engines.glob("timing-*.cache")), "timing cache should be saved for the next build"
    assert not list(engines.glob(".*.tmp")), "atomic writes leave no temp files"

    again = ensure_engine(onnx, engines, "fp16", 512, True, trt, "Orin")
    assert again.reused and again.key == first.key and again.sha256 == first.sha256 and len(trt.builds) == 1

    # Any part of the key changing means a new engine; the old one stays for the old key.
    new_trt = FakeTensorRT(version="10.4.0")
    assert not ensure_engine(onnx, engines, "fp16", 512, True, new_trt, "Orin").reused
    int8 = ensure_engine(onnx, engines, "int8", 512, False, trt, "Orin")
    assert not int8.reused and trt.builds[-1] == {"flags": ["fp16", "int8"], "workspace": 512 << 20,
                                                  "timing_cache": False}
    onnx.write_bytes(b"fake onnx v2")
    assert ensure_engine(onnx, engines, "fp16", 512, True, trt, "Orin").key != first.key
    assert len(list(engines.glob("*.engine"))) == 4


def test_engine_plan_rejects_damaged_cache(tmp_path: Path) -> None:
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"fake onnx")
    trt = FakeTensorRT()
    r = ensure_engine(onnx, tmp_path, "fp16", 256, True, trt, "Orin")
    assert plan_engine(tmp_path, r.key).reuse
    r.path.write_bytes(b"torn")
    plan = plan_engine(tmp_path, r.key)
    assert not plan.reuse and "sha256 differs" in plan.reason
    rebuilt = ensure_engine(onnx, tmp_path, "fp16", 256, True, trt, "Orin")
    assert not rebuilt.reused and len(trt.builds) == 2
    (tmp_path / f"{r.key}.json").unlink()
    assert plan_engine(tmp_path, r.key).reason == "cached engine has no readable sidecar"
    assert plan_engine(tmp_path, "other").reason == "no cached engine for this key"


def test_engine_build_errors(tmp_path: Path) -> None:
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"fake onnx")
    with pytest.raises(BackendError, match="cannot parse model.onnx: unsupported operator FooBar"):
        ensure_engine(onnx, tmp_path, "fp16", 256, True, FakeTensorRT(parse_ok=False), "Orin")
    with pytest.raises(BackendError, match="workspace_mb is 0"):
        ensure_engine(onnx, tmp_path, "fp16", 0, True, FakeTensorRT(), "Orin")
    with pytest.raises(BackendError, match="not found"):
        ensure_engine(tmp_path / "nope.onnx", tmp_path, "fp16", 256, True, FakeTensorRT(), "Orin")


def _has_tensorrt() -> bool:
    try:
        import_tensorrt()[1].init()
        return True
    except Exception:
        return False


@pytest.mark.gpu
@pytest.mark.skipif(not _has_tensorrt(), reason="needs TensorRT + pycuda + an NVIDIA GPU")
def test_tensorrt_fp16_engine_matches_ort(tiny_model: Dict[str, Path], tmp_path: Path) -> None:
    image = np.full((80, 120, 3), 90, np.uint8)
    tensor, _ = preprocess(image, 64)
    ref = OrtBackend(tiny_model["onnx"], OrtSettings(threads=1)).infer(tensor)[0]
    b = TensorRTBackend(tiny_model["onnx"], tmp_path, "fp16", 1024)
    b.load()
    try:
        out = b.infer(tensor)[0]
        assert out.shape == ref.shape
        np.testing.assert_allclose(out[:, 4:], ref[:, 4:], atol=2e-2)  # scores, FP16
        assert not b.engine_result.reused
    finally:
        b.close()
    b2 = TensorRTBackend(tiny_model["onnx"], tmp_path, "fp16", 1024)
    b2.load()
    assert b2.engine_result.reused
    b2.close()
