"""The defect dataset on disk: validation, importers (YOLO folder, Pascal VOC XML) and the writer.

Every source, synthetic or imported, goes through the same checks, so a bad file is reported the
same way whatever it came from: the file, the line (YOLO) or element (VOC) and the fix
(docs/input-checks.md lists them). Imported files are read only through `read_text` (UTF-8, a
BOM accepted) and found only through `_walk` (symlinks followed inside the import folder, refused
when dangling, looping or leaving it), so no label is ever read as empty because it could not be
read. The importers read and check everything before anything is written; the writer builds the
whole dataset in a temp folder beside the target and swaps it in with `os.replace`, so a failing
import leaves the previous dataset exactly as it was.
"""

from __future__ import annotations

import codecs
import errno
import math
import os
import re
import shutil
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import cv2
import numpy as np
import yaml

from pipeline.config.params import DuplicateKeyError, load_yaml

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
SPLITS = ("train", "val", "test")
EDGE_TOLERANCE = 1e-3  # normalised boxes may overshoot the image edge by rounding, not more
LABEL_SUFFIX = ".txt"
ULTRALYTICS_CACHE_SUFFIX = ".cache"  # Ultralytics writes labels/<split>.cache beside the label folders

Label = tuple[int, float, float, float, float]  # class, cx, cy, w, h (normalised)


class DatasetError(ValueError):
    """A problem with an input image or label; the message names the file and the fix."""


@dataclass(frozen=True)
class Sample:
    """One image with its YOLO label lines (already validated)."""

    split: str
    name: str  # file stem, unique within the split
    image: Path  # where to read the image bytes from
    labels: tuple[Label, ...]


@dataclass
class DatasetSummary:
    """What the writer produced: counts per split and per class (the DVC metrics)."""

    class_names: tuple[str, ...]
    images: dict[str, int] = field(default_factory=dict)
    instances: dict[str, dict[str, int]] = field(default_factory=dict)
    empty_images: dict[str, int] = field(default_factory=dict)

    def as_metrics(self) -> dict[str, object]:
        """The metrics document: totals plus per-split, per-class instance counts."""
        return {
            "classes": len(self.class_names),
            "images": self.images,
            "images_total": sum(self.images.values()),
            "empty_images": self.empty_images,
            "instances": self.instances,
            "instances_total": sum(sum(v.values()) for v in self.instances.values()),
        }


def _show(text: str, limit: int = 60) -> str:
    """`text` quoted for an error message, cut short: a garbage line can be megabytes long."""
    shown = repr(text)
    return shown if len(shown) <= limit else shown[: limit - 4] + "...'"


# ------------------------------------------------------------------------------------------
# Reading files: symlinks and text
# ------------------------------------------------------------------------------------------


def follow_link(link: Path, root_real: Path) -> Path:
    """The real path `link` (a symlink) leads to; DatasetError unless it exists inside `root_real`.

    The one symlink rule of every import (datasets, labelled camera frames, ingested frames).

    A dangling link would make its image vanish or its label read as empty; a loop never ends; a
    target outside the import folder is data the dataset's hash and `dvc status` do not cover.
    """
    try:
        target = os.readlink(link)
    except OSError as e:
        raise DatasetError(f"{link}: the symlink cannot be read ({e.strerror}); replace it with the file") from None
    try:
        real = link.resolve(strict=True)
    except FileNotFoundError:
        raise DatasetError(f"{link}: a dangling symlink (its target {target} does not exist); point it at the file "
                           "or delete it (with its image or label)") from None
    except (RuntimeError, OSError) as e:  # RuntimeError: Python 3.11's "Symlink loop"; ELOOP on later ones
        if isinstance(e, OSError) and e.errno != errno.ELOOP:
            raise DatasetError(f"{link}: the symlink to {target} cannot be followed ({e.strerror}); "
                               "fix its target's permissions or replace the link with the file") from None
        raise DatasetError(f"{link}: a symlink loop (it points at {target}, which leads back to itself); "
                           "replace the link with the file or folder it should point at") from None
    if not real.is_relative_to(root_real):
        raise DatasetError(f"{link}: a symlink to {real}, which is outside the import folder {root_real}; copy the "
                           "file into the folder (or move the folder so the target is inside it): only what is inside "
                           "the import folder is imported")
    return real


def _present(path: Path, root_real: Path) -> bool:
    """Whether `path` exists; a symlink is followed only inside `root_real` (a bad one is an error)."""
    if path.is_symlink():
        follow_link(path, root_real)
        return True
    return path.exists()


