"""Pascal VOC import: every element checked (numbers, flags, classes), UTF-8, symlinks, nothing dropped.

The basic layout tests (NEU-DET folders, box conversion, broken XML) are in test_imagesets_yolo.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
import pytest
from support import tiny_params

from pipeline.imagesets.yolo import DatasetError, import_voc, parse_voc_xml, voc_labels
from pipeline.stages import data

SRC = Path("ANNOTATIONS/patches_3.xml")
HEAD = "<annotation><filename>patches_3</filename><size><width>200</width><height>100</height></size>"


def _obj(name: str = "patches", box: tuple[Any, ...] = (10, 20, 110, 80), extra: str = "") -> str:
    x0, y0, x1, y1 = box
    return (f"<object><name>{name}</name>{extra}<bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>"
            f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>")


def _voc(*objects: str, head: str = HEAD) -> str:
    return head + "".join(objects) + "</annotation>"


@pytest.mark.parametrize(
    "xml,message",
    [
        (_voc(head="<annotation><size><width>wide</width><height>100</height></size>"),
         r"annotation ANNOTATIONS/patches_3\.xml <size>/<width> is 'wide', not a whole number of pixels; fix it"),
        (_voc(head="<annotation><size><width>200</width></size>"), r"<size>: <height> is missing; add it"),
        (_voc(head="<annotation><size><width>200.5</width><height>100</height></size>"),
         r"<size>/<width> is '200\.5', not a whole number"),
        (_voc(head="<annotation><size><width>0</width><height>0</height></size>"), r"<size> is 0x0; fix it"),
        (_voc(_obj(box=("ten", 20, 110, 80))),
         r"object 1: <bndbox>/<xmin> is 'ten', not a finite number; fix the XML"),
        (_voc(_obj(), _obj(box=(1, 2, "nan", 4))), r"object 2: <bndbox>/<xmax> is 'nan', not a finite number"),
        (_voc(_obj(box=(1, 2, "", 4))), r"object 1: <bndbox> needs xmin, ymin, xmax and ymax; add the missing <xmax>"),
        (_voc(_obj(extra="<difficult>2</difficult>")), r"object 1: <difficult> is '2'; it must be 0 or 1"),
        (_voc(_obj(extra="<truncated>yes</truncated>")), r"object 1: <truncated> is 'yes'; it must be 0 or 1"),
        (_voc(_obj(extra="<name>rust</name>")), r"object 1: 2 <name> elements; keep one"),
        ("<annotations><filename>x</filename></annotations>",
         r"patches_3\.xml: the root element is 'annotations', not <annotation>: not a Pascal VOC file"),
        ("<annotation><object>", r"patches_3\.xml: not valid XML"),
        (_voc(f"<objects>{_obj()}</objects>"), r"patches_3\.xml: 1 <object> element\(s\) not directly inside "
                                               r"<annotation>; move them up a level"),
    ],
)
def test_voc_elements_are_checked(xml: str, message: str) -> None:
    with pytest.raises(DatasetError, match=message) as e:
        parse_voc_xml(xml, SRC)
    assert str(e.value).startswith(f"annotation {SRC}")


def test_voc_flags_and_float_coordinates_are_read() -> None:
    ann = parse_voc_xml(_voc(_obj(extra="<difficult>1</difficult><truncated>0</truncated>"),
                             _obj(box=("10.5", "20", "110.25", "80"))), SRC)
    assert ann.size == (200, 100) and [o.difficult for o in ann.objects] == [True, False]
    assert ann.objects[1].box == (10.5, 20.0, 110.25, 80.0)
    rows = voc_labels(ann, SRC, 200, 100, ("patches",))
    assert len(rows) == 2  # a difficult object is imported, not dropped


def test_voc_box_outside_the_image_and_unknown_class() -> None:
    ann = parse_voc_xml(_voc(_obj(box=(10, 20, 110, 102))), SRC)
    with pytest.raises(DatasetError, match=r"object 1: box \(10\.0,20\.0\)-\(110\.0,102\.0\) lies outside the "
                                           r"200x100 image; clip it"):
        voc_labels(ann, SRC, 200, 100, ("patches",))
    with pytest.raises(DatasetError) as e:
        voc_labels(parse_voc_xml(_voc(_obj(name="scratchs")), SRC), SRC, 200, 100, ("crazing", "scratches"),
                   "ds/classes.txt")
    assert str(e.value) == (f"annotation {SRC} object 1: <name> 'scratchs' is not a class; the classes "
                            "(ds/classes.txt) are crazing, scratches: fix the name or add the class to ds/classes.txt")


def _img(path: Path, size: tuple[int, int] = (100, 200)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((*size, 3), 128, np.uint8))


def _tree(root: Path, n: int = 6) -> None:
    for i in range(n):
        cls = ("crazing", "patches", "scratches")[i % 3]
        _img(root / "IMAGES" / f"im{i}.jpg")
        (root / "ANNOTATIONS").mkdir(parents=True, exist_ok=True)
        head = HEAD.replace("patches_3", f"im{i}")
        (root / "ANNOTATIONS" / f"im{i}.xml").write_text(_voc(_obj(cls), head=head))


def test_voc_class_list_fixes_names_and_order(tmp_path: Path) -> None:
    _tree(tmp_path)
    (tmp_path / "classes.txt").write_text("scratches\npatches\ncrazing\ninclusion\n")
    names, samples = import_voc(tmp_path, 0.34, 0.0, seed=0)
    assert names == ("scratches", "patches", "crazing", "inclusion")  # the list's order, not sorted
    assert next(s for s in samples if s.name == "im0").labels[0][0] == 2  # crazing
    (tmp_path / "classes.txt").write_text("scratches\npatches\n")
    with pytest.raises(DatasetError, match=r"im0\.xml object 1: <name> 'crazing' is not a class; the classes "
                                           r"\(.*classes\.txt\) are scratches, patches"):
        import_voc(tmp_path, 0.34, 0.0, seed=0)


def test_voc_names_differing_in_case_are_refused(tmp_path: Path) -> None:
    _tree(tmp_path)
    (tmp_path / "ANNOTATIONS/im4.xml").write_text(_voc(_obj("Patches"), head=HEAD.replace("patches_3", "im4")))
    with pytest.raises(DatasetError, match=r"im4\.xml: class 'Patches' differs only in case from 'patches' "
                                           r"\(.*im1\.xml\); spell them the same, or list the classes in"):
        import_voc(tmp_path, 0.34, 0.0, seed=0)


def test_voc_image_without_annotation_is_refused(tmp_path: Path) -> None:
    _tree(tmp_path)
    _img(tmp_path / "IMAGES" / "extra.jpg")
    _img(tmp_path / "IMAGES" / "extra2.jpg")
    with pytest.raises(DatasetError, match=r"image .*IMAGES/extra\.jpg has no annotation \(and 1 more\), so it would "
                                           r"be left out; add an XML for it \(one with no <object>"):
        import_voc(tmp_path, 0.34, 0.0, seed=0)
    for stem in ("extra", "extra2"):  # background images, annotated as such, are imported
        (tmp_path / "ANNOTATIONS" / f"{stem}.xml").write_text(_voc(head=HEAD.replace("patches_3", stem)))
    _, samples = import_voc(tmp_path, 0.34, 0.0, seed=0)
    assert len(samples) == 8 and next(s for s in samples if s.name == "extra").labels == ()


def test_voc_xml_not_utf8_and_bom(tmp_path: Path) -> None:
    _tree(tmp_path)
    bad = tmp_path / "ANNOTATIONS/im2.xml"
    bad.write_bytes(_voc(_obj("scratches"), head=HEAD.replace("patches_3", "im2")).encode("utf-8").replace(
        b"<annotation>", b"<annotation><owner>Soci\xe9t\xe9</owner>"))
    with pytest.raises(DatasetError) as e:
        import_voc(tmp_path, 0.34, 0.0, seed=0)
    assert str(e.value) == f"annotation {bad}: not UTF-8 text (byte 0xe9 at offset 23, line 1); save it as UTF-8"
    # A BOM is fine, and so is an XML declaration naming another encoding: the bytes are read as UTF-8.
    bad.write_bytes(b"\xef\xbb\xbf<?xml version='1.0' encoding='ISO-8859-1'?>"
                    + _voc(_obj("scratches"), head=HEAD.replace("patches_3", "im2")).encode())
    assert len(import_voc(tmp_path, 0.34, 0.0, seed=0)[1]) == 6


def test_voc_symlinks(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    _tree(root)
    xml = root / "ANNOTATIONS/im1.xml"
    (root / "IMAGES").rename(root / "raw")
    (root / "IMAGES").symlink_to("raw", target_is_directory=True)
    # The whole folder is searched, so a link to something inside it reaches that twice: refused.
    with pytest.raises(DatasetError, match=r"ds/raw and .*ds/IMAGES are the same folder \(.*ds/raw, via a symlink\)"):
        import_voc(root, 0.34, 0.0, seed=0)
    (root / "IMAGES").unlink()
    (root / "raw").rename(root / "IMAGES")
    xml.rename(root / "im1.xml")
    xml.symlink_to("../im1.xml")
    with pytest.raises(DatasetError, match=r"ds/im1\.xml and .*ANNOTATIONS/im1\.xml are the same file .*imported "
                                           r"twice"):
        import_voc(root, 0.34, 0.0, seed=0)
    xml.unlink()
    xml.symlink_to("../missing.xml")
    with pytest.raises(DatasetError, match=r"ANNOTATIONS/im1\.xml: a dangling symlink \(its target \.\./missing\.xml "
                                           r"does not exist\)"):
        import_voc(root, 0.34, 0.0, seed=0)
    xml.unlink()
    (root / "im1.xml").rename(tmp_path / "im1.xml")
    xml.symlink_to(tmp_path / "im1.xml")
    with pytest.raises(DatasetError, match=r"ANNOTATIONS/im1\.xml: a symlink to .*/im1\.xml, which is outside the "
                                           r"import folder"):
        import_voc(root, 0.34, 0.0, seed=0)
    xml.unlink()
    (tmp_path / "im1.xml").rename(xml)  # back as a plain file for the image check below
    img = root / "IMAGES/im5.jpg"
    img.unlink()
    img.symlink_to("/nonexistent/im5.jpg")  # an image link: the same rules
    with pytest.raises(DatasetError, match=r"IMAGES/im5\.jpg: a dangling symlink"):
        import_voc(root, 0.34, 0.0, seed=0)


def test_data_stage_refuses_bad_voc_and_writes_nothing(tmp_path: Path, repo_params: dict[str, Any],
                                                       write_params: Callable[..., Path]) -> None:
    src = tmp_path / "src"
    _tree(src)
    p = tiny_params(repo_params)
    p["data"].update(source="voc", import_dir=str(src), val_fraction=0.34, test_fraction=0.0)
    out, metrics = tmp_path / "defects", tmp_path / "metrics.json"
    argv = ["--out", str(out), "--metrics", str(metrics), "--headline", str(tmp_path / "headline.json"),
            "--params", str(write_params(p))]
    data.main(argv)
    before = {q.relative_to(out): q.read_bytes() for q in out.rglob("*") if q.is_file()}
    before_metrics = metrics.read_bytes()
    (src / "ANNOTATIONS/im3.xml").write_text(_voc(head=HEAD.replace("<width>200", "<width>2OO")))
    with pytest.raises(DatasetError, match=r"im3\.xml <size>/<width> is '2OO', not a whole number of pixels"):
        data.main(argv)
    assert {q.relative_to(out): q.read_bytes() for q in out.rglob("*") if q.is_file()} == before
    assert metrics.read_bytes() == before_metrics
    assert not [q for q in tmp_path.iterdir() if q.name.startswith(".defects")]


def test_voc_size_that_disagrees_with_the_image_is_refused(tmp_path: Path) -> None:
    """<size> says 200x100; an image of another size would put every box in the wrong place."""
    _tree(tmp_path)
    _img(tmp_path / "IMAGES" / "im2.jpg", size=(120, 200))
    with pytest.raises(DatasetError, match=r"im2\.xml: <size> says 200x100 but image .*im2\.jpg is 200x120; fix "
                                           r"<size> \(or remove it"):
        import_voc(tmp_path, 0.34, 0.0, seed=0)
