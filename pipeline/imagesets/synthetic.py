"""Procedural steel-surface defect images with exact YOLO boxes (the embedded default dataset).

The six classes are NEU-DET's. Each image is a hot-rolled steel strip seen from above: a grey
surface with rolling streaks along x, grain, mottling, an illumination gradient and a slight
colour cast, plus 0..max_defects defects and some non-defect clutter. What makes it a real
learning problem rather than a toy:

- **small defects**: `small_fraction` of defects are drawn 10-24 px across (at 256 px), where
  YOLOv8n's stride-8 head has only a few cells to work with;
- **low contrast**: each defect's amplitude is drawn from [min_contrast, max_contrast] grey levels
  against grain noise of sigma 2-7, and half the classes can be darker *or* lighter than the strip;
- **clutter**: faint stains, isolated specks and rolling streaks that look defect-like but are not
  labelled, so the detector must learn the classes' shapes, not "anything that is not background";
- **look-alike classes**: pitted_surface vs rolled-in_scale (clusters of small marks that differ in
  shape and orientation), crazing vs scratches (thin dark lines: a network vs one long stroke).

Boxes are exact: each defect is rendered into its own alpha mask and its box is the tight bounds
of mask > 0.25, so the label is exactly what is visible. Everything is drawn from a numpy
Generator seeded per image, so the same seed gives byte-identical files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import cv2
import numpy as np

CLASS_NAMES: tuple[str, ...] = (
    "crazing",
    "inclusion",
    "patches",
    "pitted_surface",
    "rolled-in_scale",
    "scratches",
)

MASK_THRESHOLD = 0.25  # alpha above which a pixel belongs to the defect's box


@dataclass(frozen=True)
class Box:
    """One labelled defect: class index and pixel bounds [x0, x1) x [y0, y1)."""

    cls: int
    x0: int
    y0: int
    x1: int
    y1: int

    def yolo(self, width: int, height: int) -> tuple[int, float, float, float, float]:
        """The YOLO label (cls, cx, cy, w, h), normalised to the image size."""
        return (
            self.cls,
            (self.x0 + self.x1) / 2 / width,
            (self.y0 + self.y1) / 2 / height,
            (self.x1 - self.x0) / width,
            (self.y1 - self.y0) / height,
        )


@dataclass(frozen=True)
class GeneratorConfig:
    """Knobs of the generator (mirrors `data.synthetic` in params.yaml)."""

    image_size: int
    max_defects: int
    empty_fraction: float
    small_fraction: float
    min_contrast: float
    max_contrast: float
    clutter: int


# ------------------------------------------------------------------------------------------
# Background
# ------------------------------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: a cells x cells random grid upsampled bicubically."""
    grid = rng.uniform(-1.0, 1.0, (cells, cells)).astype(np.float32)
    return cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)


def steel_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A float32 grey steel surface (size x size), roughly in [40, 220]."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1) * 2 - 1
    base = rng.uniform(85, 175)
    angle = rng.uniform(0, 2 * math.pi)
    gradient = rng.uniform(0, 35) * (math.cos(angle) * xx + math.sin(angle) * yy)
    cx, cy = rng.uniform(-0.6, 0.6, 2)
    radial = -rng.uniform(0, 30) * ((xx - cx) ** 2 + (yy - cy) ** 2)
    # Rolling streaks: noise that varies along y but is stretched along x (the rolling direction).
    rows = rng.normal(0, 1, (size, 1)).astype(np.float32)
    rows = cv2.GaussianBlur(rows, (1, 0), sigmaX=0.1, sigmaY=rng.uniform(0.6, 2.0))
    streaks = np.repeat(rows, size, axis=1) * rng.uniform(2, 7)
    streaks *= 1 + 0.5 * _smooth_noise(rng, size, 4)  # streak strength varies along the strip
    mottling = _smooth_noise(rng, size, int(rng.integers(6, 14))) * rng.uniform(3, 12)
    grain = rng.normal(0, rng.uniform(2, 7), (size, size)).astype(np.float32)
    grain = cv2.GaussianBlur(grain, (3, 3), rng.uniform(0.3, 0.9))
    return (base + gradient + radial + streaks + mottling + grain).astype(np.float32)


# ------------------------------------------------------------------------------------------
# Defects: each returns an alpha mask in [0, 1] (size x size) and a signed texture in [-1, 1]
# that is multiplied by the contrast. The box is computed from the mask afterwards.
# ------------------------------------------------------------------------------------------

Region = tuple[int, int, int, int]  # x0, y0, w, h


