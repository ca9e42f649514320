"""Stage `quantize`: real ORT static quantization of a real (tiny) export, the gate, bad inputs."""

from __future__ import annotations

import copy
import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import yaml
from support import REPO, tiny_params

from edge_runtime.preprocess import letterbox, to_tensor
from pipeline.accuracy.mean_ap import onnx_session
from pipeline.config.params import BaseParams, QuantizeParams, build
from pipeline.imagesets.yolo import decode_image, iter_split_files
from pipeline.onnx_models.calibration_sets import load_calibration_tensors
from pipeline.stages.quantize import AccuracyGateError, CandidateResult, accuracy_gate, quantize


def _calibration(tmp: Path, dataset: Path, imgsz: int) -> Path:
    frames = [decode_image(p) for p, _ in iter_split_files(dataset, "train")][:8]
    out = tmp / "calibration" / "camera"
    out.mkdir(parents=True)
    np.save(out / "tensors.npy", to_tensor([letterbox(f, imgsz)[0] for f in frames]))
    (out / "manifest.json").write_text(json.dumps({"frames": len(frames)}))
    return out


def _raw_params() -> dict[str, Any]:
    return copy.deepcopy(tiny_params(yaml.safe_load((REPO / "params.yaml").read_text()))["quantize"])


def _params(**overrides: Any) -> QuantizeParams:
    raw = _raw_params()
    raw.update(overrides)
    return build(QuantizeParams, raw, "quantize", REPO / "params.yaml")


def _outs(tmp: Path) -> dict[str, Path]:
    return {"int8": tmp / "m.int8.onnx", "trt": tmp / "m.int8.trt.onnx", "dynamic": tmp / "m.dyn.onnx",
            "candidates": tmp / "candidates.csv"}


def test_quantize_tiny_model(tmp_path: Path, tiny_model: dict[str, Path]) -> None:
    calib = _calibration(tmp_path, tiny_model["dataset"], 64)
    outs = _outs(tmp_path)
    p = _params()
    r = quantize(tiny_model["onnx"], calib, tiny_model["dataset"], outs, p, BaseParams(seed=0, threads=1))
    rows = list(csv.DictReader(io.StringIO(outs["candidates"].read_text())))
    assert [row["name"] for row in rows] == ["fp32"] + [c.name for c in p.candidates]
    assert r.chosen.name in {c.name for c in p.candidates}
    chosen = onnx.load(str(outs["int8"]))
    meta = {m.key: m.value for m in chosen.metadata_props}
    assert meta["quantization_candidate"] == r.chosen.name and meta["calibration_set"] == "camera"
    assert "QuantizeLinear" in {n.op_type for n in chosen.graph.node}
    assert outs["int8"].stat().st_size < 0.35 * tiny_model["onnx"].stat().st_size
    trt = onnx.load(str(outs["trt"]))
    # TensorRT explicit quantization: symmetric int8 activations and weights (int8 zero points, all
    # zero). Biases are int32 with zero points of their own, as QDQ prescribes.
    zero_points = [i for i in trt.graph.initializer
                   if i.name.endswith("_zero_point") and "bias_quantized" not in i.name]
    assert zero_points and all(onnx.numpy_helper.to_array(z).dtype == np.int8 and
                               not onnx.numpy_helper.to_array(z).any() for z in zero_points)
    for path in outs.values():
        if path.suffix == ".onnx":
            onnx_session(path, 1)  # every model loads in ORT


def test_stage_headline_is_the_pick_and_the_sizes(quantized: dict[str, Path]) -> None:
    """quantize.main writes its full record and, as DVC metrics, only the pick and the model sizes."""
    full = json.loads(quantized["quantize_metrics"].read_text())
    headline = json.loads(quantized["quantize_headline"].read_text())
    assert headline == {"chosen": full["chosen"], "fp32_size_mb": round(full["size_fp32_bytes"] / 1e6, 3),
                        "int8_size_mb": round(quantized["int8"].stat().st_size / 1e6, 3)}
    assert headline["fp32_size_mb"] == round(quantized["onnx"].stat().st_size / 1e6, 3)
    assert {"map_drop", "size_ratio", "candidates_passed"} <= set(full)  # the details stay in the record


