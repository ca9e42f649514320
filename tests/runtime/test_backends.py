"""Backends: ONNX Runtime on the tiny model, clear errors, the TensorRT backend on TensorRT 8.5, 10 and 11.

No GPU here: the TensorRT path runs against `trt_doubles` -- a double of the `tensorrt` module per
API generation (exactly that generation's names; removed ones raise AttributeError) and of
pycuda -- whose "engine" runs the ONNX it was built from with ONNX Runtime. Everything else is the
real code. `test_tensorrt_conformance.py` checks the doubles against real TensorRT bindings; real
engine builds are in the `gpu`-marked test (and benchmarks/tensorrt_gpu.py), skipped without a GPU.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Dict

import numpy as np
import pytest
import trt_doubles

from edge_runtime.backends import (
    BackendError,
    BuildPlan,
    InputShapeError,
    OrtBackend,
    TensorRTBackend,
    TensorRTFeatures,
    TensorRTUnavailable,
    build_serialized_engine,
    create_backend,
    engine_key,
    ensure_engine,
    import_tensorrt,
    parse_names,
    plan_build,
    plan_engine,
    tensorrt_features,
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
# The TensorRT path runs against tests/runtime/trt_doubles.py: one double of the `tensorrt` module
# per API generation (8.5, 10, 11) with exactly that generation's names, plus a pycuda double on a
# fake GPU. Everything else -- feature detection, build plans, hashing, keys, the reuse decision,
# atomic writes, sidecars, timing cache files, buffers, copies, the detector -- is the real code.

@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    """Tiny YOLOv8-raw-shaped models: fp32, fp16 (float32 I/O) and symmetric-QDQ int8 (imgsz 32)."""
    return trt_doubles.make_models(tmp_path_factory.mktemp("trt_models"))


def _source(models: Dict[str, Path], precision: str) -> Path:
    """What the manifest's precision hands the backend: the QDQ model for int8, else the FP32 one."""
    return models["qdq"] if precision == "int8" else models["fp32"]


