"""The ONE YOLOv8 decode + NMS used everywhere: calibrate, evaluate, benchmark and the device.

Two model output formats are understood; a model records which one it produces in its ONNX
metadata key ``output_format`` (and the release manifest repeats it):

``yolov8-raw`` (what `pipeline/stages/export.py` produces)
    One tensor (B, 4 + nc, N): rows 0..3 are cx, cy, w, h in model-input pixels (the head's DFL
    and anchor decode already ran inside the graph), rows 4.. are per-class sigmoid scores.

``yolov8-predfl`` / ``yolov8-predfl-logits`` (for graphs cut before the head's DFL decode)
    One tensor (B, 4 * reg_max + nc, N). Rows ``0 .. 4*reg_max-1`` are the box-side distribution
    logits, side-major: row ``side * reg_max + bin`` for side in (left, top, right, bottom) and
    bin in 0..reg_max-1 -- exactly Ultralytics' ``Detect`` "boxes" tensor before ``DFL``
    (``x.view(b, 4, reg_max, a)``). Rows ``4*reg_max ..`` are the class scores: sigmoid
    probabilities for ``yolov8-predfl``, raw logits (sigmoid NOT applied) for
    ``yolov8-predfl-logits``. Columns are anchors level by level in stride order (8, 16, 32),
    row-major (y, then x) within a level, i.e. the order of Ultralytics' ``make_anchors``. Extra
    ONNX metadata: ``reg_max`` (default 16) and ``strides`` (comma separated, default "8,16,32").
    The quantization stage produces this by cutting the graph at the Concat that feeds the
    head's split into DFL and sigmoid. The DFL decode (softmax over reg_max bins, expectation,
    distance-to-box around the anchor, times stride) then runs here, only for the anchors
    whose best class score passes the confidence threshold -- typically a handful of N.

All functions are vectorised numpy; the only loop is greedy NMS over surviving boxes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .preprocess import Letterbox

FORMAT_RAW = "yolov8-raw"
FORMAT_PREDFL = "yolov8-predfl"
FORMAT_PREDFL_LOGITS = "yolov8-predfl-logits"
OUTPUT_FORMATS = (FORMAT_RAW, FORMAT_PREDFL, FORMAT_PREDFL_LOGITS)
DEFAULT_STRIDES = (8, 16, 32)
DEFAULT_REG_MAX = 16
# Same constants as Ultralytics' non_max_suppression, so results match `model.predict`.
MAX_WH = 7680  # per-class coordinate offset that turns one NMS into class-aware NMS
MAX_NMS = 30000  # at most this many highest-scoring candidates enter NMS


class PostprocessError(ValueError):
    """A model output that does not match the declared output format."""


@dataclass(frozen=True)
class HeadSpec:
    """What the model's output tensor looks like: format, classes, input size, anchor grid."""

    output_format: str
    num_classes: int
    imgsz: int
    strides: Tuple[int, ...] = DEFAULT_STRIDES
    reg_max: int = DEFAULT_REG_MAX

    def __post_init__(self) -> None:
        if self.output_format not in OUTPUT_FORMATS:
            raise PostprocessError(
                f"output_format '{self.output_format}' unknown; this runtime decodes {', '.join(OUTPUT_FORMATS)} "
                "(re-export the model or update the device runtime)"
            )
        if self.num_classes < 1:
            raise PostprocessError(f"num_classes must be >= 1, got {self.num_classes}; check the model's class names")
        for s in self.strides:
            if self.imgsz % s:
                raise PostprocessError(f"imgsz {self.imgsz} is not a multiple of stride {s}; "
                                       "export at a multiple of 32")

    @property
    def num_anchors(self) -> int:
        """N, the number of anchor columns the output must have."""
        return sum((self.imgsz // s) ** 2 for s in self.strides)

    @property
    def channels(self) -> int:
        """Rows of the output tensor per anchor."""
        if self.output_format == FORMAT_RAW:
            return 4 + self.num_classes
        return 4 * self.reg_max + self.num_classes

    @property
    def scores_are_logits(self) -> bool:
        """True when the class rows hold logits (sigmoid not yet applied)."""
        return self.output_format == FORMAT_PREDFL_LOGITS

    def expected_shape(self, batch: int = 1) -> Tuple[int, int, int]:
        """The output tensor shape this spec decodes."""
        return (batch, self.channels, self.num_anchors)


def spec_from_metadata(metadata: Dict[str, str], output_format: str, num_classes: int, imgsz: int) -> HeadSpec:
    """Build a HeadSpec from the manifest's format/classes/imgsz plus the ONNX metadata extras.

    The manifest is authoritative for format, classes and imgsz; the model metadata only adds
    what a pre-DFL graph needs (reg_max, strides). A disagreement is an error, not a guess.
    """
    meta_format = metadata.get("output_format")
    if meta_format is not None and meta_format != output_format:
        raise PostprocessError(
            f"model metadata says output_format '{meta_format}' but the manifest says '{output_format}'; "
            "the release was assembled from mismatched files -- redeploy it"
        )
    strides = DEFAULT_STRIDES
    if metadata.get("strides"):
        try:
            strides = tuple(int(s) for s in metadata["strides"].split(","))
        except ValueError as e:
            raise PostprocessError(f"model metadata strides '{metadata['strides']}' is not a comma list of ints") from e
    reg_max = int(metadata.get("reg_max", DEFAULT_REG_MAX))
    return HeadSpec(output_format, num_classes, imgsz, strides, reg_max)


@dataclass(frozen=True)
class Detections:
    """Detections for one image: boxes (K, 4) xyxy source pixels, scores (K,), classes (K,)."""

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    @staticmethod
    def empty() -> "Detections":
        """No detections."""
        return Detections(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), np.zeros((0,), np.int64))

    def to_json(self, class_names: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
        """Detections as JSON-able dicts (box rounded to 0.1 px, score to 4 digits)."""
        out = []
        for box, score, cls in zip(self.boxes.tolist(), self.scores.tolist(), self.classes.tolist()):
            item: Dict[str, Any] = {"box": [round(v, 1) for v in box], "score": round(score, 4), "class": int(cls)}
            if class_names is not None and 0 <= cls < len(class_names):
                item["name"] = class_names[cls]
            out.append(item)
        return out


def make_anchors(imgsz: int, strides: Sequence[int] = DEFAULT_STRIDES) -> Tuple[np.ndarray, np.ndarray]:
    """Anchor centres (N, 2) in grid units (x + 0.5, y + 0.5) and their strides (N,), like Ultralytics."""
    points, stride_list = [], []
    for s in strides:
        n = imgsz // s
        ys, xs = np.meshgrid(np.arange(n, dtype=np.float32) + 0.5, np.arange(n, dtype=np.float32) + 0.5, indexing="ij")
        points.append(np.stack((xs.ravel(), ys.ravel()), axis=1))
        stride_list.append(np.full(n * n, s, dtype=np.float32))
    return np.concatenate(points), np.concatenate(stride_list)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Numerically safe logistic function."""
    return (1.0 / (1.0 + np.exp(-np.clip(x, -80.0, 80.0)))).astype(np.float32)


def dfl_decode(box_dist: np.ndarray, anchors: np.ndarray, strides: np.ndarray, reg_max: int) -> np.ndarray:
    """Decode box-side distributions (K, 4 * reg_max) into xyxy boxes (K, 4) in input pixels.

    Softmax over each side's reg_max bins, expectation = distance in grid cells, then
    ``x1y1 = anchor - lt``, ``x2y2 = anchor + rb``, times the anchor's stride (Ultralytics' DFL
    followed by dist2bbox(xywh=False) and `* strides`).
    """
    k = box_dist.shape[0]
    if box_dist.shape[1] != 4 * reg_max:
        raise PostprocessError(f"box distribution has {box_dist.shape[1]} rows, expected 4 * reg_max = {4 * reg_max}")
    logits = box_dist.reshape(k, 4, reg_max).astype(np.float32)
    logits = logits - logits.max(axis=2, keepdims=True)  # stable softmax
    e = np.exp(logits)
    dist = (e * np.arange(reg_max, dtype=np.float32)).sum(axis=2) / e.sum(axis=2)  # (K, 4): l, t, r, b
    x1y1 = anchors - dist[:, :2]
    x2y2 = anchors + dist[:, 2:]
    return np.concatenate((x1y1, x2y2), axis=1) * strides[:, None]


def xywh_to_xyxy(b: np.ndarray) -> np.ndarray:
    """Centre/size boxes (K, 4) to corner boxes (K, 4)."""
    half = b[:, 2:4] / 2
    return np.concatenate((b[:, :2] - half, b[:, :2] + half), axis=1)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy NMS; returns indices into `boxes` of the kept boxes, highest score first.

    Boxes whose IoU with an already kept, higher-scoring box is above `iou_threshold` are
    suppressed (strictly greater, as torchvision.ops.nms). Class-aware NMS is done by the caller
    offsetting each class's boxes so different classes never overlap.
    """
    if boxes.shape[0] == 0:
        return np.zeros((0,), dtype=np.int64)
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    areas = (x2 - x1).clip(0) * (y2 - y1).clip(0)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        w = (np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest])).clip(0)
        h = (np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest])).clip(0)
        inter = w * h
        iou = inter / (areas[i] + areas[rest] - inter + 1e-9)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def _check_thresholds(conf: float, iou: float, max_det: int) -> None:
    if not 0.0 <= conf <= 1.0:
        raise PostprocessError(f"conf threshold {conf} outside [0, 1]; fix postprocess.conf in the manifest")
    if not 0.0 <= iou <= 1.0:
        raise PostprocessError(f"iou threshold {iou} outside [0, 1]; fix postprocess.iou in the manifest")
    if max_det < 1:
        raise PostprocessError(f"max_det {max_det} must be >= 1; fix postprocess.max_det in the manifest")


