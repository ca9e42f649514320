"""The deployment-camera forward model: how a camera turns a scene into the frame it delivers.

One model, used in both directions: the `camera` stage renders synthetic deployment frames with
it (settings from params.yaml), and `train`'s camera-matched augmentation renders training
images through the cameras the `camera_profile` stage estimated from unlabelled frames. The
model: resize to the sensor size (a non-square sensor stretches the scene), blur (motion streak
along x or a defocus disc), exposure and white-balance gains, radial vignetting, shot + read
noise, JPEG. Any object with the attributes of `CameraModel` can be rendered; `CameraSettings`
is the one estimated profiles are written and read as (stage camera_profile, train).
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from typing import Any, Literal, Mapping, Protocol

import cv2
import numpy as np

BlurKind = Literal["none", "motion", "defocus"]
BLURS: tuple[BlurKind, ...] = ("none", "motion", "defocus")


class CameraModel(Protocol):
    """The settings `camera_frame` reads (params.yaml's camera models and estimated profiles both have them)."""

    width: int
    height: int
    shot_noise: float
    read_noise: float
    blur: BlurKind
    blur_px: float
    vignetting: float
    jpeg_quality: int | None


@dataclass(frozen=True)
class CameraSettings:
    """A camera model as estimated from its frames: what `camera_frame` renders with.

    `jpeg_quality` is None for lossless frames (PNG): no JPEG step. Render with
    `camera_frame(scene, cam, rng, cam.exposure, np.array(cam.wb_gains), (0, 0))`, then JPEG.
    """

    width: int
    height: int
    exposure: float  # gain on the G channel relative to the training images
    wb_gains: tuple[float, float, float]  # B, G, R, normalised so G = 1
    shot_noise: float  # sigma^2 = shot_noise^2 * level + read_noise^2 (level 0-255, after the gains)
    read_noise: float
    blur: BlurKind
    blur_px: float  # motion: streak length along x; defocus: disc radius
    vignetting: float  # brightness lost in the corners
    jpeg_quality: int | None

    def as_dict(self) -> dict[str, Any]:
        """The model as profiles.json holds it (floats to 4 decimals)."""
        return rounded(asdict(self))

    def noise_sigma(self, level: float) -> float:
        """The model's noise sigma (grey levels) at grey level `level`."""
        return math.sqrt(self.shot_noise**2 * max(level, 0.0) + self.read_noise**2)

    @classmethod
    def from_dict(cls, m: Mapping[str, Any], name: str) -> "CameraSettings":
        """Read `as_dict()`'s document back; ValueError/KeyError/TypeError naming camera `name` when it is not one."""
        blur = m["blur"]
        if blur not in BLURS:
            raise ValueError(f"camera {name}: blur {blur!r} is not one of {BLURS}")
        wb = tuple(float(v) for v in m["wb_gains"])
        if len(wb) != 3:
            raise ValueError(f"camera {name}: wb_gains needs 3 values (B, G, R), got {len(wb)}")
        jpeg = m.get("jpeg_quality")
        cam = cls(width=int(m["width"]), height=int(m["height"]), exposure=float(m["exposure"]),
                  wb_gains=wb,  # type: ignore[arg-type]
                  shot_noise=float(m["shot_noise"]), read_noise=float(m["read_noise"]), blur=blur,
                  blur_px=float(m["blur_px"]), vignetting=float(m["vignetting"]),
                  jpeg_quality=None if jpeg is None else int(jpeg))
        if cam.width < 8 or cam.height < 8 or cam.exposure <= 0 or min(cam.wb_gains) <= 0:
            raise ValueError(f"camera {name}: implausible model {dict(m)}")
        return cam


def rounded(value: Any) -> Any:
    """`value` with every float (also inside lists, tuples and dicts) rounded to 4 decimals."""
    if isinstance(value, (float, np.floating)):
        return round(float(value), 4)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v) for v in value]
    return value




