"""Load and validate `params.yaml` sections into frozen dataclasses.

`params.yaml` is the single source of hyper-parameters: nothing here has a default. A section is
turned into its dataclass field by field; an unknown key, a missing key or a value of the wrong
type is a `ValueError` that names the key and the file, so a typo never silently falls back to a
value hidden in code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, TypeVar, Union

import yaml

from pipeline.config.paths import PARAMS_FILE

T = TypeVar("T")


# --------------------------------------------------------------------------------------------
# Sections. One dataclass per params.yaml section (nested dataclasses for nested mappings).
# Range checks live in __post_init__ so a bad value fails on load, naming the field.
# --------------------------------------------------------------------------------------------


def _check(cond: bool, message: str) -> None:
    """Raise ValueError(message) when `cond` is false (validation without `assert`)."""
    if not cond:
        raise ValueError(message)


@dataclass(frozen=True)
class BaseParams:
    """Settings shared by every stage."""

    seed: int
    threads: int  # torch / ORT intra-op threads; pinned so timings and results are comparable

    def __post_init__(self) -> None:
        _check(self.seed >= 0, "base.seed must be >= 0")
        _check(self.threads >= 1, "base.threads must be >= 1")


@dataclass(frozen=True)
class SyntheticParams:
    """The procedural steel-surface generator (used when data.source == 'synthetic')."""

    train_images: int
    val_images: int
    test_images: int
    image_size: int
    max_defects: int
    empty_fraction: float  # share of images with no defect at all (pure background)
    small_fraction: float  # share of defects drawn small (10-24 px at 256 px)
    min_contrast: float  # defect amplitude range, grey levels on a 0-255 scale
    max_contrast: float
    clutter: int  # max non-defect distractors per image (stains, specks, streaks)
    jpeg_quality: int

    def __post_init__(self) -> None:
        for name in ("train_images", "val_images", "test_images"):
            _check(getattr(self, name) >= 1, f"data.synthetic.{name} must be >= 1")
        _check(64 <= self.image_size <= 2048, "data.synthetic.image_size must be in [64, 2048]")
        _check(0 <= self.max_defects <= 16, "data.synthetic.max_defects must be in [0, 16]")
        _check(0.0 <= self.empty_fraction < 1.0, "data.synthetic.empty_fraction must be in [0, 1)")
        _check(0.0 <= self.small_fraction <= 1.0, "data.synthetic.small_fraction must be in [0, 1]")
        _check(
            0 < self.min_contrast <= self.max_contrast <= 255,
            "data.synthetic needs 0 < min_contrast <= max_contrast <= 255",
        )
        _check(self.clutter >= 0, "data.synthetic.clutter must be >= 0")
        _check(50 <= self.jpeg_quality <= 100, "data.synthetic.jpeg_quality must be in [50, 100]")


@dataclass(frozen=True)
class DataParams:
    """Stage `data`: where the defect dataset comes from and how imports are split."""

    source: Literal["synthetic", "yolo", "voc"]
    import_dir: str  # folder of a real dataset for source yolo/voc; "" for synthetic
    val_fraction: float  # split of an import that ships without train/val folders
    test_fraction: float
    synthetic: SyntheticParams

    def __post_init__(self) -> None:
        if self.source != "synthetic":
            _check(
                bool(self.import_dir),
                f"data.import_dir is empty but data.source is '{self.source}': "
                "set it to the folder of the dataset to import",
            )
        _check(0.0 < self.val_fraction < 1.0, "data.val_fraction must be in (0, 1)")
        _check(0.0 <= self.test_fraction < 1.0, "data.test_fraction must be in [0, 1)")
        _check(
            self.val_fraction + self.test_fraction < 1.0,
            "data.val_fraction + data.test_fraction must leave images for training (< 1)",
        )


@dataclass(frozen=True)
class TrainParams:
    """Stage `train`: Ultralytics YOLOv8n hyper-parameters (passed through by name)."""

    model: str  # yolov8n.yaml trains from scratch; yolov8n.pt needs internet for the weights
    activation: Literal["SiLU", "ReLU"]  # ReLU: the edge variant whose INT8 form is cheaper (yaml models only)
    imgsz: int
    epochs: int
    batch: int
    workers: int
    optimizer: Literal["SGD", "Adam", "AdamW", "RMSProp"]
    lr0: float
    lrf: float
    momentum: float
    weight_decay: float
    warmup_epochs: float
    warmup_bias_lr: float
    cos_lr: bool
    nbs: int
    box: float
    cls: float
    dfl: float
    mosaic: float
    close_mosaic: int
    mixup: float
    degrees: float
    translate: float
    scale: float
    fliplr: float
    flipud: float
    hsv_h: float
    hsv_s: float
    hsv_v: float

    def __post_init__(self) -> None:
        _check(self.imgsz % 32 == 0 and self.imgsz >= 64, "train.imgsz must be a multiple of 32, >= 64")
        _check(self.activation == "SiLU" or self.model.endswith(".yaml"),
               f"train.activation {self.activation} needs a model built from a .yaml (train.model is {self.model}): "
               "pretrained weights keep the activation they were trained with")
        _check(self.epochs >= 1, "train.epochs must be >= 1")
        _check(self.batch >= 1, "train.batch must be >= 1")
        _check(self.workers >= 0, "train.workers must be >= 0")
        _check(self.lr0 > 0, "train.lr0 must be > 0")
        _check(0 < self.lrf <= 1, "train.lrf must be in (0, 1]")
        _check(self.close_mosaic >= 0, "train.close_mosaic must be >= 0")
        for name in ("mosaic", "mixup", "fliplr", "flipud"):
            _check(0.0 <= getattr(self, name) <= 1.0, f"train.{name} is a probability: use [0, 1]")


@dataclass(frozen=True)
class ExportParams:
    """Stage `export`: ONNX export and the ORT-vs-PyTorch parity gate."""

    opset: int
    imgsz: int
    simplify: bool
    parity_images: int  # val images run through both runtimes
    parity_atol_box: float  # max |ORT - torch| on box coordinates, in input pixels
    parity_atol_score: float  # max |ORT - torch| on class scores (0-1)

    def __post_init__(self) -> None:
        _check(11 <= self.opset <= 22, "export.opset must be in [11, 22]")
        _check(self.imgsz % 32 == 0 and self.imgsz >= 64, "export.imgsz must be a multiple of 32, >= 64")
        _check(self.parity_images >= 1, "export.parity_images must be >= 1")
        _check(self.parity_atol_box > 0 and self.parity_atol_score > 0, "export parity tolerances must be > 0")


@dataclass(frozen=True)
class CameraModelParams:
    """One deployment camera's fixed optics/sensor model (what the training images never saw)."""

    id: str  # folder name under frames/ (a fleet host name for ingested frames)
    width: int  # sensor output size: the square render is resized to width x height
    height: int
    exposure: float  # brightness gain on the render (1 = the training set's exposure)
    wb_gains: tuple[float, ...]  # white-balance cast: per-channel gains in B, G, R order
    shot_noise: float  # photon noise: sigma = shot_noise * sqrt(grey level)
    read_noise: float  # sensor read noise sigma, grey levels
    blur: Literal["none", "motion", "defocus"]
    blur_px: float  # motion: streak length in px along x (the strip moves); defocus: disc radius in px
    vignetting: float  # brightness lost in the corners (0 = none, 0.4 = corners at 60%)
    jpeg_quality: int

    def __post_init__(self) -> None:
        where = f"camera.synthetic.cameras[id={self.id!r}]"
        _check(bool(self.id) and "/" not in self.id and self.id not in (".", ".."),
               f"{where}.id must be a non-empty folder name without '/'")
        _check(32 <= self.width <= 4096 and 32 <= self.height <= 4096, f"{where}: width and height must be in [32, 4096]")
        _check(0.05 <= self.exposure <= 5.0, f"{where}.exposure must be in [0.05, 5]")
        _check(len(self.wb_gains) == 3 and all(0.2 <= g <= 3.0 for g in self.wb_gains),
               f"{where}.wb_gains must be 3 gains (B, G, R), each in [0.2, 3]")
        _check(self.shot_noise >= 0 and self.read_noise >= 0, f"{where}: shot_noise and read_noise must be >= 0")
        _check(0.0 <= self.blur_px <= 32.0, f"{where}.blur_px must be in [0, 32]")
        _check(0.0 <= self.vignetting < 1.0, f"{where}.vignetting must be in [0, 1)")
        _check(30 <= self.jpeg_quality <= 100, f"{where}.jpeg_quality must be in [30, 100]")


