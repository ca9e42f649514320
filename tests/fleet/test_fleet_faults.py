"""Faults a fleet command must survive: sshd dying mid-upload, mid-command and while the connection
is closed, a full device disk, and option values a hostile user types.

The rule: a host's connection may drop at any moment, including while it is being closed; that is
that host's failure, recorded in its result, and never crashes the command. Every host still gets
its row, and the MLflow run is still written. Device-side errors such as a full disk are put into
words. Bad option values are one `error: ...` line and exit 2, before any host is contacted.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml
from fleet_hosts import kill_sshd, link, restart_sshd

from pipeline.fleet import connection, runner, steps
from pipeline.fleet.inventory import load_inventory
from pipeline.fleet.results import HostResult, format_table

REPO = Path(__file__).resolve().parents[2]
FAB = str(Path(sys.executable).parent / "fab")




def _by_host(run: runner.FleetRun) -> dict[str, HostResult]:
    return {r.host: r for r in run.results}


def _deploy(inv: Path, fleet_models: dict[str, Any], tmp_path: Path, **kw: Any) -> runner.FleetRun:
    kw.setdefault("log_to_mlflow", False)
    kw.setdefault("bench", False)
    run = runner.deploy(load_inventory(inv), sources=fleet_models["sources"], results_dir=tmp_path / "reports", **kw)
    print(format_table(run.command, run.results, run.wall_s))
    return run


# --- a device's sshd dies (fleet_hosts.kill_sshd / restart_sshd) ----------------------------------

@pytest.mark.slow
@pytest.mark.ssh
def test_sshd_dying_mid_upload_and_mid_command_is_that_hosts_failure(sshd_fleet: Any, fleet_models: dict[str, Any],
                                                                     tmp_path: Path) -> None:
    victim, bystander = sshd_fleet.start("pi-victim"), sshd_fleet.start("pi-bystander")
    inv = sshd_fleet.inventory({"pis": [(victim, {}), (bystander, {})]})
    first = _by_host(_deploy(inv, fleet_models, tmp_path, group="pis"))
    assert all(r.ok for r in first.values()), [r.error for r in first.values()]

    # 1. sshd dies in the middle of the victim's model upload (deterministic: from the upload's own
    # progress hook). Closing that connection is where paramiko used to raise EOFError and crash
    # the whole command: no table, no result for any host, no MLflow run.
    sent = [0]

    def kill_victim_mid_upload(host: str, n: int) -> None:
        sent[0] += n if host == victim.name else 0
        if sent[0] > 300_000 and victim.proc is not None:
            kill_sshd(victim)

    connection.add_progress_hook(kill_victim_mid_upload)
    try:
        run = _deploy(inv, fleet_models, tmp_path, group="pis", model="alt", log_to_mlflow=True)
    finally:
        connection.remove_progress_hook(kill_victim_mid_upload)
    res = _by_host(run)
    assert list(res) == [victim.name, bystander.name]  # every host has its row, in inventory order
    assert victim.proc is None, "the hook never fired: the upload was smaller than the kill threshold"
    v, b = res[victim.name], res[bystander.name]
    assert b.ok and b.outcome == "deployed", b.error
    assert link(bystander.deploy_dir, "current") == b.release != first[bystander.name].release
    assert not v.ok and v.failed_step == "push"
    assert f"{victim.name} ({victim.address}:{victim.port}): the SSH connection dropped while uploading" in v.error
    assert "EOFError" not in v.error.split("(", 1)[0] and "re-run" in v.error
    assert link(victim.deploy_dir, "current") == first[victim.name].release  # the device is untouched
    table = format_table(run.command, run.results)
    assert victim.name in table and bystander.name in table and "1/2 host(s) ok" in table

    from mlflow import MlflowClient

    from pipeline.tracking.mlflow_runs import tracking_uri

    assert run.mlflow_run_id and not run.mlflow_error
    client = MlflowClient(tracking_uri())
    parent = client.get_run(run.mlflow_run_id)
    assert parent.data.metrics["hosts"] == 2 and parent.data.metrics["hosts_failed"] == 1
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{run.mlflow_run_id}'")
    by_name = {c.data.tags["device"]: c for c in children}
    assert by_name[victim.name].info.status == "FAILED" and "SSH connection dropped" in by_name[victim.name].data.tags[
        "error"]
    assert by_name[bystander.name].info.status == "FINISHED"

    # The device is back: the re-run completes what the dropped one started.
    restart_sshd(victim)
    again = _by_host(_deploy(inv, fleet_models, tmp_path, group="pis", model="alt"))
    assert again[victim.name].ok and again[victim.name].outcome == "deployed", again[victim.name].error
    assert again[bystander.name].outcome == "unchanged"
    assert link(victim.deploy_dir, "current") == again[victim.name].release
    assert not any(d.name.endswith(".partial") for d in (victim.deploy_dir / "releases").iterdir())

    # 2. sshd dies while the victim's `activate` command runs on the device: no exit status comes
    # back. The host fails in words; whatever the device got to, the re-run converges.
    activate = steps.activate

    def activate_then_die(conn: Any, host: Any, *args: Any, **kwargs: Any) -> Any:
        if host.name == victim.name:
            threading.Timer(0.3, kill_sshd, (victim,)).start()
        return activate(conn, host, *args, **kwargs)

    steps.activate = activate_then_die
    try:
        mid = _by_host(_deploy(inv, fleet_models, tmp_path, group="pis", model="yolov8n"))
    finally:
        steps.activate = activate
    assert mid[bystander.name].ok, mid[bystander.name].error
    assert not mid[victim.name].ok and mid[victim.name].failed_step == "activate"
    assert "the SSH connection dropped while running a command on the device" in mid[victim.name].error
    time.sleep(0.5)
    restart_sshd(victim)
    final = _by_host(_deploy(inv, fleet_models, tmp_path, group="pis", model="yolov8n"))[victim.name]
    assert final.ok, final.error
    assert link(victim.deploy_dir, "current") == final.release == mid[bystander.name].release


class _FakeConn:
    def __init__(self, close_error: BaseException | None) -> None:
        self.close_error = close_error
        self.closed = False

    def close(self) -> None:
        self.closed = True
        if self.close_error is not None:
            raise self.close_error


def _write_inventory(tmp_path: Path, hosts: dict[str, tuple[str, int]]) -> Path:
    """A complete inventory of SSH pis {name: (address, port)} that nothing has to serve."""
    doc = {"settings": {"concurrency": 4, "known_hosts": str(tmp_path / "known_hosts"), "connect_timeout_s": 2},
           "defaults": {"user": "pi", "key": str(tmp_path / "key"), "agent": False, "accept_new_host_key": False,
                        "python": "/home/pi/venv/bin/python", "arch": "aarch64", "deploy_dir": "edge",
                        "ort_threads": 1, "thermal_throttle_c": 80.0, "thermal_resume_c": 70.0, "bench_warmup": 1,
                        "bench_iterations": 3, "conf": 0.25, "iou": 0.45, "max_det": 100},
           "groups": {"pis": {"defaults": {"kind": "pi", "runtime": "onnxruntime", "precision": "fp32"},
                              "hosts": {n: {"address": a, "port": p} for n, (a, p) in hosts.items()}}}}
    path = tmp_path / "inventory.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _fake_inventory(tmp_path: Path, names: list[str]) -> Any:
    return load_inventory(_write_inventory(tmp_path, {n: (f"127.0.0.{i + 2}", 22) for i, n in enumerate(names)}))


def test_close_and_worker_failures_never_escape(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without sshd: the runner's contract with any connection and any step."""
    names = ["done-then-drop", "failed-then-drop", "exits", "eof", "fine"]
    inv = _fake_inventory(tmp_path, names)
    close_errors = {"done-then-drop": EOFError(), "failed-then-drop": OSError("Socket is closed"),
                    "exits": connection.ConnectionLost("gone while closing")}
    conns = {n: _FakeConn(close_errors.get(n)) for n in names}
    monkeypatch.setattr(runner, "connect", lambda host, settings: conns[host.name])

    def work(conn: Any, host: Any, r: HostResult) -> None:
        if host.name == "failed-then-drop":
            raise steps.StepError("the health check failed")
        if host.name == "exits":
            raise SystemExit(3)  # e.g. a library calling sys.exit in a worker thread
        if host.name == "eof":
            raise EOFError
        r.outcome = "ok"

    results = {r.host: r for r in runner.run_on_hosts(inv.select("pis"), inv, work)}
    assert list(results) == names and all(c.closed for c in conns.values())
    # The work had completed: a goodbye that fails is logged and kept, the result stands.
    assert results["done-then-drop"].ok and "EOFError" in results["done-then-drop"].details["close_error"]
    # A host that failed keeps its first error; the close's is kept beside it.
    assert results["failed-then-drop"].error == "the health check failed"
    assert "Socket is closed" in results["failed-then-drop"].details["close_error"]
    assert not results["exits"].ok and "SystemExit 3" in results["exits"].error
    assert not results["eof"].ok and results["eof"].error == "EOFError"
    assert results["fine"].ok


