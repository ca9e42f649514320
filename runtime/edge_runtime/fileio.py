"""File helpers shared by the device runtime and the workstation: hashing and atomic writes."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Union

PathLike = Union[str, "os.PathLike[str]"]


def sha256_file(path: PathLike, chunk: int = 1 << 20) -> str:
    """Return the hex sha256 of the file at `path`, read in chunks (models can be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def tree_sha256(folder: PathLike, exclude_suffixes: Iterable[str] = ()) -> str:
    """sha256 over every file's relative path and content hash under `folder` (sorted walk).

    The identity of a folder output (a dataset, a calibration set) for lineage tags: the same
    files with the same names give the same hash on any machine.
    """
    root = Path(folder)
    skip = tuple(exclude_suffixes)
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix not in skip):
        h.update(f"{f.relative_to(root).as_posix()}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write `data` to `path` via a temp file in the same folder and `os.replace`.

    A reader (or a killed writer) never sees a half-written file: either the old content or
    the new one.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: PathLike, text: str) -> None:
    """Atomically write `text` (UTF-8) to `path`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: PathLike, obj: Any) -> None:
    """Atomically write `obj` as indented, key-sorted JSON (stable bytes for DVC hashes)."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")
