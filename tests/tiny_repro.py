"""The reproducibility check as a session fixture: the tiny pipeline, twice from clean, compared.

`tiny_repro` runs what `make repro-check` runs (`pipeline.tools.repro_check.check`: two fresh
workspaces of the working tree on tiny params, `dvc repro` in each, every output compared by
params.yaml's `repro_check` rules) once per test session, and hands out both workspaces:

- tests/test_repro_check.py asserts the comparison passed: CI's reproducibility check;
- tests/test_e2e_repro.py checks run 1's outputs, MLflow runs, `dvc status` and a no-op re-run;
- tests/test_mlflow_ui.py deploys run 2's model to the local group, re-runs its report and
  browses its MLflow store.

The whole pipeline runs twice per session instead of four times (once each for the two modules,
twice for the check): about 4.5 min less on a 2-core CI machine. A module that changes its
workspace does so only after the comparison (the fixture compares before it returns). Test
modules load it with `pytest_plugins = ["tiny_repro"]`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from support import REPO

from pipeline.config.params import ReproCheckParams, load_params
from pipeline.tools.repro_check import CheckResult, check
from pipeline.tracking.mlflow_runs import EXPERIMENT_ENV


@dataclass(frozen=True)
class TinyRepro:
    """Both workspaces (each a git repo with its DVC cache and a SQLite MLflow store) and the comparison."""

    run1: Path
    run2: Path
    result: CheckResult


@pytest.fixture(scope="session")
def tiny_repro(tmp_path_factory: pytest.TempPathFactory) -> TinyRepro:
    """`make repro-check` on the working tree, once per session (see the module docstring)."""
    root = tmp_path_factory.mktemp("tiny_repro")
    cfg = load_params("repro_check", ReproCheckParams, REPO / "params.yaml")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(EXPERIMENT_ENV, raising=False)  # the pipeline's own experiment name, as a user gets it
        result = check(REPO, root, cfg)
    print(result.render())
    return TinyRepro(root / "run1", root / "run2", result)
