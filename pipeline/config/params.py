"""Load and validate `params.yaml` into frozen pydantic models, one per section.

`params.yaml` is the single source of hyper-parameters: no field has a default. The whole file is
validated at once against `ParamsFile` (every section, nothing else), so a misspelt section, an
unknown or missing key, a key listed twice, a value of the wrong type, a non-finite float or a
value out of range is a `ParamsError` (a `ValueError`) with one line per problem, naming the file
and the dotted key (`params.yaml: 'train.lr0' must be > 0, got 0.0`). A typo never silently falls
back to a value hidden in code.

Types are strict (`"3"` is not an integer, `1` is not `true`); the one conversion is an integer
where a float is expected (YAML `1` for `1.0`), stored as a float. YAML lists become tuples: the
records are frozen and hashable. Ranges are field constraints; rules between fields are
`model_validator`s raising `rule(field, message)`, so their errors name a key too.

The strict-YAML and error-wording helpers here are shared with `pipeline/fleet/inventory.py`
(one implementation for both hand-edited files): `load_yaml` (a `UniqueKeyLoader`: a key listed
twice in one mapping is a `DuplicateKeyError`, where PyYAML would silently keep the last one),
`problems()` (pydantic's `ValidationError` as one `Problem` per mistake, with its dotted key and a
phrase such as `must be in (0, 1), got 1.5`), `rule()` and `TupleOf`. They live in this module, not
a module of their own, because every stage's dvc.yaml deps list the config modules it imports.
"""

from __future__ import annotations

import hashlib
import json
import re
import typing
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Iterable, Literal, Self, TypeVar

import annotated_types as at
import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails, PydanticCustomError

from pipeline.config.paths import PARAMS_FILE

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")

# --------------------------------------------------------------------------------------------
# Strict YAML and readable validation errors (pipeline/fleet/inventory.py uses them too)
# --------------------------------------------------------------------------------------------


def dotted_key(loc: tuple[Any, ...] | list[Any], prefix: str = "") -> str:
    """`('quantize', 'candidates', 2, 'name')` -> `quantize.candidates[2].name` (after `prefix`)."""
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


class DuplicateKeyError(yaml.YAMLError):
    """A mapping lists the same key twice; `key` is the dotted key, `line` / `first_line` 1-based."""

    def __init__(self, key: str, line: int, first_line: int) -> None:
        self.key, self.line, self.first_line = key, line, first_line
        super().__init__(f"duplicate key '{key}' (lines {first_line} and {line}); remove one of them")


class UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys, naming the dotted key and both lines."""

    def construct_document(self, node: yaml.Node) -> Any:
        """Check the whole node tree for duplicate keys first, so the error can name the full key."""
        self._check_unique(node, (), set())
        return super().construct_document(node)

    def _check_unique(self, node: yaml.Node, loc: tuple[Any, ...], seen_nodes: set[int]) -> None:
        if id(node) in seen_nodes:  # an alias seen before (YAML allows recursive structures)
            return
        seen_nodes.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._check_unique(item, (*loc, i), seen_nodes)
        elif isinstance(node, yaml.MappingNode):
            first_line: dict[Any, int] = {}
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    continue  # complex keys never appear in these files; PyYAML refuses unhashable ones itself
                # The constructed key, not the source text: `1` and `0x1` are the same key.
                key = self.construct_object(key_node)
                line = key_node.start_mark.line + 1
                if key in first_line:
                    raise DuplicateKeyError(dotted_key((*loc, str(key))), line, first_line[key])
                first_line[key] = line
                self._check_unique(value_node, (*loc, str(key)), seen_nodes)


def load_yaml(text: str) -> Any:
    """Parse `text` with `UniqueKeyLoader` (safe: plain data only; a repeated key is an error)."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


# --------------------------------------------------------------------------------------------
# Field types and rules
# --------------------------------------------------------------------------------------------


def _list_to_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


# A YAML list stored as a tuple (the records are frozen and hashable). Strict mode accepts only
# real tuples, so the list from YAML is converted first; items stay strictly checked.
TupleOf = Annotated[tuple[T, ...], BeforeValidator(_list_to_tuple)]


def rule(field: str, message: str) -> PydanticCustomError:
    """The error a `model_validator` raises for a cross-field rule about `field` of its model.

    `message` is the phrase after the key, e.g. `rule("lr0", "must be below ...")` reads
    `'train.lr0' must be below ...`.
    """
    return PydanticCustomError("rule", "{message}", {"field": field, "message": message})


