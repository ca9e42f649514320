"""What runs on the device: a stdlib helper passed to `python -c`, and the device runtime CLI.

The helper does the filesystem work of a deploy (probe the deploy dir, reuse files already on
the device by sha256, verify + publish a staged folder, switch the `current`/`previous` symlinks
atomically, report status, list camera frames). A deploy needs two commands per host: `probe`
before the upload and `activate` after it (verify + publish, engine, health, switch, bench),
because every SSH command costs a login shell and a round trip on the device. It is sent as the
argument of `python -c`, so nothing beyond the shipped runtime (`pipeline/__init__.py` and
`pipeline/device/`) is ever installed on the device. Python 3.9+, stdlib only.

Every command is built from `shlex.quote`d words: inventory values cannot become shell syntax.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from typing import Any, Sequence

from pipeline.fleet.inventory import Host

HELPER_SCRIPT = r'''
import hashlib, json, os, sys, time

def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()

def link_target(path):
    try:
        return os.path.basename(os.readlink(path))
    except OSError:
        return None

def set_link(path, target):
    """Point symlink `path` at `target` atomically: a new link, then rename over the old."""
    tmp = "%s.tmp-%d" % (path, os.getpid())
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.symlink(target, tmp)
    os.replace(tmp, path)

def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

def matches(path, sha, size):
    return os.path.isfile(path) and os.path.getsize(path) == size and sha256(path) == sha

def known_files(root):
    """sha256 -> path for files of published releases (from their manifests; no rehashing)."""
    index = {}
    rel = os.path.join(root, "releases")
    for name in sorted(os.listdir(rel)) if os.path.isdir(rel) else []:
        manifest = os.path.join(rel, name, "manifest.json")
        if name.startswith(".") or not os.path.isfile(manifest):
            continue
        try:
            files = json.load(open(manifest)).get("files", {})
        except ValueError:
            continue
        for fname, entry in files.items():
            index.setdefault(entry.get("sha256"), (os.path.join(rel, name, fname), entry.get("size")))
    return index

def probe(a):
    root = os.path.abspath(a["deploy_dir"])
    dry = a.get("dry", False)
    out = {"deploy_dir": root, "current": link_target(os.path.join(root, "current")),
           "previous": link_target(os.path.join(root, "previous")), "python": sys.version.split()[0]}
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
            need, linked = [], []
            for fname, (sha, size) in sorted(files.items()):
                dest = os.path.join(stage, fname)
                if matches(dest, sha, size):
                    continue
                src = index.get(sha)
                if src and src[1] == size and os.path.isfile(src[0]):
                    # Content-addressed reuse: the device already has these bytes in another release.
                    if not dry:
                        os.makedirs(os.path.dirname(dest), exist_ok=True)
                        if os.path.lexists(dest):
                            os.unlink(dest)
                        try:
                            os.link(src[0], dest)
                        except OSError:
                            import shutil
                            shutil.copyfile(src[0], dest)
                    linked.append(fname)
                    continue
                if not dry:
                    os.makedirs(os.path.dirname(dest), exist_ok=True)
                need.append(fname)
            out[kind][name] = {"present": False, "need": need, "linked": linked, "stage": stage}
    return out

def publish(a):
    """Verify every staged file, make them read-only, rename the stage to its final name."""
    root = os.path.abspath(a["deploy_dir"])
    final = os.path.join(root, a["kind"], a["name"])
    stage = os.path.join(root, a["kind"], "." + a["name"] + ".partial")
    if os.path.isdir(final):
        return {"published": False, "path": final, "problems": []}
    problems = []
    for fname, (sha, size) in sorted(a["files"].items()):
        path = os.path.join(stage, fname)
        if not matches(path, sha, size):
            problems.append("%s: %s after upload" % (fname, "missing" if not os.path.isfile(path) else "sha256 mismatch"))
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

def switch(a):
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

def status(a):
    root = os.path.abspath(a["deploy_dir"])
    out = {"deploy_dir": root, "exists": os.path.isdir(root),
           "current": link_target(os.path.join(root, "current")),
           "previous": link_target(os.path.join(root, "previous"))}
    for which in ("current", "previous"):
        if not out[which]:
            continue
        try:
            m = json.load(open(os.path.join(root, "releases", out[which], "manifest.json")))
            out[which + "_manifest"] = {"backend": m.get("backend"), "precision": m.get("precision"),
                                        "source": m.get("source", {})}
        except (OSError, ValueError) as e:
            out[which + "_manifest_error"] = str(e)
    results = os.path.join(root, "results")
    names = sorted(n for n in os.listdir(results) if n.endswith(".json")) if os.path.isdir(results) else []
    out["last_result"] = names[-1] if names else None
    if names:
        try:
            out["last_result_doc"] = json.load(open(os.path.join(results, names[-1])))
        except (OSError, ValueError):
            out["last_result_doc"] = None
    engines = os.path.join(root, "engines")
    out["engines"] = sorted(n for n in os.listdir(engines) if n.endswith(".engine")) if os.path.isdir(engines) else []
    temps = []
    base = "/sys/class/thermal"
    for zone in sorted(os.listdir(base)) if os.path.isdir(base) else []:
        try:
            temps.append(int(open(os.path.join(base, zone, "temp")).read().strip()) / 1000.0)
        except (OSError, ValueError):
            pass
    out["temperature_c"] = max(temps) if temps else None
    return out

def frames(a):
    """The newest `count` image files in the camera frames folder, with sha256 and size."""
    d = os.path.abspath(a["dir"])
    if not os.path.isdir(d):
        raise SystemExit("frames folder %s does not exist on the device; is the camera capture running?" % d)
    exts = (".jpg", ".jpeg", ".png", ".bmp")
    found = [(os.path.getmtime(os.path.join(d, n)), n) for n in os.listdir(d)
             if n.lower().endswith(exts) and not n.startswith(".") and os.path.isfile(os.path.join(d, n))]
    chosen = sorted(found, reverse=True)[: a["count"]]
    return {"dir": d, "available": len(found),
            "frames": [{"name": n, "sha256": sha256(os.path.join(d, n)), "size": os.path.getsize(os.path.join(d, n))}
                       for _, n in sorted(chosen, key=lambda t: t[1])]}

def device_cli(a, verb, args, timeout):
    """Run `python -m pipeline.device <verb> <args>` from the runtime folder: exit, output, seconds.

    A list of words, no shell: nothing here is re-parsed. Never raises for the command's own
    failure; the workstation reads the result exactly as it reads a separate SSH command's.
    """
    import subprocess
    start = time.time()
    try:
        p = subprocess.run([sys.executable, "-m", "pipeline.device", verb] + list(args), cwd=a["runtime_dir"],
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           universal_newlines=True, timeout=timeout)
        out = {"exited": p.returncode, "stdout": p.stdout, "stderr": p.stderr}
    except subprocess.TimeoutExpired as e:
        out = {"exited": 124, "stdout": e.stdout or "",
               "stderr": "pipeline.device %s timed out after %s s on the device" % (verb, timeout)}
    out["seconds"] = round(time.time() - start, 3)
    return out

def healthy(run):
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

def activate(a):
    """Publish the uploaded bundles, (build the engine), health-check, switch only when healthy, (bench).

    One SSH command instead of one per step: every step still runs, in the same order and with
    the same guards as separate commands, and stops at the first failure (no switch then).
    """
    out = {"publish": [], "runs": {}, "switch": None, "seconds": {}}
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

OPS = {"probe": probe, "publish": publish, "switch": switch, "status": status, "frames": frames, "activate": activate}
json.dump(OPS[sys.argv[1]](json.loads(sys.argv[2])), sys.stdout)
'''


class RemoteError(RuntimeError):
    """A command on the device failed; the message carries its exit code and stderr."""


def quote_command(words: Sequence[str]) -> str:
    """Join words into one shell command, each word quoted."""
    return " ".join(shlex.quote(str(w)) for w in words)


def run_helper(conn: Any, host: Host, op: str, args: dict[str, Any], timeout: float = 120.0) -> dict[str, Any]:
    """Run one helper operation on the device and return its JSON answer."""
    command = quote_command([host.python, "-c", HELPER_SCRIPT, op, json.dumps(args, sort_keys=True)])
    result = conn.run(command, timeout=timeout)
    if result.exited != 0:
        err = (result.stderr or result.stdout).strip().splitlines()
        raise RemoteError(f"{host.name}: device step '{op}' failed (exit {result.exited}): "
                          f"{err[-1] if err else 'no output'}; check that '{host.python}' is Python 3.9+ and "
                          f"that {host.user or 'the user'} can write {host.deploy_dir}")
    try:
        return json.loads(result.stdout)
    except json.JSONDecodeError as e:
        raise RemoteError(f"{host.name}: device step '{op}' printed no JSON: {result.stdout[:200]!r}") from e


@dataclass(frozen=True)
class DeviceRun:
    """One device CLI command's outcome as `activate` reports it (the fields of Fabric's Result)."""

    stdout: str
    stderr: str
    exited: int
    seconds: float

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "DeviceRun":
        """Read the helper's {"exited", "stdout", "stderr", "seconds"}."""
        return cls(str(doc.get("stdout") or ""), str(doc.get("stderr") or ""), int(doc["exited"]),
                   float(doc.get("seconds") or 0.0))


