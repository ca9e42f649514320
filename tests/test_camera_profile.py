"""Stage `camera_profile`: the camera models estimated from unlabelled frames match the cameras that
made them (frames from the camera stage's own functions, the training set from the data stage's),
the estimators are exact where they should be, and bad input fails clearly, writing nothing."""

from __future__ import annotations

import ast
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import yaml
from support import REPO, mlflow_store

from pipeline.config.params import BaseParams, CameraParams, CameraProfileParams, DataParams, ParamsError, build
from pipeline.config.stage_cli import run_stage
from pipeline.imagesets import camera_estimates as ce
from pipeline.imagesets.camera_model import vignette
from pipeline.imagesets.yolo import DatasetError
from pipeline.stages import camera, camera_profile, data

F = Path("params.yaml")
# The synthetic cameras of params.yaml, seen through a small run: 48 scenes x bursts of 2 frames
# per camera (every other frame sampled: the first of each burst), 48 training images as the
# reference, 12 of them rendered per candidate model (params.yaml renders 16).
SCENES, BURST, TRAIN_IMAGES, RENDERS = 48, 2, 48, 12
MODEL_FIELDS = {"width", "height", "exposure", "wb_gains", "shot_noise", "read_noise", "blur", "blur_px",
                "vignetting", "jpeg_quality"}

# Tolerances, each with what this test measured on these frames (seed 42) and on the repository's
# full camera frames (64 scenes per camera, 64 training images, 16 renders; in brackets):
#   exposure: the G channel's gain, exposure * wb_G, since exposure x white balance is all a frame
#     shows. Measured -3.4 %, +2.3 %, -3.4 % [+1.2 %, +2.9 %, +1.2 %].
EXPOSURE_REL = 0.10
#   wb_gains normalised to G = 1: measured at most 0.035 off [0.009].
WB_ABS = 0.06
#   vignetting strength: measured at most 0.025 off [0.015].
VIGNETTING_ABS = 0.08
#   blur: the family exactly; blur_px measured motion 5 (5), defocus 1.75 (1.5) [5, 1.67], none.
BLUR_PX_ABS = 1.0
#   noise sigma the model renders at grey levels 64, 128 and 192: measured at most 4.8 % off [8.2 %].
NOISE_LEVELS, NOISE_REL = (64.0, 128.0, 192.0), 0.15
#   its two terms (shot and read trade off along the curve): shot measured at most 6 % off [7 %],
#   read at most 18 % [27 %] (read noise comes out high: the curve's low end is under JPEG's floor).
SHOT_REL, READ_REL = 0.20, 0.40
#   width, height and JPEG quality (libjpeg's tables read back): exact.


def _cameras(params: dict[str, Any]) -> list[dict[str, Any]]:
    return params["camera"]["synthetic"]["cameras"]


