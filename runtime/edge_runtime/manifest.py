"""The release manifest: the contract between the workstation (fleet deploy) and the device.

A release is a folder `<deploy_dir>/releases/<sha12>/` holding model files and `manifest.json`.
The fleet writes the manifest; the device runtime reads it and never guesses: which backend,
which precision, which file, how many threads, the TensorRT workspace, thermal thresholds and
postprocessing thresholds all come from here. `verify_files` checks every listed file's sha256
before a release may become `current`.

Python 3.8+, stdlib only (runs on the device's own Python).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from .fileio import atomic_write_json, sha256_file

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
BACKENDS = ("onnxruntime", "tensorrt")
PRECISIONS = ("fp32", "fp16", "int8")


class ManifestError(ValueError):
    """A manifest that is missing, malformed or inconsistent with the files beside it."""


@dataclass(frozen=True)
class FileEntry:
    """One file of the release: its content hash, size and role."""

    sha256: str
    size: int
    role: str  # model | trt_onnx | health_sample | other


@dataclass(frozen=True)
class Variant:
    """One shipped model variant (thermal-adaptive mode switches between them)."""

    name: str  # e.g. "416", "320"
    imgsz: int
    model_file: str  # what ORT loads / what TensorRT builds from
    trt_onnx_file: Optional[str] = None  # symmetric-QDQ ONNX for TensorRT INT8 (explicit quantization)


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


@dataclass(frozen=True)
class Manifest:
    """Everything a device needs to know about a release."""

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
        if self.backend not in BACKENDS:
            raise ManifestError(f"manifest backend '{self.backend}' unknown; use one of {', '.join(BACKENDS)}")
        if self.precision not in PRECISIONS:
            raise ManifestError(f"manifest precision '{self.precision}' unknown; use one of {', '.join(PRECISIONS)}")
        if not self.variants:
            raise ManifestError("manifest lists no model variants; a release needs at least one model")
        for v in self.variants:
            for f in (v.model_file, v.trt_onnx_file):
                if f is not None and f not in self.files:
                    raise ManifestError(f"manifest variant '{v.name}' names {f}, which is not in its files list")
        if self.backend == "tensorrt" and self.tensorrt is None:
            raise ManifestError("manifest backend is tensorrt but it has no tensorrt settings (workspace_mb)")
        if self.thermal is not None and self.thermal.resume_c >= self.thermal.throttle_c:
            raise ManifestError("manifest thermal.resume_c must be below thermal.throttle_c (hysteresis)")

    def to_json(self) -> Dict[str, Any]:
        """The manifest as a JSON-able dict."""
        return asdict(self)

    def health_sample(self) -> Optional[str]:
        """The bundled sample image `health` runs on, if the release has one."""
        for name, entry in sorted(self.files.items()):
            if entry.role == "health_sample":
                return name
        return None


def manifest_from_json(doc: Dict[str, Any], where: str = MANIFEST_NAME) -> Manifest:
    """Build a Manifest from its JSON form, with errors that name the bad key."""
    try:
        if doc.get("schema") != SCHEMA_VERSION:
            raise ManifestError(
                f"{where}: schema {doc.get('schema')!r} but this runtime reads schema {SCHEMA_VERSION}; "
                "redeploy with a matching workstation version"
            )
        return Manifest(
            release=str(doc["release"]),
            backend=str(doc["backend"]),
            precision=str(doc["precision"]),
            class_names=tuple(doc["class_names"]),
            output_format=str(doc["output_format"]),
            variants=tuple(Variant(**v) for v in doc["variants"]),
            files={k: FileEntry(**v) for k, v in doc["files"].items()},
            ort=OrtSettings(**{**doc["ort"],
                               "providers": tuple(doc["ort"].get("providers", ("CPUExecutionProvider",)))}),
            tensorrt=TensorRTSettings(**doc["tensorrt"]) if doc.get("tensorrt") else None,
            thermal=ThermalSettings(**doc["thermal"]) if doc.get("thermal") else None,
            postprocess=PostprocessSettings(**doc["postprocess"]),
            source=dict(doc.get("source", {})),
            schema=int(doc["schema"]),
        )
    except KeyError as e:
        raise ManifestError(f"{where}: missing key {e.args[0]!r}; redeploy the release") from e
    except TypeError as e:
        raise ManifestError(f"{where}: malformed entry ({e}); redeploy the release") from e


def load_manifest(release_dir: "os.PathLike[str] | str") -> Manifest:
    """Read and validate `<release_dir>/manifest.json`."""
    path = Path(release_dir) / MANIFEST_NAME
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ManifestError(f"{path}: not found; is {release_dir} a release folder?") from e
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: not valid JSON ({e}); redeploy the release") from e
    return manifest_from_json(doc, str(path))


def save_manifest(manifest: Manifest, release_dir: "os.PathLike[str] | str") -> Path:
    """Write `manifest.json` atomically into `release_dir`."""
    path = Path(release_dir) / MANIFEST_NAME
    atomic_write_json(path, manifest.to_json())
    return path


def verify_files(manifest: Manifest, release_dir: "os.PathLike[str] | str") -> List[str]:
    """Return a list of problems (missing file, size or sha256 mismatch); empty means intact."""
    problems = []
    root = Path(release_dir)
    for name, entry in sorted(manifest.files.items()):
        f = root / name
        if not f.is_file():
            problems.append(f"{name}: missing")
        elif f.stat().st_size != entry.size:
            problems.append(f"{name}: size {f.stat().st_size} != {entry.size}")
        elif sha256_file(f) != entry.sha256:
            problems.append(f"{name}: sha256 mismatch")
    return problems