# --------------------------------------------------------------------------------------------
# ValidationError -> readable problems
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One validation mistake.

    `kind` is `missing` (a required key is absent), `unknown` (a key the schema does not have;
    `valid` lists the keys that are), or `invalid` (`phrase` says what is wrong, e.g.
    `must be an integer, got 'ten'`). `key` is dotted, `loc` the raw location.
    """

    kind: Literal["missing", "unknown", "invalid"]
    loc: tuple[Any, ...]
    key: str
    phrase: str = ""
    valid: tuple[str, ...] = ()


_TYPE_WORDS = {
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
    "float_type": "a number", "float_parsing": "a number",
    "bool_type": "true or false", "bool_parsing": "true or false",
    "string_type": "a string",
    "tuple_type": "a list", "list_type": "a list", "set_type": "a list",
    "dict_type": "a mapping", "model_type": "a mapping", "model_attributes_type": "a mapping",
    "dataclass_type": "a mapping",
}
_RANGE_ERRORS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")


def problems(exc: ValidationError, model: type[BaseModel], prefix: str = "") -> list[Problem]:
    """One `Problem` per error of `exc`, raised validating `model`; keys start with `prefix`."""
    return [_problem(err, model, prefix) for err in exc.errors(include_url=False)]


def _problem(err: ErrorDetails, model: type[BaseModel], prefix: str) -> Problem:
    loc, kind = tuple(err["loc"]), err["type"]
    ctx = err.get("ctx") or {}
    if kind == "missing":
        return Problem("missing", loc, dotted_key(loc, prefix))
    if kind == "extra_forbidden":
        parent, _ = _resolve(model, loc[:-1])
        valid = tuple(parent.model_fields) if _is_model(parent) else ()
        return Problem("unknown", loc, dotted_key(loc, prefix), valid=valid)
    if kind == "rule":
        field = (ctx["field"],) if ctx.get("field") else ()
        return Problem("invalid", (*loc, *field), dotted_key((*loc, *field), prefix), str(ctx["message"]))
    return Problem("invalid", loc, dotted_key(loc, prefix), _phrase(err, model))


def _phrase(err: ErrorDetails, model: type[BaseModel]) -> str:
    """What is wrong with the value at `err['loc']`, and what would be accepted."""
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    got = _show(value)
    if kind in ("value_error", "assertion_error"):
        return str(ctx.get("error", err["msg"]))  # our own validators' messages, already phrased
    if kind == "finite_number":
        return f"must be a finite number, got {got}"
    if kind in _TYPE_WORDS:
        if kind in ("model_type", "dict_type", "tuple_type", "list_type"):
            got = type(value).__name__ if value is not None else "nothing"
        return f"must be {_TYPE_WORDS[kind]}, got {got}"
    annotation, metadata = _resolve(model, tuple(err["loc"]))
    if kind == "literal_error":
        choices = typing.get_args(annotation) if typing.get_origin(annotation) is Literal else ()
        expected = ", ".join(map(str, choices)) if choices else str(ctx.get("expected"))
        return f"is {got}; choose one of {expected}"
    if kind in _RANGE_ERRORS:
        return f"must be {_range_text(metadata) or _range_text([_bound(kind, ctx)])}, got {got}"
    if kind == "multiple_of":
        return f"must be a multiple of {_num(ctx['multiple_of'])}, got {got}"
    if kind in ("too_short", "too_long"):
        low = next((m.min_length for m in metadata if isinstance(m, at.MinLen)), None)
        high = next((m.max_length for m in metadata if isinstance(m, at.MaxLen)), None)
        if low is not None and low == high:
            want = f"exactly {low}"
        elif kind == "too_short":
            want = f"at least {ctx.get('min_length', low)}"
        else:
            want = f"at most {ctx.get('max_length', high)}"
        return f"must list {want} item(s), got {ctx.get('actual_length', '?')}"
    if kind == "string_too_short":
        return "must not be empty" if ctx.get("min_length") == 1 else f"must be at least {ctx['min_length']} characters"
    if kind == "string_too_long":
        return f"must be at most {ctx['max_length']} characters, got {len(value)}"
    return f"is invalid ({err['msg']}), got {got}"


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _num(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _bound(kind: str, ctx: dict[str, Any]) -> Any:
    cls = {"greater_than": at.Gt, "greater_than_equal": at.Ge, "less_than": at.Lt, "less_than_equal": at.Le}[kind]
    return cls(next(iter(ctx.values())))


def _range_text(metadata: list[Any]) -> str:
    """`[Ge(0), Lt(1)]` -> `in [0, 1)`; one bound -> `>= 0`; no bounds -> ``."""
    low = next((m for m in metadata if isinstance(m, (at.Ge, at.Gt))), None)
    high = next((m for m in metadata if isinstance(m, (at.Le, at.Lt))), None)
    if low is not None and high is not None:
        lo = _num(low.ge if isinstance(low, at.Ge) else low.gt)
        hi = _num(high.le if isinstance(high, at.Le) else high.lt)
        return f"in {'[' if isinstance(low, at.Ge) else '('}{lo}, {hi}{']' if isinstance(high, at.Le) else ')'}"
    if low is not None:
        return f">= {_num(low.ge)}" if isinstance(low, at.Ge) else f"> {_num(low.gt)}"
    if high is not None:
        return f"<= {_num(high.le)}" if isinstance(high, at.Le) else f"< {_num(high.lt)}"
    return ""


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _unwrap(tp: Any) -> tuple[Any, list[Any]]:
    """`Annotated[X, Field(ge=1), ...]` -> (X, [Ge(1), ...]); `X | None` -> X."""
    metadata: list[Any] = []
    while True:
        if typing.get_origin(tp) is Annotated:
            tp, *extra = typing.get_args(tp)
            for m in extra:
                metadata.extend(m.metadata if isinstance(m, FieldInfo) else [m])
            continue
        args = typing.get_args(tp)
        if type(None) in args and len(args) == 2:  # Optional: validated as the other member
            tp = next(a for a in args if a is not type(None))
            continue
        return tp, metadata


def _resolve(model: type[BaseModel], loc: tuple[Any, ...]) -> tuple[Any, list[Any]]:
    """The annotation and constraint metadata of the value at `loc` inside `model` (or (None, []))."""
    tp: Any = model
    metadata: list[Any] = []
    for part in loc:
        tp, _ = _unwrap(tp)
        if isinstance(part, str) and _is_model(tp) and part in tp.model_fields:
            info = tp.model_fields[part]
            tp, metadata = info.annotation, list(info.metadata)
        elif isinstance(part, int) and typing.get_origin(tp) in (tuple, list):
            args = typing.get_args(tp)
            tp = args[0] if len(args) == 1 or args[-1] is Ellipsis else args[part]
            metadata = []
        elif isinstance(part, str) and typing.get_origin(tp) is dict:
            tp, metadata = typing.get_args(tp)[1], []
        else:
            return None, []
    tp, extra = _unwrap(tp)
    return tp, metadata + extra


# --------------------------------------------------------------------------------------------
# The base of every section, and shared field types
# --------------------------------------------------------------------------------------------


class ParamsError(ValueError):
    """A mistake in the params file: one line per problem, each naming the file and the dotted key."""


class ParamsModel(BaseModel):
    """Base of every section: strict types, no unknown keys, frozen, finite floats.

    Like the dataclasses these models replaced, they can be built positionally in code
    (`MetricTolerance("*", 0.01, 0.1)`; a bad value there is pydantic's `ValidationError`, also a
    `ValueError`), and `replace(**changes)` returns a re-validated copy.
    """

    # defer_build: validators are built on first use, not at import (the fleet CLI imports this
    # module for its YAML helpers only and never validates a params section).
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False, defer_build=True)

    def __init__(self, *args: Any, **values: Any) -> None:
        # Only maps positional values to field names. pydantic also calls this __init__ for nested
        # sections (keywords only), so it must not reword errors: the caller that knows the file does.
        names = list(type(self).model_fields)
        if len(args) > len(names):
            raise TypeError(f"{type(self).__name__} takes {len(names)} fields, got {len(args)} positional values")
        positional = dict(zip(names, args))
        twice = sorted(positional.keys() & values.keys())
        if twice:
            raise TypeError(f"{type(self).__name__}: {', '.join(twice)} given both by position and by name")
        super().__init__(**positional, **values)

    def replace(self, **changes: Any) -> Self:
        """A copy with `changes` applied and validated again (unlike `model_copy`, which skips checks)."""
        try:
            return type(self).model_validate({**self.__dict__, **changes})
        except ValidationError as e:  # no file to name: the class stands in for it
            raise ParamsError(_message(e, type(self), f"{type(self).__name__}.replace()", "")) from None


def _distinct(noun: str, key: Callable[[Any], Any] = lambda x: x) -> AfterValidator:
    """Refuse a list with an item twice (compared by `key`), naming the repeated ones."""

    def check(items: tuple[Any, ...]) -> tuple[Any, ...]:
        twice = [k for k, n in Counter(key(i) for i in items).items() if n > 1]
        if twice:
            raise ValueError(f"lists a {noun} twice ({', '.join(map(str, twice))}); list each once")
        return items

    return AfterValidator(check)


def _names(items: Iterable[Any]) -> str:
    return ", ".join(map(str, items))


# A model input size: Ultralytics and the exported graphs need multiples of the largest stride (32).
ImageSize = Annotated[int, Field(ge=64, multiple_of=32)]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]


# --------------------------------------------------------------------------------------------
# Sections. One model per params.yaml section (nested models for nested mappings).
# --------------------------------------------------------------------------------------------


class BaseParams(ParamsModel):
    """Settings shared by every stage."""

    seed: int = Field(ge=0)
    threads: int = Field(ge=1)  # torch / ORT intra-op threads; pinned so timings and results are comparable


class SyntheticParams(ParamsModel):
    """The procedural steel-surface generator (used when data.source == 'synthetic')."""

    train_images: int = Field(ge=1)
    val_images: int = Field(ge=1)
    test_images: int = Field(ge=1)
    image_size: int = Field(ge=64, le=2048)
    max_defects: int = Field(ge=0, le=16)
    empty_fraction: float = Field(ge=0.0, lt=1.0)  # share of images with no defect at all (pure background)
    small_fraction: Probability  # share of defects drawn small (10-24 px at 256 px)
    min_contrast: float = Field(gt=0.0, le=255.0)  # defect amplitude range, grey levels on a 0-255 scale
    max_contrast: float = Field(gt=0.0, le=255.0)
    clutter: int = Field(ge=0)  # max non-defect distractors per image (stains, specks, streaks)
    jpeg_quality: int = Field(ge=50, le=100)

    @model_validator(mode="after")
    def _contrast_range(self) -> SyntheticParams:
        if self.min_contrast > self.max_contrast:
            raise rule("min_contrast", f"({self.min_contrast:g}) must be <= data.synthetic.max_contrast "
                                       f"({self.max_contrast:g}); swap or fix them")
        return self


class DataParams(ParamsModel):
    """Stage `data`: where the defect dataset comes from and how imports are split."""

    source: Literal["synthetic", "yolo", "voc"]
    import_dir: str  # folder of a real dataset for source yolo/voc; "" for synthetic
    val_fraction: float = Field(gt=0.0, lt=1.0)  # split of an import that ships without train/val folders
    test_fraction: float = Field(ge=0.0, lt=1.0)
    synthetic: SyntheticParams

    @model_validator(mode="after")
    def _import_rules(self) -> DataParams:
        if self.source != "synthetic" and not self.import_dir:
            raise rule("import_dir", f"is empty but data.source is '{self.source}': "
                                     "set it to the folder of the dataset to import")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise rule("test_fraction", f"+ data.val_fraction = {self.val_fraction + self.test_fraction:g} "
                                        "leaves no images for training; make the sum < 1")
        return self


_DEVICE = re.compile(r"cpu|cuda(:\d+)?|\d+(,\d+)*")


def _train_device(value: object) -> object:
    """`train.device`: "cpu", a CUDA device ("cuda:0", "0", "0,1") or a list of CUDA indices (DDP)."""
    if isinstance(value, list):
        if not value or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
            raise ValueError(f"a device list must hold CUDA indices (non-negative integers), got {value}")
        if len(set(value)) != len(value):
            raise ValueError(f"device list {value} names a GPU twice")
        return value
    if isinstance(value, str) and _DEVICE.fullmatch(value):
        return value
    raise ValueError(f"{value!r} is not a device: use cpu, cuda:N, N, 'N,M' or a list [N, M] of CUDA indices")


class CameraMatchParams(ParamsModel):
    """`train.camera_match`: training images rendered through the estimated deployment cameras."""

    enabled: bool  # reads reports/camera_profile/profiles.json (stage camera_profile)
    probability: Probability  # share of training images rendered through a camera (picked uniformly)
    strength: float = Field(ge=0.0, le=2.0)  # 0 = no effect, 1 = the profile's estimate of every effect
    jitter: float = Field(ge=0.0, lt=1.0)  # per-image relative variation of exposure, gains, blur and noise


class TrainParams(ParamsModel):
    """Stage `train`: Ultralytics YOLOv8n hyper-parameters (passed through by name)."""

    model: str = Field(min_length=1)  # yolov8n.yaml trains from scratch; yolov8n.pt needs internet for the weights
    activation: Literal["SiLU", "ReLU"]  # ReLU: the edge variant whose INT8 form is cheaper (yaml models only)
    imgsz: ImageSize
    epochs: int = Field(ge=1)
    batch: int = Field(ge=1)
    workers: int = Field(ge=0)
    optimizer: Literal["SGD", "Adam", "AdamW", "RMSProp"]
    lr0: float = Field(gt=0.0)
    lrf: float = Field(gt=0.0, le=1.0)
    momentum: float = Field(ge=0.0, lt=1.0)
    weight_decay: float = Field(ge=0.0)
    warmup_epochs: float = Field(ge=0.0)
    warmup_bias_lr: float = Field(ge=0.0)
    cos_lr: bool
    nbs: int = Field(ge=1)
    box: float = Field(ge=0.0)
    cls: float = Field(ge=0.0)
    dfl: float = Field(ge=0.0)
    mosaic: Probability
    close_mosaic: int = Field(ge=0)
    mixup: Probability
    degrees: float = Field(ge=0.0, le=180.0)
    translate: Probability
    scale: Probability  # Ultralytics draws the gain from [1 - scale, 1 + scale]: above 1 it goes negative
    fliplr: Probability
    flipud: Probability
    hsv_h: Probability
    hsv_s: Probability
    hsv_v: Probability
    # cpu (bit-reproducible per CPU type) | cuda:N | [N, M] (Ultralytics' DDP)
    device: Annotated[str | list[int], BeforeValidator(_train_device)]
    camera_match: CameraMatchParams
    # fine-tune on the labelled camera frames' train split (data/camera_frames/labelled/images/train), checked
    # disjoint from the camera evaluation split (no copy, no near-duplicate)
    camera_frames: bool

    @model_validator(mode="after")
    def _activation_needs_yaml(self) -> TrainParams:
        if self.activation != "SiLU" and not self.model.endswith(".yaml"):
            raise rule("activation", f"is {self.activation}, which needs a model built from a .yaml (train.model is "
                                     f"{self.model}): pretrained weights keep the activation they were trained with")
        return self


class Fp16ParityParams(ParamsModel):
    """`export.fp16`: the gate on models/yolov8n.fp16.onnx against the FP32 ONNX (both run by ORT CPU on
    the same `parity_images` val images as the PyTorch check)."""

    atol_box: float = Field(gt=0.0)  # max |FP16 - FP32| on box coordinates, in input pixels
    atol_score: float = Field(gt=0.0)  # max |FP16 - FP32| on class scores (0-1)
    min_f1: Probability  # detection agreement: box F1 of FP16 vs FP32 detections (same class, IoU >= 0.5)
    conf: float = Field(gt=0.0, lt=1.0)  # decode thresholds for that agreement (a release's defaults)
    iou: float = Field(gt=0.0, le=1.0)
    max_det: int = Field(ge=1)


class ExportParams(ParamsModel):
    """Stage `export`: ONNX export, the ORT-vs-PyTorch parity gate and the FP16 copy's gate."""

    opset: int = Field(ge=11, le=22)
    imgsz: ImageSize
    simplify: bool
    parity_images: int = Field(ge=1)  # val images run through both runtimes
    parity_atol_box: float = Field(gt=0.0)  # max |ORT - torch| on box coordinates, in input pixels
    parity_atol_score: float = Field(gt=0.0)  # max |ORT - torch| on class scores (0-1)
    fp16: Fp16ParityParams


