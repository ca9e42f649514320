"""Helpers shared by test modules (import them from here, not from conftest).

Two conftest.py files exist (tests/ and tests/fleet/), and both are the module `conftest` to
Python: `from conftest import ...` gets whichever pytest imported last. Plain helpers live here.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
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
