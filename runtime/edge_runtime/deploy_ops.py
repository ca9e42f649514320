"""The filesystem side of a deploy, run on the device: `python -c <this file> <op> <json args>`.

A deploy needs two commands per host, because every SSH command costs a login shell and a round
trip on the device: `probe` before the upload (make the folders, reuse files the device already
has by sha256) and `activate` after it (verify + publish the staged folders, build the engine,
health-check, switch `current`/`previous` atomically, benchmark). `status` and `frames` serve
`fab status` and `fab collect-frames`.

The workstation sends this file's source as the argument of `python -c`, because `probe` runs
before the runtime is on the device. So it must stay self-contained: stdlib only, no imports
from the rest of `edge_runtime`, Python 3.8+. It prints one JSON document on stdout.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

Args = Dict[str, Any]
RUNTIME_MODULE = "edge_runtime"  # what `device_cli` runs with `python -m`, from the runtime folder
FRAME_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


def sha256(path: str) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def link_target(path: str) -> Optional[str]:
    """The release name a `current`/`previous` symlink points at, or None when there is none."""
    try:
        return os.path.basename(os.readlink(path))
    except OSError:
        return None


def set_link(path: str, target: str) -> None:
    """Point symlink `path` at `target` atomically: a new link, then rename over the old."""
    tmp = "%s.tmp-%d" % (path, os.getpid())
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.symlink(target, tmp)
    os.replace(tmp, path)


def fsync_dir(path: str) -> None:
    """Flush a folder's entries (renames, new links) to disk, so a power cut cannot undo them."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def matches(path: str, sha: str, size: int) -> bool:
    """The file exists with exactly this size and sha256."""
    return os.path.isfile(path) and os.path.getsize(path) == size and sha256(path) == sha


def known_files(root: str) -> Dict[str, Tuple[str, int]]:
    """sha256 -> (path, size) for files of published releases (from their manifests; no rehashing)."""
    index: Dict[str, Tuple[str, int]] = {}
    rel = os.path.join(root, "releases")
    for name in sorted(os.listdir(rel)) if os.path.isdir(rel) else []:
        manifest = os.path.join(rel, name, "manifest.json")
        if name.startswith(".") or not os.path.isfile(manifest):
            continue
        try:
            with open(manifest) as f:
                files = json.load(f).get("files", {})
        except ValueError:
            continue  # a damaged manifest only means its files are not reused
        for fname, entry in files.items():
            index.setdefault(entry.get("sha256"), (os.path.join(rel, name, fname), entry.get("size")))
    return index


def _reuse(src: str, dest: str) -> None:
    """Put an existing copy of the same bytes at `dest`: a hard link where the filesystem allows."""
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    if os.path.lexists(dest):
        os.unlink(dest)
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)


def probe(a: Args) -> Dict[str, Any]:
    """State before an upload: links, Python version, and per bundle the files still to send.

    `a`: deploy_dir, runtime/releases ({name: {file: [sha, size]}}), dry. Not dry, it creates
    the folders and a `.<name>.partial` stage per missing bundle, and hard-links files the
    device already holds in another release (content-addressed reuse).
    """
    root = os.path.abspath(a["deploy_dir"])
    dry = a.get("dry", False)
    out: Dict[str, Any] = {"deploy_dir": root, "current": link_target(os.path.join(root, "current")),
                           "previous": link_target(os.path.join(root, "previous")),
                           "python": sys.version.split()[0]}
    if not dry:
        for sub in ("releases", "runtime", "engines", "results"):
            os.makedirs(os.path.join(root, sub), exist_ok=True)
    index = known_files(root) if a.get("releases") else {}
    for kind in ("runtime", "releases"):
        want = a.get(kind) or {}
        out[kind] = {}
        for name, files in sorted(want.items()):
            final = os.path.join(root, kind, name)
            stage = os.path.join(root, kind, "." + name + ".partial")
            if os.path.isdir(final):
                out[kind][name] = {"present": True, "need": [], "linked": []}
                continue
            if not dry:
                os.makedirs(stage, exist_ok=True)
            need: List[str] = []
            linked: List[str] = []
            for fname, (sha, size) in sorted(files.items()):
                dest = os.path.join(stage, fname)
                if matches(dest, sha, size):
                    continue  # uploaded by an earlier, interrupted deploy
                src = index.get(sha)
                if src and src[1] == size and os.path.isfile(src[0]):
                    if not dry:
                        _reuse(src[0], dest)
                    linked.append(fname)
                    continue
                if not dry:
                    os.makedirs(os.path.dirname(dest), exist_ok=True)
                need.append(fname)
            out[kind][name] = {"present": False, "need": need, "linked": linked, "stage": stage}
    return out


