"""Deploy steps: plain functions taking a connection. Each checks device state before acting, so a
re-run after any failure (or a kill) continues where the last one stopped and never harms the
live release: files are staged under a hidden `.<sha12>.partial/` folder, verified by sha256
and only then renamed into place; `current` changes only after `health` passes.
"""

from __future__ import annotations

import json
import os
import posixpath
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_runtime.fileio import sha256_file
from pipeline.fleet.artifacts import Bundle
from pipeline.fleet.inventory import Host
from pipeline.fleet.remote import DeviceRun, RemoteError, last_error_line, parse_json_output, run_device, run_helper
from pipeline.fleet.results import HostResult

# Device-side time limits. Jetson engine builds take minutes (up to ~20 for big workspaces).
HEALTH_TIMEOUT_S = 300.0
ENGINE_TIMEOUT_S = 3600.0
BENCH_TIMEOUT_S = 3600.0
TRT_MISSING = "TensorRT not available"


class StepError(RuntimeError):
    """A deploy step failed on one host; the message says what and what to do."""


def probe(conn: Any, host: Host, runtime: Bundle | None, release: Bundle | None, dry: bool) -> dict[str, Any]:
    """Look at the deploy dir: current/previous, and which files each bundle still needs.

    Unless `dry`, it also prepares the staging folders and hard-links files the device already
    has in another release (matched by sha256), so only new bytes cross the network.
    """
    args: dict[str, Any] = {"deploy_dir": host.deploy_dir, "dry": dry}
    if runtime is not None:
        args["runtime"] = {runtime.name: {k: list(v) for k, v in runtime.entries.items()}}
    if release is not None:
        args["releases"] = {release.name: {k: list(v) for k, v in release.entries.items()}}
    return run_helper(conn, host, "probe", args)


def upload_bundle(conn: Any, host: Host, kind: str, bundle: Bundle, state: dict[str, Any],
                  result: HostResult) -> dict[str, Any] | None:
    """Upload the files `probe` said are missing into the bundle's staging folder.

    `kind` is `runtime` or `releases`. Returns what `activate` needs to verify and publish the
    folder, or None when it is already published (nothing sent).
    """
    entry = state[kind][bundle.name]
    if entry["present"]:
        return None
    stage = entry["stage"]
    for name in entry["need"]:
        conn.put(str(bundle.files[name]), posixpath.join(stage, name))
        size = bundle.entries[name][1]
        result.bytes_sent += size
        result.files_sent.append(f"{kind}/{bundle.name}/{name}")
        if name.endswith(".onnx"):
            result.model_bytes_sent += size
    result.files_linked += [f"{kind}/{bundle.name}/{n}" for n in entry["linked"]]
    return {"kind": kind, "name": bundle.name, "files": {k: list(v) for k, v in bundle.entries.items()}}


def _verify_problems(answers: list[dict[str, Any]]) -> None:
    problems = [p for a in answers for p in a["problems"]]
    if problems:
        raise StepError(f"upload verification failed ({'; '.join(problems)}); the bad files were removed, "
                        "re-run the deploy")


def _engines_args(host: Host, deploy_dir: str) -> list[str]:
    return ["--engines", posixpath.join(deploy_dir, "engines")] if host.runtime == "tensorrt" else []


def _engine_args(deploy_dir: str, release: str) -> list[str]:
    return ["--release", posixpath.join(deploy_dir, "releases", release),
            "--engines", posixpath.join(deploy_dir, "engines")]


def check_engine(host: Host, res: Any) -> dict[str, Any]:
    """The engine document of a finished `build-engine` (exit, stdout, stderr), or StepError."""
    if res.exited != 0:
        line = last_error_line(res)
        if TRT_MISSING in (res.stderr or "") + (res.stdout or ""):
            raise StepError(f"{TRT_MISSING} on the device ({line}); install JetPack's TensorRT python bindings "
                            "for this python, or deploy this host with runtime onnxruntime")
        raise StepError(f"engine build failed (exit {res.exited}): {line}")
    return parse_json_output(host, "build-engine", res)