def candidates(output: np.ndarray, spec: HeadSpec, conf: float) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode ONE image's output (C, N) into candidate boxes above `conf`.

    Returns xyxy boxes in model-input pixels (K, 4), best-class score (K,) and class (K,). Only
    the K anchors whose best class score is above `conf` (strictly, as Ultralytics) get their
    boxes decoded -- for a pre-DFL output this is where the DFL work is saved.
    """
    if output.ndim != 2 or output.shape[0] != spec.channels:
        raise PostprocessError(
            f"model output per image has shape {output.shape}, expected ({spec.channels}, N) for "
            f"{spec.output_format} with {spec.num_classes} classes; the manifest's class list or output_format "
            "does not match the model -- redeploy the release"
        )
    if output.shape[1] != spec.num_anchors:
        raise PostprocessError(
            f"model output has {output.shape[1]} anchors, expected {spec.num_anchors} for imgsz {spec.imgsz}; "
            "the variant's imgsz does not match the model -- redeploy the release"
        )
    box_rows = 4 if spec.output_format == FORMAT_RAW else 4 * spec.reg_max
    cls_scores = output[box_rows:]
    best_cls = cls_scores.argmax(axis=0)
    best = cls_scores[best_cls, np.arange(cls_scores.shape[1])]
    if spec.scores_are_logits:
        # Compare in logit space (sigmoid is monotonic) so sigmoid runs only on the survivors.
        if conf <= 0.0:
            keep = np.ones_like(best, dtype=bool)
        elif conf >= 1.0:
            keep = np.zeros_like(best, dtype=bool)
        else:
            keep = best > np.float32(np.log(conf / (1.0 - conf)))
        idx = np.nonzero(keep)[0]
        scores = sigmoid(best[idx])
        keep2 = scores > conf  # the logit comparison can differ in the last ulp
        idx, scores = idx[keep2], scores[keep2]
    else:
        idx = np.nonzero(best > conf)[0]
        scores = best[idx].astype(np.float32)
    classes = best_cls[idx].astype(np.int64)
    if spec.output_format == FORMAT_RAW:
        boxes = xywh_to_xyxy(output[:4, idx].T.astype(np.float32))
    else:
        anchors, strides = make_anchors(spec.imgsz, spec.strides)
        boxes = dfl_decode(output[:box_rows, idx].T, anchors[idx], strides[idx], spec.reg_max)
    return boxes, scores, classes


def postprocess_one(output: np.ndarray, spec: HeadSpec, conf: float, iou: float, max_det: int,
                    letterbox: Optional[Letterbox] = None) -> Detections:
    """Decode, confidence-filter, class-aware NMS, cap at `max_det`, map to source pixels.

    `output` is one image's (C, N) slice. Without `letterbox` the boxes stay in input pixels.
    """
    _check_thresholds(conf, iou, max_det)
    boxes, scores, classes = candidates(output, spec, conf)
    if scores.size == 0:
        return Detections.empty()
    if scores.size > MAX_NMS:
        top = np.argsort(-scores, kind="stable")[:MAX_NMS]
        boxes, scores, classes = boxes[top], scores[top], classes[top]
    keep = nms(boxes + (classes[:, None] * MAX_WH).astype(np.float32), scores, iou)[:max_det]
    boxes, scores, classes = boxes[keep], scores[keep], classes[keep]
    if letterbox is not None:
        boxes = letterbox.to_source(boxes)
    return Detections(boxes.astype(np.float32), scores.astype(np.float32), classes)


def postprocess(output: np.ndarray, spec: HeadSpec, conf: float, iou: float, max_det: int,
                letterboxes: Optional[Sequence[Letterbox]] = None) -> List[Detections]:
    """Postprocess a batch output (B, C, N): one `Detections` per image, in source pixels."""
    if output.ndim != 3:
        raise PostprocessError(f"model output has shape {output.shape}, expected (batch, {spec.channels}, N)")
    if letterboxes is not None and len(letterboxes) != output.shape[0]:
        raise PostprocessError(f"{len(letterboxes)} letterboxes for a batch of {output.shape[0]} outputs")
    return [postprocess_one(output[b], spec, conf, iou, max_det, letterboxes[b] if letterboxes is not None else None)
            for b in range(output.shape[0])]


def check_output(output: np.ndarray, spec: HeadSpec, batch: int = 1) -> List[str]:
    """Sanity problems of a raw model output (shape, finite values, score range); empty = sane."""
    problems = []
    expected = spec.expected_shape(batch)
    if tuple(output.shape) != expected:
        problems.append(f"output shape {tuple(output.shape)} != expected {expected}")
        return problems
    if not np.isfinite(output).all():
        problems.append(f"output has {int((~np.isfinite(output)).sum())} non-finite values")
    if not spec.scores_are_logits:
        box_rows = 4 if spec.output_format == FORMAT_RAW else 4 * spec.reg_max
        scores = output[:, box_rows:]
        lo, hi = float(np.nanmin(scores)), float(np.nanmax(scores))
        if lo < 0.0 or hi > 1.0:
            problems.append(f"class scores span [{lo:.4g}, {hi:.4g}], outside [0, 1]")
    return problems
