"""Camera-matched training: the augmentation (pipeline/imagesets/camera_augment.py), its hook into
Ultralytics' real trainer and dataset, and the train stage with camera_match and camera_frames on
(real Ultralytics training, tiny settings)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import yaml
from support import REPO, mlflow_store, tiny_params

from pipeline.imagesets.camera_augment import (
    CameraAugment,
    ProfiledCamera,
    ProfileError,
    load_profiles,
    render_through,
    scaled,
)
from pipeline.imagesets.camera_model import CameraSettings, camera_frame
from pipeline.imagesets.yolo import DatasetError

CAMERAS = yaml.safe_load((REPO / "params.yaml").read_text())["camera"]["synthetic"]["cameras"]


def _profiles(path: Path) -> Path:
    """A profiles document with the synthetic cameras' true settings (what camera_profile estimates)."""
    doc = {"cameras": {c["id"]: {"model": {k: v for k, v in c.items() if k != "id"}} for c in CAMERAS}}
    path.write_text(json.dumps(doc))
    return path


def _image() -> np.ndarray:
    rng = np.random.default_rng(3)
    img = np.full((256, 256, 3), 128, np.uint8)
    cv2.circle(img, (100, 120), 30, (40, 60, 80), -1)
    return np.clip(img.astype(np.int16) + rng.integers(-10, 10, img.shape), 0, 255).astype(np.uint8)


def test_profiles_load_and_bad_files_name_the_fix(tmp_path: Path) -> None:
    cams = load_profiles(_profiles(tmp_path / "p.json"))
    assert [c.id for c in cams] == sorted(c["id"] for c in CAMERAS)
    assert cams[0].model.wb_gains == tuple(next(c for c in CAMERAS if c["id"] == cams[0].id)["wb_gains"])
    with pytest.raises(ProfileError, match=r"run the camera_profile stage first \(dvc repro camera_profile\)"):
        load_profiles(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"cameras": {"a": {"model": {"width": 320}}}}')
    with pytest.raises(ProfileError, match=r"bad.json: not a camera profile document .*KeyError"):
        load_profiles(tmp_path / "bad.json")
    (tmp_path / "empty.json").write_text('{"cameras": {}}')
    with pytest.raises(ProfileError, match="no cameras"):
        load_profiles(tmp_path / "empty.json")


def test_render_matches_the_camera_geometry_and_is_seeded(tmp_path: Path) -> None:
    img = _image()
    for profiled in load_profiles(_profiles(tmp_path / "p.json")):
        cam = profiled.model
        out = render_through(img, cam, 1.0, 0.2, 256, random.Random(5))
        h, w = out.shape[:2]
        assert max(h, w) == 256 and abs(w / h - cam.width / cam.height) < 0.02  # the letterbox's shape
        assert np.array_equal(out, render_through(img, cam, 1.0, 0.2, 256, random.Random(5)))
        assert not np.array_equal(out, render_through(img, cam, 1.0, 0.2, 256, random.Random(6)))
        # The camera's look arrives (no jitter): exposure x colour cast x the fall-off's mean
        # (1 - v/3 over the frame) moves the channel means; 5 % covers blur, noise and JPEG.
        exact = render_through(img, cam, 1.0, 0.0, 256, random.Random(5))
        ratio = exact.reshape(-1, 3).mean(0) / cv2.resize(img, (w, h)).reshape(-1, 3).mean(0)
        expected = cam.exposure * np.array(cam.wb_gains) * (1 - cam.vignetting / 3)
        assert np.allclose(ratio, expected, rtol=0.05), (profiled.id, ratio, expected)


def test_strength_zero_is_geometry_only_and_one_is_the_estimate() -> None:
    cam = CameraSettings(320, 240, 0.7, (1.2, 1.0, 0.8), 0.6, 3.0, "motion", 5.0, 0.35, 70)
    same, exposure, wb = scaled(cam, 1.0, random.Random(0), 0.0)
    assert same == cam and exposure == 0.7 and wb.tolist() == [1.2, 1.0, 0.8]
    none, exposure, wb = scaled(cam, 0.0, random.Random(0), 0.0)
    assert (none.blur_px, none.shot_noise, none.read_noise, none.vignetting, none.jpeg_quality) == (0, 0, 0, 0, 100)
    img = _image()
    out = render_through(img, cam, 0.0, 0.0, 256, random.Random(0))
    plain = camera_frame(img, none, np.random.default_rng(0), 1.0, np.ones(3), (0.0, 0.0))
    assert np.array_equal(out, cv2.resize(plain, (256, 192), interpolation=cv2.INTER_AREA))


def test_augment_renders_with_probability() -> None:
    cam = ProfiledCamera("c", CameraSettings(416, 240, 1.3, (0.8, 1.0, 1.2), 0.4, 2.0, "defocus", 1.5, 0.2, 80))
    random.seed(0)
    assert CameraAugment([cam], 1.0, 1.0, 0.2, 256)(_image()).shape == (148, 256, 3)
    assert CameraAugment([cam], 0.0, 1.0, 0.2, 256)(_image()).shape == (256, 256, 3)
    half = CameraAugment([cam], 0.5, 1.0, 0.2, 256)
    for _ in range(200):
        half(_image())
    assert 70 < half.applied < 130


