"""A release on the device turned into something that detects: manifest + variant -> backend +
preprocess + postprocess. Shared by `health`, `bench`, `run` and `build-engine`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np

from .backends import Backend, BackendError, create_backend
from .manifest import Manifest, Variant
from .postprocess import Detections, HeadSpec, postprocess_one, spec_from_metadata
from .preprocess import preprocess


class ReleaseError(ValueError):
    """A release folder or variant that cannot be used as given."""


def resolve_release(release_dir: "Path | str") -> Path:
    """The real release folder (follows `current`/`previous` symlinks), or ReleaseError."""
    path = Path(release_dir)
    if not path.is_dir():
        raise ReleaseError(f"release folder {path} not found; "
                           "pass --release <deploy_dir>/current or a releases/<sha12>")
    return path.resolve()


def default_engines_dir(release_dir: Path) -> Optional[Path]:
    """`<deploy_dir>/engines` when the release sits at `<deploy_dir>/releases/<sha12>`, else None."""
    if release_dir.parent.name == "releases":
        return release_dir.parent.parent / "engines"
    return None


def select_variant(manifest: Manifest, name: Optional[str]) -> Variant:
    """The named variant, or the manifest's first (preferred) one."""
    if name is None:
        return manifest.variants[0]
    for v in manifest.variants:
        if v.name == name:
            return v
    raise ReleaseError(f"variant '{name}' not in this release (has {', '.join(v.name for v in manifest.variants)}); "
                       "pass one of those to --variant")


def backend_model_file(manifest: Manifest, variant: Variant) -> str:
    """Which shipped file the manifest's backend loads: TensorRT INT8 builds from the QDQ ONNX."""
    if manifest.backend == "tensorrt" and manifest.precision == "int8":
        if variant.trt_onnx_file is None:
            raise ReleaseError(f"variant '{variant.name}' has no trt_onnx_file (symmetric-QDQ ONNX) for TensorRT "
                               "INT8; redeploy with the quantize stage's TensorRT model")
        return variant.trt_onnx_file
    return variant.model_file


@dataclass(frozen=True)
class StageTimes:
    """Seconds spent in each step of one detection."""

    preprocess: float
    infer: float
    postprocess: float

    @property
    def total(self) -> float:
        """Sum of the three steps."""
        return self.preprocess + self.infer + self.postprocess


class Detector:
    """One loaded variant: image in, detections (source pixels) out, with step timings."""

    def __init__(self, backend: Backend, spec: HeadSpec, conf: float, iou: float, max_det: int,
                 variant: Optional[Variant] = None) -> None:
        self.backend = backend
        self.spec = spec
        self.conf, self.iou, self.max_det = conf, iou, max_det
        self.variant = variant

    @property
    def name(self) -> str:
        """The variant name (or the imgsz when built without a manifest)."""
        return self.variant.name if self.variant is not None else str(self.spec.imgsz)

    def infer_raw(self, image: np.ndarray) -> Tuple[np.ndarray, Any]:
        """Preprocess + infer; returns the first output (B, C, N) and the letterbox."""
        tensor, lb = preprocess(image, self.spec.imgsz)
        return self.backend.infer(tensor)[0], lb

    def detect(self, image: np.ndarray) -> Tuple[Detections, StageTimes]:
        """Detect on one BGR image; timings split into preprocess / infer / postprocess."""
        t0 = time.perf_counter()
        tensor, lb = preprocess(image, self.spec.imgsz)
        t1 = time.perf_counter()
        out = self.backend.infer(tensor, copy=False)[0]
        t2 = time.perf_counter()
        dets = postprocess_one(out[0], self.spec, self.conf, self.iou, self.max_det, lb)
        t3 = time.perf_counter()
        return dets, StageTimes(t1 - t0, t2 - t1, t3 - t2)

    def describe(self) -> Dict[str, Any]:
        """Backend description plus the decode spec."""
        d = dict(self.backend.describe())
        d.update(variant=self.name, imgsz=self.spec.imgsz, output_format=self.spec.output_format,
                 conf=self.conf, iou=self.iou, max_det=self.max_det)
        return d


def load_detector(release_dir: Path, manifest: Manifest, variant: Variant,
                  engines_dir: Optional[Path] = None) -> Detector:
    """Create and load the manifest's backend for `variant`; check the model matches the manifest."""
    model = release_dir / backend_model_file(manifest, variant)
    trt = manifest.tensorrt
    # TensorRT 11 builds fp16 engines from the FP16 ONNX (no FP16 builder flag there); 8.5/10 ignore it.
    fp16 = release_dir / variant.fp16_onnx_file if variant.fp16_onnx_file else None
    backend = create_backend(manifest.backend, model, manifest.ort, engines_dir, manifest.precision,
                             trt.workspace_mb if trt else 0, trt.timing_cache if trt else True, fp16)
    backend.load()
    spec = spec_from_metadata(backend.metadata, manifest.output_format, len(manifest.class_names), variant.imgsz)
    shape = backend.input_shape
    if len(shape) != 4 or shape[2:] != (variant.imgsz, variant.imgsz):
        raise BackendError(f"{model.name} takes input {shape} but variant '{variant.name}' says imgsz "
                           f"{variant.imgsz}; redeploy the release with matching files")
    pp = manifest.postprocess
    return Detector(backend, spec, pp.conf, pp.iou, pp.max_det, variant)
