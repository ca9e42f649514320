"""Deploy steps: plain functions taking a connection. Each checks device state before acting, so a
re-run after any failure (or a kill) continues where the last one stopped and never harms the
live release: files are staged under a hidden `.<sha12>.partial/` folder, verified by sha256
and only then renamed into place; `current` changes only after `health` passes.
"""

from __future__ import annotations

import errno
import json
import os
import posixpath
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_runtime.fileio import sha256_file
from pipeline.fleet.artifacts import Bundle
from pipeline.fleet.connection import ConnectionLost
from pipeline.fleet.inventory import Host
from pipeline.fleet.remote import (
    DeviceRun,
    RemoteError,
    free_space,
    last_error_line,
    mb,
    no_space_message,
    parse_json_output,
    run_device,
    run_helper,
)
from pipeline.fleet.results import HostResult

# Device-side time limits. Jetson engine builds take minutes (up to ~20 for big workspaces).
HEALTH_TIMEOUT_S = 300.0
ENGINE_TIMEOUT_S = 3600.0
BENCH_TIMEOUT_S = 3600.0
TRT_MISSING = "TensorRT not available"
# Room a deploy needs on the device beyond the files it sends: the benchmark JSON, service.json,
# the service's log, symlink renames. An upload is refused up front when it would leave less.
SPACE_MARGIN_BYTES = 8_000_000


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


def bytes_to_send(state: dict[str, Any], bundles: list[tuple[str, Bundle]]) -> int:
    """Bytes of the files `probe` said each (kind, bundle) still needs."""
    return sum(b.entries[n][1] for kind, b in bundles for n in state[kind][b.name]["need"])


def check_space(host: Host, state: dict[str, Any], bundles: list[tuple[str, Bundle]]) -> None:
    """StepError before any byte is sent when the files still to send (plus SPACE_MARGIN_BYTES) do
    not fit into the free space `probe` measured in the deploy dir (no check when it is unknown)."""
    need = bytes_to_send(state, bundles)
    free = state.get("free_bytes")
    inodes = state.get("free_inodes")
    files = sum(len(state[kind][b.name]["need"]) for kind, b in bundles)
    if need and ((isinstance(free, int) and need + SPACE_MARGIN_BYTES > free) or
                 (isinstance(inodes, int) and files + 16 > inodes)):
        raise StepError(no_space_message(host, state, f"the release needs {mb(need)} plus a {mb(SPACE_MARGIN_BYTES)} "
                                                      "margin; nothing was sent"))


def _upload_error(conn: Any, host: Host, e: OSError, remote: str, still_needed: int) -> StepError:
    """Words for a failed SFTP put. OpenSSH's sftp-server reports a full disk as a bare `Failure`
    (SSH_FX_FAILURE, no errno), so a fresh probe of the free space decides what it was."""
    remover = getattr(conn, "remove", None)
    if remover is not None:  # the partial file only holds space now: it is re-sent whole next time
        try:
            remover(remote)
        except Exception:  # noqa: BLE001, S110 - best effort; the next probe deletes it anyway
            pass
    code = getattr(e, "errno", None)
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StepError(f"device {host.name}: cannot write {remote} ({e.strerror or e}); check that "
                         f"{host.user or 'the user'} can write {posixpath.dirname(remote)} and that its disk is "
                         "not mounted read-only")
    space = free_space(conn, host)
    free, inodes = space.get("free_bytes"), space.get("free_inodes")
    full = code in (errno.ENOSPC, errno.EDQUOT) or inodes == 0 or (
        isinstance(free, int) and still_needed + SPACE_MARGIN_BYTES > free)
    if full:
        return StepError(no_space_message(host, space, f"the upload still needs {mb(still_needed)}") +
                         f" (the SFTP upload of {posixpath.basename(remote)} failed: {e or type(e).__name__})")
    return StepError(f"device {host.name}: the SFTP upload of {remote} failed ({e}"
                     f"{': the SFTP server gave no reason' if code is None else ''}); {mb(free)} and "
                     f"{inodes if inodes is not None else '?'} inodes are free in {space.get('deploy_dir')}, so "
                     f"it is not a full disk: check that {host.user or 'the user'} can write there and the "
                     "device's kernel log (dmesg) for disk errors, then re-run")


