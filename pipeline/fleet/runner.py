"""Fleet commands: run the steps on many hosts in parallel and collect every host's result.

Hosts run in a thread pool bounded by `settings.concurrency`; one host's failure never stops
the others (its exception becomes its result's `error`). Each command returns all results;
`raise_for_failures` turns any failure into a FleetError that still carries all of them.

Option values (`model`, `count`, `soak_minutes`) are checked before any host is contacted
(`ValueError`/`ArtifactError`, which `fab` reports as one `error: ...` line and exit 2); the
`parse_*` functions turn the command line's strings into checked values.
"""

from __future__ import annotations

import json
import logging
import math
import posixpath
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from edge_runtime.fileio import atomic_write_text
from pipeline.config import paths
from pipeline.fleet import shadow as shadow_judge
from pipeline.fleet import steps
from pipeline.fleet.artifacts import (
    ArtifactError,
    Release,
    Sources,
    build_release,
    cached_sha256,
    materialize_manifest,
    model_paths,
    new_workdir,
    runtime_bundle,
    select_model_files,
    source_lineage,
    utc_stamp,
)
from pipeline.fleet.connection import connect
from pipeline.fleet.inventory import Host, Inventory
from pipeline.fleet.results import HostResult, bench_metrics
from pipeline.fleet.shadow import ShadowPlan

DEFAULT_MODEL = "yolov8n"
DEFAULT_COUNT = 50  # collect-frames: newest frames per device
MAX_SOAK_MINUTES = 7 * 24 * 60.0  # a week: longer is a typo, not a soak
log = logging.getLogger(__name__)


@dataclass
class FleetRun:
    """The outcome of one fleet command over a set of hosts.

    `mlflow_error`: why the MLflow run could not be written (empty when it was, or was not asked
    for); the results are complete either way, and `fab` reports it and exits 1.
    """

    command: str
    results: list[HostResult]
    wall_s: float
    options: dict[str, Any] = field(default_factory=dict)
    mlflow_run_id: str = ""
    registry: dict[str, str] = field(default_factory=dict)  # deploy: alias -> registry version (or why not)
    mlflow_error: str = ""
    rollout: dict[str, Any] = field(default_factory=dict)  # a staged deploy's summary (staged_rollout)


# --- option values: checked before any host is contacted --------------------------------------

_WHOLE = re.compile(r"\A[0-9]+\Z")
_DECIMAL = re.compile(r"\A(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\Z")


def check_count(count: Any) -> int:
    """collect-frames' `count`: a whole number >= 1, else ValueError."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"--count {count!r}: give a whole number of frames per device, at least 1 (e.g. --count 50)")
    return count


def parse_count(text: Any) -> int:
    """`--count` from the command line (a string, or the default int) -> checked int."""
    if isinstance(text, str):
        if not _WHOLE.match(text.strip()) or int(text.strip()) < 1:
            raise ValueError(f"--count {text!r}: give a whole number of frames per device, at least 1 "
                             "(e.g. --count 50)")
        return check_count(int(text.strip()))
    return check_count(text)


def check_soak_minutes(minutes: Any) -> float | None:
    """benchmark's `soak_minutes`: None (no soak) or a finite number of minutes in (0, MAX_SOAK_MINUTES]."""
    if minutes is None:
        return None
    if isinstance(minutes, bool) or not isinstance(minutes, (int, float)) or not math.isfinite(minutes) \
            or minutes <= 0 or minutes > MAX_SOAK_MINUTES:
        raise ValueError(f"--soak-minutes must be > 0 and at most {MAX_SOAK_MINUTES:.0f} (a week), a finite number "
                         f"of minutes (got {minutes!r})")
    return float(minutes)


