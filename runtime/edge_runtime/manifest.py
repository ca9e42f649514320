"""The release manifest: the contract between the workstation (fleet deploy) and the device.

A release is a folder `<deploy_dir>/releases/<sha12>/` holding model files and `manifest.json`.
The fleet writes the manifest; the device runtime reads it and never guesses: which backend,
which precision, which file, how many threads, the TensorRT workspace, thermal thresholds and
postprocessing thresholds all come from here. `verify_files` checks every listed file's sha256
before a release may become `current`.

Nothing in a manifest is trusted (it may be damaged, hand-edited or hostile):

* `manifest_from_json` checks the JSON field by field: exact types (an int is not a bool, a float
  is finite), no unknown, missing or duplicated key. Every problem is a `ManifestError` naming the
  file, the dotted key (`variants[0].model_file`) and the fix -- never a TypeError or KeyError.
* `Manifest` itself (however it is built) checks values and cross-references: enumerations
  (backend, precision, output_format, roles, ORT graph optimisation), ranges, every file name
  relative and inside the release folder (no absolute path, no `.`/`..` part, no backslash or
  control character), each variant's files listed with the matching role, at most one health sample.
* `verify_files` also refuses a listed file that resolves (through a symlink) outside the release.

Python 3.8+, stdlib only (runs on the device's own Python).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .fileio import atomic_write_json, sha256_file

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
BACKENDS = ("onnxruntime", "tensorrt")
PRECISIONS = ("fp32", "fp16", "int8")
ROLES = ("model", "trt_onnx", "health_sample", "other", "fp16_onnx")
# The same tuples as postprocess.OUTPUT_FORMATS and backends.GRAPH_OPTIMIZATION_LEVELS (tests hold
# them equal): this module stays stdlib only, so it cannot import those numpy-importing modules.
OUTPUT_FORMATS = ("yolov8-raw", "yolov8-predfl", "yolov8-predfl-logits")
GRAPH_OPTIMIZATIONS = ("disable", "basic", "extended", "all")
# Bounds for what reaches the device: the inventory's own ranges, plus an upper limit where a
# number would otherwise overflow ONNX Runtime / TensorRT or exhaust the device.
MAX_THREADS = 1024
MAX_WORKSPACE_MB = 1 << 20  # 1 TiB
MAX_DET = 100_000
IMGSZ_RANGE = (32, 8192)  # and a multiple of 32, the largest YOLOv8 stride
MAX_TEMP_C = 125.0  # junction limits of these boards are about 100-105 C
RELEASE_ID = re.compile(r"\A[0-9a-f]{12}\Z")
SHA256 = re.compile(r"\A[0-9a-f]{64}\Z")
VARIANT_NAME = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.-]*\Z")  # = the inventory's service.variant
REDEPLOY = "redeploy the release (`fab deploy`) so the workstation writes a fresh manifest"
_SELF = "manifest"  # how errors of a Manifest built in Python start; manifest_from_json puts the file there


class ManifestError(ValueError):
    """A manifest that is missing, malformed or inconsistent with the files beside it."""


@dataclass(frozen=True)
class FileEntry:
    """One file of the release: its content hash, size and role."""

    sha256: str
    size: int
    role: str  # model | trt_onnx | health_sample | other | fp16_onnx


@dataclass(frozen=True)
class Variant:
    """One shipped model variant (thermal-adaptive mode switches between them)."""

    name: str  # e.g. "416", "320"
    imgsz: int
    model_file: str  # what ORT loads / what TensorRT builds from
    trt_onnx_file: Optional[str] = None  # symmetric-QDQ ONNX for TensorRT INT8 (explicit quantization)
    # FP16 ONNX (float16 weights and activations, float32 input/output) for TensorRT FP16 where the
    # builder has no FP16 flag (TensorRT 11: strongly typed networks). TensorRT 8.5/10 build FP16 from
    # model_file with the flag. Optional: absent from the JSON when None (older releases, other backends).
    fp16_onnx_file: Optional[str] = None


@dataclass(frozen=True)
class OrtSettings:
    """ONNX Runtime session options."""

    threads: int
    graph_optimization: str = "all"  # disable | basic | extended | all
    providers: Tuple[str, ...] = ("CPUExecutionProvider",)


@dataclass(frozen=True)
class TensorRTSettings:
    """TensorRT engine build settings (on the device)."""

    workspace_mb: int
    timing_cache: bool = True


@dataclass(frozen=True)
class ThermalSettings:
    """Temperatures (Celsius) for thermal-adaptive switching, with hysteresis."""

    throttle_c: float
    resume_c: float


@dataclass(frozen=True)
class PostprocessSettings:
    """Detection thresholds used on the device."""

    conf: float
    iou: float
    max_det: int


# --------------------------------------------------------------------------------------------
# Value checks shared by Manifest (built in Python) and manifest_from_json (read from a file)
# --------------------------------------------------------------------------------------------


def _show(value: Any) -> str:
    """A value for an error message (long ones shortened)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _bad(key: str, problem: str, fix: str = REDEPLOY, where: str = _SELF) -> ManifestError:
    return ManifestError(f"{where}: {key} {problem}; {fix}")


