"""Camera-matched augmentation: training images rendered through the deployment cameras' profiles.

The `camera_profile` stage estimates, from each camera's unlabelled frames, a camera model
(sensor size, exposure, colour cast, blur, vignetting, noise, JPEG quality; see
`pipeline/imagesets/camera_model.py`). Here a training image is, with probability
`probability`, rendered through one of those cameras (picked uniformly), exactly as the camera
stage renders a scene: stretched to the sensor's size, blurred, exposed, tinted, vignetted,
noised and JPEG-compressed; then resized so its long side is the training size, as the
detector's letterbox does with a camera frame at inference. YOLO labels are normalised, so they
stay exact through the stretch.

`strength` scales every photometric effect between none (0) and the profile's estimate (1),
and `jitter` varies exposure, white balance, blur and noise per image (relative, uniform), so
the model sees a neighbourhood of each camera rather than one point estimate of it.

Randomness comes from Python's `random` module, which Ultralytics seeds per dataloader worker
from `base.seed` (`seed_worker`), so a training run with the augmentation on stays
bit-reproducible per CPU type.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import cv2
import numpy as np

from pipeline.imagesets.camera_model import camera_frame, decode_jpeg, encode_jpeg

BLURS = ("none", "motion", "defocus")


class ProfileError(ValueError):
    """The profiles file is missing or malformed; the message names the file and the fix."""


@dataclass(frozen=True)
class ProfiledCamera:
    """One camera model as estimated from its frames (the fields `camera_frame` renders with)."""

    id: str
    width: int
    height: int
    exposure: float
    wb_gains: tuple[float, float, float]  # B, G, R
    shot_noise: float
    read_noise: float
    blur: Literal["none", "motion", "defocus"]
    blur_px: float
    vignetting: float
    jpeg_quality: int  # 100 for a lossless source (PNG frames)


def load_profiles(path: Path) -> list[ProfiledCamera]:
    """The camera models in `path` (reports/camera_profile/profiles.json), sorted by camera id."""
    if not path.is_file():
        raise ProfileError(f"{path} not found; run the camera_profile stage first (dvc repro camera_profile), "
                           "or set train.camera_match.enabled: false")
    try:
        doc = json.loads(path.read_text())
        cameras = doc["cameras"]
        out = [_camera(cid, entry["model"]) for cid, entry in sorted(cameras.items())]
    except (ValueError, KeyError, TypeError) as e:
        raise ProfileError(f"{path}: not a camera profile document ({type(e).__name__}: {e}); "
                           "re-run the camera_profile stage (dvc repro camera_profile)") from e
    if not out:
        raise ProfileError(f"{path}: no cameras; the camera stage wrote no frames folders (check camera.source)")
    return out


def _camera(cid: str, m: dict[str, Any]) -> ProfiledCamera:
    blur = m["blur"]
    if blur not in BLURS:
        raise ValueError(f"camera {cid}: blur {blur!r} is not one of {BLURS}")
    wb = tuple(float(v) for v in m["wb_gains"])
    if len(wb) != 3:
        raise ValueError(f"camera {cid}: wb_gains needs 3 values (B, G, R), got {len(wb)}")
    jpeg = m.get("jpeg_quality")
    cam = ProfiledCamera(
        id=cid, width=int(m["width"]), height=int(m["height"]), exposure=float(m["exposure"]),
        wb_gains=wb,  # type: ignore[arg-type]
        shot_noise=float(m["shot_noise"]), read_noise=float(m["read_noise"]), blur=blur,
        blur_px=float(m["blur_px"]), vignetting=float(m["vignetting"]),
        jpeg_quality=100 if jpeg is None else int(jpeg),
    )
    if cam.width < 8 or cam.height < 8 or cam.exposure <= 0 or min(cam.wb_gains) <= 0:
        raise ValueError(f"camera {cid}: implausible model {m}")
    return cam


def scaled(cam: ProfiledCamera, strength: float, rng: random.Random,
           jitter: float) -> tuple[ProfiledCamera, float, np.ndarray]:
    """`cam` with its effects scaled by `strength` and jittered: (model, exposure, wb_gains).

    Multiplicative effects (exposure, gains) scale in log space, additive ones (blur, noise,
    vignetting, JPEG loss) linearly, so strength 0 is the identity and 1 the estimate.
    """

    def jit(x: float) -> float:
        return x * (1.0 + rng.uniform(-jitter, jitter))

    exposure = jit(cam.exposure ** strength)
    wb = np.array([jit(g ** strength) for g in cam.wb_gains], np.float64)
    model = ProfiledCamera(
        id=cam.id, width=cam.width, height=cam.height, exposure=exposure,
        wb_gains=tuple(float(g) for g in wb),  # type: ignore[arg-type]
        shot_noise=max(0.0, jit(cam.shot_noise * strength)), read_noise=max(0.0, jit(cam.read_noise * strength)),
        blur=cam.blur, blur_px=max(0.0, jit(cam.blur_px * strength)),
        vignetting=min(0.95, max(0.0, cam.vignetting * strength)),
        jpeg_quality=int(round(100 - strength * (100 - cam.jpeg_quality))),
    )
    return model, exposure, wb


def render_through(img: np.ndarray, cam: ProfiledCamera, strength: float, jitter: float, long_side: int,
                   rng: random.Random) -> np.ndarray:
    """BGR uint8 `img` as camera `cam` would deliver it, resized to `long_side` (the detector's letterbox)."""
    model, exposure, wb = scaled(cam, strength, rng, jitter)
    noise = np.random.default_rng(rng.getrandbits(64))
    frame = camera_frame(img, model, noise, exposure, wb, (0.0, 0.0))
    if model.jpeg_quality < 100:
        frame = decode_jpeg(encode_jpeg(frame, model.jpeg_quality))
    h, w = frame.shape[:2]
    r = long_side / max(h, w)
    size = (max(1, round(w * r)), max(1, round(h * r)))
    return cv2.resize(frame, size, interpolation=cv2.INTER_AREA if r < 1 else cv2.INTER_LINEAR)


class CameraAugment:
    """Ultralytics label-dict transform: renders `label["img"]` through a random profiled camera.

    Applied where the dataset hands out an image (`get_image_and_label`), before mosaic and the
    geometric augmentation, so the camera acts at its own resolution, as it does on the line.
    """

    def __init__(self, cameras: Sequence[ProfiledCamera], probability: float, strength: float, jitter: float,
                 long_side: int) -> None:
        self.cameras, self.probability = list(cameras), probability
        self.strength, self.jitter, self.long_side = strength, jitter, long_side
        self.applied = 0

    def __call__(self, label: dict[str, Any]) -> dict[str, Any]:
        """Render the image of `label` (in place) with probability `probability`; return `label`."""
        if not self.cameras or random.random() >= self.probability:
            return label
        cam = self.cameras[random.randrange(len(self.cameras))]
        # A per-image generator drawn from the worker-seeded `random`: reproducible, and the
        # draw does not depend on how many numbers the camera model consumed before.
        rng = random.Random(random.getrandbits(64))
        img = render_through(label["img"], cam, self.strength, self.jitter, self.long_side, rng)
        label["img"] = img
        label["resized_shape"] = img.shape[:2]
        self.applied += 1
        return label


def wrap_dataset(dataset: Any, augment: CameraAugment) -> None:
    """Make `dataset` (an Ultralytics YOLODataset) hand out camera-rendered images.

    Mosaic and mixup fetch their extra images through `dataset.get_image_and_label` too, so
    wrapping that one method covers every image a batch is built from; the dataset's image
    buffer keeps the unrendered image, so each use draws a fresh camera.
    """
    original = dataset.get_image_and_label

    def get_image_and_label(index: int) -> dict[str, Any]:
        return augment(original(index))

    dataset.get_image_and_label = get_image_and_label
