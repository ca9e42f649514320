"""Resolve what each host gets, and build its content-addressed release.

A release is identified by `sha12`: the first 12 hex digits of the sha256 of its manifest
(without the `release` field). The manifest lists every file's sha256, the settings the device
uses and the runtime code's hash, so identical content gives the identical name on every run,
and a redeploy finds everything already on the device.

Which model files a host gets (from its runtime and precision):
  onnxruntime int8  models/<model>.int8.onnx       (from `dvc repro quantize`)
  onnxruntime fp32  models/<model>.onnx
  tensorrt fp32     models/<model>.onnx            (the engine is built on the device)
  tensorrt fp16     models/<model>.onnx + models/<model>.fp16.onnx (from `dvc repro export`):
                    TensorRT 8.5/10 build FP16 from the FP32 ONNX with the builder flag, TensorRT 11
                    (no FP16 flag: strongly typed networks) from the FP16 ONNX, the manifest's
                    variant field `fp16_onnx_file` (file role `fp16_onnx`)
  tensorrt int8     models/<model>.onnx + models/<model>.int8.trt.onnx (symmetric QDQ)
"""

from __future__ import annotations

import ast
import hashlib
import json
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping

from edge_runtime.fileio import atomic_write_json, sha256_file
from edge_runtime.manifest import (
    MANIFEST_NAME,
    FileEntry,
    Manifest,
    OrtSettings,
    PostprocessSettings,
    TensorRTSettings,
    ThermalSettings,
    Variant,
)
from pipeline.config import paths
from pipeline.fleet.inventory import SAFE_NAME, Host
from pipeline.onnx_models.load import ModelFileError, class_names, onnx_metadata

RUNTIME_PACKAGE = "edge_runtime"  # the import name the device runs: python -m edge_runtime
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
_hash_cache: dict[tuple[str, int, int], str] = {}


class ArtifactError(ValueError):
    """A file a release needs is missing or unusable; the message says which stage makes it."""


@dataclass(frozen=True)
class Sources:
    """Where the workstation's artifacts live (defaults: the repository layout in paths.py)."""

    models_dir: Path
    samples_dir: Path  # images for the health check (the val split)
    runtime_root: Path  # the device runtime's source tree (runtime/: pyproject.toml + edge_runtime/)

    @classmethod
    def default(cls) -> "Sources":
        """The repository's own models/, data/defects/images/val and runtime/."""
        root = paths.repo_root()
        return cls(models_dir=root / paths.ONNX_MODEL.parent, samples_dir=root / paths.DATASET_DIR / "images" / "val",
                   runtime_root=root / paths.RUNTIME_DIR)


@dataclass(frozen=True)
class Bundle:
    """A set of files to put under one content-addressed folder on the device."""

    name: str  # sha12
    files: Mapping[str, Path]  # relative name on the device -> local file
    entries: Mapping[str, tuple[str, int]]  # relative name -> (sha256, size)

    def model_bytes(self, names: list[str] | None = None) -> int:
        """Bytes of model files (.onnx) among `names` (default: all)."""
        chosen = self.entries if names is None else names
        return sum(self.entries[n][1] for n in chosen if n.endswith(".onnx"))


@dataclass(frozen=True)
class Release:
    """What one host gets: the runtime bundle, the release bundle and its manifest."""

    runtime: Bundle
    bundle: Bundle
    manifest: Manifest
    model_file: str
    trt_onnx_file: str | None
    fp16_onnx_file: str | None = None


@dataclass(frozen=True)
class ModelFiles:
    """The model files one host's release ships (see the module docstring)."""

    model: Path  # what ORT loads / what TensorRT builds from (manifest: variants[].model_file)
    trt_onnx: Path | None = None  # TensorRT INT8: the symmetric-QDQ ONNX (variants[].trt_onnx_file)
    fp16_onnx: Path | None = None  # TensorRT FP16: the FP16 ONNX for TensorRT 11 (variants[].fp16_onnx_file)