# --- a full disk on the device ----------------------------------------------------------------

@contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted on `path` (root only; skips where mounting is not permitted)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a full-disk device needs a small tmpfs, and mounting one needs root")
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({p.stderr.strip() or p.returncode}); a container without "
                    "CAP_SYS_ADMIN cannot simulate a full disk")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(folder: Path) -> None:
    """Use up every free byte of `folder`'s filesystem."""
    with open(folder / "filler", "ab", buffering=0) as f:
        for chunk in (1 << 20, 1 << 16, 1 << 12, 1):
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError:
                pass


@pytest.mark.slow
@pytest.mark.ssh
def test_full_disk_is_said_in_words(sshd_fleet: Any, fleet_models: dict[str, Any], tmp_path: Path) -> None:
    pi = sshd_fleet.start("pi-full")
    inv = sshd_fleet.inventory({"pis": [(pi, {})]})
    import re

    model_mb = (fleet_models["dir"] / "yolov8n.onnx").stat().st_size / 1e6

    # Too small for the release: refused before a single byte is sent (also by a dry run).
    with tmpfs(pi.deploy_dir, "4m"):
        for dry in (True, False):
            r = _by_host(_deploy(inv, fleet_models, tmp_path, group="pis", dry_run=dry))[pi.name]
            assert not r.ok and r.failed_step == "push", r.error
            said = re.match(rf"device {pi.name}: no space left in {re.escape(str(pi.deploy_dir))} \(([0-9.]+) MB "
                            r"free, the release needs ([0-9.]+) MB plus a 8.0 MB margin; nothing was sent\); free "
                            r"space on the device", r.error)
            assert said, r.error
            assert 3.9 < float(said[1]) <= 4.2 and float(said[2]) > model_mb
            assert 3.9e6 < r.details["free_bytes"] <= 4 * 1024 * 1024
        assert r.bytes_sent == 0 and not list((pi.deploy_dir / "releases").glob(".*.partial/*.onnx"))

    # Enough room at the probe, but the disk fills up during the model's upload: sftp-server's
    # bare `Failure` (or a short file) becomes words, from a fresh look at the free space.
    from pipeline.fleet.artifacts import runtime_bundle

    runtime_bytes = sum(size for _, size in runtime_bundle(REPO / "runtime").entries.values())
    with tmpfs(pi.deploy_dir, "48m"):
        sent = [0]

        def fill_up(host: str, n: int) -> None:
            sent[0] += n
            if sent[0] > runtime_bytes + 300_000 and not (pi.deploy_dir / "filler").exists():
                fill(pi.deploy_dir)

        connection.add_progress_hook(fill_up)
        try:
            r = _by_host(_deploy(inv, fleet_models, tmp_path, group="pis"))[pi.name]
        finally:
            connection.remove_progress_hook(fill_up)
        assert not r.ok and r.failed_step == "push", r.error
        assert r.error.startswith(f"device {pi.name}: no space left in {pi.deploy_dir} ("), r.error
        assert "MB free, the upload still needs" in r.error and "the SFTP upload of yolov8n.onnx failed" in r.error
        assert link(pi.deploy_dir, "current") is None
        (pi.deploy_dir / "filler").unlink()  # space freed: the re-run completes
        r = _by_host(_deploy(inv, fleet_models, tmp_path, group="pis"))[pi.name]
        assert r.ok and r.outcome == "deployed", r.error
        assert link(pi.deploy_dir, "current") == r.release