def parse_soak_minutes(text: Any) -> float | None:
    """`--soak-minutes` from the command line (a string or None) -> checked minutes or None."""
    if text is None or not isinstance(text, str):
        return check_soak_minutes(text)
    if not _DECIMAL.match(text.strip()) or not 0 < float(text.strip()) <= MAX_SOAK_MINUTES:
        raise ValueError(f"--soak-minutes {text!r}: give the soak's length in minutes, a number > 0 and at most "
                         f"{MAX_SOAK_MINUTES:.0f} (a week), e.g. --soak-minutes 30")
    return check_soak_minutes(float(text.strip()))


def check_model(model: Any, models_dir: Path) -> str:
    """`--model`: a plain model name (letters, digits, `_ . -`; no path) with at least one of its
    files in `models_dir`, else ArtifactError. Which file each host needs is checked per host."""
    if not isinstance(model, str):
        raise ArtifactError(f"--model {model!r}: give a model name such as 'yolov8n'")
    files = model_paths(models_dir, model)  # refuses path separators, '..', shell characters, '.onnx'
    if not any(p.is_file() for p in files.values()):
        known = sorted({p.name.split(".")[0] for p in models_dir.glob("*.onnx")}) if models_dir.is_dir() else []
        raise ArtifactError(f"--model {model!r}: no files of that model in {models_dir} (looked for "
                            f"{', '.join(p.name for p in files.values())}); models there: "
                            f"{', '.join(known) or 'none'} (run `dvc repro` to build them)")
    return model


_PERCENT = re.compile(r"\A([0-9]+(?:\.[0-9]+)?)%\Z")


@dataclass(frozen=True)
class Rollout:
    """A staged deploy: `canary` hosts first (shadow, then switch), then batches of `batch` hosts
    (`batch_percent` % of all selected hosts, at least 1, when given as a percentage; neither =
    the rest in one batch), stopping when a batch's failures exceed `max_fail_percent` %."""

    canary: int = 0
    batch: int | None = None
    batch_percent: float | None = None
    max_fail_percent: float = 0.0

    @property
    def batch_text(self) -> str:
        """The batch as given: '4', '25%' or '' (all)."""
        if self.batch_percent is not None:
            return f"{self.batch_percent:g}%"
        return str(self.batch) if self.batch is not None else ""

    def check(self) -> None:
        """ValueError naming the option when a value is out of its domain."""
        if isinstance(self.canary, bool) or not isinstance(self.canary, int) or self.canary < 0:
            raise ValueError(f"--canary {self.canary!r}: give a whole number of canary hosts, 0 or more")
        if self.batch is not None and (isinstance(self.batch, bool) or not isinstance(self.batch, int)
                                       or self.batch < 1):
            raise ValueError(f"--batch {self.batch!r}: give a whole number of hosts (at least 1) or a percentage "
                             "such as 25%")
        if self.batch_percent is not None and not (isinstance(self.batch_percent, (int, float))
                                                   and 0.0 < self.batch_percent <= 100.0):
            raise ValueError(f"--batch {self.batch_percent!r}%: a percentage in (0, 100]")
        p = self.max_fail_percent
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or not 0.0 <= p <= 100.0:
            raise ValueError(f"--max-fail-percent {p!r}: a percentage from 0 to 100 (0 = stop at the first "
                             "failure)")

    def batch_size(self, total: int) -> int:
        """Hosts per batch for a rollout over `total` selected hosts (Ansible's `serial`)."""
        if self.batch_percent is not None:
            return max(1, int(total * self.batch_percent / 100.0))
        return self.batch if self.batch is not None else max(1, total)