@dataclass(frozen=True)
class CameraSyntheticParams:
    """Synthetic deployment frames: scenes from the defect generator seen through camera models."""

    scenes_per_camera: int  # distinct scenes per camera (unlabelled frames)
    burst_length: int  # near-identical consecutive frames per scene, as a streaming camera delivers
    burst_shift_px: float  # max sub-frame shift between frames of one burst (vibration)
    exposure_jitter: float  # per-scene relative exposure change (auto-exposure hunting, lamp flicker)
    wb_jitter: float  # per-scene relative change of each white-balance gain
    labelled_images: int  # size of the labelled camera-domain val split (cameras round-robin)
    cameras: tuple[CameraModelParams, ...]

    def __post_init__(self) -> None:
        _check(self.scenes_per_camera >= 1, "camera.synthetic.scenes_per_camera must be >= 1")
        _check(self.burst_length >= 1, "camera.synthetic.burst_length must be >= 1")
        _check(0.0 <= self.burst_shift_px <= 8.0, "camera.synthetic.burst_shift_px must be in [0, 8]")
        _check(0.0 <= self.exposure_jitter < 0.5, "camera.synthetic.exposure_jitter must be in [0, 0.5)")
        _check(0.0 <= self.wb_jitter < 0.5, "camera.synthetic.wb_jitter must be in [0, 0.5)")
        _check(self.labelled_images >= 1, "camera.synthetic.labelled_images must be >= 1")
        _check(len(self.cameras) >= 1, "camera.synthetic.cameras must list at least one camera")
        ids = [c.id for c in self.cameras]
        _check(len(set(ids)) == len(ids), f"camera.synthetic.cameras: duplicate camera id in {ids}; ids must be unique")


