"""Shared fixtures. Every test gets its own MLflow store and Ultralytics config dir in tmp,
so tests never write into the repository's mlflow.db or the user's ~/.config."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest
import yaml
from support import REPO, mlflow_store, tiny_params

# The pipeline's outputs in the checkout. A stage's CLI defaults point here, so a test that forgets
# one output argument would overwrite the user's results (it happened: the benchmark stage's
# latency samples); the session fails if any of these files changed while the tests ran.
_REPO_OUTPUTS = ("data", "models", "calibration", "reports")


def _snapshot() -> dict[str, tuple[int, int]]:
    out = {}
    for top in _REPO_OUTPUTS:
        for f in (REPO / top).rglob("*"):
            if f.is_file():
                st = f.stat()
                out[f.relative_to(REPO).as_posix()] = (st.st_mtime_ns, st.st_size)
    return out


@pytest.fixture(scope="session", autouse=True)
def repo_outputs_untouched() -> Any:
    """Fail the session if a test wrote into the checkout's pipeline outputs."""
    before = _snapshot()
    yield
    after = _snapshot()
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert not changed, ("tests changed the checkout's pipeline outputs (pass the output paths explicitly): "
                         f"{changed[:10]}")


@pytest.fixture(autouse=True)
def isolated_env(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point MLflow and Ultralytics at a per-test temp folder."""
    root = tmp_path_factory.mktemp("env")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    monkeypatch.setenv("YOLO_CONFIG_DIR", str(root / "yolo"))
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    monkeypatch.setenv("GIT_PYTHON_REFRESH", "quiet")
    return root


@pytest.fixture
def repo_params() -> dict[str, Any]:
    """The committed params.yaml as a dict (tests copy and shrink it)."""
    return yaml.safe_load((REPO / "params.yaml").read_text())


@pytest.fixture
def write_params(tmp_path: Path) -> Callable[[dict[str, Any]], Path]:
    """Write a params dict to tmp_path/params.yaml and return the path."""

    def _write(params: dict[str, Any]) -> Path:
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump(params, sort_keys=False))
        return path

    return _write


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A real (barely trained) YOLOv8n: tiny synthetic data, 1 epoch at 64 px, exported to ONNX.

    Built once per test session through the real stage functions (about 30 s). Returns paths:
    `dataset` (YOLO folder), `weights` (.pt), `onnx` (FP32, imgsz 64), `params` (params.yaml).
    Untrained models detect little: tests that need boxes use a low confidence threshold.
    """
    import os

    from pipeline.stages import data, export, train

    root = tmp_path_factory.mktemp("tiny_model")
    os.environ.setdefault("YOLO_CONFIG_DIR", str(root / "yolo"))
    params = tiny_params(yaml.safe_load((REPO / "params.yaml").read_text()))
    # Trained before any camera frames exist; training with them: tests/test_train_camera.py.
    params["train"]["camera_match"]["enabled"] = False
    params["train"]["camera_frames"] = False
    params_path = root / "params.yaml"
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    with mlflow_store(root):
        out = {"dataset": root / "defects", "weights": root / "yolov8n.pt", "onnx": root / "yolov8n.onnx",
               "params": params_path}
        data.main(["--out", str(out["dataset"]), "--metrics", str(root / "data.json"),
                   "--headline", str(root / "data-headline.json"), "--params", str(params_path)])
        train.main(["--data", str(out["dataset"] / "dataset.yaml"), "--out", str(out["weights"]),
                    "--metrics", str(root / "train.json"), "--epochs-csv", str(root / "epochs.csv"),
                    "--params", str(params_path)])
        export.main(["--weights", str(out["weights"]), "--data", str(out["dataset"]), "--out", str(out["onnx"]),
                     "--metrics", str(root / "export.json"), "--params", str(params_path)])
    return out


@pytest.fixture(scope="session")
def quantized(tiny_model: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny model carried through the real camera, calibrate and quantize stages (about 20 s)."""
    from pipeline.stages import calibrate, camera, quantize

    root = tmp_path_factory.mktemp("quantized")
    params = tiny_params(yaml.safe_load((REPO / "params.yaml").read_text()))
    params_path = root / "params.yaml"
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    out = {**tiny_model, "params": params_path, "frames": root / "camera_frames", "calibration": root / "calibration",
           "int8": root / "yolov8n.int8.onnx", "dynamic": root / "yolov8n.dynamic.onnx",
           "quantize_metrics": root / "quantize.json", "quantize_headline": root / "quantize-headline.json"}
    # Session-scoped: the per-test MLflow isolation does not cover it, so point MLflow at tmp here.
    with mlflow_store(root):
        camera.main(["--dataset-yaml", str(tiny_model["dataset"] / "dataset.yaml"), "--out", str(out["frames"]),
                     "--metrics", str(root / "camera.json"), "--params", str(params_path)])
        calibrate.main(["--frames", str(out["frames"]), "--dataset", str(tiny_model["dataset"]),
                        "--camera-out", str(out["calibration"] / "camera"),
                        "--train-out", str(out["calibration"] / "train"),
                        "--metrics", str(root / "calibrate.json"), "--params", str(params_path)])
        quantize.main(["--model", str(tiny_model["onnx"]), "--calibration", str(out["calibration"]),
                       "--data", str(tiny_model["dataset"]), "--camera", str(out["frames"] / "labelled"),
                       "--int8", str(out["int8"]),
                       "--trt", str(root / "yolov8n.int8.trt.onnx"), "--dynamic", str(out["dynamic"]),
                       "--candidates", str(root / "candidates.csv"), "--metrics", str(out["quantize_metrics"]),
                       "--headline", str(out["quantize_headline"]),
                       "--params", str(params_path)])
    return out
