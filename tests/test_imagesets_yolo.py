"""Validation of every image and label, the YOLO and VOC importers, and the atomic writer."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.imagesets.yolo import (
    DatasetError,
    DatasetWriter,
    decode_image,
    import_voc,
    import_yolo,
    split_names,
    validate_label_text,
)

LABEL = Path("labels/train/0042.txt")


@pytest.mark.parametrize(
    "text,message",
    [
        ("0 0.5 0.5 0.2\n", r"line 1: expected 5 fields 'class cx cy w h', found 4"),
        ("0 0.5 0.5 0.2 0.2\n7 0.5 0.5 0.1 0.1\n", r"line 2: class 7 but the dataset has 6 classes"),
        ("-1 0.5 0.5 0.2 0.2\n", r"class -1 but the dataset has 6 classes"),
        ("1.5 0.5 0.5 0.2 0.2\n", r"class 1.5 is not an integer"),
        ("0 0.5 abc 0.2 0.2\n", r"non-numeric field"),
        ("0 120 80 30 20\n", r"not normalised to \[0, 1\]; divide pixel coordinates"),
        ("0 0.5 0.5 0 0.2\n", r"zero area"),
        ("0 0.95 0.5 0.2 0.2\n", r"extends outside the image; clip it"),
        ("0 0.5 0.5 nan 0.2\n", r"non-finite"),
    ],
)
def test_label_errors_name_file_line_and_fix(text: str, message: str) -> None:
    with pytest.raises(DatasetError, match=message) as e:
        validate_label_text(text, LABEL, 6)
    assert str(LABEL) in str(e.value)


def test_valid_labels_and_blank_lines() -> None:
    rows = validate_label_text("0 0.5 0.5 0.2 0.2\n\n5 0.1 0.1 0.2 0.2\n", LABEL, 6)
    assert rows == ((0, 0.5, 0.5, 0.2, 0.2), (5, 0.1, 0.1, 0.2, 0.2))


def _img(path: Path, size: tuple[int, int] = (64, 80)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((*size, 3), 128, np.uint8))
    return path


def test_corrupt_and_empty_images(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg at all")
    with pytest.raises(DatasetError, match=r"bad\.jpg: cannot be decoded"):
        decode_image(bad)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(DatasetError, match=r"empty\.png: file is empty or missing"):
        decode_image(empty)
    assert decode_image(_img(tmp_path / "ok.png")).shape == (64, 80, 3)


def _yolo_tree(root: Path, with_splits: bool) -> None:
    (root / "data.yaml").parent.mkdir(parents=True, exist_ok=True)
    (root / "data.yaml").write_text("names: [dent, rust]\n")
    splits = ("train", "val") if with_splits else ("",)
    for split in splits:
        for i in range(5):
            img = _img(root / "images" / split / f"im{i}.jpg")
            lbl = root / "labels" / split / f"im{i}.txt"
            lbl.parent.mkdir(parents=True, exist_ok=True)
            if i != 4:  # im4 has no label file: a background image
                lbl.write_text(f"{i % 2} 0.5 0.5 0.25 0.25\n")
            assert img.exists()


def test_import_yolo_keeps_splits(tmp_path: Path) -> None:
    _yolo_tree(tmp_path, with_splits=True)
    names, samples = import_yolo(tmp_path, 0.2, 0.0, seed=0)
    assert names == ("dent", "rust")
    assert sorted({s.split for s in samples}) == ["train", "val"]
    bg = [s for s in samples if s.name == "im4"]
    assert bg and all(s.labels == () for s in bg)


def test_import_yolo_splits_flat_folder_reproducibly(tmp_path: Path) -> None:
    _yolo_tree(tmp_path, with_splits=False)
    _, a = import_yolo(tmp_path, 0.4, 0.2, seed=3)
    _, b = import_yolo(tmp_path, 0.4, 0.2, seed=3)
    assert [(s.name, s.split) for s in a] == [(s.name, s.split) for s in b]
    assert {s.split for s in a} == {"train", "val", "test"}


def test_import_yolo_bad_label_names_file(tmp_path: Path) -> None:
    _yolo_tree(tmp_path, with_splits=True)
    (tmp_path / "labels/val/im2.txt").write_text("0 0.5 0.5 0.2 0.2\n3 0.5 0.5 0.1 0.1\n")
    with pytest.raises(DatasetError, match=r"labels/val/im2\.txt line 2: class 3 but the dataset has 2 classes"):
        import_yolo(tmp_path, 0.2, 0.0, seed=0)


def test_import_yolo_orphan_label_and_missing_names(tmp_path: Path) -> None:
    _yolo_tree(tmp_path, with_splits=True)
    (tmp_path / "labels/train/ghost.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    with pytest.raises(DatasetError, match=r"ghost\.txt has no image"):
        import_yolo(tmp_path, 0.2, 0.0, seed=0)
    (tmp_path / "labels/train/ghost.txt").unlink()
    (tmp_path / "data.yaml").unlink()
    with pytest.raises(DatasetError, match=r"no class names; add data\.yaml"):
        import_yolo(tmp_path, 0.2, 0.0, seed=0)


VOC = """<annotation><folder>x</folder><filename>{name}</filename>
<size><width>200</width><height>200</height><depth>1</depth></size>
{objects}</annotation>"""
OBJ = ("<object><name>{cls}</name>"
       "<bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>")


def _voc_tree(root: Path) -> None:
    """The NEU-DET layout: ANNOTATIONS/*.xml, IMAGES/*.jpg, <filename> without a suffix."""
    for i, cls in enumerate(["scratches", "crazing", "scratches", "patches", "crazing", "patches"]):
        name = f"{cls}_{i}"
        _img(root / "IMAGES" / f"{name}.jpg", (200, 200))
        obj = OBJ.format(cls=cls, x0=10 + i, y0=20, x1=110, y1=180)
        (root / "ANNOTATIONS").mkdir(parents=True, exist_ok=True)
        (root / "ANNOTATIONS" / f"{name}.xml").write_text(VOC.format(name=name, objects=obj))


def test_import_voc_neu_layout(tmp_path: Path) -> None:
    _voc_tree(tmp_path)
    names, samples = import_voc(tmp_path, 0.34, 0.0, seed=0)
    assert names == ("crazing", "patches", "scratches")  # from the source, sorted
    assert len(samples) == 6 and {s.split for s in samples} == {"train", "val"}
    s = next(s for s in samples if s.name == "scratches_0")
    cls, cx, cy, w, h = s.labels[0]
    # VOC 1-based inclusive (10..110) -> 0-based [9, 110): centre 59.5, width 101 px.
    assert cls == 2 and cx == pytest.approx(59.5 / 200) and w == pytest.approx(101 / 200)
    assert cy == pytest.approx(99.5 / 200) and h == pytest.approx(161 / 200)


@pytest.mark.parametrize(
    "obj,message",
    [
        (OBJ.format(cls="dent", x0=50, y0=20, x1=40, y1=80), r"object 1: box .* has no area"),
        (OBJ.format(cls="dent", x0=10, y0=20, x1=260, y1=80), r"lies outside the 200x200 image"),
        ("<object><name>dent</name></object>", r"object 1: no <bndbox>"),
        (OBJ.format(cls="", x0=1, y0=2, x1=30, y1=40), r"<name> is missing or empty"),
    ],
)
def test_voc_errors_name_the_annotation(tmp_path: Path, obj: str, message: str) -> None:
    _voc_tree(tmp_path)
    bad = tmp_path / "ANNOTATIONS" / "patches_3.xml"
    bad.write_text(VOC.format(name="patches_3", objects=obj))
    with pytest.raises(DatasetError, match=message) as e:
        import_voc(tmp_path, 0.34, 0.0, seed=0)
    assert "patches_3.xml" in str(e.value)


def test_voc_broken_xml_and_missing_image(tmp_path: Path) -> None:
    _voc_tree(tmp_path)
    (tmp_path / "ANNOTATIONS" / "crazing_1.xml").write_text("<annotation><size>")
    with pytest.raises(DatasetError, match=r"crazing_1\.xml: not valid XML"):
        import_voc(tmp_path, 0.34, 0.0, seed=0)
    (tmp_path / "ANNOTATIONS" / "crazing_1.xml").unlink()
    (tmp_path / "IMAGES" / "patches_5.jpg").unlink()
    with pytest.raises(DatasetError, match=r"patches_5\.xml: image 'patches_5' not found"):
        import_voc(tmp_path, 0.34, 0.0, seed=0)


def test_writer_leaves_target_untouched_on_error(tmp_path: Path) -> None:
    target = tmp_path / "defects"
    with DatasetWriter(target, ("a",)) as w:
        w.add("train", "x", b"old", ".jpg", [])
        w.add("val", "y", b"old", ".jpg", [])
        w.commit()
    before = sorted(p.relative_to(target) for p in target.rglob("*"))
    with pytest.raises(DatasetError):
        with DatasetWriter(target, ("a",)) as w:
            w.add("train", "z", b"new", ".jpg", [(0, 0.5, 0.5, 0.1, 0.1)])
            w.commit()  # no val images: refused
    assert sorted(p.relative_to(target) for p in target.rglob("*")) == before
    assert (target / "images/train/x.jpg").read_bytes() == b"old"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".defects")]  # no temp litter


def test_split_names_is_seeded() -> None:
    names = [f"n{i}" for i in range(20)]
    a = split_names(names, 0.25, 0.1, seed=1)
    assert a == split_names(list(reversed(names)), 0.25, 0.1, seed=1)
    assert sum(v == "val" for v in a.values()) == 5 and sum(v == "test" for v in a.values()) == 2
