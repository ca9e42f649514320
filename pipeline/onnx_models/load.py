"""Loading the pipeline's ONNX models, with an error that names the file and the stage to re-run.

Every workstation reader of a model goes through here, so a missing or corrupt `models/*.onnx`
fails the same way everywhere: "<file> not found; run `dvc repro <stage>`" or "<file> is not a
readable ONNX model (...); re-run the <stage> stage", never a raw protobuf traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edge_runtime.backends import BackendError, parse_names
from pipeline.onnx_models.graph import metadata


class ModelFileError(ValueError):
    """An ONNX model file is missing, unreadable or lacks the metadata the pipeline writes."""


def load_onnx(path: Path, stage: str, weights: bool = True) -> Any:
    """`onnx.load` of `path`; `stage` is the DVC stage that writes it (named in the error).

    weights=False skips external tensor data: enough for metadata and graph inputs.
    """
    import onnx  # lazy: the fleet imports this module, and onnx costs a second to import

    if not path.is_file():
        raise ModelFileError(f"{path} not found; run the {stage} stage first (dvc repro {stage})")
    try:
        return onnx.load(str(path), load_external_data=weights)
    except Exception as e:  # onnx raises DecodeError, ValueError or OSError depending on the damage
        raise ModelFileError(f"{path} is not a readable ONNX model ({type(e).__name__}: {e}); "
                             f"re-run the {stage} stage (dvc repro {stage})") from e


def onnx_metadata(path: Path, stage: str) -> dict[str, str]:
    """The metadata_props of the model at `path` (class names, imgsz, output_format, ...)."""
    return metadata(load_onnx(path, stage, weights=False))


def class_names(meta: dict[str, str], path: Path, stage: str) -> tuple[str, ...]:
    """Class names from a model's metadata (Ultralytics' `names` dict literal), in class-id order."""
    if "names" not in meta:
        raise ModelFileError(f"{path} has no 'names' metadata; re-run the {stage} stage (dvc repro {stage})")
    try:
        return parse_names(meta["names"])
    except BackendError as e:
        raise ModelFileError(f"{path}: {e}; re-run the {stage} stage (dvc repro {stage})") from e


def input_size(model: Any, path: Path) -> int:
    """The square input size of a loaded model (its static NCHW input shape)."""
    dims = model.graph.input[0].type.tensor_type.shape.dim
    if len(dims) != 4 or dims[2].dim_value <= 0 or dims[2].dim_value != dims[3].dim_value:
        raise ModelFileError(f"{path}: input shape {[d.dim_value or d.dim_param for d in dims]} is not a static "
                             "square NCHW image; export with a fixed imgsz")
    return int(dims[2].dim_value)
