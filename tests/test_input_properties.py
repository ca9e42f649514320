"""Property tests for the hand-written inputs: YOLO label lines, Pascal VOC XML and params.yaml.

The property, for each reader: any input either parses to a fully valid value or raises the
module's own error (`DatasetError` / `ParamsError`) naming the source file. Nothing else escapes
(no bare ValueError, UnicodeDecodeError, KeyError ...), a parsed value is never half-valid (a box
outside [0, 1], a coerced string), and nothing is dropped (every non-blank label line and every
<object> comes back). Inputs are random garbage and near-valid ones (a valid input with one
field mutated). Examples are bounded and derandomized, so CI runs the same inputs every time.
"""

from __future__ import annotations

import copy
import math
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator
from xml.sax.saxutils import escape

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import REPO

from pipeline.config.params import ParamsError, ParamsFile, load_all
from pipeline.imagesets.yolo import (
    EDGE_TOLERANCE,
    DatasetError,
    format_label,
    read_label_file,
    read_voc_annotation,
    validate_label_text,
    voc_labels,
)

SETTINGS = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
FEW = settings(SETTINGS, max_examples=30)  # examples that load a whole params.yaml (about 80 ms each)

NUM_CLASSES = 6
LABEL = Path("labels/train/0042.txt")
XML = Path("ANNOTATIONS/crazing_7.xml")
CLASSES = ("crazing", "patches", "scratches")
VOC_SIZE = (200, 100)  # the image size used when the XML has no <size> (the importer would decode the image)

# Text Hypothesis can write to a file as UTF-8 (no lone surrogates).
encodable_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=60)
odd_tokens = st.sampled_from([
    "", " ", "\t", "\u00a0", "nan", "NaN", "inf", "-inf", "1e999", "-0", "+1", "1.0", "1.5", "1e0", "0x1", "1_0",
    "\u0663", "0.5.5", "--1", ".", "e5", "1e", "6", "-1", "2", "9" * 30, "1.0000001", "0.0", "0", "1", "0,5", "½",
])
any_number = st.one_of(st.floats().map(repr), st.floats(-2, 2).map(lambda v: f"{v:.6f}"), st.integers().map(str))


def _non_blank_lines(text: str) -> int:
    return sum(1 for line in re.split(r"\r\n|\n|\r", text) if line.strip(" \t"))


def _assert_valid_rows(rows: tuple[tuple[int, float, float, float, float], ...], num_classes: int) -> None:
    for cls, cx, cy, w, h in rows:
        assert type(cls) is int and 0 <= cls < num_classes
        assert all(isinstance(v, float) and math.isfinite(v) and 0.0 <= v <= 1.0 for v in (cx, cy, w, h))
        assert w > 0 and h > 0
        assert -EDGE_TOLERANCE <= cx - w / 2 and cx + w / 2 <= 1 + EDGE_TOLERANCE
        assert -EDGE_TOLERANCE <= cy - h / 2 and cy + h / 2 <= 1 + EDGE_TOLERANCE


def _check_label_text(text: str) -> None:
    """The property for one label text: valid rows, one per non-blank line, or a DatasetError naming LABEL."""
    try:
        rows = validate_label_text(text, LABEL, NUM_CLASSES)
    except DatasetError as e:
        assert str(e).startswith(f"label file {LABEL} line "), str(e)
        return
    _assert_valid_rows(rows, NUM_CLASSES)
    assert len(rows) == _non_blank_lines(text)  # nothing dropped


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    """One folder for the files the examples write (module-scoped: Hypothesis reuses it across examples)."""
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


# ------------------------------------------------------------------------------------------
# YOLO label lines
# ------------------------------------------------------------------------------------------


@st.composite
def valid_fields(draw: st.DrawFn) -> list[str]:
    """The five fields of a valid label line, written as a label writer would."""
    w, h = draw(st.floats(0.001, 1.0)), draw(st.floats(0.001, 1.0))
    cx, cy = draw(st.floats(w / 2, 1 - w / 2)), draw(st.floats(h / 2, 1 - h / 2))
    cls = draw(st.integers(0, NUM_CLASSES - 1))
    style = draw(st.sampled_from(["{:.6f}", "{:g}", "{!r}"]))
    return [str(cls), *(style.format(v) for v in (cx, cy, w, h))]