def parse_rollout(canary: Any = None, batch: Any = None, max_fail_percent: Any = None) -> Rollout | None:
    """`--canary N --batch B|P% --max-fail-percent P` from the command line -> a checked Rollout,
    or None when none of them was given (a plain deploy, every host at once)."""
    if canary is None and batch is None and max_fail_percent is None:
        return None

    def whole(text: Any, option: str, minimum: int) -> int:
        value = str(text).strip()
        if not _WHOLE.match(value) or int(value) < minimum:
            raise ValueError(f"{option} {text!r}: give a whole number, at least {minimum}")
        return int(value)

    n = whole(canary, "--canary", 0) if canary is not None else 0
    size, percent = None, None
    if batch is not None:
        m = _PERCENT.match(str(batch).strip())
        if m:
            percent = float(m.group(1))
            if not 0.0 < percent <= 100.0:
                raise ValueError(f"--batch {batch!r}: a percentage in (0, 100], e.g. 25%")
        else:
            try:
                size = whole(batch, "--batch", 1)
            except ValueError:
                raise ValueError(f"--batch {batch!r}: give a number of hosts (e.g. 4) or a percentage of the "
                                 "selected hosts (e.g. 25%)") from None
    fail = 0.0
    if max_fail_percent is not None:
        text = str(max_fail_percent).strip().rstrip("%")
        if not _DECIMAL.match(text) or float(text) > 100.0:
            raise ValueError(f"--max-fail-percent {max_fail_percent!r}: a percentage from 0 to 100 (e.g. 10)")
        fail = float(text)
    rollout = Rollout(n, size, percent, fail)
    rollout.check()
    return rollout


def parse_frames(text: Any) -> int | None:
    """`fab shadow --frames F`: None or a whole number >= 1."""
    if text is None:
        return None
    value = str(text).strip()
    if not _WHOLE.match(value) or int(value) < 1:
        raise ValueError(f"--frames {text!r}: give a whole number of frames to compare, at least 1 (e.g. 300)")
    return int(value)


def parse_minutes(text: Any) -> float | None:
    """`fab shadow --minutes M`: None or a number of minutes in (0, a week]."""
    if text is None:
        return None
    value = str(text).strip()
    if not _DECIMAL.match(value) or not 0 < float(value) <= MAX_SOAK_MINUTES:
        raise ValueError(f"--minutes {text!r}: give the shadow's length in minutes, a number > 0 and at most "
                         f"{MAX_SOAK_MINUTES:.0f} (a week), e.g. --minutes 10")
    return float(value)


# --- running a command on every host ----------------------------------------------------------

def describe_error(e: BaseException) -> str:
    """A host's failure in words: our own errors speak for themselves; others get their type
    (a bare `KeyError: 'x'` or `EOFError` says nothing on its own)."""
    if isinstance(e, SystemExit):
        return (f"a step tried to exit the program (SystemExit {e.code!r}); recorded as this host's failure, the "
                "other hosts carried on")
    text = str(e)
    if type(e).__module__.startswith("pipeline.") and text:
        return text
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _close(conn: Any, result: HostResult) -> None:
    """Close a host's connection; a failure here never propagates.

    A host that already failed keeps its first error (the close's is added to `details`). A host
    whose work had completed stays ok: everything it did on the device was confirmed before the
    close, so a dropped goodbye changes nothing there; it is logged and kept in
    `details["close_error"]`.
    """
    try:
        conn.close()
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: BLE001 - a dead connection is this host's business only
        result.details["close_error"] = describe_error(e)
        if result.ok:
            log.warning("%s: %s (its work had completed; the result stands)", result.host, describe_error(e))


