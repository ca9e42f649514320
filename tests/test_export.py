"""The export stage's FP16 ONNX: conversion, the FP16-vs-FP32 comparison and its gate, the CLI paths.

Unit tests use a small hand-built graph shaped like the YOLOv8 raw head (a Conv, a nearest `Resize`,
the tensor (1, 4 + nc, anchors)); the end-to-end ones use the session's tiny exported model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_runtime.postprocess import Detections, HeadSpec
from pipeline.config import paths
from pipeline.config.params import ExportParams, Fp16ParityParams
from pipeline.onnx_models.fp16 import Fp16Parity, compare, match, to_float16
from pipeline.stages import export

IMGSZ = 64
NC = 2
ANCHORS = (IMGSZ // 8) ** 2 + (IMGSZ // 16) ** 2 + (IMGSZ // 32) ** 2  # 84
FLOAT, FLOAT16 = 1, 10  # onnx.TensorProto element types


def _head_like_model(dup_value_info: bool = True) -> Any:
    """(1, 3, 64, 64) -> Conv -> Resize (nearest) -> mean -> + constant (1, 4 + NC, 84) "detections".

    The constant holds three boxes with scores above 0.25, the rest below; the image moves them by
    a fraction of a pixel, so FP16 and FP32 agree on every detection. Like the Ultralytics export,
    the value_info of intermediate tensors is listed twice (`dup_value_info`).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    base = np.zeros((1, 4 + NC, ANCHORS), np.float32)
    base[0, :4] = [[8.0], [8.0], [4.0], [4.0]]
    base[0, 4:] = 0.01
    for i, (cx, cy, cls) in enumerate(((12.0, 12.0, 0), (40.0, 20.0, 1), (30.0, 50.0, 0))):
        base[0, :4, i] = [cx, cy, 10.0, 8.0]
        base[0, 4 + cls, i] = 0.9
    inits = [numpy_helper.from_array(rng.normal(0, 0.1, (4, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
             numpy_helper.from_array(base, "base"),
             numpy_helper.from_array(np.array(0.5, np.float32), "gain")]
    nodes = [helper.make_node("Conv", ["images", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Resize", ["c", "", "scales"], ["r"], mode="nearest", name="resize"),
             helper.make_node("ReduceMean", ["r"], ["m"], keepdims=0, name="mean"),
             helper.make_node("Mul", ["m", "gain"], ["g"], name="mul"),
             helper.make_node("Add", ["base", "g"], ["output0"], name="add")]
    graph = helper.make_graph(nodes, "head_like", [helper.make_tensor_value_info("images", TensorProto.FLOAT,
                                                                                 [1, 3, IMGSZ, IMGSZ])],
                              [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 4 + NC, ANCHORS])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    model = onnx.shape_inference.infer_shapes(model)
    if dup_value_info:
        model.graph.value_info.extend(list(model.graph.value_info))
    for key, value in (("names", "{0: 'a', 1: 'b'}"), ("imgsz", f"[{IMGSZ}, {IMGSZ}]"),
                       ("output_format", "yolov8-raw")):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    return model


def _tensors(n: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [rng.random((1, 3, IMGSZ, IMGSZ), dtype=np.float32) for _ in range(n)]


def _spec() -> HeadSpec:
    return HeadSpec("yolov8-raw", NC, IMGSZ)


def _fp16_params(**overrides: Any) -> Fp16ParityParams:
    values = {"atol_box": 1.0, "atol_score": 0.01, "min_f1": 0.95, "conf": 0.25, "iou": 0.45, "max_det": 100}
    return Fp16ParityParams(**{**values, **overrides})


def _export_params(**fp16: Any) -> ExportParams:
    return ExportParams(opset=17, imgsz=IMGSZ, simplify=True, parity_images=2, parity_atol_box=0.05,
                        parity_atol_score=0.001, fp16=_fp16_params(**fp16))


def test_to_float16_keeps_float32_io_and_metadata() -> None:
    import onnx

    fp32 = _head_like_model()
    before = fp32.SerializeToString()
    data = to_float16(fp32, "ab" * 32)
    assert fp32.SerializeToString() == before  # the FP32 model is not changed
    half = onnx.load_from_string(data)
    onnx.checker.check_model(half)
    assert half.graph.input[0].type.tensor_type.elem_type == FLOAT
    assert half.graph.output[0].type.tensor_type.elem_type == FLOAT
    weights = {i.name: i.data_type for i in half.graph.initializer}
    assert weights["w"] == FLOAT16 and weights["base"] == FLOAT16
    assert weights["scales"] == FLOAT  # Resize's scales stay float32 (Resize is kept in float32, between Casts)
    meta = {p.key: p.value for p in half.metadata_props}
    assert meta["names"] == "{0: 'a', 1: 'b'}" and meta["output_format"] == "yolov8-raw"
    assert meta["fp32_sha256"] == "ab" * 32
    assert to_float16(_head_like_model(), "ab" * 32) == data  # deterministic: the stage is bit-reproducible


def test_fp16_model_matches_fp32_on_ort_cpu() -> None:
    fp32 = _head_like_model()
    r = compare(fp32.SerializeToString(), to_float16(fp32, "0" * 64), _tensors(), _spec(), 1, 0.25, 0.45, 100)
    assert r.images == 3 and r.detections_fp32 == r.detections_fp16 == 9
    assert (r.tp, r.fp, r.fn) == (9, 0, 0) and r.f1 == 1.0
    assert 0 < r.max_abs_diff_box < 0.05  # float16 rounding of ~10-50 px values: steps of 1/32 px or less
    assert r.max_abs_diff_score < 1e-3
    export.fp16_gate(r, _export_params())  # passes


def test_match_counts_same_class_iou_half() -> None:
    def dets(boxes: list[list[float]], classes: list[int]) -> Detections:
        return Detections(np.array(boxes, np.float32).reshape(-1, 4), np.linspace(0.9, 0.5, len(classes)),
                          np.array(classes, np.int64))

    ref = dets([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]], [0, 1, 0])
    cand = dets([[0, 0, 10, 11], [20, 20, 30, 30], [45, 45, 55, 55], [60, 60, 70, 70]], [0, 0, 0, 1])
    # box 1: TP; box 2: right place, wrong class; box 3: IoU 0.14; box 4: nothing there.
    assert match(ref, cand) == (1, 3, 2)
    assert match(ref, Detections.empty()) == (0, 0, 3)
    assert match(Detections.empty(), cand) == (0, 4, 0)
    assert Fp16Parity(1, 0.0, 0.0, 0, 0, 0, 0, 0).f1 is None


@pytest.mark.parametrize(("result", "message"), [
    (Fp16Parity(8, 1.5, 0.001, 10, 10, 10, 0, 0), r"boxes by 1\.5 px \(tolerance export\.fp16\.atol_box=1\.0\)"),
    (Fp16Parity(8, 0.1, 0.02, 10, 10, 10, 0, 0), r"scores by 0\.02 \(tolerance export\.fp16\.atol_score=0\.01\)"),
    (Fp16Parity(8, float("inf"), float("inf"), 10, 0, 0, 0, 10), r"boxes by inf px.*scores by inf"),
    (Fp16Parity(8, float("nan"), 0.0, 10, 10, 10, 0, 0), r"boxes by nan px"),
    (Fp16Parity(8, 0.1, 0.001, 20, 20, 18, 2, 2), r"box F1 0\.9000 \(TP 18, FP 2, FN 2 at conf 0\.25; "
                                                   r"export\.fp16\.min_f1=0\.95\)"),
])
def test_fp16_gate_fails_naming_the_key(result: Fp16Parity, message: str) -> None:
    with pytest.raises(export.ParityError, match=message):
        export.fp16_gate(result, _export_params())


def test_fp16_gate_without_detections_checks_the_diffs_only() -> None:
    export.fp16_gate(Fp16Parity(8, 0.2, 0.001, 0, 0, 0, 0, 0), _export_params())


def test_fp16_path_defaults() -> None:
    args = export.parse_args([])
    assert args.fp16 == paths.FP16_MODEL and export.fp16_out(args) == paths.FP16_MODEL
    # Moving only --out puts the FP16 copy beside it, never over the checkout's models/yolov8n.fp16.onnx.
    assert export.fp16_out(export.parse_args(["--out", "/tmp/x/m.onnx"])) == Path("/tmp/x/m.fp16.onnx")
    assert export.fp16_out(export.parse_args(["--out", "/tmp/m.onnx", "--fp16", "/o/h.onnx"])) == Path("/o/h.onnx")
    assert export.fp16_path(paths.ONNX_MODEL) == paths.FP16_MODEL


def test_tiny_model_has_its_fp16_copy(tiny_model: dict[str, Path]) -> None:
    """The stage as the session fixture ran it: FP16 file beside the FP32 one, figures in the metrics."""
    import onnx

    from edge_runtime.fileio import sha256_file

    fp32, half_path = tiny_model["onnx"], tiny_model["onnx"].with_name("yolov8n.fp16.onnx")
    half = onnx.load(str(half_path))
    assert half.graph.input[0].type.tensor_type.elem_type == FLOAT
    assert half.graph.output[0].type.tensor_type.elem_type == FLOAT
    assert sum(i.data_type == FLOAT16 for i in half.graph.initializer) > 50
    meta = {p.key: p.value for p in half.metadata_props}
    ref = {p.key: p.value for p in onnx.load(str(fp32)).metadata_props}
    assert meta["fp32_sha256"] == sha256_file(fp32)
    assert {k: v for k, v in meta.items() if k != "fp32_sha256"} == ref
    metrics = json.loads(tiny_model["onnx"].with_name("export.json").read_text())
    p = _export_params()
    assert metrics["fp16_size_bytes"] == half_path.stat().st_size < 0.6 * metrics["size_bytes"]
    assert 0 <= metrics["fp16_max_abs_diff_box"] <= p.fp16.atol_box
    assert 0 <= metrics["fp16_max_abs_diff_score"] <= p.fp16.atol_score
    assert metrics["fp16_f1"] is None or metrics["fp16_f1"] >= p.fp16.min_f1
    assert metrics["fp16_tp"] + metrics["fp16_fn"] == metrics["fp16_detections_fp32"]


def test_fp16_gate_fails_the_stage_and_writes_nothing(tiny_model: dict[str, Path], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """An FP16 copy outside tolerance: exit 1 ("failed:"), and neither ONNX file is written."""
    import yaml

    from pipeline.config.stage_cli import run_stage

    params = yaml.safe_load(tiny_model["params"].read_text())
    params["export"]["fp16"]["atol_score"] = 1e-12  # float16 cannot be this close
    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    out = tmp_path / "m.onnx"
    argv = ["--weights", str(tiny_model["weights"]), "--data", str(tiny_model["dataset"]), "--out", str(out),
            "--metrics", str(tmp_path / "export.json"), "--params", str(params_path)]
    assert run_stage(lambda: export.main(argv)) == 1
    err = capsys.readouterr().err
    assert "failed: the FP16 ONNX differs from the FP32 ONNX on 2 val images" in err and "atol_score" in err
    assert not out.exists() and not (tmp_path / "m.fp16.onnx").exists() and not (tmp_path / "export.json").exists()