def publish(a: Args) -> Dict[str, Any]:
    """Verify every staged file, make them read-only, rename the stage to its final name.

    `a`: deploy_dir, kind (runtime/releases), name, files. A file that fails its check is
    deleted so the next deploy uploads it again; nothing is published then.
    """
    root = os.path.abspath(a["deploy_dir"])
    final = os.path.join(root, a["kind"], a["name"])
    stage = os.path.join(root, a["kind"], "." + a["name"] + ".partial")
    if os.path.isdir(final):
        return {"published": False, "path": final, "problems": []}
    problems = []
    for fname, (sha, size) in sorted(a["files"].items()):
        path = os.path.join(stage, fname)
        if not matches(path, sha, size):
            problem = "missing" if not os.path.isfile(path) else "sha256 mismatch"
            problems.append("%s: %s after upload" % (fname, problem))
            if os.path.isfile(path):
                os.unlink(path)
    if problems:
        return {"published": False, "path": final, "problems": problems}
    for dirpath, _dirs, names in os.walk(stage):
        for n in names:
            os.chmod(os.path.join(dirpath, n), 0o444)
        fsync_dir(dirpath)
    os.rename(stage, final)
    fsync_dir(os.path.dirname(final))
    return {"published": True, "path": final, "problems": []}


def switch(a: Args) -> Dict[str, Any]:
    """Make releases/<release> current; the old current becomes previous. No-op when already current."""
    root = os.path.abspath(a["deploy_dir"])
    release = a["release"]
    if not os.path.isfile(os.path.join(root, "releases", release, "manifest.json")):
        raise SystemExit("release %s is not on the device (%s)" % (release, os.path.join(root, "releases")))
    cur = link_target(os.path.join(root, "current"))
    prev = link_target(os.path.join(root, "previous"))
    if cur == release:
        return {"changed": False, "current": cur, "previous": prev}
    if cur is not None:
        set_link(os.path.join(root, "previous"), os.path.join("releases", cur))
    set_link(os.path.join(root, "current"), os.path.join("releases", release))
    fsync_dir(root)
    return {"changed": True, "current": release, "previous": cur if cur is not None else prev}


def _manifest_summary(root: str, release: str) -> Dict[str, Any]:
    """backend, precision and source of a published release's manifest."""
    with open(os.path.join(root, "releases", release, "manifest.json")) as f:
        m = json.load(f)
    return {"backend": m.get("backend"), "precision": m.get("precision"), "source": m.get("source", {})}


def max_temperature_c(base: str = "/sys/class/thermal") -> Optional[float]:
    """The hottest thermal zone in degrees C, or None where the kernel exposes none."""
    temps = []
    for zone in sorted(os.listdir(base)) if os.path.isdir(base) else []:
        try:
            with open(os.path.join(base, zone, "temp")) as f:
                temps.append(int(f.read().strip()) / 1000.0)
        except (OSError, ValueError):
            pass  # zones without a readable temp (cooling devices, sensors that are off)
    return max(temps) if temps else None


def status(a: Args) -> Dict[str, Any]:
    """What `fab status` shows: links, their manifests, the last result, engines, temperature."""
    root = os.path.abspath(a["deploy_dir"])
    out: Dict[str, Any] = {"deploy_dir": root, "exists": os.path.isdir(root),
                           "current": link_target(os.path.join(root, "current")),
                           "previous": link_target(os.path.join(root, "previous"))}
    for which in ("current", "previous"):
        if not out[which]:
            continue
        try:
            out[which + "_manifest"] = _manifest_summary(root, out[which])
        except (OSError, ValueError) as e:
            out[which + "_manifest_error"] = str(e)
    results = os.path.join(root, "results")
    names = sorted(n for n in os.listdir(results) if n.endswith(".json")) if os.path.isdir(results) else []
    out["last_result"] = names[-1] if names else None
    if names:
        try:
            with open(os.path.join(results, names[-1])) as f:
                out["last_result_doc"] = json.load(f)
        except (OSError, ValueError):
            out["last_result_doc"] = None
    engines = os.path.join(root, "engines")
    out["engines"] = sorted(n for n in os.listdir(engines) if n.endswith(".engine")) if os.path.isdir(engines) else []
    out["temperature_c"] = max_temperature_c()
    return out


