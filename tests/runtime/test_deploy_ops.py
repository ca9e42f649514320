"""The deploy helper as a module: probe, publish, switch, status and frames on a real folder, and
its command line as the fleet runs it (`python -c <source> <op> <json>`)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from edge_runtime import deploy_ops

SOURCE = Path(deploy_ops.__file__).read_text()


def _entry(data: bytes) -> list:
    return [hashlib.sha256(data).hexdigest(), len(data)]


def _release(deploy: Path, name: str, files: dict[str, bytes]) -> dict[str, list]:
    """Probe for a release, write its files into the stage as an upload would, return the file table."""
    table = {n: _entry(b) for n, b in files.items()}
    answer = deploy_ops.probe({"deploy_dir": str(deploy), "releases": {name: table}})
    stage = Path(answer["releases"][name]["stage"])
    assert sorted(answer["releases"][name]["need"]) == sorted(files)
    for n, b in files.items():
        (stage / n).write_bytes(b)
    return table


def test_probe_publish_switch(tmp_path: Path) -> None:
    deploy = tmp_path / "deploy"
    manifest = json.dumps({"files": {}, "backend": "onnxruntime", "precision": "int8"}).encode()
    table = _release(deploy, "aaa", {"model.onnx": b"weights", "manifest.json": manifest})
    assert {p.name for p in deploy.iterdir()} == {"releases", "runtime", "engines", "results"}

    published = deploy_ops.publish({"deploy_dir": str(deploy), "kind": "releases", "name": "aaa", "files": table})
    assert published["published"] and published["problems"] == []
    final = deploy / "releases" / "aaa"
    assert (final / "model.onnx").read_bytes() == b"weights"
    assert oct((final / "model.onnx").stat().st_mode & 0o777) == "0o444"  # published files are read-only

    first = deploy_ops.switch({"deploy_dir": str(deploy), "release": "aaa"})
    assert first == {"changed": True, "current": "aaa", "previous": None}
    assert deploy_ops.switch({"deploy_dir": str(deploy), "release": "aaa"})["changed"] is False

    _release(deploy, "bbb", {"model.onnx": b"other", "manifest.json": manifest})
    deploy_ops.publish({"deploy_dir": str(deploy), "kind": "releases", "name": "bbb",
                        "files": {"model.onnx": _entry(b"other"), "manifest.json": _entry(manifest)}})
    second = deploy_ops.switch({"deploy_dir": str(deploy), "release": "bbb"})
    assert second == {"changed": True, "current": "bbb", "previous": "aaa"}
    assert os.readlink(deploy / "current") == "releases/bbb" and os.readlink(deploy / "previous") == "releases/aaa"
    status = deploy_ops.status({"deploy_dir": str(deploy)})
    assert status["current"] == "bbb" and status["current_manifest"]["precision"] == "int8"


def test_publish_refuses_a_corrupt_upload_and_deletes_it(tmp_path: Path) -> None:
    deploy = tmp_path / "deploy"
    table = _release(deploy, "ccc", {"model.onnx": b"weights"})
    stage = deploy / "releases" / ".ccc.partial"
    (stage / "model.onnx").write_bytes(b"truncat")  # same size class, other bytes
    answer = deploy_ops.publish({"deploy_dir": str(deploy), "kind": "releases", "name": "ccc", "files": table})
    assert answer["published"] is False and answer["problems"] == ["model.onnx: sha256 mismatch after upload"]
    assert not (stage / "model.onnx").exists() and not (deploy / "releases" / "ccc").exists()


def test_probe_reuses_bytes_already_on_the_device(tmp_path: Path) -> None:
    deploy = tmp_path / "deploy"
    manifest = {"files": {"model.onnx": {"sha256": _entry(b"weights")[0], "size": 7}}}
    files = {"model.onnx": b"weights", "manifest.json": json.dumps(manifest).encode()}
    table = _release(deploy, "ddd", files)
    deploy_ops.publish({"deploy_dir": str(deploy), "kind": "releases", "name": "ddd", "files": table})
    answer = deploy_ops.probe({"deploy_dir": str(deploy), "releases": {"eee": {"model.onnx": _entry(b"weights")}}})
    assert answer["releases"]["eee"]["need"] == [] and answer["releases"]["eee"]["linked"] == ["model.onnx"]
    assert (deploy / "releases" / ".eee.partial" / "model.onnx").read_bytes() == b"weights"


def test_frames_lists_the_newest(tmp_path: Path) -> None:
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(5):
        (frames / f"f{i}.jpg").write_bytes(bytes([i]))
        os.utime(frames / f"f{i}.jpg", (1000 + i, 1000 + i))
    (frames / "notes.txt").write_text("not a frame")
    answer = deploy_ops.frames({"dir": str(frames), "count": 2})
    assert answer["available"] == 5 and [f["name"] for f in answer["frames"]] == ["f3.jpg", "f4.jpg"]


def test_command_line_as_the_fleet_runs_it(tmp_path: Path) -> None:
    ok = subprocess.run([sys.executable, "-c", SOURCE, "status", json.dumps({"deploy_dir": str(tmp_path / "none")})],
                        capture_output=True, text=True, cwd=tmp_path)
    assert ok.returncode == 0 and json.loads(ok.stdout)["exists"] is False
    bad = subprocess.run([sys.executable, "-c", SOURCE, "frobnicate", "{}"], capture_output=True, text=True)
    assert bad.returncode == 2 and "usage: deploy_ops" in bad.stderr
    missing = subprocess.run([sys.executable, "-c", SOURCE, "switch", json.dumps({"deploy_dir": str(tmp_path),
                                                                               "release": "zzz"})],
                             capture_output=True, text=True)
    assert missing.returncode != 0 and "release zzz is not on the device" in missing.stderr
