"""Detection accuracy the way Ultralytics' `val` computes it, on ONNX models run by the device code.

Used by the quantize stage (accuracy gate) and the evaluate stage. Images go through
`runtime/edge_runtime/preprocess.py` and ONNX Runtime; outputs are decoded with
`runtime/edge_runtime/postprocess.py`. The metric itself mirrors Ultralytics 8.4 so numbers agree
with `YOLO(...).val()` on the same model and split:

- NMS as in val: confidence 0.001, IoU 0.7, max 300 detections, *multi-label* (an anchor yields
  a candidate for every class above the threshold, not only its best class);
- matching per IoU threshold 0.50:0.05:0.95, detections in descending confidence, each claims
  the unclaimed same-class target of highest IoU (Ultralytics' greedy `match_predictions`);
- AP per class by 101-point interpolation of the precision envelope (COCO), mAP over the
  classes present in the labels; P and R at the confidence that maximises the smoothed mean F1.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from edge_runtime.postprocess import (
    FORMAT_RAW,
    Detections,
    HeadSpec,
    dfl_decode,
    make_anchors,
    nms,
    postprocess,
    sigmoid,
    spec_from_metadata,
    xywh_to_xyxy,
)
from edge_runtime.preprocess import Letterbox, preprocess
from pipeline.imagesets.yolo import decode_image, iter_split_files, read_text, validate_label_text

VAL_CONF = 0.001
VAL_IOU = 0.7
VAL_MAX_DET = 300
MAX_WH = 7680  # class offset for class-aware NMS (same as the device)
IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
_AP_X = np.linspace(0, 1, 101)


@dataclass(frozen=True)
class Labelled:
    """One evaluation image: its BGR pixels, GT boxes (M, 4) xyxy source pixels, GT classes (M,)."""

    path: Path
    image: np.ndarray
    boxes: np.ndarray
    classes: np.ndarray


@dataclass
class Accuracy:
    """Ultralytics-compatible detection metrics for one model on one split."""

    precision: float
    recall: float
    map50: float
    map50_95: float
    per_class_ap50_95: dict[str, float] = field(default_factory=dict)
    per_class_ap50: dict[str, float] = field(default_factory=dict)
    images: int = 0
    instances: int = 0

    def as_dict(self, prefix: str = "") -> dict[str, Any]:
        """Flat metrics dict (rounded to 6 digits for stable files)."""
        out: dict[str, Any] = {
            f"{prefix}precision": round(self.precision, 6),
            f"{prefix}recall": round(self.recall, 6),
            f"{prefix}mAP50": round(self.map50, 6),
            f"{prefix}mAP50-95": round(self.map50_95, 6),
        }
        return out


def load_split(dataset_dir: Path, split: str, num_classes: int, limit: int | None = None) -> list[Labelled]:
    """Read and validate the images and labels of one split of a YOLO-layout dataset (sorted)."""
    items = []
    for image_path, label_path in iter_split_files(dataset_dir, split):
        if limit is not None and len(items) >= limit:
            break
        image = decode_image(image_path)
        h, w = image.shape[:2]
        # No label file = a background image (YOLO's convention). One that exists but cannot be read
        # (a dangling symlink, not UTF-8) is an error naming it, never an empty label.
        present = label_path.exists() or label_path.is_symlink()
        rows = validate_label_text(read_text(label_path, "label file"), label_path, num_classes) if present else ()
        arr = np.array([r[1:] for r in rows], np.float64).reshape(-1, 4)
        boxes = np.stack([(arr[:, 0] - arr[:, 2] / 2) * w, (arr[:, 1] - arr[:, 3] / 2) * h,
                          (arr[:, 0] + arr[:, 2] / 2) * w, (arr[:, 1] + arr[:, 3] / 2) * h], 1)
        items.append(Labelled(image_path, image, boxes, np.array([r[0] for r in rows], np.int64)))
    if not items:
        raise ValueError(f"{dataset_dir}/images/{split} has no images to evaluate on; run the data stage")
    return items


CAMERA_SPLIT_FOLDER = "val"  # the camera stage writes its labelled frames as split `val`


def load_camera_split(camera_dir: Path, num_classes: int, limit: int | None = None) -> tuple[list[Labelled], str]:
    """The labelled camera-domain split (stage `camera`'s `labelled/`), or [] and why there is none."""
    if not (camera_dir / "dataset.yaml").is_file():
        return [], (f"no labelled camera split at {camera_dir} (camera.source is ingest without "
                    "camera.ingest_labelled_dir); set camera.ingest_labelled_dir to a YOLO folder of labelled "
                    "camera frames to measure camera-domain accuracy")
    return load_split(camera_dir, CAMERA_SPLIT_FOLDER, num_classes, limit), ""


def multilabel_detections(output: np.ndarray, spec: HeadSpec, letterbox: Letterbox, conf: float = VAL_CONF,
                          iou: float = VAL_IOU, max_det: int = VAL_MAX_DET) -> Detections:
    """Val-style postprocessing of one image's output (C, N): multi-label, class-aware NMS.

    Decoding (DFL, anchors, sigmoid) and NMS are the device's own functions; only the candidate
    expansion differs from the device's best-class predict path, because Ultralytics' val
    counts an anchor once per class above `conf`.
    """
    box_rows = 4 if spec.output_format == FORMAT_RAW else 4 * spec.reg_max
    scores = output[box_rows:]
    if spec.scores_are_logits:
        scores = sigmoid(scores)
    cls_idx, anchor_idx = np.nonzero(scores > conf)
    if anchor_idx.size == 0:
        return Detections.empty()
    cand_scores = scores[cls_idx, anchor_idx].astype(np.float32)
    unique_anchors, inverse = np.unique(anchor_idx, return_inverse=True)
    if spec.output_format == FORMAT_RAW:
        anchor_boxes = xywh_to_xyxy(output[:4, unique_anchors].T.astype(np.float32))
    else:
        anchors, strides = make_anchors(spec.imgsz, spec.strides)
        anchor_boxes = dfl_decode(output[:box_rows, unique_anchors].T, anchors[unique_anchors],
                                  strides[unique_anchors], spec.reg_max)
    boxes = anchor_boxes[inverse]
    if cand_scores.size > 30000:  # Ultralytics' max_nms: keep the top candidates only
        top = np.argsort(-cand_scores, kind="stable")[:30000]
        boxes, cand_scores, cls_idx = boxes[top], cand_scores[top], cls_idx[top]
    keep = nms(boxes + (cls_idx[:, None] * MAX_WH).astype(np.float32), cand_scores, iou)[:max_det]
    # Unclipped, as Ultralytics' val matches them (in letterbox space; IoU is the same in source
    # space). Clipping to the image, as the device's predict path does, raised the AP50-95 of
    # scratches, long boxes that run off the edge, by 0.0077 on the val split and nothing else.
    return Detections(letterbox.to_source(boxes[keep], clip=False), cand_scores[keep], cls_idx[keep].astype(np.int64))


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of xyxy boxes a (M, 4) and b (N, 4) -> (M, N)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clip(0).prod(2)
    area_a = (a[:, 2:] - a[:, :2]).clip(0).prod(1)
    area_b = (b[:, 2:] - b[:, :2]).clip(0).prod(1)
    return inter / (area_a[:, None] + area_b[None, :] - inter + 1e-7)


def match_predictions(pred_classes: np.ndarray, true_classes: np.ndarray, iou: np.ndarray) -> np.ndarray:
    """(D, 10) bool: is detection d (descending confidence) a true positive at each IoU threshold."""
    correct = np.zeros((pred_classes.shape[0], IOU_THRESHOLDS.shape[0]), bool)
    iou = iou * (true_classes[:, None] == pred_classes)
    matched = np.zeros((iou.shape[0], IOU_THRESHOLDS.shape[0]), bool)
    cols = range(IOU_THRESHOLDS.shape[0])
    for j in np.flatnonzero((iou >= IOU_THRESHOLDS.min()).any(0)):
        available = np.where(matched, 0, iou[:, j, None])
        k = available.argmax(0)
        correct[j] = available[k, cols] >= IOU_THRESHOLDS
        matched[k, cols] |= correct[j]
    return correct


def _compute_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    mrec = np.concatenate(([0.0], recall, [recall[-1] if len(recall) else 1.0], [1.0]))
    mpre = np.concatenate(([1.0], precision, [0.0], [0.0]))
    mpre = np.flip(np.maximum.accumulate(np.flip(mpre)))
    return float(np.trapezoid(np.interp(_AP_X, mrec, mpre), _AP_X))


def _smooth(y: np.ndarray, f: float = 0.1) -> np.ndarray:
    nf = round(len(y) * f * 2) // 2 + 1
    p = np.ones(nf // 2)
    yp = np.concatenate((p * y[0], y, p * y[-1]), 0)
    return np.convolve(yp, np.ones(nf) / nf, mode="valid")


def accuracy_from_matches(tp: np.ndarray, conf: np.ndarray, pred_cls: np.ndarray, target_cls: np.ndarray,
                          class_names: Sequence[str]) -> Accuracy:
    """AP per class and the P/R/mAP summary, exactly as Ultralytics' `ap_per_class` + `Metric`."""
    eps = 1e-16
    order = np.argsort(-conf, kind="stable")
    tp, conf, pred_cls = tp[order], conf[order], pred_cls[order]
    unique_classes, nt = np.unique(target_cls, return_counts=True)
    x = np.linspace(0, 1, 1000)
    ap = np.zeros((unique_classes.shape[0], tp.shape[1]))
    p_curve, r_curve = np.zeros((unique_classes.shape[0], 1000)), np.zeros((unique_classes.shape[0], 1000))
    for ci, c in enumerate(unique_classes):
        i = pred_cls == c
        if i.sum() == 0:
            continue
        fpc, tpc = (1 - tp[i]).cumsum(0), tp[i].cumsum(0)
        recall = tpc / (nt[ci] + eps)
        precision = tpc / (tpc + fpc)
        r_curve[ci] = np.interp(-x, -conf[i], recall[:, 0], left=0)
        p_curve[ci] = np.interp(-x, -conf[i], precision[:, 0], left=1)
        for j in range(tp.shape[1]):
            ap[ci, j] = _compute_ap(recall[:, j], precision[:, j])
    if unique_classes.shape[0] == 0:
        return Accuracy(0.0, 0.0, 0.0, 0.0)
    f1 = 2 * p_curve * r_curve / (p_curve + r_curve + eps)
    best = _smooth(f1.mean(0), 0.1).argmax()
    names = [class_names[int(c)] for c in unique_classes]
    return Accuracy(
        precision=float(p_curve[:, best].mean()),
        recall=float(r_curve[:, best].mean()),
        map50=float(ap[:, 0].mean()),
        map50_95=float(ap.mean()),
        per_class_ap50_95={n: round(float(a), 6) for n, a in zip(names, ap.mean(1))},
        per_class_ap50={n: round(float(a), 6) for n, a in zip(names, ap[:, 0])},
        instances=int(nt.sum()),
    )


def onnx_session(model: Path | bytes, threads: int) -> Any:
    """An ONNX Runtime CPU session with `threads` intra-op threads and full graph optimisation."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    src = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own Fail/InvalidGraph types
        where = "the in-memory model" if isinstance(model, bytes) else str(model)
        raise ValueError(f"ONNX Runtime cannot load {where} ({e}); re-run the stage that produced it") from e


def head_spec(session: Any, num_classes: int) -> HeadSpec:
    """The output format of a loaded model, from its metadata (defaults to the raw YOLOv8 head)."""
    meta = dict(session.get_modelmeta().custom_metadata_map)
    shape = session.get_inputs()[0].shape
    imgsz = int(shape[2])
    return spec_from_metadata(meta, meta.get("output_format", FORMAT_RAW), num_classes, imgsz)


def decoder(session: Any, num_classes: int, conf: float, iou: float, max_det: int) -> Callable[[np.ndarray], Any]:
    """The device's decode + NMS for this session's output format, for timing whole detections."""
    spec = head_spec(session, num_classes)
    return lambda out: postprocess(out, spec, conf, iou, max_det)


# Per image: (correct[n_det, 10 IoU thresholds], scores[n_det], classes[n_det], target classes[n_gt]).
ImageStats = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def image_stats(session: Any, items: Sequence[Labelled], class_names: Sequence[str]) -> tuple[list[ImageStats], float]:
    """Run an ORT session on `items`: per-image match statistics, and the mean wall ms per image."""
    spec = head_spec(session, len(class_names))
    input_name = session.get_inputs()[0].name
    stats: list[ImageStats] = []
    start = time.perf_counter()
    for item in items:
        tensor, lb = preprocess(item.image, spec.imgsz)
        out = session.run(None, {input_name: tensor})[0][0]
        det = multilabel_detections(out, spec, lb)
        order = np.argsort(-det.scores, kind="stable")
        det = Detections(det.boxes[order], det.scores[order], det.classes[order])
        if len(det) and len(item.classes):
            correct = match_predictions(det.classes, item.classes, box_iou(item.boxes, det.boxes.astype(np.float64)))
        else:
            correct = np.zeros((len(det), IOU_THRESHOLDS.shape[0]), bool)
        stats.append((correct, det.scores, det.classes, item.classes))
    return stats, (time.perf_counter() - start) * 1000 / max(len(items), 1)


def accuracy_from_stats(stats: Sequence[ImageStats], class_names: Sequence[str]) -> Accuracy:
    """The P/R/mAP summary over the images whose statistics are given (any subset or resample)."""
    tp = np.concatenate([s[0] for s in stats]) if stats else np.zeros((0, 10), bool)
    conf = np.concatenate([s[1] for s in stats]) if stats else np.zeros(0)
    pred_cls = np.concatenate([s[2] for s in stats]) if stats else np.zeros(0, np.int64)
    target = np.concatenate([s[3] for s in stats]) if stats else np.zeros(0, np.int64)
    acc = accuracy_from_matches(tp.astype(np.float64), conf, pred_cls, target, class_names)
    acc.images = len(stats)
    return acc


def evaluate_session(session: Any, items: Sequence[Labelled], class_names: Sequence[str]) -> tuple[Accuracy, float]:
    """Accuracy of an ORT session on `items`, and the mean wall ms per image (pre+infer+post)."""
    stats, ms = image_stats(session, items, class_names)
    return accuracy_from_stats(stats, class_names), ms


def bootstrap_indices(n: int, resamples: int, seed: int) -> list[np.ndarray]:
    """The image indices of each of `resamples` bootstrap resamples of `n` images, seeded: what
    `paired_bootstrap_map` draws, so a caller can score one side once and pair it with many."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, n, n) for _ in range(resamples)]


def resampled_map50_95(stats: Sequence[ImageStats], class_names: Sequence[str],
                       indices: Sequence[np.ndarray]) -> np.ndarray:
    """mAP50-95 of `stats` on each resample in `indices` (from `bootstrap_indices`)."""
    return np.array([accuracy_from_stats([stats[i] for i in idx], class_names).map50_95 for idx in indices])


def paired_bootstrap_map(a: Sequence[ImageStats], b: Sequence[ImageStats], class_names: Sequence[str],
                         resamples: int, seed: int) -> dict[str, float]:
    """mAP50-95(a) - mAP50-95(b) on the same images, with a 95% paired-bootstrap interval.

    Both models are scored on the SAME resampled image sets, so image difficulty cancels: an
    interval that contains 0 means the two are not distinguishable on this many images.
    """
    if len(a) != len(b) or not a:
        raise ValueError(f"paired bootstrap needs the same non-empty image list for both models ({len(a)} vs {len(b)})")
    idx = bootstrap_indices(len(a), resamples, seed)
    diffs = resampled_map50_95(a, class_names, idx) - resampled_map50_95(b, class_names, idx)
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    full = accuracy_from_stats(a, class_names).map50_95 - accuracy_from_stats(b, class_names).map50_95
    return {"diff": float(full), "ci_low": float(lo), "ci_high": float(hi), "images": len(a), "resamples": resamples}