def _folder_name(value: str) -> str:
    if not value or "/" in value or value in (".", ".."):
        raise ValueError(f"is {value!r}; use a non-empty folder name without '/' (it names a folder under frames/)")
    return value


class CameraModelParams(ParamsModel):
    """One deployment camera's fixed optics/sensor model (what the training images never saw)."""

    id: Annotated[str, AfterValidator(_folder_name)]  # folder under frames/ (a fleet host name for ingested frames)
    width: int = Field(ge=32, le=4096)  # sensor output size: the square render is resized to width x height
    height: int = Field(ge=32, le=4096)
    exposure: float = Field(ge=0.05, le=5.0)  # brightness gain on the render (1 = the training set's exposure)
    # White-balance cast: per-channel gains in B, G, R order.
    wb_gains: TupleOf[Annotated[float, Field(ge=0.2, le=3.0)]] = Field(min_length=3, max_length=3)
    shot_noise: float = Field(ge=0.0)  # photon noise: sigma = shot_noise * sqrt(grey level)
    read_noise: float = Field(ge=0.0)  # sensor read noise sigma, grey levels
    blur: Literal["none", "motion", "defocus"]
    blur_px: float = Field(ge=0.0, le=32.0)  # motion: streak length in px along x (the strip moves); defocus: radius
    vignetting: float = Field(ge=0.0, lt=1.0)  # brightness lost in the corners (0 = none, 0.4 = corners at 60%)
    jpeg_quality: int = Field(ge=30, le=100)