def name_problem(name: Any) -> Optional[str]:
    """Why `name` is not a file name inside the release folder (None: it is one).

    Release file names are relative paths with '/' separators: not empty, not absolute, no
    empty, '.' or '..' part, no backslash, no control character, valid UTF-8, not manifest.json.
    """
    if not isinstance(name, str):
        return f"is {_show(name)}, not a file name (a string)"
    if not name:
        return "is empty: give the name of a file inside the release folder"
    bad = sorted({c for c in name if ord(c) < 32 or ord(c) == 127 or c == "\\"})
    if bad:
        return (f"is {_show(name)}: it contains {' '.join(repr(c) for c in bad)} (backslash or control characters); "
                "use '/' between folders and printable characters only")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return f"is {_show(name)}: not valid UTF-8 (a lone surrogate)"
    if name.startswith("/"):
        return f"is {_show(name)}, an absolute path: name a file inside the release folder, relative to it"
    parts = name.split("/")
    if ".." in parts:
        return f"is {_show(name)}: a '..' part climbs out of the release folder; name a file inside it"
    if "" in parts or "." in parts:
        return f"is {_show(name)}: an empty or '.' part; write the name as plain as 'model.onnx' or 'sub/model.onnx'"
    if name == MANIFEST_NAME:
        return f"is {MANIFEST_NAME}: the manifest cannot list itself"
    return None


def _number(key: str, value: Any, lo: float, hi: float, lo_open: bool = False, fix: str = REDEPLOY) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(key, f"is {_show(value)}, not a number", fix)
    if not math.isfinite(value):
        raise _bad(key, f"is {_show(value)}, not a finite number", fix)
    if value < lo or value > hi or (lo_open and value == lo):
        raise _bad(key, f"is {_show(value)}, outside {'(' if lo_open else '['}{lo:g}, {hi:g}]", fix)


def _integer(key: str, value: Any, lo: int, hi: int, fix: str = REDEPLOY) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(key, f"is {_show(value)}, not an integer", fix)
    if not lo <= value <= hi:
        raise _bad(key, f"is {_show(value)}, outside [{lo}, {hi}]", fix)


def _choice(key: str, value: Any, choices: Sequence[str]) -> None:
    if not isinstance(value, str) or value not in choices:
        problem = f"{_show(value)} unknown" if isinstance(value, str) else f"is {_show(value)}, not a string"
        raise _bad(key, problem, f"use one of {', '.join(choices)} ({REDEPLOY})")


def _inventory_fix(field_name: str) -> str:
    return f"fix {field_name} in inventory.yaml and redeploy"


