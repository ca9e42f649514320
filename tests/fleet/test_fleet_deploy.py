"""Deploys against real OpenSSH test hosts (and the local group), with the real device CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fleet_hosts import device_health, link
from support import free_port

from edge_runtime.supervisor import stop_supervisor
from pipeline.fleet import runner
from pipeline.fleet.inventory import load_inventory
from pipeline.fleet.results import FleetError, format_table, raise_for_failures

pytestmark = pytest.mark.slow  # every test deploys the tiny YOLOv8n (built once, ~30 s)
REPO = Path(__file__).resolve().parents[2]




def _by_host(run: runner.FleetRun) -> dict[str, Any]:
    return {r.host: r for r in run.results}


def _deploy(inv: Path, fleet_models: dict[str, Any], tmp_path: Path, **kw: Any) -> runner.FleetRun:
    kw.setdefault("log_to_mlflow", False)
    run = runner.deploy(load_inventory(inv), sources=fleet_models["sources"], results_dir=tmp_path / "reports", **kw)
    print(format_table(run.command, run.results, run.wall_s))
    return run




@pytest.mark.ssh
def test_first_deploy_redeploy_down_host_jetson_and_mlflow(sshd_fleet: Any, fleet_models: dict[str, Any],
                                                          tmp_path: Path) -> None:
    pi1, pi2 = sshd_fleet.start("pi1"), sshd_fleet.start("pi2")
    jet = sshd_fleet.start("jetson1")
    down = sshd_fleet.down_host("pi-down")
    inv = sshd_fleet.inventory({"pis": [(pi1, {}), (pi2, {}), (down, {})], "jetsons": [(jet, {})]})

    from edge_runtime.fileio import sha256_file
    from pipeline.tracking.mlflow_runs import stage_run

    with stage_run("export", tags={"model_sha256": sha256_file(fleet_models["dir"] / "yolov8n.onnx")}) as producer:
        pass  # stands in for the pipeline run that exported the model (lineage link)
    run = _deploy(inv, fleet_models, tmp_path, group="pis", log_to_mlflow=True)
    res = _by_host(run)
    assert res["pi1"].details["source_run_id"] == producer.info.run_id
    assert res["pi1"].outcome == res["pi2"].outcome == "deployed"
    assert res["pi1"].model_bytes_sent == (fleet_models["dir"] / "yolov8n.onnx").stat().st_size
    for h in (pi1, pi2):
        assert link(h.deploy_dir, "current") == res[h.name].release and link(h.deploy_dir, "previous") is None
        assert device_health(h.deploy_dir)["ok"]
        assert Path(res[h.name].bench_path).is_file() and res[h.name].bench["fps"] > 0
    # A host that is down fails alone, with a message that says what to check.
    assert not res["pi-down"].ok and res["pi-down"].failed_step == "connect"
    assert "cannot connect" in res["pi-down"].error
    with pytest.raises(FleetError, match="1 of 3 host"):
        raise_for_failures("deploy", run.results)

    # MLflow: one parent run, one nested run per device with comparable tags and metrics.
    from mlflow import MlflowClient

    from pipeline.tracking.mlflow_runs import tracking_uri

    client = MlflowClient(tracking_uri())
    parent = client.get_run(run.mlflow_run_id)
    assert parent.data.tags["stage"] == "deploy" and parent.data.metrics["hosts_failed"] == 1
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{run.mlflow_run_id}'")
    by_name = {c.data.tags["device"]: c for c in children}
    assert set(by_name) == {"pi1", "pi2", "pi-down"}
    ok = by_name["pi1"].data
    for tag in ("group", "kind", "arch", "runtime", "precision", "model_sha256", "engine_key", "ort_version"):
        assert tag in ok.tags, tag
    assert ok.tags["model_sha256"] == res["pi1"].details["model_sha256"]
    assert ok.tags["source_run_id"] == producer.info.run_id
    for metric in ("latency_p50_ms", "latency_p95_ms", "latency_p99_ms", "fps", "peak_rss_mb"):
        assert metric in ok.metrics, metric
    assert client.list_artifacts(by_name["pi1"].info.run_id, "bench")
    assert by_name["pi-down"].info.status == "FAILED"
    secret = sshd_fleet.user_key.read_text().splitlines()[1]
    for tags in (c.data.tags for c in children):  # no key material, no key paths
        assert not any(str(sshd_fleet.user_key) in v or secret in v for v in tags.values())

    # Redeploy: nothing changed, so zero model bytes (and zero bytes at all) cross the network.
    again = _by_host(_deploy(inv, fleet_models, tmp_path, group="pis", host="pi1"))
    assert again["pi1"].outcome == "unchanged" and again["pi1"].bytes_sent == 0
    assert again["pi1"].release == res["pi1"].release

    # A new model: only the new model file moves; the old release becomes `previous`.
    new = _by_host(_deploy(inv, fleet_models, tmp_path, group="pis", host="pi1", model="alt"))["pi1"]
    assert new.outcome == "deployed" and new.previous == res["pi1"].release
    assert link(pi1.deploy_dir, "previous") == res["pi1"].release
    assert not any("runtime/" in f for f in new.files_sent)  # same runtime code: reused

    # Jetson: the TensorRT step runs on the device and fails clearly here (no TensorRT); current untouched.
    j = _by_host(_deploy(inv, fleet_models, tmp_path, group="jetsons"))["jetson1"]
    assert j.failed_step == "engine" and "TensorRT not available" in j.error
    assert link(jet.deploy_dir, "current") is None
    assert (jet.deploy_dir / "releases" / j.release / "manifest.json").is_file()


@pytest.mark.ssh
def test_failing_health_check_keeps_previous_and_rollback(sshd_fleet: Any, fleet_models: dict[str, Any],
                                                          tmp_path: Path) -> None:
    pi = sshd_fleet.start("pi1")
    inv = sshd_fleet.inventory({"pis": [(pi, {})]})
    first = _by_host(_deploy(inv, fleet_models, tmp_path, group="pis", bench=False))["pi1"]
    second = _by_host(_deploy(inv, fleet_models, tmp_path, group="pis", model="alt", bench=False))["pi1"]
    assert second.outcome == "deployed"

    bad = _by_host(_deploy(inv, fleet_models, tmp_path, group="pis", model="broken", bench=False))["pi1"]
    assert not bad.ok and bad.failed_step == "health" and "current release left unchanged" in bad.error
    assert link(pi.deploy_dir, "current") == second.release
    assert link(pi.deploy_dir, "previous") == first.release

    rb = _by_host(runner.rollback(load_inventory(inv), group="pis"))["pi1"]
    assert rb.outcome == "rolled-back" and rb.release == first.release
    assert link(pi.deploy_dir, "current") == first.release
    assert link(pi.deploy_dir, "previous") == second.release
    assert device_health(pi.deploy_dir)["ok"]

    st = _by_host(runner.status(load_inventory(inv), group="pis"))["pi1"]
    assert st.release == first.release and st.previous == second.release


KILLER = """
import json, os, signal, sys
sys.path.insert(0, {repo!r})
from pathlib import Path
from pipeline.fleet import connection, runner
from pipeline.fleet.artifacts import Sources
from pipeline.fleet.inventory import load_inventory
sent = [0]
def kill_mid_transfer(host, n):
    sent[0] += n
    if sent[0] > {limit}:
        os.kill(os.getpid(), signal.SIGKILL)  # like a power cut / ^C -9 in the middle of the model upload
