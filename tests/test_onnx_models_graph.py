"""The head decode is computed from a real exported graph; the pre-DFL cut decodes identically."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from edge_runtime import postprocess as pp
from pipeline.onnx_models.graph import (
    GraphError,
    cut_before_decode,
    find_head_decode,
    head_convs,
    metadata,
    stem_conv,
    verify_node_names,
)


def test_head_decode_from_real_export(tiny_model: dict[str, Path]) -> None:
    model = onnx.load(str(tiny_model["onnx"]))
    head = find_head_decode(model)
    ops = {n.name: n.op_type for n in model.graph.node}
    decode_ops = sorted({ops[n] for n in head.nodes})
    assert {"Softmax", "Sigmoid", "Concat"} <= set(decode_ops)
    assert "Conv" in decode_ops  # the DFL's fixed conv belongs to the decode
    assert head.reg_max == 16
    verify_node_names(model, head.nodes)  # every excluded name exists
    convs = head_convs(model)
    assert len(convs) == 6 and all(ops[c] == "Conv" for c in convs)  # box + cls conv per stride
    assert not set(convs) & set(head.nodes)
    assert len(stem_conv(model)) == 1


def test_stale_exclusion_is_an_error(tiny_model: dict[str, Path]) -> None:
    model = onnx.load(str(tiny_model["onnx"]))
    with pytest.raises(GraphError, match="not in the graph, e.g. '/model.99/Conv'"):
        verify_node_names(model, ["/model.99/Conv"])


def test_cut_model_decodes_like_the_full_graph(tiny_model: dict[str, Path]) -> None:
    model = onnx.load(str(tiny_model["onnx"]))
    cut = cut_before_decode(model, find_head_decode(model))
    assert metadata(cut)["output_format"] == pp.FORMAT_PREDFL_LOGITS and metadata(cut)["names"]
    x = np.random.default_rng(0).random((1, 3, 64, 64), dtype=np.float32)
    full_out = ort.InferenceSession(model.SerializeToString()).run(None, {"images": x})[0][0]
    cut_out = ort.InferenceSession(cut.SerializeToString()).run(None, {"images": x})[0][0]
    assert cut_out.shape == (64 + 6, full_out.shape[1])
    raw = pp.HeadSpec(pp.FORMAT_RAW, 6, 64, pp.DEFAULT_STRIDES, 16)
    predfl = pp.HeadSpec(pp.FORMAT_PREDFL_LOGITS, 6, 64, pp.DEFAULT_STRIDES, 16)
    b1, s1, c1 = pp.candidates(full_out, raw, conf=0.0)
    b2, s2, c2 = pp.candidates(cut_out, predfl, conf=0.0)
    np.testing.assert_allclose(b2, b1, atol=1e-3)
    np.testing.assert_allclose(s2, s1, atol=1e-6)
    np.testing.assert_array_equal(c2, c1)


def test_not_a_yolo_graph() -> None:
    node = helper.make_node("Relu", ["x"], ["y"], name="relu")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])])
    with pytest.raises(GraphError, match="no DFL Softmax"):
        find_head_decode(helper.make_model(graph))
