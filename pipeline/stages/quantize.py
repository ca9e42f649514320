"""Stage `quantize`: models/yolov8n.onnx -> INT8 models, chosen by measurement behind an accuracy gate.

For every candidate configuration in params (QDQ/QOperator, U8/S8 activations, which op types,
MinMax/Percentile/Entropy calibration, head decode kept in float or cut out of the graph):
build it with ONNX Runtime static quantization on the calibration set (camera frames by
default), measure its latency on this host (interleaved with FP32 and every other candidate,
repeated, medians), and measure its mAP50-95 with the device's own pre/post processing on the
val split and (`quantize.camera_gate`) on the labelled camera-domain split, where the model will
actually run. Candidates whose mAP50-95 drop vs FP32 exceeds `quantize.max_map_drop` on either
split are rejected; the fastest survivor becomes `models/yolov8n.int8.onnx`. If none survives,
the stage fails with the whole table.

Early stop (`quantize.early_stop`): a candidate is scored in chunks, camera split first, its images
in a seeded random order; after each chunk past `min_images` the drop on the images scored so far
gets a paired-bootstrap interval at `level`, and once that interval lies wholly above
`max_map_drop` the candidate fails and is not scored further (nor on the other split: one split
failed is enough). It is a statistical decision with repeated looks, which inflate the error rate
of any one look; the per-look level (0.99, not 95 %) and `min_images` keep the chance of stopping a
candidate that the whole split would pass below 0.4 % (docs/int8-and-calibration.md, "Early
stop"). A stopped candidate's figures are partial estimates and are labelled so in the CSV and the
metrics. A candidate that passes, the pick included, has been scored on both whole splits, so its
figures and the models written are those of a run without the stop (unless the stop rejected one
the whole split would have passed: the rare error above).

Also written: `models/yolov8n.int8.trt.onnx` (symmetric S8S8 QDQ, head in float: TensorRT's
explicit-quantization input) and `models/yolov8n.dynamic.onnx` (dynamic-quantization baseline).
"""

from __future__ import annotations

import csv
import io
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any, Callable, Sequence

import numpy as np

from edge_runtime.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text, sha256_file
from edge_runtime.postprocess import FORMAT_RAW
from pipeline.accuracy.mean_ap import (
    ImageStats,
    Labelled,
    accuracy_from_stats,
    bootstrap_indices,
    decoder,
    image_stats,
    load_camera_split,
    load_split,
    onnx_session,
    paired_bootstrap_map,
    resampled_map50_95,
)
from pipeline.config import paths
from pipeline.config.params import BaseParams, EarlyStopParams, QuantizeParams
from pipeline.config.stage_cli import run_stage, stage_cli, stage_params
from pipeline.onnx_models.calibration_sets import load_calibration_tensors
from pipeline.onnx_models.graph import metadata, set_metadata
from pipeline.onnx_models.int8_candidates import (
    PREPROCESSED_NAME,
    build_candidate,
    build_dynamic,
    describe,
    interleaved_latency,
    preprocessed_fp32,
)
from pipeline.onnx_models.load import class_names, input_size, load_onnx, onnx_metadata
from pipeline.tracking.mlflow_runs import lineage_tags, log_artifact, log_metrics, set_tags, stage_run


class AccuracyGateError(RuntimeError):
    """No candidate kept mAP50-95 within `quantize.max_map_drop` of FP32."""


@dataclass(frozen=True)
class EarlyStop:
    """Where the early stop ended a candidate's scoring: a statistical decision on part of a split.

    `drop` is the estimate on the `images` scored so far (a seeded random sample of the split's
    `split_images`), never a whole-split figure; `ci` is its `level` paired-bootstrap interval,
    which lay wholly above the gate.
    """

    split: str  # "val" or "camera"
    images: int
    split_images: int
    drop: float
    ci: tuple[float, float]
    level: float

    def describe(self) -> str:
        """One line for the log and the gate's error."""
        return (f"stopped early on {self.split} after {self.images} of {self.split_images} images: partial drop "
                f"{self.drop:+.4f}, {self.level:.0%} interval [{self.ci[0]:+.4f}, {self.ci[1]:+.4f}] above the gate")