connection.add_progress_hook(kill_mid_transfer)
s = json.loads({sources!r})
runner.deploy(load_inventory({inv!r}), group="pis", model="alt", log_to_mlflow=False, bench=False,
              sources=Sources(Path(s[0]), Path(s[1]), Path(s[2])), results_dir=Path({reports!r}))
"""


@pytest.mark.ssh
def test_deploy_killed_mid_transfer(sshd_fleet: Any, fleet_models: dict[str, Any], tmp_path: Path) -> None:
    pi = sshd_fleet.start("pi1")
    inv = sshd_fleet.inventory({"pis": [(pi, {})]})
    first = _by_host(_deploy(inv, fleet_models, tmp_path, group="pis", bench=False))["pi1"]
    src = fleet_models["sources"]
    script = KILLER.format(repo=str(REPO), limit=1_000_000, inv=str(inv), reports=str(tmp_path / "reports"),
                           sources=json.dumps([str(src.models_dir), str(src.samples_dir), str(src.runtime_root)]))
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert p.returncode == -9, p.stderr
    partial = [d for d in (pi.deploy_dir / "releases").iterdir() if d.name.endswith(".partial")]
    assert partial, "the kill should have left a staged, unpublished release"
    assert link(pi.deploy_dir, "current") == first.release
    assert device_health(pi.deploy_dir)["ok"]  # the device still runs the previous release, intact

    done = _by_host(_deploy(inv, fleet_models, tmp_path, group="pis", model="alt", bench=False))["pi1"]
    assert done.outcome == "deployed" and link(pi.deploy_dir, "current") == done.release
    assert not any(d.name.endswith(".partial") for d in (pi.deploy_dir / "releases").iterdir())
    assert device_health(pi.deploy_dir)["ok"]


@pytest.mark.ssh
def test_unknown_host_key_refused_unless_opted_in(sshd_fleet: Any, fleet_models: dict[str, Any],
                                                  tmp_path: Path) -> None:
    stranger = sshd_fleet.start("stranger", trust=False)
    inv = sshd_fleet.inventory({"pis": [(stranger, {})]})
    r = _by_host(_deploy(inv, fleet_models, tmp_path, group="pis", bench=False))["stranger"]
    assert r.failed_step == "connect" and "unknown host key" in r.error
    assert not (stranger.deploy_dir / "releases").exists()  # nothing happened on the device

    # A different key recorded for that address: refused even with the opt-in.
    other = sshd_fleet.start("other", trust=False)
    sshd_fleet.known_hosts.write_text(f"[{stranger.address}]:{stranger.port} {other.host_pub}\n")
    inv = sshd_fleet.inventory({"pis": [(stranger, {"accept_new_host_key": True})]})
    r = _by_host(_deploy(inv, fleet_models, tmp_path, group="pis", bench=False))["stranger"]
    assert r.failed_step == "connect" and "host key CHANGED" in r.error

    # Opt-in per host: accepted on first contact and recorded in known_hosts.
    sshd_fleet.known_hosts.write_text("")
    r = _by_host(_deploy(inv, fleet_models, tmp_path, group="pis", bench=False))["stranger"]
    assert r.ok, r.error
    assert stranger.host_pub in sshd_fleet.known_hosts.read_text()


@pytest.mark.ssh
def test_collect_frames_round_trip(sshd_fleet: Any, tmp_path: Path) -> None:
    import cv2
    import numpy as np

    from edge_runtime.detector import StageTimes
    from edge_runtime.frame_keeper import FrameKeeper
    from edge_runtime.postprocess import Detections
    from edge_runtime.realtime import Frame, Result
    from pipeline.stages.camera import ingest_frames

    pi = sshd_fleet.start("pi1")
    inv = sshd_fleet.inventory({"pis": [(pi, {})]})
    frames = pi.deploy_dir / "frames"  # what the device's camera capture writes (no CSI camera here)
    frames.mkdir()
    rng = np.random.default_rng(0)
    images = [np.clip(rng.normal(120 + 10 * i, 15, (96, 128, 3)), 0, 255).astype(np.uint8) for i in range(5)]
    for i in range(2):  # a plain capture's frames: no sidecar
        cv2.imwrite(str(frames / f"frame_{i:03d}.jpg"), images[i])
        os.utime(frames / f"frame_{i:03d}.jpg", (1_000_000 + i, 1_000_000 + i))
    # The service's FrameKeeper: frames with JSON sidecars (periodic, every 1 s of the injected clock).
    clock = [1_714_564_984.0]
    keeper = FrameKeeper(frames, every_s=1, band=None, release="abc123def456", class_names=["scratch"],
                         clock=lambda: clock[0])
    det = Detections(np.array([[5.0, 6.0, 40.0, 50.0]], np.float32), np.array([0.8], np.float32), np.zeros(1, np.int64))
    for i in range(2, 5):
        clock[0] += 1
        keeper(Result(Frame(i, images[i], 0.0, 0.0), det, "int8", 0.0, 0.0, StageTimes(0.0, 0.0, 0.0)))
    kept = keeper.stored()
    assert len(kept) == 5 and kept[:2] == ["frame_000.jpg", "frame_001.jpg"]
    for i, name in enumerate(kept[2:], start=2):  # device mtimes in capture order, newest last
        for f in (frames / name, (frames / name).with_suffix(".json")):
            os.utime(f, (1_000_000 + i, 1_000_000 + i))

    dest, meta = tmp_path / "camera", tmp_path / "camera-meta"
    r = _by_host(runner.collect_frames(load_inventory(inv), group="pis", count=4, camera_dir=dest))["pi1"]
    assert r.ok, r.error
    got = sorted(p.name for p in (dest / "pi1").iterdir())
    assert got == sorted(kept[1:])  # the newest four: one plain frame and three with sidecars; images only
    for name in got:
        assert (dest / "pi1" / name).read_bytes() == (frames / name).read_bytes()
    sidecars = sorted(p.name for p in (meta / "pi1").iterdir())  # meta_dir defaults to camera_dir's sibling
    assert sidecars == sorted(Path(n).with_suffix(".json").name for n in kept[2:])
    for name in sidecars:
        assert (meta / "pi1" / name).read_bytes() == (frames / name).read_bytes()
        doc = json.loads((meta / "pi1" / name).read_text())
        assert doc["release"] == "abc123def456" and doc["image"] == Path(name).with_suffix(".jpg").name
        assert doc["detections"][0]["name"] == "scratch"
    assert r.details["frames"] == 4 and r.details["sidecars"] == 3
    again = _by_host(runner.collect_frames(load_inventory(inv), group="pis", count=4, camera_dir=dest))["pi1"]
    assert again.bytes_sent == 0  # already here (frames and sidecars), verified by sha256

    # The camera stage's ingest accepts what was pulled: data/camera/<host>/ holds images only.
    stats = ingest_frames(dest, tmp_path / "camera_frames", video_fps=1.0)
    assert stats["pi1"].frames == 4 and (stats["pi1"].width, stats["pi1"].height) == (128, 96)


def test_local_group_without_ssh(fleet_models: dict[str, Any], tmp_path: Path) -> None:
    import yaml

    doc = yaml.safe_load((REPO / "inventory.yaml").read_text())
    local = doc["groups"]["local"]
    local["defaults"].update(deploy_dir=str(tmp_path / "device"), python=sys.executable, bench_iterations=3,
                             bench_warmup=1, ort_threads=1)
    local["defaults"]["service"]["http_port"] = free_port()  # not the committed port a user's service may hold
    doc["groups"] = {"local": local}
    (tmp_path / "inventory.yaml").write_text(yaml.safe_dump(doc))
    try:
        _local_group_deploys(tmp_path, fleet_models)
    finally:
        stop_supervisor(tmp_path / "device")  # the deploy started the local service


def _local_group_deploys(tmp_path: Path, fleet_models: dict[str, Any]) -> None:
    run = _deploy(tmp_path / "inventory.yaml", fleet_models, tmp_path, group="local")
    (r,) = run.results
    assert r.ok and r.outcome == "deployed", r.error
    assert link(tmp_path / "device", "current") == r.release
    assert r.bench["fps"] > 0
    assert _by_host(_deploy(tmp_path / "inventory.yaml", fleet_models, tmp_path, group="local",
                            bench=False))[r.host].bytes_sent == 0
    dry = _by_host(_deploy(tmp_path / "inventory.yaml", fleet_models, tmp_path, group="local", model="alt",
                           dry_run=True))[r.host]
    assert dry.outcome == "dry-run" and dry.model_bytes_sent > 0
    assert link(tmp_path / "device", "current") == r.release  # dry run changed nothing