class CameraSyntheticParams(ParamsModel):
    """Synthetic deployment frames: scenes from the defect generator seen through camera models."""

    scenes_per_camera: int = Field(ge=1)  # distinct scenes per camera (unlabelled frames)
    burst_length: int = Field(ge=1)  # near-identical consecutive frames per scene, as a streaming camera delivers
    burst_shift_px: float = Field(ge=0.0, le=8.0)  # max sub-frame shift between frames of one burst (vibration)
    exposure_jitter: float = Field(ge=0.0, lt=0.5)  # per-scene relative exposure change (auto-exposure, flicker)
    wb_jitter: float = Field(ge=0.0, lt=0.5)  # per-scene relative change of each white-balance gain
    labelled_images: int = Field(ge=1)  # size of the labelled camera-domain val split (cameras round-robin)
    labelled_train_images: int = Field(ge=0)  # labelled frames of other scenes, for train.camera_frames (0 = none)
    # Ids name output folders, so two cameras with one id would overwrite each other's frames.
    cameras: Annotated[TupleOf[CameraModelParams], _distinct("camera id", lambda c: c.id)] = Field(min_length=1)


class CameraParams(ParamsModel):
    """Stage `camera`: deployment-camera frames for calibration plus a labelled camera-domain split."""

    source: Literal["synthetic", "ingest"]
    ingest_dir: str  # source ingest: one folder per camera (images or one video), e.g. from `fab collect-frames`
    ingest_labelled_dir: str  # source ingest: optional YOLO folder of labelled camera frames; "" = none
    video_fps: float = Field(gt=0.0, le=120.0)  # source ingest: frames per second sampled from a video file
    # source ingest: share of ingest_labelled_dir's frames (whole near-duplicate groups, seeded) put in a
    # train split for train.camera_frames; the rest stay the camera evaluation split
    labelled_train_fraction: float = Field(ge=0.0, lt=1.0)
    synthetic: CameraSyntheticParams

    @model_validator(mode="after")
    def _ingest_needs_a_folder(self) -> CameraParams:
        if self.source == "ingest" and not self.ingest_dir:
            raise rule("ingest_dir", "is empty but camera.source is 'ingest': set it (e.g. data/camera)")
        return self


