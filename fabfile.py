"""Fleet tasks: thin wrappers over pipeline.fleet (all logic, paths and checks live there).

  fab deploy --group pis [--host H] [--model yolov8n] [--dry-run]
  fab deploy --group pis --canary 1 --batch 25% --max-fail-percent 10   (staged; a rerun resumes)
  fab shadow --group pis [--frames 300 | --minutes 10]   (candidate beside current; no switch)
  fab status --group jetsons          fab rollback --group pis   (both: the service too)
  fab benchmark --group local         fab collect-frames --group pis --count 50

Every task takes --inventory (default inventory.yaml, or $FLEET_INVENTORY). Exit codes: 2 for bad
input (an option value, an unknown option or task, the inventory, a group, a model's files: one
`error: ...` line, before any host is contacted), 1 when any host failed (the table above it says
which and why) or the MLflow run could not be written, 0 otherwise.
"""

from __future__ import annotations

import os
from pathlib import Path

from fabric import main as fabric_main
from fabric import task
from invoke.exceptions import Exit

from pipeline.fleet import runner
from pipeline.fleet.artifacts import ArtifactError
from pipeline.fleet.fab_cli import usage_errors_exit_2
from pipeline.fleet.inventory import InventoryError, load_inventory
from pipeline.fleet.results import format_table
from pipeline.fleet.shadow import ShadowPlan
from pipeline.tracking.mlflow_runs import TrackingServerUnreachable

# `fab` itself is fabric.main.program; its task-line parse errors (`fab deploy --bogus`) exit 2.
usage_errors_exit_2(fabric_main.program)


def _inventory(path: str | None):
    return load_inventory(Path(path or os.environ.get("FLEET_INVENTORY") or "inventory.yaml"))


def _call(fn, *args, **kwargs):
    # Bad input (option values, inventory, group, model files) is one clear line and exit 2, not a
    # traceback; the runner checks all of it before it contacts any host.
    try:
        return fn(*args, **kwargs)
    except (InventoryError, ArtifactError, ValueError, TrackingServerUnreachable) as e:
        raise Exit(f"error: {' '.join(str(e).split())}", code=2) from e


def _rollout_lines(summary: dict) -> list[str]:
    """A staged deploy's story: each stage, and who stopped it and why."""
    if not summary:
        return []
    lines = []
    if summary.get("already_current"):
        lines.append(f"rollout: already on this release (skipped): {', '.join(summary['already_current'])}")
    for st in summary.get("stages", []):
        failed = f", failed: {', '.join(st['failed'])} ({st['fail_percent']:g} %)" if st["failed"] else ""
        back = f", rolled back: {', '.join(st['rolled_back'])}" if st.get("rolled_back") else ""
        lines.append(f"rollout {st['stage']}: {', '.join(st['hosts'])}{failed}{back}")
    if summary.get("stopped"):
        lines.append(f"ROLLOUT STOPPED at {summary['stopped_at']} ({summary['budget']}) by "
                     f"{', '.join(summary['by'])}:")
        lines += [f"  {host}: {why}" for host, why in summary["why"].items()]
        if summary.get("not_reached"):
            lines.append(f"  not reached (untouched): {', '.join(summary['not_reached'])}")
        lines.append("  fix the cause and re-run the same command: it resumes with the hosts not yet on the release")
    return lines


def _finish(run: runner.FleetRun, extra: str = "") -> None:
    print(format_table(run.command, run.results, run.wall_s))
    if extra:
        print(extra)
    for line in _rollout_lines(run.rollout):
        print(line)
    if run.mlflow_run_id:
        print(f"MLflow run: {run.mlflow_run_id}")
    if run.mlflow_error:
        print(f"error: the MLflow run was not written: {run.mlflow_error}")
    for alias, outcome in sorted(run.registry.items()):
        print(f"Model registry alias '{alias}': " + (f"version {outcome}" if outcome.isdigit() else outcome))
    if any(not r.ok for r in run.results) or run.mlflow_error or run.rollout.get("stopped"):
        raise Exit(code=1)


def _shadow_lines(run: runner.FleetRun) -> list[str]:
    lines = []
    for r in run.results:
        sh = r.details.get("shadow") or {}
        if not sh:
            continue
        if sh.get("skipped"):
            lines.append(f"  {r.host}: shadow skipped ({sh['skipped']})")
            continue
        m = sh.get("metrics") or {}
        lines.append(f"  {r.host}: shadow {'PASSED' if sh.get('passed') else 'FAILED'}: F1 {m.get('shadow_f1', '-')} "
                     f"over {m.get('shadow_frames_compared', 0):.0f} frames, count delta "
                     f"{m.get('shadow_mean_count_delta', '-')}/frame, P95 current/candidate "
                     f"{m.get('shadow_current_p95_ms', '-')}/{m.get('shadow_candidate_p95_ms', '-')} ms, errors "
                     f"{m.get('shadow_errors', '-')} -> {sh.get('path')}")
    return lines


@task(help={"group": "inventory group", "host": "one host", "model": "model name in models/ (default yolov8n)",
            "dry_run": "resolve and probe only; change nothing", "inventory": "inventory file",
            "canary": "staged: this many hosts first (in inventory order), each checked in shadow before it switches",
            "batch": "staged: then batches of this many hosts, or a percentage of the selected hosts (25%)",
            "max_fail_percent": "staged: stop when a batch's failed hosts exceed this % of it (default 0)",
            "frames": "canaries' shadow length in compared frames (default: inventory shadow.frames)",
            "minutes": "canaries' shadow length in minutes (default: inventory shadow.minutes)"})