def upload_bundle(conn: Any, host: Host, kind: str, bundle: Bundle, state: dict[str, Any],
                  result: HostResult, later_bytes: int = 0) -> dict[str, Any] | None:
    """Upload the files `probe` said are missing into the bundle's staging folder.

    `kind` is `runtime` or `releases`. Returns what `activate` needs to verify and publish the
    folder, or None when it is already published (nothing sent). A failed upload is a StepError
    in words (a full disk says how much is free and how much is still needed, counting
    `later_bytes` of bundles still to come); a dropped connection is `ConnectionLost`.
    """
    entry = state[kind][bundle.name]
    if entry["present"]:
        return None
    stage = entry["stage"]
    for i, name in enumerate(entry["need"]):
        remote = posixpath.join(stage, name)
        try:
            conn.put(str(bundle.files[name]), remote)
        except ConnectionLost:
            raise
        except OSError as e:
            if not os.path.isfile(bundle.files[name]):  # the workstation's own file vanished
                raise StepError(f"{bundle.files[name]} disappeared during the deploy ({e}); re-run") from e
            still = sum(bundle.entries[n][1] for n in entry["need"][i:]) + later_bytes
            raise _upload_error(conn, host, e, remote, still) from e
        size = bundle.entries[name][1]
        result.bytes_sent += size
        result.files_sent.append(f"{kind}/{bundle.name}/{name}")
        if name.endswith(".onnx"):
            result.model_bytes_sent += size
    result.files_linked += [f"{kind}/{bundle.name}/{n}" for n in entry["linked"]]
    return {"kind": kind, "name": bundle.name, "files": {k: list(v) for k, v in bundle.entries.items()}}


def upload_bundles(conn: Any, host: Host, bundles: list[tuple[str, Bundle]], state: dict[str, Any],
                   result: HostResult) -> list[dict[str, Any]]:
    """`upload_bundle` for each (kind, bundle) in order; what `activate` must publish."""
    publish = []
    for i, (kind, bundle) in enumerate(bundles):
        later = bytes_to_send(state, bundles[i + 1:])
        answer = upload_bundle(conn, host, kind, bundle, state, result, later_bytes=later)
        if answer is not None:
            publish.append(answer)
    return publish


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
    """What `activate` did after health passed: the switch, the benchmark run if asked for, and the
    service's (re)start on the new release (with the automatic rollback when it did not come up)."""

    switched: dict[str, Any]
    bench: DeviceRun | None
    bench_out: str | None
    service: dict[str, Any] | None = None


# The service wait on the device: start + /healthz wait, and the same again for a rollback.
SERVICE_MARGIN_S = 90.0


def unit_name(host: Host) -> str:
    """The systemd unit of a host's service: one per inventory host (so per deploy dir)."""
    return f"edge-defect-{host.name}.service"


def service_spec(host: Host) -> dict[str, Any]:
    """What the device's service ops need from the inventory: settings, service.json, the unit's name."""
    s = host.service
    if not s.enabled:
        return {"enabled": False}
    return {"enabled": True, "supervisor": s.supervisor, "unit": unit_name(host),
            "config": s.config(host.name, host.frames_dir), "healthy_timeout_s": s.healthy_timeout_s,
            "watchdog_s": s.watchdog_s, "restart_s": s.restart_s}


def service_timeout(host: Host) -> float:
    """Seconds the device may spend on the service after a switch (start + wait, twice with a rollback)."""
    return 2.0 * (float(host.service.healthy_timeout_s or 0.0) + SERVICE_MARGIN_S) if host.service.enabled else 60.0


def check_service(host: Host, release: str, answer: dict[str, Any] | None) -> None:
    """StepError unless the service came up healthy on `release` (the device has then rolled back)."""
    if answer is None or answer.get("ok"):
        return
    if not answer.get("enabled", True):
        raise StepError(f"{answer.get('reason')}; stop it on the device, or re-run the deploy")
    head = f"service not healthy on release {release} ({answer.get('reason') or 'no reason given'})"
    back = answer.get("rollback")
    if back is None:
        raise StepError(f"{head}; it was already the current release, so there is nothing to roll back to (the "
                        "supervisor keeps restarting it): fix the cause, or `fab rollback`")
    if back.get("release") is None:
        raise StepError(f"{head}; no earlier release on the device to go back to: `current` removed, service "
                        f"stopped{'' if back.get('ok') else ' (stop failed: ' + str(back.get('reason')) + ')'}")
    if back.get("ok"):
        raise StepError(f"{head}; rolled back: release {back['release']} is current again and its service is "
                        "healthy")
    raise StepError(f"{head}; rolled back to release {back['release']}, but its service is not healthy either "
                    f"({back.get('reason')})")


