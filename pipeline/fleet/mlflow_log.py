"""MLflow for fleet commands: one run per `fab deploy`/`fab benchmark`, one nested run per device.

Every device run carries the same tag and metric names (device, group, kind, arch, runtime,
precision, model_sha256, engine key, runtime versions; latency_p50_ms, fps, ...), so the MLflow
compare view lines devices up side by side. Nothing secret is logged: no users, addresses or
key paths, only the descriptive fields of the inventory (Host.public_tags).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Mapping

from pipeline.fleet.inventory import Host
from pipeline.fleet.results import HostResult, bench_metrics

STAGE_TAG = {"deploy": "deploy", "benchmark": "fleet-benchmark", "shadow": "shadow"}


def _versions(doc: Mapping[str, Any]) -> dict[str, str]:
    """onnxruntime / TensorRT versions from a device description, wherever the runtime put them."""
    found: dict[str, str] = {}

    def walk(node: Any, path: str) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, f"{path}.{k}" if path else str(k))
        elif isinstance(node, str) and path:
            low = path.lower()
            if "onnxruntime" in low and "ort_version" not in found and "provider" not in low:
                found["ort_version"] = node
            if ("tensorrt" in low or low.endswith("trt_version")) and "trt_version" not in found:
                found["trt_version"] = node

    walk(doc, "")
    return found


def lineage_device_tags(source: Mapping[str, Any]) -> dict[str, str]:
    """The producing pipeline run's lineage (from the release manifest) as device-run tags.

    The sha256 tags keep their names, so `pipeline.tools.lineage` links a device run to the stage
    runs; the producer's commit and params hash get a `pipeline_` prefix (the deploy run has
    its own `git_commit`: the workstation's checkout at deploy time).
    """
    from pipeline.tracking.mlflow_runs import LINEAGE_PRODUCERS

    tags = {k: str(v) for k, v in source.items() if k in LINEAGE_PRODUCERS and v}
    for key in ("git_commit", "params_hash", "pipeline_run", "source_stage", "model_file"):
        if source.get(key):
            tags[key if key.startswith(("pipeline_", "source_", "model_")) else f"pipeline_{key}"] = str(source[key])
    return tags


def host_tags(host: Host, r: HostResult) -> dict[str, str]:
    """The comparable tag set of one device run."""
    tags = {**host.public_tags(), "outcome": r.outcome, "release": r.release, "runtime_code": r.runtime,
            "rollout_stage": str(r.details.get("stage", "")),
            "model_sha256": str(r.details.get("model_sha256", "")),
            "engine_key": str(r.engine.get("key", "")), "engine_sha256": str(r.engine.get("sha256", "")),
            "engine_reused": str(r.engine.get("reused", "")),
            "source_run_id": str(r.details.get("source_run_id", ""))}
    tags.update(lineage_device_tags(r.details.get("lineage") or {}))
    tags.update(_versions(r.bench.get("device", {}) if r.bench else {}))
    if r.error:
        tags["error"] = f"[{r.failed_step}] {r.error}"[:4900]
    return tags


def _metrics(r: HostResult) -> dict[str, float]:
    out = {f"time_{k}_s": v for k, v in r.timings.items()}
    out.update(bytes_sent=float(r.bytes_sent), model_bytes_sent=float(r.model_bytes_sent))
    if r.bench:
        out.update(bench_metrics(r.bench))
    if isinstance(r.health.get("latency_ms"), (int, float)):
        out["health_latency_ms"] = float(r.health["latency_ms"])
    shadow = r.details.get("shadow") or {}
    out.update(shadow.get("metrics") or {})
    if "passed" in shadow:
        out["shadow_passed"] = float(bool(shadow["passed"]))
    return {k: v for k, v in out.items() if math.isfinite(v)}


def log_fleet_run(run: Any, hosts: Mapping[str, Host], models_dir: Path | None = None) -> str:
    """Log a FleetRun: a parent run with fleet totals, a nested run per device. Returns the parent id.

    A deploy also registers the deployed models and moves the group's registry alias
    (`registry.register_deploy`); what moved lands in `run.registry` and the parent's tags.
    """
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    from pipeline.tracking.mlflow_runs import experiment_id, git_commit, sanitize_metric_name, tracking_uri

    exp = experiment_id()
    client = MlflowClient(tracking_uri())
    now = int(time.time() * 1000)
    failed = [r for r in run.results if not r.ok]
    parent = client.create_run(exp, run_name=f"{run.command} {run.options.get('group') or run.options.get('host')}",
                               tags={"stage": STAGE_TAG.get(run.command, run.command), "git_commit": git_commit(),
                                     "fleet_command": run.command})
    pid = parent.info.run_id
    rollout = getattr(run, "rollout", None) or {}
    if rollout.get("stopped"):
        client.set_tag(pid, "rollout_stopped", f"{rollout.get('stopped_at')}: {', '.join(rollout.get('by') or [])}")
    client.log_batch(pid, params=[Param(k, str(v)) for k, v in sorted(run.options.items())],
                     metrics=[Metric(k, float(v), now, 0) for k, v in {
                         "hosts": len(run.results), "hosts_ok": len(run.results) - len(failed),
                         "hosts_failed": len(failed), "wall_s": run.wall_s,
                         "bytes_sent": sum(r.bytes_sent for r in run.results),
                         "model_bytes_sent": sum(r.model_bytes_sent for r in run.results)}.items()])
    for r in run.results:
        host = hosts[r.host]
        child = client.create_run(exp, run_name=r.host,
                                  tags={"mlflow.parentRunId": pid, "stage": f"{STAGE_TAG.get(run.command)}-device",
                                        **host_tags(host, r)})
        cid = child.info.run_id
        metrics = {sanitize_metric_name(k): v for k, v in _metrics(r).items()}
        client.log_batch(cid, metrics=[Metric(k, v, now, 0) for k, v in sorted(metrics.items())],
                         tags=[RunTag("mlflow.note.content", _note(r))])
        if r.bench_path and Path(r.bench_path).is_file():
            client.log_artifact(cid, r.bench_path, artifact_path="bench")
        shadow_path = (r.details.get("shadow") or {}).get("path")
        if shadow_path and Path(shadow_path).is_file():
            client.log_artifact(cid, shadow_path, artifact_path="shadow")
        client.set_terminated(cid, "FINISHED" if r.ok else "FAILED")
    if run.command == "deploy":
        from pipeline.fleet.artifacts import Sources
        from pipeline.fleet.registry import register_deploy

        run.registry = register_deploy(client, run, hosts, pid, models_dir or Sources.default().models_dir)
        for alias, outcome in run.registry.items():
            client.set_tag(pid, f"registry.{alias}", outcome)
    client.set_terminated(pid, "FINISHED" if not failed else "FAILED")
    return pid


def _note(r: HostResult) -> str:
    lines = [f"Release `{r.release or '-'}` (previous `{r.previous or '-'}`), outcome **{r.outcome}**."]
    if r.details.get("source_run_id"):
        lines.append(f"Model produced by pipeline run `{r.details['source_run_id']}` (tag `source_run_id`).")
    if r.error:
        lines.append(f"Error in step `{r.failed_step}`: {r.error}")
    return "\n\n".join(lines)