def _ort(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


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


# What each generation must be asked for: (typing, network flags, builder flags, source model) per precision.
EXPECTED_PLANS = {
    "8.5": {"fp32": ("weak", ["EXPLICIT_BATCH"], [], "fp32"),
            "fp16": ("weak", ["EXPLICIT_BATCH"], ["FP16"], "fp32"),
            "int8": ("weak", ["EXPLICIT_BATCH"], ["FP16", "INT8"], "qdq")},
    "10": {"fp32": ("weak", [], [], "fp32"),
           "fp16": ("weak", [], ["FP16"], "fp32"),
           "int8": ("weak", [], ["FP16", "INT8"], "qdq")},
    "11": {"fp32": ("strong", ["STRONGLY_TYPED"], [], "fp32"),
           "fp16": ("strong", ["STRONGLY_TYPED"], [], "fp16"),
           "int8": ("strong", ["STRONGLY_TYPED"], [], "qdq")},
}


@pytest.mark.parametrize("generation", trt_doubles.GENERATIONS)
def test_features_and_build_plans_per_generation(generation: str, models: Dict[str, Path]) -> None:
    trt = trt_doubles.make_tensorrt(generation, trt_doubles.FakeGpu())
    f = tensorrt_features(trt)
    assert f == TensorRTFeatures(fp16_flag=generation != "11", int8_flag=generation != "11",
                                 implicit_batch=generation == "8.5", strongly_typed_flag=generation != "8.5",
                                 tensor_io=True)
    for precision, (typing, net_flags, builder_flags, source) in EXPECTED_PLANS[generation].items():
        plan = plan_build(trt, precision, _source(models, precision), models["fp16"])
        assert (plan.typing, list(plan.network_flags), list(plan.builder_flags), plan.onnx_path) == (
            typing, net_flags, builder_flags, models[source]), precision
    # Detection is by feature, never by version string: a meaningless version changes no plan.
    plans = [plan_build(trt, p, _source(models, p), models["fp16"]) for p in ("fp32", "fp16", "int8")]
    trt.__version__ = "not-a-version"
    assert [plan_build(trt, p, _source(models, p), models["fp16"]) for p in ("fp32", "fp16", "int8")] == plans
    with pytest.raises(BackendError, match="precision 'bf16' unknown"):
        plan_build(trt, "bf16", models["fp32"])


def test_fp16_without_builder_flag_needs_the_fp16_onnx(models: Dict[str, Path]) -> None:
    trt11 = trt_doubles.make_tensorrt("11", trt_doubles.FakeGpu())
    with pytest.raises(BackendError, match=r"no BuilderFlag.FP16 .*FP16 ONNX \(models/yolov8n.fp16.onnx"):
        plan_build(trt11, "fp16", models["fp32"])
    # A 10.x build without the FP16 flag (feature detection, not the version) takes the strongly typed path.
    trt10 = trt_doubles.make_tensorrt("10", trt_doubles.FakeGpu())
    assert plan_build(trt10, "fp16", models["fp32"], models["fp16"]).typing == "weak"  # the flag wins where it exists
    type.__delattr__(trt10.BuilderFlag, "FP16")
    plan = plan_build(trt10, "fp16", models["fp32"], models["fp16"])
    assert (plan.typing, plan.network_flags, plan.builder_flags, plan.onnx_path) == (
        "strong", ("STRONGLY_TYPED",), (), models["fp16"])
    # An 8.x without the FP16 flag has no strongly typed networks either: no FP16 engine at all.
    trt85 = trt_doubles.make_tensorrt("8.5", trt_doubles.FakeGpu())
    type.__delattr__(trt85.BuilderFlag, "FP16")
    with pytest.raises(BackendError, match="neither BuilderFlag.FP16 nor strongly typed networks"):
        plan_build(trt85, "fp16", models["fp32"], models["fp16"])


@pytest.mark.parametrize("generation, removed", [
    ("11", "BuilderFlag.FP16"), ("11", "BuilderFlag.INT8"), ("11", "NetworkDefinitionCreationFlag.EXPLICIT_BATCH"),
    ("11", "Builder.platform_has_fast_fp16"), ("11", "Builder.platform_has_fast_int8"),
    ("11", "IBuilderConfig.int8_calibrator"), ("11", "IInt8EntropyCalibrator2"),
    ("10", "Builder.max_batch_size"), ("10", "Builder.build_engine"), ("10", "ICudaEngine.get_binding_index"),
    ("10", "ICudaEngine.num_bindings"), ("10", "IExecutionContext.execute_async_v2"),
    ("10", "IBuilderConfig.max_workspace_size"), ("10", "NetworkDefinitionCreationFlag.EXPLICIT_PRECISION"),
    ("8.5", "NetworkDefinitionCreationFlag.STRONGLY_TYPED"), ("8.5", "BuilderFlag.BF16"),
])
def test_removed_attributes_raise_attribute_error(generation: str, removed: str) -> None:
    obj: Any = trt_doubles.make_tensorrt(generation, trt_doubles.FakeGpu())
    *owners, last = removed.split(".")
    for name in owners:
        obj = getattr(obj, name)
    with pytest.raises(AttributeError):
        getattr(obj, last)


@pytest.mark.parametrize("generation", trt_doubles.GENERATIONS)
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_backend_builds_runs_and_reuses_on_every_generation(generation: str, precision: str, models: Dict[str, Path],
                                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trt, cuda = trt_doubles.install(monkeypatch, generation)
    gpu = cuda.gpu
    x = np.random.default_rng(1).random((1, 3, 32, 32), dtype=np.float32)
    b = TensorRTBackend(_source(models, precision), tmp_path, precision, 256, fp16_onnx_path=models["fp16"])
    b.load()
    assert gpu.context_stack == [], "load leaves no CUDA context pushed (infer may run on another thread)"
    typing, net_flags, builder_flags, source = EXPECTED_PLANS[generation][precision]
    build = trt._builds[-1]
    assert build["network_flags"] == net_flags and build["builder_flags"] == builder_flags
    assert build["strongly_typed"] is (generation == "11") and build["workspace"] == 256 << 20
    assert build["engine"]["precision"] == precision, "the engine runs at the precision the manifest asked for"
    out = b.infer(x)
    assert gpu.context_stack == []
    # The double runs the ONNX the engine was built from on the bytes copied to "device memory".
    np.testing.assert_allclose(out[0], _ort(models[source], x), rtol=1e-6, atol=1e-6)
    assert out[0].shape == (1, 10, 21) and out[0].dtype == np.float32
    assert b.infer(x, copy=False)[0] is b.infer(x, copy=False)[0]
    d = b.describe()
    assert d["engine_build"] == {"onnx_file": models[source].name, "precision": precision, "typing": typing,
                                 "network_flags": net_flags, "builder_flags": builder_flags}
    assert d["tensorrt"] == trt_doubles.VERSIONS[generation] and d["input_shape"] == [1, 3, 32, 32]
    key = b.engine_result.key
    assert key == engine_key(hashlib.sha256(models[source].read_bytes()).hexdigest(), trt.__version__,
                             "Orin (nvgpu)", precision)
    assert not b.engine_result.reused
    sidecar = json.loads((tmp_path / f"{key}.json").read_text())
    assert sidecar["build"] == d["engine_build"] and sidecar["tensorrt"] == trt.__version__
    b.close()
    assert gpu.context_stack == [] and not gpu.memory, "close frees every device buffer"

    again = TensorRTBackend(_source(models, precision), tmp_path, precision, 256, fp16_onnx_path=models["fp16"])
    again.load()
    assert again.engine_result.reused and again.engine_result.key == key and len(trt._builds) == 1
    np.testing.assert_allclose(again.infer(x)[0], out[0])
    again.close()


def test_detector_runs_tensorrt_releases(models: Dict[str, Path], tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The device path: release -> manifest -> load_detector -> TensorRTBackend on each generation."""
    import cv2

    from edge_runtime.detector import load_detector
    from edge_runtime.manifest import TensorRTSettings
    from edge_runtime.postprocess import check_output
    from edge_runtime.release import VariantFiles, assemble_release

    image = cv2.resize(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8), (64, 48))
    for generation in trt_doubles.GENERATIONS:
        trt_doubles.install(monkeypatch, generation)
        for precision in ("fp32", "fp16", "int8"):
            release = tmp_path / generation / precision
            manifest = assemble_release(release, [VariantFiles("32", 32, models["fp32"], models["qdq"])], None,
                                        backend="tensorrt", precision=precision, tensorrt=TensorRTSettings(256))
            if generation == "11" and precision == "fp16":
                # The detector hands the backend no FP16 ONNX yet: TensorRT 11 says what the release lacks.
                with pytest.raises(BackendError, match="no BuilderFlag.FP16"):
                    load_detector(release, manifest, manifest.variants[0], tmp_path / "engines")
                continue
            det = load_detector(release, manifest, manifest.variants[0], tmp_path / "engines")
            out, _ = det.infer_raw(image)
            assert check_output(out, det.spec) == []
            dets, times = det.detect(image)
            assert times.infer >= 0 and det.describe()["engine_build"]["precision"] == precision
            det.backend.close()


def test_cli_build_engine_on_a_double(models: Dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from edge_runtime.commands import cmd_build_engine
    from edge_runtime.manifest import TensorRTSettings
    from edge_runtime.release import VariantFiles, assemble_release

    trt, _ = trt_doubles.install(monkeypatch, "8.5")
    release = tmp_path / "deploy" / "releases" / "r1"
    assemble_release(release, [VariantFiles("32", 32, models["fp32"], models["qdq"])], None, backend="tensorrt",
                     precision="int8", tensorrt=TensorRTSettings(128, timing_cache=True))
    args = argparse.Namespace(release=str(release), variant=None, engines=None)
    assert cmd_build_engine(args) == 0
    doc = json.loads(capsys.readouterr().out)
    assert not doc["reused"] and doc["build"]["builder_flags"] == ["FP16", "INT8"]
    assert doc["build"]["onnx_file"] == "model-32.trt.onnx" and doc["build"]["network_flags"] == ["EXPLICIT_BATCH"]
    assert Path(doc["path"]).parent == tmp_path / "deploy" / "engines"
    assert cmd_build_engine(args) == 0 and json.loads(capsys.readouterr().out)["reused"]
    assert len(trt._builds) == 1


def test_cli_build_engine_fp16_on_tensorrt_11_uses_the_variants_fp16_onnx(
        models: Dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    import argparse
    import dataclasses
    import shutil

    from edge_runtime.commands import cmd_build_engine
    from edge_runtime.fileio import sha256_file
    from edge_runtime.manifest import FileEntry, TensorRTSettings, save_manifest
    from edge_runtime.release import VariantFiles, assemble_release

    trt, _ = trt_doubles.install(monkeypatch, "11")
    release = tmp_path / "deploy" / "releases" / "r1"
    m = assemble_release(release, [VariantFiles("32", 32, models["fp32"])], None, backend="tensorrt",
                         precision="fp16", tensorrt=TensorRTSettings(128))
    shutil.copyfile(models["fp16"], release / "model-32.fp16.onnx")
    entry = FileEntry(sha256_file(release / "model-32.fp16.onnx"), (release / "model-32.fp16.onnx").stat().st_size,
                      "fp16_onnx")
    save_manifest(dataclasses.replace(m, variants=(dataclasses.replace(m.variants[0],
                                                                       fp16_onnx_file="model-32.fp16.onnx"),),
                                      files={**m.files, "model-32.fp16.onnx": entry}), release)
    assert cmd_build_engine(argparse.Namespace(release=str(release), variant=None, engines=None)) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["build"] == {"onnx_file": "model-32.fp16.onnx", "precision": "fp16", "typing": "strong",
                            "network_flags": ["STRONGLY_TYPED"], "builder_flags": []}
    assert trt._builds[-1]["engine"]["precision"] == "fp16"
    assert doc["key"].startswith(entry.sha256[:16]), "the key hashes the ONNX the engine is built from"


def _ctx(cuda: Any) -> Any:
    """A current CUDA context for calling ensure_engine directly (the backend makes its own)."""
    cuda.init()
    return cuda.Device(0).make_context()


def test_engine_build_then_reuse_then_rebuild(models: Dict[str, Path], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(models["fp32"].read_bytes())
    engines = tmp_path / "engines"
    trt, cuda = trt_doubles.install(monkeypatch, "10")
    _ctx(cuda)
    first = ensure_engine(onnx, engines, "fp16", 512, True, trt, "Orin")
    assert not first.reused and first.path == engines / f"{first.key}.engine" and first.path.is_file()
    assert first.sha256 == hashlib.sha256(first.path.read_bytes()).hexdigest()
    assert [(b["builder_flags"], b["workspace"], b["timing_cache"]) for b in trt._builds] == [(["FP16"], 512 << 20,
                                                                                                True)]
    sidecar = json.loads((engines / f"{first.key}.json").read_text())
    assert sidecar["onnx_sha256"] == hashlib.sha256(onnx.read_bytes()).hexdigest() and sidecar["gpu"] == "Orin"
    caches = list(engines.glob("timing-*.cache"))
    assert caches and caches[0].read_bytes().endswith(b"|fp16|entry"), "timing cache saved for the next build"
    assert not list(engines.glob(".*.tmp")), "atomic writes leave no temp files"

    again = ensure_engine(onnx, engines, "fp16", 512, True, trt, "Orin")
    assert again.reused and again.key == first.key and again.sha256 == first.sha256 and len(trt._builds) == 1

    # Any part of the key changing means a new engine; the old one stays for the old key.
    newer = trt_doubles.make_tensorrt("10", cuda.gpu)
    newer.__version__ = "10.4.0"
    assert not ensure_engine(onnx, engines, "fp16", 512, True, newer, "Orin").reused
    assert not ensure_engine(onnx, engines, "fp16", 512, True, trt, "Xavier").reused
    int8 = ensure_engine(models["qdq"], engines, "int8", 512, False, trt, "Orin")
    assert not int8.reused and trt._builds[-1]["builder_flags"] == ["FP16", "INT8"]
    assert not trt._builds[-1]["timing_cache"]
    onnx.write_bytes(models["fp16"].read_bytes())  # a different model under the same name
    assert ensure_engine(onnx, engines, "fp16", 512, True, trt, "Orin").key != first.key
    assert len(list(engines.glob("*.engine"))) == 5


def test_engine_plan_rejects_damaged_cache(models: Dict[str, Path], tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    trt, cuda = trt_doubles.install(monkeypatch, "11")
    _ctx(cuda)
    r = ensure_engine(models["qdq"], tmp_path, "int8", 256, True, trt, "Orin")
    assert plan_engine(tmp_path, r.key).reuse
    r.path.write_bytes(b"torn")
    plan = plan_engine(tmp_path, r.key)
    assert not plan.reuse and "sha256 differs" in plan.reason
    rebuilt = ensure_engine(models["qdq"], tmp_path, "int8", 256, True, trt, "Orin")
    assert not rebuilt.reused and len(trt._builds) == 2
    (tmp_path / f"{r.key}.json").unlink()
    assert plan_engine(tmp_path, r.key).reason == "cached engine has no readable sidecar"
    assert plan_engine(tmp_path, "other").reason == "no cached engine for this key"


def test_engine_build_errors(models: Dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trt, cuda = trt_doubles.install(monkeypatch, "10")
    _ctx(cuda)
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not an onnx model")
    with pytest.raises(BackendError, match="cannot parse model.onnx: ModelImporter.cpp"):
        ensure_engine(bad, tmp_path, "fp16", 256, True, trt, "Orin")
    with pytest.raises(BackendError, match="workspace_mb is 0"):
        ensure_engine(models["fp32"], tmp_path, "fp16", 0, True, trt, "Orin")
    with pytest.raises(BackendError, match="not found"):
        ensure_engine(tmp_path / "nope.onnx", tmp_path, "fp16", 256, True, trt, "Orin")
    trt11, _ = trt_doubles.install(monkeypatch, "11")
    with pytest.raises(BackendError, match="fp16.onnx"):
        ensure_engine(models["fp32"], tmp_path, "fp16", 256, True, trt11, "Orin")  # no FP16 ONNX given
    with pytest.raises(BackendError, match="not found"):
        ensure_engine(models["fp32"], tmp_path, "fp16", 256, True, trt11, "Orin", tmp_path / "missing.fp16.onnx")


@pytest.mark.parametrize("generation, plan, error", [
    # What the real libraries refuse, so a backend that forgot a generation's rule fails here too.
    ("8.5", BuildPlan(Path("fp32"), "fp32", "weak", (), ()), "only supports TensorRT INetworkDefinitions with an "
                                                              "explicit batch dimension"),
    ("10", BuildPlan(Path("fp32"), "int8", "weak", (), ("INT8",)), "failed to build an engine"),
    ("10", BuildPlan(Path("fp16"), "fp16", "strong", ("STRONGLY_TYPED",), ("FP16",)), "failed to build an engine"),
])
def test_doubles_refuse_what_tensorrt_refuses(generation: str, plan: BuildPlan, error: str, models: Dict[str, Path],
                                              tmp_path: Path) -> None:
    trt = trt_doubles.make_tensorrt(generation, trt_doubles.FakeGpu())
    plan = BuildPlan(models[str(plan.onnx_path)], plan.precision, plan.typing, plan.network_flags, plan.builder_flags)
    with pytest.raises(BackendError, match=error):
        build_serialized_engine(trt, plan, 256, None)


def test_engine_of_another_generation_is_not_loaded(models: Dict[str, Path], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Engines are not portable across TensorRT versions: the key keeps them apart, and a stray one
    that does not deserialize is a clear error."""
    trt10, cuda = trt_doubles.install(monkeypatch, "10")
    _ctx(cuda)
    r10 = ensure_engine(models["fp32"], tmp_path, "fp32", 256, False, trt10, "Orin (nvgpu)")
    trt11, _ = trt_doubles.install(monkeypatch, "11")
    trt11.__version__ = trt10.__version__  # pretend the key cannot tell them apart
    b = TensorRTBackend(models["fp32"], tmp_path, "fp32", 256)
    with pytest.raises(BackendError, match="cannot deserialize .*delete it and rerun build-engine"):
        b.load()
    assert b.engine_result is not None and b.engine_result.key == r10.key


def test_missing_tensor_io_api_is_clear_and_builds_nothing(models: Dict[str, Path], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    trt, _ = trt_doubles.install(monkeypatch, "8.5")
    type.__delattr__(trt.IExecutionContext, "execute_async_v3")  # a pre-8.5 TensorRT
    with pytest.raises(BackendError, match=r"name-based I/O tensor API .*TensorRT 8.5\+"):
        TensorRTBackend(models["fp32"], tmp_path, "fp16", 256).load()
    assert trt._builds == [] and not list(tmp_path.glob("*.engine"))


def _has_tensorrt() -> bool:
    try:
        import_tensorrt()[1].init()
        return True
    except Exception:
        return False


@pytest.mark.gpu
@pytest.mark.skipif(not _has_tensorrt(), reason="needs TensorRT + pycuda + an NVIDIA GPU")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_engine_matches_ort(precision: str, tiny_model: Dict[str, Path], tmp_path: Path) -> None:
    image = np.full((80, 120, 3), 90, np.uint8)
    tensor, _ = preprocess(image, 64)
    ref = OrtBackend(tiny_model["onnx"], OrtSettings(threads=1)).infer(tensor)[0]
    b = TensorRTBackend(tiny_model["onnx"], tmp_path, precision, 1024)
    try:
        b.load()
    except BackendError as e:
        if "no BuilderFlag.FP16" in str(e):
            pytest.skip("TensorRT 11 builds FP16 from an FP16 ONNX; benchmarks/tensorrt_gpu.py covers it")
        raise
    try:
        out = b.infer(tensor)[0]
        assert out.shape == ref.shape
        np.testing.assert_allclose(out[:, 4:], ref[:, 4:], atol=2e-2)  # scores, FP16
        assert not b.engine_result.reused
    finally:
        b.close()
    b2 = TensorRTBackend(tiny_model["onnx"], tmp_path, precision, 1024)
    b2.load()
    assert b2.engine_result.reused
    b2.close()


# --------------------------------------------------------------------------- benchmarks/tensorrt_gpu.py

def _gpu_script() -> Any:
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "tensorrt_gpu.py"
    spec = importlib.util.spec_from_file_location("tensorrt_gpu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_script_says_what_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    script = _gpu_script()
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert script.main(["--out", str(tmp_path / "gpu.json")]) == 2
    assert "TensorRT not available" in capsys.readouterr().err and not (tmp_path / "gpu.json").exists()
    trt_doubles.install(monkeypatch, "10")
    assert script.main(["--out", str(tmp_path / "gpu.json"), "--fp32", str(tmp_path / "none.onnx")]) == 2
    assert "none.onnx not found; run `dvc repro export`" in capsys.readouterr().err


@pytest.mark.parametrize("generation", trt_doubles.GENERATIONS)
def test_gpu_script_dry_run_on_doubles(generation: str, models: Dict[str, Path], tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole GPU script on a double, so a GPU session only has to run it."""
    import cv2

    rng = np.random.default_rng(0)
    for folder in ("images/val", "labels/val"):
        (tmp_path / "data" / folder).mkdir(parents=True)
    for i in range(3):
        cv2.imwrite(str(tmp_path / "data" / "images" / "val" / f"{i}.jpg"),
                    rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
        (tmp_path / "data" / "labels" / "val" / f"{i}.txt").write_text(f"{i} 0.5 0.5 0.4 0.3\n")
    trt, _ = trt_doubles.install(monkeypatch, generation)
    out = tmp_path / "report" / "gpu.json"
    rc = _gpu_script().main(["--out", str(out), "--fp32", str(models["fp32"]), "--fp16", str(models["fp16"]),
                             "--int8-trt", str(models["qdq"]), "--int8-ort", str(models["qdq"]),
                             "--dataset", str(tmp_path / "data"), "--warmup", "1", "--iterations", "3",
                             "--threads", "1"])
    doc = json.loads(out.read_text())
    assert rc == 0 and doc["ok"], doc["checks"]
    assert {c["check"] for c in doc["checks"]} == {"fp16_map_within_tolerance", "fp16_engine_cache_reused",
                                                   "int8_engine_cache_reused", "fp32_engine_cache_reused"}
    engines = doc["tensorrt"]["engines"]
    assert engines["fp16"]["engine"]["engine_build"]["onnx_file"] == ("tiny.fp16.onnx" if generation == "11"
                                                                      else "tiny.onnx")
    assert engines["int8"]["engine"]["engine_build"]["onnx_file"] == "tiny.int8.trt.onnx"
    assert doc["int8_drop"] == engines["int8"]["map_drop_vs_ort_fp32"]
    assert set(doc["onnxruntime"]) == {"fp32", "int8"} and doc["dataset"]["images"] == 3
    assert len(trt._builds) == 3, "three engines built once each; the second loads reused them"
    md = out.with_suffix(".md").read_text()
    assert f"# TensorRT {trt.__version__}" in md and "| fp16_map_within_tolerance | yes |" in md
    assert md.count("| TensorRT |") == 3 and md.count("| ONNX Runtime CPU |") == 2
