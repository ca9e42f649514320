"""Helpers the fleet tests share: a test host's service section, a device's sshd dying, model variants.

Imported by the test modules of this folder (pytest puts it on sys.path); fixtures live in
conftest.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"

# The settings and defaults of an inventory document that nothing has to serve (parsing tests).
INVENTORY_SETTINGS: dict[str, Any] = {"concurrency": 4, "known_hosts": "~/.ssh/known_hosts"}
INVENTORY_DEFAULTS: dict[str, Any] = {
    "port": 22, "user": "pi", "key": "~/.ssh/id_ed25519", "agent": False, "accept_new_host_key": False,
    "arch": "aarch64", "python": "/usr/bin/python3", "ort_threads": 4, "thermal_throttle_c": 80,
    "thermal_resume_c": 70, "bench_warmup": 1, "bench_iterations": 5, "conf": 0.25, "iou": 0.45, "max_det": 100,
    "deploy_dir": "/home/pi/edge"}

def service(port: int, **overrides: Any) -> dict[str, Any]:
    """A host's `service:` section: synthetic camera, slow enough for a 2-core CI box."""
    doc = {"enabled": True, "supervisor": "auto", "source": "synthetic:320x240", "fps": 5.0, "http_port": port,
           "stall_s": 5.0, "jsonl_max_mb": 1, "jsonl_backups": 1, "frames_every_s": 0.0, "frames_band": [0.25, 0.5],
           "frames_max_files": 10, "frames_max_mb": 1, "healthy_timeout_s": 60, "watchdog_s": 0, "restart_s": 0.3}
    doc.update(overrides)
    return doc


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (sshd's per-connection children and their sftp/shell children)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_sshd(host: Any) -> None:
    """The device's sshd dies: the listener and every session it forked (SIGKILL, no goodbye).

    The sessions are found before the listener is killed (its children are re-parented after)."""
    proc, host.proc = host.proc, None
    if proc is None:
        return
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def restart_sshd(host: Any) -> None:
    """Start the host's sshd again on the same address, port and host key."""
    with open(host.root / "sshd.log", "ab") as log:
        host.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(host.root / "sshd_config")], stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host.address, host.port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"sshd on {host.address}:{host.port} did not come back")


def make_variant(src: Path, dest: Path, tag: str) -> Path:
    """A copy of an ONNX model with one extra metadata entry: same behaviour, different sha256."""
    import onnx

    model = onnx.load(str(src))
    entry = model.metadata_props.add()
    entry.key, entry.value = "fleet_test_variant", tag
    dest.write_bytes(model.SerializeToString())
    return dest


def link(deploy_dir: Path, name: str) -> str | None:
    """The release a device's `current` / `previous` symlink points at (None when absent)."""
    p = deploy_dir / name
    return os.path.basename(os.readlink(p)) if p.is_symlink() else None


def device_health(deploy_dir: Path) -> dict[str, Any]:
    """The device's own health check of whatever `current` points at (every sha256 + an inference)."""
    release = deploy_dir / "current"
    runtime = json.loads((release / "manifest.json").read_text())["source"]["runtime"]
    p = subprocess.run([sys.executable, "-m", "edge_runtime", "health", "--release", str(release)],
                       cwd=deploy_dir / "runtime" / runtime, capture_output=True, text=True, timeout=120)
    return {"exit": p.returncode, **json.loads(p.stdout)}
