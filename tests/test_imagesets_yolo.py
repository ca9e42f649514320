"""Validation of every image and label, the YOLO and VOC importers, and the atomic writer."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
import pytest
from support import tiny_params

from pipeline.imagesets.yolo import (
    DatasetError,
    DatasetWriter,
    decode_image,
    import_voc,
    import_yolo,
    read_label_file,
    split_names,
    validate_label_text,
)
from pipeline.stages import data

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


# ------------------------------------------------------------------------------------------
# Label lines: numbers as written
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,message",
    [
        ("0 0.1 0.1 0.2 0.1 0.3 0.3\n", r"line 1: .*found 7 .*segmentation polygon \(3 points\).*convert it to a box"),
        ("0 0.5 0.5 0.2 0.2 0.9\n", r"line 1: .*found 6 .*sixth column \(a confidence\?\).*remove it"),
        ("0,0.5,0.5,0.2,0.2\n", r"found 1 .*separated by spaces or tabs"),
        ("1e0 0.5 0.5 0.2 0.2\n", r"line 1: class 1e0 is not an integer; use the class index \(0\.\.5\)"),
        ("+1 0.5 0.5 0.2 0.2\n", r"class \+1 is not an integer"),
        ("x 0.5 0.5 0.2 0.2\n", r"non-numeric field class 'x'; write the class index \(0\.\.5\)"),
        ("9" * 40 + " 0.5 0.5 0.2 0.2\n", r"class 9{18}\.\.\. but the dataset has 6 classes"),
        ("0 0.1_5 0.5 0.2 0.2\n", r"non-numeric field cx '0\.1_5'.*write it as a decimal number"),
        ("0 \u0660.\u0665 0.5 0.2 0.2\n", r"non-numeric field cx"),  # Arabic-Indic digits: float() takes them
        ("0 0.5 0.5 1e999 0.2\n", r"non-finite"),
        ("0 0.5 0.5 0.2 -inf\n", r"non-finite"),
        ("0 0.5 0.5 -0.2 0.2\n", r"not normalised to \[0, 1\]"),
        ("0 0.5 0.5 0.2 0.2\r\n\r\n0 0.5 0.5 0.2\r\n", r"line 3: expected 5 fields"),
        ("0 0.5 0.5 0.2 0.2\r0 0.5 0.5 0.2\r", r"line 2: expected 5 fields"),  # old Mac line ends are lines too
    ],
)
def test_label_numbers_are_checked_as_written(text: str, message: str) -> None:
    with pytest.raises(DatasetError, match=message) as e:
        validate_label_text(text, LABEL, 6)
    assert str(e.value).startswith(f"label file {LABEL} line ")


def test_label_class_written_as_float_and_tabs_are_accepted() -> None:
    # "3.0" is what a float array saved with %f looks like; Ultralytics reads it as class 3.
    assert validate_label_text("3.0\t0.5 0.5\t0.2 0.2\n 1.00 .5 .5 2e-1 0.2 \n", LABEL, 6) == (
        (3, 0.5, 0.5, 0.2, 0.2), (1, 0.5, 0.5, 0.2, 0.2))


# ------------------------------------------------------------------------------------------
# Label files: text decoding
# ------------------------------------------------------------------------------------------


def test_label_not_utf8_names_file_and_offset(tmp_path: Path) -> None:
    f = tmp_path / "x.txt"
    f.write_bytes(b"0 0.5 0.5 0.2 0.2\n0 0.5\xff 0.5 0.2 0.2\n")
    with pytest.raises(DatasetError) as e:
        read_label_file(f, 6)
    assert str(e.value) == f"label file {f}: not UTF-8 text (byte 0xff at offset 23, line 2); save it as UTF-8"
    f.write_bytes("0 0.5 0.5 0.2 0.2\n".encode("utf-16"))
    with pytest.raises(DatasetError, match=r"not UTF-8 text \(it is UTF-16\) \(byte 0xff at offset 0, line 1\)"):
        read_label_file(f, 6)


def test_label_utf8_bom_is_accepted(tmp_path: Path) -> None:
    f = tmp_path / "x.txt"
    f.write_bytes(b"\xef\xbb\xbf0 0.5 0.5 0.2 0.2\n")
    assert read_label_file(f, 6) == ((0, 0.5, 0.5, 0.2, 0.2),)
    f.write_bytes(b"\xef\xbb\xbf\xc0")  # the offset counts the BOM: it is the offset in the file
    with pytest.raises(DatasetError, match=r"byte 0xc0 at offset 3"):
        read_label_file(f, 6)


def test_import_yolo_latin1_label_and_class_list(tmp_path: Path) -> None:
    _yolo_tree(tmp_path, with_splits=True)
    (tmp_path / "labels/val/im1.txt").write_bytes("1 0.5 0.5 0.2 0.2 # rouillé\n".encode("latin-1"))
    with pytest.raises(DatasetError, match=r"label file .*labels/val/im1\.txt: not UTF-8 text \(byte 0xe9 at offset "
                                           r"26, line 1\); save it as UTF-8"):
        import_yolo(tmp_path, 0.2, 0.0, seed=0)
    (tmp_path / "labels/val/im1.txt").write_text("1 0.5 0.5 0.2 0.2\n")
    (tmp_path / "data.yaml").write_bytes("names: [dent, rouillé]\n".encode("latin-1"))
    with pytest.raises(DatasetError, match=r"class list .*data\.yaml: not UTF-8 text"):
        import_yolo(tmp_path, 0.2, 0.0, seed=0)
    (tmp_path / "data.yaml").unlink()
    (tmp_path / "classes.txt").write_bytes(b"dent\r\nrust\xa0\r\n")
    with pytest.raises(DatasetError, match=r"class list .*classes\.txt: not UTF-8 text \(byte 0xa0 at offset 10, "
                                           r"line 2\)"):
        import_yolo(tmp_path, 0.2, 0.0, seed=0)
    (tmp_path / "classes.txt").write_bytes(b"\xef\xbb\xbfdent\r\nrust\r\n")  # BOM and CRLF: fine
    assert import_yolo(tmp_path, 0.2, 0.0, seed=0)[0] == ("dent", "rust")


# ------------------------------------------------------------------------------------------
# Import: symlinks, folder contents, class lists
# ------------------------------------------------------------------------------------------


def test_dangling_label_symlink_is_refused_not_background(tmp_path: Path) -> None:
    _yolo_tree(tmp_path, with_splits=True)
    lbl = tmp_path / "labels/val/im2.txt"
    lbl.unlink()
    lbl.symlink_to("/nonexistent/im2.txt")
    with pytest.raises(DatasetError) as e:
        import_yolo(tmp_path, 0.2, 0.0, seed=0)
    assert str(e.value) == (f"{lbl}: a dangling symlink (its target /nonexistent/im2.txt does not exist); point it "
                            "at the file or delete it (with its image or label)")


def test_symlinks_inside_the_import_folder_are_followed(tmp_path: Path) -> None:
    _yolo_tree(tmp_path, with_splits=True)
    pool = tmp_path / "pool"
    pool.mkdir()
    # A label and an image that are links to files elsewhere inside the dataset folder ...
    (tmp_path / "labels/val/im1.txt").rename(pool / "im1.txt")
    (tmp_path / "labels/val/im1.txt").symlink_to("../../pool/im1.txt")
    (tmp_path / "images/val/im1.jpg").rename(pool / "im1.jpg")
    (tmp_path / "images/val/im1.jpg").symlink_to(pool / "im1.jpg")  # absolute target, still inside
    # ... and a whole split folder that is a link.
    (tmp_path / "images/train").rename(pool / "train")
    (tmp_path / "images/train").symlink_to("../pool/train", target_is_directory=True)
    names, samples = import_yolo(tmp_path, 0.2, 0.0, seed=0)
    im1 = next(s for s in samples if s.split == "val" and s.name == "im1")
    assert im1.labels == ((1, 0.5, 0.5, 0.25, 0.25),) and im1.image == tmp_path / "images/val/im1.jpg"
    assert sum(s.split == "train" for s in samples) == 5


def test_symlinks_leaving_the_import_folder_are_refused(tmp_path: Path) -> None:
    root, outside = tmp_path / "ds", tmp_path / "elsewhere"
    _yolo_tree(root, with_splits=True)
    outside.mkdir()
    (root / "labels/val/im1.txt").rename(outside / "im1.txt")
    (root / "labels/val/im1.txt").symlink_to(outside / "im1.txt")
    with pytest.raises(DatasetError) as e:
        import_yolo(root, 0.2, 0.0, seed=0)
    assert str(e.value) == (
        f"{root / 'labels/val/im1.txt'}: a symlink to {outside.resolve() / 'im1.txt'}, which is outside the import "
        f"folder {root.resolve()}; copy the file into the folder (or move the folder so the target is inside it): "
        "only what is inside the import folder is imported")
    (root / "labels/val/im1.txt").unlink()
    shutil.move(root / "images/val", outside / "val")
    (root / "images/val").symlink_to(outside / "val", target_is_directory=True)  # an image folder: same rule
    with pytest.raises(DatasetError, match=r"images/val: a symlink to .*elsewhere/val, which is outside the import"):
        import_yolo(root, 0.2, 0.0, seed=0)


def test_symlink_loops_are_refused(tmp_path: Path) -> None:
    _yolo_tree(tmp_path, with_splits=True)
    a, b = tmp_path / "labels/val/im2.txt", tmp_path / "labels/val/loop.txt"
    a.unlink()
    a.symlink_to("loop.txt")
    b.symlink_to("im2.txt")
    with pytest.raises(DatasetError, match=r"labels/val/im2\.txt: a symlink loop \(it points at loop\.txt, which "
                                           r"leads back to itself\); replace the link"):
        import_yolo(tmp_path, 0.2, 0.0, seed=0)
    a.unlink()
    b.unlink()
    (tmp_path / "images/val/again").symlink_to("..", target_is_directory=True)  # a folder link to its parent
    with pytest.raises(DatasetError, match=r"images/val/again: a symlink loop \(it leads back to its own parent"):
        import_yolo(tmp_path, 0.2, 0.0, seed=0)


def test_one_image_reached_twice_is_refused(tmp_path: Path) -> None:
    _yolo_tree(tmp_path, with_splits=True)
    (tmp_path / "images/val/twin.jpg").symlink_to("../train/im0.jpg")
    with pytest.raises(DatasetError, match=r"images/val/twin\.jpg and .*images/train/im0\.jpg are the same file .*"
                                           r"imported twice"):
        import_yolo(tmp_path, 0.2, 0.0, seed=0)


@pytest.mark.parametrize(
    "name,message",
    [
        ("images/val/im1.txt", r"images/val/im1\.txt: a label file inside images/; YOLO labels go in labels/"),
        ("images/val/notes.md", r"images/val/notes\.md: not an image \(\.jpg.*move it out of images/"),
        ("labels/val/im1.TXT", r"labels/val/im1\.TXT: label files end in lower-case \.txt"),
        ("labels/val/im1.json", r"labels/val/im1\.json: not a YOLO label \(\.txt\)"),
    ],
)
def test_files_that_would_be_ignored_are_refused(tmp_path: Path, name: str, message: str) -> None:
    _yolo_tree(tmp_path, with_splits=True)
    (tmp_path / name).write_text("1 0.5 0.5 0.2 0.2\n")
    with pytest.raises(DatasetError, match=message):
        import_yolo(tmp_path, 0.2, 0.0, seed=0)


def test_hidden_files_and_ultralytics_cache_are_skipped(tmp_path: Path) -> None:
    _yolo_tree(tmp_path, with_splits=True)
    (tmp_path / "labels/train.cache").write_bytes(b"\x00binary")
    (tmp_path / "images/val/.DS_Store").write_bytes(b"\xff")
    (tmp_path / "labels/val/.im1.txt.swp").write_bytes(b"\xff")
    assert len(import_yolo(tmp_path, 0.2, 0.0, seed=0)[1]) == 10


def test_no_label_files_at_all_is_refused(tmp_path: Path) -> None:
    _yolo_tree(tmp_path, with_splits=True)
    shutil.rmtree(tmp_path / "labels")
    with pytest.raises(DatasetError, match=r"labels: no label files, so every image would be a background image"):
        import_yolo(tmp_path, 0.2, 0.0, seed=0)


@pytest.mark.parametrize(
    "text,message",
    [
        ("- dent\n- rust\n", r"data\.yaml: no 'names:' key"),
        ("names: [dent, rust]\nnc: 3\n", r"data\.yaml: nc is 3 but names lists 2 classes"),
        ("names: [dent, ~]\n", r"data\.yaml: class name None is not a name"),
        ("names: {0: dent, x: rust}\n", r"data\.yaml: names keys must be 0\.\.1"),
    ],
)
def test_bad_class_lists(tmp_path: Path, text: str, message: str) -> None:
    _yolo_tree(tmp_path, with_splits=True)
    (tmp_path / "data.yaml").write_text(text)
    with pytest.raises(DatasetError, match=message):
        import_yolo(tmp_path, 0.2, 0.0, seed=0)


# ------------------------------------------------------------------------------------------
# The data stage: a refused import writes nothing
# ------------------------------------------------------------------------------------------


def _stage_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_data_stage_refuses_bad_import_and_writes_nothing(tmp_path: Path, repo_params: dict[str, Any],
                                                          write_params: Callable[..., Path]) -> None:
    src = tmp_path / "src"
    _yolo_tree(src, with_splits=True)
    p = tiny_params(repo_params)
    p["data"].update(source="yolo", import_dir=str(src), val_fraction=0.2, test_fraction=0.0)
    out, metrics = tmp_path / "defects", tmp_path / "metrics.json"
    argv = ["--out", str(out), "--metrics", str(metrics), "--headline", str(tmp_path / "headline.json"),
            "--params", str(write_params(p))]
    data.main(argv)
    before, before_metrics = _stage_tree(out), metrics.read_bytes()
    label = src / "labels/val/im3.txt"
    good = label.read_bytes()
    for breakage, message in [
        ("dangling", r"labels/val/im3\.txt: a dangling symlink"),
        ("latin-1", r"labels/val/im3\.txt: not UTF-8 text \(byte 0xe9 at offset 18, line 1\)"),
        ("polygon", r"labels/val/im3\.txt line 1: .*segmentation polygon \(4 points\)"),
    ]:
        label.unlink()
        if breakage == "dangling":
            label.symlink_to(src / "gone.txt")
        else:
            label.write_bytes(b"1 0.5 0.5 0.2 0.2 \xe9\n" if breakage == "latin-1"
                              else b"1 0.1 0.1 0.2 0.1 0.3 0.3 0.1 0.3\n")
        with pytest.raises(DatasetError, match=message):
            data.main(argv)
        assert _stage_tree(out) == before and metrics.read_bytes() == before_metrics, breakage
        assert not [q for q in tmp_path.iterdir() if q.name.startswith(".defects")]  # no temp litter
        label.unlink()
        label.write_bytes(good)


def test_class_list_yaml_with_a_key_twice_is_refused(tmp_path: Path) -> None:
    """data.yaml listing `names:` twice is an error naming the key and both lines, not the last one winning."""
    from pipeline.imagesets.yolo import _names_from_yaml

    f = tmp_path / "data.yaml"
    f.write_text("names: [dent, rust]\nnc: 2\nnames: [rust, dent]\n")
    with pytest.raises(DatasetError, match=r"data\.yaml: duplicate key 'names' \(lines 1 and 3\)"):
        _names_from_yaml(f)
