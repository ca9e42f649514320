"""The detector as a supervised service, deployed to real OpenSSH test hosts with the real `serve`.

No systemd runs here, so the hosts use the runtime supervisor (`edge_runtime supervise`), as
the fleet's `local` group and any device without systemd do; the systemd unit is checked with
`systemd-analyze verify`, and its launcher with a real notify socket (READY=1 from the PID
systemd started). Every service gets its own free port on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from fleet_hosts import link, service
from support import free_port, healthz, wait_for

from edge_runtime import deploy_ops
from pipeline.fleet import runner
from pipeline.fleet.artifacts import Sources
from pipeline.fleet.inventory import ServiceSettings, load_inventory
from pipeline.fleet.results import format_table

REPO = Path(__file__).resolve().parents[2]




def _deploy(inv: Path, sources: Sources, tmp_path: Path, **kw: Any) -> dict[str, Any]:
    kw.setdefault("log_to_mlflow", False)
    kw.setdefault("bench", False)
    if "host" not in kw:
        kw.setdefault("group", "pis")
    run = runner.deploy(load_inventory(inv), sources=sources, results_dir=tmp_path / "reports", **kw)
    print(format_table(run.command, run.results, run.wall_s))
    return {r.host: r for r in run.results}


def crashing_runtime(tmp_path: Path) -> Path:
    """A copy of runtime/ whose `serve` exits 2 at start (health, bench, everything else work)."""
    root = tmp_path / "runtime-crash"
    shutil.copytree(REPO / "runtime", root, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    with open(root / "edge_runtime" / "__init__.py", "a") as f:
        f.write("\nimport sys as _sys\n\nif _sys.argv[1:2] == ['serve']:  # injected by test_fleet_service\n"
                "    _sys.stderr.write('error: camera /dev/video0 not found (simulated start failure)\\n')\n"
                "    raise SystemExit(2)\n")
    return root


@pytest.mark.slow
@pytest.mark.ssh
def test_deploy_starts_the_service_redeploy_and_rollback_move_it(sshd_fleet: Any, fleet_models: dict[str, Any],
                                                                 tmp_path: Path, services: list[Path]) -> None:
    pi = sshd_fleet.start("pi1")
    port = free_port()
    inv = sshd_fleet.inventory({"pis": [(pi, {"service": service(port)})]})
    services.append(pi.deploy_dir)
    sources = fleet_models["sources"]

    first = _deploy(inv, sources, tmp_path, bench=True)["pi1"]  # bench first, with the service stopped
    assert first.ok and first.outcome == "deployed", first.error
    assert first.details["service"]["ok"] and first.details["service"]["supervisor"] == "runtime"
    assert {"bench", "service_stop", "service_start", "service_wait"} <= set(first.timings)
    doc = healthz(port)  # the SSH session is over: the detached supervisor and its serve live on
    assert doc and doc["ok"] and doc["release"] == first.release
    svc = pi.deploy_dir / "service"
    cfg = json.loads((svc / "service.json").read_text())
    assert cfg["device"] == "pi1" and cfg["http_port"] == port and cfg["frames_dir"] == str(pi.deploy_dir / "frames")
    state = json.loads((svc / "supervisor.json").read_text())
    assert state["child_pid"] == doc["pid"] and state["release"] == first.release
    assert (svc / "supervisor.pid").is_file() and (svc / "serve.log").is_file()

    st = runner.status(load_inventory(inv), group="pis").results[0].details["service"]
    assert st["running"] and st["ok"] and st["release"] == first.release and st["supervisor"] == "runtime"
    assert isinstance(st["fps"], (int, float)) and st["restarts"] == 0
    fab = subprocess.run([str(REPO / ".venv/bin/fab"), "-r", str(REPO), "status", "--group", "pis",
                          "--inventory", str(inv)], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert fab.returncode == 0 and f"service=ok (runtime) release={first.release} fps=" in fab.stdout, fab.stdout

    # A crash of serve on the device: the supervisor starts a new one.
    os.kill(doc["pid"], signal.SIGKILL)
    again = wait_for(lambda: (d := healthz(port)) and d["ok"] and d["pid"] != doc["pid"] and d, message="restart")
    assert again["release"] == first.release

    # A new model: the service moves to the new release (same runtime code: the supervisor gets SIGHUP).
    sup_pid = int((svc / "supervisor.pid").read_text())
    second = _deploy(inv, sources, tmp_path, model="alt")["pi1"]
    assert second.ok and second.outcome == "deployed", second.error
    doc = healthz(port)
    assert doc and doc["ok"] and doc["release"] == second.release != first.release
    assert int((svc / "supervisor.pid").read_text()) == sup_pid

    # fab rollback: previous is current again, and so is its service.
    rb = runner.rollback(load_inventory(inv), group="pis").results[0]
    assert rb.ok and rb.outcome == "rolled-back" and rb.details["service"]["ok"], rb.error
    doc = healthz(port)
    assert doc and doc["ok"] and doc["release"] == first.release
    assert link(pi.deploy_dir, "current") == first.release and link(pi.deploy_dir, "previous") == second.release


@pytest.mark.slow
@pytest.mark.ssh
def test_release_that_crashes_on_start_is_rolled_back(sshd_fleet: Any, fleet_models: dict[str, Any],
                                                      tmp_path: Path, services: list[Path]) -> None:
    pi, fresh = sshd_fleet.start("pi1"), sshd_fleet.start("fresh")
    ports = {"pi1": free_port(), "fresh": free_port()}
    inv = sshd_fleet.inventory({"pis": [(pi, {"service": service(ports["pi1"])}),
                                        (fresh, {"service": service(ports["fresh"])})]})
    services.extend([pi.deploy_dir, fresh.deploy_dir])
    good: Sources = fleet_models["sources"]
    one = _deploy(inv, good, tmp_path, host="pi1")["pi1"]
    two = _deploy(inv, good, tmp_path, host="pi1", model="alt")["pi1"]
    assert one.ok and two.ok and healthz(ports["pi1"])["release"] == two.release

    broken = Sources(good.models_dir, good.samples_dir, crashing_runtime(tmp_path))
    start = time.perf_counter()
    res = _deploy(inv, broken, tmp_path, group="pis")
    took = time.perf_counter() - start
    bad = res["pi1"]
    assert not bad.ok and bad.failed_step == "service" and bad.release not in (one.release, two.release)
    assert "simulated start failure" in bad.error and "serve exited 3 times" in bad.error
    assert f"rolled back: release {two.release} is current again and its service is healthy" in bad.error
    assert took < 50, f"a crash loop is detected early, not after healthy_timeout_s (took {took:.0f} s)"
    # The device is exactly as before the deploy, and serves the good release.
    assert link(pi.deploy_dir, "current") == two.release and link(pi.deploy_dir, "previous") == one.release
    doc = healthz(ports["pi1"])
    assert doc and doc["ok"] and doc["release"] == two.release
    assert bad.details["service"]["rolled_back_to"] == two.release and bad.details["service"]["rollback_ok"]

    # A device whose first release cannot serve: nothing is left current, nothing runs.
    first = res["fresh"]
    assert not first.ok and first.failed_step == "service" and "no earlier release" in first.error
    assert link(fresh.deploy_dir, "current") is None and healthz(ports["fresh"]) is None
    assert not (fresh.deploy_dir / "service" / "supervisor.pid").exists()
    assert (fresh.deploy_dir / "releases" / first.release / "manifest.json").is_file()  # kept for a later deploy


@pytest.mark.slow
@pytest.mark.ssh
def test_service_disabled_stops_what_an_earlier_deploy_started(sshd_fleet: Any, fleet_models: dict[str, Any],
                                                               tmp_path: Path, services: list[Path]) -> None:
    pi = sshd_fleet.start("pi1")
    port = free_port()
    services.append(pi.deploy_dir)
    inv = sshd_fleet.inventory({"pis": [(pi, {"service": service(port)})]})
    assert _deploy(inv, fleet_models["sources"], tmp_path)["pi1"].ok
    assert healthz(port)
    inv = sshd_fleet.inventory({"pis": [(pi, {"service": service(port, enabled=False)})]})
    r = _deploy(inv, fleet_models["sources"], tmp_path)["pi1"]
    assert r.ok and "service" not in r.details
    assert healthz(port) is None and not (pi.deploy_dir / "service" / "supervisor.pid").exists()


def _unit(tmp_path: Path, deploy_dir: Path, **spec: Any) -> Path:
    full = {"unit": "edge-defect-pi-line1.service", "config": {"device": "pi-line1"}, "healthy_timeout_s": 60.0,
            "watchdog_s": 30.0, "restart_s": 5.0, **spec}
    user = subprocess.run(["id", "-un"], capture_output=True, text=True, check=True).stdout.strip()
    path = tmp_path / full["unit"]
    path.write_text(deploy_ops.unit_text(full, str(deploy_dir), sys.executable, user))
    return path


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed (Debian: systemd)")
def test_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    deploy = tmp_path / "edge%defect"  # '%' is legal in a deploy_dir and a specifier in unit files
    unit = _unit(tmp_path, deploy)
    text = unit.read_text()
    for line in ("Type=notify", "NotifyAccess=main", "Restart=always", "RestartSec=5s", "WatchdogSec=30s",
                 "TimeoutStartSec=60s", "WantedBy=multi-user.target", "StartLimitBurst=20",
                 f"ExecStart={sys.executable} {tmp_path}/edge%%defect/service/launch.py {tmp_path}/edge%%defect",
                 f"User={subprocess.run(['id', '-un'], capture_output=True, text=True).stdout.strip()}"):
        assert line in text.splitlines(), line
    p = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout + p.stderr == "", p.stdout + p.stderr

    off = _unit(tmp_path, deploy, watchdog_s=0, restart_s=0.5)  # fractional seconds, no watchdog
    assert "RestartSec=0.5s" in off.read_text() and "WatchdogSec" not in off.read_text()
    p = subprocess.run(["systemd-analyze", "verify", str(off)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout + p.stderr == "", p.stdout + p.stderr

    # The check is real: a unit with a mistake is reported.
    unit.write_text(text.replace("Restart=always", "Restart=sometimes"))
    p = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert "sometimes" in p.stdout + p.stderr


def _ucred_pid(ancillary: list[tuple[int, int, bytes]]) -> int | None:
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            return struct.unpack("3i", data[:12])[0]
    return None


@pytest.mark.slow
@pytest.mark.ssh
def test_launcher_execs_serve_which_notifies_ready_from_the_main_pid(sshd_fleet: Any, fleet_models: dict[str, Any],
                                                                     tmp_path: Path) -> None:
    """What systemd would do with the unit: run the launcher with NOTIFY_SOCKET; READY=1 must come from
    the PID it started (exec, not a child: NotifyAccess=main), and /healthz must answer for current."""
    pi = sshd_fleet.start("pi1")
    port = free_port()
    inv = sshd_fleet.inventory({"pis": [(pi, {"service": service(port, enabled=False)})]})
    r = _deploy(inv, fleet_models["sources"], tmp_path)["pi1"]
    assert r.ok, r.error
    svc = pi.deploy_dir / "service"
    svc.mkdir(exist_ok=True)
    settings = ServiceSettings.model_validate(service(port))  # what the deploy would write
    (svc / "service.json").write_text(json.dumps(settings.config("pi1", str(pi.deploy_dir / "frames"))))
    (svc / "launch.py").write_text(deploy_ops.LAUNCHER)

    notify = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    sock.settimeout(60)
    env = dict(os.environ, NOTIFY_SOCKET=str(notify), WATCHDOG_USEC="4000000")
    proc = subprocess.Popen([sys.executable, str(svc / "launch.py"), str(pi.deploy_dir)], cwd="/", env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        messages: list[tuple[str, int | None]] = []
        while not any("READY=1" in m for m, _ in messages):
            data, anc, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(12))
            messages.append((data.decode(), _ucred_pid(anc)))
        ready_pid = next(pid for m, pid in messages if "READY=1" in m)
        assert ready_pid == proc.pid, (messages, proc.pid)
        doc = healthz(port)
        assert doc and doc["ok"] and doc["release"] == r.release and doc["pid"] == proc.pid
        while not any("WATCHDOG=1" in m for m, _ in messages):  # healthy: the watchdog is fed
            data, anc, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(12))
            messages.append((data.decode(), _ucred_pid(anc)))
        assert {pid for _, pid in messages} == {proc.pid}
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, proc.stderr.read() if proc.stderr else ""
        sock.close()

    (pi.deploy_dir / "current").unlink()  # nothing deployed: one clear line, exit 2
    p = subprocess.run([sys.executable, str(svc / "launch.py"), str(pi.deploy_dir)], capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.startswith("error: no usable current release")


FAKE_TOOL = """#!/bin/sh
echo "$(basename "$0") $*" >> {log}
case "$(basename "$0") $*" in
  "sudo -n "*) [ -n "$SUDO_REFUSES" ] && {{ echo "sudo: a password is required" >&2; exit 1; }}; shift; exec "$@";;
  "systemctl show"*) echo NRestarts=2; echo ActiveState=active;;
