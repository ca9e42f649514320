"""Stage `calibrate`: pHash dedup, farthest-point selection, tensors made by the device
preprocessing, manifest provenance, determinism, camera-vs-train domain difference, clear errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from support import tiny_params

from edge_runtime import preprocess
from edge_runtime.fileio import sha256_file
from pipeline.config.params import BaseParams, CalibrateParams, CameraParams, DataParams, ExportParams, build
from pipeline.imagesets.synthetic import CLASS_NAMES, image_rng, render_image
from pipeline.imagesets.yolo import DatasetError, dataset_yaml
from pipeline.stages import calibrate, camera
from pipeline.stages.calibrate import CalibrationError

F = Path("params.yaml")


def _p(repo_params: dict[str, Any], **over: Any) -> tuple[CalibrateParams, ExportParams, BaseParams]:
    p = tiny_params(repo_params)
    p["calibrate"].update(over)
    return (build(CalibrateParams, p["calibrate"], "calibrate", F), build(ExportParams, p["export"], "export", F),
            build(BaseParams, p["base"], "base", F))


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny camera frames (3 cameras x 4 scenes x 3-frame bursts) and a tiny training set."""
    import yaml
    from support import REPO

    root = tmp_path_factory.mktemp("calib_src")
    params = tiny_params(yaml.safe_load((REPO / "params.yaml").read_text()))
    params["camera"]["synthetic"].update(scenes_per_camera=4, burst_length=3, labelled_images=1)
    ds = root / "defects"
    (ds / "images" / "train").mkdir(parents=True)
    (ds / "dataset.yaml").write_text(dataset_yaml(CLASS_NAMES, ["train", "val"]))
    dp = build(DataParams, params["data"], "data", F)
    cfg = camera.generator_config(dp)
    for i in range(12):
        img, _ = render_image(image_rng(params["base"]["seed"], "train", i), cfg)
        cv2.imwrite(str(ds / "images" / "train" / f"train_{i:05d}.jpg"), img)
    camera.build_camera_frames(root / "camera_frames", ds / "dataset.yaml",
                               build(CameraParams, params["camera"], "camera", F), dp,
                               build(BaseParams, params["base"], "base", F))
    return {"frames": root / "camera_frames", "dataset": ds}


def _outs(root: Path) -> dict[str, Path]:
    return {"camera": root / "calibration" / "camera", "train": root / "calibration" / "train"}


def _tree(root: Path) -> dict[str, bytes]:
    return {f.relative_to(root).as_posix(): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()}


def test_dedup_drops_bursts_keeps_scenes(sources: dict[str, Path], repo_params: dict) -> None:
    p, _, _ = _p(repo_params)
    frames = calibrate.list_camera_frames(sources["frames"] / "frames")
    assert len(frames) == 3 * 4 * 3
    hashes = np.array([calibrate.phash(cv2.imread(str(f.path)), p.phash_size, p.phash_highfreq) for f in frames])
    kept, dropped = calibrate.dedup(hashes, p.dedup_hamming)
    scene = [f.rel.split("_")[0] for f in frames]  # <camera>/<scene>
    assert sorted({scene[i] for i in kept}) == sorted(set(scene)), "every distinct scene must survive"
    assert all(scene[i] == scene[j] for i, j, _ in dropped), "only frames of the same burst may be dropped"
    assert len(dropped) >= 0.8 * (len(frames) - len(set(scene))), "most burst near-duplicates must go"


def test_phash_is_stable_under_noise_not_across_images() -> None:
    rng = np.random.default_rng(0)
    a = cv2.GaussianBlur(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8), (0, 0), 6)
    noisy = np.clip(a + rng.normal(0, 4, a.shape), 0, 255).astype(np.uint8)
    b = cv2.GaussianBlur(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8), (0, 0), 6)
    ha, hn, hb = (calibrate.phash(x, 8, 4) for x in (a, noisy, b))
    assert ha.shape == (64,) and np.count_nonzero(ha != hn) <= 4 and np.count_nonzero(ha != hb) >= 16