class CameraProfileParams(ParamsModel):
    """Stage `camera_profile`: how much of each camera and of the training set the profiles are estimated from."""

    frames_per_camera: int = Field(ge=0)  # frames sampled evenly per camera folder (sorted names); 0 = all
    reference_images: int = Field(ge=1)  # training images sampled evenly: the reference look (exposure 1, no cast)
    render_images: int = Field(ge=2)  # of those, rendered through each candidate camera model (analysis by synthesis)
    max_blur_px: float = Field(ge=2.0, le=32.0)  # largest motion streak (px) / defocus radius the blur search tries
    grid_cells: int = Field(ge=4, le=128)  # blocks along a frame's long side for the gains + vignetting fit

    @model_validator(mode="after")
    def _renders_from_the_references(self) -> CameraProfileParams:
        if self.render_images > self.reference_images:
            raise rule("render_images", f"({self.render_images}) must be <= camera_profile.reference_images "
                                        f"({self.reference_images}): the renders are a subset of the reference images")
        return self


class CalibrateParams(ParamsModel):
    """Stage `calibrate`: dedup, diverse selection and preprocessing of the calibration sets."""

    imgsz: ImageSize  # model input size; must equal export.imgsz (the tensors feed that model)
    size: int = Field(ge=1)  # frames per calibration set
    phash_size: int = Field(ge=4, le=16)  # pHash bits = phash_size**2 (DCT low-frequency block)
    phash_highfreq: int = Field(ge=2, le=8)  # the DCT runs on a (phash_size * phash_highfreq)^2 grey thumbnail
    dedup_hamming: int = Field(ge=0)  # frames whose pHashes differ in <= this many bits are near-duplicates
    thumb_size: int = Field(ge=4, le=64)  # descriptor: thumb_size^2 grey thumbnail ...
    hist_bins: int = Field(ge=2, le=64)  # ... plus a hist_bins-per-channel colour histogram
    hist_weight: float = Field(ge=0.0)  # weight of the colour histogram against the thumbnail in the descriptor

    @model_validator(mode="after")
    def _dedup_below_half_the_bits(self) -> CalibrateParams:
        # At half the bits or more, unrelated frames count as duplicates: the set would collapse.
        if self.dedup_hamming >= self.phash_size**2 // 2:
            raise rule("dedup_hamming", f"must be < calibrate.phash_size^2 / 2 = {self.phash_size**2 // 2}, "
                                        f"got {self.dedup_hamming}")
        return self


