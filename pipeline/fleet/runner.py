"""Fleet commands: run the steps on many hosts in parallel and collect every host's result.

Hosts run in a thread pool bounded by `settings.concurrency`; one host's failure never stops
the others (its exception becomes its result's `error`). Each command returns all results;
`raise_for_failures` turns any failure into a FleetError that still carries all of them.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from pipeline.config import paths
from pipeline.fleet import steps
from pipeline.fleet.artifacts import (
    ArtifactError,
    Release,
    Sources,
    build_release,
    cached_sha256,
    materialize_manifest,
    new_workdir,
    runtime_bundle,
    select_model_files,
    source_lineage,
    utc_stamp,
)
from pipeline.fleet.connection import connect
from pipeline.fleet.inventory import Host, Inventory
from pipeline.fleet.results import HostResult, bench_metrics

DEFAULT_MODEL = "yolov8n"


@dataclass
class FleetRun:
    """The outcome of one fleet command over a set of hosts."""

    command: str
    results: list[HostResult]
    wall_s: float
    options: dict[str, Any] = field(default_factory=dict)
    mlflow_run_id: str = ""
    registry: dict[str, str] = field(default_factory=dict)  # deploy: alias -> registry version (or why not)


def run_on_hosts(hosts: Sequence[Host], inventory: Inventory, work: Callable[[Any, Host, HostResult], None],
                 concurrency: int | None = None) -> list[HostResult]:
    """Connect to each host and run `work(conn, host, result)` in parallel; collect all results.

    Exceptions are recorded in the host's result (failed step + message), never propagated, so
    one bad host cannot stop the fleet.
    """
    def one(host: Host) -> HostResult:
        result = HostResult(host=host.name, group=host.group)
        conn = None
        try:
            with result.step("connect"):
                conn = connect(host, inventory.settings)
            work(conn, host, result)
        except Exception as e:  # noqa: BLE001 - recorded per host and re-raised by raise_for_failures
            result.outcome = "failed"
            result.error = str(e) or type(e).__name__
        finally:
            if conn is not None:
                conn.close()
        return result

    if not hosts:
        return []
    workers = max(1, min(concurrency or inventory.settings.concurrency, len(hosts)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fleet") as pool:
        return list(pool.map(one, hosts))


def resolve_local_host(host: Host, inventory: Inventory) -> Host:
    """`local` hosts: relative deploy_dir/python/frames_dir are relative to the inventory's folder."""
    if not host.is_local:
        return host
    from dataclasses import replace

    base = inventory.path.resolve().parent

    def absolute(value: str) -> str:
        return value if value.startswith("/") else str(base / value)

    # A bare python name ("python3") is looked up on PATH; a relative path is the inventory's.
    python = absolute(host.python) if "/" in host.python else host.python
    service = host.service
    if service.enabled and service.source_is_path:  # a video file / image folder beside the inventory
        service = service.model_copy(update={"source": absolute(str(service.source))})
    return replace(host, deploy_dir=absolute(host.deploy_dir), frames_dir=absolute(host.frames_dir), python=python,
                   service=service)


def _resolve_releases(hosts: Sequence[Host], sources: Sources, model: str, workdir: Path
                      ) -> tuple[dict[str, Release], dict[str, str]]:
    """Build each host's release (hosts sharing settings share one); errors are per host."""
    runtime = runtime_bundle(sources.runtime_root)
    lineage_cache: dict[str, dict[str, str]] = {}
    releases: dict[str, Release] = {}
    errors: dict[str, str] = {}
    for host in hosts:
        try:
            model_file, _ = select_model_files(host, sources.models_dir, model)
            sha = cached_sha256(model_file)
            if sha not in lineage_cache:
                lineage_cache[sha] = source_lineage(sha)
            lineage = {**lineage_cache[sha], "model_file": model_file.name}
            release = build_release(host, sources, model, runtime, lineage)
            releases[host.name] = materialize_manifest(release, workdir)
        except ArtifactError as e:
            errors[host.name] = str(e)
    return releases, errors