@dataclass(frozen=True)
class CameraParams:
    """Stage `camera`: deployment-camera frames for calibration plus a labelled camera-domain split."""

    source: Literal["synthetic", "ingest"]
    ingest_dir: str  # source ingest: one folder per camera (images or one video), e.g. from `fab collect-frames`
    ingest_labelled_dir: str  # source ingest: optional YOLO folder of labelled camera frames; "" = none
    video_fps: float  # source ingest: frames per second sampled from a video file
    synthetic: CameraSyntheticParams

    def __post_init__(self) -> None:
        if self.source == "ingest":
            _check(bool(self.ingest_dir), "camera.ingest_dir is empty but camera.source is 'ingest': set it (data/camera)")
        _check(0.0 < self.video_fps <= 120.0, "camera.video_fps must be in (0, 120]")


@dataclass(frozen=True)
class CalibrateParams:
    """Stage `calibrate`: dedup, diverse selection and preprocessing of the calibration sets."""

    imgsz: int  # model input size; must equal export.imgsz (the tensors feed that model)
    size: int  # frames per calibration set
    phash_size: int  # pHash bits = phash_size**2 (DCT low-frequency block)
    phash_highfreq: int  # the DCT runs on a (phash_size * phash_highfreq)^2 grey thumbnail
    dedup_hamming: int  # frames whose pHashes differ in <= this many bits are near-duplicates
    thumb_size: int  # descriptor: thumb_size^2 grey thumbnail ...
    hist_bins: int  # ... plus a hist_bins-per-channel colour histogram
    hist_weight: float  # weight of the colour histogram against the thumbnail in the descriptor

    def __post_init__(self) -> None:
        _check(self.imgsz % 32 == 0 and self.imgsz >= 64, "calibrate.imgsz must be a multiple of 32, >= 64")
        _check(self.size >= 1, "calibrate.size must be >= 1")
        _check(4 <= self.phash_size <= 16, "calibrate.phash_size must be in [4, 16]")
        _check(2 <= self.phash_highfreq <= 8, "calibrate.phash_highfreq must be in [2, 8]")
        _check(0 <= self.dedup_hamming < self.phash_size**2 // 2,
               "calibrate.dedup_hamming must be in [0, phash_size^2 / 2)")
        _check(4 <= self.thumb_size <= 64, "calibrate.thumb_size must be in [4, 64]")
        _check(2 <= self.hist_bins <= 64, "calibrate.hist_bins must be in [2, 64]")
        _check(self.hist_weight >= 0, "calibrate.hist_weight must be >= 0")


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def read_params_file(path: Path = PARAMS_FILE) -> dict[str, Any]:
    """Read `path` as a YAML mapping; a missing or malformed file is a clear ValueError."""
    if not path.is_file():
        raise ValueError(f"{path}: params file not found; run from the repository root or create it")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({e}); fix the syntax") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: top level must be a mapping of sections (base:, data:, ...)")
    return raw


