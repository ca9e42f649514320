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

Randomness comes from Python's `random` module, which Ultralytics seeds from `base.seed` (and per
dataloader worker, `seed_worker`), so a training run with the augmentation on stays
bit-reproducible per CPU type.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np

from pipeline.imagesets.camera_model import CameraSettings, camera_frame, decode_jpeg, encode_jpeg


class ProfileError(ValueError):
    """The profiles file is missing or malformed; the message names the file and the fix."""


@dataclass(frozen=True)
class ProfiledCamera:
    """One camera of profiles.json: its folder name and the model estimated from its frames."""

    id: str
    model: CameraSettings


def load_profiles(path: Path) -> list[ProfiledCamera]:
    """The camera models in `path` (reports/camera_profile/profiles.json), sorted by camera id."""
    if not path.is_file():
        raise ProfileError(f"{path} not found; run the camera_profile stage first (dvc repro camera_profile), "
                           "or set train.camera_match.enabled: false")
    try:
        doc = json.loads(path.read_text())
        cameras = doc["cameras"]
        out = [ProfiledCamera(cid, CameraSettings.from_dict(entry["model"], cid))
               for cid, entry in sorted(cameras.items())]
    except (ValueError, KeyError, TypeError) as e:
        raise ProfileError(f"{path}: not a camera profile document ({type(e).__name__}: {e}); "
                           "re-run the camera_profile stage (dvc repro camera_profile)") from e
    if not out:
        raise ProfileError(f"{path}: no cameras; the camera stage wrote no frames folders (check camera.source)")
    return out


def scaled(cam: CameraSettings, strength: float, rng: random.Random,
           jitter: float) -> tuple[CameraSettings, float, np.ndarray]:
    """`cam` with its effects scaled by `strength` and jittered: (model, exposure, wb_gains).

    Multiplicative effects (exposure, gains) scale in log space, additive ones (blur, noise,
    vignetting, JPEG loss) linearly, so strength 0 is the identity and 1 the estimate.
    """

    def jit(x: float) -> float:
        return x * (1.0 + rng.uniform(-jitter, jitter))

    exposure = jit(cam.exposure ** strength)
    wb = np.array([jit(g ** strength) for g in cam.wb_gains], np.float64)
    model = CameraSettings(
        width=cam.width, height=cam.height, exposure=exposure,
        wb_gains=tuple(float(g) for g in wb),  # type: ignore[arg-type]
        shot_noise=max(0.0, jit(cam.shot_noise * strength)), read_noise=max(0.0, jit(cam.read_noise * strength)),
        blur=cam.blur, blur_px=max(0.0, jit(cam.blur_px * strength)),
        vignetting=min(0.95, max(0.0, cam.vignetting * strength)),
        jpeg_quality=None if cam.jpeg_quality is None else int(round(100 - strength * (100 - cam.jpeg_quality))),
    )
    return model, exposure, wb


class NoiseBank:
    """Standard-normal noise fields, drawn once per camera size and handed out as random crops.

    Drawing 320x240x3 normal deviates per image was half of a render's time, and the dataloader
    runs in the training process on a CPU (Ultralytics sets workers=0 there), so it was epoch
    time. A crop at a random offset of a field twice the frame's size, randomly flipped, is
    noise the model cannot learn: the offsets alone give about 80 000 different fields.
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed, self._fields = seed, {}  # type: dict[tuple[int, int], np.ndarray]

    def crop(self, height: int, width: int, rng: random.Random) -> np.ndarray:
        """A (height, width, 3) float32 standard-normal field (a fresh copy: the caller may write it)."""
        field = self._fields.get((height, width))
        if field is None:
            gen = np.random.default_rng([self.seed, height, width])
            field = self._fields[(height, width)] = gen.standard_normal((2 * height, 2 * width, 3), np.float32)
        y, x = rng.randrange(height), rng.randrange(width)
        out = field[y:y + height, x:x + width]
        if rng.random() < 0.5:
            out = out[::-1]
        if rng.random() < 0.5:
            out = out[:, ::-1]
        return np.ascontiguousarray(out)  # a copy: camera_frame scales it in place


_BANK = NoiseBank()


def render_through(img: np.ndarray, cam: CameraSettings, strength: float, jitter: float, long_side: int,
                   rng: random.Random) -> np.ndarray:
    """BGR uint8 `img` as camera `cam` would deliver it, resized to `long_side` (the detector's letterbox)."""
    model, exposure, wb = scaled(cam, strength, rng, jitter)
    noise = _BANK.crop(cam.height, cam.width, rng)
    frame = camera_frame(img, model, None, exposure, wb, (0.0, 0.0), noise)
    if model.jpeg_quality is not None and model.jpeg_quality < 100:
        frame = decode_jpeg(encode_jpeg(frame, model.jpeg_quality))
    h, w = frame.shape[:2]
    r = long_side / max(h, w)
    size = (max(1, round(w * r)), max(1, round(h * r)))
    return cv2.resize(frame, size, interpolation=cv2.INTER_AREA if r < 1 else cv2.INTER_LINEAR)


class CameraAugment:
    """Renders a training image through a random profiled camera, with probability `probability`."""

    def __init__(self, cameras: Sequence[ProfiledCamera], probability: float, strength: float, jitter: float,
                 long_side: int) -> None:
        self.cameras, self.probability = list(cameras), probability
        self.strength, self.jitter, self.long_side = strength, jitter, long_side
        self.applied = 0

    def __call__(self, img: np.ndarray) -> np.ndarray:
        """`img` (BGR uint8) rendered through one of the cameras, or `img` itself."""
        if not self.cameras or random.random() >= self.probability:
            return img
        cam = self.cameras[random.randrange(len(self.cameras))]
        # A per-image generator drawn from the worker-seeded `random`: reproducible, and the
        # draw does not depend on how many numbers the camera model consumed before.
        rng = random.Random(random.getrandbits(64))
        self.applied += 1
        return render_through(img, cam.model, self.strength, self.jitter, self.long_side, rng)


def wrap_dataset(dataset: Any, augment: CameraAugment) -> None:
    """Make `dataset` (an Ultralytics YOLODataset) load camera-rendered images.

    The hook is `load_image`, where an image is read from disk: Ultralytics keeps the loaded image
    in a buffer from which mosaic draws its other three tiles, so the rendered image is stored
    there and reused like the raw one would be, and an epoch renders about one image per
    training image instead of one per tile (the dataloader runs in the training process on a
    CPU, so every render is epoch time). The rendered image has the camera's aspect ratio, with
    the long side at the training size; YOLO labels are normalised, so they stay exact.
    """
    original = dataset.load_image

    def load_image(i: int, *args: Any, **kwargs: Any) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
        if dataset.ims[i] is not None:  # in the buffer: already rendered (or left as is) when it was loaded
            return original(i, *args, **kwargs)
        im, hw0, _ = original(i, *args, **kwargs)
        out = augment(im)
        if dataset.ims[i] is im:  # buffered for mosaic: keep the rendered image there
            dataset.ims[i], dataset.im_hw[i] = out, out.shape[:2]
        return out, hw0, out.shape[:2]

    dataset.load_image = load_image