# --- hostile option values, through the real `fab` command line -------------------------------

@pytest.fixture
def trap_inventory(tmp_path: Path) -> Iterator[tuple[Path, socket.socket]]:
    """An inventory whose every host is a TCP listener nobody accepts from: a connection attempt
    would sit in its backlog, so `accept()` afterwards tells whether any host was contacted."""
    trap = socket.socket()
    trap.bind(("127.0.0.1", 0))
    trap.listen(16)
    path = _write_inventory(tmp_path, {"pi1": ("127.0.0.1", trap.getsockname()[1])})
    try:
        yield path, trap
    finally:
        trap.close()


HOSTILE = [
    (["collect-frames", "--count", "many"], "--count 'many': give a whole number of frames"),
    (["collect-frames", "--count", "0"], "--count '0': give a whole number"),
    (["collect-frames", "--count=-3"], "--count '-3': give a whole number"),
    (["collect-frames", "--count", "2.5"], "--count '2.5': give a whole number"),
    (["benchmark", "--soak-minutes", "forever"], "--soak-minutes 'forever': give the soak's length in minutes"),
    (["benchmark", "--soak-minutes=-1"], "--soak-minutes '-1': give the soak's length"),
    (["benchmark", "--soak-minutes", "nan"], "--soak-minutes 'nan': give the soak's length"),
    (["benchmark", "--soak-minutes", "inf"], "--soak-minutes 'inf': give the soak's length"),
    (["benchmark", "--soak-minutes", "1e9"], "--soak-minutes '1e9': give the soak's length"),
    (["deploy", "--model", "../../x"], "--model '../../x': give a model name such as 'yolov8n'"),
    (["deploy", "--model", "yolov8n/../../etc"], "--model 'yolov8n/../../etc': give a model name"),
    (["deploy", "--model", "x;reboot"], "--model 'x;reboot': give a model name"),
    (["deploy", "--model", "no-such-model"], "--model 'no-such-model': no files of that model in"),
    (["deploy", "--group", "pis;id", "--dry-run"], "unknown group 'pis;id'"),
    (["status", "--host", "../pi1"], "unknown host '../pi1'"),
    (["rollback", "--host", "pi2"], "unknown host 'pi2'"),
    (["provision", "--base-python", "python3;id"], "--base-python 'python3;id': letters, digits"),
    (["deploy", "--canary", "many"], "--canary 'many': give a whole number"),
    (["deploy", "--batch", "0"], "--batch '0': give a number of hosts"),
    (["deploy", "--batch", "150%"], "--batch '150%': a percentage in (0, 100]"),
    (["deploy", "--max-fail-percent", "lots"], "--max-fail-percent 'lots': a percentage from 0 to 100"),
    (["deploy", "--frames", "20"], "--frames/--minutes set the canaries' shadow window: give --canary N"),
    (["shadow", "--frames", "0"], "--frames '0': give a whole number of frames"),
    (["shadow", "--minutes", "forever"], "--minutes 'forever': give the shadow's length in minutes"),
    (["shadow", "--model", "../../x"], "--model '../../x'"),
    # invoke's own parse errors (an unknown option or task) are usage errors too: exit 2, not 1.
    (["deploy", "--bogus"], "No idea what '--bogus' is!"),
    (["deploy-everything"], "No idea what 'deploy-everything' is!"),
]


