"""Nested documents as flat dotted keys: how metrics and params are named in MLflow and compared.

`{"val": {"int8": {"mAP50-95": 0.6}}}` becomes `{"val.int8.mAP50-95": 0.6}`. The one flattener for
stage params (MLflow params), metrics files (the reproducibility check) and device benchmark
documents (fleet MLflow metrics).
"""

from __future__ import annotations

import math
from typing import Any, Mapping


def flatten(value: Any, prefix: str = "", lists: bool = True) -> dict[str, Any]:
    """`value` as {dotted key: leaf}. List items become `key[0]`, `key[1]`... or, with lists=False,
    one leaf holding the whole list (MLflow names allow no brackets)."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k), lists))
        return out
    if lists and isinstance(value, (list, tuple)):
        out = {}
        for i, v in enumerate(value):
            out.update(flatten(v, f"{prefix}[{i}]", lists))
        return out
    return {prefix: value}


def numeric_leaves(value: Any) -> dict[str, float]:
    """The finite numbers of a nested document as floats (booleans as 0/1); lists and text dropped."""
    out: dict[str, float] = {}
    for key, leaf in flatten(value, lists=False).items():
        if isinstance(leaf, bool):
            out[key] = float(leaf)
        elif isinstance(leaf, (int, float)) and math.isfinite(float(leaf)):
            out[key] = float(leaf)
    return out