def service_summary(answer: dict[str, Any] | None) -> dict[str, Any]:
    """The part of a service answer worth keeping in a host's result (no full /healthz documents)."""
    if answer is None:
        return {}
    health = answer.get("health") or {}
    back = answer.get("rollback") or {}
    return {"enabled": answer.get("enabled", True), "ok": bool(answer.get("ok")),
            "supervisor": answer.get("supervisor"), "reason": answer.get("reason") or "",
            "release": health.get("release"), "fps": health.get("fps"), "status": health.get("status"),
            "rolled_back_to": back.get("release") if answer.get("rollback") is not None else None,
            "rollback_ok": back.get("ok") if answer.get("rollback") is not None else None}


def service_activate(conn: Any, host: Host, deploy_dir: str, release: str,
                     before: dict[str, str | None]) -> dict[str, Any]:
    """(Re)start the service on `release` (already current) and wait; on failure the device restores
    `before` ({current, previous}) and restarts the service there. One SSH command."""
    args = {"deploy_dir": deploy_dir, "release": release, "before": before, "service": service_spec(host)}
    return run_helper(conn, host, "service_activate", args, timeout=service_timeout(host) + 60.0)


def _device_steps(host: Host, deploy_dir: str, runtime: str, release: str, publish: list[dict[str, Any]]
                  ) -> tuple[dict[str, Any], float]:
    """The `activate` op's arguments for verify + publish, (engine) and health, and their time limit."""
    runtime_dir = posixpath.join(deploy_dir, "runtime", runtime)
    args: dict[str, Any] = {"deploy_dir": deploy_dir, "runtime_dir": runtime_dir, "release": release,
                            "publish": publish, "service": service_spec(host),
                            "health": {"verb": "health", "args": _health_args(host, deploy_dir, release),
                                       "timeout": HEALTH_TIMEOUT_S}}
    timeout = HEALTH_TIMEOUT_S
    if host.runtime == "tensorrt":
        args["engine"] = {"verb": "build-engine", "args": _engine_args(deploy_dir, release),
                          "timeout": ENGINE_TIMEOUT_S}
        timeout += ENGINE_TIMEOUT_S
    return args, timeout


def _check_steps(host: Host, release: str, answer: dict[str, Any], result: HostResult) -> dict[str, DeviceRun]:
    """Check the verify, (engine) and health answers of an `activate` op; StepError at the first failure."""
    result.timings.update({k: round(float(v), 3) for k, v in answer["seconds"].items()})
    with result.failing_as("verify"):
        _verify_problems(answer["publish"])
    runs = {k: DeviceRun.from_json(v) for k, v in answer["runs"].items()}
    if host.runtime == "tensorrt":
        with result.failing_as("engine"):
            result.engine = check_engine(host, runs["engine"])
    with result.failing_as("health"):
        result.health = check_health(host, release, runs["health"])
    return runs


def stage(conn: Any, host: Host, deploy_dir: str, runtime: str, release: str, publish: list[dict[str, Any]],
          result: HostResult) -> None:
    """Verify + publish the uploads, (engine) and health-check the release, without switching to it.

    What a shadow run needs: the candidate complete and healthy on the device while `current`
    keeps serving. One SSH command (the `activate` op with `stage_only`).
    """
    args, timeout = _device_steps(host, deploy_dir, runtime, release, publish)
    args["stage_only"] = True
    answer = run_helper(conn, host, "activate", args, timeout=timeout + 120.0)
    _check_steps(host, release, answer, result)


