"""Stage `camera`: synthetic camera frames (determinism, layout, labels, domain shift) and ingest
of real frames (images, a video, a labelled folder) with clear errors that leave nothing written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import yaml
from support import tiny_params

from pipeline.config.params import BaseParams, CameraParams, DataParams, build
from pipeline.imagesets.synthetic import CLASS_NAMES, image_rng, render_image
from pipeline.imagesets.yolo import DatasetError, dataset_yaml, validate_label_text
from pipeline.stages import camera


def _params(repo_params: dict[str, Any], **camera_overrides: Any) -> tuple[CameraParams, DataParams, BaseParams]:
    p = tiny_params(repo_params)
    p["camera"]["synthetic"].update(scenes_per_camera=3, burst_length=3, labelled_images=4)
    p["camera"].update(camera_overrides)
    f = Path("params.yaml")
    return (build(CameraParams, p["camera"], "camera", f), build(DataParams, p["data"], "data", f),
            build(BaseParams, p["base"], "base", f))


@pytest.fixture
def train_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "defects" / "dataset.yaml"
    path.parent.mkdir()
    path.write_text(dataset_yaml(CLASS_NAMES, ["train", "val"]))
    return path


def _tree(root: Path) -> dict[str, bytes]:
    return {f.relative_to(root).as_posix(): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()}


def test_synthetic_is_deterministic(tmp_path: Path, repo_params: dict, train_yaml: Path) -> None:
    cp, dp, bp = _params(repo_params)
    camera.build_camera_frames(tmp_path / "a", train_yaml, cp, dp, bp)
    camera.build_camera_frames(tmp_path / "b", train_yaml, cp, dp, bp)
    a, b = _tree(tmp_path / "a"), _tree(tmp_path / "b")
    assert a == b and len(a) > 10


def test_synthetic_layout_sizes_and_labels(tmp_path: Path, repo_params: dict, train_yaml: Path) -> None:
    cp, dp, bp = _params(repo_params)
    out = tmp_path / "camera_frames"
    result = camera.build_camera_frames(out, train_yaml, cp, dp, bp)
    s = cp.synthetic
    for cam in s.cameras:
        files = sorted((out / "frames" / cam.id).glob("*.jpg"))
        assert len(files) == s.scenes_per_camera * s.burst_length
        img = cv2.imread(str(files[0]))
        assert img.shape == (cam.height, cam.width, 3)
        assert result.cameras[cam.id].frames == len(files)
    assert any(c.width != c.height for c in s.cameras), "the camera model must include a non-square sensor"
    doc = yaml.safe_load((out / "labelled" / "dataset.yaml").read_text())
    assert [doc["names"][i] for i in range(len(CLASS_NAMES))] == list(CLASS_NAMES)
    assert doc["val"] == "images/val" and doc["nc"] == len(CLASS_NAMES)
    labels = sorted((out / "labelled" / "labels" / "val").glob("*.txt"))
    assert len(labels) == s.labelled_images == result.labelled_images
    assert sum(len(validate_label_text(f.read_text(), f, 6)) for f in labels) == result.labelled_instances
    assert not list(tmp_path.glob(".camera_frames*")), "temp folder left behind"


def test_labelled_boxes_scale_with_the_resize(repo_params: dict) -> None:
    """A frame is the square render resized to W x H: normalised boxes are unchanged, and the
    pixels inside a box are still the defect (the darkest/brightest area is inside its box)."""
    cp, dp, _ = _params(repo_params)
    cfg = camera.generator_config(dp)
    cam = cp.synthetic.cameras[0]
    scene, boxes = render_image(image_rng(0, "camera-labelled", 1), cfg)
    frame = cv2.resize(scene, (cam.width, cam.height), interpolation=cv2.INTER_LINEAR)
    for b in boxes:
        _, cx, cy, w, h = b.yolo(cfg.image_size, cfg.image_size)
        x0, x1 = round((cx - w / 2) * cam.width), round((cx + w / 2) * cam.width)
        y0, y1 = round((cy - h / 2) * cam.height), round((cy + h / 2) * cam.height)
        sx0, sy0 = b.x0 * cam.width / cfg.image_size, b.y0 * cam.height / cfg.image_size
        assert abs(x0 - sx0) <= 1 and abs(y0 - sy0) <= 1 and x1 > x0 and y1 > y0
    assert frame.shape == (cam.height, cam.width, 3)


def test_camera_domain_differs_from_training(tmp_path: Path, repo_params: dict, train_yaml: Path) -> None:
    cp, dp, bp = _params(repo_params)
    result = camera.build_camera_frames(tmp_path / "out", train_yaml, cp, dp, bp)
    train = camera.FrameStats()
    cfg = camera.generator_config(dp)
    for i in range(6):
        train.add(render_image(image_rng(bp.seed, "train", i), cfg)[0])
    t = train.as_metrics()
    for cid, st in result.cameras.items():
        m = st.as_metrics()
        brightness = abs(m["brightness_mean"] - t["brightness_mean"])
        colour = max(abs(a - b) for a, b in zip(m["channel_mean_bgr"], t["channel_mean_bgr"]))
        assert brightness > 8 or colour > 12, f"{cid} looks like the training images: {m} vs {t}"


def test_bursts_are_near_duplicates_and_scenes_differ(tmp_path: Path, repo_params: dict, train_yaml: Path) -> None:
    cp, dp, bp = _params(repo_params)
    out = tmp_path / "out"
    camera.build_camera_frames(out, train_yaml, cp, dp, bp)
    cam = cp.synthetic.cameras[0].id
    read = lambda n: cv2.imread(str(out / "frames" / cam / n)).astype(np.float32)  # noqa: E731
    within = np.abs(read("00000_00.jpg") - read("00000_01.jpg")).mean()
    across = np.abs(read("00000_00.jpg") - read("00001_00.jpg")).mean()
    assert 0 < within < across / 2  # not identical bytes, but far closer than another scene


# ------------------------------------------------------------------------------------------
# Ingest
# ------------------------------------------------------------------------------------------


def _frame(seed: int, w: int = 80, h: int = 60) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def _ingest_params(repo_params: dict, ingest_dir: Path,
                   labelled: str = "") -> tuple[CameraParams, DataParams, BaseParams]:
    return _params(repo_params, source="ingest", ingest_dir=str(ingest_dir), ingest_labelled_dir=labelled,
                   video_fps=2.0)


def test_ingest_images(tmp_path: Path, repo_params: dict, train_yaml: Path) -> None:
    src = tmp_path / "camera"
    for cam, n in (("pi-a", 3), ("pi-b", 2)):
        (src / cam).mkdir(parents=True)
        for i in range(n):
            cv2.imwrite(str(src / cam / f"f{i}.png"), _frame(i + len(cam), 64 + 16 * (cam == "pi-b"), 48))
    (src / "pi-a" / ".partial").write_text("ignored")
    out = tmp_path / "out"
    result = camera.build_camera_frames(out, train_yaml, *_ingest_params(repo_params, src))
    assert sorted(p.name for p in (out / "frames" / "pi-a").iterdir()) == ["f0.png", "f1.png", "f2.png"]
    assert (out / "frames" / "pi-a" / "f1.png").read_bytes() == (src / "pi-a" / "f1.png").read_bytes()
    assert result.cameras["pi-b"].frames == 2 and result.cameras["pi-b"].width == 80
    assert not (out / "labelled").exists() and result.labelled_images == 0  # no labelled folder given
    assert result.as_metrics()["source"] == "ingest"


def test_ingest_video_sampled_at_rate(tmp_path: Path, repo_params: dict, train_yaml: Path) -> None:
    src = tmp_path / "camera" / "jetson-1"
    src.mkdir(parents=True)
    writer = cv2.VideoWriter(str(src / "clip.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (96, 64))
    assert writer.isOpened()
    for i in range(20):  # 2 s at 10 fps
        writer.write(np.full((64, 96, 3), i * 10, np.uint8))
    writer.release()
    out = tmp_path / "out"
    result = camera.build_camera_frames(out, train_yaml, *_ingest_params(repo_params, tmp_path / "camera"))
    names = sorted(p.name for p in (out / "frames" / "jetson-1").iterdir())
    assert names == [f"clip_{i:06d}.png" for i in (0, 5, 10, 15)]  # 2 fps of a 10 fps video
    assert result.cameras["jetson-1"].frames == 4
    assert cv2.imread(str(out / "frames" / "jetson-1" / names[1])).shape == (64, 96, 3)


def _labelled_source(tmp_path: Path) -> Path:
    """An ingest folder with one camera (one frame) and an empty labelled YOLO folder beside it."""
    src = tmp_path / "camera" / "pi-a"
    src.mkdir(parents=True)
    cv2.imwrite(str(src / "f.png"), _frame(1))
    lab = tmp_path / "labelled_src"
    (lab / "images").mkdir(parents=True)
    (lab / "labels").mkdir()
    (lab / "data.yaml").write_text(yaml.safe_dump({"names": list(CLASS_NAMES)}))
    return lab


def test_ingest_labelled_folder(tmp_path: Path, repo_params: dict, train_yaml: Path) -> None:
    lab = _labelled_source(tmp_path)
    cv2.imwrite(str(lab / "images" / "a.jpg"), _frame(2))
    (lab / "labels" / "a.txt").write_text("5 0.5 0.5 0.2 0.3\n")
    out = tmp_path / "out"
    result = camera.build_camera_frames(out, train_yaml, *_ingest_params(repo_params, tmp_path / "camera", str(lab)))
    assert result.labelled_images == 1 and result.labelled_instances == 1
    assert (out / "labelled" / "labels" / "val" / "a.txt").read_text().startswith("5 0.5")
    (lab / "data.yaml").write_text(yaml.safe_dump({"names": list("abcdef")}))
    with pytest.raises(DatasetError, match="differ from the training set"):
        camera.build_camera_frames(out, train_yaml, *_ingest_params(repo_params, tmp_path / "camera", str(lab)))


@pytest.mark.parametrize("problem",
                         ["corrupt", "empty_file", "mixed_sizes", "empty_camera", "no_cameras", "loose_file"])
def test_ingest_errors_name_the_file_and_write_nothing(tmp_path: Path, repo_params: dict, train_yaml: Path,
                                                       problem: str) -> None:
    src = tmp_path / "camera"
    cam = src / "pi-a"
    cam.mkdir(parents=True)
    cv2.imwrite(str(cam / "a.png"), _frame(1))
    bad = cam / "b.jpg"
    expect = str(bad)
    if problem == "corrupt":
        bad.write_bytes(b"\xff\xd8 not really a jpeg")
    elif problem == "empty_file":
        bad.write_bytes(b"")
    elif problem == "mixed_sizes":
        cv2.imwrite(str(bad), _frame(2, 100, 60))
        expect = "must share one size"
    elif problem == "empty_camera":
        (src / "pi-b").mkdir()
        expect = f"{src / 'pi-b'} is empty"
    elif problem == "no_cameras":
        (cam / "a.png").unlink()
        cam.rmdir()
        expect = "no camera folders"
    else:
        (src / "stray.png").write_bytes((cam / "a.png").read_bytes())
        expect = "one folder per camera"
    out = tmp_path / "out"
    out.mkdir()
    (out / "previous.txt").write_text("keep me")
    with pytest.raises(DatasetError) as e:
        camera.build_camera_frames(out, train_yaml, *_ingest_params(repo_params, src))
    assert expect in str(e.value)
    assert _tree(out) == {"previous.txt": b"keep me"}, "an error must leave the previous output untouched"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_main_writes_metrics(tmp_path: Path, repo_params: dict, train_yaml: Path, write_params: Any) -> None:
    p = tiny_params(repo_params)
    p["camera"]["synthetic"].update(scenes_per_camera=2, burst_length=2, labelled_images=3)
    params = write_params(p)
    metrics = tmp_path / "reports" / "metrics.json"
    camera.main(["--dataset-yaml", str(train_yaml), "--out", str(tmp_path / "cf"), "--metrics", str(metrics),
                 "--params", str(params)])
    m = json.loads(metrics.read_text())
    assert m["source"] == "synthetic" and m["labelled_images"] == 3
    assert set(m["cameras"]) == {c["id"] for c in p["camera"]["synthetic"]["cameras"]}
    assert all({"brightness_mean", "channel_mean_bgr", "channel_std_bgr"} <= set(c) for c in m["cameras"].values())


def test_ingest_refuses_dangling_and_escaping_frame_links(tmp_path: Path) -> None:
    """A frame that is a symlink must lead to a file inside the ingest folder: a dangling link or one
    leading out is an error naming it, never a frame that silently goes missing."""
    import cv2
    import numpy as np

    from pipeline.imagesets.yolo import DatasetError
    from pipeline.stages.camera import ingest_frames

    ingest = tmp_path / "ingest"
    cam = ingest / "cam1"
    cam.mkdir(parents=True)
    cv2.imwrite(str(cam / "a.png"), np.zeros((8, 8, 3), np.uint8))
    (cam / "b.png").symlink_to(cam / "a-missing.png")
    with pytest.raises(DatasetError, match=r"b\.png: a dangling symlink"):
        ingest_frames(ingest, tmp_path / "out1", video_fps=2.0)
    (cam / "b.png").unlink()
    outside = tmp_path / "elsewhere.png"
    cv2.imwrite(str(outside), np.zeros((8, 8, 3), np.uint8))
    (cam / "b.png").symlink_to(outside)
    with pytest.raises(DatasetError, match=r"b\.png: a symlink to .*outside the import folder"):
        ingest_frames(ingest, tmp_path / "out2", video_fps=2.0)
    (cam / "b.png").unlink()
    (cam / "b.png").symlink_to(cam / "a.png")  # inside: followed
    assert ingest_frames(ingest, tmp_path / "out3", video_fps=2.0)["cam1"].frames == 2


def test_synthetic_labelled_train_split_is_other_scenes(tmp_path: Path, repo_params: dict, train_yaml: Path) -> None:
    """labelled_train_images writes labelled/images/train from a seed space of its own: the leak
    check train runs (near_duplicates.check_disjoint) finds no copy or near-duplicate of a val frame."""
    from pipeline.imagesets.near_duplicates import SAME_SCENE_BITS, check_disjoint

    cp, dp, bp = _params(repo_params)
    cp = cp.replace(synthetic=cp.synthetic.replace(labelled_train_images=5))
    out = tmp_path / "camera_frames"
    result = camera.build_camera_frames(out, train_yaml, cp, dp, bp)
    train = sorted((out / "labelled" / "images" / "train").glob("*.jpg"))
    val = sorted((out / "labelled" / "images" / "val").glob("*.jpg"))
    assert (len(train), len(val)) == (5, 4) and result.labelled_train_images == 5
    assert result.as_metrics()["labelled_train_images"] == 5
    assert all((out / "labelled" / "labels" / "train" / f"{f.stem}.txt").is_file() for f in train)
    assert yaml.safe_load((out / "labelled" / "dataset.yaml").read_text())["train"] == "images/train"
    check_disjoint(train, val, SAME_SCENE_BITS)
    # The same check refuses a val frame smuggled into the train split, as a copy or re-encoded.
    (tmp_path / "leak").mkdir()
    copy = tmp_path / "leak" / "copy.jpg"
    copy.write_bytes(val[0].read_bytes())
    with pytest.raises(DatasetError, match="is a copy of"):
        check_disjoint([*train, copy], val, SAME_SCENE_BITS)
    reencoded = tmp_path / "leak" / "reencoded.png"
    img = cv2.imread(str(val[1]))
    cv2.imwrite(str(reencoded), cv2.GaussianBlur(img, (3, 3), 0))
    with pytest.raises(DatasetError, match="near-duplicate of .*val.*move them together"):
        check_disjoint([*train, reencoded], val, SAME_SCENE_BITS)


def test_ingest_labelled_train_fraction_keeps_bursts_together(tmp_path: Path, repo_params: dict,
                                                              train_yaml: Path) -> None:
    """Ingested labelled frames split into train/val by near-duplicate group: every burst lands on one side."""
    lab = _labelled_source(tmp_path)
    rng = np.random.default_rng(0)
    cfg = camera.generator_config(_params(repo_params)[1])
    for scene in range(8):  # 8 scenes x 3 frames each, the frames of a scene a pixel apart plus noise
        img, _ = render_image(image_rng(7, "burst-test", scene), cfg)
        for k in range(3):
            frame = np.roll(img, k, axis=1).astype(np.int16) + rng.integers(-3, 4, img.shape)
            cv2.imwrite(str(lab / "images" / f"s{scene}_{k}.jpg"), np.clip(frame, 0, 255).astype(np.uint8))
            (lab / "labels" / f"s{scene}_{k}.txt").write_text("1 0.5 0.5 0.2 0.2\n")
    cp, dp, bp = _ingest_params(repo_params, tmp_path / "camera", str(lab))
    out = tmp_path / "out"
    result = camera.build_camera_frames(out, train_yaml, cp.replace(labelled_train_fraction=0.5), dp, bp)
    train = {f.stem for f in (out / "labelled" / "images" / "train").iterdir()}
    val = {f.stem for f in (out / "labelled" / "images" / "val").iterdir()}
    assert len(train) == 12 and len(val) == 12 and result.labelled_images == 12
    for scene in range(8):
        sides = {f"s{scene}_{k}" in train for k in range(3)}
        assert len(sides) == 1, f"scene {scene} is split across train and val"
    again = tmp_path / "again"
    camera.build_camera_frames(again, train_yaml, cp.replace(labelled_train_fraction=0.5), dp, bp)
    assert _tree(out / "labelled") == _tree(again / "labelled")  # seeded
