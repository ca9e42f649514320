"""One ONNX load for the workstation: missing, corrupt and metadata-less models fail naming the
file and the stage to re-run (the quantize stage included, which used to end in a protobuf error)."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from pipeline.onnx_models.load import ModelFileError, class_names, input_size, load_onnx, onnx_metadata
from pipeline.stages import quantize


def _tiny_model(path: Path, names: str | None = "{0: 'crack', 1: 'dent'}", shape: tuple = (1, 3, 32, 32)) -> Path:
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, list(shape))
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, list(shape))
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["images"], ["out"])], "g", [x], [y]))
    if names is not None:
        entry = model.metadata_props.add()
        entry.key, entry.value = "names", names
    onnx.save(model, str(path))
    return path


def test_missing_model_names_the_stage(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match=r"nope\.onnx not found; run the export stage first \(dvc repro export\)"):
        load_onnx(tmp_path / "nope.onnx", "export")


def test_corrupt_model_names_file_and_stage(tmp_path: Path) -> None:
    bad = tmp_path / "yolov8n.onnx"
    bad.write_bytes(b"\x08\x07garbage that is not a protobuf" * 10)
    with pytest.raises(ModelFileError, match=r"yolov8n\.onnx is not a readable ONNX model .*re-run the export stage"):
        onnx_metadata(bad, "export")


def test_metadata_class_names_and_input_size(tmp_path: Path) -> None:
    path = _tiny_model(tmp_path / "m.onnx")
    meta = onnx_metadata(path, "export")
    assert class_names(meta, path, "export") == ("crack", "dent")
    assert input_size(load_onnx(path, "export"), path) == 32
    with pytest.raises(ModelFileError, match=r"m2\.onnx has no 'names' metadata; re-run the export stage"):
        p2 = _tiny_model(tmp_path / "m2.onnx", names=None)
        class_names(onnx_metadata(p2, "export"), p2, "export")
    p3 = _tiny_model(tmp_path / "m3.onnx", names="42")
    with pytest.raises(ModelFileError, match=r"m3\.onnx: .*must be a dict or list"):
        class_names(onnx_metadata(p3, "export"), p3, "export")
    p4 = _tiny_model(tmp_path / "m4.onnx", shape=(1, 3, 32, 48))
    with pytest.raises(ModelFileError, match="not a static square NCHW image"):
        input_size(load_onnx(p4, "export"), p4)


def test_quantize_refuses_a_corrupt_model_before_writing(tmp_path: Path) -> None:
    bad = tmp_path / "yolov8n.onnx"
    bad.write_bytes(b"not onnx")
    outs = {k: tmp_path / "out" / f"{k}.onnx" for k in ("int8", "trt", "dynamic", "candidates")}
    with pytest.raises(ModelFileError, match=r"yolov8n\.onnx is not a readable ONNX model .*dvc repro export"):
        quantize.quantize(bad, tmp_path / "calib", tmp_path / "data", outs, None, None)  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists()
