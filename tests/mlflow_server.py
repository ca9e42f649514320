"""A real MLflow tracking server on loopback for tests: `mlflow server` as a team would run it.

SQLite backend store + proxied artifacts (`--serve-artifacts --artifacts-destination DIR`), so a
client uploads artifacts over HTTP and never needs the server's disk: the setup
docs/mlflow-and-team-setup.md recommends for sharing one server. The fixture `mlflow_server` is
session-scoped (a server takes 10-30 s to come up on 2 cores); test modules load it with
`pytest_plugins = ["mlflow_server"]`, which registers it once for the whole session (a plain
`from mlflow_server import ...` in two modules would start two servers). Tests that use it are
marked `server`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
from support import free_port

STARTUP_TIMEOUT_S = 180.0  # cold start on a loaded 2-core CI machine has taken ~30 s; leave room
STOP_TIMEOUT_S = 15.0
LOG_TAIL_CHARS = 4000


@dataclass(frozen=True)
class MlflowServer:
    """A running server: its URI and where its database, artifacts and log live."""

    uri: str
    port: int
    backend_db: Path
    artifact_root: Path
    log: Path

    def log_tail(self) -> str:
        """The end of the server's stdout+stderr, for failure messages."""
        return log_tail(self.log)


def log_tail(log: Path, chars: int = LOG_TAIL_CHARS) -> str:
    """The last `chars` characters of a log file ('' if it does not exist yet)."""
    try:
        return log.read_text(errors="replace")[-chars:]
    except FileNotFoundError:
        return ""


def _healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop the server's whole process group (uvicorn and its workers), politely, then not."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=STOP_TIMEOUT_S)
    except ProcessLookupError:
        pass
    # Children outlive a leader that exits on SIGTERM first; sweep what is left of the group.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@contextmanager
def run_mlflow_server(root: Path, timeout_s: float = STARTUP_TIMEOUT_S) -> Iterator[MlflowServer]:
    """Start `mlflow server` on 127.0.0.1 with its store under `root`; stop it on exit.

    Waits (at most `timeout_s`) until `/health` answers. Raises RuntimeError with the server's
    log tail if it exits early or does not become healthy in time.
    """
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = MlflowServer(uri=f"http://127.0.0.1:{port}", port=port, backend_db=root / "mlflow.db",
                          artifact_root=root / "artifacts", log=root / "server.log")
    cmd = [sys.executable, "-m", "mlflow", "server",
           "--backend-store-uri", f"sqlite:///{server.backend_db}",
           "--serve-artifacts", "--artifacts-destination", str(server.artifact_root),
           "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]  # one worker: tests send few requests, and CI has 2 cores
    env = dict(os.environ)
    # The GenAI job runner (huey consumers, 7 processes) serves nothing these tests use.
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    env.pop("MLFLOW_TRACKING_URI", None)  # the server must not read a client setting
    with server.log.open("wb") as log:
        # New session = new process group, so the stop reaches every worker the server forks.
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while not _healthy(server.uri):
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with code {proc.returncode} before it was healthy "
                                   f"(command: {' '.join(cmd)}); log {server.log}:\n{server.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server at {server.uri} not healthy after {timeout_s:.0f} s "
                                   f"(command: {' '.join(cmd)}); log {server.log}:\n{server.log_tail()}")
            time.sleep(0.5)
        yield server
    finally:
        _stop(proc)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """One real MLflow tracking server for the test session (see the module docstring)."""
    with run_mlflow_server(tmp_path_factory.mktemp("mlflow_server")) as server:
        yield server