def _tiny_workspace(tmp_path: Path) -> tuple[dict[str, Any], Path]:
    """Tiny synthetic data + camera frames (with a labelled train split) through the real stages."""
    from pipeline.stages import camera, data

    params = tiny_params(yaml.safe_load((REPO / "params.yaml").read_text()))
    params["camera"]["synthetic"].update(labelled_train_images=6)
    params["train"]["camera_match"].update(enabled=True, probability=1.0)
    params["train"]["camera_frames"] = True
    ppath = tmp_path / "params.yaml"
    ppath.write_text(yaml.safe_dump(params, sort_keys=False))
    data.main(["--out", str(tmp_path / "defects"), "--metrics", str(tmp_path / "data.json"),
               "--headline", str(tmp_path / "data-h.json"), "--params", str(ppath)])
    camera.main(["--dataset-yaml", str(tmp_path / "defects" / "dataset.yaml"), "--out", str(tmp_path / "frames"),
                 "--metrics", str(tmp_path / "camera.json"), "--params", str(ppath)])
    return params, ppath


def _train(tmp_path: Path, ppath: Path, name: str) -> Path:
    from pipeline.stages import train

    out = tmp_path / f"{name}.pt"
    train.main(["--data", str(tmp_path / "defects" / "dataset.yaml"), "--profiles", str(tmp_path / "profiles.json"),
                "--camera-labelled", str(tmp_path / "frames" / "labelled"), "--out", str(out),
                "--metrics", str(tmp_path / f"{name}.json"), "--epochs-csv", str(tmp_path / f"{name}.csv"),
                "--params", str(ppath)])
    return out


def test_trainer_hook_renders_training_images_only(tmp_path: Path) -> None:
    """Ultralytics' own DetectionTrainer.build_dataset, wrapped: train images come out camera-shaped
    (416x240 -> 64x37 at imgsz 64) and run through mosaic; val images stay as they are."""
    from pipeline.config.ultralytics_env import import_ultralytics
    from pipeline.stages.train import camera_matched_trainer

    with mlflow_store(tmp_path):
        _tiny_workspace(tmp_path)
    import_ultralytics(tmp_path / "u")
    cam = ProfiledCamera("wide", CameraSettings(416, 240, 1.0, (1.0, 1.0, 1.0), 0.0, 1.0, "none", 0.0, 0.0, 90))
    augment = CameraAugment([cam], 1.0, 1.0, 0.0, 64)
    trainer = camera_matched_trainer(augment)(overrides={
        "data": str(tmp_path / "defects" / "dataset.yaml"), "model": "yolov8n.yaml", "imgsz": 64, "epochs": 1,
        "batch": 4, "workers": 0, "device": "cpu", "project": str(tmp_path / "runs"), "name": "t", "plots": False})
    trainer.setup_model()  # build_dataset reads the model's stride
    train_ds = trainer.build_dataset(str(tmp_path / "defects" / "images" / "train"), "train", 4)
    val_ds = trainer.build_dataset(str(tmp_path / "defects" / "images" / "val"), "val", 4)
    label = train_ds.get_image_and_label(0)
    assert label["img"].shape[:2] == (37, 64) and tuple(label["resized_shape"]) == (37, 64)
    assert val_ds.get_image_and_label(0)["img"].shape[:2] == (64, 64)
    assert augment.applied == 1
    train_ds.get_image_and_label(0)  # from mosaic's buffer: the rendered image, not rendered again
    assert augment.applied == 1
    sample = train_ds[1]  # the full training transform (mosaic, affine, ...) on rendered images
    assert tuple(sample["img"].shape) == (3, 64, 64) and augment.applied == 2


def _weights(pt: Path) -> dict[str, Any]:
    import torch

    return torch.load(pt, map_location="cpu", weights_only=False)["model"].state_dict()


def test_train_with_camera_match_and_camera_frames(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Real (1-epoch, 64 px) training with both options: other weights than without the
    augmentation, tags that say what ran, and a camera frame that leaks into val is refused.

    That the weights reproduce bit for bit with the augmentation on is held by the repro check
    (`make repro-check`, whose tiny params keep camera_match on): each stage in its own process,
    as dvc runs it. Two trainings in one process share string objects differently, which moves
    pickle's memo references in the checkpoint, so bytes are not compared here.
    """
    import torch

    with mlflow_store(tmp_path):
        params, ppath = _tiny_workspace(tmp_path)
        _profiles(tmp_path / "profiles.json")
        a = _weights(_train(tmp_path, ppath, "a"))
        assert "train: + 6 labelled camera frames (checked disjoint" in capsys.readouterr().out
        params["train"]["camera_match"]["enabled"] = False
        off = tmp_path / "off.yaml"
        off.write_text(yaml.safe_dump(params, sort_keys=False))
        c = _weights(_train(tmp_path, off, "c"))
        assert a.keys() == c.keys() and not all(torch.equal(a[k], c[k]) for k in a)

        import mlflow

        run = mlflow.search_runs(search_all_experiments=True, filter_string="tags.stage = 'train'",
                                 order_by=["start_time ASC"]).iloc[0]
        assert run["tags.camera_match"] == "line1-pi, line2-jetson, line3-pi"
        assert run["tags.train_device"] == "cpu"

        labelled = tmp_path / "frames" / "labelled"
        leak = sorted((labelled / "images" / "val").glob("*.jpg"))[0]
        (labelled / "images" / "train" / "leak.jpg").write_bytes(leak.read_bytes())
        (labelled / "labels" / "train" / "leak.txt").write_text("0 0.5 0.5 0.1 0.1\n")
        with pytest.raises(DatasetError, match=r"leak.jpg is a copy of camera evaluation frame"):
            _train(tmp_path, ppath, "d")
        assert not (tmp_path / "d.pt").exists()
