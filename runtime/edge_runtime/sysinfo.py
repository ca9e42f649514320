"""The device description that `info` prints and every benchmark document embeds."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path
from typing import Any, Dict, Optional

from .thermal import CommandRunner, device_model, is_jetson, is_raspberry_pi, run_command


def _mem_total_mb(root: Path) -> Optional[float]:
    try:
        text = (root / "proc/meminfo").read_text()
    except OSError:
        return None
    m = re.search(r"MemTotal:\s+(\d+)\s+kB", text)
    return round(int(m.group(1)) / 1024, 1) if m else None


def _os_name(root: Path) -> str:
    try:
        text = (root / "etc/os-release").read_text()
        m = re.search(r'^PRETTY_NAME="?([^"\n]+)"?', text, re.M)
        if m:
            return m.group(1)
    except OSError:
        pass
    return f"{platform.system()} {platform.release()}"


def _l4t_release(root: Path) -> Optional[str]:
    try:
        first = (root / "etc/nv_tegra_release").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    m = re.search(r"R(\d+).*REVISION:\s*([\d.]+)", first)
    return f"{m.group(1)}.{m.group(2)}" if m else first.strip("# ")


def _nvidia_smi_gpu(runner: CommandRunner) -> Optional[str]:
    out = runner(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"])
    return out.strip().splitlines()[0] if out and out.strip() else None


def runtime_versions() -> Dict[str, Optional[str]]:
    """Versions of the libraries the runtime uses (None when one is missing)."""
    versions: Dict[str, Optional[str]] = {"python": platform.python_version()}
    for name, module in (("numpy", "numpy"), ("opencv", "cv2"), ("onnxruntime", "onnxruntime")):
        try:
            versions[name] = str(__import__(module).__version__)
        except ImportError:
            versions[name] = None
    return versions


def describe_device(root: "Path | str" = "/", runner: CommandRunner = run_command,
                    probe_tensorrt: bool = True) -> Dict[str, Any]:
    """Model, arch, cores, RAM, OS, Python and library versions, ORT providers, TensorRT/GPU.

    TensorRT is probed through the backend's lazy import (never imported at module load), so this
    works the same on a Pi without it.
    """
    r = Path(root)
    desc: Dict[str, Any] = {
        "hostname": platform.node(),
        "model": device_model(r) or platform.processor() or None,
        "kind": "jetson" if is_jetson(r) else "raspberry_pi" if is_raspberry_pi(r) else "generic",
        "arch": platform.machine(),
        "cores": os.cpu_count(),
        "ram_mb": _mem_total_mb(r),
        "os": _os_name(r),
        "kernel": platform.release(),
        "versions": runtime_versions(),
    }
    try:
        import onnxruntime as ort

        desc["onnxruntime_providers"] = list(ort.get_available_providers())
    except ImportError:
        desc["onnxruntime_providers"] = []
    if desc["kind"] == "jetson":
        desc["l4t"] = _l4t_release(r)
    trt = None
    if probe_tensorrt:
        from .backends import tensorrt_info

        trt = tensorrt_info()
    desc["tensorrt"] = trt
    desc["gpu"] = (trt or {}).get("gpu") or _nvidia_smi_gpu(runner)
    return desc
