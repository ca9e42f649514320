"""params.yaml loading: every section of the committed file loads; bad keys and values fail clearly."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Callable

import pytest

from pipeline.config.params import (
    BaseParams,
    BenchmarkParams,
    CameraParams,
    DataParams,
    ExportParams,
    MetricTolerance,
    ParamsError,
    ParamsFile,
    QuantizeParams,
    TrainParams,
    build,
    load_all,
    load_params,
    params_hash,
)
from pipeline.tracking.flatten import flatten

SECTIONS = {"base": BaseParams, "data": DataParams, "train": TrainParams, "export": ExportParams}


def _fails(path: Path, section: str, cls: type, pattern: str) -> str:
    """Load `section` from `path`: it must fail with `pattern`, and the message must name the file."""
    with pytest.raises(ValueError, match=pattern) as e:
        load_params(section, cls, path)
    assert str(path) in str(e.value)
    assert "validation error" not in str(e.value) and "errors.pydantic.dev" not in str(e.value)  # not the raw dump
    return str(e.value)


def test_committed_params_load() -> None:
    for name, cls in SECTIONS.items():
        p = load_params(name, cls)
        assert isinstance(p, cls)
    every = load_all()
    assert set(type(every).model_fields) == set(ParamsFile.model_fields)
    assert isinstance(every.quantize.candidates, tuple) and isinstance(every.benchmark.imgsz, tuple)


def test_unknown_key_is_named(repo_params: dict[str, Any], write_params: Callable[..., Path]) -> None:
    bad = copy.deepcopy(repo_params)
    bad["train"]["epochz"] = 3
    path = write_params(bad)
    with pytest.raises(ValueError, match=r"unknown key 'train\.epochz'") as e:
        load_params("train", TrainParams, path)
    assert str(path) in str(e.value)


def test_missing_key_is_named(repo_params: dict[str, Any], write_params: Callable[..., Path]) -> None:
    bad = copy.deepcopy(repo_params)
    del bad["data"]["synthetic"]["image_size"]
    path = write_params(bad)
    with pytest.raises(ValueError, match=r"missing key 'data\.synthetic\.image_size'"):
        load_params("data", DataParams, path)


def test_missing_section(repo_params: dict[str, Any], write_params: Callable[..., Path]) -> None:
    bad = {k: v for k, v in repo_params.items() if k != "export"}
    with pytest.raises(ValueError, match=r"missing section 'export'"):
        load_params("export", ExportParams, write_params(bad))


@pytest.mark.parametrize(
    "section,key,value,message",
    [
        ("train", "epochs", "ten", r"'train\.epochs' must be an integer"),
        ("train", "epochs", 0, r"'train\.epochs' must be >= 1"),
        ("train", "imgsz", 250, r"multiple of 32"),
        ("train", "optimizer", "Lion", r"choose one of SGD, Adam, AdamW, RMSProp"),
        ("train", "cos_lr", "yes", r"must be true or false"),
        ("base", "seed", True, r"'base\.seed' must be an integer"),
        ("export", "parity_atol_box", 0, r"'export\.parity_atol_box' must be > 0"),
        ("data", "source", "coco", r"choose one of synthetic, yolo, voc"),
    ],
)
def test_bad_values(repo_params: dict[str, Any], write_params: Callable[..., Path], section: str, key: str,
                    value: Any, message: str) -> None:
    bad = copy.deepcopy(repo_params)
    bad[section][key] = value
    path = write_params(bad)
    with pytest.raises(ValueError, match=message) as e:
        load_params(section, SECTIONS[section], path)
    assert str(e.value).startswith(f"{path}: ")


def test_import_source_needs_a_folder(repo_params: dict[str, Any], write_params: Callable[..., Path]) -> None:
    bad = copy.deepcopy(repo_params)
    bad["data"]["source"] = "voc"
    with pytest.raises(ValueError, match=r"'data\.import_dir' is empty but data\.source is 'voc'"):
        load_params("data", DataParams, write_params(bad))


def test_not_yaml(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("base: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_params("base", BaseParams, path)


def test_hash_and_flatten_are_stable() -> None:
    data = load_params("data", DataParams)
    assert params_hash(data) == params_hash(load_params("data", DataParams))
    flat = flatten(data.model_dump(), lists=False)  # how stage_run names MLflow params
    assert flat["synthetic.image_size"] == data.synthetic.image_size
    other = DataParams(**{**data.__dict__, "val_fraction": 0.2})
    assert params_hash(other) != params_hash(data)


# ------------------------------------------------------------------------------------------
# The whole file, strict types, ranges
# ------------------------------------------------------------------------------------------


def test_unknown_section_is_named(repo_params: dict[str, Any], write_params: Callable[..., Path]) -> None:
    bad = copy.deepcopy(repo_params)
    bad["trian"] = bad.pop("train")
    path = write_params(bad)
    # Any section's load refuses the file, not only the misspelt one's.
    message = _fails(path, "base", BaseParams, r"unknown section 'trian'; valid sections are base, data, train")
    assert re.search(r"missing section 'train'", message)
    assert all(line.startswith(f"{path}: ") for line in message.splitlines())  # one line per problem


def test_duplicate_key_is_named(repo_params: dict[str, Any], write_params: Callable[..., Path]) -> None:
    path = write_params(repo_params)
    text = path.read_text()
    path.write_text(text.replace("  lr0: ", "  lr0: 0.5\n  lr0: ", 1))
    _fails(path, "base", BaseParams, r"duplicate key 'train\.lr0' \(lines \d+ and \d+\); remove one of them")


def test_duplicate_key_in_a_list_item(repo_params: dict[str, Any], write_params: Callable[..., Path]) -> None:
    path = write_params(repo_params)
    text = path.read_text()
    path.write_text(text.replace("    abs_tol: ", "    abs_tol: 1\n    abs_tol: ", 1))
    _fails(path, "base", BaseParams, r"duplicate key 'repro_check\.tolerances\[0\]\.abs_tol'")


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_float_is_refused(repo_params: dict[str, Any], write_params: Callable[..., Path],
                                     value: float) -> None:
    bad = copy.deepcopy(repo_params)
    bad["train"]["lr0"] = value
    path = write_params(bad)
    assert ".inf" in path.read_text() or ".nan" in path.read_text()  # YAML's own spelling
    _fails(path, "train", TrainParams, r"'train\.lr0' must be a finite number")


def test_string_for_an_int_is_refused(repo_params: dict[str, Any], write_params: Callable[..., Path]) -> None:
    bad = copy.deepcopy(repo_params)
    bad["data"]["synthetic"]["train_images"] = "800"  # quoted in YAML: a string, never converted
    _fails(write_params(bad), "data", DataParams, r"'data\.synthetic\.train_images' must be an integer, got '800'")


def test_int_for_a_float_is_a_float(repo_params: dict[str, Any], write_params: Callable[..., Path]) -> None:
    good = copy.deepcopy(repo_params)
    good["train"]["lr0"] = 1
    good["data"]["synthetic"]["min_contrast"] = 12
    path = write_params(good)
    train, data = load_params("train", TrainParams, path), load_params("data", DataParams, path)
    assert type(train.lr0) is float and train.lr0 == 1.0 and type(data.synthetic.min_contrast) is float


def test_float_for_an_int_is_refused(repo_params: dict[str, Any], write_params: Callable[..., Path]) -> None:
    bad = copy.deepcopy(repo_params)
    bad["train"]["epochs"] = 20.0
    _fails(write_params(bad), "train", TrainParams, r"'train\.epochs' must be an integer, got 20\.0")


@pytest.mark.parametrize("section,keys,value,message", [
    ("train", ("fliplr",), 1.5, r"'train\.fliplr' must be in \[0, 1\], got 1\.5"),
    ("data", ("val_fraction",), 1.0, r"'data\.val_fraction' must be in \(0, 1\), got 1\.0"),
    ("data", ("synthetic", "image_size"), 32, r"'data\.synthetic\.image_size' must be in \[64, 2048\], got 32"),
    ("camera", ("synthetic", "cameras", 1, "wb_gains", 2), 9.0,
     r"'camera\.synthetic\.cameras\[1\]\.wb_gains\[2\]' must be in \[0\.2, 3\], got 9\.0"),
    ("quantize", ("candidates", 0, "percentile"), 50,
     r"'quantize\.candidates\[0\]\.percentile' must be in \[90, 100\]"),
])
def test_range_violation_is_named(repo_params: dict[str, Any], write_params: Callable[..., Path], section: str,
                                  keys: tuple[Any, ...], value: Any, message: str) -> None:
    bad = copy.deepcopy(repo_params)
    node = bad[section]
    for k in keys[:-1]:
        node = node[k]
    node[keys[-1]] = value
    cls = ParamsFile.model_fields[section].annotation
    _fails(write_params(bad), section, cls, message)


def test_every_problem_is_reported(repo_params: dict[str, Any], write_params: Callable[..., Path]) -> None:
    bad = copy.deepcopy(repo_params)
    bad["train"]["epochs"] = 0
    bad["benchmark"]["conf"] = 2
    bad["report"]["colour"] = "red"
    path = write_params(bad)
    lines = _fails(path, "train", TrainParams, r"'train\.epochs' must be >= 1").splitlines()
    assert len(lines) == 3
    assert any(re.search(r"'benchmark\.conf' must be in \(0, 1\), got 2", line) for line in lines)
    assert any(re.search(r"unknown key 'report\.colour'; valid keys are split, cdf_points, fleet", line)
               for line in lines)


def test_cross_field_rules_name_the_key(repo_params: dict[str, Any]) -> None:
    f = Path("params.yaml")
    synthetic = {**repo_params["data"]["synthetic"], "min_contrast": 80, "max_contrast": 60}
    with pytest.raises(ParamsError, match=r"'data\.synthetic\.min_contrast' \(80\) must be <= "
                                          r"data\.synthetic\.max_contrast \(60\)"):
        build(DataParams, {**repo_params["data"], "synthetic": synthetic}, "data", f)
    cameras = repo_params["camera"]["synthetic"]["cameras"]
    twins = {**repo_params["camera"], "synthetic": {**repo_params["camera"]["synthetic"],
                                                    "cameras": [cameras[0], cameras[0]]}}
    with pytest.raises(ParamsError, match=r"'camera\.synthetic\.cameras' lists a camera id twice \(line1-pi\)"):
        build(CameraParams, twins, "camera", f)
    trt = {**repo_params["quantize"]["trt"], "activation": "U8"}
    with pytest.raises(ParamsError, match=r"'quantize\.trt' must be symmetric S8S8 QDQ"):
        build(QuantizeParams, {**repo_params["quantize"], "trt": trt}, "quantize", f)


def test_lists_are_tuples_and_records_are_frozen() -> None:
    p = load_params("benchmark", BenchmarkParams)
    assert p.imgsz == (256, 640) and hash(p) == hash(load_params("benchmark", BenchmarkParams))
    with pytest.raises(ValueError, match="frozen"):
        p.runs = 3  # type: ignore[misc]


def test_built_in_code_like_a_dataclass() -> None:
    tol = MetricTolerance("*", abs_tol=0.01, rel_tol=0.1)  # positional, as the dataclasses were
    assert (tol.metrics, tol.abs_tol, tol.rel_tol) == ("*", 0.01, 0.1)
    with pytest.raises(TypeError, match="given both by position and by name"):
        MetricTolerance("*", metrics="x", abs_tol=0.0, rel_tol=0.0)
    with pytest.raises(ValueError):
        BaseParams(seed=-1, threads=1)
    base = BaseParams(seed=1, threads=2)
    assert base.replace(seed=3) == BaseParams(seed=3, threads=2)
    with pytest.raises(ParamsError, match=r"BaseParams\.replace\(\): 'threads' must be >= 1, got 0"):
        base.replace(threads=0)


def test_section_and_schema_must_agree(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="not validated as BaseParams"):
        load_params("train", BaseParams)