def _candidate_name(value: str) -> str:
    # The name becomes part of file names and MLflow keys.
    if not value or not value.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"is {value!r}; use letters, digits, - or _")
    return value


class QuantizeCandidate(ParamsModel):
    """One INT8 configuration the quantize stage builds, measures and gates."""

    name: Annotated[str, AfterValidator(_candidate_name)]
    format: Literal["QDQ", "QOperator"]
    activation: Literal["U8", "S8"]
    weight: Literal["U8", "S8"]
    symmetric: bool  # symmetric activation ranges: S8 zero point 0 (TensorRT needs it), U8 zero point 128
    op_types: TupleOf[str]  # op types to quantize; [] = every type ORT can quantize
    calibration: Literal["MinMax", "Percentile", "Entropy"]
    percentile: float = Field(ge=90.0, le=100.0)  # used by Percentile calibration
    reduce_range: bool  # 7-bit weights: avoids U8S8 int16 saturation on CPUs without VNNI (AVX2)
    # Extra layers kept in float: head_convs (last convs of the head), stem.
    float_layers: TupleOf[Literal["head_convs", "stem"]]
    head: Literal["float", "cut"]  # decode kept in float in the graph, or cut out to postprocess


def _bootstrap_resamples(value: int) -> int:
    # Fewer than 20 resamples cannot give a 95% interval (its 2.5% tails would be empty).
    if 0 < value < 20:
        raise ValueError(f"must be 0 (no intervals) or >= 20 (200 is the default), got {value}")
    return value


class EarlyStopParams(ParamsModel):
    """`quantize.early_stop`: stop scoring a candidate once its drop interval lies wholly above the gate.

    A sequential test with repeated looks, so each look's interval is wider than the CSV's 95 %
    (docs/int8-and-calibration.md, "Early stop"). Candidates that pass have always been scored in full.
    """

    enabled: bool
    min_images: int = Field(ge=2)  # no look before this many images of a split (a split this small: no look)
    chunk: int = Field(ge=1)  # images scored between two looks
    level: float = Field(ge=0.95, lt=1.0)  # two-sided level of the interval at each look (its low end decides)
    resamples: int = Field(ge=50)  # paired-bootstrap resamples per look (their SD sets the interval's width)


class QuantizeParams(ParamsModel):
    """Stage `quantize`: candidates, the accuracy gate and how latency is measured."""

    calibration_set: str = Field(min_length=1)  # folder under calibration/ (camera = deployment frames, train = ...)
    max_map_drop: float = Field(ge=0.0, lt=1.0)  # accuracy gate: max mAP50-95 drop vs FP32 (0.005 = half a point)
    eval_split: Literal["val", "test"]
    eval_images: int = Field(ge=0)  # 0 = the whole split
    camera_gate: bool  # also gate on the labelled camera split (data/camera_frames/labelled) when it exists
    latency_warmup: int = Field(ge=0)
    latency_runs: int = Field(ge=1)  # timed runs per model per round
    latency_rounds: int = Field(ge=1)  # rounds; models take turns inside each round
    latency_conf: float = Field(gt=0.0, lt=1.0)  # the timed decode uses the device's thresholds: confidence,
    latency_iou: float = Field(gt=0.0, le=1.0)  # NMS IoU
    latency_max_det: int = Field(ge=1)  # and detections kept
    latency_tie: float = Field(ge=0.0, lt=1.0)  # within this fraction of the fastest = a tie; the most accurate wins
    # Paired-bootstrap resamples for each drop's 95% interval (0 = no intervals).
    bootstrap_resamples: Annotated[int, Field(ge=0), AfterValidator(_bootstrap_resamples)]
    early_stop: EarlyStopParams  # a candidate whose drop interval lies above the gate is not scored further
    # Names pick the chosen model in later stages (QuantizeParams.candidate), so they must be unique.
    candidates: Annotated[TupleOf[QuantizeCandidate], _distinct("candidate name", lambda c: c.name)] = Field(
        min_length=1)
    trt: QuantizeCandidate  # the symmetric QDQ model for TensorRT explicit quantization

    @model_validator(mode="after")
    def _trt_is_explicit_quantization(self) -> QuantizeParams:
        t = self.trt
        if not (t.format == "QDQ" and t.activation == "S8" and t.weight == "S8" and t.symmetric and t.head == "float"):
            raise rule("trt", "must be symmetric S8S8 QDQ with the head in float (TensorRT explicit quantization): "
                              "set format: QDQ, activation: S8, weight: S8, symmetric: true, head: float")
        return self

    def candidate(self, name: str) -> QuantizeCandidate:
        """The candidate called `name` (e.g. the quantize metrics' `chosen`), or a ValueError naming the fix."""
        for c in self.candidates:
            if c.name == name:
                return c
        raise ValueError(f"quantize candidate '{name}' is not in quantize.candidates "
                         f"({_names(c.name for c in self.candidates)}); the quantize outputs are stale: "
                         "re-run the quantize stage (dvc repro quantize)")