def test_gate_fails_with_every_drop() -> None:
    rows = [CandidateResult("a", "cfg a", 0.40, 0.6, 0.012, 10.0, 1.0, 2.0, 100, False),
            CandidateResult("b", "cfg b", 0.39, 0.6, 0.020, 8.0, 1.0, 2.5, 100, False)]
    with pytest.raises(AccuracyGateError, match=r"max_map_drop=0.005 .* drops: a \+0.0120, b \+0.0200") as e:
        accuracy_gate(rows, 0.005, 0.412, "TABLE\n")
    assert "TABLE" in str(e.value) and "for certain" not in str(e.value)  # no intervals: no verdict
    # With intervals, the error says whether more images could change the outcome.
    rows[0].drop_ci, rows[1].drop_ci = (0.008, 0.016), (0.001, 0.030)
    with pytest.raises(AccuracyGateError, match=r"Within the noise: b failed on the point estimate"):
        accuracy_gate(rows, 0.005, 0.412, "")
    rows[1].drop_camera_ci = (0.006, 0.02)
    with pytest.raises(AccuracyGateError, match=r"Every candidate fails for certain"):
        accuracy_gate(rows, 0.005, 0.412, "")
    assert accuracy_gate(rows, 0.015, 0.412, "").name == "a"  # b is faster but fails
    assert accuracy_gate(rows, 0.05, 0.412, "").name == "b"  # both pass: the fastest wins
    # Within the latency tie (10%: 8.0 vs 8.6 ms) the more accurate wins; outside it, the fastest.
    rows.append(CandidateResult("c", "cfg c", 0.405, 0.6, 0.007, 8.6, 0.1, 2.3, 100, False))
    assert accuracy_gate(rows, 0.05, 0.412, "", latency_tie=0.10).name == "c"
    assert accuracy_gate(rows, 0.05, 0.412, "", latency_tie=0.05).name == "b"
    # Outside latency_tie but inside the measurement's own spread (8.6 - 0.5 <= 8.0 + 0.5): tied.
    rows[-1].latency_spread_ms = 1.0
    assert accuracy_gate(rows, 0.05, 0.412, "", latency_tie=0.0).name == "c"
    rows[-1].latency_spread_ms = 0.1
    assert accuracy_gate(rows, 0.05, 0.412, "").name == "b"


def test_gate_holds_the_camera_split_too() -> None:
    """A candidate that is fine on val but loses more than max_map_drop on camera frames fails."""
    fine_on_val = CandidateResult("asym", "cfg", 0.41, 0.6, 0.001, 8.0, 1.0, 2.5, 100, False,
                                  map50_95_camera=0.30, drop_camera=0.017)
    both_ok = CandidateResult("sym", "cfg", 0.41, 0.6, 0.002, 8.3, 0.1, 2.4, 100, False,
                              map50_95_camera=0.315, drop_camera=0.001)
    assert fine_on_val.worst_drop == 0.017 and both_ok.worst_drop == 0.002
    assert accuracy_gate([fine_on_val, both_ok], 0.005, 0.412, "").name == "sym"
    with pytest.raises(AccuracyGateError, match=r"asym \+0.0010 \(camera \+0.0170\)"):
        accuracy_gate([fine_on_val], 0.005, 0.412, "")
    # Tied on latency (within 5%): the smaller worst-case drop wins, not the better val score.
    better_val = CandidateResult("v", "cfg", 0.42, 0.6, -0.008, 8.1, 1.0, 2.5, 100, False,
                                 map50_95_camera=0.31, drop_camera=0.004)
    assert accuracy_gate([better_val, both_ok], 0.005, 0.412, "", latency_tie=0.05).name == "sym"
    # Equally accurate twins (QDQ vs QOperator of one configuration): the smaller file, whatever the timing.
    qop = CandidateResult("sym_qop", "cfg", 0.41, 0.6, 0.002, 8.5, 0.1, 2.3, 90, False,
                          map50_95_camera=0.315, drop_camera=0.001)
    assert accuracy_gate([both_ok, qop], 0.005, 0.412, "", latency_tie=0.05).name == "sym_qop"
    assert accuracy_gate([both_ok, qop], 0.005, 0.412, "", latency_tie=0.01).name == "sym"  # 8.5 ms: not tied
    # The twins' round medians overlapping (spreads of 1 ms) is a tie whatever latency_tie says.
    both_ok.latency_spread_ms = qop.latency_spread_ms = 1.0
    assert accuracy_gate([both_ok, qop], 0.005, 0.412, "", latency_tie=0.0).name == "sym_qop"


