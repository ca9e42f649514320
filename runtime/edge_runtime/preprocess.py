"""The ONE preprocessing used everywhere: export parity, calibration, evaluation, the device.

Letterbox to the model's square input (aspect kept, centred, grey 114 padding, the same
arithmetic as Ultralytics' LetterBox so ONNX results match `model.predict`), BGR -> RGB,
HWC uint8 -> NCHW float32 in [0, 1]. `Letterbox` records the scale and padding so boxes can
be mapped back to source pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple

import cv2
import numpy as np

PAD_VALUE = 114


@dataclass(frozen=True)
class Letterbox:
    """How a source image was fitted into the model input: scale, then (left, top) padding."""

    scale: float
    pad_left: int
    pad_top: int
    source_hw: Tuple[int, int]

    def to_source(self, boxes_xyxy: np.ndarray, clip: bool = True) -> np.ndarray:
        """Map boxes (N, 4) from model-input pixels back to source-image pixels, clipped to the
        image unless `clip` is False (mAP as Ultralytics' val scores it: unclipped)."""
        out = boxes_xyxy.astype(np.float32, copy=True)
        out[:, [0, 2]] = (out[:, [0, 2]] - self.pad_left) / self.scale
        out[:, [1, 3]] = (out[:, [1, 3]] - self.pad_top) / self.scale
        if clip:
            h, w = self.source_hw
            out[:, [0, 2]] = out[:, [0, 2]].clip(0, w)
            out[:, [1, 3]] = out[:, [1, 3]].clip(0, h)
        return out


def letterbox(image: np.ndarray, size: int) -> Tuple[np.ndarray, Letterbox]:
    """Resize `image` (H, W, 3 BGR uint8) into a `size` x `size` canvas, centred, aspect kept."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an H x W x 3 BGR image, got shape {image.shape}")
    h, w = image.shape[:2]
    r = min(size / h, size / w)
    new_w, new_h = max(round(w * r), 1), max(round(h * r), 1)
    dw, dh = (size - new_w) / 2, (size - new_h) / 2
    # The +-0.1 reproduces Ultralytics' rounding so an odd padding splits the same way.
    top, bottom = round(dh - 0.1), round(dh + 0.1)
    left, right = round(dw - 0.1), round(dw + 0.1)
    resized = image if (new_w, new_h) == (w, h) else cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    canvas = cv2.copyMakeBorder(resized, top, bottom, left, right, cv2.BORDER_CONSTANT,
                                value=(PAD_VALUE, PAD_VALUE, PAD_VALUE))
    return canvas, Letterbox(r, left, top, (h, w))


def to_tensor(images: Sequence[np.ndarray]) -> np.ndarray:
    """Stack letterboxed BGR uint8 images into an NCHW float32 RGB tensor in [0, 1]."""
    batch = np.stack([img[:, :, ::-1] for img in images])  # BGR -> RGB
    return np.ascontiguousarray(batch.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255.0)


def preprocess(image: np.ndarray, size: int) -> Tuple[np.ndarray, Letterbox]:
    """Letterbox one BGR image and return its (1, 3, size, size) float32 tensor and the mapping."""
    boxed, lb = letterbox(image, size)
    return to_tensor([boxed]), lb
