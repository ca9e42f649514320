"""Postprocessing: NMS edge cases, DFL decode against Ultralytics, full pre+post parity with
`YOLO(weights).predict` on the same images, and the pre-DFL output formats on a real head."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import cv2
import numpy as np
import pytest

from edge_runtime.postprocess import (
    FORMAT_PREDFL,
    FORMAT_PREDFL_LOGITS,
    FORMAT_RAW,
    Detections,
    HeadSpec,
    PostprocessError,
    candidates,
    check_output,
    dfl_decode,
    make_anchors,
    nms,
    postprocess,
    postprocess_one,
    spec_from_metadata,
)
from edge_runtime.preprocess import Letterbox, preprocess


def _raw_output(boxes_xywh: List[List[float]], scores: List[List[float]], imgsz: int = 64) -> np.ndarray:
    """A (4 + nc, N) raw output with the given boxes in the first anchors, zeros elsewhere."""
    spec = HeadSpec(FORMAT_RAW, len(scores[0]), imgsz)
    out = np.zeros((spec.channels, spec.num_anchors), np.float32)
    for i, (b, s) in enumerate(zip(boxes_xywh, scores)):
        out[:4, i] = b
        out[4:, i] = s
    return out


def test_no_boxes() -> None:
    spec = HeadSpec(FORMAT_RAW, 3, 64)
    dets = postprocess_one(np.zeros((spec.channels, spec.num_anchors), np.float32), spec, 0.25, 0.45, 100)
    assert len(dets) == 0 and dets.boxes.shape == (0, 4)
    assert nms(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), 0.5).shape == (0,)


def test_all_one_class_suppressed_and_class_aware() -> None:
    # Three heavily overlapping boxes of class 0, one overlapping box of class 1: class-aware NMS
    # keeps the best class-0 box and the class-1 box.
    out = _raw_output([[20, 20, 10, 10], [21, 20, 10, 10], [20, 21, 10, 10], [20, 20, 10, 10]],
                      [[0.9, 0.0], [0.8, 0.0], [0.7, 0.0], [0.0, 0.6]])
    dets = postprocess_one(out, HeadSpec(FORMAT_RAW, 2, 64), 0.25, 0.45, 100)
    assert dets.classes.tolist() == [0, 1]
    np.testing.assert_allclose(dets.scores, [0.9, 0.6])
    np.testing.assert_allclose(dets.boxes[0], [15, 15, 25, 25])
    # All one class, disjoint boxes: nothing suppressed, max_det caps, order by score.
    out = _raw_output([[10, 10, 4, 4], [30, 30, 4, 4], [50, 50, 4, 4]], [[0.5], [0.7], [0.6]])
    dets = postprocess_one(out, HeadSpec(FORMAT_RAW, 1, 64), 0.25, 0.45, 2)
    np.testing.assert_allclose(dets.scores, [0.7, 0.6])
    assert dets.to_json(["crack"])[0] == {"box": [28.0, 28.0, 32.0, 32.0], "score": 0.7, "class": 0, "name": "crack"}


def test_threshold_is_strict_and_letterbox_maps_back() -> None:
    out = _raw_output([[32, 32, 8, 8], [10, 10, 4, 4]], [[0.25], [0.26]])
    lb = Letterbox(scale=0.5, pad_left=0, pad_top=16, source_hw=(64, 128))
    (dets,) = postprocess(out[None], HeadSpec(FORMAT_RAW, 1, 64), 0.25, 0.45, 10, [lb])
    assert len(dets) == 1  # 0.25 is not > 0.25 (Ultralytics' rule)
    np.testing.assert_allclose(dets.boxes[0], [16, 0, 24, 0])  # (8..12, 8..12) -> x*2, (y-16)*2 clipped at 0
    # Unclipped (how Ultralytics' val scores boxes that run off the image): the same mapping.
    np.testing.assert_allclose(lb.to_source(np.array([[8.0, 8.0, 12.0, 12.0]]), clip=False)[0], [16, -16, 24, -8])


def test_bad_shapes_and_thresholds() -> None:
    spec = HeadSpec(FORMAT_RAW, 2, 64)
    with pytest.raises(PostprocessError, match="expected \\(6, N\\)"):
        postprocess_one(np.zeros((7, spec.num_anchors), np.float32), spec, 0.25, 0.45, 10)
    with pytest.raises(PostprocessError, match="expected 84 for imgsz 64"):
        postprocess_one(np.zeros((6, 10), np.float32), spec, 0.25, 0.45, 10)
    with pytest.raises(PostprocessError, match="conf threshold 1.5"):
        postprocess_one(np.zeros((6, 84), np.float32), spec, 1.5, 0.45, 10)
    with pytest.raises(PostprocessError, match="output_format 'yolov9' unknown"):
        HeadSpec("yolov9", 2, 64)
    with pytest.raises(PostprocessError, match="not a multiple of stride"):
        HeadSpec(FORMAT_RAW, 2, 70)
    with pytest.raises(PostprocessError, match="manifest says 'yolov8-raw'"):
        spec_from_metadata({"output_format": FORMAT_PREDFL}, FORMAT_RAW, 2, 64)
    assert spec_from_metadata({"reg_max": "8", "strides": "8,16"}, FORMAT_PREDFL, 2, 64) == \
        HeadSpec(FORMAT_PREDFL, 2, 64, (8, 16), 8)
    bad = np.zeros((1, 6, 84), np.float32)
    bad[0, 5, 3] = 1.5
    bad[0, 0, 0] = np.nan
    problems = check_output(bad, spec)
    assert any("non-finite" in p for p in problems) and any("outside [0, 1]" in p for p in problems)
    assert check_output(np.zeros((1, 6, 80), np.float32), spec) == ["output shape (1, 6, 80) != expected (1, 6, 84)"]


def test_dfl_decode_matches_ultralytics() -> None:
    torch = pytest.importorskip("torch")
    from ultralytics.nn.modules.block import DFL
    from ultralytics.utils.tal import dist2bbox
    from ultralytics.utils.tal import make_anchors as u_make_anchors

    imgsz, reg_max, strides = 96, 16, (8, 16, 32)
    feats = [torch.zeros(1, 1, imgsz // s, imgsz // s) for s in strides]
    u_anchors, u_strides = u_make_anchors(feats, torch.tensor(strides, dtype=torch.float32), 0.5)
    anchors, stride_arr = make_anchors(imgsz, strides)
    np.testing.assert_array_equal(anchors, u_anchors.numpy())
    np.testing.assert_array_equal(stride_arr, u_strides.numpy()[:, 0])

    rng = np.random.default_rng(0)
    dist = (rng.standard_normal((1, 4 * reg_max, anchors.shape[0])) * 3).astype(np.float32)
    with torch.no_grad():
        d = DFL(reg_max)(torch.from_numpy(dist))  # (1, 4, N)
        ref = (dist2bbox(d, u_anchors.T.unsqueeze(0), xywh=False, dim=1) * u_strides.T).numpy()[0].T
    got = dfl_decode(dist[0].T, anchors, stride_arr, reg_max)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)


def _predictions(weights: Path, images: List[np.ndarray], imgsz: int, conf: float, iou: float) -> List[Dict]:
    from ultralytics import YOLO

    results = YOLO(str(weights)).predict(images, imgsz=imgsz, conf=conf, iou=iou, device="cpu", verbose=False,
                                         max_det=300)
    return [{"boxes": r.boxes.xyxy.numpy(), "scores": r.boxes.conf.numpy(), "classes": r.boxes.cls.numpy().astype(int)}
            for r in results]


def _test_images(dataset: Path) -> List[np.ndarray]:
    files = sorted((dataset / "images" / "val").glob("*"))[:3]
    images = [cv2.imread(str(f)) for f in files]
    # Non-square variants exercise the letterbox padding and the box mapping back.
    return images + [images[0][:, :70].copy(), cv2.resize(images[1], (120, 80)), cv2.resize(images[2], (50, 90))]


def _assert_match(ours: Detections, ref: Dict, box_atol: float) -> None:
    assert len(ours) == len(ref["scores"]), (len(ours), len(ref["scores"]))
    order_o = np.lexsort((ours.boxes[:, 0], -ours.scores))
    order_r = np.lexsort((ref["boxes"][:, 0], -ref["scores"]))
    np.testing.assert_allclose(ours.scores[order_o], ref["scores"][order_r], atol=2e-4)
    np.testing.assert_array_equal(ours.classes[order_o], ref["classes"][order_r])
    np.testing.assert_allclose(ours.boxes[order_o], ref["boxes"][order_r], atol=box_atol)


def test_pre_and_post_match_ultralytics_predict(tiny_model: Dict[str, Path]) -> None:
    import onnxruntime as ort

    conf, iou, imgsz = 0.001, 0.7, 64  # the 1-epoch model scores ~0.002
    images = _test_images(tiny_model["dataset"])
    refs = _predictions(tiny_model["weights"], images, imgsz, conf, iou)
    session = ort.InferenceSession(str(tiny_model["onnx"]), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    names = eval(meta["names"])  # noqa: S307 - test-only, Ultralytics writes a dict literal
    spec = spec_from_metadata(meta, FORMAT_RAW, len(names), imgsz)
    total = 0
    for image, ref in zip(images, refs):
        tensor, lb = preprocess(image, imgsz)
        out = session.run(None, {session.get_inputs()[0].name: tensor})[0]
        (dets,) = postprocess(out, spec, conf, iou, 300, [lb])
        # Ultralytics maps back with per-axis gains (new_w / w, new_h / h) while Letterbox uses one
        # scale, so non-square sources differ by a fraction of a pixel.
        _assert_match(dets, ref, box_atol=0.75)
        total += len(dets)
    assert total > 0, "the tiny model found nothing even at conf 0.001; the parity check would be vacuous"


def test_predfl_formats_match_raw_on_real_head(tiny_model: Dict[str, Path]) -> None:
    """Cut a real YOLOv8n head before DFL (what the quantization stage ships) and check the
    pre-DFL decode gives the same detections as the raw format."""
    torch = pytest.importorskip("torch")
    from ultralytics import YOLO

    model = YOLO(str(tiny_model["weights"])).model.float().eval()
    head = model.model[-1]
    captured = {}
    handle = head.register_forward_hook(lambda m, inp, out: captured.setdefault("x", inp[0]))
    images = _test_images(tiny_model["dataset"])
    nc = len(model.names)
    try:
        for image in images:
            tensor, lb = preprocess(image, 64)
            captured.clear()
            with torch.no_grad():
                model(torch.from_numpy(tensor))
                preds = head.forward_head(captured["x"], **head.one2many)
                raw = head._inference(preds).numpy()
            boxes, logits = preds["boxes"].numpy(), preds["scores"].numpy()
            predfl = np.concatenate([boxes, 1 / (1 + np.exp(-logits))], axis=1)
            predfl_logits = np.concatenate([boxes, logits], axis=1)
            (want,) = postprocess(raw, HeadSpec(FORMAT_RAW, nc, 64), 0.0, 0.7, 300, [lb])
            for fmt, out in ((FORMAT_PREDFL, predfl), (FORMAT_PREDFL_LOGITS, predfl_logits)):
                spec = HeadSpec(fmt, nc, 64)
                assert check_output(out, spec) == [] or fmt == FORMAT_PREDFL_LOGITS
                (got,) = postprocess(out, spec, 0.0, 0.7, 300, [lb])
                _assert_match(got, {"boxes": want.boxes, "scores": want.scores, "classes": want.classes},
                              box_atol=1e-2)
            # Only candidates above conf are DFL-decoded: fewer candidates than anchors.
            b, _, _ = candidates(predfl[0], HeadSpec(FORMAT_PREDFL, nc, 64), 0.5)
            assert b.shape[0] <= predfl.shape[2]
    finally:
        handle.remove()
