"""The defect dataset on disk: validation, importers (YOLO folder, Pascal VOC XML) and the writer.

Every source, synthetic or imported, goes through `validate_label_text` and `decode_image`, so a
bad file is reported the same way whatever it came from: the file, the line and the fix. The
writer builds the whole dataset in a temp folder beside the target and swaps it in with
`os.replace`, so a failing import leaves the previous dataset exactly as it was.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import cv2
import numpy as np
import yaml

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
SPLITS = ("train", "val", "test")
EDGE_TOLERANCE = 1e-3  # normalised boxes may overshoot the image edge by rounding, not more


class DatasetError(ValueError):
    """A problem with an input image or label; the message names the file and the fix."""


@dataclass(frozen=True)
class Sample:
    """One image with its YOLO label lines (already validated)."""

    split: str
    name: str  # file stem, unique within the split
    image: Path  # where to read the image bytes from
    labels: tuple[tuple[int, float, float, float, float], ...]


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


def validate_label_text(text: str, source: Path,
                        num_classes: int) -> tuple[tuple[int, float, float, float, float], ...]:
    """Parse YOLO label text ("cls cx cy w h" per line) and check every line.

    Checks: five fields, integer class in range, numbers finite, centre/size normalised to
    [0, 1], box inside the image and of positive area. Raises DatasetError naming
    `source`, the 1-based line and the fix.
    """
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"label file {source} line {lineno}"
        fields = line.split()
        if len(fields) != 5:
            raise DatasetError(
                f"{where}: expected 5 fields 'class cx cy w h', found {len(fields)} ({line.strip()!r}); "
                "fix the line (segmentation polygons are not supported: convert them to boxes)"
            )
        try:
            cls_f = float(fields[0])
            cx, cy, w, h = (float(v) for v in fields[1:])
        except ValueError as e:
            raise DatasetError(f"{where}: non-numeric field in {line.strip()!r}; fix the line") from e
        if not cls_f.is_integer():
            raise DatasetError(f"{where}: class {fields[0]} is not an integer; use the class index")
        cls = int(cls_f)
        if not 0 <= cls < num_classes:
            raise DatasetError(
                f"{where}: class {cls} but the dataset has {num_classes} classes (0..{num_classes - 1}); "
                "fix the class index or add the class name"
            )
        if not all(np.isfinite(v) for v in (cx, cy, w, h)):
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
        rows.append((cls, cx, cy, w, h))
    return tuple(rows)


def validate_class_names(names: Sequence[str], source: Path) -> tuple[str, ...]:
    """Check class names are non-empty and unique; return them as a tuple."""
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


def _read_yolo_names(root: Path) -> tuple[str, ...]:
    for candidate in ("data.yaml", "dataset.yaml"):
        f = root / candidate
        if f.is_file():
            try:
                doc = yaml.safe_load(f.read_text()) or {}
            except yaml.YAMLError as e:
                raise DatasetError(f"{f}: not valid YAML ({e}); fix the syntax") from e
            names = doc.get("names")
            if isinstance(names, dict):
                keys = sorted(names)
                if keys != list(range(len(keys))):
                    raise DatasetError(f"{f}: names keys must be 0..{len(keys) - 1}; renumber them")
                names = [names[k] for k in keys]
            if not isinstance(names, list):
                raise DatasetError(f"{f}: 'names' must be a list or an index->name mapping")
            return validate_class_names(names, f)
    classes = root / "classes.txt"
    if classes.is_file():
        return validate_class_names([ln for ln in classes.read_text().splitlines() if ln.strip()], classes)
    raise DatasetError(
        f"{root}: no class names; add data.yaml with 'names:' or classes.txt with one name per line"
    )


def import_yolo(root: Path, val_fraction: float, test_fraction: float,
                seed: int) -> tuple[tuple[str, ...], list[Sample]]:
    """Read a YOLO-format folder: `images/` + `labels/` (with or without train/val/test subfolders).

    Labels are matched to images by relative path (`images/a/b.jpg` -> `labels/a/b.txt`); an
    image without a label file is a background image. A label without an image is an error.
    Without split folders the images are split by `val_fraction`/`test_fraction` from `seed`.
    """
    images_dir, labels_dir = root / "images", root / "labels"
    if not images_dir.is_dir():
        raise DatasetError(f"{root}: no images/ folder; a YOLO dataset has images/ and labels/ side by side")
    names = _read_yolo_names(root)
    images = _images_under(images_dir)
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
    label_files = (
        {p.relative_to(labels_dir).with_suffix("") for p in labels_dir.rglob("*.txt")} if labels_dir.is_dir() else set()
    )
    orphan = sorted(label_files - {r.with_suffix("") for r in rel})
    if orphan:
        raise DatasetError(f"label file {labels_dir / orphan[0]}.txt has no image; add the image or delete the label")
    samples = []
    for path, r, flat in zip(images, rel, flat_names):
        label_path = (labels_dir / r).with_suffix(".txt")
        text = label_path.read_text() if label_path.is_file() else ""
        labels = validate_label_text(text, label_path, len(names))
        split = r.parts[0] if has_splits else assignment[flat]
        name = "__".join(r.with_suffix("").parts[1:]) if has_splits else flat
        samples.append(Sample(split, name, path, labels))
    return names, samples


def _voc_object(obj: ET.Element, xml_path: Path, index: int, width: int,
                height: int) -> tuple[str, float, float, float, float]:
    where = f"annotation {xml_path} object {index + 1}"
    name = (obj.findtext("name") or "").strip()
    if not name:
        raise DatasetError(f"{where}: <name> is missing or empty; give the object its class name")
    box = obj.find("bndbox")
    if box is None:
        raise DatasetError(f"{where}: no <bndbox>; add xmin/ymin/xmax/ymax")
    try:
        x0, y0, x1, y1 = (float(box.findtext(k) or "nan") for k in ("xmin", "ymin", "xmax", "ymax"))
    except ValueError as e:
        raise DatasetError(f"{where}: non-numeric <bndbox> coordinate; fix the XML") from e
    if not all(np.isfinite(v) for v in (x0, y0, x1, y1)):
        raise DatasetError(f"{where}: <bndbox> needs xmin, ymin, xmax and ymax; add the missing one")
    if x1 <= x0 or y1 <= y0:
        raise DatasetError(f"{where}: box ({x0},{y0})-({x1},{y1}) has no area (xmax<=xmin or ymax<=ymin); fix it")
    # VOC pixel coordinates are 1-based and inclusive; allow the common 0-based variant too.
    if x0 < 0 or y0 < 0 or x1 > width + 1 or y1 > height + 1:
        raise DatasetError(
            f"{where}: box ({x0},{y0})-({x1},{y1}) lies outside the {width}x{height} image; clip it to the image"
        )
    x0, y0, x1, y1 = max(x0 - 1, 0), max(y0 - 1, 0), min(x1, width), min(y1, height)
    return name, (x0 + x1) / 2 / width, (y0 + y1) / 2 / height, (x1 - x0) / width, (y1 - y0) / height


def import_voc(root: Path, val_fraction: float, test_fraction: float,
               seed: int) -> tuple[tuple[str, ...], list[Sample]]:
    """Read Pascal VOC XML annotations anywhere under `root` (NEU-DET / GC10-DET layouts).

    Each XML's <filename> is looked up among the images under `root` by file name (with or
    without suffix, as NEU-DET omits it). Class names are the sorted set of object names.
    Images are split by `val_fraction`/`test_fraction` from `seed`.
    """
    xmls = sorted(root.rglob("*.xml"))
    if not xmls:
        raise DatasetError(f"{root}: no .xml annotations found; point data.import_dir at a Pascal VOC dataset")
    by_name: dict[str, Path] = {}
    for img in _images_under(root):
        for key in (img.name, img.stem):
            if key in by_name and by_name[key] != img:
                raise DatasetError(f"images {by_name[key]} and {img} share the name '{key}'; rename one")
            by_name[key] = img
    parsed = []
    for xml_path in xmls:
        try:
            tree = ET.parse(xml_path).getroot()
        except ET.ParseError as e:
            raise DatasetError(f"annotation {xml_path}: not valid XML ({e}); fix or re-export it") from e
        filename = (tree.findtext("filename") or xml_path.stem).strip()
        image = by_name.get(filename) or by_name.get(Path(filename).stem) or by_name.get(xml_path.stem)
        if image is None:
            raise DatasetError(
                f"annotation {xml_path}: image '{filename}' not found under {root}; add it or delete the XML"
            )
        size = tree.find("size")
        if size is not None and (size.findtext("width") or "").strip():
            width, height = int(float(size.findtext("width") or 0)), int(float(size.findtext("height") or 0))
        else:
            h, w = decode_image(image).shape[:2]
            width, height = w, h
        if width <= 0 or height <= 0:
            raise DatasetError(f"annotation {xml_path}: <size> is {width}x{height}; fix it or remove <size>")
        objects = [_voc_object(o, xml_path, i, width, height) for i, o in enumerate(tree.findall("object"))]
        parsed.append((xml_path, image, width, height, objects))
    names = validate_class_names(sorted({o[0] for *_, objs in parsed for o in objs}), root)
    index = {n: i for i, n in enumerate(names)}
    stems = [image.stem for _, image, *_ in parsed]
    if len(set(stems)) != len(stems):
        raise DatasetError(f"{root}: two annotations point at images with the same name; rename one")
    assignment = split_names(stems, val_fraction, test_fraction, seed)
    samples = []
    for xml_path, image, _width, _height, objects in parsed:
        text = "\n".join(f"{index[n]} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}" for n, cx, cy, w, h in objects)
        labels = validate_label_text(text, xml_path, len(names))
        samples.append(Sample(assignment[image.stem], image.stem, image, labels))
    return names, samples


# ------------------------------------------------------------------------------------------
# Writer
# ------------------------------------------------------------------------------------------


def format_label(labels: Iterable[tuple[int, float, float, float, float]]) -> str:
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
            labels: Sequence[tuple[int, float, float, float, float]]) -> None:
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