@dataclass
class CandidateResult:
    """One row of reports/quantize/candidates.csv.

    The accuracy and drop fields are whole-split figures, or None where that split was not scored
    in full (stopped early there: `early_stop` holds the partial estimate; or not scored at all
    because the other split already failed the gate).
    """

    name: str
    config: str
    map50_95: float | None
    map50: float | None
    drop: float | None
    latency_ms: float
    latency_spread_ms: float
    speedup: float
    size_bytes: int
    passed: bool
    model: bytes | None = None
    map50_95_camera: float | None = None  # on the labelled camera split (None: not gated there)
    drop_camera: float | None = None
    # 95% paired-bootstrap intervals of the drops (None: quantize.bootstrap_resamples is 0, or that split
    # was not scored in full). Measured here: +-0.75 points on the 150 val images, +-0.3 on 1000 camera
    # frames (the gate: 0.5).
    drop_ci: tuple[float, float] | None = None
    drop_camera_ci: tuple[float, float] | None = None
    val_images: int = 0  # images scored on each split (the CSV's fp32 row: the split sizes)
    camera_images: int = 0
    early_stop: EarlyStop | None = None  # where the early stop ended its scoring (None: not stopped)

    @property
    def worst_drop(self) -> float:
        """The largest of the drops measured (a stopped split's partial estimate included): what the gate compares."""
        drops = [d for d in (self.drop, self.drop_camera) if d is not None]
        if self.early_stop is not None:
            drops.append(self.early_stop.drop)
        if not drops:
            raise ValueError(f"candidate {self.name} has no drop on any split")
        return max(drops)

    def drops_text(self) -> str:
        """`+0.0120 (camera +0.0170)`, or what was not scored and where it stopped."""
        val = f"{self.drop:+.4f}" if self.drop is not None else "val not scored"
        cam = f" (camera {self.drop_camera:+.4f})" if self.drop_camera is not None else ""
        stop = f" ({self.early_stop.describe()})" if self.early_stop is not None else ""
        return val + cam + stop


@dataclass(frozen=True)
class _SplitScore:
    """One candidate on one split: its accuracy and its drop vs FP32 (with the drop's interval), on
    the whole split, or, when `stop` is set, on the `images` scored before the early stop."""

    map50_95: float
    map50: float
    drop: float
    ci: tuple[float, float] | None
    images: int
    stop: EarlyStop | None = None


# ------------------------------------------------------------------------------------------
# Scoring, with the early stop
# ------------------------------------------------------------------------------------------


@dataclass
class SplitReference:
    """FP32 on one split: what every candidate is compared with there.

    `stats` are FP32's per-image statistics over the whole split, in file order; `order` is the
    seeded random order in which candidates are scored when the early stop can look (file order
    groups frames by camera, so a prefix of it is no sample of the split). The FP32 side of each
    look (its mAP50-95 on the first n images of `order`, and on each bootstrap resample of them)
    is the same for every candidate and is computed once.
    """

    name: str  # "val" or "camera"
    items: Sequence[Labelled]
    stats: list[ImageStats]
    names: Sequence[str]
    seed: int
    order: np.ndarray = field(init=False)
    map50_95: float = field(init=False)

    def __post_init__(self) -> None:
        if len(self.stats) != len(self.items):
            raise ValueError(f"{self.name}: {len(self.stats)} FP32 image statistics for {len(self.items)} images")
        self.map50_95 = accuracy_from_stats(self.stats, self.names).map50_95
        # Its own stream (not the bootstrap's): seeded by base.seed and the split's name.
        key = sum(ord(c) * 31**i for i, c in enumerate(self.name)) % (2**31)
        self.order = np.random.default_rng([self.seed, key]).permutation(len(self.stats))
        self._partial: dict[int, float] = {}
        self._resampled: dict[tuple[int, int], tuple[list[np.ndarray], np.ndarray]] = {}

    def partial_map(self, n: int) -> float:
        """FP32 mAP50-95 on the first `n` images of `order`."""
        if n not in self._partial:
            self._partial[n] = accuracy_from_stats([self.stats[i] for i in self.order[:n]], self.names).map50_95
        return self._partial[n]

    def resampled(self, n: int, resamples: int) -> tuple[list[np.ndarray], np.ndarray]:
        """The bootstrap resamples of the first `n` images of `order` (indices into them) and FP32's
        mAP50-95 on each."""
        if (n, resamples) not in self._resampled:
            idx = bootstrap_indices(n, resamples, self.seed)
            sub = [self.stats[i] for i in self.order[:n]]
            self._resampled[n, resamples] = idx, resampled_map50_95(sub, self.names, idx)
        return self._resampled[n, resamples]


