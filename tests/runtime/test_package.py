"""House rules for runtime/edge_runtime/: Python 3.8 syntax (vermin checks the rest in CI), and
imports limited to the stdlib, numpy, opencv, onnxruntime, the package itself -- and tensorrt/pycuda
only inside functions of backends.py (lazy), so a Raspberry Pi never needs them."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

DEVICE = Path(__file__).resolve().parents[2] / "runtime" / "edge_runtime"
ALLOWED_THIRD_PARTY = {"numpy", "cv2", "onnxruntime"}
LAZY_ONLY = {"tensorrt", "pycuda"}
FILES = sorted(DEVICE.glob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_python39_syntax_and_imports(path: Path) -> None:
    source = path.read_text()
    tree = ast.parse(source, filename=str(path), feature_version=(3, 8))
    assert "from __future__ import annotations" in source or path.name == "__init__.py"
    top_level = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import inside the package
                continue
            names = [(node.module or "").split(".")[0]]
        else:
            continue
        for name in names:
            if name in LAZY_ONLY:
                assert path.name == "backends.py" and id(node) not in top_level, \
                    f"{path.name}:{node.lineno} imports {name} outside the TensorRT backend's functions"
            else:
                assert name in sys.stdlib_module_names or name in ALLOWED_THIRD_PARTY or name == "__future__", \
                    (f"{path.name}:{node.lineno} imports {name}; "
                     "runtime/edge_runtime may use only stdlib, numpy, cv2, onnxruntime")


def test_deploy_ops_is_self_contained() -> None:
    """deploy_ops runs as `python -c <source>` before the runtime is on the device: stdlib only."""
    tree = ast.parse((DEVICE / "deploy_ops.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert not node.level and (node.module == "__future__" or node.module in sys.stdlib_module_names), \
                f"deploy_ops.py:{node.lineno} imports {node.module}: it must run alone, stdlib only"
        elif isinstance(node, ast.Import):
            for a in node.names:
                assert a.name.split(".")[0] in sys.stdlib_module_names, f"deploy_ops.py:{node.lineno} imports {a.name}"
