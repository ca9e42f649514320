"""Assemble a release folder (model files + health sample + manifest.json) from local files.

The fleet assembles real releases on the workstation; this device-side helper makes the same
layout for local benchmarks (benchmarks/realtime.py) and tests, so they exercise exactly what a
device sees. The release id is the first 12 hex digits of a sha256 over the files' names and
hashes and the manifest settings, so identical content gives an identical id.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

from .backends import parse_names
from .fileio import sha256_file
from .manifest import (
    FileEntry,
    Manifest,
    OrtSettings,
    PostprocessSettings,
    TensorRTSettings,
    ThermalSettings,
    Variant,
    save_manifest,
)


@dataclass(frozen=True)
class VariantFiles:
    """One variant to put into a release: its name, imgsz and local model file(s)."""

    name: str
    imgsz: int
    model: Path
    trt_onnx: Optional[Path] = None


def model_class_names(model: Path) -> Tuple[str, ...]:
    """Class names from an ONNX model's Ultralytics metadata."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    meta = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"]).get_modelmeta()
    names = meta.custom_metadata_map.get("names")
    if names is None:
        raise ValueError(f"{model} has no 'names' metadata; export it with pipeline/stages/export.py")
    return parse_names(names)


def assemble_release(out_dir: Path, variants: Sequence[VariantFiles], health_sample: Optional[Path],
                     class_names: Optional[Sequence[str]] = None, backend: str = "onnxruntime",
                     precision: str = "fp32", output_format: str = "yolov8-raw",
                     ort: OrtSettings = OrtSettings(threads=2), tensorrt: Optional[TensorRTSettings] = None,
                     thermal: Optional[ThermalSettings] = None,
                     postprocess: PostprocessSettings = PostprocessSettings(0.25, 0.45, 100),
                     source: Optional[Dict[str, str]] = None) -> Manifest:
    """Copy the files into `out_dir` (flat, one name per variant) and write manifest.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files: Dict[str, FileEntry] = {}
    shipped = []

    def ship(src: Path, name: str, role: str) -> str:
        if not src.is_file():
            raise ValueError(f"{src} not found; build the model (dvc repro) or pass an existing file")
        dest = out_dir / name
        if src.resolve() != dest.resolve():
            shutil.copyfile(src, dest)
        files[name] = FileEntry(sha256_file(dest), dest.stat().st_size, role)
        return name

    for v in variants:
        model = ship(v.model, f"model-{v.name}{v.model.suffix}", "model")
        trt = ship(v.trt_onnx, f"model-{v.name}.trt.onnx", "trt_onnx") if v.trt_onnx is not None else None
        shipped.append(Variant(v.name, v.imgsz, model, trt))
    if health_sample is not None:
        ship(health_sample, f"health_sample{health_sample.suffix}", "health_sample")
    names = tuple(class_names) if class_names is not None else model_class_names(variants[0].model)
    manifest = Manifest(release="0" * 12, backend=backend, precision=precision, class_names=names,
                        output_format=output_format, variants=tuple(shipped), files=files, ort=ort,
                        tensorrt=tensorrt, thermal=thermal, postprocess=postprocess, source=dict(source or {}))
    digest = hashlib.sha256(json.dumps(manifest.to_json(), sort_keys=True).encode()).hexdigest()[:12]
    manifest = replace(manifest, release=digest)
    save_manifest(manifest, out_dir)
    return manifest