def cached_sha256(path: Path) -> str:
    """sha256 of a file, memoised on (path, size, mtime) so 32 hosts hash a model once."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _hash_cache:
        _hash_cache[key] = sha256_file(path)
    return _hash_cache[key]


def runtime_bundle(runtime_root: Path) -> Bundle:
    """The device runtime's source tree: `pyproject.toml`, `README.md` and `edge_runtime/` (no caches).

    Exactly the `edge-defect-runtime` distribution, so the device can run it in place
    (`python -m edge_runtime` from that folder) or `pip install` it from there.
    """
    package = runtime_root / RUNTIME_PACKAGE
    if not (runtime_root / "pyproject.toml").is_file() or not (package / "__init__.py").is_file():
        raise ArtifactError(f"{runtime_root} is not the device runtime's source tree (pyproject.toml + "
                            f"{RUNTIME_PACKAGE}/); pass the repository's runtime/ folder")
    files = {name: runtime_root / name for name in ("pyproject.toml", "README.md") if (runtime_root / name).is_file()}
    for path in sorted(package.rglob("*")):
        rel = path.relative_to(runtime_root).as_posix()
        if path.is_file() and "__pycache__" not in path.parts and not path.name.endswith((".pyc", ".pyo")):
            files[rel] = path
    entries = {rel: (cached_sha256(p), p.stat().st_size) for rel, p in files.items()}
    digest = hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()
    return Bundle(digest[:12], files, entries)


def model_paths(models_dir: Path, model: str) -> dict[str, Path]:
    """The FP32, INT8 (ORT), symmetric-QDQ (TensorRT INT8) and FP16 (TensorRT 11 FP16) files of model `model`."""
    if not SAFE_NAME.match(model) or model.endswith(".onnx"):
        raise ArtifactError(f"--model {model!r}: give a model name such as 'yolov8n' (files models/<name>.onnx, "
                            "models/<name>.int8.onnx); letters, digits, '_', '.', '-' only")
    return {"fp32": models_dir / f"{model}.onnx", "int8": models_dir / f"{model}.int8.onnx",
            "int8_trt": models_dir / f"{model}.int8.trt.onnx", "fp16": models_dir / f"{model}.fp16.onnx"}


def _require(path: Path, what: str, fix: str) -> Path:
    if not path.is_file():
        raise ArtifactError(f"{path} not found: {what}; {fix}")
    return path


def release_model_files(host: Host, models_dir: Path, model: str) -> ModelFiles:
    """Every model file this host's release ships, for its runtime and precision; ArtifactError
    naming the stage that makes a missing one."""
    files = model_paths(models_dir, model)
    fp32_fix = "run `dvc repro export` (or pick another model with --model)"
    if host.runtime == "onnxruntime":
        if host.precision == "int8":
            return ModelFiles(_require(files["int8"], f"{host.name} runs ONNX Runtime INT8",
                                       "run `dvc repro quantize` to produce it (or set the host's precision to fp32)"))
        return ModelFiles(_require(files["fp32"], f"{host.name} runs ONNX Runtime FP32", fp32_fix))
    fp32 = _require(files["fp32"], f"{host.name} builds a TensorRT engine from the FP32 ONNX", fp32_fix)
    if host.precision == "int8":
        return ModelFiles(fp32, trt_onnx=_require(
            files["int8_trt"], f"{host.name} builds a TensorRT INT8 engine from the symmetric-QDQ ONNX",
            "run `dvc repro quantize` to produce it (or use precision fp16)"))
    if host.precision == "fp16":
        # Both: which one the engine is built from depends on the device's TensorRT version, which
        # the workstation does not know (8.5/10: the FP32 ONNX + FP16 flag; 11: the FP16 ONNX).
        return ModelFiles(fp32, fp16_onnx=_require(
            files["fp16"], f"{host.name} runs TensorRT FP16, which TensorRT 11 builds from the FP16 ONNX",
            "run `dvc repro export` to produce it beside the FP32 ONNX (or use precision fp32)"))
    return ModelFiles(fp32)


def select_model_files(host: Host, models_dir: Path, model: str) -> tuple[Path, Path | None]:
    """(model file, symmetric-QDQ file or None) for this host's runtime and precision, after checking
    that every file its release ships exists (`release_model_files`, which also names the FP16 ONNX)."""
    files = release_model_files(host, models_dir, model)
    return files.model, files.trt_onnx


def model_metadata(path: Path, stage: str) -> dict[str, str]:
    """The metadata_props of a model the release ships (class names, imgsz, output_format...)."""
    try:
        return onnx_metadata(path, stage)
    except ModelFileError as e:
        raise ArtifactError(str(e)) from e


def model_description(model_file: Path, fp32_file: Path) -> tuple[tuple[str, ...], int, str]:
    """(class names, imgsz, output_format) from the shipped model, falling back to the FP32 model."""
    meta = model_metadata(model_file, "quantize" if model_file != fp32_file else "export")
    if "names" not in meta or "imgsz" not in meta:
        meta = {**model_metadata(fp32_file, "export"), **meta}
    try:
        names = class_names(meta, model_file, "export")
        imgsz = ast.literal_eval(meta["imgsz"])
        size = int(imgsz[0] if isinstance(imgsz, (list, tuple)) else imgsz)
    except (ModelFileError, KeyError, ValueError, SyntaxError, TypeError, IndexError) as e:
        raise ArtifactError(f"{model_file}: ONNX metadata lacks usable 'names'/'imgsz' ({e}); export it with "
                            "`dvc repro export`") from e
    return names, size, meta.get("output_format", "yolov8-raw")


def health_sample(samples_dir: Path) -> Path:
    """The first (sorted) image of the val split: what `health` runs one inference on."""
    images = sorted(p for p in samples_dir.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES) \
        if samples_dir.is_dir() else []
    if not images:
        raise ArtifactError(f"{samples_dir} has no images for the release's health sample; run `dvc repro data`")
    return images[0]


def source_lineage(model_sha256: str) -> dict[str, str]:
    """Where the model with this sha256 came from: the producing pipeline run and its lineage tags.

    Returns `mlflow_run_id` plus the producer's `LINEAGE_CARRIED` tags (dataset/weights/ONNX/
    calibration sha256s, git commit, params hash), or {} when no pipeline run produced this file
    (a model copied in by hand). They go into the release manifest and every device run.
    """
    import mlflow  # lazy: costs seconds to import, needed once per deploy

    from pipeline.tracking.mlflow_runs import LINEAGE_CARRIED, check_server_reachable, experiment_name, tracking_uri

    check_server_reachable(tracking_uri())  # a down server: a clear error now, not minutes of retries
    client = mlflow.MlflowClient(tracking_uri())
    exp = client.get_experiment_by_name(experiment_name())
    if exp is None:
        return {}
    # The producer tags the file under its own key: int8/trt_onnx/dynamic (quantize), onnx (export).
    for key in ("int8_sha256", "trt_onnx_sha256", "dynamic_sha256", "onnx_sha256", "model_sha256"):
        runs = client.search_runs([exp.experiment_id], f"tags.{key} = '{model_sha256}'",
                                  order_by=["attributes.start_time DESC"], max_results=50)
        # Fleet and evaluate/benchmark runs carry the sha too (they consumed it): keep producers.
        producers = [r for r in runs if r.data.tags.get("stage") in ("quantize", "export", "train")]
        if producers:
            run = producers[0]
            tags = {k: run.data.tags[k] for k in LINEAGE_CARRIED if run.data.tags.get(k)}
            return {"mlflow_run_id": run.info.run_id, "source_stage": run.data.tags["stage"], **tags}
    return {}


def build_release(host: Host, sources: Sources, model: str, runtime: Bundle,
                  lineage: Mapping[str, str] | None = None) -> Release:
    """The release this host gets: files, manifest and content address (nothing written yet)."""
    shipped = release_model_files(host, sources.models_dir, model)
    model_file, trt_file, fp16_file = shipped.model, shipped.trt_onnx, shipped.fp16_onnx
    fp32 = model_paths(sources.models_dir, model)["fp32"]
    class_names, imgsz, output_format = model_description(model_file, fp32)
    sample = health_sample(sources.samples_dir)
    files: dict[str, Path] = {model_file.name: model_file}
    roles = {model_file.name: "model"}
    if trt_file is not None:
        files[trt_file.name] = trt_file
        roles[trt_file.name] = "trt_onnx"
    if fp16_file is not None:
        files[fp16_file.name] = fp16_file
        roles[fp16_file.name] = "fp16_onnx"
    sample_name = "health_sample" + sample.suffix.lower()
    files[sample_name] = sample
    roles[sample_name] = "health_sample"
    entries = {name: FileEntry(cached_sha256(p), p.stat().st_size, roles[name]) for name, p in files.items()}
    model_sha = entries[model_file.name].sha256
    source = {"model": model, "model_sha256": model_sha, "runtime": runtime.name}
    source.update({k: v for k, v in (lineage or {}).items() if v})
    manifest = Manifest(
        release="",
        backend=host.runtime,
        precision=host.precision,
        class_names=class_names,
        output_format=output_format,
        variants=(Variant(str(imgsz), imgsz, model_file.name, trt_file.name if trt_file else None,
                          fp16_file.name if fp16_file else None),),
        files=entries,
        ort=OrtSettings(threads=host.ort_threads),
        tensorrt=TensorRTSettings(workspace_mb=host.trt_workspace_mb) if host.runtime == "tensorrt" else None,
        thermal=ThermalSettings(host.thermal_throttle_c, host.thermal_resume_c),
        postprocess=PostprocessSettings(host.conf, host.iou, host.max_det),
        source=source,
    )
    digest = hashlib.sha256(json.dumps(manifest.to_json(), sort_keys=True).encode()).hexdigest()
    manifest = replace(manifest, release=digest[:12])
    bundle = Bundle(manifest.release, files, {n: (e.sha256, e.size) for n, e in entries.items()})
    return Release(runtime, bundle, manifest, model_file.name, trt_file.name if trt_file else None,
                   fp16_file.name if fp16_file else None)


def materialize_manifest(release: Release, workdir: Path) -> Release:
    """Write the release's manifest.json into `workdir` and add it to the bundle's files."""
    folder = workdir / release.manifest.release
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / MANIFEST_NAME
    if not path.is_file():
        atomic_write_json(path, release.manifest.to_json())
    files = {**release.bundle.files, MANIFEST_NAME: path}
    entries = {**release.bundle.entries, MANIFEST_NAME: (cached_sha256(path), path.stat().st_size)}
    return replace(release, bundle=Bundle(release.bundle.name, files, entries))


def new_workdir() -> tempfile.TemporaryDirectory:
    """A temp folder for manifests of one fleet command (cleaned up by the caller)."""
    return tempfile.TemporaryDirectory(prefix="fleet-")


def utc_stamp() -> str:
    """A UTC timestamp usable as a file name: 20250101T120000Z (plus microseconds for uniqueness)."""
    import datetime as dt

    now = dt.datetime.now(dt.timezone.utc)
    return now.strftime("%Y%m%dT%H%M%S") + f"{now.microsecond:06d}Z"