def stop_z(level: float) -> float:
    """The normal quantile of a two-sided `level` interval: 2.576 for 0.99."""
    return NormalDist().inv_cdf(0.5 + level / 2)


def look_sizes(split_images: int, es: EarlyStopParams) -> list[int]:
    """After how many images of a split of `split_images` the early stop looks: `min_images`, then
    every `chunk` images, up to but not including the whole split (which decides by itself)."""
    return list(range(es.min_images, split_images, es.chunk)) if es.enabled else []


def score_split(score: Callable[[Sequence[int]], list[ImageStats]], ref: SplitReference, max_map_drop: float,
                es: EarlyStopParams, resamples: int) -> _SplitScore:
    """Score one candidate on one split, stopping early once its drop interval lies above the gate.

    `score(indices)` runs the candidate on `ref.items[i]` for each index and returns their image
    statistics. Without a look (early stop off, or a split of at most `min_images`), the split is
    scored in file order in one go, as it always was. Otherwise in `ref.order`, in chunks; at each
    look the drop on the images so far is computed, and, if it is above `max_map_drop`, its
    paired-bootstrap interval at `es.level`: the drop +- z times the standard deviation of the drop
    over `es.resamples` paired resamples of those images (seeded from base.seed; z = 2.576 at
    0.99). The candidate stops there when the interval's low end is above `max_map_drop` too.

    The bootstrap's standard deviation, not its percentiles: a 0.5 % tail needs about 1000
    resamples to be more than one or two extreme ones, 200 give the deviation within about 5 %, and
    each resample costs a full mAP (one look at 700 camera frames with 1000 resamples took 80 s).
    Checking the interval only where the point estimate fails, and skipping a look whose interval,
    predicted from the last one computed (its half-width shrinks as 1/sqrt(n)), could not clear
    the gate, saves more bootstraps; both can only make a stop later or rarer, never earlier.

    Whole split: its accuracy, drop and 95% interval (`resamples`; None when 0) exactly as without
    the stop (statistics put back in file order).
    """
    n_all = len(ref.stats)
    looks = look_sizes(n_all, es)
    if not looks:
        stats = score(range(n_all))
    else:
        got: list[ImageStats | None] = [None] * n_all
        done = 0
        last: tuple[int, float] | None = None  # (images, estimate minus low end) of the last interval computed
        for n in [*looks, n_all]:
            batch = [int(i) for i in ref.order[done:n]]
            for i, s in zip(batch, score(batch)):
                got[i] = s
            done = n
            if n == n_all:
                break
            sub = [got[int(i)] for i in ref.order[:n]]
            acc = accuracy_from_stats(sub, ref.names)
            drop = ref.partial_map(n) - acc.map50_95
            if drop <= max_map_drop or (last is not None and drop - last[1] * math.sqrt(last[0] / n) <= max_map_drop):
                continue
            idx, ref_maps = ref.resampled(n, es.resamples)
            half = stop_z(es.level) * float(np.std(ref_maps - resampled_map50_95(sub, ref.names, idx), ddof=1))
            low, high = drop - half, drop + half
            last = (n, half)
            if low > max_map_drop:
                stop = EarlyStop(ref.name, n, n_all, drop, (low, high), es.level)
                return _SplitScore(acc.map50_95, acc.map50, drop, None, n, stop)
        stats = got
    acc = accuracy_from_stats(stats, ref.names)
    return _SplitScore(acc.map50_95, acc.map50, ref.map50_95 - acc.map50_95,
                       drop_interval(ref.stats, stats, ref.names, resamples, ref.seed), n_all)


# ------------------------------------------------------------------------------------------
# The stage
# ------------------------------------------------------------------------------------------