def build_engine(conn: Any, host: Host, deploy_dir: str, runtime: str, release: str) -> dict[str, Any]:
    """Build (or reuse, when the cache key matches) the TensorRT engine on the device."""
    res = run_device(conn, host, posixpath.join(deploy_dir, "runtime", runtime), "build-engine",
                     _engine_args(deploy_dir, release), timeout=ENGINE_TIMEOUT_S)
    return check_engine(host, res)


def _health_args(host: Host, deploy_dir: str, release: str) -> list[str]:
    return ["--release", posixpath.join(deploy_dir, "releases", release), *_engines_args(host, deploy_dir)]


def check_health(host: Host, release: str, res: Any) -> dict[str, Any]:
    """The report of a finished `health` (exit, stdout, stderr) when it passed, else StepError."""
    try:
        doc = parse_json_output(host, "health", res)
    except RemoteError as e:
        raise StepError(f"health check of release {release} failed (exit {res.exited}): {last_error_line(res)}; "
                        "current release left unchanged") from e
    if res.exited != 0 or not doc.get("ok", False):
        problems = "; ".join(map(str, doc.get("problems") or [])) or last_error_line(res)
        raise StepError(f"health check of release {release} failed: {problems}; current release left unchanged")
    return doc


def health_check(conn: Any, host: Host, deploy_dir: str, runtime: str, release: str) -> dict[str, Any]:
    """Run `health` on a release: sha256s verified and one inference on its sample image."""
    res = run_device(conn, host, posixpath.join(deploy_dir, "runtime", runtime), "health",
                     _health_args(host, deploy_dir, release), timeout=HEALTH_TIMEOUT_S)
    return check_health(host, release, res)


def switch_release(conn: Any, host: Host, deploy_dir: str, release: str) -> dict[str, Any]:
    """Point `current` at the release (atomic symlink rename); the old current becomes `previous`."""
    return run_helper(conn, host, "switch", {"deploy_dir": deploy_dir, "release": release})


def _bench_args(host: Host, deploy_dir: str, release: str, remote_out: str,
                soak_minutes: float | None = None) -> list[str]:
    # A soak replaces the fixed window: the device reports per-window p50/p95/FPS/temperature.
    window = ["--soak-minutes", str(soak_minutes)] if soak_minutes else ["--iterations", str(host.bench_iterations)]
    return ["--release", posixpath.join(deploy_dir, "releases", release), *_engines_args(host, deploy_dir),
            "--out", remote_out, "--warmup", str(host.bench_warmup), *window]


def check_bench(res: Any) -> None:
    """StepError unless the finished `bench` command exited 0."""
    if res.exited != 0:
        raise StepError(f"benchmark failed (exit {res.exited}): {last_error_line(res)}")


def run_benchmark(conn: Any, host: Host, deploy_dir: str, runtime: str, release: str, stamp: str,
                  soak_minutes: float | None = None) -> str:
    """Run the on-device benchmark (a soak of `soak_minutes` if given); return its JSON path on the device."""
    remote_out = posixpath.join(deploy_dir, "results", f"{stamp}.json")
    res = run_device(conn, host, posixpath.join(deploy_dir, "runtime", runtime), "bench",
                     _bench_args(host, deploy_dir, release, remote_out, soak_minutes),
                     timeout=BENCH_TIMEOUT_S + 60.0 * (soak_minutes or 0.0))
    check_bench(res)
    return remote_out


@dataclass
class Activation:
    """What `activate` did after health passed: the switch, and the benchmark run if asked for."""

    switched: dict[str, Any]
    bench: DeviceRun | None
    bench_out: str | None


