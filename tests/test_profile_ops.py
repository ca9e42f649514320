"""benchmarks/profile_ops.py: ORT profiler parsing and the convolution bound it reports."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from support import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import profile_ops  # noqa: E402


def _conv_silu_model(path: Path) -> Path:
    """Conv -> x*sigmoid(x): the YOLOv8 block shape, small enough to profile in a blink."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Sigmoid", ["c"], ["s"]),
             helper.make_node("Mul", ["c", "s"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 32, 32])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.save(model, path)
    return path


def test_profile_counts_only_timed_runs(tmp_path: Path) -> None:
    model = _conv_silu_model(tmp_path / "m.onnx")
    x = [np.zeros((1, 3, 32, 32), np.float32)]
    per_op = profile_ops.profile_session(model, 1, x, warmup=3, runs=5, workdir=tmp_path)
    assert per_op, "no kernel events parsed"
    assert all(v > 0 for v in per_op.values())
    # ORT fuses Conv (+ the SiLU pattern) at ORT_ENABLE_ALL; whichever form it picks is a convolution.
    assert profile_ops.conv_ms(per_op) > 0


def test_table_bound_is_fp32_total_over_int8_convs() -> None:
    fp32 = {"Conv": 8.0, "QuickGelu": 1.0, "Softmax": 1.0}
    int8 = {"QLinearConv": 4.0, "Conv": 1.0, "QLinearMul": 2.0}
    text = "\n".join(profile_ops.table(256, fp32, int8, top=2))
    assert "| other (3 types) |" in text
    assert "**10.00**" in text and "**7.00**" in text
    assert "10.00 / 5.00 = **2.00x**" in text  # 10 ms FP32 total over 4 + 1 ms of INT8 convolutions


def _int8_qoperator_silu(tmp_path: Path) -> Path:
    """The Conv -> SiLU model statically quantized by ORT in QOperator form (U8S8)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    src = _conv_silu_model(tmp_path / "f.onnx")
    rng = np.random.default_rng(1)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"x": rng.standard_normal((1, 3, 32, 32)).astype(np.float32)} for _ in range(4)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    dst = tmp_path / "q.onnx"
    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QOperator,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return dst


def test_silu_rewrite_lut_and_free_stay_runnable(tmp_path: Path) -> None:
    import onnxruntime as ort

    model = onnx.load(str(_int8_qoperator_silu(tmp_path)))
    ops = [n.op_type for n in model.graph.node]
    assert "QLinearSigmoid" in ops and "QLinearMul" in ops, ops
    x = np.random.default_rng(2).standard_normal((1, 3, 32, 32)).astype(np.float32)
    for mode, left in (("lut", {"QLinearSigmoid"}), ("free", set())):
        rewritten = profile_ops.silu_rewrite(model, mode)
        kinds = {n.op_type for n in rewritten.graph.node}
        assert "QLinearMul" not in kinds and ("QLinearSigmoid" in kinds) == bool(left), (mode, kinds)
        onnx.checker.check_model(rewritten)
        sess = ort.InferenceSession(rewritten.SerializeToString(), providers=["CPUExecutionProvider"])
        (y,) = sess.run(None, {"x": x})
        assert y.shape == (1, 8, 32, 32)
    assert [n.op_type for n in model.graph.node] == ops  # the input model is not modified


def test_silu_rewrite_refuses_a_model_without_int8_silu(tmp_path: Path) -> None:
    import pytest

    with pytest.raises(ValueError, match="no int8 SiLU"):
        profile_ops.silu_rewrite(onnx.load(str(_conv_silu_model(tmp_path / "f.onnx"))), "lut")
