"""Shadow runs and staged rollouts against real OpenSSH test hosts running the real service.

The fault matrix: a candidate that fails its shadow, an unreachable canary, a batch over its
failure budget, the link cut mid-transfer, a truncated upload, SIGKILL of the service during the
switch, and a rerun after each. After every one of them, every device's `current` is a
complete, verified release (the device's own `health` check: sha256 of every file plus one
inference) and its service answers /healthz ok on that release.

No systemd here: the services run under the runtime supervisor (see test_fleet_service.py).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from fleet_hosts import device_health, kill_sshd, link, make_variant, restart_sshd, service
from support import free_port, healthz, wait_for

from pipeline.fleet import connection, runner, steps
from pipeline.fleet.artifacts import Sources
from pipeline.fleet.inventory import load_inventory
from pipeline.fleet.results import format_table
from pipeline.fleet.shadow import ShadowPlan

pytestmark = [pytest.mark.slow, pytest.mark.ssh]
# Judged on few frames (a 2-core CI box), latency not judged: the two models share its CPU.
SHADOW = {"every_k": 1, "frames": 12, "minutes": 2.0, "min_frames": 8, "min_class_support": 5,
          "max_p95_ratio": None}
PLAN = ShadowPlan(frames=12)




def _fleet(sshd_fleet: Any, names: list[str], services: list[Path], frames: Path
           ) -> tuple[Path, dict[str, Any], dict[str, int]]:
    """Test hosts whose services replay `frames` (the tiny dataset's val images). The tiny model
    is barely trained (its best scores are ~0.002), so conf is 1e-4: it then reports boxes, and a
    candidate's agreement with it means something."""
    hosts = {n: sshd_fleet.start(n) for n in names}
    ports = {n: free_port() for n in names}
    inv = sshd_fleet.inventory({"pis": [(h, {"service": service(ports[n], fps=8.0, source=str(frames)),
                                             "shadow": SHADOW, "conf": 0.0001}) for n, h in hosts.items()]})
    services.extend(h.deploy_dir for h in hosts.values())
    return inv, hosts, ports


def _run(fn: Any, inv: Path, sources: Sources, tmp_path: Path, **kw: Any) -> runner.FleetRun:
    kw.setdefault("log_to_mlflow", False)
    run = fn(load_inventory(inv), group="pis", sources=sources, results_dir=tmp_path / "reports", **kw)
    print(format_table(run.command, run.results, run.wall_s))
    print(json.dumps(run.rollout, indent=1))
    return run


def _staged(inv: Path, sources: Sources, tmp_path: Path, model: str, canary: int = 1, batch: str = "2",
            fail: str = "0", **kw: Any) -> runner.FleetRun:
    return _run(runner.deploy, inv, sources, tmp_path, model=model, bench=False,
                rollout=runner.parse_rollout(str(canary), batch, fail), shadow=PLAN if canary else None, **kw)




def assert_sound(hosts: dict[str, Any], ports: dict[str, int], expect: dict[str, str]) -> None:
    """Every device: `current` is the expected, complete and verified release, and its service runs it."""
    for name, host in hosts.items():
        current = link(host.deploy_dir, "current")
        assert current == expect[name], (name, current, expect[name])
        health = device_health(host.deploy_dir)
        assert health["exit"] == 0 and health["ok"], (name, health.get("problems"))
        doc = wait_for(lambda p=ports[name], c=current: (d := healthz(p)) and d.get("ok") and
                       d.get("release") == c and d, timeout=90, message=f"{name}: service healthy on {current}")
        assert doc["release"] == current


def assert_no_partial_uploads(hosts: dict[str, Any]) -> None:
    """No staged upload is left over (after a rollout that completed: a cut one leaves its
    `.partial` folder for the rerun to continue)."""
    for name, host in hosts.items():
        left = [d.name for d in (host.deploy_dir / "releases").iterdir() if d.name.endswith(".partial")]
        assert not left, (name, left)


def _models_with(fleet_models: dict[str, Any], tmp_path: Path, *tags: str) -> Sources:
    """fleet_models' folder plus same-behaviour variants named `tags` (new bytes to upload)."""
    models = tmp_path / "models"
    shutil.copytree(fleet_models["dir"], models)
    for tag in tags:
        make_variant(models / "yolov8n.onnx", models / f"{tag}.onnx", tag)
    src = fleet_models["sources"]
    return Sources(models_dir=models, samples_dir=src.samples_dir, runtime_root=src.runtime_root)


def test_fab_shadow_judges_the_candidate_beside_current_and_switches_nothing(
        sshd_fleet: Any, fleet_models: dict[str, Any], tmp_path: Path, services: list[Path]) -> None:
    inv, hosts, ports = _fleet(sshd_fleet, ["pi1"], services, fleet_models["sources"].samples_dir)
    sources = fleet_models["sources"]
    first = _run(runner.deploy, inv, sources, tmp_path, model="yolov8n", bench=False).results[0]
    assert first.ok, first.error

    good = _run(runner.shadow, inv, sources, tmp_path, model="alt", plan=PLAN, log_to_mlflow=True)
    r = good.results[0]
    assert r.ok and r.outcome == "shadow-passed", r.error
    sh = r.details["shadow"]
    assert sh["passed"] and sh["metrics"]["shadow_frames_compared"] >= 12
    assert sh["metrics"]["shadow_mean_abs_count_delta"] == 0.0  # same weights, same frames
    report = json.loads(Path(sh["path"]).read_text())
    assert report["kind"] == "shadow" and report["candidate"] == r.release and report["current"] == first.release
    assert report["result"]["status"] == "done" and report["thresholds"]["min_frames"] == 8
    assert_sound(hosts, ports, {"pi1": first.release})  # nothing switched

    from mlflow import MlflowClient

    from pipeline.tracking.mlflow_runs import tracking_uri

    client = MlflowClient(tracking_uri())
    parent = client.get_run(good.mlflow_run_id)
    child = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{good.mlflow_run_id}'")[0]
    assert child.data.metrics["shadow_passed"] == 1.0 and "shadow_frames_compared" in child.data.metrics

    bad = _run(runner.shadow, inv, sources, tmp_path, model="shifted", plan=PLAN).results[0]
    assert not bad.ok and bad.failed_step == "shadow", bad.error
    assert "failed its shadow" in bad.error and "`current` was not changed" in bad.error
    assert not bad.details["shadow"]["passed"] and bad.details["shadow"]["reasons"]
    assert_sound(hosts, ports, {"pi1": first.release})

    # A release the device already runs has nothing to be compared with.
    same = _run(runner.shadow, inv, sources, tmp_path, model="yolov8n", plan=PLAN).results[0]
    assert same.ok and same.details["shadow"]["skipped"]


def test_staged_rollout_stops_rolls_back_and_resumes(sshd_fleet: Any, fleet_models: dict[str, Any], tmp_path: Path,
                                                     services: list[Path]) -> None:
    inv, hosts, ports = _fleet(sshd_fleet, ["c1", "b1", "b2", "b3"], services,
                               fleet_models["sources"].samples_dir)
    sources = fleet_models["sources"]
    first = {r.host: r for r in _run(runner.deploy, inv, sources, tmp_path, model="yolov8n", bench=False).results}
    assert all(r.ok for r in first.values()), [r.error for r in first.values()]
    old = {n: first[n].release for n in hosts}

    # 1. The canary's candidate disagrees with current in shadow: nothing switches, nobody else is touched.
    run = _staged(inv, sources, tmp_path, "shifted")
    res = {r.host: r for r in run.results}
    assert run.rollout["stopped"] and run.rollout["stopped_at"] == "canary" and run.rollout["by"] == ["c1"]
    assert "failed its shadow" in run.rollout["why"]["c1"]
    assert [res[n].outcome for n in ("b1", "b2", "b3")] == ["not-reached"] * 3
    assert_sound(hosts, ports, old)

    # 2. The canary is unreachable: an unreachable host is a failed host.
    kill_sshd(hosts["c1"])
    run = _staged(inv, sources, tmp_path, "alt")
    assert run.rollout["stopped_at"] == "canary" and "[connect]" in run.rollout["why"]["c1"]
    assert run.rollout["not_reached"] == ["b1", "b2", "b3"]
    restart_sshd(hosts["c1"])
    assert_sound(hosts, ports, old)

    # 3. Batch 1 (b1, b2) goes over its budget (0 %): b2 is unreachable, b1 had switched and is
    # rolled back, b3 is not reached, and the registry alias does not move.
    kill_sshd(hosts["b2"])
    run = _staged(inv, sources, tmp_path, "alt", log_to_mlflow=True)
    res = {r.host: r for r in run.results}
    assert run.rollout["stopped_at"] == "batch 1" and run.rollout["by"] == ["b2"]
    assert run.rollout["rolled_back"] == ["b1"] and res["b1"].outcome == "rolled-back"
    assert res["b1"].details["rollback"]["ok"] and res["b3"].outcome == "not-reached"
    assert res["c1"].ok and res["c1"].outcome == "deployed" and res["c1"].details["shadow"]["passed"]
    assert all(v.startswith("not moved") for v in run.registry.values()), run.registry
    new = res["c1"].release
    restart_sshd(hosts["b2"])
    assert_sound(hosts, ports, {**old, "c1": new})

    # 4. The rerun resumes: the canary is already on the release, the batches go on.
    run = _staged(inv, sources, tmp_path, "alt", log_to_mlflow=True)
    res = {r.host: r for r in run.results}
    assert not run.rollout["stopped"], run.rollout
    assert res["c1"].outcome == "already-current" and run.rollout["already_current"] == ["c1"]
    assert [res[n].outcome for n in ("b1", "b2", "b3")] == ["deployed"] * 3
    assert [s["stage"] for s in run.rollout["stages"]] == ["batch 1", "batch 2"]
    assert list(run.registry.values()) and all(v.isdigit() for v in run.registry.values()), run.registry
    assert_sound(hosts, ports, {n: new for n in hosts})

    # The budget is Ansible's: failures must EXCEED it. 1 of 2 failed = 50 %, allowed by 50.
    sources2 = _models_with(fleet_models, tmp_path, "alt2")
    kill_sshd(hosts["b1"])
    run = _staged(inv, sources2, tmp_path, "alt2", canary=0, batch="2", fail="50")
    res = {r.host: r for r in run.results}
    assert not run.rollout["stopped"] and not res["b1"].ok and res["c1"].ok and res["b2"].ok and res["b3"].ok
    restart_sshd(hosts["b1"])
    again = _staged(inv, sources2, tmp_path, "alt2", canary=0, batch="2", fail="50")
    assert all(r.ok for r in again.results) and {r.host: r.outcome for r in again.results}["b1"] == "deployed"
    assert_sound(hosts, ports, {n: again.results[0].release for n in hosts})


def test_rollout_faults_link_cut_truncated_upload_and_service_killed(
        sshd_fleet: Any, fleet_models: dict[str, Any], tmp_path: Path, services: list[Path]) -> None:
    inv, hosts, ports = _fleet(sshd_fleet, ["c1", "b1", "b2"], services, fleet_models["sources"].samples_dir)
    sources = _models_with(fleet_models, tmp_path, "cut", "short", "kill")
    first = _run(runner.deploy, inv, sources, tmp_path, model="yolov8n", bench=False)
    assert all(r.ok for r in first.results)
    expect = {r.host: r.release for r in first.results}

    # 1. The link to b2 is cut in the middle of its model upload (sshd dies with every session).
    sent = [0]

    def cut(host: str, n: int) -> None:
        sent[0] += n if host == "b2" else 0
        if sent[0] > 300_000 and hosts["b2"].proc is not None:
            kill_sshd(hosts["b2"])

    connection.add_progress_hook(cut)
    try:
        run = _staged(inv, sources, tmp_path, "cut", batch="2")
    finally:
        connection.remove_progress_hook(cut)
    res = {r.host: r for r in run.results}
    assert hosts["b2"].proc is None, "the upload was smaller than the cut threshold"
    assert run.rollout["stopped_at"] == "batch 1" and run.rollout["by"] == ["b2"] and res["b2"].failed_step == "push"
    assert run.rollout["rolled_back"] == ["b1"]
    restart_sshd(hosts["b2"])
    assert_sound(hosts, ports, {**expect, "c1": res["c1"].release})
    run = _staged(inv, sources, tmp_path, "cut", batch="2")
    assert not run.rollout["stopped"] and all(r.ok for r in run.results), run.rollout
    expect = {r.host: r.release for r in run.results}
    assert_sound(hosts, ports, expect)
    assert_no_partial_uploads(hosts)

    # 2. A truncated upload: b1's model arrives short. The device's verification refuses it.
    upload = steps.upload_bundle

    def truncating(conn: Any, host: Any, kind: str, bundle: Any, *args: Any, **kwargs: Any) -> Any:
        if host.name == "b1":
            put = conn.put

            def short_put(local: str, remote: str) -> Any:
                if local.endswith(".onnx"):
                    short = tmp_path / "short.onnx"
                    short.write_bytes(Path(local).read_bytes()[:100_000])
                    local = str(short)
                return put(local, remote)

            conn.put = short_put
        return upload(conn, host, kind, bundle, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(steps, "upload_bundle", truncating)
        run = _staged(inv, sources, tmp_path, "short", batch="2")
    res = {r.host: r for r in run.results}
    assert run.rollout["by"] == ["b1"] and res["b1"].failed_step == "verify", res["b1"].error
    assert "upload verification failed" in res["b1"].error
    assert res["b2"].outcome in ("rolled-back", "failed"), res["b2"].outcome  # its batch stopped
    assert_sound(hosts, ports, {**expect, "c1": res["c1"].release})
    run = _staged(inv, sources, tmp_path, "short", batch="2")
    assert not run.rollout["stopped"] and all(r.ok for r in run.results), run.rollout
    expect = {r.host: r.release for r in run.results}
    assert_sound(hosts, ports, expect)

    # 3. SIGKILL of b1's service while the device switches to the new release.
    activate = steps.activate

    def kill_service_at_switch(conn: Any, host: Any, deploy_dir: str, runtime: str, release: str,
                               *args: Any, **kwargs: Any) -> Any:
        if host.name == "b1":
            def killer() -> None:
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline and link(hosts["b1"].deploy_dir, "current") != release:
                    time.sleep(0.01)
                state = json.loads((hosts["b1"].deploy_dir / "service" / "supervisor.json").read_text())
                if state.get("child_pid"):
                    os.kill(int(state["child_pid"]), signal.SIGKILL)
            threading.Thread(target=killer, daemon=True).start()
        return activate(conn, host, deploy_dir, runtime, release, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(steps, "activate", kill_service_at_switch)
        run = _staged(inv, sources, tmp_path, "kill", batch="2")
    res = {r.host: r for r in run.results}
    # Whatever the kill hit (the old service, or the new one starting), the device converges:
    # either b1 is healthy on the new release, or it went back to the old one and the rollout stopped.
    after = {n: link(h.deploy_dir, "current") for n, h in hosts.items()}
    assert after["b1"] in (expect["b1"], res["b1"].release)
    assert_sound(hosts, ports, after)
    run = _staged(inv, sources, tmp_path, "kill", batch="2")
    assert not run.rollout["stopped"] and all(r.ok for r in run.results), run.rollout
    assert_sound(hosts, ports, {r.host: r.release for r in run.results})
    assert_no_partial_uploads(hosts)
