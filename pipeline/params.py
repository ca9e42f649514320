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

from pipeline.paths import PARAMS_FILE

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
