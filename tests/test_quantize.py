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
from pipeline.stages import quantize as quantize_stage
from pipeline.stages.quantize import (
    AccuracyGateError,
    CandidateResult,
    EarlyStop,
    SplitReference,
    accuracy_gate,
    look_sizes,
    quantize,
    score_split,
    scoring_record,
)


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


# ------------------------------------------------------------------------------------------
# The early stop
# ------------------------------------------------------------------------------------------

def _early_stop(**overrides: Any) -> Any:
    return _params(early_stop={**_raw_params()["early_stop"], **overrides}).early_stop


def _synthetic_split(n: int, miss_every: int, seed: int = 0) -> tuple[list[Any], list[Any]]:
    """Per-image statistics of FP32 (finds every object) and of a candidate that misses every
    `miss_every`-th object (0: none), on n images of 1-3 objects of 3 classes."""
    rng = np.random.default_rng(seed)
    fp32, cand, k = [], [], 0
    for _ in range(n):
        cls = rng.integers(0, 3, rng.integers(1, 4))
        scores = rng.uniform(0.3, 0.95, len(cls))
        hit = np.ones((len(cls), 10), bool)
        fp32.append((hit, scores, cls, cls))
        found = hit.copy()
        for j in range(len(cls)):
            k += 1
            if miss_every and k % miss_every == 0:
                found[j] = False  # a false positive where the object was (and the object missed)
        cand.append((found, scores, cls, cls))
    return fp32, cand


def _score(stats: list[Any], calls: list[int]) -> Any:
    def score(indices: Any) -> list[Any]:
        calls.append(len(indices))
        return [stats[i] for i in indices]
    return score


NAMES = ["a", "b", "c"]


def test_early_stop_stops_a_clearly_failing_candidate() -> None:
    """A candidate that loses a tenth of the objects: its 99% interval lies far above 0.005 at the
    first look, so it is stopped after min_images images, and only those were scored."""
    fp32, bad = _synthetic_split(1000, miss_every=10)
    es = _early_stop(enabled=True, min_images=200, chunk=100, level=0.99, resamples=200)
    assert look_sizes(1000, es) == [200, 300, 400, 500, 600, 700, 800, 900] and look_sizes(150, es) == []
    ref = SplitReference("camera", [None] * 1000, fp32, NAMES, seed=0)
    calls: list[int] = []
    sc = score_split(_score(bad, calls), ref, 0.005, es, resamples=200)
    assert sc.stop is not None and sum(calls) == sc.images == sc.stop.images == 200
    assert sc.stop.split == "camera" and sc.stop.split_images == 1000 and sc.stop.level == 0.99
    low, high = sc.stop.ci
    assert 0.005 < low < sc.stop.drop < high and sc.stop.drop == sc.drop and sc.ci is None
    # Deterministic: seeded order and resamples give the same stop, bit for bit.
    again = score_split(_score(bad, []), SplitReference("camera", [None] * 1000, fp32, NAMES, seed=0), 0.005, es, 200)
    assert again == sc
    # Disabled, it is scored in full in file order, with the full-split 95% interval.
    full = score_split(_score(bad, calls := []), ref, 0.005, _early_stop(enabled=False), resamples=50)
    assert full.stop is None and calls == [1000] and full.images == 1000 and full.ci is not None
    assert full.drop > 0.005 and full.ci[0] > 0.005


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_early_stop_never_stops_a_passing_candidate(seed: int) -> None:
    """Identical to FP32 or losing 1 object in 400 (a drop below the gate): scored on the whole split,
    and the result is exactly the one without the stop (same drop and 95% interval)."""
    es = _early_stop(enabled=True, min_images=200, chunk=100, level=0.99, resamples=200)
    for miss_every in (0, 400):
        fp32, cand = _synthetic_split(1000, miss_every, seed)
        ref = SplitReference("camera", [None] * 1000, fp32, NAMES, seed=seed)
        calls: list[int] = []
        sc = score_split(_score(cand, calls), ref, 0.005, es, resamples=50)
        plain = score_split(_score(cand, []), ref, 0.005, _early_stop(enabled=False), resamples=50)
        assert sc.stop is None and sc.images == sum(calls) == 1000 and calls == [200] + [100] * 8
        assert sc == plain and sc.drop <= 0.005, (miss_every, sc)