def _walk(top: Path, root_real: Path) -> list[Path]:
    """Every file under folder `top` (sorted), as paths below `top`; hidden names (`.x`) are skipped.

    Symlinks to files and folders are followed when their target is inside `root_real` (the
    import folder), and refused otherwise (`_follow_link`). A folder reached twice (a link to its
    own ancestor, or two links to one folder) and a file reached twice (two links to one image:
    it would be trained and scored twice, maybe in two splits) are errors too.
    """
    top_real = follow_link(top, root_real) if top.is_symlink() else top.resolve()
    files: list[Path] = []
    dirs_seen: dict[Path, Path] = {}
    files_seen: dict[Path, Path] = {}

    def visit(folder: Path, real: Path, ancestors: frozenset[Path]) -> None:
        if real in ancestors:
            raise DatasetError(f"{folder}: a symlink loop (it leads back to its own parent folder {real}); "
                               "replace the link with the folder it should point at")
        if real in dirs_seen:
            raise DatasetError(f"{folder} and {dirs_seen[real]} are the same folder ({real}, via a symlink), so its "
                               "files would be imported twice; remove one of the two")
        dirs_seen[real] = folder
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            raise DatasetError(f"{folder}: the folder cannot be listed ({e.strerror}); fix its permissions") from None
        for entry in entries:
            if entry.name.startswith("."):
                continue  # .gitkeep, .DS_Store, .ipynb_checkpoints, partial downloads: not data
            path = folder / entry.name
            target = follow_link(path, root_real) if entry.is_symlink() else real / entry.name
            if target.is_dir():
                visit(path, target, ancestors | {real})
            elif target.is_file():
                if target in files_seen:
                    raise DatasetError(f"{path} and {files_seen[target]} are the same file ({target}, via a symlink), "
                                       "so it would be imported twice (an image trained and scored twice): remove one")
                files_seen[target] = path
                files.append(path)
            else:
                raise DatasetError(f"{path}: not a regular file or folder (a socket, FIFO or device); remove it")

    visit(top, top_real, frozenset())
    return sorted(files)


def _import_root(root: Path) -> Path:
    """The real path of the import folder (the boundary symlinks may not leave)."""
    if not root.is_dir():
        raise DatasetError(f"{root}: the import folder does not exist or is not a folder; point the import at it")
    return root.resolve()


def read_text(path: Path, what: str = "file") -> str:
    """The text of `path` decoded as UTF-8 (a leading BOM dropped); `what` names it in errors.

    Anything else (Latin-1, UTF-16, binary) is a DatasetError naming the file and the first bad
    byte's offset, never a bare UnicodeDecodeError and never a guess at another encoding.
    """
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DatasetError(f"{what} {path}: cannot be read ({e.strerror}); fix its permissions or replace it") from None
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        offset = bom + e.start
        line = data[:offset].count(b"\n") + 1
        hint = " (it is UTF-16)" if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) else ""
        raise DatasetError(f"{what} {path}: not UTF-8 text{hint} (byte 0x{data[offset]:02x} at offset {offset}, "
                           f"line {line}); save it as UTF-8") from None


# ------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------


def decode_image(path: Path) -> np.ndarray:
    """Decode the image at `path` (BGR uint8) or raise DatasetError naming the file."""
    data = np.fromfile(str(path), dtype=np.uint8) if path.is_file() else np.empty(0, np.uint8)
    if data.size == 0:
        raise DatasetError(f"image {path}: file is empty or missing; replace it or delete it and its label")
    img = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if img is None or img.size == 0:
        raise DatasetError(
            f"image {path}: cannot be decoded (corrupt or not an image); re-export it or delete it and its label"
        )
    return img


# ASCII decimal numbers only: Python's float() also takes "1_0", "١" (Arabic-Indic digits) and
# surrounding Unicode spaces, which no label writer means and Ultralytics' reader would not take.
_DECIMAL = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)
_NON_FINITE = re.compile(r"[+-]?(?:nan|inf|infinity)", re.ASCII | re.IGNORECASE)
# A class index is an integer; "3.0" (a float array saved with %f) is taken as 3, "3.5" and "3e0" are not.
_CLASS_INDEX = re.compile(r"(-?)(\d+)(?:\.0+)?", re.ASCII)
_LINE_BREAK = re.compile(r"\r\n|\n|\r")  # what an editor counts as a line, so line numbers match it
_FIELD_SEP = re.compile(r"[ \t]+")
_BOX_FIELDS = ("cx", "cy", "w", "h")


def _number(token: str) -> float | None:
    """`token` as a float if it is an ASCII decimal number or nan/inf, else None."""
    if _DECIMAL.fullmatch(token) or _NON_FINITE.fullmatch(token):
        return float(token)
    return None


