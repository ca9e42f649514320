"""Model registry and lineage of deploys: real deploys (local-kind hosts, no SSH), real MLflow.

A version per model sha256 (reused by later deploys of the same bytes), an alias per group that a
whole-group successful deploy moves and a failed or partial one does not, and the walk from a
device run back to the run that produced its model.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.fleet import runner
from pipeline.fleet.inventory import load_inventory
from pipeline.fleet.registry import REGISTERED_MODEL, group_aliases
from pipeline.fleet.results import HostResult

pytestmark = pytest.mark.slow  # deploys the tiny YOLOv8n built by the session fixture


def _inventory(tmp_path: Path) -> Path:
    """Two groups of local-kind hosts (this machine, no SSH), FP32 ONNX Runtime."""
    host_defaults = {"kind": "local", "arch": "x86_64", "runtime": "onnxruntime", "precision": "int8",
                     "user": "local", "python": sys.executable, "ort_threads": 1}
    doc = {
        "settings": {"concurrency": 4, "known_hosts": str(tmp_path / "known_hosts"), "connect_timeout_s": 5},
        "defaults": {"port": 22, "agent": False, "accept_new_host_key": False, "thermal_throttle_c": 80.0,
                     "thermal_resume_c": 70.0, "bench_warmup": 1, "bench_iterations": 2, "conf": 0.25,
                     "iou": 0.45, "max_det": 100},
        "groups": {
            "line-a": {"defaults": host_defaults, "hosts": {
                "a1": {"deploy_dir": str(tmp_path / "a1")}, "a2": {"deploy_dir": str(tmp_path / "a2")}}},
            "line-b": {"defaults": host_defaults, "hosts": {"b1": {"deploy_dir": str(tmp_path / "b1")}}},
        },
    }
    path = tmp_path / "inventory.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _deploy(inv: Path, fleet_models: dict[str, Any], tmp_path: Path, **kw: Any) -> runner.FleetRun:
    return runner.deploy(load_inventory(inv), sources=fleet_models["sources"], results_dir=tmp_path / "reports",
                         bench=False, log_to_mlflow=True, **kw)


def test_registry_versions_aliases_and_lineage(fleet_models: dict[str, Any], tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from pipeline.tracking.mlflow_runs import (
        lineage_tags,
        log_artifact,
        set_tags,
        stage_run,
        tracking_uri,
        walk_lineage,
    )

    models = fleet_models["dir"]
    int8 = models / "yolov8n.int8.onnx"
    # What the quantize stage does: tag its outputs' sha256 and log the model files.
    with stage_run("quantize", tags=lineage_tags(onnx=models / "yolov8n.onnx")) as producer:
        set_tags(lineage_tags(int8=int8))
        log_artifact(int8, "models/int8")
    client = MlflowClient(tracking_uri())
    name = REGISTERED_MODEL
    inv = _inventory(tmp_path)

    first = _deploy(inv, fleet_models, tmp_path, group="line-a")
    assert all(r.ok for r in first.results), [r.error for r in first.results]
    assert first.registry == {"line-a": "1"}
    v1 = client.get_model_version_by_alias(name, "line-a")
    assert str(v1.version) == "1" and v1.run_id == producer.info.run_id  # the registry links to the producer
    assert v1.tags["model_sha256"] == first.results[0].details["model_sha256"]
    assert v1.source.endswith("/models/int8") and producer.info.run_id in v1.source
    # What a group runs is one download away: models:/<name>@<group>.
    import mlflow

    got = Path(mlflow.artifacts.download_artifacts(f"models:/{name}@line-a", dst_path=str(tmp_path / "dl")))
    assert (got / "yolov8n.int8.onnx").read_bytes() == int8.read_bytes()

    # Same bytes to another group: same version, a second alias.
    second = _deploy(inv, fleet_models, tmp_path, group="line-b")
    assert second.registry == {"line-b": "1"}
    assert {str(v.version) for v in client.search_model_versions(f"name = '{name}'")} == {"1"}

    # A different variant (no pipeline run logged it): a new version kept with the deploy run; line-a moves.
    alt = _deploy(inv, fleet_models, tmp_path, group="line-a", model="alt")
    assert alt.registry == {"line-a": "2"}
    v2 = client.get_model_version_by_alias(name, "line-a")
    assert v2.run_id == alt.mlflow_run_id and v2.tags["model_file"] == "alt.int8.onnx" and v2.tags["model"] == "alt"
    assert str(client.get_model_version_by_alias(name, "line-b").version) == "1"

    # A deploy where one host fails its health check leaves the alias where it was.
    broken = models / "broken.int8.onnx"
    broken.write_bytes(b"not an onnx model")
    try:
        bad = _deploy(inv, fleet_models, tmp_path, group="line-a", model="broken")
    finally:
        broken.unlink()
    assert not any(r.ok for r in bad.results)
    assert bad.registry["line-a"].startswith("not moved: 2 host(s)")
    assert str(client.get_model_version_by_alias(name, "line-a").version) == "2"
    assert client.get_run(bad.mlflow_run_id).data.tags["registry.line-a"].startswith("not moved")

    # A single-host deploy never moves the group's alias.
    one = _deploy(inv, fleet_models, tmp_path, group="line-a", host="a1")
    assert one.registry == {} and str(client.get_model_version_by_alias(name, "line-a").version) == "2"

    # From a device run back to the producing run, through the lineage tags.
    device = client.search_runs([producer.info.experiment_id],
                                f"tags.mlflow.parentRunId = '{first.mlflow_run_id}' and tags.device = 'a1'")[0]
    assert device.data.tags["int8_sha256"] == device.data.tags["model_sha256"]
    assert device.data.tags["onnx_sha256"] == producer.data.tags["onnx_sha256"]
    chain = walk_lineage(device.info.run_id, client)
    assert [c["stage"] for c in chain][:2] == ["deploy-device", "quantize"]
    assert chain[1]["run_id"] == producer.info.run_id


def test_group_aliases_mixed_runtimes() -> None:
    """A group whose hosts run different files gets one alias per runtime and precision."""
    from pipeline.fleet.inventory import Host

    def host(name: str, runtime: str, precision: str) -> Host:
        return Host(name=name, group="g", kind="pi", address="127.0.0.1", port=22, user="u", key=None, agent=True,
                    accept_new_host_key=False, arch="x86_64", runtime=runtime, precision=precision,
                    deploy_dir="/d", python="python3", ort_threads=1, thermal_throttle_c=80.0,
                    thermal_resume_c=70.0, trt_workspace_mb=None, frames_dir="", bench_warmup=1,
                    bench_iterations=1, conf=0.25, iou=0.45, max_det=100)

    hosts = {"p": host("p", "onnxruntime", "int8"), "j": host("j", "tensorrt", "fp16")}
    results = [HostResult("p", "g", outcome="deployed", details={"model_sha256": "a" * 64}),
               HostResult("j", "g", outcome="deployed", details={"model_sha256": "b" * 64})]
    aliases, reason = group_aliases(results, hosts, "g")
    assert reason == "" and {k: v[0][0] for k, v in aliases.items()} == {"g-onnxruntime-int8": "a",
                                                                       "g-tensorrt-fp16": "b"}
    results[1].error, results[1].outcome = "health failed", "failed"
    assert group_aliases(results, hosts, "g") == ({}, "not moved: 1 host(s) of 'g' did not go live (j)")


def test_soak_benchmark_feeds_the_report_thermal_timeline(fleet_models: dict[str, Any], tmp_path: Path) -> None:
    """`fab benchmark --soak-minutes`: the device reports time windows; the report draws them."""
    from pipeline.stages.report import device_rows, latest_device_results, thermal_rows

    inv = _inventory(tmp_path)
    assert all(r.ok for r in _deploy(inv, fleet_models, tmp_path, group="line-b").results)
    with pytest.raises(ValueError, match="--soak-minutes must be > 0"):
        runner.benchmark(load_inventory(inv), group="line-b", soak_minutes=0)
    run = runner.benchmark(load_inventory(inv), group="line-b", results_dir=tmp_path / "reports",
                           soak_minutes=0.05)  # 3 s: ten 0.3 s windows
    (r,) = run.results
    assert r.ok, r.error
    windows = r.bench["soak"]["windows"]
    assert len(windows) == 10 and all(w["iterations"] > 0 and w["p50_ms"] > 0 for w in windows)
    rows = thermal_rows(device_rows(latest_device_results(tmp_path / "reports"), {}))
    assert [t["host"] for t in rows] == ["b1"] * 10 and rows[-1]["t_end_s"] == pytest.approx(3.0, abs=0.2)