def _canvas(size: int) -> np.ndarray:
    return np.zeros((size, size), np.float32)


def _draw_crazing(rng: np.random.Generator, size: int, r: Region) -> tuple[np.ndarray, np.ndarray]:
    """A network of short, branching, thin dark cracks filling the region."""
    x0, y0, w, h = r
    mask = _canvas(size)
    cracks = max(3, int(w * h / 180))
    for _ in range(cracks):
        x, y = rng.uniform(x0, x0 + w), rng.uniform(y0, y0 + h)
        heading = rng.uniform(0, 2 * math.pi)
        points = [(x, y)]
        for _ in range(int(rng.integers(3, 7))):
            heading += rng.normal(0, 0.7)
            step = rng.uniform(3, 9)
            x = float(np.clip(x + step * math.cos(heading), x0, x0 + w - 1))
            y = float(np.clip(y + step * math.sin(heading), y0, y0 + h - 1))
            points.append((x, y))
        pts = (np.array(points) * 16).astype(np.int32).reshape(-1, 1, 2)
        cv2.polylines(mask, [pts], False, 1.0, 1, cv2.LINE_AA, shift=4)
    return np.clip(mask, 0, 1), -np.ones_like(mask)


def _draw_inclusion(rng: np.random.Generator, size: int, r: Region) -> tuple[np.ndarray, np.ndarray]:
    """1-3 elongated blobs roughly along the rolling direction, mostly dark, sharp-ish edges."""
    x0, y0, w, h = r
    mask = _canvas(size)
    for _ in range(int(rng.integers(1, 4))):
        length = rng.uniform(0.35, 0.5) * w
        width = max(1.5, length / rng.uniform(2.0, 5.0))
        width = min(width, h / 2)
        cx = rng.uniform(x0 + length, x0 + w - length) if w > 2 * length else x0 + w / 2
        cy = rng.uniform(y0 + width, y0 + h - width) if h > 2 * width else y0 + h / 2
        angle = rng.normal(0, 12)
        cv2.ellipse(mask, ((float(cx), float(cy)), (float(2 * length), float(2 * width)), float(angle)),
                    1.0, -1, cv2.LINE_AA)
    mask = cv2.GaussianBlur(mask, (0, 0), 0.8)
    texture = np.full_like(mask, -1.0 if rng.random() < 0.8 else 1.0)
    return np.clip(mask * 1.3, 0, 1), texture


def _draw_patches(rng: np.random.Generator, size: int, r: Region) -> tuple[np.ndarray, np.ndarray]:
    """A large irregular, soft-edged region of different brightness with inner mottling."""
    x0, y0, w, h = r
    mask = _canvas(size)
    blob = _smooth_noise(rng, 64, int(rng.integers(3, 6)))
    yy, xx = np.mgrid[0:64, 0:64].astype(np.float32) / 63 * 2 - 1
    blob = blob * 0.6 + (1 - (xx**2 + yy**2)) * 0.9  # bias to the centre so the blob fills the region
    blob = np.clip((blob - 0.25) * 3, 0, 1)
    blob = cv2.resize(blob, (w, h), interpolation=cv2.INTER_LINEAR)
    mask[y0:y0 + h, x0:x0 + w] = blob
    mask = cv2.GaussianBlur(mask, (0, 0), 1.5)
    texture = (-1.0 if rng.random() < 0.7 else 1.0) * (0.75 + 0.25 * _smooth_noise(rng, size, 24))
    return mask, texture.astype(np.float32)


def _draw_pitted(rng: np.random.Generator, size: int, r: Region) -> tuple[np.ndarray, np.ndarray]:
    """A cluster of small round dark pits, denser in the middle, on a faintly darker area."""
    x0, y0, w, h = r
    mask = _canvas(size)
    n = max(6, int(w * h / rng.uniform(40, 90)))
    xs = np.clip(rng.normal(x0 + w / 2, w / 4, n), x0 + 1, x0 + w - 2)
    ys = np.clip(rng.normal(y0 + h / 2, h / 4, n), y0 + 1, y0 + h - 2)
    for x, y in zip(xs, ys):
        radius = rng.uniform(0.8, 2.2)
        cv2.circle(mask, (int(x * 16), int(y * 16)), int(radius * 16), 1.0, -1, cv2.LINE_AA, shift=4)
    haze = _canvas(size)
    cv2.ellipse(haze, ((x0 + w / 2, y0 + h / 2), (w * 0.9, h * 0.9), 0), 0.3, -1, cv2.LINE_AA)
    haze = cv2.GaussianBlur(haze, (0, 0), max(w, h) / 8)
    return np.clip(np.maximum(mask, haze), 0, 1), -np.ones_like(mask)