def _check_box(cx: float, cy: float, w: float, h: float, where: str) -> None:
    """A normalised YOLO box: finite, centre and size in [0, 1], positive area, inside the image."""
    if not all(math.isfinite(v) for v in (cx, cy, w, h)):
        raise DatasetError(f"{where}: box has a non-finite number; fix the line")
    if not all(0.0 <= v <= 1.0 for v in (cx, cy, w, h)):
        raise DatasetError(
            f"{where}: box {cx} {cy} {w} {h} is not normalised to [0, 1]; "
            "divide pixel coordinates by the image width/height"
        )
    if w <= 0.0 or h <= 0.0:
        raise DatasetError(f"{where}: box has zero area (w={w}, h={h}); remove the line or fix the box")
    if (cx - w / 2 < -EDGE_TOLERANCE or cx + w / 2 > 1 + EDGE_TOLERANCE
            or cy - h / 2 < -EDGE_TOLERANCE or cy + h / 2 > 1 + EDGE_TOLERANCE):
        raise DatasetError(
            f"{where}: box {cx} {cy} {w} {h} extends outside the image; clip it to the image bounds"
        )


def _class_index(token: str, num_classes: int, where: str) -> int:
    m = _CLASS_INDEX.fullmatch(token)
    if m is None:
        if _number(token) is not None:
            raise DatasetError(f"{where}: class {token} is not an integer; use the class index (0..{num_classes - 1})")
        raise DatasetError(f"{where}: non-numeric field class {_show(token)}; write the class index "
                           f"(0..{num_classes - 1})")
    sign, digits = m.groups()
    # An absurdly long index is out of range; int() of it would also hit Python's 4300-digit limit.
    cls = int(digits) if len(digits) <= 18 else num_classes
    if sign or not 0 <= cls < num_classes:
        raise DatasetError(
            f"{where}: class {sign}{digits if len(digits) <= 18 else digits[:18] + '...'} but the dataset has "
            f"{num_classes} classes (0..{num_classes - 1}); fix the class index or add the class name"
        )
    return cls


def validate_label_text(text: str, source: Path, num_classes: int) -> tuple[Label, ...]:
    """Parse YOLO label text ("cls cx cy w h" per line) and check every line.

    Fields are separated by spaces or tabs; lines by LF, CRLF or CR; blank lines are skipped.
    Checks: exactly five fields (segmentation polygons are refused: convert them to boxes); the
    class an integer index in 0..num_classes-1 (`3` or `3.0`, not `3.5`, `+3` or `3e0`); the box
    ASCII decimal numbers, finite, centre and size in [0, 1], positive area and inside the image
    (EDGE_TOLERANCE for rounding). Raises DatasetError naming `source`, the 1-based line and the fix.
    """
    rows = []
    for lineno, line in enumerate(_LINE_BREAK.split(text), start=1):
        stripped = line.strip(" \t")
        if not stripped:
            continue
        where = f"label file {source} line {lineno}"
        fields = _FIELD_SEP.split(stripped)
        if len(fields) != 5:
            hint = ("fix the line (fields are separated by spaces or tabs; segmentation polygons are not "
                    "supported: convert them to boxes)")
            if len(fields) >= 7 and len(fields) % 2 == 1:
                hint = (f"it looks like a segmentation polygon ({(len(fields) - 1) // 2} points), which is not "
                        "supported: convert it to a box")
            elif len(fields) == 6:
                hint = "a sixth column (a confidence?) is not part of a label: remove it"
            raise DatasetError(
                f"{where}: expected 5 fields 'class cx cy w h', found {len(fields)} ({_show(stripped)}); {hint}"
            )
        cls = _class_index(fields[0], num_classes, where)
        coords = []
        for name, token in zip(_BOX_FIELDS, fields[1:]):
            value = _number(token)
            if value is None:
                raise DatasetError(f"{where}: non-numeric field {name} {_show(token)} in {_show(stripped)}; "
                                   "write it as a decimal number such as 0.25")
            coords.append(value)
        cx, cy, w, h = coords
        _check_box(cx, cy, w, h, where)
        rows.append((cls, cx, cy, w, h))
    return tuple(rows)


def read_label_file(path: Path, num_classes: int) -> tuple[Label, ...]:
    """Read and validate the YOLO label file at `path` (UTF-8, see `read_text`)."""
    return validate_label_text(read_text(path, "label file"), path, num_classes)


