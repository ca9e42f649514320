"""Fixtures shared by the device runtime's tests (plain helpers live in tests/support.py)."""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Dict

import pytest
from support import shipped_runtime

from edge_runtime.manifest import PostprocessSettings, ThermalSettings
from edge_runtime.release import VariantFiles, assemble_release


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped runtime tree (only runtime/edge_runtime/), the working directory `serve` runs from."""
    return shipped_runtime(tmp_path_factory.mktemp("runtime"))


@pytest.fixture(scope="module")
def deploy(tiny_model: Dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A deploy folder with one release (two variants, thermal settings) and `current` pointing at it."""
    root = tmp_path_factory.mktemp("deploy")
    sample = Path(sorted(glob.glob(str(tiny_model["dataset"] / "images" / "val" / "*")))[0])
    assemble_release(root / "releases" / "r1", [VariantFiles("big", 64, tiny_model["onnx"]),
                                                VariantFiles("small", 64, tiny_model["onnx"])],
                     sample, thermal=ThermalSettings(80.0, 70.0), postprocess=PostprocessSettings(0.001, 0.45, 20))
    os.symlink("releases/r1", root / "current")
    return root


@pytest.fixture
def release(tiny_model: Dict[str, Path], tmp_path: Path) -> Path:
    """One release (one 64 px variant, thermal settings) under tmp_path/deploy/releases/r1."""
    sample = Path(sorted(glob.glob(str(tiny_model["dataset"] / "images" / "val" / "*")))[0])
    out = tmp_path / "deploy" / "releases" / "r1"
    assemble_release(out, [VariantFiles("64", 64, tiny_model["onnx"])], sample, thermal=ThermalSettings(80.0, 70.0))
    return out
