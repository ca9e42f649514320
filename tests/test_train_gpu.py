"""train.device on a real NVIDIA GPU (marked `gpu`: skipped on CI and wherever CUDA is absent).

What can be checked without a GPU is in tests/test_params.py (the device values) and
tests/test_train_camera.py (the trainer subclass). Here: the train stage with train.device cuda:0
(and [0, 1] where two GPUs exist) trains, writes weights that load on the CPU, and its MLflow run
says which device it trained on. The embedded defaults' full training on a GPU, timed next to the
CPU's: benchmarks/train_gpu.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from support import REPO, mlflow_store, tiny_params


def _cuda_devices() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        return 0


@pytest.mark.gpu
@pytest.mark.skipif(_cuda_devices() == 0, reason="needs an NVIDIA GPU with CUDA")
@pytest.mark.parametrize("device", ["cuda:0", [0, 1]])
def test_train_on_gpu(device: object, tmp_path: Path) -> None:
    if isinstance(device, list) and _cuda_devices() < len(device):
        pytest.skip(f"DDP over {device} needs {len(device)} GPUs")
    import mlflow
    import torch

    from pipeline.stages import data, train

    params = tiny_params(yaml.safe_load((REPO / "params.yaml").read_text()))
    params["train"].update(device=device, epochs=2)
    params["train"]["camera_match"]["enabled"] = False
    ppath = tmp_path / "params.yaml"
    ppath.write_text(yaml.safe_dump(params, sort_keys=False))
    with mlflow_store(tmp_path):
        data.main(["--out", str(tmp_path / "defects"), "--metrics", str(tmp_path / "d.json"),
                   "--headline", str(tmp_path / "dh.json"), "--params", str(ppath)])
        train.main(["--data", str(tmp_path / "defects" / "dataset.yaml"), "--out", str(tmp_path / "w.pt"),
                    "--metrics", str(tmp_path / "t.json"), "--epochs-csv", str(tmp_path / "e.csv"),
                    "--params", str(ppath)])
        run = mlflow.search_runs(search_all_experiments=True, filter_string="tags.stage = 'train'").iloc[0]
    assert run["tags.train_device"] == str(device)
    ckpt = torch.load(tmp_path / "w.pt", map_location="cpu", weights_only=False)
    assert next(ckpt["model"].parameters()).device.type == "cpu"
    assert len((tmp_path / "e.csv").read_text().splitlines()) == 3  # header + 2 epochs, DDP included