def validate_class_names(names: Sequence[Any], source: Path) -> tuple[str, ...]:
    """Check class names are non-empty strings (or numbers) and unique; return them as a tuple."""
    for n in names:
        if n is None or isinstance(n, (list, dict, bool)):
            raise DatasetError(f"{source}: class name {n!r} is not a name; give every class a name (a string)")
    clean = tuple(str(n).strip() for n in names)
    if not clean:
        raise DatasetError(f"{source}: no class names found; list them (names: in data.yaml, or classes.txt)")
    if any(not n for n in clean):
        raise DatasetError(f"{source}: an empty class name; give every class a name")
    dupes = sorted({n for n in clean if clean.count(n) > 1})
    if dupes:
        raise DatasetError(f"{source}: duplicate class name '{dupes[0]}'; class names must be unique")
    return clean


# ------------------------------------------------------------------------------------------
# Class lists
# ------------------------------------------------------------------------------------------


def _names_from_yaml(f: Path) -> tuple[str, ...]:
    try:
        doc = load_yaml(read_text(f, "class list"))  # a class listed twice is an error, not the last one winning
    except DuplicateKeyError as e:
        raise DatasetError(f"{f}: {e}") from None
    except yaml.YAMLError as e:
        raise DatasetError(f"{f}: not valid YAML ({' '.join(str(e).split())}); fix the syntax") from None
    if not isinstance(doc, dict) or "names" not in doc:
        raise DatasetError(f"{f}: no 'names:' key; list the class names (names: [dent, rust] or 0: dent ...)")
    names = doc["names"]
    if isinstance(names, dict):
        keys = list(names)
        if not all(isinstance(k, int) and not isinstance(k, bool) for k in keys) or sorted(keys) != list(
                range(len(keys))):
            raise DatasetError(f"{f}: names keys must be 0..{len(keys) - 1}; renumber them")
        names = [names[k] for k in sorted(keys)]
    if not isinstance(names, list):
        raise DatasetError(f"{f}: 'names' must be a list or an index->name mapping")
    clean = validate_class_names(names, f)
    nc = doc.get("nc")
    if nc is not None and nc != len(clean):
        raise DatasetError(f"{f}: nc is {nc} but names lists {len(clean)} classes; make them agree (or delete nc)")
    return clean


def _class_list(root: Path, root_real: Path) -> tuple[tuple[str, ...], Path] | None:
    """The class names listed at `root` (data.yaml / dataset.yaml `names:`, else classes.txt), or None."""
    for candidate in ("data.yaml", "dataset.yaml"):
        f = root / candidate
        if _present(f, root_real) and f.is_file():
            return _names_from_yaml(f), f
    classes = root / "classes.txt"
    if _present(classes, root_real) and classes.is_file():
        lines = [ln for ln in _LINE_BREAK.split(read_text(classes, "class list")) if ln.strip()]
        return validate_class_names(lines, classes), classes
    return None


def _read_yolo_names(root: Path, root_real: Path) -> tuple[str, ...]:
    found = _class_list(root, root_real)
    if found is None:
        raise DatasetError(
            f"{root}: no class names; add data.yaml with 'names:' or classes.txt with one name per line"
        )
    return found[0]


# ------------------------------------------------------------------------------------------
# Importers
# ------------------------------------------------------------------------------------------


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def split_names(names: Sequence[str], val_fraction: float, test_fraction: float, seed: int) -> dict[str, str]:
    """Assign each name to train/val/test: sorted, then a seeded permutation (reproducible)."""
    ordered = sorted(names)
    order = np.random.default_rng(seed).permutation(len(ordered))
    n_val = max(1, round(len(ordered) * val_fraction))
    n_test = round(len(ordered) * test_fraction)
    assignment = {}
    for rank, idx in enumerate(order):
        assignment[ordered[idx]] = "val" if rank < n_val else "test" if rank < n_val + n_test else "train"
    return assignment


def _yolo_images(images_dir: Path, root_real: Path) -> list[Path]:
    images = []
    for p in _walk(images_dir, root_real):
        if p.suffix.lower() in IMAGE_SUFFIXES:
            images.append(p)
        elif p.suffix.lower() == LABEL_SUFFIX:
            raise DatasetError(f"{p}: a label file inside images/; YOLO labels go in labels/ at the same relative "
                               "path (images/a/b.jpg -> labels/a/b.txt): move it there")
        else:
            raise DatasetError(f"{p}: not an image ({', '.join(IMAGE_SUFFIXES)}); convert it or move it out of "
                               "images/ (it would not be imported)")
    return images


