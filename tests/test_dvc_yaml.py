"""dvc.yaml agrees with the code: every stage module and every shared module it imports is a
dep; the stage's CLI defaults are exactly its declared deps/outs; params sections exist."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())
STAGES = DVC["stages"]


def _module_file(name: str) -> Path:
    """The source file of a workstation (`pipeline.*`) or device-runtime (`edge_runtime.*`) module."""
    base = REPO / "runtime" if name.split(".")[0] == "edge_runtime" else REPO
    return base / (name.replace(".", "/") + ".py")


def _absolute(node: ast.ImportFrom, path: Path) -> str:
    """The absolute module name of an import-from, resolving `from .x import y` inside a package."""
    if not node.level:
        return node.module or ""
    package = path.parent.relative_to(REPO / "runtime" if "runtime" in path.parts else REPO).parts
    package = package[: len(package) - node.level + 1]
    return ".".join([*package, *([node.module] if node.module else [])])


def _pipeline_imports(path: Path, seen: set[Path]) -> set[Path]:
    """Every pipeline or runtime module `path` imports, transitively (static: import statements only)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom):
            module = _absolute(node, path)
            if module.startswith(("pipeline", "edge_runtime")):
                names = [module] + [f"{module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith(("pipeline", "edge_runtime"))]
        for name in names:
            f = _module_file(name)
            if f.is_file() and f not in seen:
                seen.add(f)
                _pipeline_imports(f, seen)
    return seen


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_deps_cover_imports(stage: str) -> None:
    spec = STAGES[stage]
    assert spec["cmd"] == f"python -m pipeline.stages.{stage}"
    module = _module_file(f"pipeline.stages.{stage}")
    needed = {p.relative_to(REPO).as_posix() for p in _pipeline_imports(module, {module})}
    declared = set(spec["deps"])
    assert needed <= declared, f"stage {stage} imports but does not declare: {sorted(needed - declared)}"
    stages_imported = {n for n in needed if Path(n).stem in STAGES and Path(n).stem != stage}
    assert not stages_imported, f"stage {stage} imports another stage module: {stages_imported}"


def _declared_paths(spec: dict) -> set[str]:
    out: set[str] = set()
    for key in ("outs", "metrics", "plots"):
        for item in spec.get(key, []):
            out.add(next(iter(item)) if isinstance(item, dict) else item)
    return out


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_cli_defaults_match_declared_paths(stage: str) -> None:
    """Each CLI default (except --params) is a declared dep or out; each out is a CLI default."""
    spec = STAGES[stage]
    mod = importlib.import_module(f"pipeline.stages.{stage}")
    args = vars(mod.parse_args([]))
    defaults = {Path(v).as_posix() for k, v in args.items() if k != "params"}
    outs = _declared_paths(spec)
    deps = {d for d in spec["deps"] if not d.startswith(("pipeline/", "runtime/"))}
    dataset_dirs = {Path(d).parent.as_posix() for d in defaults}  # a yaml inside a declared dir
    # An out is a CLI default, or a file in a CLI-default folder (report --tables: its CSVs + summary).
    unwritten = {o for o in outs if o not in defaults and Path(o).parent.as_posix() not in defaults}
    assert not unwritten, f"{stage}: declared outs not written by the CLI: {unwritten}"
    for d in defaults - outs:
        if any(o.startswith(d + "/") for o in outs):
            continue  # an output folder whose files are declared one by one
        covered = d in deps or Path(d).parent.as_posix() in deps or any(x.startswith(d + "/") for x in deps)
        assert covered, f"{stage}: CLI reads {d} but dvc.yaml lacks it"
    assert dataset_dirs  # sanity: there are defaults at all


def test_params_sections_exist() -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for stage, spec in STAGES.items():
        for section in spec.get("params", []):
            assert section in params, f"stage {stage} depends on missing params section {section}"