def activate(conn: Any, host: Host, deploy_dir: str, runtime: str, release: str, publish: list[dict[str, Any]],
             stamp: str | None, result: HostResult) -> Activation:
    """Verify + publish the uploads, (engine), health, switch, (bench): one SSH command.

    The device runs the steps in order and stops at the first failure, so `current` changes only
    after the health check passed, exactly as with one command per step; the answers are checked
    here with the same functions (`check_health`, ...). Each step's device-side seconds land in
    `result.timings` (verify, engine, health, switch, bench). `stamp` None = no benchmark. The
    benchmark's own failure is left to the caller (`check_bench`): the switch has happened.
    """
    runtime_dir = posixpath.join(deploy_dir, "runtime", runtime)
    args: dict[str, Any] = {"deploy_dir": deploy_dir, "runtime_dir": runtime_dir, "release": release,
                            "publish": publish,
                            "health": {"verb": "health", "args": _health_args(host, deploy_dir, release),
                                       "timeout": HEALTH_TIMEOUT_S}}
    timeout = HEALTH_TIMEOUT_S
    if host.runtime == "tensorrt":
        args["engine"] = {"verb": "build-engine", "args": _engine_args(deploy_dir, release),
                          "timeout": ENGINE_TIMEOUT_S}
        timeout += ENGINE_TIMEOUT_S
    bench_out = posixpath.join(deploy_dir, "results", f"{stamp}.json") if stamp is not None else None
    if bench_out is not None:
        args["bench"] = {"verb": "bench", "args": _bench_args(host, deploy_dir, release, bench_out),
                         "timeout": BENCH_TIMEOUT_S}
        timeout += BENCH_TIMEOUT_S
    answer = run_helper(conn, host, "activate", args, timeout=timeout + 120.0)
    result.timings.update({k: round(float(v), 3) for k, v in answer["seconds"].items()})
    with result.failing_as("verify"):
        _verify_problems(answer["publish"])
    runs = {k: DeviceRun.from_json(v) for k, v in answer["runs"].items()}
    if host.runtime == "tensorrt":
        with result.failing_as("engine"):
            result.engine = check_engine(host, runs["engine"])
    with result.failing_as("health"):
        result.health = check_health(host, release, runs["health"])
    if answer["switch"] is None:  # the device's verdict differed from ours: never guess, report it
        result.failed_step = result.failed_step or "switch"
        raise StepError(f"the device did not switch to release {release} although its health report reads as "
                        "passed; re-run the deploy")
    return Activation(answer["switch"], runs.get("bench"), bench_out)


def fetch_file(conn: Any, remote: str, local: Path) -> Path:
    """Download `remote` to `local` atomically (temp file in the same folder, then os.replace)."""
    local.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{local.name}.", suffix=".part", dir=local.parent)
    os.close(fd)
    try:
        conn.get(remote, tmp)
        os.replace(tmp, local)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return local


def fetch_json(conn: Any, remote: str, local: Path) -> dict[str, Any]:
    """Download a JSON results file and parse it."""
    fetch_file(conn, remote, local)
    try:
        return json.loads(local.read_text())
    except json.JSONDecodeError as e:
        raise StepError(f"{remote} is not valid JSON ({e}); the device benchmark wrote a broken file") from e


def device_status(conn: Any, host: Host) -> dict[str, Any]:
    """current/previous releases, their manifests' sources, last results, engines, temperature."""
    return run_helper(conn, host, "status", {"deploy_dir": host.deploy_dir})


def collect_frames(conn: Any, host: Host, count: int, dest: Path, result: HostResult) -> list[Path]:
    """Pull the newest `count` camera frames into `dest` (skipping ones already here, verified)."""
    listing = run_helper(conn, host, "frames", {"dir": host.frames_dir, "count": count})
    if not listing["frames"]:
        raise StepError(f"no camera frames in {listing['dir']} on the device; start the capture and retry")
    got = []
    for frame in listing["frames"]:
        local = dest / frame["name"]
        if local.is_file() and sha256_file(local) == frame["sha256"]:
            got.append(local)
            continue
        fetch_file(conn, posixpath.join(listing["dir"], frame["name"]), local)
        if sha256_file(local) != frame["sha256"]:
            local.unlink()
            raise StepError(f"frame {frame['name']} changed during download (sha256 mismatch); retry")
        result.bytes_sent += frame["size"]
        got.append(local)
    result.details.update(frames=len(got), available=listing["available"], dest=str(dest))
    return got


def _q(word: str) -> str:
    import shlex

    return shlex.quote(word)