def test_early_stop_near_the_gate_is_not_stopped() -> None:
    """A drop a little above the gate on the whole split (point estimate fails): its 99% interval
    reaches below the gate at every look, so it is scored in full and fails on the full figure."""
    fp32, cand = _synthetic_split(1000, miss_every=100)  # a drop of 0.011 on the whole split
    es = _early_stop(enabled=True, min_images=200, chunk=100, level=0.99, resamples=200)
    sc = score_split(_score(cand, []), SplitReference("camera", [None] * 1000, fp32, NAMES, 0), 0.005, es, 0)
    assert sc.stop is None and sc.images == 1000 and 0.005 < sc.drop < 0.02


def _stopped(name: str, latency: float) -> CandidateResult:
    return CandidateResult(name, "cfg", None, None, None, latency, 0.1, 2.0, 100, False, camera_images=200,
                           early_stop=EarlyStop("camera", 200, 1000, 0.03, (0.02, 0.04), 0.99))


def test_gate_never_passes_a_stopped_candidate() -> None:
    """A stopped candidate fails (even if it is the fastest) and the gate's error says where it stopped."""
    ok = CandidateResult("ok", "cfg", 0.41, 0.6, 0.002, 9.0, 0.1, 2.0, 100, False, map50_95_camera=0.3,
                         drop_camera=0.003, val_images=150, camera_images=1000)
    assert _stopped("fast", 5.0).worst_drop == 0.03
    assert accuracy_gate([_stopped("fast", 5.0), ok], 0.005, 0.412, "").name == "ok"
    with pytest.raises(AccuracyGateError, match=r"fast val not scored \(stopped early on camera after 200 of 1000 "
                                                r"images: partial drop \+0.0300, 99% interval \[\+0.0200, \+0.0400\]"):
        accuracy_gate([_stopped("fast", 5.0)], 0.005, 0.412, "")
    with pytest.raises(AccuracyGateError, match=r"Every candidate fails for certain"):
        accuracy_gate([_stopped("a", 5.0), _stopped("b", 6.0)], 0.005, 0.412, "")


def _fake_image_stats(bad: str) -> Any:
    """image_stats where FP32 and every candidate find every object, except candidate `bad`, which
    finds nothing: a drop of 1.0 wherever there is an object."""
    def fake(session: Any, items: Any, names: Any) -> tuple[list[Any], float]:
        meta = dict(session.get_modelmeta().custom_metadata_map)
        blind = meta.get("quantization_candidate") == bad
        out = []
        for item in items:
            cls = item.classes
            if blind:
                out.append((np.zeros((0, 10), bool), np.zeros(0), np.zeros(0, np.int64), cls))
            else:
                out.append((np.ones((len(cls), 10), bool), np.full(len(cls), 0.9), cls, cls))
        return out, 1.0
    return fake