def load_params(section: str, cls: type[T], path: Path = PARAMS_FILE) -> T:
    """Return section `section` of the params file at `path` as a validated `cls` instance."""
    raw = read_params_file(path)
    if section not in raw:
        raise ValueError(f"{path}: missing section '{section}'; add it (see the README for its keys)")
    return build(cls, raw[section], section, path)


def build(cls: type[T], value: Any, where: str, path: Path) -> T:
    """Build dataclass `cls` from mapping `value`; `where` is the dotted key used in errors."""
    if not isinstance(value, Mapping):
        raise ValueError(f"{path}: '{where}' must be a mapping, got {type(value).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(value) - set(names))
    if unknown:
        raise ValueError(
            f"{path}: unknown key '{where}.{unknown[0]}'; valid keys are {', '.join(names)}"
        )
    missing = [n for n in names if n not in value]
    if missing:
        raise ValueError(f"{path}: missing key '{where}.{missing[0]}'; add it to the file")
    kwargs = {n: _coerce(hints[n], value[n], f"{where}.{n}", path) for n in names}
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def _coerce(tp: Any, value: Any, where: str, path: Path) -> Any:
    """Check `value` against annotation `tp` (and build nested dataclasses)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where, path)  # type: ignore[arg-type]
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ValueError(f"{path}: '{where}' is {value!r}; choose one of {', '.join(map(str, choices))}")
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, where, path)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0])
    if origin in (tuple, list):
        if not isinstance(value, list):
            raise ValueError(f"{path}: '{where}' must be a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1]
        items = [_coerce(item, v, f"{where}[{i}]", path) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{path}: '{where}' must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{path}: '{where}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{path}: '{where}' must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{path}: '{where}' must be a string, got {value!r}")
        return value
    raise TypeError(f"params.py cannot check annotation {tp!r} of '{where}'")  # a bug in this file


def params_hash(*sections: Any) -> str:
    """Stable sha256 (first 16 hex) of one or more params dataclasses, for MLflow tags."""
    blob = json.dumps([dataclasses.asdict(s) for s in sections], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def flatten(p: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten a params dataclass into dotted keys (`synthetic.image_size`) for MLflow params."""
    return _flatten_dict(dataclasses.asdict(p), prefix)


def _flatten_dict(d: dict[str, Any], prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten_dict(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@dataclass(frozen=True)
class QuantizeCandidate:
    """One INT8 configuration the quantize stage builds, measures and gates."""

    name: str
    format: Literal["QDQ", "QOperator"]
    activation: Literal["U8", "S8"]
    weight: Literal["U8", "S8"]
    symmetric: bool  # symmetric activation ranges: S8 zero point 0 (TensorRT needs it), U8 zero point 128
    op_types: tuple[str, ...]  # op types to quantize; [] = every type ORT can quantize
    calibration: Literal["MinMax", "Percentile", "Entropy"]
    percentile: float  # used by Percentile calibration
    reduce_range: bool  # 7-bit weights: avoids U8S8 int16 saturation on CPUs without VNNI (AVX2)
    float_layers: tuple[str, ...]  # extra layers kept in float: head_convs (last convs of the head), stem
    head: Literal["float", "cut"]  # decode kept in float in the graph, or cut out to postprocess

    def __post_init__(self) -> None:
        unknown = sorted(set(self.float_layers) - {"head_convs", "stem"})
        _check(not unknown, f"quantize candidate {self.name}: unknown float_layers {unknown}; use head_convs, stem")
        _check(bool(self.name) and self.name.replace("_", "").replace("-", "").isalnum(),
               f"quantize candidate name '{self.name}' must be letters, digits, - or _")
        _check(90.0 <= self.percentile <= 100.0, f"quantize candidate {self.name}: percentile must be in [90, 100]")


@dataclass(frozen=True)
class QuantizeParams:
    """Stage `quantize`: candidates, the accuracy gate and how latency is measured."""

    calibration_set: str  # folder under calibration/ (camera = deployment frames, train = training images)
    max_map_drop: float  # accuracy gate: max mAP50-95 drop vs FP32, absolute (0.005 = half a point)
    eval_split: Literal["val", "test"]
    eval_images: int  # 0 = the whole split
    camera_gate: bool  # also gate on the labelled camera split (data/camera_frames/labelled) when it exists
    latency_warmup: int
    latency_runs: int  # timed runs per model per round
    latency_rounds: int  # rounds; models take turns inside each round
    latency_conf: float  # the timed decode (postprocess) uses the device's thresholds: confidence,
    latency_iou: float  # NMS IoU
    latency_max_det: int  # and detections kept
    latency_tie: float  # candidates within this fraction of the fastest's latency tie; the most accurate wins
    bootstrap_resamples: int  # paired-bootstrap resamples for each drop's 95% interval (0 = no intervals)
    candidates: tuple[QuantizeCandidate, ...]
    trt: QuantizeCandidate  # the symmetric QDQ model for TensorRT explicit quantization

    def __post_init__(self) -> None:
        _check(bool(self.calibration_set), "quantize.calibration_set must name a calibration set")
        _check(0.0 <= self.max_map_drop < 1.0, "quantize.max_map_drop must be in [0, 1)")
        _check(self.eval_images >= 0, "quantize.eval_images must be >= 0 (0 = all)")
        _check(self.latency_runs >= 1 and self.latency_rounds >= 1 and self.latency_warmup >= 0,
               "quantize latency_runs/latency_rounds must be >= 1 and latency_warmup >= 0")
        _check(0.0 < self.latency_conf < 1.0 and 0.0 < self.latency_iou <= 1.0 and self.latency_max_det >= 1,
               "quantize latency_conf must be in (0, 1), latency_iou in (0, 1], latency_max_det >= 1")
        _check(len(self.candidates) >= 1, "quantize.candidates must list at least one configuration")
        _check(0.0 <= self.latency_tie < 1.0, "quantize.latency_tie must be in [0, 1) (0.05 = within 5% of the fastest)")
        _check(self.bootstrap_resamples == 0 or self.bootstrap_resamples >= 20,
               "quantize.bootstrap_resamples must be 0 (no intervals) or >= 20 (200 is the default)")
        names = [c.name for c in self.candidates]
        _check(len(set(names)) == len(names), "quantize.candidates names must be unique")
        _check(self.trt.format == "QDQ" and self.trt.activation == "S8" and self.trt.weight == "S8"
               and self.trt.symmetric and self.trt.head == "float",
               "quantize.trt must be symmetric S8S8 QDQ with the head in float (TensorRT explicit quantization)")

    def candidate(self, name: str) -> QuantizeCandidate:
        """The candidate called `name` (e.g. the quantize metrics' `chosen`), or a ValueError naming the fix."""
        for c in self.candidates:
            if c.name == name:
                return c
        raise ValueError(f"quantize candidate '{name}' is not in quantize.candidates "
                         f"({', '.join(c.name for c in self.candidates)}); the quantize outputs are stale: "
                         "re-run the quantize stage (dvc repro quantize)")


_CALIBRATION_SETS = ("camera", "train")  # the sets stage `calibrate` builds
_BENCH_VARIANTS = ("fp32", "int8", "dynamic")


@dataclass(frozen=True)
class EvaluateParams:
    """Stage `evaluate`: which images, and which calibration sets the INT8 comparison is built from."""

    split: Literal["val", "test"]  # split of the defect dataset (the labelled camera split is always its `val`)
    images: int  # per split, the first N in sorted order; 0 = the whole split
    calibration_sets: tuple[str, ...]  # INT8 with quantize's chosen config rebuilt from each set, side by side
    pytorch_batch: int  # batch of Ultralytics' val for the PyTorch reference (rect off: results do not depend on it)

    def __post_init__(self) -> None:
        _check(self.images >= 0, "evaluate.images must be >= 0 (0 = the whole split)")
        unknown = sorted(set(self.calibration_sets) - set(_CALIBRATION_SETS))
        _check(not unknown, f"evaluate.calibration_sets: unknown set {unknown}; the calibrate stage builds "
                            f"{', '.join(_CALIBRATION_SETS)}")
        _check(len(set(self.calibration_sets)) == len(self.calibration_sets),
               "evaluate.calibration_sets lists a set twice; list each once")
        _check(self.pytorch_batch >= 1, "evaluate.pytorch_batch must be >= 1")


@dataclass(frozen=True)
class BenchmarkParams:
    """Stage `benchmark` (host): sizes, variants and the timing window (interleaved rounds)."""

    imgsz: tuple[int, ...]  # input sizes; a size other than export.imgsz is exported + quantized for the run
    variants: tuple[Literal["fp32", "int8", "dynamic"], ...]
    warmup: int  # untimed detections per variant before the first round
    runs: int  # timed detections per variant per round
    rounds: int  # variants take turns inside every round (a noisy neighbour hits all alike)
    frames: int  # distinct camera frames (from the calibration manifest) cycled through
    conf: float  # postprocessing thresholds, as a release ships them (inventory.yaml conf/iou/max_det)
    iou: float
    max_det: int

    def __post_init__(self) -> None:
        _check(len(self.imgsz) >= 1 and all(s % 32 == 0 and 64 <= s <= 1280 for s in self.imgsz),
               "benchmark.imgsz must list sizes that are multiples of 32 in [64, 1280]")
        _check(len(set(self.imgsz)) == len(self.imgsz), "benchmark.imgsz lists a size twice; list each once")
        _check(len(self.variants) >= 1 and len(set(self.variants)) == len(self.variants),
               f"benchmark.variants must list distinct variants out of {', '.join(_BENCH_VARIANTS)}")
        _check(self.warmup >= 0, "benchmark.warmup must be >= 0")
        _check(self.runs >= 1 and self.rounds >= 1, "benchmark.runs and benchmark.rounds must be >= 1")
        _check(self.frames >= 1, "benchmark.frames must be >= 1")
        _check(0.0 < self.conf < 1.0 and 0.0 < self.iou < 1.0, "benchmark.conf and benchmark.iou must be in (0, 1)")
        _check(self.max_det >= 1, "benchmark.max_det must be >= 1")


@dataclass(frozen=True)
class ReportParams:
    """Stage `report`: what the headline compares and how the plots are drawn."""

    split: Literal["val", "camera"]  # evaluate split of the headline accuracy (both are in the tables)
    cdf_points: int  # quantiles drawn per latency distribution (reports/report/latency_quantiles.csv)
    fleet: bool  # fold the latest on-device benchmark of each host in reports/fleet/ into the report

    def __post_init__(self) -> None:
        _check(self.split in ("val", "camera"), "report.split must be val or camera")
        _check(11 <= self.cdf_points <= 1001, "report.cdf_points must be in [11, 1001]")


@dataclass(frozen=True)
class MetricTolerance:
    """How far a metric may move between two runs: |a - b| <= max(abs_tol, rel_tol * max(|a|, |b|))."""

    metrics: str  # glob over dotted metric keys (`*mAP50-95`, `results.*.size_bytes`)
    abs_tol: float
    rel_tol: float

    def __post_init__(self) -> None:
        _check(bool(self.metrics), "repro_check.tolerances: every entry needs a metrics pattern")
        _check(self.abs_tol >= 0 and self.rel_tol >= 0,
               f"repro_check.tolerances '{self.metrics}': abs_tol and rel_tol must be >= 0")


@dataclass(frozen=True)
class ReproChoiceParams:
    """A stage that picks by a measurement (quantize: the fastest candidate) and where its pick is written."""

    stage: str  # "" = no stage picks by measurement
    metrics: str  # that stage's metrics file
    key: str  # dotted key of the pick in it

    def __post_init__(self) -> None:
        _check(not self.stage or (bool(self.metrics) and bool(self.key)),
               "repro_check.choice: metrics and key are required when stage is set")


@dataclass(frozen=True)
class ReproCheckParams:
    """`python -m pipeline.tools.repro_check`: which stages must reproduce bit for bit and what may move."""

    tolerant_stages: tuple[str, ...]  # outputs are measurements: metrics compared within tolerances
    tolerant_outputs: tuple[str, ...]  # measurement files inside otherwise bit-exact stages
    choice: ReproChoiceParams
    ignore_metrics: tuple[str, ...]  # globs over metric keys never compared (latencies)
    tolerances: tuple[MetricTolerance, ...]  # first match wins; a number matching none must be equal

    def __post_init__(self) -> None:
        _check(len(set(self.tolerant_stages)) == len(self.tolerant_stages),
               "repro_check.tolerant_stages lists a stage twice; list each once")
