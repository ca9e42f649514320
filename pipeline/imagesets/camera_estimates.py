"""Camera profiles from unlabelled frames: how a deployment camera makes images look.

The `camera_profile` stage describes each camera twice, from its frames alone plus the training
images as the reference domain (the camera sees the same kind of product, so exposure, colour
cast, contrast, blur and noise are measured RELATIVE to the training set):

- **raw estimates**, each from a standard estimator: the frame size; the JPEG quality from the
  file's luminance quantization table (the IJG/libjpeg quality scaling); brightness, contrast and
  grey-world colour ratios in the centre of the frame; noise as Donoho's wavelet MAD
  (`skimage.restoration.estimate_sigma`) globally and per block (the noise curve over grey
  level); blur as `skimage.measure.blur_effect` per axis and the variance of the Laplacian.
- **a renderable camera model**, the fields `camera_model.camera_frame` reads (plus the JPEG
  quality), fitted by analysis by synthesis where the raw outputs are not the parameters
  themselves: JPEG, scene texture and the resize to the sensor all move `estimate_sigma` and
  `blur_effect`, so reference images are rendered through candidate models with `camera_frame`
  + `encode_jpeg`, the same estimators run on the renders, and the candidate whose outputs match
  the camera's is kept.

The fit, in order (each step only needs the ones before it):

1. size and JPEG quality, read off the files (exact for libjpeg/OpenCV frames);
2. per-channel gains and vignetting, jointly, on block means: the mean frame over all frames
   against the mean reference image at the sensor size, with clipping at 255 modelled, so an
   over-exposed camera is not under-estimated. Gains are identifiable only as exposure x white
   balance per channel: exposure is the G gain and `wb_gains` are normalised to G = 1;
3. noise (shot + read) and blur, which trade off (noise adds high-frequency power, blur takes it
   away, so "less blur and less noise" can look like "more of both"):
   - the noise *shape*: the per-block wavelet sigma (estimate_sigma's estimator on 32 x 32 px
     blocks) binned by grey level; renders with constant noise sigma_k (the camera's gains,
     vignetting and JPEG) give per bin the curve from true sigma to statistic, which inverts the
     camera's statistic to a sigma per level; `sigma^2 = shot_noise^2 * level + read_noise^2` is
     then a least-squares fit;
   - the blur: the frames' mean row and column power spectra (Hann periodograms, log power in
     bands) against those of renders through each candidate, as a chi-square with each band's
     standard error; every candidate gets the common noise scale (on shot and read) that fits it
     best (Gauss-Newton). Coarse candidates across none / motion / defocus, a local search in
     the best family; a blur is kept only if it lowers no blur's chi-square by `BLUR_MIN_GAIN`;
   - the noise again: its shape with the chosen blur, then its scale fitted on the spectra.
   `blur_effect` and the Laplacian variance are reported as raw estimates; they mix blur with
   noise (noise looks sharp), which is why the fit compares spectra.

Everything is deterministic: frames and references are sampled evenly in sorted order, and every
render of reference image k draws its noise from a generator seeded by (seed, camera, k), the
same for every candidate (common random numbers, so candidates differ only by their parameters).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import cv2
import numpy as np
import pywt
from PIL import Image, UnidentifiedImageError
from skimage.measure import blur_effect
from skimage.restoration import estimate_sigma

from pipeline.imagesets.camera_model import (
    BlurKind,
    CameraSettings,
    camera_frame,
    decode_jpeg,
    encode_jpeg,
    rounded,
    vignette,
)
from pipeline.imagesets.yolo import DatasetError

# cv2.COLOR_BGR2GRAY's weights (ITU-R BT.601), in B, G, R order.
LUMA_BGR = np.array([0.114, 0.587, 0.299])

# The IJG/libjpeg luminance quantization table (JPEG standard, Annex K.1), natural (row) order:
# what libjpeg scales by `jpeg_set_quality` and what Pillow's `Image.quantization[0]` returns.
IJG_LUMINANCE = np.array([
    16, 11, 10, 16, 24, 40, 51, 61,
    12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77,
    24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101,
    72, 92, 95, 98, 112, 100, 103, 99,
])

# Zig-zag scan order (index into the natural-order table of the k-th coefficient in the stream).
ZIGZAG = np.array([
    0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5,
    12, 19, 26, 33, 40, 48, 41, 34, 27, 20, 13, 6, 7, 14, 21, 28,
    35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51,
    58, 59, 52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63,
])

_MAD_TO_SIGMA = 0.6744897501960817  # the 75th percentile of N(0, 1): Donoho's MAD estimator

# Noise curve: grey-level bins (0-255) of the per-block statistic. Blocks above 224 are left out:
# clipping at 255 flattens noise there, so the statistic no longer says how large it is.
NOISE_BINS = (0.0, 40.0, 64.0, 88.0, 112.0, 136.0, 160.0, 184.0, 208.0, 224.0)
NOISE_BLOCK = 16  # wavelet coefficients per block side (32 x 32 pixels)
NOISE_MIN_BLOCKS = 12  # a bin with fewer blocks (in the frames or the renders) is not used
# Constant noise sigmas (grey levels) rendered to map the statistic back to a sigma, per bin.
NOISE_LADDER = (0.0, 2.0, 4.0, 7.0, 12.0, 20.0, 35.0)

# Blur search: coarse candidates across the families, then a local search in the best one. Each
# candidate's noise is scaled to fit it best (blur and noise trade off: both change the spectrum).
COARSE_MOTION_PX = (2, 4, 7, 12, 20, 32)
COARSE_DEFOCUS_PX = (0.75, 1.5, 3.0, 6.0, 12.0, 24.0)
DEFOCUS_STEP_PX = 0.25
NOISE_SCALE_RATIO = 1.1  # the noise scale's first step (its secant starts the Gauss-Newton fit)
COARSE_EVALUATIONS, FINE_EVALUATIONS = 2, 3  # renders batches per noise-scale fit, coarse and fine
# Spectrum bands (cycles per pixel) of the row and column periodograms the blur fit compares.
SPECTRUM_EDGES = (0.01, 0.03, 0.06, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5)
SPECTRUM_CROP = 0.75  # the central share of each side (vignetting and the blur's border stay out)
# A blur is kept only if it lowers the chi-square distance of no blur by this much: Akaike's
# penalty (2 per parameter) for its two extra parameters, the family and the size.
BLUR_MIN_GAIN = 4.0
BLUR_BOOTSTRAP = 200  # resamples for the reported share in which the blur beats no blur

VIGNETTING_STEPS = (0.05, 0.005)  # coarse-to-fine grid over the vignetting strength in [0, 0.95]
CENTRE_FRACTION = 0.5  # the centre region (this share of each side) for the raw ratios


# ------------------------------------------------------------------------------------------
# The estimated camera model
# ------------------------------------------------------------------------------------------


def neutral_camera(width: int, height: int) -> CameraSettings:
    """A camera that only resizes to `width` x `height`: how the reference looks at that sensor size."""
    return CameraSettings(width, height, 1.0, (1.0, 1.0, 1.0), 0.0, 0.0, "none", 0.0, 0.0, None)


# ------------------------------------------------------------------------------------------
# Sampling, size, JPEG quality
# ------------------------------------------------------------------------------------------


def sample_evenly(total: int, n: int) -> list[int]:
    """`n` indices spread evenly over `range(total)` (all of them when n is 0 or >= total).

    Index i * total // n: with bursts of b frames and n = total / b, the first frame of each burst.
    """
    if n <= 0 or n >= total:
        return list(range(total))
    return [i * total // n for i in range(n)]


def frame_size(images: Sequence[np.ndarray], names: Sequence[Path]) -> tuple[int, int]:
    """(width, height) shared by all `images`; a DatasetError naming two files of different sizes."""
    h, w = images[0].shape[:2]
    for img, name in zip(images, names):
        if img.shape[:2] != (h, w):
            raise DatasetError(
                f"frame {name} is {img.shape[1]}x{img.shape[0]} but {names[0]} is {w}x{h}: one camera's frames "
                "must share one size; move frames of another camera or resolution to their own folder"
            )
    return w, h


def ijg_luminance_table(quality: int) -> np.ndarray:
    """libjpeg's luminance table for `quality` (1-100): `jpeg_quality_scaling` + `jpeg_add_quant_table`."""
    q = min(max(int(quality), 1), 100)
    scale = 5000 // q if q < 50 else 200 - 2 * q
    return np.clip((IJG_LUMINANCE * scale + 50) // 100, 1, 255)


def quality_from_luminance_table(table: Sequence[int]) -> tuple[int, float]:
    """The IJG quality whose scaled standard table is nearest `table` (64 values), and the mean
    absolute difference of that match (0.0: the file was written by libjpeg at that quality).

    The table is compared in natural and in zig-zag order (readers differ in which they return).
    """
    t = np.asarray(list(table), np.float64)
    if t.size != 64:
        raise ValueError(f"a JPEG quantization table has 64 entries, got {t.size}")
    natural = np.empty(64)
    natural[ZIGZAG] = t  # if `table` is in zig-zag order, this is its natural order
    best: tuple[float, int] = (math.inf, 0)
    for q in range(1, 101):
        ref = ijg_luminance_table(q)
        err = min(float(np.abs(t - ref).mean()), float(np.abs(natural - ref).mean()))
        if err < best[0]:
            best = (err, q)
    return best[1], best[0]


def jpeg_quality(path: Path) -> tuple[int | None, float | None]:
    """(IJG quality, table mismatch) of the image file at `path`; (None, None) if it is not a JPEG.

    Read from the file's luminance quantization table (Pillow), not from pixels.
    """
    try:
        with Image.open(path) as im:
            if im.format != "JPEG":
                return None, None
            tables = getattr(im, "quantization", None) or {}
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DatasetError(f"frame {path}: cannot read its header ({e}); replace the file or delete it") from None
    if 0 not in tables:
        raise DatasetError(f"frame {path}: a JPEG without a luminance quantization table; re-encode it")
    return quality_from_luminance_table(tables[0])


# ------------------------------------------------------------------------------------------
# Grey, centre, block means
# ------------------------------------------------------------------------------------------


def gray(img: np.ndarray) -> np.ndarray:
    """float64 grey image (0-255) of a BGR uint8 image (OpenCV's BT.601 weights)."""
    return cv2.cvtColor(img, cv2.COLOR_BGR2GRAY).astype(np.float64)


def centre(img: np.ndarray, fraction: float = CENTRE_FRACTION) -> np.ndarray:
    """The central `fraction` of `img` along each axis (little vignetting there)."""
    h, w = img.shape[:2]
    dh, dw = int(round(h * (1 - fraction) / 2)), int(round(w * (1 - fraction) / 2))
    return img[dh:h - dh, dw:w - dw]


def block_grid(width: int, height: int, cells: int) -> tuple[int, int]:
    """(columns, rows) of a grid of about square blocks with `cells` blocks along the long side."""
    if width >= height:
        return cells, max(2, int(round(cells * height / width)))
    return max(2, int(round(cells * width / height))), cells


def block_means(img: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Per-block channel means (rows, columns, 3) float32: `img` area-averaged to `grid`."""
    return cv2.resize(img.astype(np.float32), grid, interpolation=cv2.INTER_AREA)


def vignetting_falloff(width: int, height: int, grid: tuple[int, int]) -> np.ndarray:
    """Block means of `1 - vignette(h, w, 1)`: the model's fall-off is `1 - strength * falloff`."""
    unit = 1.0 - vignette(height, width, 1.0).astype(np.float64)
    return cv2.resize(unit, grid, interpolation=cv2.INTER_AREA)


# ------------------------------------------------------------------------------------------
# Exposure, colour cast, vignetting
# ------------------------------------------------------------------------------------------


def _gain_for(target: float, base: np.ndarray) -> float:
    """The gain g with mean(clip(g * base, 0, 255)) == target (monotone in g: bisection)."""
    mean_base = float(base.mean())
    if mean_base <= 0 or target <= 0:
        return 0.0
    g = target / mean_base
    if g * float(base.max()) <= 255.0:
        return g  # nothing clips: the ratio of means
    lo, hi = 1e-3, 50.0
    for _ in range(48):
        mid = math.sqrt(lo * hi)
        if float(np.minimum(mid * base, 255.0).mean()) > target:
            hi = mid
        else:
            lo = mid
    return math.sqrt(lo * hi)


def fit_gains_vignetting(frame_blocks: np.ndarray, reference_blocks: np.ndarray,
                         falloff: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Fit frames = clip(gain_c * (1 - s * falloff) * reference): (BGR gains, s, rms log residual).

    `frame_blocks` (n, rows, cols, 3) and `reference_blocks` (m, rows, cols, 3) are block means of
    the frames and of the reference images at the sensor size; `falloff` (rows, cols) is
    `vignetting_falloff`. For each strength s on a coarse-to-fine grid the three gains are solved
    so the predicted mean frame has the observed mean (clipping at 255 included, per block and
    image); s minimises the squared log ratio of observed to predicted mean block values.
    """
    observed = frame_blocks.astype(np.float64).mean(0)
    log_observed = np.log(np.maximum(observed, 1.0))
    refs = reference_blocks.astype(np.float64)

    def solve(s: float) -> tuple[float, np.ndarray]:
        v = 1.0 - s * falloff
        gains, sse = np.zeros(3), 0.0
        for c in range(3):
            base = refs[..., c] * v[None]
            gains[c] = _gain_for(float(observed[..., c].mean()), base)
            predicted = np.minimum(gains[c] * base, 255.0).mean(0)
            sse += float(((log_observed[..., c] - np.log(np.maximum(predicted, 1.0))) ** 2).sum())
        return sse, gains

    lo, hi = 0.0, 0.95
    best: tuple[float, float, np.ndarray] | None = None
    for step in VIGNETTING_STEPS:
        for s in np.arange(lo, hi + step / 2, step):
            sse, gains = solve(float(s))
            if best is None or sse < best[0]:
                best = (sse, float(s), gains)
        assert best is not None
        lo, hi = max(0.0, best[1] - step), min(0.95, best[1] + step)
    assert best is not None
    rms = math.sqrt(best[0] / observed.size)
    return best[2], best[1], rms


# ------------------------------------------------------------------------------------------
# Noise
# ------------------------------------------------------------------------------------------


def wavelet_sigma(gray_img: np.ndarray) -> float:
    """Donoho's noise sigma of a grey image (skimage.restoration.estimate_sigma, db2 wavelet)."""
    return float(estimate_sigma(gray_img, channel_axis=None))


def local_noise(gray_img: np.ndarray, block: int = NOISE_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """(grey level, noise sigma) per block: `estimate_sigma`'s estimator applied locally.

    The finest diagonal db2 wavelet band (what estimate_sigma uses) is cut into `block` x `block`
    coefficient blocks (2 * block pixels a side); each gives median(|d|) / 0.6745, paired with
    the mean grey level of the pixels it covers.
    """
    _, (_, _, diag) = pywt.dwt2(gray_img, "db2")
    rows = min(diag.shape[0], gray_img.shape[0] // 2) // block
    cols = min(diag.shape[1], gray_img.shape[1] // 2) // block
    if rows == 0 or cols == 0:
        return np.empty(0), np.empty(0)
    d = np.abs(diag[:rows * block, :cols * block]).reshape(rows, block, cols, block).transpose(0, 2, 1, 3)
    sigma = np.median(d.reshape(rows, cols, -1), axis=2) / _MAD_TO_SIGMA
    pixels = gray_img[:rows * block * 2, :cols * block * 2]
    level = cv2.resize(pixels, (cols, rows), interpolation=cv2.INTER_AREA)
    return level.ravel(), sigma.ravel()


@dataclass(frozen=True)
class NoiseCurve:
    """The per-block wavelet sigma binned by grey level (`NOISE_BINS`): median sigma, mean level, blocks."""

    sigma: np.ndarray  # per bin; NaN where fewer than NOISE_MIN_BLOCKS blocks
    level: np.ndarray
    blocks: np.ndarray

    def as_list(self) -> list[dict[str, Any]]:
        """The bins that were measured, for profiles.json."""
        return [
            {"level": round(float(lv), 4), "wavelet_sigma": round(float(s), 4), "blocks": int(n)}
            for s, lv, n in zip(self.sigma, self.level, self.blocks) if np.isfinite(s)
        ]


def noise_curve(grays: Sequence[np.ndarray]) -> NoiseCurve:
    """The `NoiseCurve` of grey images (all blocks of all images pooled)."""
    pairs = [local_noise(g) for g in grays]
    levels = np.concatenate([p[0] for p in pairs])
    sigmas = np.concatenate([p[1] for p in pairs])
    nbins = len(NOISE_BINS) - 1
    which = np.digitize(levels, NOISE_BINS) - 1
    sigma, level, blocks = np.full(nbins, np.nan), np.full(nbins, np.nan), np.zeros(nbins, int)
    for b in range(nbins):
        inside = which == b
        blocks[b] = int(inside.sum())
        if blocks[b] >= NOISE_MIN_BLOCKS:
            sigma[b] = float(np.median(sigmas[inside]))
            level[b] = float(levels[inside].mean())
    return NoiseCurve(sigma, level, blocks)


def grey_noise_factor(gains: np.ndarray) -> float:
    """kappa: the grey image's shot-noise variance is shot^2 * kappa * grey level (in read-noise units).

    Each channel c has variance shot^2 * L_c + read^2, and grey = sum_c w_c * channel_c, so grey
    variance is sum_c w_c^2 (shot^2 L_c + read^2). For a grey scene L_c = L * g_c / sum(w * g) with
    the camera's channel gains g; dividing by sum w_c^2 (what constant noise sigma gives) leaves
    shot^2 * kappa * L + read^2 with kappa = sum(w^2 g) / (sum(w^2) * sum(w g)).
    """
    w = LUMA_BGR
    g = np.asarray(gains, np.float64)
    return float((w**2 * g).sum() / ((w**2).sum() * (w * g).sum()))


def invert_noise_curve(observed: NoiseCurve, ladder: Sequence[NoiseCurve],
                       sigmas: Sequence[float] = NOISE_LADDER) -> np.ndarray:
    """Per bin, the constant noise sigma whose renders give the observed statistic (NaN: bin unused).

    `ladder[k]` is the curve of renders with noise sigma `sigmas[k]` (shot 0); per bin the
    statistic is made monotone in sigma (running maximum) and interpolated; below the
    noise-free renders' statistic the sigma is 0, above the last rung it is the last sigma.
    """
    out = np.full(len(observed.sigma), np.nan)
    for b in range(len(out)):
        stat = np.array([c.sigma[b] for c in ladder])
        if not np.isfinite(observed.sigma[b]) or not np.all(np.isfinite(stat)):
            continue
        stat = np.maximum.accumulate(stat)
        out[b] = float(np.interp(observed.sigma[b], stat + np.arange(len(stat)) * 1e-9, sigmas))
    return out


def fit_noise_model(sigma_per_bin: np.ndarray, levels: np.ndarray, blocks: np.ndarray,
                    kappa: float) -> tuple[float, float]:
    """(shot_noise, read_noise) from `sigma^2 = shot^2 * kappa * level + read^2`, least squares
    over the bins (weights: square root of each bin's block count), both terms >= 0."""
    ok = np.isfinite(sigma_per_bin) & np.isfinite(levels)
    if not ok.any():
        return 0.0, 0.0
    y = sigma_per_bin[ok] ** 2
    x = kappa * levels[ok]
    w = np.sqrt(blocks[ok].astype(np.float64))
    if ok.sum() >= 2:
        a = np.stack([x, np.ones_like(x)], 1) * w[:, None]
        (shot2, read2), *_ = np.linalg.lstsq(a, y * w, rcond=None)
    else:
        shot2, read2 = -1.0, float(y[0])
    if shot2 < 0:  # no level dependence: read noise only
        shot2, read2 = 0.0, float((w * y).sum() / w.sum())
    elif read2 < 0:  # through the origin: shot noise only
        shot2, read2 = float((w * w * x * y).sum() / (w * w * x * x).sum()), 0.0
    return math.sqrt(max(shot2, 0.0)), math.sqrt(max(read2, 0.0))


# ------------------------------------------------------------------------------------------
# Blur and sharpness
# ------------------------------------------------------------------------------------------


def blur_effect_xy(gray_img: np.ndarray) -> tuple[float, float]:
    """`skimage.measure.blur_effect` along x and along y (0 = sharp, 1 = blurred; Crete-Roffet 2007).

    Motion blur along x raises the x value above the y value; defocus raises both.
    """
    by, bx = blur_effect(gray_img, reduce_func=None)  # one value per axis: axis 0 is y, axis 1 is x
    return float(bx), float(by)


def laplacian_variance(gray_img: np.ndarray) -> float:
    """Variance of the Laplacian (a sharpness measure: higher is sharper, or noisier)."""
    return float(cv2.Laplacian(gray_img, cv2.CV_64F).var())


def _band_masks(n: int) -> list[np.ndarray]:
    f = np.fft.rfftfreq(n)
    edges = SPECTRUM_EDGES
    return [(f >= lo) & ((f < hi) if hi < edges[-1] else (f <= hi)) for lo, hi in zip(edges[:-1], edges[1:])]


def directional_spectrum(gray_img: np.ndarray) -> np.ndarray:
    """Log power of the frame's rows (along x) and columns (along y) in the `SPECTRUM_EDGES` bands.

    Mean Hann-windowed periodogram of every row, then of every column, of the central
    `SPECTRUM_CROP` of the image; [x bands..., y bands...]; NaN for a band with no frequency bin
    (a very small frame). Blur scales the scene's power by |H(f)|^2 (motion: along x only), noise
    adds a floor, JPEG removes the high bands: what the model fit compares with renders.
    """
    g = centre(gray_img, SPECTRUM_CROP)
    g = g - g.mean()
    out = []
    for axis in (1, 0):
        n = g.shape[axis]
        window = np.hanning(n)
        shaped = window[None, :] if axis == 1 else window[:, None]
        power = (np.abs(np.fft.rfft(g * shaped, axis=axis)) ** 2).mean(axis=1 - axis) / (window**2).sum()
        out += [float(np.log(max(power[m].mean(), 1e-12))) if m.any() else math.nan for m in _band_masks(n)]
    return np.array(out)


def feature_scale(frames: np.ndarray, k: int) -> np.ndarray:
    """Standard error of the difference of a mean over the n frames and a mean over k renders."""
    n = len(frames)
    spread = frames.std(0, ddof=1) if n > 1 else np.full(frames.shape[1], 0.1)
    return np.maximum(spread, 1e-3) * math.sqrt(1.0 / n + 1.0 / max(k, 1))


def search_blur(coarse: Callable[[BlurKind, float], float], fine: Callable[[BlurKind, float], float],
                max_px: float) -> tuple[BlurKind, float, float]:
    """The (blur, blur_px, distance) minimising the distance of a candidate blur from the frames.

    `coarse(kind, px)` is a cheap distance used to pick the family and a starting size: no blur,
    then motion `COARSE_MOTION_PX` and defocus `COARSE_DEFOCUS_PX` up to `max_px` (a family stops at
    its first candidate worse than the one before: the distance is taken as unimodal along a
    family). `fine(kind, px)` then drives a local descent in that family: motion in whole pixels
    (the streak is whole pixels long), defocus in `DEFOCUS_STEP_PX` steps and a parabolic step.
    """
    rough: dict[tuple[BlurKind, float], float] = {("none", 0.0): coarse("none", 0.0)}
    families: tuple[tuple[BlurKind, Sequence[float]], ...] = (("motion", COARSE_MOTION_PX),
                                                              ("defocus", COARSE_DEFOCUS_PX))
    for family, sizes in families:
        previous = math.inf
        for size in sizes:
            if size > max_px:
                break
            rough[(family, float(size))] = value = coarse(family, float(size))
            if value > previous:
                break
            previous = value
    kind, px = min(rough, key=lambda c: rough[c])
    cache: dict[tuple[BlurKind, float], float] = {}

    def d(px: float) -> float:
        key = (kind, round(px, 4))
        if key not in cache:
            cache[key] = fine(kind, px)
        return cache[key]

    if kind == "none":
        return kind, 0.0, d(0.0)
    step, lo = (1.0, 2.0) if kind == "motion" else (DEFOCUS_STEP_PX, 0.5 + DEFOCUS_STEP_PX / 2)
    # (motion: a streak of 1 px is no blur; defocus: a disc of radius <= 0.5 px is a single pixel)
    while True:
        options = [q for q in (px - step, px + step) if lo <= q <= max_px]
        nxt = min(options, key=d, default=None)
        if nxt is None or d(nxt) >= d(px):
            break
        px = nxt
    if kind == "defocus" and lo <= px - step and px + step <= max_px:
        a, b, c = d(px - step), d(px), d(px + step)  # parabola through the minimum and its neighbours
        curvature = a - 2 * b + c
        if curvature > 0:
            refined = px + step * 0.5 * (a - c) / curvature
            if d(refined) < b:
                px = refined
    return kind, float(px), d(px)


def fit_log_scale(residual: Callable[[float], np.ndarray], start: float, evaluations: int,
                  step: float = NOISE_SCALE_RATIO, lo: float = 0.25, hi: float = 4.0) -> tuple[float, float, float]:
    """Minimise ||residual(x)||^2 over a positive scale x in [lo, hi] by Gauss-Newton in log x.

    The residual (a vector) is evaluated `evaluations` times (>= 2; each is a batch of renders):
    at `start`, at `start * step`, then at each Gauss-Newton step, the Jacobian from the secant
    of the two evaluated points nearest the best. Returns (predicted minimum, its x, best
    evaluated x): the last step is predicted by the linear model, not evaluated.
    """
    t_lo, t_hi, max_move = math.log(lo), math.log(hi), math.log(2.0)
    points: list[tuple[float, np.ndarray]] = []

    def add(t: float) -> None:
        points.append((t, residual(math.exp(t))))

    t0 = min(max(math.log(start), t_lo), t_hi - math.log(step))
    add(t0)
    add(t0 + math.log(step))
    for i in range(evaluations - 1):
        best_t, best_r = min(points, key=lambda p: float(p[1] @ p[1]))
        (ta, ra), (tb, rb) = sorted(points, key=lambda p: abs(p[0] - best_t))[:2]
        jac = (rb - ra) / (tb - ta) if tb != ta else np.zeros_like(ra)
        jj = float(jac @ jac)
        if jj <= 0:
            break
        t = best_t - float(jac @ best_r) / jj
        t = min(max(t, best_t - max_move, t_lo), best_t + max_move, t_hi)
        if i == evaluations - 2:  # the last step: predicted, not evaluated
            predicted = best_r + jac * (t - best_t)
            value = float(predicted @ predicted)
            if value < float(best_r @ best_r):
                return value, math.exp(t), math.exp(best_t)
            break
        if any(abs(t - p[0]) < 1e-6 for p in points):
            break
        add(t)
    best_t, best_r = min(points, key=lambda p: float(p[1] @ p[1]))
    return float(best_r @ best_r), math.exp(best_t), math.exp(best_t)


# ------------------------------------------------------------------------------------------
# Analysis by synthesis: reference images rendered through candidate cameras
# ------------------------------------------------------------------------------------------


def render_references(references: Sequence[np.ndarray], cam: CameraSettings,
                      seed: tuple[int, ...]) -> list[np.ndarray]:
    """Reference images as camera `cam` delivers them (decoded JPEG when it has a JPEG quality).

    Image k draws its noise from `default_rng((*seed, k))`: the same for every candidate camera.
    """
    wb = np.asarray(cam.wb_gains, np.float64)
    out = []
    for k, ref in enumerate(references):
        frame = camera_frame(ref, cam, np.random.default_rng((*seed, k)), cam.exposure, wb,  # type: ignore[arg-type]
                             (0.0, 0.0))
        if cam.jpeg_quality is not None:
            frame = decode_jpeg(encode_jpeg(frame, cam.jpeg_quality))
        out.append(frame)
    return out


class Synthesis:
    """Renders of the reference subset through candidate cameras, and their statistics (cached).

    `frame_spectra` (n, F) are the camera's `directional_spectrum`s, `frame_curve` its noise curve.
    """

    def __init__(self, references: Sequence[np.ndarray], seed: tuple[int, ...], frame_spectra: np.ndarray,
                 frame_curve: NoiseCurve) -> None:
        self.references, self.seed = list(references), seed
        self.frame_spectra, self.frame_curve = frame_spectra, frame_curve
        self.scale = feature_scale(frame_spectra, len(self.references))
        self._spectra: dict[CameraSettings, np.ndarray] = {}
        self.renders = 0  # how many images were rendered (for the record)

    def _grays(self, cam: CameraSettings) -> list[np.ndarray]:
        self.renders += len(self.references)
        return [gray(r) for r in render_references(self.references, cam, self.seed)]

    def spectra(self, cam: CameraSettings) -> np.ndarray:
        """(k, F) `directional_spectrum` of each reference rendered through `cam`."""
        if cam not in self._spectra:
            self._spectra[cam] = np.array([directional_spectrum(g) for g in self._grays(cam)])
        return self._spectra[cam]

    def residual(self, cam: CameraSettings) -> np.ndarray:
        """Differences of the frames' mean spectra from those of renders through `cam`, each divided
        by its standard error (a band with no frequency bin: 0). Their squared sum is the chi-square
        distance the fit minimises: bands that vary a lot from scene to scene weigh less."""
        r = (self.frame_spectra.mean(0) - self.spectra(cam).mean(0)) / self.scale
        return np.where(np.isfinite(r), r, 0.0)

    def fit_noise_scale(self, cam: CameraSettings, start: float, evaluations: int
                        ) -> tuple[float, CameraSettings, CameraSettings]:
        """Scale `cam`'s shot and read noise by the common factor that fits the frames' spectra best.

        Returns (distance, the fitted camera, the best camera actually rendered).
        """
        def at(k: float) -> CameraSettings:
            return replace(cam, shot_noise=cam.shot_noise * k, read_noise=cam.read_noise * k)
        value, k, k_rendered = fit_log_scale(lambda k: self.residual(at(k)), start, evaluations)
        return value, at(k), at(k_rendered)

    def noise_shape(self, cam: CameraSettings, kappa: float) -> tuple[float, float, np.ndarray]:
        """(shot, read, sigma per bin): the noise curve inverted through constant-noise renders of `cam`."""
        ladder = [noise_curve(self._grays(replace(cam, shot_noise=0.0, read_noise=s))) for s in NOISE_LADDER]
        per_bin = invert_noise_curve(self.frame_curve, ladder)
        shot, read = fit_noise_model(per_bin, self.frame_curve.level, self.frame_curve.blocks, kappa)
        return shot, read, per_bin


def bootstrap_preference(frames: np.ndarray, a: np.ndarray, b: np.ndarray, scale: np.ndarray,
                         rng: np.random.Generator, resamples: int = BLUR_BOOTSTRAP) -> float:
    """Share of bootstrap resamples (frames and reference images, paired) in which candidate `a`'s
    renders (k, F) are nearer the frames (n, F) than candidate `b`'s."""
    n, k = len(frames), len(a)
    wins = 0
    for _ in range(resamples):
        fi, ri = rng.integers(0, n, n), rng.integers(0, k, k)
        fm = frames[fi].mean(0)
        da = np.nansum(((fm - a[ri].mean(0)) / scale) ** 2)
        db = np.nansum(((fm - b[ri].mean(0)) / scale) ** 2)
        wins += int(da < db)
    return wins / resamples


# ------------------------------------------------------------------------------------------
# One camera
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReferenceSet:
    """The training images used as the reference domain, and their statistics."""

    images: list[np.ndarray]  # BGR uint8 as decoded (any size)
    stats: dict[str, Any]


def reference_set(images: Sequence[np.ndarray]) -> ReferenceSet:
    """The reference images and their own raw statistics (what the cameras are compared with)."""
    grays = [gray(i) for i in images]
    blur = np.array([blur_effect_xy(g) for g in grays])
    stats = {
        "images": len(images),
        "width_px": mode([int(i.shape[1]) for i in images]),
        "height_px": mode([int(i.shape[0]) for i in images]),
        "brightness_mean_centre": float(np.mean([centre(g).mean() for g in grays])),
        "contrast_std_centre": float(np.mean([centre(g).std() for g in grays])),
        "channel_mean_bgr_centre": [float(v) for v in np.mean([centre(i).reshape(-1, 3).mean(0) for i in images], 0)],
        "noise_sigma_wavelet": float(np.mean([wavelet_sigma(g) for g in grays])),
        "blur_effect_x": float(blur[:, 0].mean()),
        "blur_effect_y": float(blur[:, 1].mean()),
        "laplacian_variance": float(np.mean([laplacian_variance(g) for g in grays])),
    }
    return ReferenceSet(list(images), stats)


@dataclass(frozen=True)
class CameraProfile:
    """One camera's profile: raw estimates (named with units) and the fitted model."""

    frames: int
    estimates: dict[str, Any]
    model: CameraSettings

    def as_dict(self) -> dict[str, Any]:
        """The camera's entry in profiles.json."""
        return {"frames": self.frames, "estimates": rounded(self.estimates), "model": self.model.as_dict()}


def mode(values: Sequence[Any]) -> Any:
    """The most common value (ties: the first seen)."""
    counts: dict[Any, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return max(counts, key=lambda v: counts[v])


def estimate_camera(frames: Sequence[np.ndarray], jpeg: Sequence[tuple[int | None, float | None]],
                    reference: ReferenceSet, render_images: int, max_blur_px: float, grid_cells: int,
                    seed: tuple[int, ...]) -> CameraProfile:
    """Profile one camera from its decoded `frames` (BGR uint8, one size) and each frame's
    `jpeg_quality()` result, relative to `reference`.

    Renders use `render_images` of the reference images (evenly spaced) and seeds `(*seed, k)`;
    blurs up to `max_blur_px` are searched; gains and vignetting are fitted on a grid of
    `grid_cells` blocks along the long side.
    """
    n = len(frames)
    height, width = frames[0].shape[:2]
    grays = [gray(f) for f in frames]
    neutral = neutral_camera(width, height)
    views = [camera_frame(r, neutral, np.random.default_rng(0), 1.0, np.ones(3), (0.0, 0.0))  # type: ignore[arg-type]
             for r in reference.images]
    view_grays = [gray(v) for v in views]

    # 1. JPEG quality: the most common over the frames (None: lossless frames).
    qualities = [q for q, _ in jpeg]
    quality = mode(qualities)
    mismatch = [e for q, e in jpeg if q == quality and e is not None]

    # 2. Gains and vignetting (block means), plus the raw centre ratios.
    grid = block_grid(width, height, grid_cells)
    gains, strength, fit_rms = fit_gains_vignetting(
        np.stack([block_means(f, grid) for f in frames]), np.stack([block_means(v, grid) for v in views]),
        vignetting_falloff(width, height, grid))
    if not np.all(gains > 0):
        raise ValueError(f"the frames are black in at least one channel (gains B, G, R {np.round(gains, 4).tolist()} "
                         "relative to the training images): nothing to profile; check the camera's exposure")
    exposure = float(gains[1])
    wb = tuple(float(g / gains[1]) for g in gains)
    frame_centre_bgr = np.mean([centre(f).reshape(-1, 3).mean(0) for f in frames], 0)
    ref_centre_bgr = np.mean([centre(v).reshape(-1, 3).mean(0) for v in views], 0)
    grey_world = frame_centre_bgr / np.maximum(ref_centre_bgr, 1e-6)

    # 3. Noise shape, blur with the noise scaled to each candidate, noise again with that blur.
    subset = [reference.images[i] for i in sample_evenly(len(reference.images), render_images)]
    frame_spectra = np.array([directional_spectrum(g) for g in grays])
    synth = Synthesis(subset, seed, frame_spectra, noise_curve(grays))
    kappa = grey_noise_factor(gains)
    base = CameraSettings(width, height, exposure, wb, 0.0, 0.0, "none", 0.0, strength, quality)  # type: ignore[arg-type]
    shot, read, _ = synth.noise_shape(base, kappa)
    read = max(read, 0.05)  # a read-noise share to scale (the scale search can still take it to almost nothing)
    shaped = replace(base, shot_noise=shot, read_noise=read)
    fitted: dict[tuple[str, float, bool], tuple[CameraSettings, CameraSettings]] = {}
    scales: dict[str, float] = {}  # the last noise scale fitted per blur family: where its next fit starts

    def blur_distance(kind: BlurKind, px: float, fine: bool) -> float:
        value, cam, rendered = synth.fit_noise_scale(replace(shaped, blur=kind, blur_px=px), scales.get(kind, 1.0),
                                                     FINE_EVALUATIONS if fine else COARSE_EVALUATIONS)
        scales[kind] = cam.read_noise / read
        fitted[(kind, round(px, 4), fine)] = cam, rendered
        return value

    kind, px, best = search_blur(lambda k, p: blur_distance(k, p, False), lambda k, p: blur_distance(k, p, True),
                                 max_blur_px)
    candidate = {"blur": kind, "blur_px": px, "chi2": best}
    gain: float | None = None
    confidence: float | None = None
    if kind != "none":  # keep the blur only if it explains the frames clearly better than no blur
        gain = blur_distance("none", 0.0, True) - best
        rng = np.random.default_rng((*seed, 1))
        confidence = bootstrap_preference(frame_spectra, synth.spectra(fitted[(kind, round(px, 4), True)][1]),
                                          synth.spectra(fitted[("none", 0.0, True)][1]), synth.scale, rng)
        if gain < BLUR_MIN_GAIN:
            kind, px = "none", 0.0
    blurred = fitted[(kind, round(px, 4), True)][0]
    shot, read, per_bin = synth.noise_shape(replace(base, blur=kind, blur_px=px), kappa)
    read = max(read, 0.05)
    chi2, model, _ = synth.fit_noise_scale(replace(blurred, shot_noise=shot, read_noise=read), 1.0, FINE_EVALUATIONS)

    rs = reference.stats
    blur_xy = np.array([blur_effect_xy(g) for g in grays])
    estimates: dict[str, Any] = {
        "width_px": width,
        "height_px": height,
        "aspect_ratio": width / height,
        "jpeg_quality_ijg": quality,
        "jpeg_table_mismatch": float(np.mean(mismatch)) if mismatch else None,
        "jpeg_qualities_seen": sorted({q for q in qualities if q is not None}),
        "brightness_ratio_centre": float(np.mean([centre(g).mean() for g in grays])
                                         / np.mean([centre(g).mean() for g in view_grays])),
        "contrast_std_ratio_centre": float(np.mean([centre(g).std() for g in grays])
                                           / np.mean([centre(g).std() for g in view_grays])),
        "grey_world_gains_bgr_centre": [float(v / grey_world[1]) for v in grey_world],
        "channel_gains_bgr": [float(g) for g in gains],
        "vignetting_strength": strength,
        "vignetting_fit_rms_log": fit_rms,
        "noise_sigma_wavelet": float(np.mean([wavelet_sigma(g) for g in grays])),
        "noise_sigma_wavelet_reference": rs["noise_sigma_wavelet"],
        "noise_curve": synth.frame_curve.as_list(),
        "noise_sigma_per_level": [
            {"level": float(lv), "sigma": float(s)}
            for lv, s in zip(synth.frame_curve.level, per_bin) if np.isfinite(s)
        ],
        "noise_sigma_at_128": model.noise_sigma(128.0),
        "blur_effect_x": float(blur_xy[:, 0].mean()),
        "blur_effect_y": float(blur_xy[:, 1].mean()),
        "blur_effect_anisotropy_x_minus_y": float((blur_xy[:, 0] - blur_xy[:, 1]).mean()),
        "laplacian_variance": float(np.mean([laplacian_variance(g) for g in grays])),
        "laplacian_variance_reference": rs["laplacian_variance"],
        "blur_fit_chi2": chi2,
        "blur_best_fit": candidate,
        "blur_chi2_gain_over_none": gain,
        "blur_vs_none_bootstrap": confidence,
        "renders": synth.renders,
    }
    return CameraProfile(n, estimates, model)


def camera_seed(seed: int, camera_id: str) -> tuple[int, int]:
    """The render seed of one camera: `base.seed` and a stable hash of its id."""
    return seed, zlib.crc32(camera_id.encode())