esac
exit 0
"""


@pytest.mark.parametrize("root", [True, False], ids=["as-root", "via-sudo"])
def test_systemd_install_commands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, root: bool) -> None:
    """The systemd path without systemd: fake systemctl/sudo on PATH record what the deploy runs."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    for tool in ("systemctl", "sudo"):
        (bin_dir / tool).write_text(FAKE_TOOL.format(log=log))
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setattr(deploy_ops, "UNIT_DIR", str(tmp_path / "etc-systemd-system"))
    (tmp_path / "etc-systemd-system").mkdir()
    if not root:
        monkeypatch.setattr(deploy_ops.os, "geteuid", lambda: 4242)
        monkeypatch.setattr(deploy_ops, "_user", lambda: "pi")
    deploy = tmp_path / "deploy"
    spec = {"unit": "edge-defect-pi1.service", "config": {"device": "pi1"}, "healthy_timeout_s": 60.0,
            "watchdog_s": 30.0, "restart_s": 5.0}
    answer = deploy_ops.install_unit(spec, str(deploy))
    assert answer["unit_updated"] and answer["n_restarts"] == 2
    installed = tmp_path / "etc-systemd-system" / "edge-defect-pi1.service"
    assert installed.read_text() == (deploy / "service" / "edge-defect-pi1.service").read_text()
    assert (deploy / "service" / "launch.py").read_text() == deploy_ops.LAUNCHER
    calls = [c for c in log.read_text().splitlines() if not c.startswith("sudo ")]
    assert calls == ["systemctl daemon-reload", "systemctl enable --quiet edge-defect-pi1.service",
                     "systemctl reset-failed edge-defect-pi1.service",
                     "systemctl show edge-defect-pi1.service -p ActiveState -p SubState -p Result -p NRestarts "
                     "-p MainPID -p ExecMainStatus",
                     "systemctl --no-block restart edge-defect-pi1.service"]
    assert log.read_text().count("sudo -n") == (0 if root else 5)  # install + 4 systemctl; `show` needs no root

    log.write_text("")  # the same unit again: no reinstall, no daemon-reload
    assert deploy_ops.install_unit(spec, str(deploy))["unit_updated"] is False
    assert "daemon-reload" not in log.read_text()

    if not root:  # no passwordless sudo: one line that names the fix
        monkeypatch.setenv("SUDO_REFUSES", "1")
        with pytest.raises(deploy_ops.ServiceError,
                           match=r"`sudo -n systemctl enable --quiet edge-defect-pi1\.service` "
                           r"refused \(sudo: a password is required\).*NOPASSWD: /usr/bin/systemctl.*"
                           r"service\.supervisor: runtime"):
            deploy_ops.install_unit(spec, str(deploy))