def deploy(inventory: Inventory, group: str | None = None, host: str | None = None, model: str = DEFAULT_MODEL,
           dry_run: bool = False, sources: Sources | None = None, results_dir: Path | None = None,
           bench: bool = True, log_to_mlflow: bool = True) -> FleetRun:
    """Deploy the model to the selected hosts: push, (engine), health, switch, benchmark, service, collect.

    With `dry_run`, only resolves artifacts and probes each device (read-only): the results say
    which files would be sent and which release would go live.

    A host with a service (inventory `service:`) gets it restarted on the new release after the
    benchmark (which runs with the service stopped, so it has the CPU alone); if /healthz is not
    ok on the new release within `healthy_timeout_s`, the device rolls `current` back and restarts
    the service there, and the host fails at step `service` with the reason.
    """
    start = time.perf_counter()
    hosts = [resolve_local_host(h, inventory) for h in inventory.select(group, host)]
    sources = sources or Sources.default()
    results_dir = results_dir or paths.repo_root() / "reports" / "fleet"
    stamp = utc_stamp()
    with new_workdir() as tmp:
        releases, errors = _resolve_releases(hosts, sources, model, Path(tmp))

        def work(conn: Any, h: Host, r: HostResult) -> None:
            if h.name in errors:
                r.failed_step = "resolve"
                raise ArtifactError(errors[h.name])
            rel = releases[h.name]
            r.release, r.runtime = rel.manifest.release, rel.runtime.name
            r.details.update(model_sha256=rel.manifest.source["model_sha256"],
                             source_run_id=rel.manifest.source.get("mlflow_run_id", ""),
                             lineage=dict(rel.manifest.source))
            with r.step("probe"):
                state = steps.probe(conn, h, rel.runtime, rel.bundle, dry=dry_run)
            deploy_dir = state["deploy_dir"]
            r.previous = state["current"] or ""
            if dry_run:
                for kind, bundle in (("runtime", rel.runtime), ("releases", rel.bundle)):
                    need = state[kind][bundle.name]["need"]
                    r.bytes_sent += sum(bundle.entries[n][1] for n in need)
                    r.model_bytes_sent += bundle.model_bytes(need)
                    r.files_sent += [f"{kind}/{bundle.name}/{n}" for n in need]
                r.outcome = "dry-run"
                r.details["would_switch"] = state["current"] != rel.manifest.release
                r.details["would_restart_service"] = h.service.enabled
                return
            with r.step("push"):
                publish = [steps.upload_bundle(conn, h, "runtime", rel.runtime, state, r),
                           steps.upload_bundle(conn, h, "releases", rel.bundle, state, r)]
            # One command runs verify, (engine), health, switch and bench on the device; their
            # device-side seconds go into r.timings, `activate` is the whole round trip.
            with r.step("activate"):
                done = steps.activate(conn, h, deploy_dir, rel.runtime.name, rel.manifest.release,
                                      [p for p in publish if p is not None], stamp if bench else None, r)
            r.outcome = "deployed" if done.switched["changed"] else "unchanged"
            r.previous = done.switched["previous"] or ""
            if done.service is not None and done.service.get("enabled", True):
                r.details["service"] = steps.service_summary(done.service)
            if done.bench is not None and done.bench_out is not None and done.bench.exited == 0:
                with r.step("fetch"):  # measured on the new release before its service started
                    _fetch_bench(conn, h, r, done.bench_out, results_dir)
            with r.failing_as("service"):
                steps.check_service(h, rel.manifest.release, done.service)
            if done.bench is not None:
                with r.failing_as("bench"):
                    steps.check_bench(done.bench)

        results = run_on_hosts(hosts, inventory, work)
    run = FleetRun("deploy", results, time.perf_counter() - start,
                   {"group": group or "", "host": host or "", "model": model, "dry_run": dry_run})
    if log_to_mlflow and not dry_run:
        from pipeline.fleet.mlflow_log import log_fleet_run

        run.mlflow_run_id = log_fleet_run(run, {h.name: h for h in hosts}, sources.models_dir)
    return run