def _check_variants(m: "Manifest") -> None:
    if not m.variants:
        raise _bad("variants", "is empty: the manifest lists no model variants; a release needs at least one model")
    seen = set()
    for i, v in enumerate(m.variants):
        key = f"variants[{i}]"
        if not isinstance(v.name, str) or not VARIANT_NAME.fullmatch(v.name):
            raise _bad(f"{key}.name", f"is {_show(v.name)}: a variant name is letters, digits, '_', '.', '-' "
                                      "(starting with a letter or digit)")
        if v.name in seen:
            raise _bad(f"{key}.name", f"is {v.name!r}, which an earlier variant already uses: names must be unique")
        seen.add(v.name)
        lo, hi = IMGSZ_RANGE
        _integer(f"{key}.imgsz", v.imgsz, lo, hi)
        if v.imgsz % 32:
            raise _bad(f"{key}.imgsz", f"is {v.imgsz}, not a multiple of 32 (the largest YOLOv8 stride)")
        for attr, role in (("model_file", "model"), ("trt_onnx_file", "trt_onnx"), ("fp16_onnx_file", "fp16_onnx")):
            name = getattr(v, attr)
            if name is None and attr != "model_file":
                continue
            problem = name_problem(name)
            if problem is not None:
                raise _bad(f"{key}.{attr}", problem)
            entry = m.files.get(name)
            if entry is None:
                raise _bad(f"{key}.{attr}", f"is {name!r}: variant '{v.name}' names {name}, which is not in its "
                                            "files list", f"list the file under 'files' ({REDEPLOY})")
            if entry.role != role:
                raise _bad(f"{key}.{attr}", f"is {name!r}, whose files entry has role {entry.role!r}, not {role!r}")


def _check_files(m: "Manifest") -> None:
    samples = []
    for name, e in sorted(m.files.items(), key=lambda kv: str(kv[0])):
        problem = name_problem(name)
        if problem is not None:
            raise _bad("files key", problem)
        key = f"files[{name!r}]"
        if not isinstance(e, FileEntry):
            raise _bad(key, f"is {_show(e)}, not a file entry (sha256, size, role)")
        if not isinstance(e.sha256, str) or not SHA256.fullmatch(e.sha256):
            raise _bad(f"{key}.sha256", f"is {_show(e.sha256)}, not 64 lowercase hex digits")
        _integer(f"{key}.size", e.size, 0, 1 << 62)
        _choice(f"{key}.role", e.role, ROLES)
        if e.role == "health_sample":
            samples.append(name)
    if len(samples) > 1:
        raise _bad("files", f"has {len(samples)} files with role health_sample ({', '.join(samples)}); "
                            "a release has at most one")


def _check_settings(m: "Manifest") -> None:
    o = m.ort
    _integer("ort.threads", o.threads, 1, MAX_THREADS, _inventory_fix("ort_threads"))
    _choice("ort.graph_optimization", o.graph_optimization, GRAPH_OPTIMIZATIONS)
    if not isinstance(o.providers, tuple) or not o.providers:
        shown = _show(o.providers) if o.providers else "empty"
        raise _bad("ort.providers", f"is {shown}: list at least one execution provider (CPUExecutionProvider runs "
                                    "everywhere)")
    for i, p in enumerate(o.providers):
        if not isinstance(p, str) or not p:
            raise _bad(f"ort.providers[{i}]", f"is {_show(p)}, not an execution provider name")
    if m.tensorrt is not None:
        _integer("tensorrt.workspace_mb", m.tensorrt.workspace_mb, 1, MAX_WORKSPACE_MB,
                 _inventory_fix("trt_workspace_mb"))
        if not isinstance(m.tensorrt.timing_cache, bool):
            raise _bad("tensorrt.timing_cache", f"is {_show(m.tensorrt.timing_cache)}, not true or false")
    elif m.backend == "tensorrt":
        raise _bad("tensorrt", "is missing: the manifest backend is tensorrt but it has no tensorrt settings "
                               "(workspace_mb)", _inventory_fix("trt_workspace_mb"))
    t = m.thermal
    if t is not None:
        _number("thermal.throttle_c", t.throttle_c, 0.0, MAX_TEMP_C, True, _inventory_fix("thermal_throttle_c"))
        _number("thermal.resume_c", t.resume_c, 0.0, MAX_TEMP_C, True, _inventory_fix("thermal_resume_c"))
        if t.resume_c >= t.throttle_c:
            raise _bad("thermal.resume_c", f"is {t.resume_c:g}, not below thermal.throttle_c ({t.throttle_c:g}): "
                                           "resume_c must be below throttle_c (hysteresis)",
                       _inventory_fix("thermal_resume_c"))
    p = m.postprocess
    _number("postprocess.conf", p.conf, 0.0, 1.0, fix=_inventory_fix("conf"))
    _number("postprocess.iou", p.iou, 0.0, 1.0, fix=_inventory_fix("iou"))
    _integer("postprocess.max_det", p.max_det, 1, MAX_DET, _inventory_fix("max_det"))


