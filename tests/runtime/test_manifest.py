"""The release manifest contract: round trip, validation errors, file verification."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_runtime.fileio import sha256_file
from edge_runtime.manifest import (
    FileEntry,
    Manifest,
    ManifestError,
    OrtSettings,
    PostprocessSettings,
    TensorRTSettings,
    ThermalSettings,
    Variant,
    load_manifest,
    save_manifest,
    verify_files,
)


def _manifest(tmp_path: Path, **overrides: object) -> Manifest:
    model = tmp_path / "m.onnx"
    model.write_bytes(b"onnx-bytes")
    fields = dict(
        release="abc123def456", backend="onnxruntime", precision="int8", class_names=("a", "b"),
        output_format="yolov8-raw", variants=(Variant("256", 256, "m.onnx"),),
        files={"m.onnx": FileEntry(sha256_file(model), model.stat().st_size, "model")},
        ort=OrtSettings(threads=4), tensorrt=None, thermal=ThermalSettings(80.0, 70.0),
        postprocess=PostprocessSettings(0.25, 0.45, 100), source={"git_commit": "x"},
    )
    fields.update(overrides)
    return Manifest(**fields)  # type: ignore[arg-type]


def test_round_trip_and_verify(tmp_path: Path) -> None:
    m = _manifest(tmp_path)
    save_manifest(m, tmp_path)
    assert load_manifest(tmp_path) == m
    assert verify_files(m, tmp_path) == []
    (tmp_path / "m.onnx").write_bytes(b"onnx-bytez")
    assert verify_files(m, tmp_path) == ["m.onnx: sha256 mismatch"]
    (tmp_path / "m.onnx").unlink()
    assert verify_files(m, tmp_path) == ["m.onnx: missing"]


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"backend": "openvino"}, "backend 'openvino' unknown"),
        ({"precision": "int4"}, "precision 'int4' unknown"),
        ({"variants": ()}, "no model variants"),
        ({"variants": (Variant("x", 256, "other.onnx"),)}, "names other.onnx, which is not in its files"),
        ({"backend": "tensorrt"}, "no tensorrt settings"),
        ({"thermal": ThermalSettings(70.0, 75.0)}, "resume_c must be below"),
    ],
)
def test_invalid(tmp_path: Path, overrides: dict, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        _manifest(tmp_path, **overrides)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="not found"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_manifest(tmp_path)
    doc = _manifest(tmp_path).to_json()
    doc["schema"] = 99
    (tmp_path / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match="schema 99"):
        load_manifest(tmp_path)
    doc = _manifest(tmp_path, tensorrt=TensorRTSettings(512), backend="tensorrt").to_json()
    del doc["postprocess"]
    (tmp_path / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match="missing key 'postprocess'"):
        load_manifest(tmp_path)
