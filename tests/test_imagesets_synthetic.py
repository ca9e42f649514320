"""The procedural generator: deterministic, exact boxes, the difficulty it claims."""

from __future__ import annotations

import numpy as np

from pipeline.imagesets.synthetic import CLASS_NAMES, MASK_THRESHOLD, GeneratorConfig, image_rng, render_image

CFG = GeneratorConfig(image_size=128, max_defects=4, empty_fraction=0.1, small_fraction=0.3,
                      min_contrast=12, max_contrast=60, clutter=3)


def test_same_seed_same_pixels() -> None:
    a, boxes_a = render_image(image_rng(7, "train", 3), CFG)
    b, boxes_b = render_image(image_rng(7, "train", 3), CFG)
    assert np.array_equal(a, b) and boxes_a == boxes_b


def test_other_seed_split_or_index_differs() -> None:
    ref, _ = render_image(image_rng(7, "train", 3), CFG)
    for rng in (image_rng(8, "train", 3), image_rng(7, "val", 3), image_rng(7, "train", 4)):
        other, _ = render_image(rng, CFG)
        assert not np.array_equal(ref, other)


def test_boxes_inside_image_and_all_classes_appear() -> None:
    seen = set()
    for i in range(60):
        img, boxes = render_image(image_rng(1, "train", i), CFG)
        assert img.shape == (128, 128, 3) and img.dtype == np.uint8
        assert len(boxes) <= CFG.max_defects
        for b in boxes:
            assert 0 <= b.x0 < b.x1 <= 128 and 0 <= b.y0 < b.y1 <= 128
            cls, cx, cy, w, h = b.yolo(128, 128)
            assert 0 < w <= 1 and 0 < h <= 1 and 0 <= cx - w / 2 and cx + w / 2 <= 1
            seen.add(cls)
    assert seen == set(range(len(CLASS_NAMES)))


def test_box_is_the_visible_defect() -> None:
    """Pixels inside a box differ from the clean background; the box is tight (exact labels)."""
    from pipeline.imagesets import synthetic

    rng = image_rng(3, "train", 0)
    mask, texture = synthetic._draw_inclusion(rng, 128, (40, 50, 30, 12))
    ys, xs = np.nonzero(mask > MASK_THRESHOLD)
    # The mask's tight bounds lie inside the region it was asked to fill.
    assert 40 <= xs.min() and xs.max() < 40 + 30 + 2 and 50 - 2 <= ys.min() and ys.max() < 50 + 12 + 2
    assert (texture[mask > MASK_THRESHOLD] != 0).all()


def test_small_defects_exist() -> None:
    cfg = GeneratorConfig(256, 4, 0.0, 1.0, 12, 60, 0)
    sizes = [max(b.x1 - b.x0, b.y1 - b.y0) for i in range(20) for b in render_image(image_rng(0, "t", i), cfg)[1]
             if b.cls != 2]
    assert sizes and np.median(sizes) <= 30