@dataclass
class QuantizeResult:
    """The candidate table, the FP32 reference and the chosen candidate."""

    fp32_map50_95: float
    fp32_latency_ms: float
    fp32_size: int
    rows: list[CandidateResult]
    chosen: CandidateResult
    trt_size: int
    dynamic_size: int
    fp32_map50_95_camera: float | None = None
    camera_skipped: str = ""  # why the camera split was not gated ("" = it was)


def quantize(model_path: Path, calib_dir: Path, dataset_dir: Path, outs: dict[str, Path], p: QuantizeParams,
             base: BaseParams, camera_dir: Path | None = None) -> QuantizeResult:
    """Build, measure and gate every candidate; write the chosen, TRT and dynamic models to `outs`.

    `camera_dir` is the labelled camera split (YOLO folder, split `val`); with `p.camera_gate` the
    gate also holds every candidate to `max_map_drop` there. Without a labelled camera split the
    gate uses the val split alone and the result says why.
    """
    import onnx

    fp32_raw = load_onnx(model_path, "export")
    meta = metadata(fp32_raw)
    if meta.get("output_format", FORMAT_RAW) != FORMAT_RAW:
        raise ValueError(f"{model_path} has output_format {meta.get('output_format')}; quantize expects the raw export")
    names = list(class_names(meta, model_path, "export"))
    calib = load_calibration_tensors(calib_dir, input_size(fp32_raw, model_path))
    items = load_split(dataset_dir, p.eval_split, len(names), p.eval_images or None)
    cam_items, camera_skipped = _camera_split(camera_dir, p, len(names))

    with tempfile.TemporaryDirectory(prefix="quantize-") as tmp:
        work = Path(tmp)
        fp32 = preprocessed_fp32(model_path, work)
        fp32_session = onnx_session(model_path, base.threads)
        val_ref = SplitReference("val", items, image_stats(fp32_session, items, names)[0], names, base.seed)
        cam_ref = (SplitReference("camera", cam_items, image_stats(fp32_session, cam_items, names)[0], names, base.seed)
                   if cam_items else None)
        fp32_map = val_ref.map50_95
        fp32_cam = cam_ref.map50_95 if cam_ref else None
        print(f"quantize: FP32 mAP50-95 {fp32_map:.4f} on {len(items)} {p.eval_split} images"
              + (f", {fp32_cam:.4f} on {len(cam_items)} camera images" if cam_ref else ""), flush=True)
        # The camera split first: the larger one, where a stop can come (the val split's 150 images are
        # fewer than early_stop.min_images) and where the rejected candidates were measured to fail.
        # A candidate that fails one split is not scored on the other: it cannot pass any more.
        refs = [r for r in (cam_ref, val_ref) if r is not None]

        built: dict[str, tuple[bytes, dict[str, _SplitScore]]] = {}
        for c in p.candidates:
            t0 = time.monotonic()
            model = build_candidate(fp32, c, calib, work)
            session = onnx_session(model, base.threads)
            scores: dict[str, _SplitScore] = {}
            for ref in refs:
                scores[ref.name] = sc = score_split(_scorer(session, ref.items, names), ref, p.max_map_drop,
                                                    p.early_stop, p.bootstrap_resamples)
                if sc.stop is not None or sc.drop > p.max_map_drop:
                    break
            built[c.name] = (model, scores)
            print(f"quantize: {c.name:<24} {_score_line(scores, refs)}; built+evaluated in "
                  f"{time.monotonic() - t0:.0f}s", flush=True)

        sessions = {"fp32": fp32_session, **{n: onnx_session(b[0], base.threads) for n, b in built.items()}}
        inputs = [calib[i] [None] for i in range(min(8, len(calib)))]
        decode = {name: decoder(s, len(names), p.latency_conf, p.latency_iou, p.latency_max_det)
                  for name, s in sessions.items()}
        latency = interleaved_latency(sessions, inputs, p.latency_warmup, p.latency_runs, p.latency_rounds, decode)
        fp32_ms = latency["fp32"][0]
        rows = []
        for c in p.candidates:
            ms, spread = latency[c.name]
            model, scores = built[c.name]
            rows.append(candidate_row(c.name, describe(c), scores, ms, spread, fp32_ms, model, p.max_map_drop))
        table = candidates_csv(rows, fp32_map, fp32_ms, model_path.stat().st_size, fp32_cam,
                               len(items), len(cam_items))
        atomic_write_text(outs["candidates"], table)
        chosen = accuracy_gate(rows, p.max_map_drop, fp32_map, table, p.latency_tie)
        chosen_model = onnx.load_from_string(chosen.model)
        set_metadata(chosen_model, {"fp32_sha256": sha256_file(model_path),
                                    "calibration_set": calib_dir.name})
        atomic_write_bytes(outs["int8"], chosen_model.SerializeToString())

        trt = build_candidate(fp32, p.trt, calib, work)
        atomic_write_bytes(outs["trt"], trt)
        dyn = build_dynamic(work / PREPROCESSED_NAME, work)
        atomic_write_bytes(outs["dynamic"], dyn)
    return QuantizeResult(fp32_map, fp32_ms, model_path.stat().st_size, rows, chosen, len(trt), len(dyn),
                          fp32_cam, camera_skipped)