@dataclass(frozen=True)
class Manifest:
    """Everything a device needs to know about a release (checked when built; see the module docstring)."""

    release: str  # sha12 of the release content
    backend: str
    precision: str
    class_names: Tuple[str, ...]
    output_format: str  # "yolov8-raw" (decoded boxes) or a pre-DFL format (see postprocess)
    variants: Tuple[Variant, ...]  # first = preferred (largest); later = cooler fallbacks
    files: Dict[str, FileEntry]
    ort: OrtSettings
    tensorrt: Optional[TensorRTSettings]
    thermal: Optional[ThermalSettings]
    postprocess: PostprocessSettings
    source: Dict[str, str] = field(default_factory=dict)  # mlflow_run_id, git_commit, model_sha256...
    schema: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        _choice("backend", self.backend, BACKENDS)
        _choice("precision", self.precision, PRECISIONS)
        _choice("output_format", self.output_format, OUTPUT_FORMATS)
        if not self.class_names:
            raise _bad("class_names", "is empty: a detector needs at least one class name")
        for i, n in enumerate(self.class_names):
            if not isinstance(n, str) or not n:
                raise _bad(f"class_names[{i}]", f"is {_show(n)}, not a class name (a non-empty string)")
        _check_files(self)
        _check_variants(self)
        _check_settings(self)
        for k, v in self.source.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise _bad(f"source[{k!r}]", f"is {_show(v)}: source holds strings only (lineage tags)")

    def to_json(self) -> Dict[str, Any]:
        """The manifest as a JSON-able dict (a variant's fp16_onnx_file only where it has one, so a
        release without it has the same JSON, and sha12, as before the field existed)."""
        doc = asdict(self)
        for v in doc["variants"]:
            if v.get("fp16_onnx_file") is None:
                v.pop("fp16_onnx_file", None)
        return doc

    def health_sample(self) -> Optional[str]:
        """The bundled sample image `health` runs on, if the release has one."""
        for name, entry in sorted(self.files.items()):
            if entry.role == "health_sample":
                return name
        return None


# --------------------------------------------------------------------------------------------
# Reading the JSON form
# --------------------------------------------------------------------------------------------

_KINDS = ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"), (list, "a list"),
          (dict, "an object"))


def _kind(value: Any) -> str:
    """The JSON type of `value`, in words."""
    if value is None:
        return "null"
    for t, word in _KINDS:
        if isinstance(value, t):
            return word
    return type(value).__name__


def _describe(value: Any) -> str:
    """A JSON value for an error message: its type, and the value itself where it is short."""
    if value is None or isinstance(value, (list, dict)):
        return _kind(value)
    if isinstance(value, bool):
        return f"{'true' if value else 'false'} (a boolean)"
    return f"{_kind(value)} {_show(value)}"


_PLAIN_KEY = re.compile(r"\A[A-Za-z_][A-Za-z0-9_]*\Z")


def _join(parent: str, key: Any) -> str:
    """The dotted key of `key` under `parent` (`ort.threads`; an odd key quoted: `source['a b']`)."""
    if isinstance(key, str) and _PLAIN_KEY.fullmatch(key):
        return f"{parent}.{key}" if parent else key
    return f"{parent}[{key!r}]"