@st.composite
def near_valid_line(draw: st.DrawFn) -> str:
    """A valid line with one thing changed: a field's value, the field count or the separator."""
    fields = draw(valid_fields())
    i = draw(st.integers(0, 4))
    mutation = draw(st.sampled_from(["value", "value", "value", "drop", "extra", "separator", "none"]))
    if mutation == "value":
        fields[i] = draw(st.one_of(odd_tokens, any_number, encodable_text))
    elif mutation == "drop":
        del fields[i]
    elif mutation == "extra":
        fields.insert(i, draw(st.one_of(odd_tokens, any_number)))
    separators = st.sampled_from([" ", "\t", "  ", " \t ", ",", ";", "\u00a0", "\x0b"])
    return (draw(separators) if mutation == "separator" else " ").join(fields)


label_texts = st.lists(st.one_of(near_valid_line(), valid_fields().map(" ".join), st.just("")), max_size=6).flatmap(
    lambda lines: st.sampled_from(["\n", "\r\n", "\r"]).map(lambda nl: nl.join(lines)))


@SETTINGS
@given(st.text(max_size=200))
def test_label_garbage_is_an_error_or_valid(text: str) -> None:
    _check_label_text(text)


@SETTINGS
@given(label_texts)
def test_label_near_valid_is_an_error_or_valid(text: str) -> None:
    _check_label_text(text)


@SETTINGS
@given(st.lists(valid_fields(), min_size=1, max_size=5))
def test_valid_labels_round_trip(lines: list[list[str]]) -> None:
    rows = validate_label_text("\n".join(" ".join(f) for f in lines), LABEL, NUM_CLASSES)
    assert len(rows) == len(lines)
    assert validate_label_text(format_label(rows), LABEL, NUM_CLASSES) == tuple(
        (c, *(float(f"{v:.6f}") for v in box)) for c, *box in rows)  # what the writer stores reads back the same