def _scorer(session: Any, items: Sequence[Labelled],
            names: Sequence[str]) -> Callable[[Sequence[int]], list[ImageStats]]:
    """`score_split`'s `score`: the session's image statistics on the items at these indices."""
    return lambda indices: image_stats(session, [items[i] for i in indices], names)[0]


def _score_line(scores: dict[str, _SplitScore], refs: Sequence[SplitReference]) -> str:
    """What the log says of one candidate's scores: accuracy and drop per split, or where it stopped."""
    parts = []
    for ref in refs:
        sc = scores.get(ref.name)
        if sc is None:
            parts.append(f"{ref.name} not scored")
        elif sc.stop is not None:
            parts.append(sc.stop.describe())
        else:
            parts.append(f"{ref.name} mAP50-95 {sc.map50_95:.4f}, drop {sc.drop:+.4f}")
    return "; ".join(parts)


def candidate_row(name: str, config: str, scores: dict[str, _SplitScore], latency_ms: float, spread_ms: float,
                  fp32_ms: float, model: bytes, max_map_drop: float) -> CandidateResult:
    """The table row of a candidate from its split scores (a split stopped early or not scored: None
    in its whole-split fields, the stop in `early_stop`)."""
    full = {k: v for k, v in scores.items() if v.stop is None}
    val, cam = full.get("val"), full.get("camera")
    stop = next((v.stop for v in scores.values() if v.stop is not None), None)
    row = CandidateResult(
        name, config, val.map50_95 if val else None, val.map50 if val else None, val.drop if val else None,
        latency_ms, spread_ms, fp32_ms / latency_ms, len(model), False, model,
        cam.map50_95 if cam else None, cam.drop if cam else None, val.ci if val else None, cam.ci if cam else None,
        val_images=scores["val"].images if "val" in scores else 0,
        camera_images=scores["camera"].images if "camera" in scores else 0, early_stop=stop)
    # Passing needs every gated split scored in full; a stop or one failed split is a failure.
    row.passed = stop is None and val is not None and row.worst_drop <= max_map_drop
    return row


def drop_interval(fp32_stats: Sequence[ImageStats], int8_stats: Sequence[ImageStats], names: Sequence[str],
                  resamples: int, seed: int) -> tuple[float, float] | None:
    """95% paired-bootstrap interval of the mAP50-95 drop (FP32 minus INT8) on these images, or
    None when `resamples` is 0. The gate decides on the point estimate; the interval says how far
    that estimate could move on another sample of images of the same kind."""
    if resamples == 0:
        return None
    b = paired_bootstrap_map(fp32_stats, int8_stats, names, resamples, seed)
    return b["ci_low"], b["ci_high"]


def _camera_split(camera_dir: Path | None, p: QuantizeParams, num_classes: int) -> tuple[list[Any], str]:
    """The labelled camera split's images for the gate, or [] and why it is not gated."""
    if not p.camera_gate:
        return [], "quantize.camera_gate is false"
    items, why = (load_camera_split(camera_dir, num_classes, p.eval_images or None) if camera_dir
                  else ([], "no --camera"))
    if not items:
        why += "; the gate checks the val split only"
        print(f"quantize: {why}", flush=True)
    return items, why