def _yolo_labels(labels_dir: Path, root_real: Path) -> dict[Path, Path]:
    """Label files under `labels_dir` by relative path without suffix."""
    labels = {}
    for p in _walk(labels_dir, root_real):
        if p.suffix == LABEL_SUFFIX:
            labels[p.relative_to(labels_dir).with_suffix("")] = p
        elif p.suffix.lower() == LABEL_SUFFIX:
            raise DatasetError(f"{p}: label files end in lower-case .txt (Ultralytics would not find this one); "
                               "rename it")
        elif p.suffix != ULTRALYTICS_CACHE_SUFFIX:
            raise DatasetError(f"{p}: not a YOLO label (.txt); convert it to YOLO text or move it out of labels/ "
                               "(it would not be imported)")
    return labels


def import_yolo(root: Path, val_fraction: float, test_fraction: float,
                seed: int) -> tuple[tuple[str, ...], list[Sample]]:
    """Read a YOLO-format folder: `images/` + `labels/` (with or without train/val/test subfolders).

    Labels are matched to images by relative path (`images/a/b.jpg` -> `labels/a/b.txt`); an
    image without a label file is a background image, a label without an image is an error, and
    so is a dataset with no label files at all. Symlinks are followed inside `root` only (see
    `_walk`); every label is read as UTF-8 and validated. Without split folders the images are
    split by `val_fraction`/`test_fraction` from `seed`.
    """
    root_real = _import_root(root)
    images_dir, labels_dir = root / "images", root / "labels"
    if not _present(images_dir, root_real) or not images_dir.is_dir():
        raise DatasetError(f"{root}: no images/ folder; a YOLO dataset has images/ and labels/ side by side")
    names = _read_yolo_names(root, root_real)
    images = _yolo_images(images_dir, root_real)
    if not images:
        raise DatasetError(
            f"{images_dir}: no images ({', '.join(IMAGE_SUFFIXES)}); point data.import_dir at the dataset"
        )
    rel = [p.relative_to(images_dir) for p in images]
    has_splits = all(len(r.parts) > 1 and r.parts[0] in SPLITS for r in rel)
    if has_splits and not any(r.parts[0] == "val" for r in rel):
        raise DatasetError(f"{images_dir}: has split folders but no val/; add images/val (and labels/val)")
    flat_names = ["__".join(r.with_suffix("").parts) for r in rel]
    if len(set(flat_names)) != len(flat_names):
        raise DatasetError(f"{images_dir}: two images share a name apart from the suffix; rename one")
    assignment = {} if has_splits else split_names(flat_names, val_fraction, test_fraction, seed)
    if _present(labels_dir, root_real) and not labels_dir.is_dir():
        raise DatasetError(f"{labels_dir}: not a folder; labels/ holds one .txt file per labelled image")
    label_files = _yolo_labels(labels_dir, root_real) if labels_dir.is_dir() else {}
    if not label_files:
        raise DatasetError(f"{labels_dir}: no label files, so every image would be a background image; add "
                           "labels/<same path as the image>.txt (an empty one marks a real background image)")
    orphan = sorted(set(label_files) - {r.with_suffix("") for r in rel})
    if orphan:
        raise DatasetError(f"label file {label_files[orphan[0]]} has no image; add the image or delete the label")
    samples = []
    for path, r, flat in zip(images, rel, flat_names):
        label_path = label_files.get(r.with_suffix(""))
        labels = read_label_file(label_path, len(names)) if label_path is not None else ()
        split = r.parts[0] if has_splits else assignment[flat]
        name = "__".join(r.with_suffix("").parts[1:]) if has_splits else flat
        samples.append(Sample(split, name, path, labels))
    return names, samples


# ---- Pascal VOC ----------------------------------------------------------------------------


@dataclass(frozen=True)
class VocObject:
    """One `<object>`: class name, `<bndbox>` as written (pixels, 1-based inclusive) and its flags."""

    name: str
    box: tuple[float, float, float, float]  # xmin, ymin, xmax, ymax
    difficult: bool
    truncated: bool


@dataclass(frozen=True)
class VocAnnotation:
    """One Pascal VOC XML file, checked element by element (`parse_voc_xml`)."""

    filename: str  # <filename>, or the XML's stem when absent
    size: tuple[int, int] | None  # (<width>, <height>); None when <size> is absent or empty
    objects: tuple[VocObject, ...]


def _only_child(parent: ET.Element, tag: str, where: str) -> ET.Element | None:
    found = parent.findall(tag)
    if len(found) > 1:
        raise DatasetError(f"{where}: {len(found)} <{tag}> elements; keep one")
    return found[0] if found else None


def _child_text(parent: ET.Element, tag: str, where: str) -> str | None:
    """The stripped text of the one child `<tag>` of `parent`; None when it is absent or empty."""
    child = _only_child(parent, tag, where)
    text = (child.text or "").strip() if child is not None else ""
    return text or None


