"""params.yaml loading: every section of the committed file loads; bad keys and values fail clearly."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

import pytest

from pipeline.config.params import BaseParams, DataParams, ExportParams, TrainParams, flatten, load_params, params_hash

SECTIONS = {"base": BaseParams, "data": DataParams, "train": TrainParams, "export": ExportParams}


def test_committed_params_load() -> None:
    for name, cls in SECTIONS.items():
        p = load_params(name, cls)
        assert isinstance(p, cls)


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
        ("train", "epochs", 0, r"train\.epochs must be >= 1"),
        ("train", "imgsz", 250, r"multiple of 32"),
        ("train", "optimizer", "Lion", r"choose one of SGD, Adam, AdamW, RMSProp"),
        ("train", "cos_lr", "yes", r"must be true or false"),
        ("base", "seed", True, r"'base\.seed' must be an integer"),
        ("export", "parity_atol_box", 0, r"tolerances must be > 0"),
        ("data", "source", "coco", r"choose one of synthetic, yolo, voc"),
    ],
)
def test_bad_values(repo_params: dict[str, Any], write_params: Callable[..., Path], section: str, key: str,
                    value: Any, message: str) -> None:
    bad = copy.deepcopy(repo_params)
    bad[section][key] = value
    with pytest.raises(ValueError, match=message):
        load_params(section, SECTIONS[section], write_params(bad))


def test_import_source_needs_a_folder(repo_params: dict[str, Any], write_params: Callable[..., Path]) -> None:
    bad = copy.deepcopy(repo_params)
    bad["data"]["source"] = "voc"
    with pytest.raises(ValueError, match=r"data\.import_dir is empty but data\.source is 'voc'"):
        load_params("data", DataParams, write_params(bad))


def test_not_yaml(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("base: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_params("base", BaseParams, path)


def test_hash_and_flatten_are_stable() -> None:
    data = load_params("data", DataParams)
    assert params_hash(data) == params_hash(load_params("data", DataParams))
    flat = flatten(data)
    assert flat["synthetic.image_size"] == data.synthetic.image_size
    other = DataParams(**{**data.__dict__, "val_fraction": 0.2})
    assert params_hash(other) != params_hash(data)