def accuracy_gate(rows: Sequence[CandidateResult], max_map_drop: float, fp32_map: float, table: str,
                  latency_tie: float = 0.0) -> CandidateResult:
    """The fastest candidate whose drop (the worse of val and camera split) is within `max_map_drop`;
    else AccuracyGateError with the table. A candidate stopped early, or not scored on the val split
    (its camera drop failed first), never passes.

    Candidates the measurement cannot tell apart from the fastest passing one count as equally fast,
    and the most accurate of them wins, then the smallest: otherwise the pick between near-twins
    would be decided by noise. "Cannot tell apart": within `latency_tie` (a fraction) of it, or
    their ranges of round medians (latency ± half the spread) overlap.
    """
    passed = [r for r in rows if r.early_stop is None and r.drop is not None and r.worst_drop <= max_map_drop]
    if not passed:
        drops = ", ".join(f"{r.name} {r.drops_text()}" for r in rows)
        raise AccuracyGateError(
            f"no INT8 candidate kept mAP50-95 within quantize.max_map_drop={max_map_drop} of FP32 ({fp32_map:.4f}); "
            f"drops: {drops}\n{table}{gate_verdict(rows, max_map_drop)}Relax max_map_drop, add candidates "
            "(Percentile calibration, more float_layers, fewer op_types) or use a larger calibration set in params.yaml"
        )
    fastest = min(passed, key=lambda r: r.latency_ms)
    fastest_high = fastest.latency_ms + fastest.latency_spread_ms / 2
    tied = [r for r in passed if r.latency_ms <= fastest.latency_ms * (1.0 + latency_tie)
            or r.latency_ms - r.latency_spread_ms / 2 <= fastest_high]
    # Equal accuracy too (e.g. the QDQ and QOperator forms of one configuration score the same to
    # the last digit): the smaller file, which does not depend on timing noise; latency last.
    return min(tied, key=lambda r: (round(r.worst_drop, 6), r.size_bytes, r.latency_ms))


def gate_verdict(rows: Sequence[CandidateResult], max_map_drop: float) -> str:
    """Whether the failed candidates failed for certain or within the noise of the split sizes.

    A candidate fails for certain when the 95% interval of its val or camera drop lies wholly above
    `max_map_drop`, or it was stopped early (its interval at `early_stop.level` on the images
    scored lay wholly above); otherwise its point estimate failed but more labelled images could
    turn it either way. "" when the rows carry no intervals.
    """
    def certain(r: CandidateResult) -> bool:
        return r.early_stop is not None or any(ci is not None and ci[0] > max_map_drop
                                               for ci in (r.drop_ci, r.drop_camera_ci))

    if all(r.drop_ci is None and r.drop_camera_ci is None and r.early_stop is None for r in rows):
        return ""
    unsure = [r.name for r in rows if not certain(r)]
    if not unsure:
        return ("Every candidate fails for certain: for each, an interval of its val or camera drop (the 95% one, or "
                f"the early stop's) lies wholly above {max_map_drop}, so this model loses more than the gate allows "
                "with these configurations; more images would not change that.\n")
    return (f"Within the noise: {', '.join(unsure)} failed on the point estimate, but their 95% intervals reach "
            f"{max_map_drop}; more labelled images (a larger val split, camera.synthetic.labelled_images or your own "
            "labelled camera frames) would decide them.\n")


CSV_COLUMNS = ("name", "config", "mAP50-95", "mAP50", "drop", "drop_ci_low", "drop_ci_high", "mAP50-95_camera",
               "drop_camera", "drop_camera_ci_low", "drop_camera_ci_high", "latency_ms", "spread_ms", "speedup",
               "size_mb", "passed", "val_images", "camera_images", "stopped_early", "stop_split", "stop_images",
               "stop_partial_drop", "stop_ci_low", "stop_ci_high", "stop_level")