def test_farthest_point_is_diverse_and_deterministic() -> None:
    rng = np.random.default_rng(1)
    centres = np.array([[0, 0], [10, 0], [0, 10], [10, 10]], float)
    pts = np.concatenate([c + rng.normal(0, 0.1, (25, 2)) for c in centres])  # 4 tight clusters
    order = calibrate.farthest_point_order(pts, 4)
    assert sorted(i // 25 for i in order) == [0, 1, 2, 3], "one pick per cluster before any repeat"
    assert order == calibrate.farthest_point_order(pts.copy(), 4)
    with pytest.raises(ValueError):
        calibrate.farthest_point_order(pts, 101)


def test_sets_tensors_manifest(tmp_path: Path, sources: dict[str, Path], repo_params: dict) -> None:
    p, e, b = _p(repo_params)
    outs = _outs(tmp_path)
    manifests = calibrate.build_calibration_sets(sources["frames"], sources["dataset"], outs, p, e, b)
    for name, out in outs.items():
        tensors = np.load(out / "tensors.npy")
        assert tensors.dtype == np.float32 and tensors.shape == (p.size, 3, p.imgsz, p.imgsz)
        m = json.loads((out / "manifest.json").read_text())
        assert m == manifests[name]
        assert {"set", "source_dir", "imgsz", "tensors", "preprocess", "selection", "counts", "frames",
                "duplicates", "groups", "stats"} <= set(m)
        assert m["tensors"]["sha256"] == sha256_file(out / "tensors.npy")
        assert m["tensors"]["shape"] == list(tensors.shape) and m["tensors"]["dtype"] == "float32"
        c = m["counts"]
        assert c["selected"] == p.size == len(m["frames"])
        assert c["candidates"] == c["distinct"] + c["duplicates_dropped"] == c["distinct"] + len(m["duplicates"])
        assert m["selection"]["params"]["dedup_hamming"] == p.dedup_hamming and m["selection"]["seed"] == b.seed
        assert sorted(f["pick_rank"] for f in m["frames"]) == list(range(p.size))
        source = Path(m["source_dir"])
        expected = preprocess.to_tensor([preprocess.letterbox(cv2.imread(str(source / f["path"])), p.imgsz)[0]
                                         for f in m["frames"]])
        np.testing.assert_array_equal(tensors, expected)  # THE device preprocessing, frame for frame
        for f in m["frames"]:
            assert not Path(f["path"]).is_absolute() and f["sha256"] == sha256_file(source / f["path"])
        assert np.allclose(m["stats"]["channel_mean_rgb"], tensors.mean(axis=(0, 2, 3)), atol=1e-5)
    cam = manifests["camera"]
    assert cam["counts"]["duplicates_dropped"] >= 12 and len(cam["groups"]) == 3
    assert manifests["train"]["counts"]["duplicates_dropped"] == 0


def test_selection_beats_file_order_on_diversity(sources: dict[str, Path], repo_params: dict) -> None:
    p, _, _ = _p(repo_params)
    frames = calibrate.list_train_images(sources["dataset"])
    desc = np.array([calibrate.descriptor(cv2.imread(str(f.path)), p.thumb_size, p.hist_bins, p.hist_weight)
                     for f in frames])

    def spread(idx: list[int]) -> float:
        d = np.linalg.norm(desc[idx][:, None] - desc[idx][None], axis=-1)
        return float(d[np.triu_indices(len(idx), 1)].min())

    assert spread(calibrate.farthest_point_order(desc, 4)) > spread(list(range(4)))


def test_deterministic_bytes(tmp_path: Path, sources: dict[str, Path], repo_params: dict) -> None:
    p, e, b = _p(repo_params)
    calibrate.build_calibration_sets(sources["frames"], sources["dataset"], _outs(tmp_path / "a"), p, e, b)
    calibrate.build_calibration_sets(sources["frames"], sources["dataset"], _outs(tmp_path / "b"), p, e, b)
    assert _tree(tmp_path / "a" / "calibration") == _tree(tmp_path / "b" / "calibration")


def test_camera_and_train_sets_differ_measurably(tmp_path: Path, sources: dict[str, Path], repo_params: dict) -> None:
    p, e, b = _p(repo_params)
    manifests = calibrate.build_calibration_sets(sources["frames"], sources["dataset"], _outs(tmp_path), p, e, b)
    diff = calibrate.calibrate_metrics(manifests)["camera_minus_train"]
    # The camera models shift brightness and colour cast; letterbox padding (grey 114) dilutes it.
    assert max(abs(v) for v in diff["channel_mean_rgb"]) > 0.02 or abs(diff["brightness_mean"]) > 0.02, diff


def _break(kind: str, frames: Path) -> str:
    cam = sorted(d for d in (frames / "frames").iterdir())[0]
    first = sorted(cam.iterdir())[0]
    if kind == "corrupt":
        first.write_bytes(b"\xff\xd8 broken")
        return str(first)
    if kind == "mixed_sizes":
        cv2.imwrite(str(first), np.zeros((10, 20, 3), np.uint8))
        return "must share one size"
    if kind == "empty_folder":
        (frames / "frames" / "zz-empty").mkdir()
        return "holds no images"
    for f in cam.iterdir():  # too few distinct frames for calibrate.size
        f.unlink()
    for d in (frames / "frames").iterdir():
        if d != cam:
            for f in d.iterdir():
                f.unlink()
            d.rmdir()
    cam.rmdir()
    return "no camera folders"


@pytest.mark.parametrize("kind", ["corrupt", "mixed_sizes", "empty_folder", "no_cameras"])
def test_bad_frames_fail_clearly_and_write_nothing(tmp_path: Path, sources: dict[str, Path], repo_params: dict,
                                                   kind: str) -> None:
    import shutil

    frames = tmp_path / "camera_frames"
    shutil.copytree(sources["frames"], frames)
    expect = _break(kind, frames)
    outs = _outs(tmp_path)
    outs["train"].mkdir(parents=True)
    (outs["train"] / "old.txt").write_text("previous set")
    p, e, b = _p(repo_params)
    with pytest.raises((CalibrationError, DatasetError)) as err:
        calibrate.build_calibration_sets(frames, sources["dataset"], {"train": outs["train"], "camera": outs["camera"]},
                                         p, e, b)
    assert expect in str(err.value)
    assert _tree(tmp_path / "calibration") == {"train/old.txt": b"previous set"}
    assert not [d for d in (tmp_path / "calibration").iterdir() if d.name.startswith(".")]


def test_imgsz_mismatch_and_too_small_pool(tmp_path: Path, sources: dict[str, Path], repo_params: dict) -> None:
    p, e, b = _p(repo_params, imgsz=96)
    with pytest.raises(CalibrationError, match="export.imgsz is 64"):
        calibrate.build_calibration_sets(sources["frames"], sources["dataset"], _outs(tmp_path), p, e, b)
    p, e, b = _p(repo_params, size=13)  # 12 training images
    with pytest.raises(CalibrationError, match="lower calibrate.size"):
        calibrate.build_calibration_sets(sources["frames"], sources["dataset"], _outs(tmp_path), p, e, b)
    assert not (tmp_path / "calibration").exists() or not _tree(tmp_path / "calibration")
