"""Near-duplicate images: a DCT perceptual hash, burst deduplication, and the train/eval leak check.

A streaming camera delivers bursts of near-identical frames. `calibrate` keeps one frame per
burst (`dedup`); `camera` splits labelled camera frames into train and eval by near-duplicate
group (`groups`), and `train` refuses to train on a frame that is a copy or a near-duplicate of
an evaluation frame (`check_disjoint`), since that would measure memory, not accuracy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from edge_runtime.fileio import sha256_file
from pipeline.imagesets.yolo import DatasetError, decode_image

# The calibrate stage's defaults (params.yaml calibrate.phash_*): 64-bit hashes; bursts measured
# 0-12 bits apart, distinct scenes >= 12.
HASH_SIZE = 8
HIGHFREQ = 4
SAME_SCENE_BITS = 10  # calibrate.dedup_hamming: hashes this close may be one scene (a burst, a re-encode)
SAME_SCENE_DETAIL = 0.6  # ... and they are when their detail correlates this well (check_disjoint)
DETAIL_SIZE = 64


def phash(img: np.ndarray, hash_size: int, highfreq: int) -> np.ndarray:
    """DCT perceptual hash of a BGR image: `hash_size`**2 bits (bool array).

    Grey thumbnail of (hash_size * highfreq)^2 pixels, 2-D DCT, the top-left hash_size^2
    low-frequency block, each coefficient compared with the block's median. Noise, JPEG and
    small shifts barely move low frequencies; a different scene does.
    """
    n = hash_size * highfreq
    gray = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY) if img.ndim == 3 else img
    thumb = cv2.resize(gray, (n, n), interpolation=cv2.INTER_AREA).astype(np.float32)
    block = cv2.dct(thumb)[:hash_size, :hash_size]
    return (block > np.median(block)).reshape(-1)


def dedup(hashes: np.ndarray, max_hamming: int) -> tuple[list[int], list[tuple[int, int, int]]]:
    """Keep each frame unless it is within `max_hamming` bits of an earlier KEPT frame.

    Returns (kept indices, [(dropped index, index of the kept frame it duplicates, distance)]).
    Order-dependent by design: with sorted input the first frame of a burst is the one kept.
    """
    kept: list[int] = []
    dropped: list[tuple[int, int, int]] = []
    for i in range(len(hashes)):
        if kept:
            d = np.count_nonzero(hashes[kept] != hashes[i], axis=1)
            j = int(np.argmin(d))
            if d[j] <= max_hamming:
                dropped.append((i, kept[j], int(d[j])))
                continue
        kept.append(i)
    return kept, dropped


def hashes_of(paths: Sequence[Path], hash_size: int = HASH_SIZE, highfreq: int = HIGHFREQ) -> np.ndarray:
    """(N, hash_size**2) bool perceptual hashes of image files; an unreadable file is a DatasetError naming it."""
    if not paths:
        return np.zeros((0, hash_size * hash_size), bool)
    return np.stack([phash(decode_image(p), hash_size, highfreq) for p in paths])


def groups(hashes: np.ndarray, max_hamming: int) -> list[int]:
    """Group id per image: images within `max_hamming` bits of each other (transitively) share one.

    Splitting by group, never by image, keeps every frame of a burst on one side of a split.
    """
    parent = list(range(len(hashes)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(1, len(hashes)):
        close = np.flatnonzero(np.count_nonzero(hashes[:i] != hashes[i], axis=1) <= max_hamming)
        for j in close:
            parent[root(int(j))] = root(i)
    roots = [root(i) for i in range(len(hashes))]
    ids = {r: n for n, r in enumerate(dict.fromkeys(roots))}
    return [ids[r] for r in roots]


def detail(img: np.ndarray, size: int = DETAIL_SIZE) -> np.ndarray:
    """Zero-mean, unit-norm high-pass grey thumbnail: the scene's detail without its lighting.

    Dot products of two of these are normalised cross-correlations of the image content with
    exposure, vignetting and colour cast removed (a Gaussian of sigma size/16 is subtracted).
    """
    gray = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY) if img.ndim == 3 else img
    t = cv2.resize(gray, (size, size), interpolation=cv2.INTER_AREA).astype(np.float64)
    t -= cv2.GaussianBlur(t, (0, 0), size / 16)
    t -= t.mean()
    return t / (np.linalg.norm(t) + 1e-12)


def check_disjoint(train: Sequence[Path], held_out: Sequence[Path], max_hamming: int,
                   what: str = "evaluation") -> None:
    """Raise DatasetError when a training image is a byte copy or a near-duplicate of a held-out one.

    Near-duplicate: perceptual hashes within `max_hamming` bits AND detail correlation
    (`detail`) of at least SAME_SCENE_DETAIL: a frame of the same burst, or the same scene
    re-encoded. The hash alone is not specific enough across thousands of pairs of frames of a
    plain product under one camera (distinct synthetic scenes came within 8 bits); the
    correlation separates them (measured on the synthetic cameras: frames of one burst >= 0.64,
    distinct scenes <= 0.50, a blurred re-encode 0.99). The message names both files and the fix.
    """
    held_sha = {sha256_file(p): p for p in held_out}
    for p in train:
        twin = held_sha.get(sha256_file(p))
        if twin is not None:
            raise DatasetError(f"{p} is a copy of {what} frame {twin}: a frame cannot be trained on and "
                               "evaluated on; remove it from one of the two splits")
    if not train or not held_out:
        return
    held_images = [decode_image(p) for p in held_out]
    h_held = np.stack([phash(img, HASH_SIZE, HIGHFREQ) for img in held_images])
    held_detail: dict[int, np.ndarray] = {}
    for path in train:
        img = decode_image(path)
        h = phash(img, HASH_SIZE, HIGHFREQ)
        d = np.count_nonzero(h_held != h, axis=1)
        mine = None
        for j in np.flatnonzero(d <= max_hamming):
            mine = detail(img) if mine is None else mine
            other = held_detail.setdefault(int(j), detail(held_images[int(j)]))
            corr = float((mine * other).sum())
            if corr >= SAME_SCENE_DETAIL:
                raise DatasetError(
                    f"{path} is a near-duplicate of {what} frame {held_out[int(j)]} ({int(d[j])} of {h.size} hash "
                    f"bits differ, <= {max_hamming}; detail correlation {corr:.2f} >= {SAME_SCENE_DETAIL}): frames "
                    "of one scene or burst must stay on one side of the train/evaluation split; move them together"
                )