def candidates_csv(rows: Sequence[CandidateResult], fp32_map: float, fp32_ms: float, fp32_size: int,
                   fp32_map_camera: float | None = None, val_images: int = 0, camera_images: int = 0) -> str:
    """The candidate table as CSV text (FP32 reference first); camera columns empty when not gated
    there, interval columns empty without bootstrap resamples.

    The accuracy and drop columns hold whole-split figures only: empty for a split a candidate was
    stopped early on (its partial estimate is `stop_partial_drop`, on `stop_images` of the split's
    images, with the `stop_level` interval `stop_ci_low`..`stop_ci_high`) or not scored on (the other
    split failed first). `val_images` / `camera_images`: images scored; on the fp32 row, the split sizes.
    """
    def f4(x: float | None) -> str:
        return "" if x is None else f"{x:.4f}"

    def ci(x: tuple[float, float] | None) -> list[str]:
        return ["", ""] if x is None else [f"{x[0]:.4f}", f"{x[1]:.4f}"]

    def stop(r: CandidateResult) -> list[str]:
        s = r.early_stop
        if s is None:
            return ["no", "", "", "", "", "", ""]
        return ["yes", s.split, str(s.images), f"{s.drop:.4f}", *ci(s.ci), f"{s.level:g}"]

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    cam_ref = "" if fp32_map_camera is None else "0.0000"
    w.writerow(["fp32", "FP32 ONNX", f"{fp32_map:.4f}", "", "0.0000", "", "", f4(fp32_map_camera), cam_ref, "", "",
                f"{fp32_ms:.2f}", "", "1.00", f"{fp32_size / 1e6:.2f}", "reference", str(val_images),
                str(camera_images), "", "", "", "", "", "", ""])
    for r in rows:
        w.writerow([r.name, r.config, f4(r.map50_95), f4(r.map50), f4(r.drop), *ci(r.drop_ci),
                    f4(r.map50_95_camera), f4(r.drop_camera), *ci(r.drop_camera_ci), f"{r.latency_ms:.2f}",
                    f"{r.latency_spread_ms:.2f}", f"{r.speedup:.2f}", f"{r.size_bytes / 1e6:.2f}",
                    "yes" if r.passed else "no", str(r.val_images), str(r.camera_images), *stop(r)])
    return buf.getvalue()


def scoring_record(rows: Sequence[CandidateResult]) -> dict[str, Any]:
    """metrics.json's `candidate_scoring`: per candidate, the images scored on each split, whether it
    was stopped early, and where: the split, the images scored of the split's, the partial drop
    (labelled `partial_drop`: an estimate on those images, not a whole-split figure) and the
    interval at the stop. Whole-split drops are `drop` / `drop_camera`, absent where not scored."""
    out: dict[str, Any] = {}
    for r in rows:
        rec: dict[str, Any] = {"passed": r.passed, "stopped_early": r.early_stop is not None,
                               "val_images": r.val_images, "camera_images": r.camera_images}
        if r.drop is not None:
            rec["drop"] = round(r.drop, 6)
        if r.drop_camera is not None:
            rec["drop_camera"] = round(r.drop_camera, 6)
        if r.early_stop is not None:
            s = r.early_stop
            rec["stop"] = {"split": s.split, "images": s.images, "split_images": s.split_images,
                           "partial_drop": round(s.drop, 6), "interval": [round(v, 6) for v in s.ci],
                           "level": s.level}
        out[r.name] = rec
    return out


parse_args = stage_cli(
    "quantize", __doc__,
    model=paths.ONNX_MODEL,
    calibration=paths.CALIBRATION_DIR,
    data=paths.DATASET_DIR,
    camera=(paths.CAMERA_LABELLED, "labelled camera split (YOLO folder)"),
    int8=paths.INT8_MODEL,
    trt=paths.INT8_TRT_MODEL,
    dynamic=paths.DYNAMIC_MODEL,
    candidates=paths.QUANTIZE_CANDIDATES,
    metrics=paths.QUANTIZE_METRICS,
    headline=paths.QUANTIZE_HEADLINE,
)


def headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """reports/quantize/headline.json (DVC metrics) from the stage's full metrics document: the
    chosen candidate and the FP32 and INT8 file sizes in MB.

    Accuracy is left to evaluate's headline (the same splits, every model); `chosen` must stay:
    params.yaml `repro_check.choice` reads the pick from this file.
    """
    return {"chosen": metrics["chosen"],
            "fp32_size_mb": round(metrics["size_fp32_bytes"] / 1e6, 3),
            "int8_size_mb": round(metrics["size_int8_bytes"] / 1e6, 3)}