def activate(conn: Any, host: Host, deploy_dir: str, runtime: str, release: str, publish: list[dict[str, Any]],
             stamp: str | None, result: HostResult) -> Activation:
    """Verify + publish the uploads, (engine), health, switch, (bench), service: one SSH command.

    The device runs the steps in order and stops at the first failure, so `current` changes only
    after the health check passed, exactly as with one command per step; the answers are checked
    here with the same functions (`check_health`, ...). Each step's device-side seconds land in
    `result.timings` (verify, engine, health, switch, bench). `stamp` None = no benchmark. The
    benchmark's own failure is left to the caller (`check_bench`): the switch has happened.

    The service (when the host has one) is stopped before the benchmark, so the benchmark has the
    CPU to itself, and started on the new release after it; if it is not healthy within the host's
    `healthy_timeout_s`, the device puts `current`/`previous` back as they were and restarts the
    service there (`Activation.service`; `check_service` turns that into the host's failure).
    """
    args, timeout = _device_steps(host, deploy_dir, runtime, release, publish)
    bench_out = posixpath.join(deploy_dir, "results", f"{stamp}.json") if stamp is not None else None
    if bench_out is not None:
        args["bench"] = {"verb": "bench", "args": _bench_args(host, deploy_dir, release, bench_out),
                         "timeout": BENCH_TIMEOUT_S}
        timeout += BENCH_TIMEOUT_S
    timeout += service_timeout(host)
    answer = run_helper(conn, host, "activate", args, timeout=timeout + 120.0)
    runs = _check_steps(host, release, answer, result)
    if answer["switch"] is None:  # the device's verdict differed from ours: never guess, report it
        result.failed_step = result.failed_step or "switch"
        raise StepError(f"the device did not switch to release {release} although its health report reads as "
                        "passed; re-run the deploy")
    return Activation(answer["switch"], runs.get("bench"), bench_out, answer.get("service"))


def shadow(conn: Any, host: Host, deploy_dir: str, req: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Ask the device's service to run the candidate of `req` in shadow and wait for its result.

    Returns the device's comparison document; StepError when there is none (no service running,
    the service restarted during the shadow: the candidate may have crashed it, or no result in
    `timeout` seconds). Judging the document is `pipeline.fleet.shadow.judge`'s.
    """
    answer = run_helper(conn, host, "shadow_run", {"deploy_dir": deploy_dir, "request": req, "timeout": timeout},
                        timeout=timeout + 60.0)
    if not answer.get("ok") or not isinstance(answer.get("result"), dict):
        crashed = " (counted as a crash of the candidate)" if answer.get("crashed") else ""
        raise StepError(f"shadow of release {req['candidate']} gave no result: {answer.get('reason') or 'no reason'}"
                        f"{crashed}; `current` was not changed")
    return answer["result"]


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


def collect_frames(conn: Any, host: Host, count: int, dest: Path, result: HostResult,
                   meta_dest: Path | None = None) -> list[Path]:
    """Pull the newest `count` camera frames into `dest` (skipping ones already here, verified).

    With `meta_dest`, each frame's JSON sidecar (the device FrameKeeper's time, release, variant,
    reason, detections) goes to `meta_dest/<stem>.json`: a sibling tree, because the camera stage
    refuses any file in `dest` that is not an image or a video. The sidecar is fetched before its
    image, so a frame here never lacks the sidecar the device had for it.
    """
    listing = run_helper(conn, host, "frames", {"dir": host.frames_dir, "count": count})
    if not listing["frames"]:
        raise StepError(f"no camera frames in {listing['dir']} on the device; start the capture and retry")

    def pull(entry: dict[str, Any], local: Path, what: str) -> None:
        if local.is_file() and sha256_file(local) == entry["sha256"]:
            return  # already here from an earlier collect
        fetch_file(conn, posixpath.join(listing["dir"], entry["name"]), local)
        if sha256_file(local) != entry["sha256"]:
            local.unlink()
            raise StepError(f"{what} {entry['name']} changed during download (sha256 mismatch); retry")
        result.bytes_sent += entry["size"]

    got = []
    sidecars = 0
    for frame in listing["frames"]:
        side = frame.get("sidecar")
        if meta_dest is not None and side:
            pull(side, meta_dest / side["name"], "sidecar")
            sidecars += 1
        local = dest / frame["name"]
        pull(frame, local, "frame")
        got.append(local)
    result.details.update(frames=len(got), sidecars=sidecars, available=listing["available"], dest=str(dest))
    if meta_dest is not None:
        result.details["meta_dest"] = str(meta_dest)
    return got


def _q(word: str) -> str:
    import shlex

    return shlex.quote(word)