def _fetch_bench(conn: Any, h: Host, r: HostResult, remote: str, results_dir: Path) -> None:
    local = results_dir / h.name / Path(remote).name
    r.bench = steps.fetch_json(conn, remote, local)
    r.bench_path = str(local)


def _bench_and_fetch(conn: Any, h: Host, r: HostResult, deploy_dir: str, runtime: str, release: str,
                     stamp: str, results_dir: Path, soak_minutes: float | None = None) -> None:
    with r.step("bench"):
        remote = steps.run_benchmark(conn, h, deploy_dir, runtime, release, stamp, soak_minutes)
    with r.step("fetch"):
        _fetch_bench(conn, h, r, remote, results_dir)


def benchmark(inventory: Inventory, group: str | None = None, host: str | None = None,
              results_dir: Path | None = None, log_to_mlflow: bool = True,
              soak_minutes: float | None = None) -> FleetRun:
    """Benchmark the current release on each selected host and bring the JSON back.

    With `soak_minutes`, each device runs continuously for that long and reports equal time
    windows (p50/p95/FPS/max temperature, p50 drift): the report's thermal timeline.
    """
    if soak_minutes is not None and soak_minutes <= 0:
        raise ValueError(f"--soak-minutes must be > 0 (got {soak_minutes})")
    start = time.perf_counter()
    hosts = [resolve_local_host(h, inventory) for h in inventory.select(group, host)]
    results_dir = results_dir or paths.repo_root() / "reports" / "fleet"
    stamp = utc_stamp()

    def work(conn: Any, h: Host, r: HostResult) -> None:
        with r.step("status"):
            st = steps.device_status(conn, h)
        if not st["current"]:
            raise steps.StepError(f"nothing deployed in {st['deploy_dir']}; run `fab deploy --host {h.name}` first")
        r.release = st["current"]
        source = st.get("current_manifest", {}).get("source", {})
        r.runtime = source.get("runtime", "")
        r.details.update(model_sha256=source.get("model_sha256", ""), source_run_id=source.get("mlflow_run_id", ""),
                         lineage=dict(source))
        if not r.runtime:
            raise steps.StepError(f"release {r.release} names no runtime in its manifest; redeploy")
        if h.runtime == "tensorrt":
            with r.step("engine"):  # reuses the cached engine; rebuilds only if the key changed
                r.engine = steps.build_engine(conn, h, st["deploy_dir"], r.runtime, r.release)
        _bench_and_fetch(conn, h, r, st["deploy_dir"], r.runtime, r.release, stamp, results_dir, soak_minutes)
        r.outcome = "ok"

    results = run_on_hosts(hosts, inventory, work)
    run = FleetRun("benchmark", results, time.perf_counter() - start,
                   {"group": group or "", "host": host or "", "soak_minutes": soak_minutes or ""})
    if log_to_mlflow:
        from pipeline.fleet.mlflow_log import log_fleet_run

        run.mlflow_run_id = log_fleet_run(run, {h.name: h for h in hosts})
    return run