def _weights_tag(onnx_path: Path) -> dict[str, str]:
    """`weights_sha256` from the FP32 ONNX's metadata (export records its source weights)."""
    if not onnx_path.is_file():
        return {}  # quantize() itself then fails with the fix
    meta = onnx_metadata(onnx_path, "export")
    return {"weights_sha256": meta["source_weights_sha256"]} if meta.get("source_weights_sha256") else {}


def main(argv: list[str] | None = None) -> None:
    """Run the stage: candidates, gate, outputs, metrics, one MLflow run."""
    args = parse_args(argv)
    base, p = stage_params(args, "base", "quantize")
    calib_dir = args.calibration / p.calibration_set
    tags = {**lineage_tags(onnx=args.model, calibration=calib_dir, dataset=args.data),
            **_weights_tag(args.model)}
    with stage_run("quantize", base, p, tags=tags):
        outs = {"int8": args.int8, "trt": args.trt, "dynamic": args.dynamic, "candidates": args.candidates}
        r = quantize(args.model, calib_dir, args.data, outs, p, base, args.camera)
        metrics = {
            "chosen": r.chosen.name,
            "chosen_config": r.chosen.config,
            "fp32_mAP50-95": round(r.fp32_map50_95, 6),
            "int8_mAP50-95": round(r.chosen.map50_95, 6),
            "map_drop": round(r.chosen.drop, 6),
            **({"fp32_mAP50-95_camera": round(r.fp32_map50_95_camera, 6),
                "int8_mAP50-95_camera": round(r.chosen.map50_95_camera or 0.0, 6),
                "map_drop_camera": round(r.chosen.drop_camera or 0.0, 6)}
               if r.fp32_map50_95_camera is not None else {"camera_gate_skipped": r.camera_skipped}),
            **({"map_drop_ci95": [round(v, 6) for v in r.chosen.drop_ci]} if r.chosen.drop_ci else {}),
            **({"map_drop_camera_ci95": [round(v, 6) for v in r.chosen.drop_camera_ci]}
               if r.chosen.drop_camera_ci else {}),
            "size_fp32_bytes": r.fp32_size,
            "size_int8_bytes": r.chosen.size_bytes,
            "size_ratio": round(r.chosen.size_bytes / r.fp32_size, 4),
            "size_trt_bytes": r.trt_size,
            "size_dynamic_bytes": r.dynamic_size,
            "candidates_passed": sum(row.passed for row in r.rows),
            "candidates": len(r.rows),
            # The early stop's decisions (quantize.early_stop): deterministic (seeded), so reproducible.
            "candidates_stopped_early": sum(row.early_stop is not None for row in r.rows),
            "candidate_images_scored": sum(row.val_images + row.camera_images for row in r.rows),
            "candidate_scoring": scoring_record(r.rows),
        }
        # Latency is noisy by nature: it goes to MLflow and the CSV, not to the metrics files
        # (which must be reproducible), except as the chosen config's name.
        atomic_write_json(args.metrics, metrics)
        atomic_write_json(args.headline, headline(metrics))
        log_metrics({k: v for k, v in metrics.items() if not isinstance(v, str)})
        log_metrics({"speedup": r.chosen.speedup, "int8_latency_ms": r.chosen.latency_ms,
                     "fp32_latency_ms": r.fp32_latency_ms})
        set_tags({"model_sha256": sha256_file(args.int8), "chosen": r.chosen.name,
                  "calibration_set": p.calibration_set})
        set_tags(lineage_tags(int8=args.int8, trt_onnx=args.trt, dynamic=args.dynamic))
        log_artifact(args.candidates)
        # The models themselves, one folder each: a model-registry version (fab deploy) points at
        # a folder, and `mlflow artifacts download -u models:/edge-defect-detector@pis` fetches it.
        for folder, model in (("int8", args.int8), ("int8_trt", args.trt), ("dynamic", args.dynamic)):
            log_artifact(model, f"models/{folder}")
        print(f"quantize: chose {r.chosen.name} ({r.chosen.config}): {r.chosen.speedup:.2f}x FP32, "
              f"mAP50-95 drop {r.chosen.drop:+.4f}"
              + (f" (camera {r.chosen.drop_camera:+.4f})" if r.chosen.drop_camera is not None else "")
              + f", {r.chosen.size_bytes / r.fp32_size:.0%} of FP32 size", flush=True)


if __name__ == "__main__":
    sys.exit(run_stage(main))