_CALIBRATION_SETS = ("camera", "train")  # the sets stage `calibrate` builds
_BENCH_VARIANTS = ("fp32", "int8", "dynamic")


def _calibration_sets(sets: tuple[str, ...]) -> tuple[str, ...]:
    unknown = sorted(set(sets) - set(_CALIBRATION_SETS))
    if unknown:
        raise ValueError(f"lists unknown set(s) {_names(unknown)}; "
                         f"the calibrate stage builds {_names(_CALIBRATION_SETS)}")
    return sets


class EvaluateParams(ParamsModel):
    """Stage `evaluate`: which images, and which calibration sets the INT8 comparison is built from."""

    split: Literal["val", "test"]  # split of the defect dataset (the labelled camera split is always its `val`)
    images: int = Field(ge=0)  # per split, the first N in sorted order; 0 = the whole split
    # INT8 with quantize's chosen config rebuilt from each set, side by side.
    calibration_sets: Annotated[TupleOf[str], AfterValidator(_calibration_sets), _distinct("set")]
    pytorch_batch: int = Field(ge=1)  # batch of Ultralytics' val for the PyTorch reference (rect off: no effect)


def _bench_sizes(sizes: tuple[int, ...]) -> tuple[int, ...]:
    if not sizes or not all(s % 32 == 0 and 64 <= s <= 1280 for s in sizes):
        raise ValueError(f"must list sizes that are multiples of 32 in [64, 1280], got {list(sizes)}")
    return sizes


def _bench_variants(variants: tuple[str, ...]) -> tuple[str, ...]:
    twice = sorted({v for v in variants if variants.count(v) > 1})
    if not variants or twice:
        listed = f"; {_names(twice)} listed twice" if twice else ""
        raise ValueError(f"must list distinct variants out of {_names(_BENCH_VARIANTS)}{listed}")
    return variants


class BenchmarkParams(ParamsModel):
    """Stage `benchmark` (host): sizes, variants and the timing window (interleaved rounds)."""

    # Input sizes; a size other than export.imgsz is exported + quantized for the run.
    imgsz: Annotated[TupleOf[int], AfterValidator(_bench_sizes), _distinct("size")]
    variants: Annotated[TupleOf[Literal["fp32", "int8", "dynamic"]], AfterValidator(_bench_variants)]
    warmup: int = Field(ge=0)  # untimed detections per variant before the first round
    runs: int = Field(ge=1)  # timed detections per variant per round
    rounds: int = Field(ge=1)  # variants take turns inside every round (a noisy neighbour hits all alike)
    frames: int = Field(ge=1)  # distinct camera frames (from the calibration manifest) cycled through
    conf: float = Field(gt=0.0, lt=1.0)  # postprocessing thresholds, as a release ships them (inventory.yaml)
    iou: float = Field(gt=0.0, lt=1.0)
    max_det: int = Field(ge=1)


class ReportParams(ParamsModel):
    """Stage `report`: what the headline compares and how the plots are drawn."""

    split: Literal["val", "camera"]  # evaluate split of the headline accuracy (both are in the tables)
    cdf_points: int = Field(ge=11, le=1001)  # quantiles drawn per latency distribution (latency_quantiles.csv)
    fleet: bool  # fold the latest on-device benchmark of each host in reports/fleet/ into the report


class MetricTolerance(ParamsModel):
    """How far a metric may move between two runs: |a - b| <= max(abs_tol, rel_tol * max(|a|, |b|))."""

    metrics: str = Field(min_length=1)  # glob over dotted metric keys (`*mAP50-95`, `results.*.size_bytes`)
    abs_tol: float
    rel_tol: float

    @model_validator(mode="after")
    def _tolerances_not_negative(self) -> MetricTolerance:
        # One rule for both: a negative tolerance of either kind would make every comparison fail.
        for name in ("abs_tol", "rel_tol"):
            value = getattr(self, name)
            if value < 0:
                raise rule(name, f"is {value:g}: abs_tol and rel_tol must be >= 0")
        return self


class ReproChoiceParams(ParamsModel):
    """A stage that picks by a measurement (quantize: the fastest candidate) and where its pick is written."""

    stage: str  # "" = no stage picks by measurement
    metrics: str  # that stage's metrics file
    key: str  # dotted key of the pick in it

    @model_validator(mode="after")
    def _stage_needs_where(self) -> ReproChoiceParams:
        if self.stage and not (self.metrics and self.key):
            raise rule("metrics" if not self.metrics else "key",
                       f"is empty but stage is '{self.stage}': metrics and key are required when stage is set")
        return self