def _draw_scale(rng: np.random.Generator, size: int, r: Region) -> tuple[np.ndarray, np.ndarray]:
    """Rolled-in scale: many small flat flakes stretched along x, mixed bright and dark."""
    x0, y0, w, h = r
    mask = _canvas(size)
    texture = _canvas(size)
    n = max(5, int(w * h / rng.uniform(60, 140)))
    for _ in range(n):
        fw, fh = min(rng.uniform(3, 9), w - 1), min(rng.uniform(1.2, 3.0), h - 1)
        cx = rng.uniform(x0 + fw / 2, x0 + w - fw / 2)
        cy = rng.uniform(y0 + fh / 2, y0 + h - fh / 2)
        jagged = np.array(
            [(cx + fw / 2 * math.cos(t) * rng.uniform(0.6, 1.0), cy + fh / 2 * math.sin(t) * rng.uniform(0.5, 1.0))
             for t in np.linspace(0, 2 * math.pi, 7, endpoint=False)]
        )
        pts = (jagged * 16).astype(np.int32).reshape(-1, 1, 2)
        cv2.fillPoly(mask, [pts], 1.0, cv2.LINE_AA, shift=4)
        cv2.fillPoly(texture, [pts], float(rng.choice([-1.0, -0.7, 0.8])), cv2.LINE_AA, shift=4)
    return np.clip(mask, 0, 1), np.where(texture == 0, -1.0, texture).astype(np.float32)


def _draw_scratch(rng: np.random.Generator, size: int, r: Region) -> tuple[np.ndarray, np.ndarray]:
    """One long thin stroke corner-to-corner of the region, slightly curved, bright or dark."""
    x0, y0, w, h = r
    mask = _canvas(size)
    if rng.random() < 0.5:
        start, end = np.array([x0, y0]), np.array([x0 + w - 1, y0 + h - 1])
    else:
        start, end = np.array([x0, y0 + h - 1]), np.array([x0 + w - 1, y0])
    bend = rng.normal(0, 0.08) * np.array([-(end - start)[1], (end - start)[0]])
    t = np.linspace(0, 1, 24)[:, None]
    curve = start + (end - start) * t + bend * 4 * t * (1 - t)
    curve = np.clip(curve, [x0, y0], [x0 + w - 1, y0 + h - 1])
    pts = (curve * 16).astype(np.int32).reshape(-1, 1, 2)
    cv2.polylines(mask, [pts], False, 1.0, int(rng.integers(1, 3)), cv2.LINE_AA, shift=4)
    texture = np.full_like(mask, 1.0 if rng.random() < 0.5 else -1.0)
    return np.clip(mask * 1.2, 0, 1), texture


Drawer = Callable[[np.random.Generator, int, Region], tuple[np.ndarray, np.ndarray]]

# class index -> (drawer, (min, max) region size as a fraction of the image, aspect range)
_DEFECTS: dict[int, tuple[Drawer, tuple[float, float], tuple[float, float]]] = {
    0: (_draw_crazing, (0.15, 0.42), (0.6, 1.6)),
    1: (_draw_inclusion, (0.08, 0.25), (1.8, 4.0)),
    2: (_draw_patches, (0.18, 0.50), (0.6, 1.6)),
    3: (_draw_pitted, (0.10, 0.32), (0.7, 1.4)),
    4: (_draw_scale, (0.14, 0.40), (1.2, 2.5)),
    5: (_draw_scratch, (0.15, 0.60), (0.25, 4.0)),
}
_SMALL = (10, 24)  # pixels at 256 px; scaled with image size

# Thin-line defects carry little signal per pixel: a 1-px stroke at the bottom of the contrast
# range vanishes in the grain, which would be label noise, not difficulty. Real scratches and
# cracks catch the light, so their amplitude is scaled up (still capped by max_contrast * gain).
_CONTRAST_GAIN = {0: 1.25, 5: 1.6}


# ------------------------------------------------------------------------------------------
# Clutter: defect-like marks that are NOT labelled.
# ------------------------------------------------------------------------------------------