def deploy(c, group=None, host=None, model=runner.DEFAULT_MODEL, dry_run=False, inventory=None, canary=None,
           batch=None, max_fail_percent=None, frames=None, minutes=None):
    """Push the model to devices, health-check, switch `current`, benchmark, restart the service, log to MLflow.

    With --canary/--batch/--max-fail-percent the rollout is staged; a rerun resumes where it stopped.
    """
    rollout = _call(runner.parse_rollout, canary, batch, max_fail_percent)
    plan = _call(lambda: ShadowPlan(runner.parse_frames(frames), runner.parse_minutes(minutes)))
    run = _call(lambda: runner.deploy(_inventory(inventory), group, host, model, dry_run=dry_run, rollout=rollout,
                                      shadow=plan))
    lines = _shadow_lines(run)
    for r in run.results:
        svc = r.details.get("service") or {}
        if svc:
            state = "healthy" if svc.get("ok") else "NOT healthy"
            back = f", rolled back to {svc['rolled_back_to']}" if svc.get("rolled_back_to") else ""
            lines.append(f"  {r.host}: service {state} on {svc.get('release') or '-'} ({svc.get('supervisor')}, "
                         f"waited {r.timings.get('service_wait', 0):.1f} s){back}")
    _finish(run, "\n".join(lines))


def _service_line(svc: dict) -> str:
    """`service=...` for `fab status`: running or not, on which release, its FPS and its last error."""
    if not svc:
        return "service=none"
    state = svc.get("status") if svc.get("status") not in (None, "down") else svc.get("active") or "down"
    fps = svc.get("fps")
    line = (f"service={state} ({svc.get('supervisor') or '?'}) release={svc.get('release') or '-'} "
            f"fps={f'{fps:.1f}' if isinstance(fps, (int, float)) else '-'} restarts={svc.get('restarts')}")
    if svc.get("crash_loop"):
        line += " CRASH-LOOP"
    if svc.get("last_error"):
        line += f" last_error={str(svc['last_error'])[:160]!r}"
    return line


@task(help={"group": "inventory group", "host": "one host", "inventory": "inventory file"})
def status(c, group=None, host=None, inventory=None):
    """Show current/previous release, model sha, engines, last benchmark, temperature and the service."""
    run = _call(lambda: runner.status(_inventory(inventory), group, host))
    lines = [f"  {r.host}: current={r.release or '-'} previous={r.previous or '-'} "
             f"model={str(r.details.get('model_sha256', ''))[:12] or '-'} engines={r.details.get('engines') or '-'} "
             f"last={r.details.get('last_result') or '-'} p50_ms={r.details.get('last_p50_ms')} "
             f"fps={r.details.get('last_fps')} temp_c={r.details.get('temperature_c')}\n"
             f"    {_service_line(r.details.get('service') or {})}" for r in run.results]
    _finish(run, "\n".join(lines))


@task(help={"group": "inventory group", "host": "one host", "model": "model name in models/ (default yolov8n)",
            "inventory": "inventory file", "frames": "compare this many frames (default: inventory shadow.frames)",
            "minutes": "run this many minutes at most (default: inventory shadow.minutes)"})
def shadow(c, group=None, host=None, model=runner.DEFAULT_MODEL, inventory=None, frames=None, minutes=None):
    """Run the model's release in shadow beside `current` on live frames; judge it; switch nothing."""
    plan = _call(lambda: ShadowPlan(runner.parse_frames(frames), runner.parse_minutes(minutes)))
    run = _call(lambda: runner.shadow(_inventory(inventory), group, host, model, plan=plan))
    _finish(run, "\n".join(_shadow_lines(run)))


@task(help={"group": "inventory group", "host": "one host", "inventory": "inventory file"})
def rollback(c, group=None, host=None, inventory=None):
    """Make the previous release current again (after its health check)."""
    _finish(_call(lambda: runner.rollback(_inventory(inventory), group, host)))


@task(help={"group": "inventory group", "host": "one host", "inventory": "inventory file",
            "soak_minutes": "run continuously this long and report per-window latency/temperature (thermal timeline)"})
def benchmark(c, group=None, host=None, inventory=None, soak_minutes=None):
    """Benchmark the current release on each device; results to reports/fleet/<host>/ and MLflow."""
    soak = _call(runner.parse_soak_minutes, soak_minutes)
    _finish(_call(lambda: runner.benchmark(_inventory(inventory), group, host, soak_minutes=soak)))


@task(name="collect-frames", help={"group": "inventory group", "host": "one host", "inventory": "inventory file",
                                   "count": f"newest frames per device (default {runner.DEFAULT_COUNT})"})
def collect_frames(c, group=None, host=None, count=None, inventory=None):
    """Pull camera frames into data/camera/<host>/ for the calibrate stage."""
    # A string option (default None), checked here: invoke's own int conversion ends in a traceback.
    n = _call(runner.parse_count, runner.DEFAULT_COUNT if count is None else count)
    _finish(_call(lambda: runner.collect_frames(_inventory(inventory), group, host, n)))


@task(help={"group": "inventory group", "host": "one host", "inventory": "inventory file",
            "base_python": "the device's python that creates the venv (default: python3 on its PATH)",
            "force": "reinstall even when the venv already holds this wheelhouse"})
def provision(c, group=None, host=None, inventory=None, base_python="python3", force=False):
    """Create each device's venv (the inventory's python) and install the runtime from a pushed wheelhouse, offline."""
    from pipeline.fleet import provision as provisioning

    run = _call(lambda: provisioning.provision(_inventory(inventory), group, host, base_python=base_python,
                                               force=force))
    _finish(run, "\n".join(f"  {r.host}: {r.details.get('target', '-')} venv={r.details.get('venv', '-')} "
                           f"wheelhouse={r.release or '-'} ({r.details.get('wheels', 0)} wheels, "
                           f"{r.details.get('wheelhouse_bytes', 0) / 1e6:.1f} MB)" for r in run.results))
