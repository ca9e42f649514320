"""Which model files a release ships per runtime and precision, and how the manifest names them
(no SSH, no training: small hand-made ONNX files with the export stage's metadata)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fleet_hosts import INVENTORY_DEFAULTS, INVENTORY_SETTINGS

from edge_runtime.manifest import manifest_from_json
from pipeline.fleet.artifacts import (
    ArtifactError,
    ModelFiles,
    Sources,
    build_release,
    release_model_files,
    runtime_bundle,
    select_model_files,
)
from pipeline.fleet.inventory import parse_inventory

REPO = Path(__file__).resolve().parents[2]

INVENTORY: dict[str, Any] = {
    "settings": dict(INVENTORY_SETTINGS),
    "defaults": dict(INVENTORY_DEFAULTS),
    "groups": {
        "pis": {"defaults": {"kind": "pi", "runtime": "onnxruntime", "precision": "fp32"},
                "hosts": {"pi-fp32": {"address": "10.0.0.1"}, "pi-int8": {"address": "10.0.0.2", "precision": "int8"}}},
        "jetsons": {"defaults": {"kind": "jetson", "runtime": "tensorrt", "precision": "fp16", "trt_workspace_mb": 512},
                    "hosts": {"j-fp16": {"address": "10.0.0.3"}, "j-int8": {"address": "10.0.0.4", "precision": "int8"},
                              "j-fp32": {"address": "10.0.0.5", "precision": "fp32"}}},
    },
}


def _host(name: str) -> Any:
    return parse_inventory(copy.deepcopy(INVENTORY), Path("inventory.yaml")).select(host=name)[0]


def _onnx(path: Path, dtype: int = 1) -> Path:
    """A tiny valid ONNX file with the metadata a release reads (names, imgsz, output_format)."""
    from onnx import TensorProto, helper, numpy_helper

    one = numpy_helper.from_array(np.ones((1,), np.float16 if dtype == TensorProto.FLOAT16 else np.float32), "one")
    graph = helper.make_graph([helper.make_node("Mul", ["images", "one"], ["output0"])], "m",
                              [helper.make_tensor_value_info("images", dtype, [1, 3, 64, 64])],
                              [helper.make_tensor_value_info("output0", dtype, [1, 3, 64, 64])], [one])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    for key, value in (("names", "{0: 'a', 1: 'b'}"), ("imgsz", "[64, 64]"), ("output_format", "yolov8-raw")):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    path.write_bytes(model.SerializeToString())
    return path


@pytest.fixture
def models(tmp_path: Path) -> Path:
    from onnx import TensorProto

    folder = tmp_path / "models"
    folder.mkdir()
    for name in ("yolov8n.onnx", "yolov8n.int8.onnx", "yolov8n.int8.trt.onnx"):
        _onnx(folder / name)
    _onnx(folder / "yolov8n.fp16.onnx", TensorProto.FLOAT16)
    return folder


def _sources(models: Path, tmp_path: Path) -> Sources:
    samples = tmp_path / "val"
    samples.mkdir()
    (samples / "val_0.jpg").write_bytes(b"\xff\xd8 not decoded by build_release")
    return Sources(models_dir=models, samples_dir=samples, runtime_root=REPO / "runtime")


def test_each_runtime_and_precision_ships_its_files(models: Path) -> None:
    fp32, int8, qdq, fp16 = (models / n for n in ("yolov8n.onnx", "yolov8n.int8.onnx", "yolov8n.int8.trt.onnx",
                                                  "yolov8n.fp16.onnx"))
    assert release_model_files(_host("pi-fp32"), models, "yolov8n") == ModelFiles(fp32)
    assert release_model_files(_host("pi-int8"), models, "yolov8n") == ModelFiles(int8)
    assert release_model_files(_host("j-fp32"), models, "yolov8n") == ModelFiles(fp32)
    assert release_model_files(_host("j-int8"), models, "yolov8n") == ModelFiles(fp32, trt_onnx=qdq)
    # TensorRT fp16: the FP32 ONNX (8.5/10 build FP16 from it with the flag) AND the FP16 ONNX (TensorRT 11).
    assert release_model_files(_host("j-fp16"), models, "yolov8n") == ModelFiles(fp32, fp16_onnx=fp16)
    assert select_model_files(_host("j-fp16"), models, "yolov8n") == (fp32, None)  # its 2-tuple form is unchanged


def test_tensorrt_fp16_without_the_fp16_onnx_names_the_stage(models: Path) -> None:
    (models / "yolov8n.fp16.onnx").unlink()
    for select in (release_model_files, select_model_files):  # the runner checks every host with the latter
        with pytest.raises(ArtifactError, match=r"yolov8n\.fp16\.onnx not found: j-fp16 runs TensorRT FP16.*"
                                                r"dvc repro export"):
            select(_host("j-fp16"), models, "yolov8n")
    assert release_model_files(_host("j-int8"), models, "yolov8n").fp16_onnx is None  # only fp16 hosts need it


def test_fp16_release_manifest_names_both_files(models: Path, tmp_path: Path) -> None:
    sources = _sources(models, tmp_path)
    rt = runtime_bundle(REPO / "runtime")
    release = build_release(_host("j-fp16"), sources, "yolov8n", rt)
    m = release.manifest
    (variant,) = m.variants
    assert (variant.model_file, variant.trt_onnx_file, variant.fp16_onnx_file) == (
        "yolov8n.onnx", None, "yolov8n.fp16.onnx")
    assert m.files["yolov8n.fp16.onnx"].role == "fp16_onnx" and m.files["yolov8n.onnx"].role == "model"
    assert release.fp16_onnx_file == "yolov8n.fp16.onnx" and set(release.bundle.files) >= {
        "yolov8n.onnx", "yolov8n.fp16.onnx"}
    doc = json.loads(json.dumps(m.to_json()))
    assert doc["variants"][0]["fp16_onnx_file"] == "yolov8n.fp16.onnx"
    assert manifest_from_json(doc) == m  # what the device reads back
    assert m.source["model_sha256"] == m.files["yolov8n.onnx"].sha256  # the model of record stays the FP32 ONNX


def test_other_releases_keep_their_manifest_json(models: Path, tmp_path: Path) -> None:
    """Without an FP16 file the JSON has no fp16_onnx_file key: the same document (and sha12) as
    before the field existed, readable by runtimes that predate it."""
    sources = _sources(models, tmp_path)
    rt = runtime_bundle(REPO / "runtime")
    for host in ("pi-fp32", "pi-int8", "j-int8", "j-fp32"):
        doc = build_release(_host(host), sources, "yolov8n", rt).manifest.to_json()
        assert all("fp16_onnx_file" not in v for v in doc["variants"]), host
        assert manifest_from_json(json.loads(json.dumps(doc))).variants[0].fp16_onnx_file is None
