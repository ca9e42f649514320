"""The release manifest contract: round trip, validation errors, file verification."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from support import shipped_runtime

from edge_runtime.fileio import sha256_file
from edge_runtime.manifest import (
    FileEntry,
    Manifest,
    ManifestError,
    OrtSettings,
    PostprocessSettings,
    TensorRTSettings,
    ThermalSettings,
    Variant,
    load_manifest,
    save_manifest,
    verify_files,
)


def _manifest(tmp_path: Path, **overrides: object) -> Manifest:
    model = tmp_path / "m.onnx"
    model.write_bytes(b"onnx-bytes")
    fields = dict(
        release="abc123def456", backend="onnxruntime", precision="int8", class_names=("a", "b"),
        output_format="yolov8-raw", variants=(Variant("256", 256, "m.onnx"),),
        files={"m.onnx": FileEntry(sha256_file(model), model.stat().st_size, "model")},
        ort=OrtSettings(threads=4), tensorrt=None, thermal=ThermalSettings(80.0, 70.0),
        postprocess=PostprocessSettings(0.25, 0.45, 100), source={"git_commit": "x"},
    )
    fields.update(overrides)
    return Manifest(**fields)  # type: ignore[arg-type]


def test_round_trip_and_verify(tmp_path: Path) -> None:
    m = _manifest(tmp_path)
    save_manifest(m, tmp_path)
    assert load_manifest(tmp_path) == m
    assert verify_files(m, tmp_path) == []
    (tmp_path / "m.onnx").write_bytes(b"onnx-bytez")
    assert verify_files(m, tmp_path) == ["m.onnx: sha256 mismatch"]
    (tmp_path / "m.onnx").unlink()
    assert verify_files(m, tmp_path) == ["m.onnx: missing"]


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"backend": "openvino"}, "backend 'openvino' unknown"),
        ({"precision": "int4"}, "precision 'int4' unknown"),
        ({"variants": ()}, "no model variants"),
        ({"variants": (Variant("x", 256, "other.onnx"),)}, "names other.onnx, which is not in its files"),
        ({"backend": "tensorrt"}, "no tensorrt settings"),
        ({"thermal": ThermalSettings(70.0, 75.0)}, "resume_c must be below"),
    ],
)
def test_invalid(tmp_path: Path, overrides: dict, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        _manifest(tmp_path, **overrides)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="not found"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_manifest(tmp_path)
    doc = _manifest(tmp_path).to_json()
    doc["schema"] = 99
    (tmp_path / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match="schema 99"):
        load_manifest(tmp_path)
    doc = _manifest(tmp_path, tensorrt=TensorRTSettings(512), backend="tensorrt").to_json()
    del doc["postprocess"]
    (tmp_path / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match="missing key 'postprocess'"):
        load_manifest(tmp_path)


# --------------------------------------------------------------------------------------------
# Every name inside the release, every field of the right type (manifest_from_json / load_manifest)
# --------------------------------------------------------------------------------------------



def _doc(tmp_path: Path, **overrides: object) -> dict:
    """A valid manifest document as it is on disk (lists, not tuples), with a health sample."""
    (tmp_path / "sample.jpg").write_bytes(b"jpeg")
    m = _manifest(tmp_path, **overrides)
    files = {**m.files, "sample.jpg": FileEntry(sha256_file(tmp_path / "sample.jpg"), 4, "health_sample")}
    return json.loads(json.dumps(_manifest(tmp_path, files=files, **overrides).to_json()))


def _load_error(tmp_path: Path, doc: object) -> str:
    """The ManifestError of load_manifest on `doc`; it names manifest.json and is one line."""
    (tmp_path / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ManifestError) as e:
        load_manifest(tmp_path)
    message = str(e.value)
    assert message.startswith(str(tmp_path / "manifest.json") + ": ") and "\n" not in message, message
    return message


BAD_NAMES = [
    ("/etc/passwd", "an absolute path"), ("../../x", "'..' part climbs out"), ("a/../../x", "'..' part climbs out"),
    ("..", "'..' part climbs out"), ("", "is empty"), ("m\x00.onnx", "control characters"),
    ("sub\\m.onnx", "backslash"), ("m.onnx\n", "control characters"), ("./m.onnx", "'.' part"),
    ("a//m.onnx", "empty or '.' part"), ("sub/", "empty or '.' part"), ("manifest.json", "cannot list itself"),
    ("\ud800.onnx", "not valid UTF-8"),
]


@pytest.mark.parametrize("name,what", BAD_NAMES)
def test_file_names_outside_the_release_refused(tmp_path: Path, name: str, what: str) -> None:
    doc = _doc(tmp_path)
    doc["files"][name] = doc["files"].pop("m.onnx")  # the files key ...
    doc["variants"][0]["model_file"] = name  # ... and the variant naming it
    message = _load_error(tmp_path, doc)
    assert "files key is" in message and what in message and "fab deploy" in message

    doc = _doc(tmp_path)
    doc["variants"][0]["model_file"] = name  # a variant naming a bad file that is not listed either
    message = _load_error(tmp_path, doc)
    assert "variants[0].model_file is" in message and what in message

    doc = _doc(tmp_path)
    doc["variants"][0]["trt_onnx_file"] = name
    assert "variants[0].trt_onnx_file is" in _load_error(tmp_path, doc)


def test_subfolder_names_inside_the_release_accepted(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "m.onnx").write_bytes(b"onnx-bytes")
    m = _manifest(tmp_path, variants=(Variant("256", 256, "sub/m.onnx"),),
                  files={"sub/m.onnx": FileEntry(sha256_file(tmp_path / "sub/m.onnx"), 10, "model")})
    save_manifest(m, tmp_path)
    assert load_manifest(tmp_path) == m and verify_files(m, tmp_path) == []


def test_bad_names_refused_when_built_in_python(tmp_path: Path) -> None:
    """The fleet builds Manifests directly: the same rules hold without a JSON file."""
    entry = FileEntry("0" * 64, 1, "model")
    with pytest.raises(ManifestError, match=r"^manifest: files key is '/etc/passwd', an absolute path"):
        _manifest(tmp_path, variants=(Variant("1", 256, "/etc/passwd"),), files={"/etc/passwd": entry})
    with pytest.raises(ManifestError, match=r"^manifest: variants\[0\]\.model_file is '\.\./m\.onnx': a '\.\.' part"):
        _manifest(tmp_path, variants=(Variant("1", 256, "../m.onnx"),))


def test_symlink_out_of_the_release_refused_at_verify(tmp_path: Path) -> None:
    release = tmp_path / "release"
    release.mkdir()
    outside = tmp_path / "secret.onnx"
    outside.write_bytes(b"onnx-bytes")
    m = _manifest(release)
    (release / "m.onnx").unlink()
    (release / "m.onnx").symlink_to(outside)  # same bytes, so only the location is wrong
    (problem,) = verify_files(m, release)
    assert problem.startswith("m.onnx: resolves to ") and "outside the release folder" in problem
    (release / "sub").mkdir()  # a folder symlinked out is caught too
    (release / "sub" / "m.onnx").symlink_to(outside)
    (release / "m.onnx").unlink()
    (release / "m.onnx").symlink_to(release / "sub" / "m.onnx")
    assert "outside the release folder" in verify_files(m, release)[0]
    (release / "m.onnx").unlink()
    (release / "m.onnx").symlink_to("inside.onnx")  # a link that stays inside is fine
    (release / "inside.onnx").write_bytes(b"onnx-bytes")
    assert verify_files(m, release) == []
    (release / "m.onnx").unlink()
    (release / "m.onnx").mkdir()
    assert verify_files(m, release) == ["m.onnx: not a regular file; redeploy the release"]


def _set(doc: dict, dotted: str, value: object) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        doc = doc[int(p)] if isinstance(doc, list) else doc[p]
    if value is _DELETE:
        del doc[last]
    else:
        doc[last] = value


_DELETE = object()


@pytest.mark.parametrize("dotted,value,message", [
    ("release", 123, "release is an integer 123, not a string"),
    ("release", "r1", "release is 'r1', not a release id (12 lowercase hex digits)"),
    ("backend", ["onnxruntime"], "backend is a list, not a string"),
    ("backend", "openvino", "backend 'openvino' unknown; use one of onnxruntime, tensorrt"),
    ("precision", None, "precision is null, not a string"),
    ("output_format", "yolov9", "output_format 'yolov9' unknown; use one of yolov8-raw"),
    ("class_names", "ab", "class_names is a string, not a list"),
    ("class_names", ["a", 1], "class_names[1] is an integer 1, not a string"),
    ("class_names", [], "class_names is empty"),
    ("class_names", ["a", ""], "class_names[1] is '', not a class name"),
    ("variants", {"name": "x"}, "variants is an object, not a list"),
    ("variants", [], "variants is empty"),
    ("variants", ["m.onnx"], "variants[0] is a string, not a JSON object"),
    ("variants.0.imgsz", "256", "variants[0].imgsz is a string '256', not an integer"),
    ("variants.0.imgsz", True, "variants[0].imgsz is true (a boolean), not an integer"),
    ("variants.0.imgsz", 256.0, "variants[0].imgsz is a number 256.0, not an integer"),
    ("variants.0.imgsz", 250, "variants[0].imgsz is 250, not a multiple of 32"),
    ("variants.0.imgsz", 10**30, "variants[0].imgsz is 1000000000000000000000000000000, outside [32, 8192]"),
    ("variants.0.name", "a b", "variants[0].name is 'a b': a variant name is letters"),
    ("variants.0.colour", "red", "variants[0].colour is not a manifest key (valid under variants[0]: name, imgsz"),
    ("variants.0.model_file", _DELETE, "missing key 'variants[0].model_file'"),
    ("files", [], "files is a list, not a JSON object"),
    ("files.m.onnx", "abc", "files['m.onnx'] is a string, not a JSON object"),
    ("files.m.onnx.size", -1, "files['m.onnx'].size is -1, outside [0, "),
    ("files.m.onnx.size", "10", "files['m.onnx'].size is a string '10', not an integer"),
    ("files.m.onnx.sha256", "ABC", "files['m.onnx'].sha256 is 'ABC', not 64 lowercase hex digits"),
    ("files.m.onnx.role", "weights", "files['m.onnx'].role 'weights' unknown; use one of model, trt_onnx"),
    ("files.m.onnx.role", "other", "variants[0].model_file is 'm.onnx', whose files entry has role 'other'"),
    ("files.sample.jpg.role", "model", None),  # a second model file nobody names is allowed
    ("ort", None, "ort is null, not a JSON object"),
    ("ort.threads", 0, "ort.threads is 0, outside [1, 1024]; fix ort_threads in inventory.yaml"),
    ("ort.threads", False, "ort.threads is false (a boolean), not an integer"),
    ("ort.graph_optimization", "max", "ort.graph_optimization 'max' unknown; use one of disable, basic"),
    ("ort.providers", "CPUExecutionProvider", "ort.providers is a string, not a list"),
    ("ort.providers", [], "ort.providers is empty: list at least one execution provider"),
    ("ort.providers", _DELETE, None),  # optional: CPUExecutionProvider
    ("tensorrt", {}, "missing key 'tensorrt.workspace_mb'"),
    ("tensorrt", {"workspace_mb": 0}, "tensorrt.workspace_mb is 0, outside [1, 1048576]"),
    ("tensorrt", {"workspace_mb": 512, "timing_cache": "yes"}, "tensorrt.timing_cache is a string 'yes', not true"),
    ("tensorrt", [512], "tensorrt is a list, not a JSON object"),
    ("thermal", {}, "missing key 'thermal.throttle_c'"),
    ("thermal", 80, "thermal is an integer, not a JSON object"),
    ("thermal.throttle_c", "80", "thermal.throttle_c is a string '80', not a number"),
    ("thermal.throttle_c", float("inf"), "thermal.throttle_c is inf, not a finite number"),
    ("thermal.throttle_c", float("nan"), "thermal.throttle_c is nan, not a finite number"),
    ("thermal.throttle_c", 10**400, "thermal.throttle_c is 1000"),
    ("thermal.throttle_c", 200, "thermal.throttle_c is 200.0, outside (0, 125]; fix thermal_throttle_c"),
    ("thermal.resume_c", 85, "thermal.resume_c is 85, not below thermal.throttle_c (80): resume_c must be below"),
    ("thermal", None, None),  # no thermal-adaptive switching
    ("postprocess.conf", 1.5, "postprocess.conf is 1.5, outside [0, 1]; fix conf in inventory.yaml"),
    ("postprocess.iou", None, "postprocess.iou is null, not a number"),
    ("postprocess.max_det", 0, "postprocess.max_det is 0, outside [1, 100000]"),
    ("postprocess.max_det", 100.5, "postprocess.max_det is a number 100.5, not an integer"),
    ("source", ["x"], "source is a list, not a JSON object"),
    ("source.git_commit", 1, "source.git_commit is an integer 1, not a string"),
    ("colour", "red", "colour is not a manifest key (valid: schema, release"),
    ("files", _DELETE, "missing key 'files'"),
    ("schema", True, "schema True but this runtime reads schema 1"),
    ("schema", 1.0, "schema 1.0 but this runtime reads schema 1"),
])
def test_field_types_and_values_checked(tmp_path: Path, dotted: str, value: object, message: object) -> None:
    doc = _doc(tmp_path)
    if dotted.startswith("files.m.onnx") or dotted.startswith("files.sample.jpg"):
        name = "m.onnx" if dotted.startswith("files.m.onnx") else "sample.jpg"
        rest = dotted[len("files." + name):].lstrip(".")
        if rest:
            _set(doc["files"][name], rest, value)
        else:
            doc["files"][name] = value
    else:
        _set(doc, dotted, value)
    if message is None:
        (tmp_path / "manifest.json").write_text(json.dumps(doc))
        load_manifest(tmp_path)
        return
    got = _load_error(tmp_path, doc)
    assert message in got, got


def test_tensorrt_settings_checked(tmp_path: Path) -> None:
    doc = _doc(tmp_path, backend="tensorrt", tensorrt=TensorRTSettings(512))
    doc["tensorrt"] = None
    assert "tensorrt is missing: the manifest backend is tensorrt" in _load_error(tmp_path, doc)


@pytest.mark.parametrize("text,message", [
    ('{"schema": 1, "schema": 1}', "key 'schema' appears twice in one object"),
    ("[" * 100_000 + "]" * 100_000, "not valid JSON"),
    ("[1, 2]", "the document is a list, not a JSON object"),
    ('"manifest"', "the document is a string, not a JSON object"),
    ("null", "the document is null, not a JSON object"),
])
def test_malformed_documents(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(ManifestError, match=re.escape(message)) as e:
        load_manifest(tmp_path)
    assert str(e.value).startswith(str(tmp_path / "manifest.json"))


def test_unreadable_manifest(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_bytes(b'{"schema": 1, "release": "\xff"}')
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").unlink()
    (tmp_path / "manifest.json").mkdir()
    with pytest.raises(ManifestError, match="manifest.json: cannot be read"):
        load_manifest(tmp_path)


@pytest.mark.parametrize("overrides,message", [
    ({"variants": (Variant("a", 256, "m.onnx"), Variant("a", 320, "m.onnx"))}, "variants[1].name is 'a', which an"),
    ({"files": {"m.onnx": FileEntry("0" * 64, 1, "model"), "a.jpg": FileEntry("0" * 64, 1, "health_sample"),
                "b.jpg": FileEntry("0" * 64, 1, "health_sample")}}, "files has 2 files with role health_sample"),
    ({"variants": (Variant("a", 256, "m.onnx", "m.onnx"),)}, "variants[0].trt_onnx_file is 'm.onnx', whose files"),
    ({"variants": (Variant("a", 256, "m.onnx", None, "m.onnx"),)},
     "variants[0].fp16_onnx_file is 'm.onnx', whose files entry has role 'model', not 'fp16_onnx'"),
    ({"variants": (Variant("a", 256, "m.onnx", None, "h.onnx"),)}, "variants[0].fp16_onnx_file is 'h.onnx': variant"),
])
def test_cross_references(tmp_path: Path, overrides: dict, message: str) -> None:
    with pytest.raises(ManifestError, match=re.escape(message)):
        _manifest(tmp_path, **overrides)


def test_enumerations_match_the_modules_that_use_them() -> None:
    from edge_runtime import backends, postprocess
    from edge_runtime.manifest import GRAPH_OPTIMIZATIONS, OUTPUT_FORMATS

    assert OUTPUT_FORMATS == postprocess.OUTPUT_FORMATS
    assert GRAPH_OPTIMIZATIONS == backends.GRAPH_OPTIMIZATION_LEVELS


# --------------------------------------------------------------------------------------------
# `health` reports a broken manifest as a problem (exit 1, JSON, no traceback)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runtime_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shipped_runtime(tmp_path_factory.mktemp("runtime"))


def _health(runtime: Path, release: Path) -> dict:
    p = subprocess.run([sys.executable, "-m", "edge_runtime", "health", "--release", str(release)], cwd=runtime,
                       capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin", "HOME": str(runtime)})
    assert p.returncode == 1 and "Traceback" not in p.stderr, (p.returncode, p.stdout, p.stderr)
    doc = json.loads(p.stdout)
    assert doc["ok"] is False and len(doc["problems"]) == 1, doc
    return doc


def test_health_reports_broken_manifests(runtime_copy: Path, tmp_path: Path) -> None:
    good = _doc(tmp_path)
    cases = {
        "passwd": ("files key is '/etc/passwd', an absolute path",
                   lambda d: d["files"].update({"/etc/passwd": d["files"].pop("sample.jpg")})),
        "climb": ("variants[0].model_file is '../../x'", lambda d: d["variants"][0].update(model_file="../../x")),
        "types": ("ort.threads is a string '4', not an integer", lambda d: d["ort"].update(threads="4")),
        "files": ("files is a list, not a JSON object", lambda d: d.update(files=[])),
        "doc": ("the document is a list", None),
    }
    for name, (message, mutate) in cases.items():
        release = tmp_path / name
        release.mkdir()
        doc = copy.deepcopy(good)
        if mutate is None:
            doc = [doc]
        else:
            mutate(doc)
        (release / "manifest.json").write_text(json.dumps(doc))
        (problem,) = _health(runtime_copy, release)["problems"]
        assert problem.startswith(str(release.resolve() / "manifest.json")) and message in problem, problem

    release = tmp_path / "symlinked"  # a valid manifest whose model is a symlink out of the release
    release.mkdir()
    (release / "manifest.json").write_text(json.dumps(good))
    (release / "sample.jpg").write_bytes(b"jpeg")
    (release / "m.onnx").symlink_to(tmp_path / "m.onnx")
    (problem,) = _health(runtime_copy, release)["problems"]
    assert problem.startswith("m.onnx: resolves to") and "outside the release folder" in problem
