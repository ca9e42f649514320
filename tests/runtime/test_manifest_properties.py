"""Property-based tests of the release manifest reader (Hypothesis).

The property: whatever JSON a device finds in `manifest.json` -- any JSON value at all, or a
valid manifest with one field mutated, removed, retyped or renamed -- `manifest_from_json` either
returns a Manifest whose every field is valid (every file name inside the release folder, every
variant's files listed, types exact, numbers finite and in range) or raises a one-line
ManifestError that names the file. Never a TypeError, KeyError, AttributeError, ...
"""

from __future__ import annotations

import copy
import json
import math
import posixpath
import tempfile
from pathlib import Path
from typing import Any, Iterator, List, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_runtime.manifest import (
    BACKENDS,
    GRAPH_OPTIMIZATIONS,
    OUTPUT_FORMATS,
    PRECISIONS,
    RELEASE_ID,
    ROLES,
    SHA256,
    VARIANT_NAME,
    FileEntry,
    Manifest,
    ManifestError,
    OrtSettings,
    PostprocessSettings,
    TensorRTSettings,
    ThermalSettings,
    Variant,
    load_manifest,
    manifest_from_json,
    name_problem,
)

WHERE = "manifest.json"
SETTINGS = settings(max_examples=400, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def _entry(role: str, size: int = 10) -> FileEntry:
    return FileEntry("ab" * 32, size, role)


# Two valid manifests: a Jetson INT8 release (two variants, a QDQ file each, TensorRT settings) and
# a Pi release (one variant, no thermal, no TensorRT, optional keys left out).
JETSON = Manifest(
    release="0123456789ab", backend="tensorrt", precision="int8", class_names=("scratch", "dent"),
    output_format="yolov8-raw",
    variants=(Variant("416", 416, "model-416.onnx", "model-416.trt.onnx"),
              Variant("320", 320, "sub/model-320.onnx", "model-320.trt.onnx")),
    files={"model-416.onnx": _entry("model"), "model-416.trt.onnx": _entry("trt_onnx"),
           "sub/model-320.onnx": _entry("model"), "model-320.trt.onnx": _entry("trt_onnx"),
           "health_sample.jpg": _entry("health_sample", 3), "notes.txt": _entry("other", 0)},
    ort=OrtSettings(threads=6, graph_optimization="extended",
                    providers=("CUDAExecutionProvider", "CPUExecutionProvider")),
    tensorrt=TensorRTSettings(1024, timing_cache=False), thermal=ThermalSettings(85.0, 75.0),
    postprocess=PostprocessSettings(0.25, 0.45, 300), source={"model": "yolov8n", "git_commit": "abc"},
)
PI = Manifest(
    release="ba9876543210", backend="onnxruntime", precision="fp32", class_names=("defect",),
    output_format="yolov8-predfl", variants=(Variant("256", 256, "m.onnx"),),
    files={"m.onnx": _entry("model"), "health_sample.png": _entry("health_sample")},
    ort=OrtSettings(threads=4), tensorrt=None, thermal=None, postprocess=PostprocessSettings(0.0, 1.0, 1),
)


def _json(m: Manifest) -> dict:
    return json.loads(json.dumps(m.to_json()))


PI_MINIMAL = _json(PI)
for _key in ("tensorrt", "thermal", "source"):
    del PI_MINIMAL[_key]
del PI_MINIMAL["variants"][0]["trt_onnx_file"]
del PI_MINIMAL["ort"]["graph_optimization"], PI_MINIMAL["ort"]["providers"]
BASES = [_json(JETSON), _json(PI), PI_MINIMAL]


# --------------------------------------------------------------------------------------------
# The property
# --------------------------------------------------------------------------------------------


def _int(v: Any) -> bool:
    return type(v) is int


def _finite(v: Any) -> bool:
    return type(v) is float and math.isfinite(v)


def _inside_release(name: str) -> bool:
    """`name` joined to a release folder stays strictly inside it (checked as strings, as the device would)."""
    if name_problem(name) is not None:
        return False
    joined = posixpath.normpath(posixpath.join("/deploy/releases/abc", name))
    return joined.startswith("/deploy/releases/abc/") and "\\" not in name and "\x00" not in name


def assert_valid(m: Manifest) -> None:
    """Everything a device relies on, for a manifest that was accepted."""
    assert isinstance(m, Manifest)
    assert isinstance(m.release, str) and RELEASE_ID.fullmatch(m.release)
    assert m.backend in BACKENDS and m.precision in PRECISIONS and m.output_format in OUTPUT_FORMATS
    assert isinstance(m.class_names, tuple) and m.class_names
    assert all(isinstance(n, str) and n for n in m.class_names)
    assert isinstance(m.files, dict)
    for name, e in m.files.items():
        assert _inside_release(name), name
        assert isinstance(e, FileEntry) and SHA256.fullmatch(e.sha256) and _int(e.size) and e.size >= 0
        assert e.role in ROLES
    assert sum(e.role == "health_sample" for e in m.files.values()) <= 1
    sample = m.health_sample()
    assert sample is None or _inside_release(sample)
    assert isinstance(m.variants, tuple) and m.variants
    assert len({v.name for v in m.variants}) == len(m.variants)
    for v in m.variants:
        assert isinstance(v, Variant) and isinstance(v.name, str) and VARIANT_NAME.fullmatch(v.name)
        assert _int(v.imgsz) and 32 <= v.imgsz <= 8192 and v.imgsz % 32 == 0
        assert _inside_release(v.model_file) and m.files[v.model_file].role == "model"
        assert v.trt_onnx_file is None or (_inside_release(v.trt_onnx_file)
                                           and m.files[v.trt_onnx_file].role == "trt_onnx")
    o = m.ort
    assert _int(o.threads) and 1 <= o.threads <= 1024 and o.graph_optimization in GRAPH_OPTIMIZATIONS
    assert isinstance(o.providers, tuple) and o.providers and all(isinstance(p, str) and p for p in o.providers)
    if m.backend == "tensorrt":
        assert m.tensorrt is not None
    if m.tensorrt is not None:
        assert _int(m.tensorrt.workspace_mb) and m.tensorrt.workspace_mb >= 1
        assert isinstance(m.tensorrt.timing_cache, bool)
    if m.thermal is not None:
        t = m.thermal
        assert _finite(t.throttle_c) and _finite(t.resume_c) and 0 < t.resume_c < t.throttle_c <= 125
    p = m.postprocess
    assert _finite(p.conf) and _finite(p.iou) and 0 <= p.conf <= 1 and 0 <= p.iou <= 1
    assert _int(p.max_det) and p.max_det >= 1
    assert isinstance(m.source, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in m.source.items())
    # What was accepted survives the trip to disk and back unchanged.
    assert manifest_from_json(json.loads(json.dumps(m.to_json())), WHERE) == m


def check(doc: Any) -> None:
    """The property for one document."""
    try:
        m = manifest_from_json(doc, WHERE)
    except ManifestError as e:
        message = str(e)
        assert message.startswith(WHERE + ": "), message
        assert "\n" not in message and len(message) < 1000, message
        return
    assert_valid(m)


def test_bases_are_valid() -> None:
    for doc in BASES:
        assert_valid(manifest_from_json(copy.deepcopy(doc), WHERE))


# --------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------

_scalars = (st.none() | st.booleans() | st.integers() | st.integers(min_value=-(10**400), max_value=10**400)
            | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
json_values = st.recursive(_scalars, lambda kids: st.lists(kids, max_size=4)
                           | st.dictionaries(st.text(max_size=8), kids, max_size=4), max_leaves=20)

HOSTILE_NAMES = ["", "/", "/etc/passwd", "..", "../x", "../../x", "a/../../x", "sub/../m.onnx", "./m.onnx", ".",
                 "a//b", "sub/", "m.onnx\n", " m.onnx", "m.onnx ", "m\x00.onnx", "m\\..\\x", "C:\\x", "manifest.json",
                 "\ud800", "é.onnx", "\u202emodel", "sub/m.onnx", "m.onnx", "model-416.onnx", "health_sample.jpg"]
NASTY = st.sampled_from([
    None, True, False, 0, 1, -1, 31, 32, 33, 256, 2**31, 2**63, 10**100, -(10**100), 10**400, 0.0, -0.0, 0.5, 1.5,
    255.99, 1e308, -1e308, 5e-324, math.inf, -math.inf, math.nan, "", " ", "x", "0", "1", "true", "null",
    "onnxruntime", "tensorrt", "int8", "fp16", "yolov8-raw", "model", "trt_onnx", "health_sample", "other", "all",
    "a" * 64, "AB" * 32, "0123456789ab", "0123456789AB", "CPUExecutionProvider", [], {}, [1], ["a"], [None],
    {"a": 1}, [[]], *HOSTILE_NAMES,
])
values = NASTY | json_values


def _same_type(value: Any) -> Any:
    """Values of the JSON type of `value`: what only value checks (ranges, names, enumerations) can refuse."""
    if isinstance(value, bool):
        return st.booleans()
    if isinstance(value, int):
        return st.integers() | st.sampled_from([0, -1, 31, 32, 33, 64, 8192, 8224, 1024, 1025, 2**63, 10**100])
    if isinstance(value, float):
        return st.floats() | st.sampled_from([0.0, -0.0, 1.0, 1.0000001, 125.0, 125.5, 5e-324, math.inf, math.nan])
    if isinstance(value, str):
        return st.sampled_from(HOSTILE_NAMES) | NASTY.filter(lambda v: isinstance(v, str)) | st.text(max_size=12)
    if isinstance(value, list):
        return st.lists(st.sampled_from(value), max_size=4) if value else st.just([])
    if isinstance(value, dict):
        if not value:
            return st.just({})
        keys = st.sampled_from(list(value)) | st.text(max_size=6)
        return st.dictionaries(keys, st.sampled_from(list(value.values())), max_size=len(value) + 1)
    return st.none()


def _paths(doc: Any, prefix: Tuple[Any, ...] = ()) -> Iterator[Tuple[Any, ...]]:
    """Every position in the document (dict keys and list indexes), outermost first."""
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield (*prefix, k)
            yield from _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield (*prefix, i)
            yield from _paths(v, (*prefix, i))


def _parent(doc: Any, path: Tuple[Any, ...]) -> Any:
    for p in path[:-1]:
        doc = doc[p]
    return doc


@st.composite
def near_valid(draw: Any) -> Any:
    """A valid manifest with one thing changed."""
    doc = copy.deepcopy(draw(st.sampled_from(BASES)))
    paths: List[Tuple[Any, ...]] = list(_paths(doc))
    path = draw(st.sampled_from(paths))
    parent, last = _parent(doc, path), path[-1]
    how = draw(st.sampled_from(["replace", "replace", "same_type", "same_type", "remove", "add_key", "rename_key",
                                "nest"]))
    if how == "replace":
        parent[last] = draw(values)
    elif how == "same_type":  # the JSON type stays right: what is left to check is the value
        parent[last] = draw(_same_type(parent[last]))
    elif how == "remove":
        del parent[last]
    elif how == "nest":  # the right value, one level too deep or shallow
        parent[last] = draw(st.sampled_from([[parent[last]], {"value": parent[last]}, str(parent[last])]))
    elif isinstance(parent, dict):
        key = draw(st.sampled_from(HOSTILE_NAMES) | st.text(max_size=8))
        if how == "rename_key":
            parent[key] = parent.pop(last)
        else:
            parent[key] = draw(values)
    else:
        parent.append(draw(values))
    return doc


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


@SETTINGS
@given(json_values)
def test_any_json_value(doc: Any) -> None:
    check(doc)


@SETTINGS
@given(st.fixed_dictionaries({}, optional={k: values for k in BASES[0]}))
def test_any_values_under_the_right_keys(doc: Any) -> None:
    check(doc)


@settings(SETTINGS, max_examples=1500)
@given(near_valid())
def test_near_valid_manifests(doc: Any) -> None:
    check(doc)


@SETTINGS
@given(st.sampled_from(BASES), st.integers(min_value=0, max_value=1), st.sampled_from(HOSTILE_NAMES))
def test_hostile_file_names(base: dict, variant: int, name: str) -> None:
    """A file renamed everywhere it is named (the files key and the variant): accepted only if it is inside."""
    doc = copy.deepcopy(base)
    v = doc["variants"][min(variant, len(doc["variants"]) - 1)]
    doc["files"][name] = doc["files"].pop(v["model_file"])
    v["model_file"] = name
    check(doc)
    try:
        manifest_from_json(doc, WHERE)
        assert _inside_release(name)
    except ManifestError:
        assert name not in ("m.onnx", "sub/m.onnx", "é.onnx", "model-416.onnx")  # plain names are accepted


@pytest.fixture(scope="module")
def folder() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


@settings(SETTINGS, max_examples=300)
@given(st.sampled_from(BASES), st.data())
def test_damaged_manifest_files(folder: Path, base: dict, data: Any) -> None:
    """load_manifest on the bytes of a valid manifest with a few bytes changed: valid or ManifestError."""
    raw = bytearray(json.dumps(base, indent=1).encode())
    for _ in range(data.draw(st.integers(min_value=1, max_value=3))):
        at = data.draw(st.integers(min_value=0, max_value=len(raw) - 1))
        how = data.draw(st.sampled_from(["set", "insert", "delete"]))
        byte = data.draw(st.sampled_from(b'"{}[],:\\0123456789-.eE/ \n\xff\x00aZ'))
        if how == "set":
            raw[at] = byte
        elif how == "insert":
            raw.insert(at, byte)
        elif len(raw) > 1:
            del raw[at]
    (folder / "manifest.json").write_bytes(bytes(raw))
    try:
        m = load_manifest(folder)
    except ManifestError as e:
        assert str(e).startswith(str(folder / "manifest.json") + ": "), str(e)
        return
    assert_valid(m)