def _voc_size(root: ET.Element, source: Path) -> tuple[int, int] | None:
    where = f"annotation {source} <size>"
    size = _only_child(root, "size", f"annotation {source}")
    if size is None:
        return None
    width, height = _child_text(size, "width", where), _child_text(size, "height", where)
    if width is None and height is None:
        return None  # an empty <size/>: the image is decoded for its size
    out = []
    for tag, text in (("width", width), ("height", height)):
        if text is None:
            raise DatasetError(f"{where}: <{tag}> is missing; add it (or remove <size> to read the size from "
                               "the image)")
        m = _CLASS_INDEX.fullmatch(text)  # a whole number of pixels: "200" or "200.0"
        if m is None or m.group(1) or len(m.group(2)) > 9:
            raise DatasetError(f"{where}/<{tag}> is {_show(text)}, not a whole number of pixels; fix it "
                               "(or remove <size> to read the size from the image)")
        out.append(int(m.group(2)))
    if out[0] <= 0 or out[1] <= 0:
        raise DatasetError(f"annotation {source}: <size> is {out[0]}x{out[1]}; fix it or remove <size>")
    return out[0], out[1]


def _voc_flag(obj: ET.Element, tag: str, where: str) -> bool:
    child = _only_child(obj, tag, where)
    if child is None:
        return False
    text = (child.text or "").strip()
    if text not in ("0", "1"):
        raise DatasetError(f"{where}: <{tag}> is {_show(text)}; it must be 0 or 1")
    return text == "1"


def _voc_object(obj: ET.Element, source: Path, index: int) -> VocObject:
    where = f"annotation {source} object {index + 1}"
    name = _child_text(obj, "name", where)
    if name is None:
        raise DatasetError(f"{where}: <name> is missing or empty; give the object its class name")
    box = _only_child(obj, "bndbox", where)
    if box is None:
        raise DatasetError(f"{where}: no <bndbox>; add xmin/ymin/xmax/ymax")
    coords = []
    for tag in ("xmin", "ymin", "xmax", "ymax"):
        text = _child_text(box, tag, f"{where} <bndbox>")
        if text is None:
            raise DatasetError(f"{where}: <bndbox> needs xmin, ymin, xmax and ymax; add the missing <{tag}>")
        value = float(text) if _DECIMAL.fullmatch(text) else None
        if value is None or not math.isfinite(value):
            raise DatasetError(f"{where}: <bndbox>/<{tag}> is {_show(text)}, not a finite number; "
                               "fix the XML (pixel coordinates such as 48)")
        coords.append(value)
    x0, y0, x1, y1 = coords
    if x1 <= x0 or y1 <= y0:
        raise DatasetError(f"{where}: box ({x0},{y0})-({x1},{y1}) has no area (xmax<=xmin or ymax<=ymin); fix it")
    return VocObject(name, (x0, y0, x1, y1), _voc_flag(obj, "difficult", where), _voc_flag(obj, "truncated", where))


def parse_voc_xml(text: str, source: Path) -> VocAnnotation:
    """Parse one Pascal VOC annotation (the text of `source`) and check every element.

    Checks: well-formed XML whose root is <annotation>, every <object> directly inside it; at
    most one of each element; <size> width/height whole positive numbers (or <size> absent or
    empty); each <object> a non-empty <name> and one <bndbox> with numeric xmin < xmax, ymin <
    ymax; <difficult>/<truncated> 0 or 1. Box-inside-image and class checks need the image size
    and class list: `voc_labels`.
    Raises DatasetError naming `source`, the object (1-based) or element, and the fix.
    """
    try:
        root = ET.fromstring(text)
    except (ET.ParseError, ValueError) as e:  # ValueError: text no XML parser can take (e.g. lone surrogates)
        raise DatasetError(f"annotation {source}: not valid XML ({e}); fix or re-export it") from None
    if root.tag != "annotation":
        raise DatasetError(f"annotation {source}: the root element is {_show(str(root.tag), 40)}, not "
                           "<annotation>: not a Pascal VOC file; remove it from the import folder or convert it")
    filename = _child_text(root, "filename", f"annotation {source}") or source.stem
    size = _voc_size(root, source)
    direct = root.findall("object")
    stray = sum(1 for _ in root.iter("object")) - len(direct)
    if stray:  # an <object> inside another element would be ignored, its defect silently lost
        raise DatasetError(f"annotation {source}: {stray} <object> element(s) not directly inside <annotation>; "
                           "move them up a level")
    objects = tuple(_voc_object(o, source, i) for i, o in enumerate(direct))
    return VocAnnotation(filename, size, objects)


def read_voc_annotation(path: Path) -> VocAnnotation:
    """Read (UTF-8, see `read_text`) and parse the VOC XML at `path`."""
    return parse_voc_xml(read_text(path, "annotation"), path)


