"""FP16 copies of the exported ONNX model, and how closely they match the FP32 one.

TensorRT 11 dropped `BuilderFlag.FP16`: an FP16 engine comes from a strongly typed network, i.e. an
ONNX graph whose weights and activations are already float16. TensorRT 8.5/10 still build FP16
from the FP32 ONNX with the builder flag, so a TensorRT fp16 release ships both files
(`pipeline/fleet/artifacts.py`).

`to_float16` converts with onnxconverter-common, keeping the graph's input and output float32
(`keep_io_types`): the device feeds the same letterboxed float32 tensor and decodes the same float32
output, so pre- and postprocessing do not change. Ops onnxconverter-common keeps in float32 (its
default block list; in YOLOv8 the two nearest-neighbour `Resize`s) get Casts around them.

`compare` runs both models with ONNX Runtime CPU on the same input tensors: max |FP16 - FP32| over
every anchor's box and class-score rows (as the export stage's PyTorch check measures FP32), plus
detection-level agreement after the device's decode + NMS: the FP32 detections are the reference,
an FP16 detection of the same class at IoU >= 0.5 is a true positive (mAP's matching,
`pipeline.accuracy.mean_ap.match_predictions`), and the figure is the box F1, the agreement
`fab shadow` reports between two releases. ORT's CPU provider
runs float16 ops it has no float16 kernel for in float32 between Casts, so these figures bound the
rounding of weights and of activations between ops, not TensorRT's own FP16 kernels.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from edge_runtime.postprocess import Detections, HeadSpec, postprocess_one
from pipeline.accuracy.mean_ap import box_iou, match_predictions, onnx_session
from pipeline.onnx_models.graph import set_metadata


@dataclass(frozen=True)
class Fp16Parity:
    """FP16 vs FP32 on the same images (FP32 the reference)."""

    images: int
    max_abs_diff_box: float  # input pixels; inf if an FP16 output was not finite
    max_abs_diff_score: float
    detections_fp32: int
    detections_fp16: int
    tp: int
    fp: int
    fn: int

    @property
    def f1(self) -> float | None:
        """Box F1 = 2TP / (2TP + FP + FN); None when neither model detected anything."""
        den = 2 * self.tp + self.fp + self.fn
        return round(2 * self.tp / den, 4) if den else None


def to_float16(fp32_model: Any, fp32_sha256: str) -> bytes:
    """`fp32_model` (an onnx.ModelProto, not changed) with float16 weights and activations, float32 I/O.

    Metadata is kept (class names, imgsz, output_format, preprocess...) and gains `fp32_sha256`, the
    FP32 ONNX it was converted from. The conversion is deterministic: the same bytes every run.
    """
    import onnx
    from onnxconverter_common import float16

    model = onnx.ModelProto()
    model.CopyFrom(fp32_model)
    # The Ultralytics + onnxslim export lists every intermediate tensor's value_info twice; the
    # converter then retypes only one copy of a Resize output and the graph no longer type-checks
    # (ORT: "Type (tensor(float)) of output arg (/model.10/Resize_output_0) ... does not match expected
    # type (tensor(float16))"). The converter re-infers the shapes it needs, so drop them all.
    del model.graph.value_info[:]
    with warnings.catch_warnings():
        # "the float32 number 9.87e-08 will be truncated to 1e-07": weights below float16's smallest
        # normal value are clamped (min_positive_val); expected, and thousands of lines otherwise.
        warnings.simplefilter("ignore", UserWarning)
        half = float16.convert_float_to_float16(model, keep_io_types=True)
    set_metadata(half, {"fp32_sha256": fp32_sha256})
    onnx.checker.check_model(half)
    return half.SerializeToString()


def _max_abs(got: np.ndarray, ref: np.ndarray) -> float:
    if not np.isfinite(got).all():
        return float("inf")  # an overflow to inf/NaN in float16 must fail the gate, not slip past a max()
    return float(np.abs(got.astype(np.float64) - ref.astype(np.float64)).max()) if got.size else 0.0


def match(reference: Detections, candidate: Detections) -> tuple[int, int, int]:
    """(TP, FP, FN) of `candidate` against `reference` on one image: same class, IoU >= 0.5."""
    if not len(candidate) or not len(reference):
        return 0, len(candidate), len(reference)
    order = np.argsort(-candidate.scores, kind="stable")  # match_predictions wants descending confidence
    iou = box_iou(reference.boxes.astype(np.float64), candidate.boxes[order].astype(np.float64))
    tp = int(match_predictions(candidate.classes[order], reference.classes, iou)[:, 0].sum())
    return tp, len(candidate) - tp, len(reference) - tp


def compare(fp32: bytes, fp16: bytes, tensors: Sequence[np.ndarray], spec: HeadSpec, threads: int,
            conf: float, iou: float, max_det: int) -> Fp16Parity:
    """Run preprocessed `tensors` (each (1, 3, H, W) float32) through both models with ORT CPU.

    Raises RuntimeError if the FP16 model does not load or its output shape differs from FP32's.
    """
    ref_session = onnx_session(fp32, threads)
    try:
        half_session = onnx_session(fp16, threads)
    except ValueError as e:  # a conversion that ORT cannot run: the work failed, not its input
        raise RuntimeError(f"the FP16 model: {e}") from e
    name = ref_session.get_inputs()[0].name
    box = score = 0.0
    n32 = n16 = tp = fp = fn = 0
    for tensor in tensors:
        ref = ref_session.run(None, {name: tensor})[0]
        got = half_session.run(None, {name: tensor})[0]
        if got.shape != ref.shape:
            raise RuntimeError(f"FP16 output shape {got.shape} != FP32 output shape {ref.shape}")
        box = max(box, _max_abs(got[:, :4], ref[:, :4]))
        score = max(score, _max_abs(got[:, 4:], ref[:, 4:]))
        for b in range(ref.shape[0]):
            a = postprocess_one(ref[b], spec, conf, iou, max_det)
            h = postprocess_one(np.nan_to_num(got[b].astype(np.float32)), spec, conf, iou, max_det)
            n32, n16 = n32 + len(a), n16 + len(h)
            ctp, cfp, cfn = match(a, h)
            tp, fp, fn = tp + ctp, fp + cfp, fn + cfn
    return Fp16Parity(len(tensors), box, score, n32, n16, tp, fp, fn)