@pytest.mark.slow
@pytest.mark.ssh
def test_collect_frames_from_a_serving_device(sshd_fleet: Any, fleet_models: dict[str, Any], tmp_path: Path,
                                              services: list[Path]) -> None:
    """The closed loop: the deployed service keeps frames, `collect-frames` pulls the newest with their
    sidecars, and the camera stage's ingest accepts what arrived."""
    from pipeline.stages.camera import ingest_frames

    pi = sshd_fleet.start("pi1")
    port = free_port()
    inv = sshd_fleet.inventory({"pis": [(pi, {"service": service(port, frames_every_s=0.4, frames_max_files=4)})]})
    services.append(pi.deploy_dir)
    r = _deploy(inv, fleet_models["sources"], tmp_path)["pi1"]
    assert r.ok, r.error
    frames = pi.deploy_dir / "frames"
    # The cap (4 files) holds while the service keeps a frame every 0.4 s.
    wait_for(lambda: healthz(port) and len(list(frames.glob("*.jpg"))) >= 4, 60, "four kept frames")
    time.sleep(1.5)
    assert len(list(frames.glob("*.jpg"))) <= 4 and len(list(frames.glob("*.json"))) <= 4
    camera, meta = tmp_path / "camera", tmp_path / "camera-meta"
    run = runner.collect_frames(load_inventory(inv), group="pis", count=3, camera_dir=camera, meta_dir=meta)
    (got,) = run.results
    assert got.ok and got.details["frames"] == 3, got.error
    images = sorted((camera / "pi1").glob("*.jpg"))
    assert len(images) == 3
    release = healthz(port)["release"]
    for img in images:
        sidecar = json.loads((meta / "pi1" / (img.stem + ".json")).read_text())
        assert sidecar["release"] == release and "detections" in sidecar
    stats = ingest_frames(camera, tmp_path / "ingested", video_fps=2.0)
    assert stats["pi1"].frames == 3
