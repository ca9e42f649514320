"""The runtime supervisor (`python -m edge_runtime supervise`) with real processes and sockets.

The child it supervises is a stand-in `serve`: a fake runtime tree (``D/runtime/<sha12>/
edge_runtime/__main__.py``) that answers /healthz on service.json's port with the release it
was started on, and behaves as the release's `mode` file says (ok, crash, stall, ignore SIGTERM).
The supervisor itself is the real module, run as the fleet runs it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional

import pytest
from support import free_port, healthz, wait_for

from edge_runtime import supervisor

REPO = Path(__file__).resolve().parents[2]

FAKE_SERVE = r'''
import json, os, signal, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

args = sys.argv[1:]
assert args[0] == "serve", args
deploy = args[args.index("--deploy-dir") + 1]
release_dir = args[args.index("--release") + 1]
release = os.path.basename(release_dir)
cfg = json.load(open(os.path.join(deploy, "service", "service.json")))
mode_file = os.path.join(release_dir, "mode")
mode = open(mode_file).read().strip() if os.path.exists(mode_file) else "ok"
print("fake serve starting on", release, "mode", mode, flush=True)
if mode == "crash":
    sys.stderr.write("error: camera 0 not found (fake serve)\n")
    sys.exit(3)
if mode == "noisy":
    for i in range(400):
        print("x" * 200, flush=True)
started = time.time()


class H(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def do_GET(self):
        ok = mode != "stall" and not (mode == "stall-later" and time.time() - started > 1.0)
        doc = {"ok": ok, "status": "ok" if ok else "stalled", "release": release, "pid": os.getpid(),
               "uptime_s": time.time() - started, "fps": 30.0, "problems": [] if ok else ["no frame for 9 s"],
               "last_error": None}
        body = json.dumps(doc).encode()
        self.send_response(200 if ok else 503)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


server = ThreadingHTTPServer((cfg["http_bind"], cfg["http_port"]), H)
if mode == "ignore-term":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
else:
    signal.signal(signal.SIGTERM, lambda *a: threading.Thread(target=server.shutdown).start())
server.serve_forever()
print("fake serve stopped", flush=True)
'''


def add_runtime(deploy: Path, name: str) -> None:
    pkg = deploy / "runtime" / name / "edge_runtime"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "__main__.py").write_text(FAKE_SERVE)


def add_release(deploy: Path, name: str, runtime: str, mode: str = "ok", current: bool = True) -> None:
    rel = deploy / "releases" / name
    rel.mkdir(parents=True)
    (rel / "manifest.json").write_text(json.dumps({"release": name, "source": {"runtime": runtime}}))
    (rel / "mode").write_text(mode)
    if current:
        tmp = deploy / "current.tmp"
        if tmp.is_symlink():
            tmp.unlink()
        tmp.symlink_to(f"releases/{name}")
        os.replace(tmp, deploy / "current")


@pytest.fixture
def device(tmp_path: Path) -> Dict[str, Any]:
    """A deploy dir with one good release on a fake runtime, and service.json on a free port."""
    deploy = tmp_path / "deploy"
    add_runtime(deploy, "a" * 12)
    add_release(deploy, "1" * 12, "a" * 12)
    port = free_port()
    (deploy / "service").mkdir()
    (deploy / "service" / "service.json").write_text(json.dumps({"http_bind": "127.0.0.1", "http_port": port}))
    return {"deploy": deploy, "port": port}


@pytest.fixture
def launch() -> Iterator[Callable[..., subprocess.Popen]]:
    """Start `supervise` processes; any still running at the end are killed (with their children)."""
    procs = []

    def start(deploy: Path, *extra: str) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-m", "edge_runtime", "supervise", "--deploy-dir", str(deploy),
                              "--backoff-initial-s", "0.2", "--backoff-max-s", "1", "--stop-timeout-s", "3",
                              *extra], cwd=REPO / "runtime", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
        procs.append(p)
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def state(deploy: Path) -> Dict[str, Any]:
    try:
        return json.loads((deploy / "service" / "supervisor.json").read_text())
    except (OSError, ValueError):
        return {}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return True


def serving(port: int, release: str) -> Callable[[], Optional[Dict[str, Any]]]:
    def check() -> Optional[Dict[str, Any]]:
        doc = healthz(port)
        return doc if doc and doc.get("ok") and doc.get("release") == release else None
    return check


def test_restarts_a_killed_child_then_sigterm_stops_everything(device: Dict[str, Any], launch: Any) -> None:
    deploy, port = device["deploy"], device["port"]
    sup = launch(deploy)
    first = wait_for(serving(port, "1" * 12), message="first serve")
    assert (deploy / "service" / "supervisor.pid").read_text().strip() == str(sup.pid)
    assert wait_for(lambda: state(deploy).get("child_pid") == first["pid"], message="state names the child")

    os.kill(first["pid"], signal.SIGKILL)  # a crash
    second = wait_for(lambda: (d := serving(port, "1" * 12)()) and d["pid"] != first["pid"] and d,
                      message="a new serve")
    st = wait_for(lambda: (s := state(deploy)).get("child_pid") == second["pid"] and s, message="state updated")
    assert st["restarts"] == 1 and st["last_exit_code"] == -9 and st["last_exit"]["requested"] is False
    assert not alive(first["pid"])

    sup.send_signal(signal.SIGTERM)
    assert sup.wait(timeout=10) == 0, sup.stderr.read()
    assert not alive(second["pid"]), "no orphan serve after the supervisor stopped"
    assert not (deploy / "service" / "supervisor.pid").exists()
    assert state(deploy)["state"] == "stopped" and healthz(port) is None
    log = (deploy / "service" / "serve.log").read_text()
    assert "fake serve starting" in log and "killed by SIGKILL" in log


def test_second_supervisor_refused_and_stale_pidfile_taken_over(device: Dict[str, Any], launch: Any) -> None:
    deploy, port = device["deploy"], device["port"]
    (deploy / "service" / "supervisor.pid").write_text("999999\n")  # left by a supervisor that died: no lock
    sup = launch(deploy)
    wait_for(serving(port, "1" * 12), message="serve")
    assert supervisor.running_supervisor(deploy) == sup.pid

    second = launch(deploy)
    assert second.wait(timeout=20) == 2
    err = second.stderr.read()
    assert f"a supervisor (pid {sup.pid}) already runs" in err and "--stop" in err and "Traceback" not in err
    assert sup.poll() is None  # the first one is untouched

    stopped = subprocess.run([sys.executable, "-m", "edge_runtime", "supervise", "--deploy-dir", str(deploy),
                              "--stop"], cwd=REPO / "runtime", capture_output=True, text=True, timeout=30)
    assert stopped.returncode == 0 and json.loads(stopped.stdout)["stopped"] is True
    assert sup.wait(timeout=5) == 0 and supervisor.running_supervisor(deploy) is None


def test_sighup_restarts_onto_the_new_current(device: Dict[str, Any], launch: Any) -> None:
    deploy, port = device["deploy"], device["port"]
    sup = launch(deploy)
    old = wait_for(serving(port, "1" * 12), message="serve on release 1")
    add_runtime(deploy, "b" * 12)  # a new release with new runtime code, switched to by a deploy
    add_release(deploy, "2" * 12, "b" * 12)
    sup.send_signal(signal.SIGHUP)
    new = wait_for(serving(port, "2" * 12), message="serve on release 2")
    assert new["pid"] != old["pid"] and not alive(old["pid"])
    st = wait_for(lambda: (s := state(deploy)).get("release") == "2" * 12 and s, message="state")
    assert st["runtime"] == "b" * 12 and st["generation"] == 1 and st["restarts"] == 0  # asked for: no failure
    assert sup.poll() is None


def test_crash_loop_backs_off_and_reports_the_error_line(device: Dict[str, Any], launch: Any) -> None:
    deploy, port = device["deploy"], device["port"]
    add_release(deploy, "3" * 12, "a" * 12, mode="crash")
    sup = launch(deploy, "--crash-loop-after", "3")
    st = wait_for(lambda: (s := state(deploy)).get("consecutive_failures", 0) >= 3 and s, message="3 failures")
    assert st["crash_loop"] is True and st["last_exit_code"] == 3
    assert st["last_error"] == "error: camera 0 not found (fake serve)"
    log = (deploy / "service" / "serve.log").read_text()
    assert "restarting in 0.2 s" in log and "restarting in 0.4 s" in log and "restarting in 0.8 s" in log

    add_release(deploy, "4" * 12, "a" * 12)  # a fixed release; SIGHUP = a fresh start, no back-off
    sup.send_signal(signal.SIGHUP)
    wait_for(serving(port, "4" * 12), message="serve on the fixed release")
    st = wait_for(lambda: (s := state(deploy)).get("release") == "4" * 12 and s, message="state")
    assert st["consecutive_failures"] == 0 and st["crash_loop"] is False


def test_start_timeout_and_watchdog_restart_an_unhealthy_child(device: Dict[str, Any], launch: Any) -> None:
    deploy = device["deploy"]
    add_release(deploy, "5" * 12, "a" * 12, mode="stall")  # answers 503 "stalled" from the start
    launch(deploy, "--start-timeout-s", "1.5")
    st = wait_for(lambda: (s := state(deploy)).get("restarts", 0) >= 1 and s, timeout=30, message="a restart")
    assert "not healthy within 1.5 s of its start" in st["last_error"] and "stalled" in st["last_error"]


def test_watchdog_restarts_a_child_that_stalls_after_being_healthy(device: Dict[str, Any], launch: Any) -> None:
    deploy, port = device["deploy"], device["port"]
    add_release(deploy, "8" * 12, "a" * 12, mode="stall-later")  # healthy for 1 s, then stalled
    launch(deploy, "--watchdog-s", "1")
    first = wait_for(serving(port, "8" * 12), message="healthy serve")
    st = wait_for(lambda: (s := state(deploy)).get("restarts", 0) >= 1 and s, timeout=30, message="a restart")
    assert st["last_error"].startswith("watchdog: unhealthy for") and "no frame for 9 s" in st["last_error"]
    assert not alive(first["pid"])


def test_stubborn_child_is_sigkilled_on_stop(device: Dict[str, Any], launch: Any) -> None:
    deploy, port = device["deploy"], device["port"]
    add_release(deploy, "6" * 12, "a" * 12, mode="ignore-term")
    sup = launch(deploy)
    child = wait_for(serving(port, "6" * 12), message="serve")
    start = time.monotonic()
    sup.send_signal(signal.SIGTERM)
    assert sup.wait(timeout=15) == 0
    assert 2.5 < time.monotonic() - start < 12  # --stop-timeout-s 3, then SIGKILL
    assert not alive(child["pid"])


def test_orphan_of_a_killed_supervisor_is_stopped_by_the_next(device: Dict[str, Any], launch: Any) -> None:
    deploy, port = device["deploy"], device["port"]
    sup = launch(deploy)
    orphan = wait_for(serving(port, "1" * 12), message="serve")
    wait_for(lambda: state(deploy).get("child_pid") == orphan["pid"], message="state")
    os.kill(sup.pid, signal.SIGKILL)  # the supervisor dies hard; its serve keeps the port
    sup.wait()
    assert alive(orphan["pid"])
    launch(deploy)
    fresh = wait_for(lambda: (d := serving(port, "1" * 12)()) and d["pid"] != orphan["pid"] and d,
                     message="a new serve")
    assert fresh and not alive(orphan["pid"])


def test_log_is_capped_with_one_backup(device: Dict[str, Any], launch: Any) -> None:
    deploy, port = device["deploy"], device["port"]
    add_release(deploy, "7" * 12, "a" * 12, mode="noisy")  # ~80 kB of output at start
    sup = launch(deploy, "--log-max-mb", str(20_000 / 1024 / 1024))
    wait_for(serving(port, "7" * 12), message="serve")
    sup.send_signal(signal.SIGTERM)
    assert sup.wait(timeout=10) == 0
    log, backup = deploy / "service" / "serve.log", deploy / "service" / "serve.log.1"
    assert backup.is_file() and log.stat().st_size <= 20_000 and backup.stat().st_size <= 20_000
    assert not (deploy / "service" / "serve.log.2").exists()


def test_no_current_release_is_a_failure_with_the_fix(tmp_path: Path, launch: Any) -> None:
    deploy = tmp_path / "empty"
    launch(deploy)
    st = wait_for(lambda: (s := state(deploy)).get("restarts", 0) >= 1 and s, message="a failed start")
    assert "no usable current release" in st["last_error"] and "fab deploy" in st["last_error"]
    assert st["child_pid"] is None and st["state"] == "backoff"