def rollback(inventory: Inventory, group: str | None = None, host: str | None = None) -> FleetRun:
    """Make `previous` current again (after a health check of it); the two swap places.

    A host with a service gets it restarted on the rolled-back release and waited for; if it does
    not come up healthy, the device switches back to where it was and the host fails.
    """
    start = time.perf_counter()
    hosts = [resolve_local_host(h, inventory) for h in inventory.select(group, host)]

    def work(conn: Any, h: Host, r: HostResult) -> None:
        with r.step("status"):
            st = steps.device_status(conn, h)
        if not st["previous"]:
            raise steps.StepError(f"no previous release in {st['deploy_dir']} to roll back to")
        target = st["previous"]
        runtime = st.get("previous_manifest", {}).get("source", {}).get("runtime", "")
        if not runtime:
            raise steps.StepError(f"release {target} names no runtime in its manifest; redeploy instead")
        r.release, r.runtime = target, runtime
        with r.step("health"):
            r.health = steps.health_check(conn, h, st["deploy_dir"], runtime, target)
        with r.step("switch"):
            switched = steps.switch_release(conn, h, st["deploy_dir"], target)
        r.previous = switched["previous"] or ""
        r.outcome = "rolled-back" if switched["changed"] else "unchanged"
        with r.step("service"):
            answer = steps.service_activate(conn, h, st["deploy_dir"], target,
                                            {"current": st["current"], "previous": st["previous"]})
            if answer.get("enabled", True):
                r.details["service"] = steps.service_summary(answer)
            steps.check_service(h, target, answer)

    results = run_on_hosts(hosts, inventory, work)
    return FleetRun("rollback", results, time.perf_counter() - start, {"group": group or "", "host": host or ""})


def status(inventory: Inventory, group: str | None = None, host: str | None = None) -> FleetRun:
    """current/previous release, model sha, engines, last benchmark, temperature and the service per host."""
    start = time.perf_counter()
    hosts = [resolve_local_host(h, inventory) for h in inventory.select(group, host)]

    def work(conn: Any, h: Host, r: HostResult) -> None:
        with r.step("status"):
            st = steps.device_status(conn, h)
        r.release, r.previous = st["current"] or "", st["previous"] or ""
        source = st.get("current_manifest", {}).get("source", {})
        last = st.get("last_result_doc") or {}
        metrics = bench_metrics(last) if last else {}
        service = st.get("service") or {}
        r.details = {
            "model_sha256": source.get("model_sha256", ""),
            "engines": st["engines"],
            "last_result": st["last_result"],
            "last_p50_ms": metrics.get("latency_p50_ms"),
            "last_fps": metrics.get("fps"),
            "temperature_c": st["temperature_c"],
            # the service: from /healthz, and supervisor.json or systemctl (deploy_ops.service_status)
            "service": {k: service.get(k) for k in ("configured", "supervisor", "unit", "active", "running", "ok",
                                                     "status", "release", "fps", "pid", "restarts", "crash_loop",
                                                     "last_error", "health")} if service.get("configured") else {},
        }
        r.outcome = "ok" if st["current"] else "empty"

    results = run_on_hosts(hosts, inventory, work)
    return FleetRun("status", results, time.perf_counter() - start, {"group": group or "", "host": host or ""})


def collect_frames(inventory: Inventory, group: str | None = None, host: str | None = None, count: int = 50,
                   camera_dir: Path | None = None, meta_dir: Path | None = None) -> FleetRun:
    """Pull the newest `count` camera frames per host into data/camera/<host>/ (for calibrate).

    Their JSON sidecars (detections, reason, release) go to `meta_dir`/<host>/, by default the
    sibling data/camera-meta/ of `camera_dir`: the camera stage accepts only images and videos there.
    """
    if count < 1:
        raise ValueError(f"--count {count}: ask for at least one frame")
    start = time.perf_counter()
    hosts = [resolve_local_host(h, inventory) for h in inventory.select(group, host)]
    camera_dir = camera_dir or paths.repo_root() / "data" / "camera"
    meta_dir = meta_dir or camera_dir.parent / "camera-meta"

    def work(conn: Any, h: Host, r: HostResult) -> None:
        with r.step("frames"):
            steps.collect_frames(conn, h, count, camera_dir / h.name, r, meta_dir / h.name)
        r.outcome = "ok"

    results = run_on_hosts(hosts, inventory, work)
    return FleetRun("collect-frames", results, time.perf_counter() - start,
                    {"group": group or "", "host": host or "", "count": count})