def _add_clutter(rng: np.random.Generator, img: np.ndarray, count: int) -> None:
    size = img.shape[0]
    for _ in range(count):
        kind = rng.integers(0, 3)
        if kind == 0:  # a faint, very soft stain
            stain = _canvas(size)
            c = rng.uniform(0, size, 2)
            axes = rng.uniform(0.05, 0.2, 2) * size
            box = ((float(c[0]), float(c[1])), (float(axes[0]), float(axes[1])), float(rng.uniform(0, 180)))
            cv2.ellipse(stain, box, 1.0, -1, cv2.LINE_AA)
            img += cv2.GaussianBlur(stain, (0, 0), size / 25) * rng.uniform(-8, 8)
        elif kind == 1:  # isolated specks of dust
            for _ in range(int(rng.integers(1, 4))):
                x, y = rng.integers(0, size, 2)
                cv2.circle(img, (int(x), int(y)), 1, float(img[y, x] + rng.uniform(-25, 25)), -1, cv2.LINE_AA)
        else:  # a faint rolling streak along x
            y = int(rng.integers(0, size))
            x0, x1 = sorted(rng.integers(0, size, 2).tolist())
            streak = _canvas(size)
            cv2.line(streak, (x0, y), (x1, y), 1.0, 1, cv2.LINE_AA)
            img += cv2.GaussianBlur(streak, (0, 0), 1.0) * rng.uniform(-6, 6)


# ------------------------------------------------------------------------------------------
# Image assembly
# ------------------------------------------------------------------------------------------


def _iou(a: Region, b: Region) -> float:
    ax1, ay1, bx1, by1 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    iw = max(0, min(ax1, bx1) - max(a[0], b[0]))
    ih = max(0, min(ay1, by1) - max(a[1], b[1]))
    inter = iw * ih
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def _sample_region(rng: np.random.Generator, cls: int, size: int, small: bool) -> Region:
    _, (lo, hi), (alo, ahi) = _DEFECTS[cls]
    aspect = math.exp(rng.uniform(math.log(alo), math.log(ahi)))
    if small:
        s = rng.uniform(*_SMALL) * size / 256
        # Keep small boxes at least 6 px on their short side so they remain visible.
        w = max(6.0, s * math.sqrt(aspect))
        h = max(6.0, s / math.sqrt(aspect))
    else:
        area = (rng.uniform(lo, hi) * size) ** 2
        w, h = math.sqrt(area * aspect), math.sqrt(area / aspect)
    w, h = int(min(w, size * 0.9)), int(min(h, size * 0.9))
    x0 = int(rng.integers(2, size - w - 1))
    y0 = int(rng.integers(2, size - h - 1))
    return x0, y0, w, h


def render_image(rng: np.random.Generator, cfg: GeneratorConfig) -> tuple[np.ndarray, list[Box]]:
    """Draw one BGR uint8 image and its exact boxes from `rng` according to `cfg`."""
    size = cfg.image_size
    img = steel_background(rng, size)
    _add_clutter(rng, img, int(rng.integers(0, cfg.clutter + 1)))
    boxes: list[Box] = []
    regions: list[Region] = []
    count = 0 if rng.random() < cfg.empty_fraction else int(rng.integers(1, cfg.max_defects + 1))
    for _ in range(count):
        cls = int(rng.integers(0, len(CLASS_NAMES)))
        # A patch is by nature large; every other class can appear small.
        small = cls != 2 and rng.random() < cfg.small_fraction
        for _attempt in range(20):  # reject heavy overlaps so every defect stays identifiable
            region = _sample_region(rng, cls, size, small)
            if all(_iou(region, other) < 0.1 for other in regions):
                break
        else:
            continue
        drawer = _DEFECTS[cls][0]
        mask, texture = drawer(rng, size, region)
        ys, xs = np.nonzero(mask > MASK_THRESHOLD)
        if len(xs) == 0:
            continue
        # Small AND faint would be invisible, i.e. label noise: small defects take the upper
        # 60% of the contrast range, large ones the whole range.
        lo = cfg.min_contrast + (0.4 * (cfg.max_contrast - cfg.min_contrast) if small else 0.0)
        contrast = rng.uniform(lo, cfg.max_contrast) * _CONTRAST_GAIN.get(cls, 1.0)
        img += mask * texture * contrast
        regions.append(region)
        boxes.append(Box(cls, int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))
    # A slight per-image colour cast: steel under different lamps is not perfectly grey.
    tint = rng.uniform(0.94, 1.06, 3).astype(np.float32)
    bgr = np.clip(img[:, :, None] * tint[None, None, :], 0, 255).astype(np.uint8)
    return bgr, boxes


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The Generator for one image: independent of every other image, fixed by (seed, split, index)."""
    split_key = sum(ord(c) * 31**i for i, c in enumerate(split)) % (2**31)
    return np.random.default_rng([seed, split_key, index])