@pytest.mark.parametrize("argv,message", HOSTILE, ids=[" ".join(a) for a, _ in HOSTILE])
def test_bad_option_values_are_one_line_and_exit_2_before_any_host(trap_inventory: tuple[Path, socket.socket],
                                                                    tmp_path: Path, argv: list[str],
                                                                    message: str) -> None:
    inv, trap = trap_inventory
    if not any(a.startswith(("--group", "--host")) for a in argv):
        argv = [*argv, "--group", "pis"]
    p = subprocess.run([FAB, "-r", str(REPO), *argv, "--inventory", str(inv)], capture_output=True, text=True,
                       cwd=tmp_path, timeout=120)
    lines = [ln for ln in (p.stdout + p.stderr).splitlines() if ln.strip()]
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), lines
    trap.setblocking(False)
    with pytest.raises(BlockingIOError):  # nobody knocked: no host was contacted
        trap.accept()


def test_option_values_are_checked_by_the_runner_too(trap_inventory: tuple[Path, socket.socket]) -> None:
    """The Python API refuses the same values (before connecting), whatever their type."""
    inv = load_inventory(trap_inventory[0])
    for count in (0, -1, 2.5, True, "5", None):
        with pytest.raises(ValueError, match="--count"):
            runner.collect_frames(inv, group="pis", count=count)  # type: ignore[arg-type]
    for minutes in (0, -1.0, float("nan"), float("inf"), 1e9, True, "3"):
        with pytest.raises(ValueError, match="--soak-minutes must be > 0"):
            runner.benchmark(inv, group="pis", soak_minutes=minutes, log_to_mlflow=False)  # type: ignore[arg-type]
    assert runner.parse_count("7") == 7 and runner.parse_soak_minutes(" 0.5 ") == 0.5
    assert runner.parse_soak_minutes(None) is None

    # The model's files for each host's runtime and precision: one int8 host, only the FP32 file.
    from pipeline.fleet.artifacts import ArtifactError, Sources

    models = trap_inventory[0].parent / "models"
    models.mkdir()
    (models / "m.onnx").write_bytes(b"fp32")
    doc = yaml.safe_load(trap_inventory[0].read_text())
    doc["groups"]["pis"]["hosts"]["pi1"]["precision"] = "int8"
    trap_inventory[0].write_text(yaml.safe_dump(doc))
    sources = Sources(models, models, REPO / "runtime")
    with pytest.raises(ArtifactError, match=r"m\.int8\.onnx not found: pi1 runs ONNX Runtime INT8.*no host was"):
        runner.deploy(load_inventory(trap_inventory[0]), group="pis", model="m", sources=sources, log_to_mlflow=False)
    for bad in ("../m", "m.onnx", "", "m/x", None):
        with pytest.raises(ArtifactError, match="--model"):
            runner.deploy(load_inventory(trap_inventory[0]), group="pis", model=bad, sources=sources)  # type: ignore
    trap = trap_inventory[1]
    trap.setblocking(False)
    with pytest.raises(BlockingIOError):
        trap.accept()