def device_command(host: Host, runtime_dir: str, verb: str, args: Sequence[str]) -> str:
    """`cd <runtime> && <python> -m pipeline.device <verb> <args...>`, every word quoted."""
    return f"cd {shlex.quote(runtime_dir)} && " + quote_command([host.python, "-m", "pipeline.device", verb, *args])


def run_device(conn: Any, host: Host, runtime_dir: str, verb: str, args: Sequence[str],
               timeout: float) -> Any:
    """Run the device runtime CLI from the release's runtime folder; return the raw result."""
    return conn.run(device_command(host, runtime_dir, verb, args), timeout=timeout)


def parse_json_output(host: Host, verb: str, result: Any) -> dict[str, Any]:
    """The JSON document a device CLI command printed on stdout (last JSON line wins)."""
    text = (result.stdout or "").strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    tail = (result.stderr or "").strip().splitlines()
    raise RemoteError(f"{host.name}: `pipeline.device {verb}` exited {result.exited} without JSON on stdout"
                      f"{': ' + tail[-1] if tail else ''}")


def last_error_line(result: Any) -> str:
    """The most telling line of a failed command's output (stderr first)."""
    for stream in (result.stderr or "", result.stdout or ""):
        lines = [ln.strip() for ln in stream.strip().splitlines() if ln.strip()]
        if lines:
            return lines[-1]
    return f"exit {result.exited}, no output"