class ReproCheckParams(ParamsModel):
    """`python -m pipeline.tools.repro_check`: which stages must reproduce bit for bit and what may move."""

    # Outputs are measurements: metrics compared within tolerances.
    tolerant_stages: Annotated[TupleOf[str], _distinct("stage")]
    tolerant_outputs: TupleOf[str]  # measurement files inside otherwise bit-exact stages
    choice: ReproChoiceParams
    ignore_metrics: TupleOf[str]  # globs over metric keys never compared (latencies)
    tolerances: TupleOf[MetricTolerance]  # first match wins; a number matching none must be equal


class ParamsFile(ParamsModel):
    """The whole params file: every section, and nothing else (a misspelt section is an error)."""

    base: BaseParams
    data: DataParams
    train: TrainParams
    export: ExportParams
    camera: CameraParams
    camera_profile: CameraProfileParams
    calibrate: CalibrateParams
    quantize: QuantizeParams
    evaluate: EvaluateParams
    benchmark: BenchmarkParams
    report: ReportParams
    repro_check: ReproCheckParams


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def read_params_file(path: Path = PARAMS_FILE) -> dict[str, Any]:
    """Read `path` as a YAML mapping; a missing or malformed file or a repeated key is a ParamsError."""
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found; run from the repository root or create it")
    try:
        raw = load_yaml(path.read_text())
    except DuplicateKeyError as e:
        raise ParamsError(f"{path}: {e}") from None
    except yaml.MarkedYAMLError as e:  # one line: PyYAML's own message adds a multi-line excerpt
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        what = "; ".join(x for x in (e.context, e.problem) if x)
        raise ParamsError(f"{path}: {where}not valid YAML ({what}); fix the syntax") from None
    except (yaml.YAMLError, ValueError) as e:  # ValueError: a value PyYAML cannot build (a bad date)
        raise ParamsError(f"{path}: not valid YAML ({' '.join(str(e).split())}); fix the syntax") from None
    except RecursionError:
        raise ParamsError(f"{path}: nested too deeply to read; params.yaml is sections of plain keys") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: top level must be a mapping of sections (base:, data:, ...)")
    bad = _non_string_key(raw, ())
    if bad is not None:
        loc, key = bad
        at = f" under '{dotted_key(loc)}'" if loc else ""
        raise ParamsError(f"{path}: key {key!r}{at} is not a name; params keys are names (check the indentation, "
                          "or quote the key)")
    return raw


def _non_string_key(node: Any, loc: tuple[Any, ...]) -> tuple[tuple[Any, ...], Any] | None:
    """(where, key) of the first mapping key that is not a string (`1:`, a bare `?`), or None."""
    if isinstance(node, dict):
        for k, v in node.items():
            if not isinstance(k, str):
                return loc, k
            found = _non_string_key(v, (*loc, k))
            if found is not None:
                return found
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found = _non_string_key(v, (*loc, i))
            if found is not None:
                return found
    return None


def load_all(path: Path = PARAMS_FILE) -> ParamsFile:
    """Every section of the params file at `path`, validated together."""
    return build(ParamsFile, read_params_file(path), "", path)


def load_params(section: str, cls: type[M], path: Path = PARAMS_FILE) -> M:
    """Return section `section` of the params file at `path` as a validated `cls` instance.

    The whole file is validated, not only `section`: the file is one source, and a mistake in
    another section (or a misspelt section) should stop the run now, not at a later stage.
    """
    field = ParamsFile.model_fields.get(section)
    if field is None or field.annotation is not cls:
        known = _names(f"{k} ({v.annotation.__name__})" for k, v in ParamsFile.model_fields.items())
        raise TypeError(f"params section '{section}' is not validated as {cls.__name__}; sections: {known}")
    return getattr(load_all(path), section)


def build(cls: type[M], value: Any, where: str, path: Path) -> M:
    """Validate mapping `value` as `cls`; `where` (e.g. `quantize`) prefixes the dotted keys in errors."""
    try:
        return cls.model_validate(value)
    except ValidationError as e:
        raise ParamsError(_message(e, cls, str(path), where)) from None


def _message(exc: ValidationError, model: type[BaseModel], source: str, prefix: str) -> str:
    """One line per problem: `<file>: <what is wrong with which key, and the fix>`."""
    lines = []
    for p in problems(exc, model, prefix):
        section = model is ParamsFile and len(p.loc) == 1
        if p.kind == "missing":
            text = (f"missing section '{p.key}'; add it (docs/stages.md lists its keys)" if section
                    else f"missing key '{p.key}'; add it to the file")
        elif p.kind == "unknown":
            text = (f"unknown section '{p.key}'; valid sections are {_names(p.valid)}" if section
                    else f"unknown key '{p.key}'; valid keys are {_names(p.valid)}")
        elif not p.key:
            text = p.phrase
        else:
            text = f"'{p.key}' {p.phrase}"
        lines.append(f"{source}: {text}")
    return "\n".join(lines)


def params_hash(*sections: BaseModel) -> str:
    """Stable sha256 (first 16 hex) of one or more params sections, for MLflow tags."""
    blob = json.dumps([s.model_dump() for s in sections], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