@pytest.fixture(scope="module")
def profiled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The camera stage's synthetic frames for params.yaml's three cameras, the data stage's
    training images, and the stage run on them (its main(), one MLflow run)."""
    root = tmp_path_factory.mktemp("camera_profile")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["camera"]["synthetic"].update(scenes_per_camera=SCENES, burst_length=BURST)
    params["data"]["synthetic"].update(train_images=TRAIN_IMAGES, val_images=1, test_images=1)
    params["camera_profile"].update(frames_per_camera=SCENES, reference_images=TRAIN_IMAGES, render_images=RENDERS)
    params_path = root / "params.yaml"
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    dp = build(DataParams, params["data"], "data", F)
    cp = build(CameraParams, params["camera"], "camera", F)
    seed = params["base"]["seed"]
    data.synthesize(root / "defects", dp, seed)
    (root / "camera_frames" / "frames").mkdir(parents=True)
    camera.synthesize_frames(root / "camera_frames" / "frames", cp, camera.generator_config(dp), seed)
    out = root / "reports" / "profiles.json"
    started = time.monotonic()
    with mlflow_store(root):  # module-scoped: the per-test MLflow isolation is not active yet
        camera_profile.main(["--frames", str(root / "camera_frames"), "--dataset", str(root / "defects"),
                             "--out", str(out), "--params", str(params_path)])
    return {"root": root, "params": params, "params_path": params_path, "out": out,
            "doc": json.loads(out.read_text()), "seconds": time.monotonic() - started}


@pytest.mark.parametrize("index", range(3))
def test_profile_matches_the_camera_that_made_the_frames(profiled: dict[str, Any], index: int) -> None:
    true = _cameras(profiled["params"])[index]
    entry = profiled["doc"]["cameras"][true["id"]]
    m, e = entry["model"], entry["estimates"]
    assert entry["frames"] == SCENES and e["frames_in_folder"] == SCENES * BURST
    assert (m["width"], m["height"]) == (true["width"], true["height"])
    assert (e["width_px"], e["height_px"]) == (true["width"], true["height"])
    assert e["aspect_ratio"] == round(true["width"] / true["height"], 4)
    assert m["jpeg_quality"] == true["jpeg_quality"] and e["jpeg_table_mismatch"] == 0.0

    g = true["wb_gains"][1]  # only exposure x white balance is visible: compare with G normalised to 1
    assert abs(m["exposure"] / (true["exposure"] * g) - 1) <= EXPOSURE_REL, (m["exposure"], true["exposure"] * g)
    for est, t in zip(m["wb_gains"], true["wb_gains"]):
        assert abs(est - t / g) <= WB_ABS, (m["wb_gains"], [t / g for t in true["wb_gains"]])
    assert m["wb_gains"][1] == 1.0
    assert abs(m["vignetting"] - true["vignetting"]) <= VIGNETTING_ABS, (m["vignetting"], true["vignetting"])

    assert m["blur"] == true["blur"], (m["blur"], m["blur_px"], e["blur_best_fit"])
    assert abs(m["blur_px"] - true["blur_px"]) <= BLUR_PX_ABS, (m["blur_px"], true["blur_px"])

    def sigma(c: dict[str, Any], level: float) -> float:
        return math.sqrt(c["shot_noise"] ** 2 * level + c["read_noise"] ** 2)

    for level in NOISE_LEVELS:
        assert abs(sigma(m, level) / sigma(true, level) - 1) <= NOISE_REL, (level, m, true)
    assert abs(m["shot_noise"] / true["shot_noise"] - 1) <= SHOT_REL, (m["shot_noise"], true["shot_noise"])
    assert abs(m["read_noise"] / true["read_noise"] - 1) <= READ_REL, (m["read_noise"], true["read_noise"])


def test_profiles_document(profiled: dict[str, Any]) -> None:
    doc, params = profiled["doc"], profiled["params"]
    assert set(doc) == {"reference", "cameras"}
    assert doc["reference"]["images"] == TRAIN_IMAGES and doc["reference"]["available"] == TRAIN_IMAGES
    assert sorted(doc["cameras"]) == sorted(c["id"] for c in _cameras(params))
    for entry in doc["cameras"].values():
        assert set(entry["model"]) == MODEL_FIELDS
        assert entry["model"]["blur"] in ("none", "motion", "defocus")
        for key in ("noise_sigma_wavelet", "blur_effect_x", "blur_effect_y", "laplacian_variance",
                    "contrast_std_ratio_centre", "brightness_ratio_centre", "noise_curve"):
            assert key in entry["estimates"], key

    def floats(v: Any) -> list[float]:
        if isinstance(v, float):
            return [v]
        if isinstance(v, dict):
            return [x for w in v.values() for x in floats(w)]
        if isinstance(v, list):
            return [x for w in v for x in floats(w)]
        return []

    assert all(round(x, 4) == x and math.isfinite(x) for x in floats(doc))
    # What train's camera-matched augmentation reads: every model loads and renders.
    from pipeline.imagesets.camera_augment import load_profiles

    loaded = {c.id: c for c in load_profiles(profiled["out"])}
    assert sorted(loaded) == sorted(doc["cameras"])
    cam = loaded["line1-pi"].model
    assert cam.as_dict() == doc["cameras"]["line1-pi"]["model"]  # written and read as the same CameraSettings
    scene = cv2.imread(str(next((profiled["root"] / "defects" / "images" / "train").iterdir())))
    frame = ce.render_references([scene], cam, (0,))[0]
    assert frame.shape == (cam.height, cam.width, 3)
    print(f"camera_profile on 3 cameras: {profiled['seconds']:.1f} s")


def test_estimates_never_read_the_synthetic_camera_settings() -> None:
    """The stage must work on real frames: it reads only `base` and `camera_profile`, and neither it
    nor the estimators know the camera stage's parameter classes."""
    for module in (camera_profile, ce):
        tree = ast.parse(Path(module.__file__).read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
        assert not imported & {"CameraParams", "CameraModelParams", "CameraSyntheticParams"}, module.__name__
        assert "synthetic" not in {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    source = Path(camera_profile.__file__).read_text()
    assert 'stage_params(args, "base", "camera_profile")' in source


def test_deterministic(tmp_path: Path, profiled: dict[str, Any]) -> None:
    """Same frames, same seed: the same document (renders are seeded from base.seed and the camera id)."""
    frames = tmp_path / "camera_frames" / "frames" / "cam"
    frames.mkdir(parents=True)
    for f in sorted((profiled["root"] / "camera_frames" / "frames" / "line1-pi").iterdir())[:16:2]:
        shutil.copyfile(f, frames / f.name)
    settings = {**profiled["params"]["camera_profile"], "frames_per_camera": 0, "reference_images": 8,
                "render_images": 4, "max_blur_px": 4.0}
    p = build(CameraProfileParams, settings, "camera_profile", F)
    base = build(BaseParams, profiled["params"]["base"], "base", F)
    a = camera_profile.build_profiles(tmp_path / "camera_frames", profiled["root"] / "defects", p, base)
    b = camera_profile.build_profiles(tmp_path / "camera_frames", profiled["root"] / "defects", p, base)
    assert a == b
    assert a["cameras"]["cam"]["frames"] == 8 and a["reference"]["images"] == 8


# ------------------------------------------------------------------------------------------
# Bad input: a clear error naming the folder or file and the fix; nothing written
# ------------------------------------------------------------------------------------------


def _break(kind: str, root: Path) -> str:
    """Damage the tree under `root` (camera_frames/, defects/) one way; the message expected."""
    frames = root / "camera_frames" / "frames"
    first = sorted((frames / "line1-pi").iterdir())
    if kind == "no_frames_folder":
        shutil.rmtree(root / "camera_frames")
        (root / "camera_frames").mkdir()
        return "run the camera stage first (dvc repro camera)"
    if kind == "no_camera_folders":
        shutil.rmtree(frames)
        frames.mkdir()
        return "no camera folders"
    if kind == "empty_camera_folder":
        (frames / "line4-new").mkdir()
        return f"camera folder {frames / 'line4-new'} holds no frames"
    if kind == "corrupt_frame":
        first[0].write_bytes(b"not a jpeg")
        return f"image {first[0]}: cannot be decoded"
    if kind == "mixed_sizes":
        cv2.imwrite(str(first[1]), np.zeros((100, 100, 3), np.uint8))
        return "must share one size"
    if kind == "no_training_images":
        shutil.rmtree(root / "defects" / "images" / "train")
        return "run the data stage first (dvc repro data)"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["no_frames_folder", "no_camera_folders", "empty_camera_folder", "corrupt_frame",
                                  "mixed_sizes", "no_training_images"])
def test_bad_input_fails_clearly(tmp_path: Path, profiled: dict[str, Any], kind: str) -> None:
    src = profiled["root"]
    (tmp_path / "camera_frames" / "frames" / "line1-pi").mkdir(parents=True)
    for f in sorted((src / "camera_frames" / "frames" / "line1-pi").iterdir())[:4]:
        shutil.copyfile(f, tmp_path / "camera_frames" / "frames" / "line1-pi" / f.name)
    shutil.copytree(src / "defects", tmp_path / "defects")
    expect = _break(kind, tmp_path)
    p = build(CameraProfileParams, {**profiled["params"]["camera_profile"], "render_images": 2}, "camera_profile", F)
    base = build(BaseParams, profiled["params"]["base"], "base", F)
    with pytest.raises(DatasetError) as err:
        camera_profile.build_profiles(tmp_path / "camera_frames", tmp_path / "defects", p, base)
    assert expect in str(err.value)


def test_a_failed_run_exits_2_and_keeps_the_previous_profiles(tmp_path: Path, profiled: dict[str, Any],
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "reports" / "profiles.json"
    out.parent.mkdir(parents=True)
    out.write_text('{"previous": true}\n')
    (tmp_path / "camera_frames" / "frames" / "cam").mkdir(parents=True)
    (tmp_path / "camera_frames" / "frames" / "cam" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    argv = ["--frames", str(tmp_path / "camera_frames"), "--dataset", str(profiled["root"] / "defects"),
            "--out", str(out), "--params", str(profiled["params_path"])]
    assert run_stage(lambda: camera_profile.main(argv)) == 2
    assert "broken.jpg: cannot be decoded" in capsys.readouterr().err
    assert out.read_text() == '{"previous": true}\n'
    assert [f.name for f in out.parent.iterdir()] == ["profiles.json"]  # no temp file left


def test_render_images_must_come_from_the_references(repo_params: dict[str, Any]) -> None:
    bad = {**repo_params["camera_profile"], "reference_images": 8, "render_images": 16}
    with pytest.raises(ParamsError, match="camera_profile.render_images"):
        build(CameraProfileParams, bad, "camera_profile", F)


# ------------------------------------------------------------------------------------------
# The estimators on inputs with a known answer
# ------------------------------------------------------------------------------------------


def test_jpeg_quality_is_read_exactly_from_the_tables(tmp_path: Path) -> None:
    img = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    for q in (30, 49, 50, 60, 70, 75, 80, 90, 95, 100):
        path = tmp_path / f"q{q}.jpg"
        cv2.imwrite(str(path), img, [cv2.IMWRITE_JPEG_QUALITY, q])
        assert ce.jpeg_quality(path) == (q, 0.0)
    table = ce.ijg_luminance_table(70)
    zigzag = np.empty(64, int)
    zigzag[:] = table[ce.ZIGZAG]  # the same table in stream (zig-zag) order
    assert ce.quality_from_luminance_table(zigzag) == (70, 0.0)
    cv2.imwrite(str(tmp_path / "lossless.png"), img)
    assert ce.jpeg_quality(tmp_path / "lossless.png") == (None, None)


def test_gains_and_vignetting_fit_with_clipping() -> None:
    """Noise-free frames = clip(gains * vignette * reference): the fit recovers both, although the
    brightest blocks of the R channel clip at 255."""
    rng = np.random.default_rng(1)
    w, h, grid = 320, 240, (32, 24)
    refs = rng.uniform(60, 200, (40, 24, 32, 1)) * rng.uniform(0.9, 1.1, (40, 1, 1, 3))
    falloff = ce.vignetting_falloff(w, h, grid)
    gains, strength = np.array([0.8, 1.1, 1.6]), 0.3
    frames = np.minimum(gains * (1 - strength * falloff)[None, :, :, None] * refs, 255.0)
    assert (frames[..., 2] >= 255).mean() > 0.1
    est, s, rms = ce.fit_gains_vignetting(frames, refs, falloff)
    assert np.allclose(est, gains, rtol=2e-3) and abs(s - strength) <= 0.005 and rms < 0.01
    # falloff is the model's own: 1 - strength * falloff is vignette() averaged over each block
    v = cv2.resize(vignette(h, w, strength), grid, interpolation=cv2.INTER_AREA)
    assert np.allclose(1 - strength * falloff, v, atol=1e-5)


def test_noise_model_fit_recovers_shot_and_read_noise() -> None:
    levels = np.array([40.0, 70.0, 100.0, 130.0, 160.0, 190.0])
    kappa = ce.grey_noise_factor(np.array([1.0, 1.0, 1.0]))
    assert kappa == pytest.approx(1.0)
    sigma = np.sqrt(0.8**2 * kappa * levels + 4.0**2)
    shot, read = ce.fit_noise_model(sigma, levels, np.full(6, 100), kappa)
    assert shot == pytest.approx(0.8, rel=1e-6) and read == pytest.approx(4.0, rel=1e-6)
    assert ce.fit_noise_model(np.full(6, 3.0), levels, np.full(6, 100), kappa) == pytest.approx((0.0, 3.0), abs=1e-6)


def test_sample_evenly_takes_the_first_frame_of_each_burst() -> None:
    assert ce.sample_evenly(12, 4) == [0, 3, 6, 9]
    assert ce.sample_evenly(5, 0) == ce.sample_evenly(5, 9) == [0, 1, 2, 3, 4]
