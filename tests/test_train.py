"""Stage `train` helpers: the activation variant, checkpoint normalisation, the epoch curve file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from pipeline.config.params import TrainParams, load_params
from pipeline.stages.train import model_spec, normalize_checkpoint, write_epochs_csv


def test_silu_uses_the_model_param(tmp_path: Path) -> None:
    p = load_params("train", TrainParams)
    assert p.activation == "SiLU" and model_spec(p, tmp_path) == p.model


def test_relu_variant_is_yolov8n_with_relu(tmp_path: Path) -> None:
    from ultralytics.nn.tasks import DetectionModel

    p = load_params("train", TrainParams).replace(activation="ReLU")
    spec = Path(model_spec(p, tmp_path))
    cfg = yaml.safe_load(spec.read_text())
    assert cfg["scale"] == "n" and cfg["activation"] == "torch.nn.ReLU()"
    model = DetectionModel(str(spec), nc=6, verbose=False)
    acts = {type(m).__name__ for m in model.modules() if isinstance(m, (torch.nn.ReLU, torch.nn.SiLU))}
    assert acts == {"ReLU"}
    assert sum(x.numel() for x in model.parameters()) == sum(
        x.numel() for x in DetectionModel("yolov8n.yaml", nc=6, verbose=False).parameters())


def test_relu_with_pretrained_weights_is_refused() -> None:
    p = load_params("train", TrainParams)
    with pytest.raises(ValueError, match="pretrained weights keep the activation"):
        p.replace(model="yolov8n.pt", activation="ReLU")


def test_checkpoint_loses_timestamp_and_temp_paths(tmp_path: Path) -> None:
    from ultralytics.nn.tasks import DetectionModel

    model = DetectionModel("yolov8n.yaml", nc=6, verbose=False)
    model.args = {"data": "/tmp/train-abc/dataset/dataset.yaml", "project": "/tmp/train-abc/runs", "lr0": 0.01}
    src = tmp_path / "best.pt"
    torch.save({"model": model, "date": "2026-11-22T02:00", "train_args": dict(model.args),
                "best_fitness": 0.5, "version": "8.4"}, src)
    a = normalize_checkpoint(src, "data/defects/dataset.yaml")
    b = normalize_checkpoint(src, "data/defects/dataset.yaml")
    assert a == b
    out = tmp_path / "clean.pt"
    out.write_bytes(a)
    ckpt = torch.load(out, weights_only=False)
    assert ckpt["date"] is None and "project" not in ckpt["train_args"]
    assert ckpt["train_args"]["data"] == "data/defects/dataset.yaml" and ckpt["model"].args["lr0"] == 0.01


def test_epochs_csv(tmp_path: Path) -> None:
    path = tmp_path / "epochs.csv"
    write_epochs_csv([{"epoch": 1.0, "mAP50": 0.1, "mAP50-95": 0.05, "train_box_loss": 3.0}], path)
    lines = path.read_text().splitlines()
    assert lines[0].startswith("epoch,train_box_loss") and lines[1].startswith("1,3.0")