def voc_labels(ann: VocAnnotation, source: Path, width: int, height: int, class_names: Sequence[str],
               class_source: str = "the annotations") -> tuple[Label, ...]:
    """The YOLO labels of a parsed annotation for a `width` x `height` image and its class list.

    Each box must lie inside the image (VOC coordinates are 1-based inclusive; the common 0-based
    variant is accepted too) and name a class of `class_names` (listed in `class_source`).
    Coordinates are rounded to 6 decimals, as the writer stores them, before they are checked.
    """
    index = {n: i for i, n in enumerate(class_names)}
    rows = []
    for i, obj in enumerate(ann.objects):
        where = f"annotation {source} object {i + 1}"
        if obj.name not in index:
            raise DatasetError(f"{where}: <name> {_show(obj.name)} is not a class; the classes ({class_source}) are "
                               f"{', '.join(class_names)}: fix the name or add the class to {class_source}")
        x0, y0, x1, y1 = obj.box
        if x0 < 0 or y0 < 0 or x1 > width + 1 or y1 > height + 1:
            raise DatasetError(
                f"{where}: box ({x0},{y0})-({x1},{y1}) lies outside the {width}x{height} image; clip it to the image"
            )
        x0, y0, x1, y1 = max(x0 - 1, 0), max(y0 - 1, 0), min(x1, width), min(y1, height)
        cx, cy, w, h = (float(f"{v:.6f}") for v in ((x0 + x1) / 2 / width, (y0 + y1) / 2 / height,
                                                     (x1 - x0) / width, (y1 - y0) / height))
        _check_box(cx, cy, w, h, where)
        rows.append((index[obj.name], cx, cy, w, h))
    return tuple(rows)


def _derived_voc_names(parsed: Sequence[tuple[Path, VocAnnotation]], root: Path) -> tuple[str, ...]:
    """Class names as the sorted set of object names, refusing names that differ only in case."""
    first: dict[str, tuple[str, Path]] = {}
    for xml_path, ann in parsed:
        for obj in ann.objects:
            seen = first.setdefault(obj.name.casefold(), (obj.name, xml_path))
            if seen[0] != obj.name:
                raise DatasetError(f"annotation {xml_path}: class '{obj.name}' differs only in case from '{seen[0]}' "
                                   f"({seen[1]}); spell them the same, or list the classes in {root}/classes.txt")
    return validate_class_names(sorted({obj.name for _, ann in parsed for obj in ann.objects}), root)


def import_voc(root: Path, val_fraction: float, test_fraction: float,
               seed: int) -> tuple[tuple[str, ...], list[Sample]]:
    """Read Pascal VOC XML annotations anywhere under `root` (NEU-DET / GC10-DET layouts).

    Each XML's <filename> is looked up among the images under `root` by file name (with or
    without suffix, as NEU-DET omits it). Class names are those of `root`'s classes.txt or
    data.yaml when there is one (in that order; an object of another class is an error), else the
    sorted set of object names. Every image under `root` must have an annotation (an XML with no
    <object> for a background image). Symlinks are followed inside `root` only (see `_walk`).
    Images are split by `val_fraction`/`test_fraction` from `seed`.
    """
    root_real = _import_root(root)
    files = _walk(root, root_real)
    xmls = [p for p in files if p.suffix.lower() == ".xml"]
    if not xmls:
        raise DatasetError(f"{root}: no .xml annotations found; point data.import_dir at a Pascal VOC dataset")
    by_name: dict[str, Path] = {}
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    for img in images:
        for key in (img.name, img.stem):
            if key in by_name and by_name[key] != img:
                raise DatasetError(f"images {by_name[key]} and {img} share the name '{key}'; rename one")
            by_name[key] = img
    listed = _class_list(root, root_real)
    parsed, located = [], []
    for xml_path in xmls:
        ann = read_voc_annotation(xml_path)
        image = by_name.get(ann.filename) or by_name.get(Path(ann.filename).stem) or by_name.get(xml_path.stem)
        if image is None:
            raise DatasetError(
                f"annotation {xml_path}: image '{ann.filename}' not found under {root}; add it or delete the XML"
            )
        parsed.append((xml_path, ann))
        located.append(image)
    unannotated = sorted(set(images) - set(located))
    if unannotated:
        more = f" (and {len(unannotated) - 1} more)" if len(unannotated) > 1 else ""
        raise DatasetError(f"image {unannotated[0]} has no annotation{more}, so it would be left out; add an XML "
                           f"for it (one with no <object> for a background image) or move it out of {root}")
    if listed is not None:
        names, class_source = listed[0], str(listed[1])
    else:
        names, class_source = _derived_voc_names(parsed, root), "the annotations"
    stems = [image.stem for image in located]
    if len(set(stems)) != len(stems):
        raise DatasetError(f"{root}: two annotations point at images with the same name; rename one")
    assignment = split_names(stems, val_fraction, test_fraction, seed)
    samples = []
    for (xml_path, ann), image in zip(parsed, located):
        # The image decides the size: a <size> that disagrees would put every box in the wrong place.
        height, width = decode_image(image).shape[:2]
        if ann.size is not None and ann.size != (width, height):
            raise DatasetError(f"annotation {xml_path}: <size> says {ann.size[0]}x{ann.size[1]} but image {image} is "
                               f"{width}x{height}; fix <size> (or remove it to use the image's size)")
        labels = voc_labels(ann, xml_path, width, height, names, class_source)
        samples.append(Sample(assignment[image.stem], image.stem, image, labels))
    return names, samples


