"""Stage `data` as a whole: deterministic synthesis, metrics, imports, nothing written on error."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
import pytest
import yaml
from support import tiny_params

from pipeline.imagesets.yolo import DatasetError
from pipeline.stages import data


def _run(tmp_path: Path, params_path: Path, out: str = "defects") -> tuple[Path, Path]:
    out_dir, metrics = tmp_path / out, tmp_path / f"{out}-metrics.json"
    data.main(["--out", str(out_dir), "--metrics", str(metrics), "--headline", str(tmp_path / f"{out}-headline.json"),
               "--params", str(params_path)])
    return out_dir, metrics


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_synthetic_is_byte_identical(tmp_path: Path, repo_params: dict[str, Any],
                                     write_params: Callable[..., Path]) -> None:
    params = write_params(tiny_params(repo_params))
    a, metrics = _run(tmp_path, params, "a")
    b, _ = _run(tmp_path, params, "b")
    assert _tree(a) == _tree(b)
    m = json.loads(metrics.read_text())
    assert m["images"] == {"train": 24, "val": 8, "test": 4}
    assert set(m["instances"]["train"]) == {"crazing", "inclusion", "patches", "pitted_surface",
                                            "rolled-in_scale", "scratches"}
    assert m["instances_total"] == sum(sum(v.values()) for v in m["instances"].values()) > 0
    assert json.loads((tmp_path / "a-headline.json").read_text()) == {"images_total": 36}  # the DVC metrics
    ds = yaml.safe_load((a / "dataset.yaml").read_text())
    assert ds["train"] == "images/train" and ds["nc"] == 6 and "path" not in ds


def test_seed_changes_data(tmp_path: Path, repo_params: dict[str, Any], write_params: Callable[..., Path]) -> None:
    p = tiny_params(repo_params)
    a, _ = _run(tmp_path, write_params(p), "a")
    p["base"]["seed"] += 1
    b, _ = _run(tmp_path, write_params(p), "b")
    assert _tree(a) != _tree(b)


def _yolo_source(root: Path) -> None:
    (root / "classes.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("dent\nrust\n")
    for i in range(10):
        (root / "images").mkdir(exist_ok=True)
        (root / "labels").mkdir(exist_ok=True)
        cv2.imwrite(str(root / "images" / f"f{i}.png"), np.full((40, 60, 3), 90 + i, np.uint8))
        (root / "labels" / f"f{i}.txt").write_text(f"{i % 2} 0.5 0.5 0.3 0.4\n")


def test_import_yolo_then_corrupt_image_keeps_previous(tmp_path: Path, repo_params: dict[str, Any],
                                                      write_params: Callable[..., Path]) -> None:
    src = tmp_path / "src"
    _yolo_source(src)
    p = tiny_params(repo_params)
    p["data"].update(source="yolo", import_dir=str(src), val_fraction=0.2, test_fraction=0.0)
    params = write_params(p)
    out, metrics = _run(tmp_path, params)
    m = json.loads(metrics.read_text())
    assert m["images"] == {"train": 8, "val": 2} and m["classes"] == 2
    assert yaml.safe_load((out / "dataset.yaml").read_text())["names"] == {0: "dent", 1: "rust"}
    before, before_metrics = _tree(out), metrics.read_bytes()

    (src / "images" / "f3.png").write_bytes(b"\x89PNG truncated")
    with pytest.raises(DatasetError, match=r"f3\.png: cannot be decoded"):
        _run(tmp_path, params)
    assert _tree(out) == before and metrics.read_bytes() == before_metrics  # nothing lost, nothing half-written


def test_missing_import_dir_is_clear(tmp_path: Path, repo_params: dict[str, Any],
                                     write_params: Callable[..., Path]) -> None:
    p = tiny_params(repo_params)
    p["data"].update(source="voc", import_dir=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match=r"data\.import_dir '.*nope' is not a folder"):
        _run(tmp_path, write_params(p))