def test_quantize_labels_the_early_stop(tmp_path: Path, tiny_model: dict[str, Path], quantized: dict[str, Path],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """In the stage: the failing candidate stops on the camera split (scored first) and is not scored on
    val; the CSV and the metrics record say so, with the partial drop apart from the full-split columns;
    the passing one is scored in full and chosen."""
    calib = _calibration(tmp_path, tiny_model["dataset"], 64)
    raw = _raw_params()
    bad, good = raw["candidates"][0]["name"], raw["candidates"][1]["name"]
    monkeypatch.setattr(quantize_stage, "image_stats", _fake_image_stats(bad))
    base = BaseParams(seed=0, threads=1)
    p = _params(early_stop={**raw["early_stop"], "min_images": 4, "chunk": 1})
    r = quantize(tiny_model["onnx"], calib, tiny_model["dataset"], _outs(tmp_path), p, base,
                 quantized["frames"] / "labelled")
    rows = {row["name"]: row for row in csv.DictReader(io.StringIO(_outs(tmp_path)["candidates"].read_text()))}
    n_val, n_cam = int(rows["fp32"]["val_images"]), int(rows["fp32"]["camera_images"])
    assert n_cam > 4 and n_val > 4
    assert rows[bad]["stopped_early"] == "yes" and rows[bad]["stop_split"] == "camera"
    assert rows[bad]["stop_images"] == rows[bad]["camera_images"] == "4" and rows[bad]["val_images"] == "0"
    perfect = float(rows["fp32"]["mAP50-95"])  # 0.995: the 101-point AP of a perfect detector
    assert float(rows[bad]["stop_partial_drop"]) == perfect and float(rows[bad]["stop_ci_low"]) > p.max_map_drop
    assert rows[bad]["stop_level"] == "0.99" and rows[bad]["passed"] == "no"
    # The whole-split columns stay empty: the partial estimate is never shown as a split's figure.
    assert rows[bad]["mAP50-95"] == rows[bad]["drop"] == rows[bad]["drop_camera"] == rows[bad]["mAP50-95_camera"] == ""
    assert rows[good]["stopped_early"] == "no" and rows[good]["stop_split"] == rows[good]["stop_partial_drop"] == ""
    assert (rows[good]["val_images"], rows[good]["camera_images"]) == (str(n_val), str(n_cam))
    assert rows[good]["passed"] == "yes" and float(rows[good]["drop"]) == float(rows[good]["drop_camera"]) == 0.0
    assert r.chosen.name == good and r.chosen.early_stop is None
    rec = scoring_record(r.rows)
    assert rec[bad] == {"passed": False, "stopped_early": True, "val_images": 0, "camera_images": 4,
                        "stop": {"split": "camera", "images": 4, "split_images": n_cam, "partial_drop": perfect,
                                 "interval": [perfect, perfect], "level": 0.99}}
    assert rec[good] == {"passed": True, "stopped_early": False, "val_images": n_val, "camera_images": n_cam,
                         "drop": 0.0, "drop_camera": 0.0}
    # No camera split: it stops on val. Stop off: the camera split fails in full, and val is not scored.
    r = quantize(tiny_model["onnx"], calib, tiny_model["dataset"], _outs(tmp_path), p, base)
    stop = next(row for row in r.rows if row.name == bad).early_stop
    assert stop is not None and (stop.split, stop.images, stop.split_images) == ("val", 4, n_val)
    r = quantize(tiny_model["onnx"], calib, tiny_model["dataset"], _outs(tmp_path),
                 _params(early_stop={**raw["early_stop"], "enabled": False}), base, quantized["frames"] / "labelled")
    row = next(row for row in r.rows if row.name == bad)
    assert row.early_stop is None and row.drop_camera == pytest.approx(perfect) and row.drop is None
    assert row.val_images == 0 and row.camera_images == n_cam
    assert not row.passed and r.chosen.name == good


def test_stage_metrics_record_the_scoring(quantized: dict[str, Path]) -> None:
    """metrics.json says, per candidate, what was scored and whether it stopped early."""
    full = json.loads(quantized["quantize_metrics"].read_text())
    assert full["candidates_stopped_early"] == 0  # the tiny splits are smaller than min_images
    assert set(full["candidate_scoring"]) == {c["name"] for c in _raw_params()["candidates"]}
    assert all(not rec["stopped_early"] and rec["camera_images"] > 0 for rec in full["candidate_scoring"].values())
    assert full["candidate_images_scored"] == sum(rec["val_images"] + rec["camera_images"]
                                                  for rec in full["candidate_scoring"].values())


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