# ------------------------------------------------------------------------------------------
# Writer
# ------------------------------------------------------------------------------------------


def format_label(labels: Iterable[Label]) -> str:
    """YOLO label text with 6 decimals (stable bytes, sub-pixel precise at any realistic size)."""
    return "".join(f"{c} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}\n" for c, cx, cy, w, h in labels)


def dataset_yaml(class_names: Sequence[str], splits: Iterable[str]) -> str:
    """The dataset.yaml Ultralytics reads. No `path:` key: Ultralytics then resolves the split
    folders relative to the yaml file itself, so the dataset can be moved or cloned anywhere."""
    doc: dict[str, object] = {s: f"images/{s}" for s in splits}
    doc["nc"] = len(class_names)
    doc["names"] = {i: n for i, n in enumerate(class_names)}
    return yaml.safe_dump(doc, sort_keys=False)


@dataclass
class DatasetWriter:
    """Writes a YOLO-layout dataset into a temp folder; `commit()` swaps it into place."""

    target: Path
    class_names: tuple[str, ...]
    _tmp: Path | None = None
    summary: DatasetSummary | None = None

    def __enter__(self) -> "DatasetWriter":
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.", dir=self.target.parent))
        self.summary = DatasetSummary(self.class_names)
        return self

    def add(self, split: str, name: str, image_bytes: bytes, suffix: str,
            labels: Sequence[Label]) -> None:
        """Add one image (encoded bytes) and its labels to `split`."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if self._tmp is None or self.summary is None:
            raise RuntimeError("DatasetWriter.add() outside its `with` block")
        img_dir, lbl_dir = self._tmp / "images" / split, self._tmp / "labels" / split
        img_dir.mkdir(parents=True, exist_ok=True)
        lbl_dir.mkdir(parents=True, exist_ok=True)
        image_path = img_dir / f"{name}{suffix.lower()}"
        if image_path.exists():
            raise DatasetError(f"two images named '{name}' in split {split}; rename one")
        image_path.write_bytes(image_bytes)
        (lbl_dir / f"{name}.txt").write_text(format_label(labels))
        s = self.summary
        s.images[split] = s.images.get(split, 0) + 1
        per_class = s.instances.setdefault(split, {n: 0 for n in self.class_names})
        for c, *_ in labels:
            per_class[self.class_names[c]] += 1
        if not labels:
            s.empty_images[split] = s.empty_images.get(split, 0) + 1

    def commit(self) -> DatasetSummary:
        """Check train and val are non-empty, write dataset.yaml and swap the folder into place."""
        if self._tmp is None or self.summary is None:
            raise RuntimeError("DatasetWriter.commit() outside its `with` block")
        for split in ("train", "val"):
            if not self.summary.images.get(split):
                raise DatasetError(f"the dataset has no {split} images; add some or change the split fractions")
        splits = [s for s in SPLITS if self.summary.images.get(s)]
        (self._tmp / "dataset.yaml").write_text(dataset_yaml(self.class_names, splits))
        old = None
        if self.target.exists():
            old = self.target.with_name(f".{self.target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.target, old)
        os.replace(self._tmp, self.target)
        self._tmp = None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.summary

    def __exit__(self, *exc: object) -> None:
        if self._tmp is not None:  # not committed: an error happened, leave the target untouched
            shutil.rmtree(self._tmp, ignore_errors=True)


def iter_split_files(dataset_dir: Path, split: str) -> Iterator[tuple[Path, Path]]:
    """Yield (image, label) paths of one split of a written dataset, sorted by name."""
    for img in _images_under(dataset_dir / "images" / split):
        yield img, dataset_dir / "labels" / split / f"{img.stem}.txt"