def blur_kernel(cam: CameraModel) -> np.ndarray | None:
    """The camera's point-spread function, or None when it has no blur.

    Motion: a horizontal streak (the strip moves along x, the rolling direction). Defocus: a disc.
    """
    if cam.blur == "none" or cam.blur_px <= 0:
        return None
    if cam.blur == "motion":
        length = max(1, int(round(cam.blur_px)))
        k = np.zeros((length | 1, length | 1), np.float32)  # odd size so the streak is centred
        k[k.shape[0] // 2, (k.shape[1] - length) // 2:(k.shape[1] - length) // 2 + length] = 1.0
    else:
        radius = cam.blur_px
        size = 2 * int(np.ceil(radius)) + 1
        yy, xx = np.mgrid[:size, :size].astype(np.float32) - size // 2
        # Anti-aliased disc: a hard disc of radius < 1 px would be a no-op.
        k = np.clip(radius + 0.5 - np.sqrt(xx**2 + yy**2), 0.0, 1.0)
    return k / k.sum()


def vignette(height: int, width: int, strength: float) -> np.ndarray:
    """Radial fall-off (H, W) float32: 1 at the centre, 1 - strength in the corners."""
    yy, xx = np.mgrid[:height, :width].astype(np.float32)
    r2 = ((xx - (width - 1) / 2) / (width / 2)) ** 2 + ((yy - (height - 1) / 2) / (height / 2)) ** 2
    return (1.0 - strength * r2 / 2.0).astype(np.float32)  # r2 is 2 in the corners


def camera_frame(scene: np.ndarray, cam: CameraModel, rng: np.random.Generator | None,
                 exposure: float, wb_gains: np.ndarray, shift_xy: tuple[float, float],
                 noise: np.ndarray | None = None) -> np.ndarray:
    """Render the square BGR uint8 `scene` as camera `cam` would deliver it (BGR uint8, H x W).

    `exposure` and `wb_gains` are this scene's (jittered) values; `shift_xy` moves the scene
    by sub-pixel amounts (vibration between frames of a burst). Noise is drawn from `rng`, or
    (`rng` None) taken from `noise` (standard normal, float32, cam.height x cam.width x 3; overwritten), which
    lets the training augmentation reuse a bank of noise fields instead of drawing one per image.
    Box labels stay exact: the resize is of the whole frame, so normalised YOLO coordinates
    are unchanged, and the shift is only used for unlabelled frames.
    """
    img = scene.astype(np.float32)
    if shift_xy != (0.0, 0.0):
        m = np.float32([[1, 0, shift_xy[0]], [0, 1, shift_xy[1]]])
        img = cv2.warpAffine(img, m, (img.shape[1], img.shape[0]), flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_REFLECT)
    shrink = cam.width < img.shape[1] or cam.height < img.shape[0]
    img = cv2.resize(img, (cam.width, cam.height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    kernel = blur_kernel(cam)
    if kernel is not None:
        img = cv2.filter2D(img, -1, kernel, borderType=cv2.BORDER_REFLECT)
    img *= np.float32(exposure)
    img *= wb_gains.astype(np.float32)[None, None, :]
    img *= _vignette(cam.height, cam.width, cam.vignetting)[:, :, None]
    # In place, in float32: train's augmentation renders every other training image through
    # this function inside the dataloader, so array temporaries cost epoch time.
    sigma = np.maximum(img, np.float32(0.0))
    sigma *= np.float32(cam.shot_noise**2)
    sigma += np.float32(cam.read_noise**2)
    np.sqrt(sigma, out=sigma)
    if noise is None:
        if rng is None:
            raise ValueError("camera_frame needs a generator or a noise field")
        noise = rng.standard_normal(img.shape, dtype=np.float32)
    elif noise.shape != img.shape:
        raise ValueError(f"noise field is {noise.shape}, the frame {img.shape}")
    noise *= sigma
    img += noise
    np.rint(img, out=img)
    np.clip(img, 0, 255, out=img)
    return img.astype(np.uint8)


@functools.lru_cache(maxsize=64)
def _vignette(height: int, width: int, strength: float) -> np.ndarray:
    """`vignette`, cached (a camera renders many frames at one size); read-only."""
    v = vignette(height, width, strength)
    v.flags.writeable = False
    return v


def encode_jpeg(img: np.ndarray, quality: int) -> bytes:
    """JPEG bytes of a BGR uint8 image (the camera's own compression)."""
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {img.shape} frame as JPEG")
    return buf.tobytes()


def decode_jpeg(data: bytes) -> np.ndarray:
    """BGR uint8 image from JPEG bytes (the inverse of `encode_jpeg`)."""
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
