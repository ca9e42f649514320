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
from pathlib import Path
from typing import Any

from pipeline.device.fileio import sha256_file
from pipeline.fleet.artifacts import Bundle
from pipeline.fleet.inventory import Host
from pipeline.fleet.remote import (RemoteError, last_error_line, parse_json_output, run_device, run_helper)
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


def push_bundle(conn: Any, host: Host, kind: str, bundle: Bundle, state: dict[str, Any], deploy_dir: str,
                result: HostResult) -> None:
    """Upload the files `probe` said are missing, verify all by sha256, publish the folder.

    `kind` is `runtime` or `releases`. Skips everything when the folder is already published.
    """
    entry = state[kind][bundle.name]
    if entry["present"]:
        return
    stage = entry["stage"]
    for name in entry["need"]:
        conn.put(str(bundle.files[name]), posixpath.join(stage, name))
        size = bundle.entries[name][1]
        result.bytes_sent += size
        result.files_sent.append(f"{kind}/{bundle.name}/{name}")
        if name.endswith(".onnx"):
            result.model_bytes_sent += size
    result.files_linked += [f"{kind}/{bundle.name}/{n}" for n in entry["linked"]]
    answer = run_helper(conn, host, "publish", {"deploy_dir": deploy_dir, "kind": kind, "name": bundle.name,
                                                "files": {k: list(v) for k, v in bundle.entries.items()}})
    if answer["problems"]:
        raise StepError(f"upload verification failed ({'; '.join(answer['problems'])}); the bad files were "
                        "removed, re-run the deploy")


def _engines_args(host: Host, deploy_dir: str) -> list[str]:
    return ["--engines", posixpath.join(deploy_dir, "engines")] if host.runtime == "tensorrt" else []


def build_engine(conn: Any, host: Host, deploy_dir: str, runtime: str, release: str) -> dict[str, Any]:
    """Build (or reuse, when the cache key matches) the TensorRT engine on the device."""
    release_dir = posixpath.join(deploy_dir, "releases", release)
    res = run_device(conn, host, posixpath.join(deploy_dir, "runtime", runtime), "build-engine",
                     ["--release", release_dir, "--engines", posixpath.join(deploy_dir, "engines")],
                     timeout=ENGINE_TIMEOUT_S)
    if res.exited != 0:
        line = last_error_line(res)
        if TRT_MISSING in (res.stderr or "") + (res.stdout or ""):
            raise StepError(f"{TRT_MISSING} on the device ({line}); install JetPack's TensorRT python bindings "
                            "for this python, or deploy this host with runtime onnxruntime")
        raise StepError(f"engine build failed (exit {res.exited}): {line}")
    return parse_json_output(host, "build-engine", res)


def health_check(conn: Any, host: Host, deploy_dir: str, runtime: str, release: str) -> dict[str, Any]:
    """Run `health` on a release: sha256s verified and one inference on its sample image."""
    release_dir = posixpath.join(deploy_dir, "releases", release)
    res = run_device(conn, host, posixpath.join(deploy_dir, "runtime", runtime), "health",
                     ["--release", release_dir, *_engines_args(host, deploy_dir)], timeout=HEALTH_TIMEOUT_S)
    try:
        doc = parse_json_output(host, "health", res)
    except RemoteError as e:
        raise StepError(f"health check of release {release} failed (exit {res.exited}): {last_error_line(res)}; "
                        "current release left unchanged") from e
    if res.exited != 0 or not doc.get("ok", False):
        problems = "; ".join(map(str, doc.get("problems") or [])) or last_error_line(res)
        raise StepError(f"health check of release {release} failed: {problems}; current release left unchanged")
    return doc


def switch_release(conn: Any, host: Host, deploy_dir: str, release: str) -> dict[str, Any]:
    """Point `current` at the release (atomic symlink rename); the old current becomes `previous`."""
    return run_helper(conn, host, "switch", {"deploy_dir": deploy_dir, "release": release})


def run_benchmark(conn: Any, host: Host, deploy_dir: str, runtime: str, release: str, stamp: str) -> str:
    """Run the on-device benchmark; return the path of its JSON results on the device."""
    remote_out = posixpath.join(deploy_dir, "results", f"{stamp}.json")
    res = run_device(conn, host, posixpath.join(deploy_dir, "runtime", runtime), "bench",
                     ["--release", posixpath.join(deploy_dir, "releases", release),
                      *_engines_args(host, deploy_dir), "--out", remote_out,
                      "--warmup", str(host.bench_warmup), "--iterations", str(host.bench_iterations)],
                     timeout=BENCH_TIMEOUT_S)
    if res.exited != 0:
        raise StepError(f"benchmark failed (exit {res.exited}): {last_error_line(res)}")
    return remote_out


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


def release_runtime(conn: Any, host: Host, deploy_dir: str, release: str) -> str:
    """The runtime folder a published release runs with (from its manifest's source.runtime)."""
    res = conn.run(f"cat {_q(posixpath.join(deploy_dir, 'releases', release, 'manifest.json'))}", timeout=60)
    if res.exited != 0:
        raise StepError(f"release {release} has no manifest on the device ({last_error_line(res)})")
    runtime = json.loads(res.stdout).get("source", {}).get("runtime")
    if not runtime:
        raise StepError(f"release {release}'s manifest names no runtime; redeploy it")
    return runtime


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
