"""Helpers shared by test modules (import them from here, not from conftest).

Two conftest.py files exist (tests/ and tests/fleet/), and both are the module `conftest` to
Python: `from conftest import ...` gets whichever pytest imported last. Plain helpers live here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

# One copy of the tiny settings, owned by the reproducibility check (which shrinks params the same
# way); re-exported here for the tests.
from pipeline.tools.repro_check import tiny_params  # noqa: F401  (re-exported)

REPO = Path(__file__).resolve().parent.parent


def copy_repo(dest: Path) -> Path:
    """Copy the tracked parts of the repository (no venv, no outputs) to `dest`."""
    ignore = shutil.ignore_patterns(".venv", ".git", "__pycache__", ".pytest_cache", "mlflow.db",
                                    "mlartifacts", "runs", "data", "models", "reports", "calibration", "*.egg-info",
                                    "build", "dvc_plots", "cache", "tmp")  # cache/tmp: .dvc's, GBs locally
    shutil.copytree(REPO, dest, ignore=ignore)
    (dest / ".dvc" / "cache").mkdir(parents=True, exist_ok=True)
    # Git keeps these folder READMEs; reports/fleet must exist (the report stage depends on it).
    for readme in ("reports/README.md", "reports/fleet/README.md"):
        (dest / readme).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO / readme, dest / readme)
    return dest


@contextmanager
def mlflow_store(root: Path) -> Iterator[None]:
    """Log to a SQLite MLflow store in `root` inside the block (session fixtures outlive the
    per-test monkeypatch, so they set and restore the variable themselves)."""
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved


def run_checked(cmd: Sequence[str], cwd: Path, env: Mapping[str, str], timeout: float = 900) -> str:
    """Run a command (`dvc repro`, `fab deploy`...) in a workspace; its stdout + stderr, or an
    AssertionError with the command, its exit status and the tail of both."""
    proc = subprocess.run(list(cmd), cwd=cwd, env=dict(env), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-4000:]}")
    return proc.stdout + proc.stderr


def free_port(address: str = "127.0.0.1") -> int:
    """A TCP port on `address` that nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def wait_for(what: Callable[[], Any], timeout: float = 60.0, message: str = "") -> Any:
    """Poll `what` until it returns something truthy, and return that; AssertionError after `timeout` s."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = what()
        if last:
            return last
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {message or what} (last: {last!r})")


def healthz(port: int, host: str = "127.0.0.1") -> dict[str, Any] | None:
    """The device service's /healthz document (200 or 503), or None when nothing answers."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/healthz", timeout=2) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        return json.loads(e.read())
    except OSError:
        return None


def shipped_runtime(dest: Path) -> Path:
    """`dest` holding only a copy of runtime/edge_runtime/ (what the fleet ships), returned as the
    working directory a device runs `python -m edge_runtime` from: a stray import from the
    workstation side fails there, as it would on a Pi."""
    shutil.copytree(REPO / "runtime" / "edge_runtime", dest / "edge_runtime",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return dest


# ---------------------------------------------------------------- the device service (`serve`)

def service_doc(tmp: Path, port: int, **over: Any) -> dict[str, Any]:
    """A valid service.json for the tests: a synthetic 320x240 camera at 30 FPS, HTTP on 127.0.0.1:`port`,
    files under `tmp`; `over` replaces fields."""
    doc = {"device": "dev1", "source": "synthetic:320x240", "fps": 30.0, "http_bind": "127.0.0.1", "http_port": port,
           "stall_s": 2.0, "jsonl_max_mb": 0.05, "jsonl_backups": 2, "mqtt_host": "", "mqtt_port": 1883,
           "mqtt_topic": "", "mqtt_queue": 100, "frames_dir": str(tmp / "frames"), "frames_every_s": 0.5,
           "frames_band": [0.25, 0.5], "frames_max_files": 6, "frames_max_mb": 5.0, "actuator": "", "variant": None}
    doc.update(over)
    return doc


def start_serve(runtime: Path, deploy: Path, doc: dict[str, Any], *extra: str) -> subprocess.Popen:
    """`python -m edge_runtime serve --deploy-dir deploy` as a device runs it: from the shipped runtime
    copy `runtime`, a clean environment, `doc` written as deploy/service/service.json."""
    (deploy / "service").mkdir(exist_ok=True)
    (deploy / "service" / "service.json").write_text(json.dumps(doc))
    return subprocess.Popen([sys.executable, "-m", "edge_runtime", "serve", "--deploy-dir", str(deploy), *extra],
                            cwd=runtime, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={"PATH": "/usr/bin:/bin", "HOME": str(runtime)})


def parse_metrics(text: str) -> dict[str, float]:
    """`name{labels}` -> value, checking the exposition's shape on the way."""
    out, declared = {}, set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            assert kind in ("gauge", "counter", "histogram"), line
            assert name not in declared, f"{name} declared twice"
            declared.add(name)
            continue
        if line.startswith("#") or not line:
            continue
        m = re.fullmatch(r'([a-z_]+)(\{[^}]*\})? (\S+)', line)
        assert m, f"not a Prometheus sample line: {line!r}"
        base = re.sub(r"_(bucket|sum|count)$", "", m.group(1))
        assert m.group(1) in declared or base in declared, f"{m.group(1)} has no # TYPE line"
        out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out