def test_device_helper_enospc_is_said_in_words(tmp_path: Path) -> None:
    """A helper that dies of ENOSPC on the device: the host's error says the disk is full, with a
    fresh measure of the free space (the read-only probe a full disk still answers)."""
    from types import SimpleNamespace

    from pipeline.fleet.remote import RemoteError, last_error_line, run_helper

    host = _fake_inventory(tmp_path, ["pi1"]).select(host="pi1")[0]
    died = "Traceback (most recent call last):\n  ...\nOSError: [Errno 28] No space left on device: '/home/pi/edge/x'\n"
    full = SimpleNamespace(exited=1, stdout="", stderr=died)
    probe = SimpleNamespace(exited=0, stderr="", stdout='{"deploy_dir": "/home/pi/edge", "free_bytes": 123456, '
                                                        '"free_inodes": 99}')

    class Conn:
        def __init__(self) -> None:
            self.commands: list[str] = []

        def run(self, command: str, timeout: float | None = None) -> Any:
            self.commands.append(command)
            return full if len(self.commands) == 1 else probe

    conn = Conn()
    with pytest.raises(RemoteError) as e:
        run_helper(conn, host, "activate", {"deploy_dir": "edge"})
    assert str(e.value).startswith("device pi1: no space left in /home/pi/edge (0.1 MB free); free space on the "
                                   "device"), e.value
    assert "No space left on device" in str(e.value) and " probe " in conn.commands[1]
    assert last_error_line(full).endswith("the device's disk is full: free space in its deploy_dir and re-run")


def test_mlflow_failure_keeps_the_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An MLflow store that fails at the end of a command: the results (and `fab`'s table) stay, the
    error is kept in `mlflow_error` (fab prints it and exits 1)."""
    from pipeline.fleet import mlflow_log

    def broken(*_: Any, **__: Any) -> str:
        raise ConnectionError("tracking server went away")

    monkeypatch.setattr(mlflow_log, "log_fleet_run", broken)
    run = runner.FleetRun("deploy", [HostResult("pi1", "pis", outcome="deployed")], 1.0)
    runner._log_to_mlflow(run, [])
    assert run.mlflow_error == "ConnectionError: tracking server went away" and not run.mlflow_run_id
    assert run.results[0].ok