def frames(a: Args) -> Dict[str, Any]:
    """The newest `count` image files in the camera frames folder `dir`, with sha256 and size."""
    d = os.path.abspath(a["dir"])
    if not os.path.isdir(d):
        raise SystemExit("frames folder %s does not exist on the device; is the camera capture running?" % d)
    found = [(os.path.getmtime(os.path.join(d, n)), n) for n in os.listdir(d)
             if n.lower().endswith(FRAME_SUFFIXES) and not n.startswith(".") and os.path.isfile(os.path.join(d, n))]
    chosen = sorted(found, reverse=True)[: a["count"]]
    return {"dir": d, "available": len(found),
            "frames": [{"name": n, "sha256": sha256(os.path.join(d, n)), "size": os.path.getsize(os.path.join(d, n))}
                       for _, n in sorted(chosen, key=lambda t: t[1])]}


def device_cli(a: Args, verb: str, args: List[str], timeout: float) -> Dict[str, Any]:
    """Run `python -m edge_runtime <verb> <args>` from the runtime folder: exit, output, seconds.

    A list of words, no shell: nothing here is re-parsed. Never raises for the command's own
    failure; the workstation reads the result exactly as it reads a separate SSH command's.
    """
    start = time.time()
    try:
        p = subprocess.run([sys.executable, "-m", RUNTIME_MODULE, verb] + list(args), cwd=a["runtime_dir"],
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           universal_newlines=True, timeout=timeout)
        out: Dict[str, Any] = {"exited": p.returncode, "stdout": p.stdout, "stderr": p.stderr}
    except subprocess.TimeoutExpired as e:
        out = {"exited": 124, "stdout": e.stdout or "",
               "stderr": "%s %s timed out after %s s on the device" % (RUNTIME_MODULE, verb, timeout)}
    out["seconds"] = round(time.time() - start, 3)
    return out


def healthy(run: Dict[str, Any]) -> bool:
    """The health command passed: exit 0 and its last JSON line says ok (what the workstation checks too)."""
    if run["exited"] != 0:
        return False
    for line in reversed(run["stdout"].strip().splitlines()):
        if line.strip().startswith("{"):
            try:
                return json.loads(line).get("ok") is True
            except ValueError:
                return False
    return False


def activate(a: Args) -> Dict[str, Any]:
    """Publish the uploaded bundles, (build the engine), health-check, switch only when healthy, (bench).

    One SSH command instead of one per step: every step still runs, in the same order and with
    the same guards as separate commands, and stops at the first failure (no switch then).
    """
    out: Dict[str, Any] = {"publish": [], "runs": {}, "switch": None, "seconds": {}}
    start = time.time()
    for spec in a["publish"]:
        answer = publish(dict(spec, deploy_dir=a["deploy_dir"]))
        out["publish"].append(answer)
        if answer["problems"]:
            out["seconds"]["verify"] = round(time.time() - start, 3)
            return out
    out["seconds"]["verify"] = round(time.time() - start, 3)
    for name in ("engine", "health"):
        if a.get(name):
            run = device_cli(a, a[name]["verb"], a[name]["args"], a[name]["timeout"])
            out["runs"][name] = run
            out["seconds"][name] = run["seconds"]
            if run["exited"] != 0 or (name == "health" and not healthy(run)):
                return out
    start = time.time()
    out["switch"] = switch({"deploy_dir": a["deploy_dir"], "release": a["release"]})
    out["seconds"]["switch"] = round(time.time() - start, 3)
    if a.get("bench"):
        run = device_cli(a, a["bench"]["verb"], a["bench"]["args"], a["bench"]["timeout"])
        out["runs"]["bench"] = run
        out["seconds"]["bench"] = run["seconds"]
    return out


OPS: Dict[str, Callable[[Args], Dict[str, Any]]] = {
    "probe": probe, "publish": publish, "switch": switch, "status": status, "frames": frames, "activate": activate,
}


def main(argv: List[str]) -> int:
    """`<op> <json args>`: run one operation and print its JSON answer on stdout."""
    if len(argv) != 2 or argv[0] not in OPS:
        sys.stderr.write("usage: deploy_ops {%s} '<json args>'\n" % ",".join(sorted(OPS)))
        return 2
    json.dump(OPS[argv[0]](json.loads(argv[1])), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