class _Reader:
    """Type checks of the JSON document; every error names the file and the dotted key."""

    def __init__(self, where: str) -> None:
        self.where = where

    def bad(self, key: str, problem: str, fix: str = REDEPLOY) -> ManifestError:
        return _bad(key, problem, fix, self.where)

    def obj(self, value: Any, key: str, required: Sequence[str], optional: Sequence[str] = ()) -> Dict[str, Any]:
        if not isinstance(value, dict):
            raise self.bad(key or "the document", f"is {_kind(value)}, not a JSON object")
        valid = (*required, *optional)
        unknown = [k for k in value if k not in valid]
        if unknown:
            raise self.bad(_join(key, unknown[0]),
                           f"is not a manifest key (valid{' under ' + key if key else ''}: {', '.join(valid)})",
                           "remove it, or deploy with a workstation version that matches this runtime")
        missing = [k for k in required if k not in value]
        if missing:
            raise ManifestError(f"{self.where}: missing key '{_join(key, missing[0])}'; {REDEPLOY}")
        return value

    def text(self, value: Any, key: str) -> str:
        if not isinstance(value, str):
            raise self.bad(key, f"is {_describe(value)}, not a string")
        return value

    def opt_text(self, value: Any, key: str) -> Optional[str]:
        return None if value is None else self.text(value, key)

    def integer(self, value: Any, key: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.bad(key, f"is {_describe(value)}, not an integer")
        return value

    def number(self, value: Any, key: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.bad(key, f"is {_describe(value)}, not a number")
        try:
            out = float(value)
        except OverflowError:  # an integer too large for a float
            raise self.bad(key, f"is {_show(value)}, too large") from None
        if not math.isfinite(out):
            raise self.bad(key, f"is {_show(value)}, not a finite number")
        return out

    def boolean(self, value: Any, key: str) -> bool:
        if not isinstance(value, bool):
            raise self.bad(key, f"is {_describe(value)}, not true or false")
        return value

    def array(self, value: Any, key: str) -> List[Any]:
        if not isinstance(value, list):
            raise self.bad(key, f"is {_kind(value)}, not a list")
        return value

    def strings(self, value: Any, key: str) -> Tuple[str, ...]:
        return tuple(self.text(v, f"{key}[{i}]") for i, v in enumerate(self.array(value, key)))

    def variant(self, value: Any, key: str) -> Variant:
        d = self.obj(value, key, ("name", "imgsz", "model_file"), ("trt_onnx_file", "fp16_onnx_file"))
        return Variant(self.text(d["name"], f"{key}.name"), self.integer(d["imgsz"], f"{key}.imgsz"),
                       self.text(d["model_file"], f"{key}.model_file"),
                       self.opt_text(d.get("trt_onnx_file"), f"{key}.trt_onnx_file"),
                       self.opt_text(d.get("fp16_onnx_file"), f"{key}.fp16_onnx_file"))

    def file_entry(self, value: Any, key: str) -> FileEntry:
        d = self.obj(value, key, ("sha256", "size", "role"))
        return FileEntry(self.text(d["sha256"], f"{key}.sha256"), self.integer(d["size"], f"{key}.size"),
                         self.text(d["role"], f"{key}.role"))

    def ort(self, value: Any) -> OrtSettings:
        d = self.obj(value, "ort", ("threads",), ("graph_optimization", "providers"))
        return OrtSettings(self.integer(d["threads"], "ort.threads"),
                           self.text(d.get("graph_optimization", "all"), "ort.graph_optimization"),
                           self.strings(d.get("providers", ["CPUExecutionProvider"]), "ort.providers"))

    def tensorrt(self, value: Any) -> Optional[TensorRTSettings]:
        if value is None:
            return None
        d = self.obj(value, "tensorrt", ("workspace_mb",), ("timing_cache",))
        return TensorRTSettings(self.integer(d["workspace_mb"], "tensorrt.workspace_mb"),
                                self.boolean(d.get("timing_cache", True), "tensorrt.timing_cache"))

    def thermal(self, value: Any) -> Optional[ThermalSettings]:
        if value is None:
            return None
        d = self.obj(value, "thermal", ("throttle_c", "resume_c"))
        return ThermalSettings(self.number(d["throttle_c"], "thermal.throttle_c"),
                               self.number(d["resume_c"], "thermal.resume_c"))

    def postprocess(self, value: Any) -> PostprocessSettings:
        d = self.obj(value, "postprocess", ("conf", "iou", "max_det"))
        return PostprocessSettings(self.number(d["conf"], "postprocess.conf"), self.number(d["iou"], "postprocess.iou"),
                                   self.integer(d["max_det"], "postprocess.max_det"))

    def mapping(self, value: Any, key: str) -> Dict[str, Any]:
        if not isinstance(value, dict):
            raise self.bad(key, f"is {_kind(value)}, not a JSON object")
        return value

    def source(self, value: Any) -> Dict[str, str]:
        return {k: self.text(v, _join("source", k)) for k, v in self.mapping(value, "source").items()}


_REQUIRED = ("schema", "release", "backend", "precision", "class_names", "output_format", "variants", "files",
             "ort", "postprocess")
_OPTIONAL = ("tensorrt", "thermal", "source")


def manifest_from_json(doc: Any, where: str = MANIFEST_NAME) -> Manifest:
    """Build a Manifest from its JSON form; any problem is a ManifestError naming `where`, the key and the fix."""
    r = _Reader(where)
    if not isinstance(doc, dict):
        raise r.bad("the document", f"is {_kind(doc)}, not a JSON object of release settings")
    schema = doc.get("schema")
    if type(schema) is not int or schema != SCHEMA_VERSION:  # not true, not 1.0
        raise ManifestError(f"{where}: schema {_show(schema)} but this runtime reads schema {SCHEMA_VERSION}; "
                            "redeploy with a matching workstation version")
    d = r.obj(doc, "", _REQUIRED, _OPTIONAL)
    release = r.text(d["release"], "release")
    if not RELEASE_ID.fullmatch(release):
        raise r.bad("release", f"is {_show(release)}, not a release id (12 lowercase hex digits)")
    files = r.mapping(d["files"], "files")
    try:
        return Manifest(
            release=release,
            backend=r.text(d["backend"], "backend"),
            precision=r.text(d["precision"], "precision"),
            class_names=r.strings(d["class_names"], "class_names"),
            output_format=r.text(d["output_format"], "output_format"),
            variants=tuple(r.variant(v, f"variants[{i}]") for i, v in enumerate(r.array(d["variants"], "variants"))),
            files={k: r.file_entry(v, f"files[{k!r}]") for k, v in files.items()},
            ort=r.ort(d["ort"]),
            tensorrt=r.tensorrt(d.get("tensorrt")),
            thermal=r.thermal(d.get("thermal")),
            postprocess=r.postprocess(d["postprocess"]),
            source=r.source(d.get("source", {})),
            schema=SCHEMA_VERSION,
        )
    except ManifestError as e:
        msg = str(e)
        if msg.startswith(_SELF + ": "):  # a value check of Manifest: say which file it is in
            raise ManifestError(f"{where}: {msg[len(_SELF) + 2:]}") from None
        raise


def _no_duplicates(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ManifestError(f"key {k!r} appears twice in one object")
        out[k] = v
    return out


def load_manifest(release_dir: "os.PathLike[str] | str") -> Manifest:
    """Read and validate `<release_dir>/manifest.json`."""
    path = Path(release_dir) / MANIFEST_NAME
    try:
        doc = json.loads(path.read_bytes().decode("utf-8"), object_pairs_hook=_no_duplicates)
    except FileNotFoundError as e:
        raise ManifestError(f"{path}: not found; is {release_dir} a release folder?") from e
    except OSError as e:
        raise ManifestError(f"{path}: cannot be read ({e.strerror or e}); redeploy the release") from e
    except ManifestError as e:
        raise ManifestError(f"{path}: {e}; {REDEPLOY}") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, absurd nesting
        raise ManifestError(f"{path}: not valid JSON ({e}); redeploy the release") from None
    return manifest_from_json(doc, str(path))


def save_manifest(manifest: Manifest, release_dir: "os.PathLike[str] | str") -> Path:
    """Write `manifest.json` atomically into `release_dir`."""
    path = Path(release_dir) / MANIFEST_NAME
    atomic_write_json(path, manifest.to_json())
    return path


def _inside(path: str, root: str) -> bool:
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:
        return False


def verify_files(manifest: Manifest, release_dir: "os.PathLike[str] | str") -> List[str]:
    """Return a list of problems (a file missing, outside the release, of the wrong size or sha256);
    empty means intact."""
    problems = []
    root = Path(release_dir)
    real_root = os.path.realpath(root)
    for name, entry in sorted(manifest.files.items()):
        bad_name = name_problem(name)
        if bad_name is not None:  # Manifest refuses these; a files dict changed afterwards gets here
            problems.append(f"{name!r}: the name {bad_name}")
            continue
        f = root / name
        try:
            real = os.path.realpath(f)
            if not _inside(real, real_root):
                problems.append(f"{name}: resolves to {real}, outside the release folder {real_root} (a symlink); "
                                "redeploy the release")
            elif not f.exists():
                problems.append(f"{name}: missing")
            elif not f.is_file():
                problems.append(f"{name}: not a regular file; redeploy the release")
            elif f.stat().st_size != entry.size:
                problems.append(f"{name}: size {f.stat().st_size} != {entry.size}")
            elif sha256_file(f) != entry.sha256:
                problems.append(f"{name}: sha256 mismatch")
        except OSError as e:
            problems.append(f"{name}: cannot be read ({e.strerror or e}); redeploy the release")
    return problems