def test_quantize_gates_on_the_camera_split(tmp_path: Path, tiny_model: dict[str, Path],
                                            quantized: dict[str, Path]) -> None:
    """With a labelled camera split the table has its columns; without one the gate says why."""
    calib = _calibration(tmp_path, tiny_model["dataset"], 64)
    p = _params(candidates=_raw_params()["candidates"][:1])
    base = BaseParams(seed=0, threads=1)
    r = quantize(tiny_model["onnx"], calib, tiny_model["dataset"], _outs(tmp_path), p, base,
                 quantized["frames"] / "labelled")
    assert r.fp32_map50_95_camera is not None and r.camera_skipped == ""
    assert r.chosen.drop_camera is not None and r.chosen.worst_drop >= r.chosen.drop
    row, cand = csv.DictReader(io.StringIO(_outs(tmp_path)["candidates"].read_text()))
    assert row["mAP50-95_camera"] != "" and row["drop_camera"] == "0.0000"
    # Every drop carries its paired-bootstrap interval (resampled images: it spans the point estimate
    # unless the resamples all fall to one side, so only its order and type are certain here).
    for key in ("drop", "drop_camera"):
        low, high = float(cand[f"{key}_ci_low"]), float(cand[f"{key}_ci_high"])
        assert low <= high and -1.0 <= low and high <= 1.0, (key, low, high)
    assert r.chosen.drop_ci is not None and abs(r.chosen.drop_ci[1] - float(cand["drop_ci_high"])) < 1e-4
    r = quantize(tiny_model["onnx"], calib, tiny_model["dataset"], _outs(tmp_path),
                 _params(candidates=_raw_params()["candidates"][:1], bootstrap_resamples=0), base, tmp_path / "none")
    assert r.fp32_map50_95_camera is None and "no labelled camera split" in r.camera_skipped
    assert r.chosen.drop_camera is None and r.chosen.drop_ci is None
    cand = list(csv.DictReader(io.StringIO(_outs(tmp_path)["candidates"].read_text())))[1]
    assert cand["drop_ci_low"] == cand["drop_camera_ci_low"] == cand["drop_camera"] == ""


def test_symmetric_u8_has_zero_point_128(tmp_path: Path, tiny_model: dict[str, Path]) -> None:
    """symmetric: true with U8 activations = the U8S8 kernels with zero point 128 everywhere."""
    calib = _calibration(tmp_path, tiny_model["dataset"], 64)
    c = next(c for c in _raw_params()["candidates"] if c["activation"] == "U8")
    p = _params(candidates=[{**c, "symmetric": True}])
    quantize(tiny_model["onnx"], calib, tiny_model["dataset"], _outs(tmp_path), p, BaseParams(seed=0, threads=1))
    m = onnx.load(str(_outs(tmp_path)["int8"]))
    zps = [onnx.numpy_helper.to_array(i) for i in m.graph.initializer
           if i.name.endswith("_zero_point") and onnx.numpy_helper.to_array(i).dtype == np.uint8]
    assert zps and all((z == 128).all() for z in zps)


def test_missing_and_corrupt_model(tmp_path: Path, tiny_model: dict[str, Path]) -> None:
    calib = _calibration(tmp_path, tiny_model["dataset"], 64)
    base = BaseParams(seed=0, threads=1)
    with pytest.raises(ValueError, match="not found; run the export stage"):
        quantize(tmp_path / "nope.onnx", calib, tiny_model["dataset"], _outs(tmp_path), _params(), base)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x08\x01garbage")
    with pytest.raises(ValueError, match="not a readable ONNX model"):
        quantize(broken, calib, tiny_model["dataset"], _outs(tmp_path), _params(), base)
    assert not _outs(tmp_path)["int8"].exists()


def test_bad_calibration_sets(tmp_path: Path) -> None:
    d = tmp_path / "camera"
    with pytest.raises(ValueError, match="run the calibrate stage"):
        load_calibration_tensors(d, 64)
    d.mkdir()
    (d / "manifest.json").write_text("{}")
    np.save(d / "tensors.npy", np.zeros((0, 3, 64, 64), np.float32))
    with pytest.raises(ValueError, match="empty: the calibration set has no frames"):
        load_calibration_tensors(d, 64)
    np.save(d / "tensors.npy", np.zeros((4, 3, 32, 32), np.float32))
    with pytest.raises(ValueError, match="calibrate.imgsz must equal export.imgsz"):
        load_calibration_tensors(d, 64)
    np.save(d / "tensors.npy", np.full((2, 3, 64, 64), 255.0, np.float32))
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        load_calibration_tensors(d, 64)