@st.composite
def label_bytes(draw: st.DrawFn) -> bytes:
    """Label file bytes: garbage, or near-valid text in UTF-8 (maybe with a BOM) or another encoding."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=120))
    text = draw(label_texts)
    encoding = draw(st.sampled_from(["utf-8", "utf-8-sig", "latin-1", "utf-16", "cp1252"]))
    return text.encode(encoding, errors="replace")


@SETTINGS
@given(label_bytes())
def test_label_file_bytes_are_an_error_or_valid(scratch: Path, data: bytes) -> None:
    path = scratch / "0042.txt"
    path.write_bytes(data)
    try:
        rows = read_label_file(path, NUM_CLASSES)
    except DatasetError as e:
        assert str(e).startswith(f"label file {path}"), str(e)
        return
    _assert_valid_rows(rows, NUM_CLASSES)
    assert len(rows) == _non_blank_lines(data.removeprefix(b"\xef\xbb\xbf").decode("utf-8"))


# ------------------------------------------------------------------------------------------
# Pascal VOC XML
# ------------------------------------------------------------------------------------------


def _element(tag: str, text: str | None) -> str:
    return "" if text is None else f"<{tag}>{text}</{tag}>"


def _maybe(token: st.SearchStrategy[str], escaped: bool = True) -> st.SearchStrategy[str | None]:
    """Mostly `token`; sometimes an odd token, a random number, random text, or the element left out."""
    garbage = encodable_text.map(escape) if escaped else encodable_text
    return st.one_of(token, token, token, token, odd_tokens, any_number, garbage, st.none())


@st.composite
def voc_object(draw: st.DrawFn) -> str:
    w, h = VOC_SIZE
    x0, y0 = draw(st.integers(1, w - 2)), draw(st.integers(1, h - 2))
    x1, y1 = draw(st.integers(x0 + 1, w)), draw(st.integers(y0 + 1, h))
    name = draw(_maybe(st.sampled_from(CLASSES)))
    box = "".join(_element(t, draw(_maybe(st.just(str(v))))) for t, v in zip(("xmin", "ymin", "xmax", "ymax"),
                                                                               (x0, y0, x1, y1)))
    flags = "".join(_element(t, draw(st.one_of(st.none(), st.sampled_from(["0", "1"]), odd_tokens))) for t in
                    ("difficult", "truncated"))
    bndbox = draw(st.sampled_from([f"<bndbox>{box}</bndbox>", f"<bndbox>{box}</bndbox>", "",
                                   f"<bndbox>{box}</bndbox><bndbox>{box}</bndbox>"]))
    return f"<object>{_element('name', name)}{flags}{bndbox}</object>"


@st.composite
def voc_document(draw: st.DrawFn) -> tuple[str, int]:
    """A near-valid VOC XML text and the number of <object> elements written into it."""
    objects = draw(st.lists(voc_object(), max_size=4))
    width, height = (draw(_maybe(st.just(str(v)))) for v in VOC_SIZE)
    size = draw(st.sampled_from(["full", "full", "empty", "absent"]))
    size_xml = {"full": f"<size>{_element('width', width)}{_element('height', height)}<depth>3</depth></size>",
                "empty": "<size/>", "absent": ""}[size]
    head = draw(st.sampled_from(["", "<?xml version='1.0'?>", "<?xml version='1.0' encoding='ISO-8859-1'?>"]))
    root = draw(st.sampled_from(["annotation", "annotation", "annotation", "Annotation", "doc"]))
    text = f"{head}<{root}><filename>crazing_7.jpg</filename>{size_xml}{''.join(objects)}</{root}>"
    if draw(st.integers(0, 9)) == 0:  # break the XML itself now and then
        cut = draw(st.integers(0, len(text)))
        text = text[:cut] + draw(st.sampled_from(["", "<", "&", "</object>", "\x00"])) + text[cut + 1:]
    return text, len(objects)


def _check_voc(scratch: Path, data: bytes, objects: int | None) -> None:
    path = scratch / XML.name
    path.write_bytes(data)
    try:
        ann = read_voc_annotation(path)
        width, height = ann.size or VOC_SIZE
        rows = voc_labels(ann, path, width, height, CLASSES)
    except DatasetError as e:
        assert str(e).startswith(f"annotation {path}"), str(e)
        return
    _assert_valid_rows(rows, len(CLASSES))
    assert len(rows) == len(ann.objects)
    if objects is not None:
        assert len(ann.objects) == objects  # nothing dropped
    assert all(o.name in CLASSES and o.box[0] < o.box[2] and o.box[1] < o.box[3] for o in ann.objects)


@SETTINGS
@given(st.binary(max_size=300))
def test_voc_garbage_bytes_are_an_error(scratch: Path, data: bytes) -> None:
    _check_voc(scratch, data, None)


@SETTINGS
@given(st.text(max_size=120).map(lambda t: f"<annotation>{t}</annotation>".encode("utf-8", "surrogatepass")))
def test_voc_garbage_inside_annotation_is_an_error_or_valid(scratch: Path, data: bytes) -> None:
    _check_voc(scratch, data, None)


@SETTINGS
@given(voc_document(), st.sampled_from(["utf-8", "utf-8", "utf-8-sig", "latin-1", "utf-16"]))
def test_voc_near_valid_is_an_error_or_valid(scratch: Path, doc: tuple[str, int], encoding: str) -> None:
    text, objects = doc
    _check_voc(scratch, text.encode(encoding, errors="replace"), objects)


# ------------------------------------------------------------------------------------------
# params.yaml
# ------------------------------------------------------------------------------------------

COMMITTED = yaml.safe_load((REPO / "params.yaml").read_text())


def _leaves(node: Any, loc: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, (*loc, k))
    elif isinstance(node, list) and node:
        for i, v in enumerate(node):
            yield from _leaves(v, (*loc, i))
    else:
        yield loc


LEAVES = list(_leaves(COMMITTED))
yaml_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), encodable_text, odd_tokens),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(encodable_text, inner, max_size=2)),
    max_leaves=4,
)


def _at(doc: Any, loc: tuple[Any, ...]) -> Any:
    for k in loc:
        doc = doc[k]
    return doc


def _same(got: Any, want: Any) -> bool:
    """`got` (from the loaded params) is `want` (from the file), allowing only an int stored as a float."""
    if isinstance(want, list):
        return isinstance(got, tuple) and len(got) == len(want) and all(map(_same, got, want))
    if isinstance(want, dict) and hasattr(got, "model_dump"):
        return _same(got.model_dump(), want)
    if isinstance(want, int) and not isinstance(want, bool) and type(got) is float:
        return got == want
    return type(got) is type(want) and got == want


def _check_params(path: Path) -> ParamsFile | None:
    """The property for one params file: a ParamsFile, or a ParamsError whose problems each name the file."""
    try:
        params = load_all(path)
    except ParamsError as e:
        # Each problem is one line naming the file.
        assert all(line.startswith(f"{path}: ") for line in str(e).splitlines()), str(e)
        return None
    assert isinstance(params, ParamsFile)
    return params


@FEW
@given(st.sampled_from(LEAVES), yaml_values)
def test_params_one_value_changed_is_an_error_or_exactly_that_value(scratch: Path, loc: tuple[Any, ...],
                                                                     value: Any) -> None:
    doc = copy.deepcopy(COMMITTED)
    _at(doc, loc[:-1])[loc[-1]] = value
    path = scratch / "params.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))
    params = _check_params(path)
    if params is not None:  # accepted: then the value is what the file says, never coerced or half-checked
        got: Any = params
        for k in loc:
            got = got[k] if isinstance(k, int) else getattr(got, k)
        assert _same(got, value), (loc, value, got)


@FEW
@given(st.data())
def test_params_text_edits_are_an_error_or_valid(scratch: Path, data: st.DataObject) -> None:
    lines = (REPO / "params.yaml").read_text().splitlines(keepends=True)
    i = data.draw(st.integers(0, len(lines) - 1))
    edit = data.draw(st.sampled_from(["insert", "replace", "duplicate", "delete", "indent"]))
    if edit == "insert":
        cut = data.draw(st.integers(0, len(lines[i])))
        lines[i] = lines[i][:cut] + data.draw(st.one_of(encodable_text, odd_tokens, st.sampled_from(
            [":", "- ", "&a ", "*a", "!!python/object:os.system ", "{", "[", "'", '"', "\t", "?", "<<: "]))) + \
            lines[i][cut:]
    elif edit == "replace":
        lines[i] = data.draw(encodable_text) + "\n"
    elif edit == "duplicate":
        lines.insert(i, lines[i])
    elif edit == "delete":
        del lines[i]
    else:
        lines[i] = "  " + lines[i]
    path = scratch / "params.yaml"
    path.write_text("".join(lines), encoding="utf-8")
    _check_params(path)


@FEW
@given(st.text(max_size=200))
def test_params_garbage_text_is_an_error(scratch: Path, text: str) -> None:
    path = scratch / "params.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    assert _check_params(path) is None


@pytest.mark.parametrize("text,escape", [
    pytest.param("base:\n  seed: 1\n  1: 2\n", "TypeError 'keywords must be strings'", id="int-key"),
    pytest.param("?\nbase: 1\n", "TypeError 'keywords must be strings'", id="null-key"),
    pytest.param("[" * 2000 + "]" * 2000 + "\n", "RecursionError", id="deep-nesting"),
    pytest.param("base: [unclosed\n", "a multi-line message (PyYAML's excerpt)", id="yaml-error-lines"),
])
def test_params_former_escapes_are_one_line_params_errors(tmp_path: Path, text: str, escape: str) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ParamsError) as e:
        load_all(path)
    assert all(line.startswith(f"{path}: ") for line in str(e.value).splitlines()), escape