def run_on_hosts(hosts: Sequence[Host], inventory: Inventory, work: Callable[[Any, Host, HostResult], None],
                 concurrency: int | None = None) -> list[HostResult]:
    """Connect to each host and run `work(conn, host, result)` in parallel; collect all results.

    Exceptions are recorded in the host's result (failed step + message), never propagated, so
    one bad host cannot stop the fleet, and every host gets its result in `hosts` order: a
    connection that drops at any moment, including while it is being closed (`_close`), and even
    a `SystemExit` from a step are that host's failure. Only KeyboardInterrupt (the operator's ^C)
    stops the command.
    """
    def one(host: Host) -> HostResult:
        result = HostResult(host=host.name, group=host.group)
        conn = None
        try:
            with result.step("connect"):
                conn = connect(host, inventory.settings)
            work(conn, host, result)
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # noqa: BLE001 - recorded per host and re-raised by raise_for_failures
            result.outcome = "failed"
            result.error = describe_error(e)
        finally:
            if conn is not None:
                _close(conn, result)
        return result

    if not hosts:
        return []
    workers = max(1, min(concurrency or inventory.settings.concurrency, len(hosts)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fleet") as pool:
        futures = [pool.submit(one, h) for h in hosts]
        results = []
        for h, fut in zip(hosts, futures):
            try:
                results.append(fut.result())
            except KeyboardInterrupt:
                raise
            except BaseException as e:  # noqa: BLE001 - never lose a host's row
                results.append(HostResult(host=h.name, group=h.group, outcome="failed", error=describe_error(e)))
        return results


def _log_to_mlflow(run: FleetRun, hosts: Sequence[Host], models_dir: Path | None = None) -> None:
    """Write the command's MLflow run; a failure is kept in `run.mlflow_error`, never losing the results."""
    from pipeline.fleet.mlflow_log import log_fleet_run

    try:
        run.mlflow_run_id = log_fleet_run(run, {h.name: h for h in hosts}, models_dir)
    except Exception as e:  # noqa: BLE001 - the table must still be printed; fab exits 1 on this
        run.mlflow_error = describe_error(e)


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


def _check_model_files(hosts: Sequence[Host], sources: Sources, model: str) -> None:
    """Every host's model files exist (for its runtime and precision), before any host is contacted:
    else ArtifactError naming the first such host and how many others lack theirs (exit 2)."""
    errors: dict[str, str] = {}
    for host in hosts:
        try:
            select_model_files(host, sources.models_dir, model)
        except ArtifactError as e:
            errors[host.name] = str(e)
    if errors:
        first, *others = errors
        more = f" (and {len(others)} other host(s): {', '.join(others)})" if others else ""
        raise ArtifactError(f"{errors[first]}{more}; no host was contacted")


def _resolve_releases(hosts: Sequence[Host], sources: Sources, model: str, workdir: Path
                      ) -> tuple[dict[str, Release], dict[str, str]]:
    """Build each host's release (hosts sharing settings share one); errors are per host.

    A file that is there but unusable (not a readable ONNX model, metadata without class names)
    fails only the hosts that ship it, at step `resolve`, each with its row and MLflow run.
    """
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


class _Deploy:
    """One deploy's per-host work (`work`), shared by a plain deploy, a staged rollout and `fab shadow`.

    `shadow` set: after the upload the candidate is staged (verified, healthy, not current) and run
    in shadow inside the service; a failed judgement fails the host before anything switches.
    `switch` False (`fab shadow`): stop there.
    """

    def __init__(self, releases: dict[str, Release], errors: dict[str, str], stamp: str, results_dir: Path,
                 dry_run: bool = False, bench: bool = True) -> None:
        self.releases, self.errors, self.stamp, self.results_dir = releases, errors, stamp, results_dir
        self.dry_run, self.bench = dry_run, bench

    def work(self, conn: Any, h: Host, r: HostResult, shadow: ShadowPlan | None = None, switch: bool = True) -> None:
        """Probe, push, (stage + shadow), activate, fetch the benchmark, check the service."""
        if h.name in self.errors:
            r.failed_step = "resolve"
            raise ArtifactError(self.errors[h.name])
        rel = self.releases[h.name]
        r.release, r.runtime = rel.manifest.release, rel.runtime.name
        r.details.update(model_sha256=rel.manifest.source["model_sha256"],
                         source_run_id=rel.manifest.source.get("mlflow_run_id", ""),
                         lineage=dict(rel.manifest.source))
        with r.step("probe"):
            state = steps.probe(conn, h, rel.runtime, rel.bundle, dry=self.dry_run)
        deploy_dir = state["deploy_dir"]
        r.previous = state["current"] or ""
        bundles = [("runtime", rel.runtime), ("releases", rel.bundle)]
        r.details.update(free_bytes=state.get("free_bytes"), bytes_to_send=steps.bytes_to_send(state, bundles))
        if self.dry_run:
            for kind, bundle in bundles:
                need = state[kind][bundle.name]["need"]
                r.bytes_sent += sum(bundle.entries[n][1] for n in need)
                r.model_bytes_sent += bundle.model_bytes(need)
                r.files_sent += [f"{kind}/{bundle.name}/{n}" for n in need]
            r.details["would_switch"] = state["current"] != rel.manifest.release
            r.details["would_restart_service"] = h.service.enabled
            with r.failing_as("push"):
                steps.check_space(h, state, bundles)
            r.outcome = "dry-run"
            return
        with r.step("push"):
            steps.check_space(h, state, bundles)
            publish = steps.upload_bundles(conn, h, bundles, state, r)
        if shadow is not None:
            with r.step("stage"):
                steps.stage(conn, h, deploy_dir, rel.runtime.name, rel.manifest.release, publish, r)
            publish = []  # published now; activate verifies nothing twice
            if state["current"] == rel.manifest.release:
                r.details["shadow"] = {"passed": True, "skipped": "the candidate is already the current release"}
            else:
                self._shadow(conn, h, r, deploy_dir, shadow)
            if not switch:
                r.outcome = "shadow-passed"
                return
        # One command runs verify, (engine), health, switch and bench on the device; their
        # device-side seconds go into r.timings, `activate` is the whole round trip.
        with r.step("activate"):
            done = steps.activate(conn, h, deploy_dir, rel.runtime.name, rel.manifest.release,
                                  publish, self.stamp if self.bench else None, r)
        r.outcome = "deployed" if done.switched["changed"] else "unchanged"
        r.previous = done.switched["previous"] or ""
        if done.service is not None and done.service.get("enabled", True):
            r.details["service"] = steps.service_summary(done.service)
        if done.bench is not None and done.bench_out is not None and done.bench.exited == 0:
            with r.step("fetch"):  # measured on the new release before its service started
                _fetch_bench(conn, h, r, done.bench_out, self.results_dir)
        with r.failing_as("service"):
            steps.check_service(h, rel.manifest.release, done.service)
        if done.bench is not None:
            with r.failing_as("bench"):
                steps.check_bench(done.bench)

    def _shadow(self, conn: Any, h: Host, r: HostResult, deploy_dir: str, plan: ShadowPlan) -> None:
        """Run the staged candidate in shadow, keep its report, fail the host unless it passed."""
        rel = self.releases[h.name]
        engines = posixpath.join(deploy_dir, "engines") if h.runtime == "tensorrt" else None
        req = shadow_judge.request(h, f"{self.stamp}-{rel.manifest.release[:12]}", rel.manifest.release, plan, engines)
        with r.step("shadow"):
            doc = steps.shadow(conn, h, deploy_dir, req, shadow_judge.wait_timeout(req))
            reasons = shadow_judge.judge(doc, h.shadow)
            report = {"kind": "shadow", "created_utc": self.stamp, "host": h.name, "candidate": rel.manifest.release,
                      "current": r.previous, "passed": not reasons, "reasons": reasons,
                      "thresholds": h.shadow.model_dump(), "request": req, "result": doc}
            path = self.results_dir / h.name / f"shadow-{self.stamp}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(report, indent=2, sort_keys=True) + "\n")
            r.details["shadow"] = {"passed": not reasons, "reasons": reasons, "path": str(path),
                                   "metrics": shadow_judge.metrics(doc)}
            if reasons:
                raise steps.StepError(f"candidate {rel.manifest.release} failed its shadow beside "
                                      f"{r.previous or 'the current release'}: {'; '.join(reasons)}; "
                                      f"`current` was not changed (report: {path})")


def _prepare(inventory: Inventory, group: str | None, host: str | None, model: str, sources: Sources | None
             ) -> tuple[list[Host], Sources]:
    """The selected hosts (local ones resolved) and the checked model: all before any host is contacted."""
    sources = sources or Sources.default()
    # Which hosts first: an unknown group is the first thing to say, even where no model is built yet.
    hosts = [resolve_local_host(h, inventory) for h in inventory.select(group, host)]
    check_model(model, sources.models_dir)
    _check_model_files(hosts, sources, model)
    return hosts, sources


def _check_shadow_hosts(hosts: Sequence[Host], what: str) -> None:
    """A shadow runs inside the service: every host of `what` needs one (else ValueError, exit 2)."""
    without = [h.name for h in hosts if not h.service.enabled]
    if without:
        raise ValueError(f"{what} runs the candidate in shadow inside the detector service, but "
                         f"{', '.join(without)} {'has' if len(without) == 1 else 'have'} no service (inventory "
                         "`service: enabled: false`); enable it, or leave these hosts out; no host was contacted")


def deploy(inventory: Inventory, group: str | None = None, host: str | None = None, model: str = DEFAULT_MODEL,
           dry_run: bool = False, sources: Sources | None = None, results_dir: Path | None = None,
           bench: bool = True, log_to_mlflow: bool = True, rollout: Rollout | None = None,
           shadow: ShadowPlan | None = None) -> FleetRun:
    """Deploy the model to the selected hosts: push, (engine), health, switch, benchmark, service, collect.

    With `dry_run`, only resolves artifacts and probes each device (read-only): the results say
    which files would be sent and which release would go live (and fail the host when they
    would not fit into its free space).

    The model name and every host's model files are checked before any host is contacted
    (ArtifactError). The files still to send must fit into the deploy dir's free space (plus
    `steps.SPACE_MARGIN_BYTES`), else the host fails before its upload with how much is free.

    A host with a service (inventory `service:`) gets it restarted on the new release after the
    benchmark (which runs with the service stopped, so it has the CPU alone); if /healthz is not
    ok on the new release within `healthy_timeout_s`, the device rolls `current` back and restarts
    the service there, and the host fails at step `service` with the reason.

    With `rollout` (canary hosts, batches, a failure budget) the hosts go in stages: see
    `staged_rollout`; `shadow` is the canaries' shadow window (None: each host's inventory).
    Without it every host is deployed at once, as before.
    """
    start = time.perf_counter()
    # Option values first (they need no file), then hosts and model files: all before any host.
    if shadow is not None and (shadow.frames or shadow.minutes) and not (rollout and rollout.canary):
        raise ValueError("--frames/--minutes set the canaries' shadow window: give --canary N too (or use "
                         "`fab shadow` to shadow without switching)")
    if rollout is not None:
        rollout.check()
    hosts, sources = _prepare(inventory, group, host, model, sources)
    if rollout is not None:
        if rollout.canary and not dry_run:
            _check_shadow_hosts(hosts[:rollout.canary], "a canary")
    results_dir = results_dir or paths.repo_root() / "reports" / "fleet"
    summary: dict[str, Any] = {}
    with new_workdir() as tmp:
        releases, errors = _resolve_releases(hosts, sources, model, Path(tmp))
        ctx = _Deploy(releases, errors, utc_stamp(), results_dir, dry_run=dry_run, bench=bench)
        if rollout is None or dry_run:
            results = run_on_hosts(hosts, inventory, ctx.work)
        else:
            results, summary = staged_rollout(inventory, hosts, ctx, rollout, shadow or ShadowPlan())
    options: dict[str, Any] = {"group": group or "", "host": host or "", "model": model, "dry_run": dry_run}
    if rollout is not None:
        options.update(canary=rollout.canary, batch=rollout.batch_text, max_fail_percent=rollout.max_fail_percent,
                       rollout_stopped=bool(summary.get("stopped")))
    run = FleetRun("deploy", results, time.perf_counter() - start, options, rollout=summary)
    if log_to_mlflow and not dry_run:
        _log_to_mlflow(run, hosts, sources.models_dir)
    return run


def shadow(inventory: Inventory, group: str | None = None, host: str | None = None, model: str = DEFAULT_MODEL,
           plan: ShadowPlan | None = None, sources: Sources | None = None, results_dir: Path | None = None,
           log_to_mlflow: bool = True) -> FleetRun:
    """Stage the model's release on each host and run it in shadow beside `current`; switch nothing.

    Each host: probe, push, verify, (engine), health (the candidate is complete and healthy on
    the device but not current), then the service runs it on every k-th live frame for the
    window and the result is judged against the host's `shadow:` thresholds. The report goes to
    reports/fleet/<host>/shadow-<stamp>.json and, per device, to MLflow; a failed judgement (or no
    result) fails the host with every reason.
    """
    start = time.perf_counter()
    hosts, sources = _prepare(inventory, group, host, model, sources)
    _check_shadow_hosts(hosts, "fab shadow")
    plan = plan or ShadowPlan()
    results_dir = results_dir or paths.repo_root() / "reports" / "fleet"
    with new_workdir() as tmp:
        releases, errors = _resolve_releases(hosts, sources, model, Path(tmp))
        ctx = _Deploy(releases, errors, utc_stamp(), results_dir, bench=False)
        results = run_on_hosts(hosts, inventory, lambda conn, h, r: ctx.work(conn, h, r, shadow=plan, switch=False))
    run = FleetRun("shadow", results, time.perf_counter() - start,
                   {"group": group or "", "host": host or "", "model": model,
                    "frames": plan.frames or "", "minutes": plan.minutes or ""})
    if log_to_mlflow:
        _log_to_mlflow(run, hosts, sources.models_dir)
    return run


# --- staged rollouts: canaries in shadow, then batches with a failure budget --------------------

def _current_releases(inventory: Inventory, hosts: Sequence[Host]) -> dict[str, str]:
    """Each reachable host's current release ('' when none); unreachable hosts are left out."""
    def work(conn: Any, h: Host, r: HostResult) -> None:
        with r.step("status"):
            r.release = steps.device_status(conn, h)["current"] or ""

    return {r.host: r.release for r in run_on_hosts(hosts, inventory, work) if r.ok}


def _roll_back_switched(inventory: Inventory, batch: Sequence[Host], results: dict[str, HostResult]) -> list[str]:
    """Roll back the hosts of a stopped batch that this rollout switched; returns their names."""
    switched = [h for h in batch if results[h.name].ok and results[h.name].outcome == "deployed"]
    undone = {r.host: r for r in run_on_hosts(switched, inventory, _rollback_work)}
    for h in switched:
        r, back = results[h.name], undone[h.name]
        r.details["rollback"] = {"ok": back.ok, "release": back.release, "error": back.error,
                                 "service": back.details.get("service")}
        r.timings["rollback"] = round(sum(back.timings.values()), 3)
        if back.ok:
            r.outcome = "rolled-back"
        else:
            r.outcome, r.failed_step = "failed", "rollback"
            r.error = (f"switched, then its batch failed and the rollback to {r.previous or 'the previous release'} "
                       f"failed too: {back.error}")
    return [h.name for h in switched]


def staged_rollout(inventory: Inventory, hosts: Sequence[Host], ctx: _Deploy, rollout: Rollout,
                   plan: ShadowPlan) -> tuple[list[HostResult], dict[str, Any]]:
    """Canaries (shadow, then switch), then batches; stop when a batch's failures exceed the budget.

    Ansible's `serial` + `max_fail_percentage` semantics: a batch stops the rollout when its
    failed hosts are MORE than `max_fail_percent` % of it (an unreachable host is a failed host);
    the canaries must all pass. When the rollout stops, the hosts of the failing batch that this
    run switched are rolled back, later hosts are not touched (`not-reached`), and the summary
    names the host(s) that stopped it and why. Hosts already on their target release count as
    done (`already-current`) and are skipped, so a rerun resumes where the last one stopped.
    """
    current = _current_releases(inventory, hosts)
    results: dict[str, HostResult] = {}
    pending: list[Host] = []
    for h in hosts:
        rel = ctx.releases.get(h.name)
        if rel is not None and current.get(h.name) == rel.manifest.release:
            results[h.name] = HostResult(host=h.name, group=h.group, outcome="already-current",
                                         release=rel.manifest.release, runtime=rel.runtime.name,
                                         details={"model_sha256": rel.manifest.source["model_sha256"],
                                                  "lineage": dict(rel.manifest.source)})
        else:
            pending.append(h)
    canary_names = {h.name for h in hosts[:rollout.canary]}
    canaries = [h for h in pending if h.name in canary_names]
    rest = [h for h in pending if h.name not in canary_names]
    size = rollout.batch_size(len(hosts))
    stages: list[tuple[str, list[Host]]] = [("canary", canaries)] if canaries else []
    stages += [(f"batch {i // size + 1}", rest[i:i + size]) for i in range(0, len(rest), size)]
    summary: dict[str, Any] = {"stopped": False, "stages": [], "already_current": sorted(
        n for n, r in results.items() if r.outcome == "already-current"), "batch_size": size}
    for label, batch in stages:
        if summary["stopped"]:
            for h in batch:
                results[h.name] = HostResult(host=h.name, group=h.group, outcome="not-reached",
                                             details={"stage": label})
            continue
        is_canary = label == "canary"
        done = run_on_hosts(batch, inventory,
                            (lambda conn, h, r: ctx.work(conn, h, r, shadow=plan)) if is_canary else ctx.work)
        for r in done:
            r.details["stage"] = label
            results[r.host] = r
        failed = [r for r in done if not r.ok]
        percent = 100.0 * len(failed) / len(batch)
        over = bool(failed) and (is_canary or percent > rollout.max_fail_percent)
        entry = {"stage": label, "hosts": [h.name for h in batch], "failed": [r.host for r in failed],
                 "fail_percent": round(percent, 1)}
        summary["stages"].append(entry)
        if over:
            budget = ("the canaries must all pass" if is_canary else
                      f"{percent:.0f} % failed, more than --max-fail-percent {rollout.max_fail_percent:g}")
            summary.update(stopped=True, stopped_at=label, by=[r.host for r in failed], budget=budget,
                           why={r.host: (f"[{r.failed_step}] " if r.failed_step else "") + r.error for r in failed})
            entry["rolled_back"] = summary["rolled_back"] = _roll_back_switched(inventory, batch, results)
    summary["not_reached"] = [n for n, r in results.items() if r.outcome == "not-reached"]
    return [results[h.name] for h in hosts], summary


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
    soak_minutes = check_soak_minutes(soak_minutes)
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
        _log_to_mlflow(run, hosts)
    return run


def _rollback_work(conn: Any, h: Host, r: HostResult) -> None:
    """Health-check `previous`, make it current, restart the service there (and wait for it)."""
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


def rollback(inventory: Inventory, group: str | None = None, host: str | None = None) -> FleetRun:
    """Make `previous` current again (after a health check of it); the two swap places.

    A host with a service gets it restarted on the rolled-back release and waited for; if it does
    not come up healthy, the device switches back to where it was and the host fails.
    """
    start = time.perf_counter()
    hosts = [resolve_local_host(h, inventory) for h in inventory.select(group, host)]
    results = run_on_hosts(hosts, inventory, _rollback_work)
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


def collect_frames(inventory: Inventory, group: str | None = None, host: str | None = None,
                   count: int = DEFAULT_COUNT,
                   camera_dir: Path | None = None, meta_dir: Path | None = None) -> FleetRun:
    """Pull the newest `count` camera frames per host into data/camera/<host>/ (for calibrate).

    Their JSON sidecars (detections, reason, release) go to `meta_dir`/<host>/, by default the
    sibling data/camera-meta/ of `camera_dir`: the camera stage accepts only images and videos there.
    """
    count = check_count(count)
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
