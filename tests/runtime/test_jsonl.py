"""RotatingJsonlWriter / JsonlHandler on real files: the size bound over many lines, no line split
across files, the backups count, torn-line repair on reopen, and a failed write (os.write patched
to fail half way with ENOSPC: a full disk cannot be made on demand here) that is undone and counted."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any, List

import numpy as np
import pytest

from edge_runtime.detector import StageTimes
from edge_runtime.jsonl import JsonlHandler, RotatingJsonlWriter
from edge_runtime.postprocess import Detections
from edge_runtime.realtime import Frame, Result


def _files(path: Path) -> List[Path]:
    return sorted(path.parent.glob(path.name + "*"))


def _lines(path: Path) -> List[dict[str, Any]]:
    """Every line of the file set, oldest file first; each must parse on its own."""
    out = []
    for p in sorted(_files(path), key=lambda p: -int(p.suffix[1:]) if p.suffix[1:].isdigit() else 0):
        data = p.read_bytes()
        assert not data or data.endswith(b"\n"), f"{p.name} ends in a partial line"
        out.extend(json.loads(line) for line in data.decode().splitlines())
    return out


def _result(index: int, k: int) -> Result:
    boxes = np.tile(np.array([[10.5, 20.25, 110.0, 220.0]], np.float32), (k, 1))
    det = Detections(boxes, np.linspace(0.3, 0.9, k).astype(np.float32), np.arange(k, dtype=np.int64) % 2)
    image = np.zeros((48, 64, 3), np.uint8)
    return Result(Frame(index, image, 1.0, 1.0), det, "fp32", 1.0125, 1.02, StageTimes(0.0, 0.01, 0.0))


def test_handler_lines_and_rotation_keep_disk_bounded(tmp_path: Path) -> None:
    path = tmp_path / "detections.jsonl"
    max_bytes, backups = 4096, 3
    writer = RotatingJsonlWriter(path, max_bytes=max_bytes, backups=backups)
    handler = JsonlHandler(writer, class_names=["scratch", "dent"], clock=lambda: 1700000000.5)
    for i in range(2000):  # lines of different lengths (0..5 detections)
        handler(_result(i, i % 6))
        total = sum(p.stat().st_size for p in _files(path))
        assert total <= (backups + 1) * max_bytes
        assert all(p.stat().st_size <= max_bytes for p in _files(path))
    assert [p.name for p in _files(path)] == ["detections.jsonl"] + [f"detections.jsonl.{k}" for k in (1, 2, 3)]
    lines = _lines(path)
    frames = [d["frame"] for d in lines]
    assert frames == list(range(frames[0], 2000))  # the newest lines, in order, none lost inside the window
    assert lines[-1] == {"frame": 1999, "time": 1700000000.5, "variant": "fp32", "age_ms": 12.5,
                         "detections": _result(1999, 1999 % 6).detections.to_json(["scratch", "dent"])}
    assert lines[-3]["frame"] == 1997 and len(lines[-3]["detections"]) == 5  # the longest lines fit too
    assert [d["name"] for d in lines[-3]["detections"]] == ["scratch", "dent", "scratch", "dent", "scratch"]
    c = handler.counters()
    assert c["jsonl_lines_total"] == 2000 and c["jsonl_rotations_total"] > 10
    assert c["jsonl_bytes_total"] > (backups + 1) * max_bytes and c["jsonl_write_errors_total"] == 0
    handler.close()


def test_same_fields_as_the_plain_jsonl_handler(tmp_path: Path) -> None:
    import io

    from edge_runtime.realtime import JsonLinesHandler

    r = _result(7, 2)
    plain = io.StringIO()
    JsonLinesHandler(plain, ["scratch", "dent"])(r)
    with RotatingJsonlWriter(tmp_path / "d.jsonl", 4096, 1) as w:
        JsonlHandler(w, ["scratch", "dent"])(r)
    a, b = json.loads(plain.getvalue()), _lines(tmp_path / "d.jsonl")[0]
    assert set(a) == set(b) and {k: v for k, v in a.items() if k != "time"} == {k: v for k, v in b.items()
                                                                                 if k != "time"}


def test_no_backups_bounds_to_one_file(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    with RotatingJsonlWriter(path, max_bytes=1024, backups=0) as w:
        for i in range(500):
            assert w.write_line({"i": i, "pad": "x" * (i % 50)})
            assert path.stat().st_size <= 1024
        assert w.counters()["jsonl_rotations_total"] > 5
    assert [p.name for p in _files(path)] == ["d.jsonl"] and _lines(path)[-1]["i"] == 499


def test_a_line_fits_whole_or_moves_to_the_next_file(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    with RotatingJsonlWriter(path, max_bytes=1024, backups=2) as w:
        line = {"pad": "y" * 600}  # 612 bytes: two never fit one file
        w.write_line(line)
        w.write_line(line)
        assert path.stat().st_size == (path.with_name("d.jsonl.1")).stat().st_size == 612
        assert not w.write_line({"pad": "z" * 2000})  # longer than a whole file: dropped, counted
        assert w.counters()["jsonl_lines_dropped_total"] == 1 and w.counters()["jsonl_lines_total"] == 2


def test_stale_backups_beyond_the_count_are_removed(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    for k in range(1, 6):
        path.with_name(f"d.jsonl.{k}").write_text('{"old": 1}\n')
    RotatingJsonlWriter(path, max_bytes=1024, backups=2).close()
    assert [p.name for p in _files(path)] == ["d.jsonl", "d.jsonl.1", "d.jsonl.2"]


def test_reopen_appends_and_cuts_a_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"i": 0}\n{"i": 1}\n{"i": 2, "half')  # a crash in the middle of line 2
    with RotatingJsonlWriter(path, max_bytes=1 << 20, backups=1) as w:
        w.write_line({"i": 3})
    assert [d["i"] for d in _lines(path)] == [0, 1, 3]
    path.write_bytes(b'{"no newline at all')
    RotatingJsonlWriter(path, max_bytes=1 << 20, backups=1).close()
    assert path.read_bytes() == b""


def test_failed_write_is_undone_counted_and_not_raised(tmp_path: Path, monkeypatch: Any, caplog: Any) -> None:
    path = tmp_path / "d.jsonl"
    w = RotatingJsonlWriter(path, max_bytes=1 << 20, backups=1)
    w.write_line({"i": 0})
    real_write = os.write

    def half_then_full(fd: int, data: Any) -> int:  # the disk fills in the middle of a line
        if len(data) > 5:
            return real_write(fd, bytes(data[:5]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    for i in range(1, 4):
        assert w.write_line({"i": i, "pad": "p" * 20}) is False
    assert path.read_bytes() == b'{"i": 0}\n'  # the half line was truncated away
    assert sum("No space left" in r.getMessage() for r in caplog.records) == 1  # once a minute
    monkeypatch.setattr(os, "write", real_write)
    assert w.write_line({"i": 4})
    assert [d["i"] for d in _lines(path)] == [0, 4]
    c = w.counters()
    assert c["jsonl_write_errors_total"] == 3 and c["jsonl_lines_total"] == 2
    w.close()


def test_rejects_bad_settings(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        RotatingJsonlWriter(tmp_path / "d.jsonl", max_bytes=100, backups=1)
    with pytest.raises(ValueError):
        RotatingJsonlWriter(tmp_path / "d.jsonl", max_bytes=4096, backups=-1)
