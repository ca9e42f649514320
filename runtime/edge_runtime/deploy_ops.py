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
import re
import shutil
import signal
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


def free_space(path: str) -> Dict[str, Optional[int]]:
    """Bytes and inodes an unprivileged user may still use on the filesystem holding `path`
    (the nearest existing folder above it when it does not exist yet); None where unknown."""
    path = os.path.abspath(path)
    while not os.path.isdir(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        st = os.statvfs(path)
    except (OSError, AttributeError):  # AttributeError: no statvfs on this platform
        return {"free_bytes": None, "free_inodes": None}
    # f_favail is 0 on filesystems without an inode limit only when f_files is 0 too (tmpfs nr_inodes=0)
    inodes = st.f_favail if st.f_files else None
    return {"free_bytes": st.f_bavail * st.f_frsize, "free_inodes": inodes}


def _stale_bytes(path: str) -> int:
    """Space a left-over partial upload at `path` holds (0 if absent, or a hard link to another file)."""
    try:
        st = os.lstat(path)
    except OSError:
        return 0
    return st.st_size if st.st_nlink == 1 and not os.path.islink(path) else 0


def probe(a: Args) -> Dict[str, Any]:
    """State before an upload: links, Python version, free space, and per bundle the files still to send.

    `a`: deploy_dir, runtime/releases ({name: {file: [sha, size]}}), dry. Not dry, it creates
    the folders and a `.<name>.partial` stage per missing bundle, hard-links files the device
    already holds in another release (content-addressed reuse), and deletes a stale partial copy
    of each file still to send (it is sent again whole, so its space counts as free).
    `free_bytes`/`free_inodes`: what the deploy dir's filesystem has left for this user (statvfs,
    after those deletions; a dry probe adds the space they would free). None where unknown.
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
    reclaimable = 0
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
                if dry:
                    reclaimable += _stale_bytes(dest)
                else:
                    os.makedirs(os.path.dirname(dest), exist_ok=True)
                    if os.path.lexists(dest) and not os.path.isdir(dest):
                        os.unlink(dest)  # a partial or damaged upload: re-sent whole, free its space first
                need.append(fname)
            out[kind][name] = {"present": False, "need": need, "linked": linked, "stage": stage}
    out.update(free_space(root))
    if out["free_bytes"] is not None:
        out["free_bytes"] += reclaimable
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
    out["service"] = service_status(root)
    return out


def frames(a: Args) -> Dict[str, Any]:
    """The newest `count` image files in the camera frames folder `dir`, with sha256 and size.

    Each frame also names its JSON sidecar (`<stem>.json`, written by the runtime's FrameKeeper:
    time, release, variant, reason, detections) as `sidecar` {name, sha256, size}, or None when
    it has none. The keeper deletes the oldest frames while this runs, so a file that vanishes
    between the listing and its hash is left out (an image) or reported without sidecar.
    """
    d = os.path.abspath(a["dir"])
    if not os.path.isdir(d):
        raise SystemExit("frames folder %s does not exist on the device; is the camera capture running?" % d)

    def describe(name: str) -> Optional[Dict[str, Any]]:
        path = os.path.join(d, name)
        try:
            return {"name": name, "sha256": sha256(path), "size": os.path.getsize(path)}
        except FileNotFoundError:
            return None  # deleted by the frame cap a moment ago

    found = []
    for n in os.listdir(d):
        if n.lower().endswith(FRAME_SUFFIXES) and not n.startswith("."):
            try:
                if os.path.isfile(os.path.join(d, n)):
                    found.append((os.path.getmtime(os.path.join(d, n)), n))
            except FileNotFoundError:
                pass  # deleted by the frame cap between listdir and stat
    chosen = sorted(found, reverse=True)[: a["count"]]
    out = []
    for _, n in sorted(chosen, key=lambda t: t[1]):
        entry = describe(n)
        if entry is None:
            continue
        side = os.path.splitext(n)[0] + ".json"
        entry["sidecar"] = describe(side) if os.path.isfile(os.path.join(d, side)) else None
        out.append(entry)
    return {"dir": d, "available": len(found), "frames": out}


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
    the same guards as separate commands, and stops at the first failure (no switch then). With
    `stage_only` it stops after the health check: the release is on the device, verified and
    healthy, for a shadow run beside `current`.
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
    if a.get("stage_only"):  # a shadow candidate: published and healthy, but not current
        return out
    start = time.time()
    root = os.path.abspath(a["deploy_dir"])
    before = {"current": link_target(os.path.join(root, "current")),
              "previous": link_target(os.path.join(root, "previous"))}
    out["switch"] = switch({"deploy_dir": a["deploy_dir"], "release": a["release"]})
    out["seconds"]["switch"] = round(time.time() - start, 3)
    service = a.get("service")
    if service and service.get("enabled") and a.get("bench"):
        start = time.time()  # the benchmark gets the CPU alone: the service restarts after it anyway
        try:
            out["service_stop"] = service_stop({"deploy_dir": root})
        except (ServiceError, OSError, subprocess.SubprocessError) as e:
            out["service_stop"] = {"error": str(e)}
        out["seconds"]["service_stop"] = round(time.time() - start, 3)
    if a.get("bench"):
        run = device_cli(a, a["bench"]["verb"], a["bench"]["args"], a["bench"]["timeout"])
        out["runs"]["bench"] = run
        out["seconds"]["bench"] = run["seconds"]
    if service:
        answer = service_activate({"deploy_dir": root, "release": a["release"], "before": before, "service": service})
        out["service"] = answer
        out["seconds"].update(answer.get("seconds") or {})
    return out


# --------------------------------------------------------------------------------------------
# The detector as a service: service.json, systemd unit or runtime supervisor, /healthz wait
# --------------------------------------------------------------------------------------------

SERVICE_DIR = "service"  # <deploy_dir>/service/: config, launcher, unit copy, pid/state/log files
SERVICE_CONFIG = "service.json"  # what `serve` reads (written from inventory.yaml's service section)
INSTALL_NAME = "install.json"  # which supervisor the last deploy chose (and the unit's name)
LAUNCHER_NAME = "launch.py"  # systemd's ExecStart: resolves current -> runtime, execs serve there
SUPERVISOR_LOG = "supervisor.log"  # the runtime supervisor's own stdout/stderr (start errors)
SYSTEMD_RUN_DIR = "/run/systemd/system"  # exists iff systemd is the running init (sd_booted(3))
UNIT_DIR = "/etc/systemd/system"
START_LIMIT_INTERVAL_S = 600  # systemd gives up after START_LIMIT_BURST starts in this window ...
START_LIMIT_BURST = 20  # ... (a crash loop; `fab status` shows `failed`, the next deploy resets it)
STOP_TIMEOUT_S = 15.0  # SIGTERM -> SIGKILL for serve (it stops within a few seconds)
FAIL_AFTER_EXITS = 3  # the deploy stops waiting once the new service has exited this many times
UNIT_NAME = re.compile(r"\Aedge-defect-[A-Za-z0-9_.-]+\.service\Z")
RUNTIME_NAME = re.compile(r"\A[0-9a-f]{12}\Z")
ERROR_LINE = re.compile(r"(?i)\b(error|exception|traceback|fatal|critical)\b")

# Written to <deploy_dir>/service/launch.py; the unit runs `<python> launch.py <deploy_dir>`.
# systemd cannot derive a working directory from the manifest `current` points at, so this
# does, then execs serve: the same PID, so Type=notify with NotifyAccess=main sees its READY=1.
LAUNCHER = '''"""systemd's ExecStart for the edge defect service (written by the fleet deploy; do not edit).

Resolves <deploy_dir>/current to its release and the runtime folder its manifest names, and
execs `python -m edge_runtime serve` there, keeping this PID (NotifyAccess=main).
"""
import json
import os
import re
import sys


def main(argv):
    deploy_dir = os.path.abspath(argv[1])
    try:
        release = os.path.basename(os.readlink(os.path.join(deploy_dir, "current")))
        with open(os.path.join(deploy_dir, "releases", release, "manifest.json")) as f:
            runtime = json.load(f)["source"]["runtime"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        sys.stderr.write("error: no usable current release in %s (%s); deploy one with fab deploy\\n" % (deploy_dir, e))
        return 2
    folder = os.path.join(deploy_dir, "runtime", str(runtime))
    if not re.match(r"\\A[0-9a-f]{12}\\Z", str(runtime)) or not os.path.isdir(os.path.join(folder, "edge_runtime")):
        sys.stderr.write("error: release %s names runtime %r, which is not on the device; redeploy\\n"
                         % (release, runtime))
        return 2
    os.chdir(folder)
    os.execv(sys.executable, [sys.executable, "-m", "edge_runtime", "serve", "--deploy-dir", deploy_dir,
                              "--release", os.path.join(deploy_dir, "releases", release)] + argv[2:])


if __name__ == "__main__":
    sys.exit(main(sys.argv))
'''


class ServiceError(RuntimeError):
    """A service step failed; the message says what and how to fix it (reported, never a traceback)."""


def _service_path(root: str, name: str) -> str:
    return os.path.join(root, SERVICE_DIR, name)


def _write_atomic(path: str, text: str, mode: int = 0o644) -> bool:
    """Write `text` via a temp file and os.replace; False (nothing written) when it is already there."""
    try:
        with open(path) as f:
            if f.read() == text:
                return False
    except OSError:
        pass
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = "%s.tmp-%d" % (path, os.getpid())
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, path)
    return True


def _read_json(path: str) -> Optional[Dict[str, Any]]:
    try:
        with open(path) as f:
            doc = json.load(f)
        return doc if isinstance(doc, dict) else None
    except (OSError, ValueError):
        return None


def systemd_running() -> bool:
    """systemd is the init system here (the check sd_booted(3) does)."""
    return os.path.isdir(SYSTEMD_RUN_DIR)


def choose_supervisor(spec: Args) -> str:
    """`systemd` or `runtime` for the inventory's `auto`/`systemd`/`runtime`."""
    wanted = spec.get("supervisor", "auto")
    if wanted == "runtime":
        return "runtime"
    if systemd_running():
        return "systemd"
    if wanted == "systemd":
        raise ServiceError("service.supervisor is systemd but systemd is not running on this device (no %s); set "
                           "service.supervisor to auto or runtime" % SYSTEMD_RUN_DIR)
    return "runtime"


def _seconds(value: float) -> str:
    return ("%.3f" % float(value)).rstrip("0").rstrip(".") + "s"


def unit_text(spec: Args, root: str, python: str, user: str) -> str:
    """The systemd unit for this deploy dir: serve on the current release, restarted on failure.

    Every value comes from the validated inventory or the device itself (no whitespace or shell
    syntax); `%` is doubled because systemd expands %-specifiers in unit files.
    """
    def esc(value: Any) -> str:
        return str(value).replace("%", "%%")

    launcher = _service_path(root, LAUNCHER_NAME)
    device = spec.get("config", {}).get("device", "") or os.path.basename(root)
    lines = [
        "# Written by the fleet deploy (fab deploy) for %s: change inventory.yaml's service section, not this file."
        % esc(device),
        "[Unit]",
        "Description=Edge defect detector service (%s, %s)" % (esc(device), esc(root)),
        "After=network-online.target",
        "Wants=network-online.target",
        "StartLimitIntervalSec=%d" % START_LIMIT_INTERVAL_S,
        "StartLimitBurst=%d" % START_LIMIT_BURST,
        "",
        "[Service]",
        "Type=notify",
        "NotifyAccess=main",
        "User=%s" % esc(user),
        "WorkingDirectory=%s" % esc(root),
        "ExecStart=%s %s %s" % (esc(python), esc(launcher), esc(root)),
        "Restart=always",
        "RestartSec=%s" % _seconds(spec.get("restart_s", 5.0)),
        "TimeoutStartSec=%s" % _seconds(spec.get("healthy_timeout_s", 60.0)),
        "TimeoutStopSec=%s" % _seconds(STOP_TIMEOUT_S),
    ]
    if float(spec.get("watchdog_s", 0) or 0) > 0:
        lines.append("WatchdogSec=%s" % _seconds(spec["watchdog_s"]))
    lines += [
        "Environment=PYTHONUNBUFFERED=1",
        "SyslogIdentifier=%s" % esc(spec["unit"][: -len(".service")]),
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ]
    return "\n".join(lines)


def _run(cmd: List[str], timeout: float = 60.0) -> "subprocess.CompletedProcess[str]":
    return subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=timeout)


SUDO_HELP = ("the deploy user needs root for systemd: log in as root, or allow passwordless sudo for systemctl "
             "and install (e.g. /etc/sudoers.d/edge-defect: `%s ALL=(root) NOPASSWD: /usr/bin/systemctl, "
             "/usr/bin/install`), or set service.supervisor: runtime in inventory.yaml")


def _privileged(cmd: List[str]) -> "subprocess.CompletedProcess[str]":
    """Run `cmd` as root: directly when we are root, else through `sudo -n` (never a password prompt)."""
    full = cmd if os.geteuid() == 0 else ["sudo", "-n"] + cmd
    try:
        p = _run(full)
    except OSError as e:
        raise ServiceError("cannot run %s (%s); %s" % (full[0], e, SUDO_HELP % _user())) from None
    if p.returncode != 0:
        err = (p.stderr or p.stdout).strip().splitlines()
        line = err[-1] if err else "exit %d" % p.returncode
        if full[0] == "sudo" and ("password" in line or line.startswith("sudo:")):
            raise ServiceError("`sudo -n %s` refused (%s): %s" % (" ".join(cmd), line, SUDO_HELP % _user()))
        raise ServiceError("`%s` failed: %s" % (" ".join(cmd), line))
    return p


def _user() -> str:
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name


def _unit_show(unit: str) -> Dict[str, str]:
    """A few properties of the unit (`systemctl show` needs no root)."""
    try:
        p = _run(["systemctl", "show", unit, "-p", "ActiveState", "-p", "SubState", "-p", "Result",
                  "-p", "NRestarts", "-p", "MainPID", "-p", "ExecMainStatus"], timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return dict(line.split("=", 1) for line in p.stdout.splitlines() if "=" in line)


def _journal_error(unit: str) -> str:
    """The unit's last error-looking journal line ("" where the journal is not readable for us)."""
    try:
        p = _run(["journalctl", "-u", unit, "-n", "200", "-o", "cat", "--no-pager", "-q"], timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return _last_error_line(p.stdout.splitlines())


def _last_error_line(lines: List[str]) -> str:
    picked = ""
    for line in lines:
        text = line.strip()
        if text and ERROR_LINE.search(text) and " supervisor[" not in text:
            picked = text
    return picked[:500]


def install_unit(spec: Args, root: str) -> Dict[str, Any]:
    """Write the launcher and the unit, install it, daemon-reload, enable, restart (without blocking)."""
    unit = spec["unit"]
    if not UNIT_NAME.match(unit):
        raise ServiceError("unit name %r is not edge-defect-<host>.service" % unit)
    _write_atomic(_service_path(root, LAUNCHER_NAME), LAUNCHER)
    text = unit_text(spec, root, sys.executable, _user())
    copy = _service_path(root, unit)
    _write_atomic(copy, text)
    target = os.path.join(UNIT_DIR, unit)
    try:
        with open(target) as f:
            installed = f.read() == text
    except OSError:
        installed = False
    if not installed:
        _privileged(["install", "-m", "0644", copy, target])
        _privileged(["systemctl", "daemon-reload"])
    _privileged(["systemctl", "enable", "--quiet", unit])
    _privileged(["systemctl", "reset-failed", unit])  # a crash loop that hit StartLimitBurst starts afresh
    restarts = _unit_show(unit).get("NRestarts", "0")
    _privileged(["systemctl", "--no-block", "restart", unit])  # Type=notify: waiting is service_wait's job
    return {"action": "restart", "unit": unit, "unit_updated": not installed,
            "n_restarts": int(restarts) if restarts.isdigit() else 0}


def _supervisor_pid(root: str) -> Optional[int]:
    """The pid holding <deploy_dir>/service/supervisor.pid's lock (the runtime supervisor), or None."""
    import fcntl

    path = _service_path(root, "supervisor.pid")
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            with open(path) as f:
                text = f.read().strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _stop_runtime_supervisor(root: str, timeout: float = STOP_TIMEOUT_S + 10.0) -> Dict[str, Any]:
    pid = _supervisor_pid(root)
    if pid is None:
        return {"stopped": False, "was_running": False}
    if pid <= 0:
        raise ServiceError("%s is locked but names no pid; stop that supervisor by hand" %
                           _service_path(root, "supervisor.pid"))
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return {"stopped": True, "was_running": False}
    deadline = time.time() + timeout
    while time.time() < deadline:
        if _supervisor_pid(root) is None:
            return {"stopped": True, "was_running": True, "pid": pid}
        time.sleep(0.05)
    raise ServiceError("the supervisor (pid %d) did not stop within %g s" % (pid, timeout))


def _current_runtime(root: str) -> Tuple[str, str]:
    """(release, runtime folder) of `current`; ServiceError when there is none."""
    release = link_target(os.path.join(root, "current"))
    manifest = _read_json(os.path.join(root, "releases", release or "-", "manifest.json"))
    runtime = str(((manifest or {}).get("source") or {}).get("runtime", ""))
    folder = os.path.join(root, "runtime", runtime)
    if release is None or not RUNTIME_NAME.match(runtime) or not os.path.isdir(folder):
        raise ServiceError("no usable current release in %s to run the service on" % root)
    return release, folder


def supervise_options(spec: Args) -> Dict[str, float]:
    """The supervisor's timings from the inventory (what its supervisor.json echoes as `options`)."""
    return {"start_timeout_s": float(spec.get("healthy_timeout_s", 60.0)),
            "watchdog_s": float(spec.get("watchdog_s", 0.0) or 0.0),
            "backoff_initial_s": float(spec.get("restart_s", 5.0)), "stop_timeout_s": STOP_TIMEOUT_S}


def supervise_command(spec: Args, root: str) -> List[str]:
    """`python -m edge_runtime supervise ...` with the inventory's timings."""
    cmd = [sys.executable, "-m", RUNTIME_MODULE, "supervise", "--deploy-dir", root]
    for name, value in sorted(supervise_options(spec).items()):
        cmd += ["--" + name.replace("_", "-"), repr(value)]
    return cmd


def start_runtime_supervisor(spec: Args, root: str) -> Dict[str, Any]:
    """SIGHUP the running supervisor (serve restarts on the new current), or start one, detached.

    A supervisor running other code (another runtime) or other settings is replaced, so its own
    code and timings follow the release. Started with its own session (setsid): it outlives the
    SSH command and never holds the SSH channel (its output goes to service/supervisor.log).
    """
    _release, folder = _current_runtime(root)
    cmd = supervise_command(spec, root)
    pid = _supervisor_pid(root)
    if pid is not None and pid > 0:
        st = _read_json(_service_path(root, "supervisor.json")) or {}
        same = st.get("supervisor_pid") == pid and st.get("supervisor_runtime") == os.path.basename(folder) \
            and st.get("options") == supervise_options(spec)
        if same:
            os.kill(pid, signal.SIGHUP)
            return {"action": "hup", "pid": pid, "generation": int(st.get("generation") or 0) + 1}
        _stop_runtime_supervisor(root)
    log_path = _service_path(root, SUPERVISOR_LOG)
    if os.path.isfile(log_path) and os.path.getsize(log_path) > (1 << 20):
        os.replace(log_path, log_path + ".1")
    with open(log_path, "ab") as log:
        p = subprocess.Popen(cmd, cwd=folder, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True, close_fds=True)
    deadline = time.time() + 20.0
    while time.time() < deadline:
        if p.poll() is not None:
            with open(log_path, errors="replace") as f:
                tail = [ln.strip() for ln in f.read().splitlines() if ln.strip()]
            raise ServiceError("the supervisor exited %s at once: %s"
                               % (p.returncode, tail[-1] if tail else "no output"))
        if _supervisor_pid(root) == p.pid:
            return {"action": "start", "pid": p.pid, "generation": 0}
        time.sleep(0.05)
    raise ServiceError("the supervisor (pid %d) did not take %s within 20 s"
                       % (p.pid, _service_path(root, "supervisor.pid")))


def service_stop(a: Args) -> Dict[str, Any]:
    """Stop the service of this deploy dir, whichever supervisor runs it; `disable` also drops boot start."""
    root = os.path.abspath(a["deploy_dir"])
    install = _read_json(_service_path(root, INSTALL_NAME)) or {}
    out: Dict[str, Any] = {"supervisor": install.get("supervisor")}
    out["runtime"] = _stop_runtime_supervisor(root)
    unit = install.get("unit")
    if install.get("supervisor") == "systemd" and unit and UNIT_NAME.match(unit) and systemd_running():
        _privileged(["systemctl", "disable", "--now", "--quiet", unit] if a.get("disable")
                    else ["systemctl", "stop", unit])
        out["systemd"] = {"unit": unit, "stopped": True, "disabled": bool(a.get("disable"))}
    return out


def _health_url(root: str) -> Optional[str]:
    cfg = _read_json(_service_path(root, SERVICE_CONFIG)) or {}
    try:
        bind, port = str(cfg.get("http_bind") or "127.0.0.1"), int(cfg["http_port"])
    except (KeyError, TypeError, ValueError):
        return None
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(bind, bind)
    return "http://[%s]:%d/healthz" % (host, port) if ":" in host else "http://%s:%d/healthz" % (host, port)


def get_health(url: str, timeout: float = 2.0) -> Tuple[Optional[Dict[str, Any]], str]:
    """(/healthz JSON or None, what answered) -- 503 still has the JSON body that says why."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            body = resp.read()
    except urllib.error.HTTPError as e:
        body = e.read()
    except (urllib.error.URLError, OSError, ValueError) as e:
        return None, "no answer on %s (%s)" % (url, getattr(e, "reason", e))
    try:
        doc = json.loads(body.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None, "%s answered something that is not JSON" % url
    if not isinstance(doc, dict):
        return None, "%s answered something that is not a JSON object" % url
    words = ["/healthz %s" % doc.get("status", "?")]
    if doc.get("problems"):
        words.append("; ".join(str(p) for p in doc["problems"]))
    if doc.get("last_error"):
        words.append("last error: %s" % doc["last_error"])
    return doc, ": ".join(words)


def _log_error(root: str, kind: str, unit: Optional[str]) -> str:
    """The service's last error line: the journal (systemd) or serve.log (runtime supervisor)."""
    if kind == "systemd" and unit:
        return _journal_error(unit)
    st = _read_json(_service_path(root, "supervisor.json")) or {}
    if st.get("last_error"):
        return str(st["last_error"])
    lines: List[str] = []
    for name in ("serve.log.1", "serve.log"):
        try:
            with open(_service_path(root, name), errors="replace") as f:
                lines += f.read().splitlines()[-400:]
        except OSError:
            pass
    return _last_error_line(lines)


def _gave_up(root: str, kind: str, release: str, started: Dict[str, Any]) -> str:
    """Why waiting longer is pointless (the new service keeps exiting), or ""."""
    if kind == "systemd":
        show = _unit_show(started.get("unit", ""))
        restarts = show.get("NRestarts", "0")
        n = (int(restarts) if restarts.isdigit() else 0) - int(started.get("n_restarts") or 0)
        if show.get("ActiveState") == "failed" or n >= FAIL_AFTER_EXITS:
            return "systemd unit %s is %s after %d restart(s) (result %s, exit status %s)" % (
                started.get("unit"), show.get("ActiveState"), n, show.get("Result"), show.get("ExecMainStatus"))
        return ""
    pid = _supervisor_pid(root)
    if pid is None:
        return "the supervisor is not running (see %s)" % _service_path(root, SUPERVISOR_LOG)
    st = _read_json(_service_path(root, "supervisor.json")) or {}
    if st.get("supervisor_pid") != started.get("pid") or int(st.get("generation") or 0) < started.get("generation", 0):
        return ""  # the supervisor has not taken our restart yet
    exit_ = st.get("last_exit") or {}
    if int(st.get("consecutive_failures") or 0) >= FAIL_AFTER_EXITS and exit_.get("release") == release:
        return "serve exited %d times on release %s (last: exit %s)" % (st["consecutive_failures"], release,
                                                                       exit_.get("code"))
    return ""


def service_wait(a: Args) -> Dict[str, Any]:
    """Poll /healthz until it answers ok for `release`, the service gives up, or `timeout` passes."""
    root = os.path.abspath(a["deploy_dir"])
    release, kind, started = a["release"], a["supervisor"], a.get("started") or {}
    old_pid = a.get("old_pid")  # the serve that answered before the restart: its answer does not count
    url = _health_url(root)
    start = time.time()
    deadline = start + float(a["timeout"])
    doc: Optional[Dict[str, Any]] = None
    text, gave_up = "no service.json with http_port in %s" % _service_path(root, ""), ""
    got: Optional[Dict[str, Any]] = None
    while url is not None:
        got, text = get_health(url)
        doc = got or doc
        if got and got.get("ok") is True and got.get("release") == release and (old_pid is None
                                                                                 or got.get("pid") != old_pid):
            return {"ok": True, "seconds": round(time.time() - start, 3), "health": got, "reason": ""}
        gave_up = _gave_up(root, kind, release, started)
        if gave_up or time.time() >= deadline:
            break
        time.sleep(0.25)
    if doc and doc.get("release") not in (None, release):
        text = "/healthz still answers for release %s, not %s (%s)" % (doc.get("release"), release, text)
    elif doc and not got:
        text = "%s; earlier %s" % (text, doc.get("status"))
    why = gave_up or "not healthy within %g s" % float(a["timeout"])
    log = _log_error(root, kind, started.get("unit"))
    reason = "%s: %s; %s" % (why, log, text) if log else "%s: %s" % (why, text)
    return {"ok": False, "seconds": round(time.time() - start, 3), "health": doc, "reason": reason}


def _start_service(spec: Args, root: str, kind: str) -> Dict[str, Any]:
    if kind == "systemd":
        _stop_runtime_supervisor(root)  # switching from the runtime supervisor: never two services
        return install_unit(spec, root)
    install = _read_json(_service_path(root, INSTALL_NAME)) or {}
    if install.get("supervisor") == "systemd" and install.get("unit") and systemd_running():
        _privileged(["systemctl", "disable", "--now", "--quiet", install["unit"]])  # the other way round
    return start_runtime_supervisor(spec, root)


def service_restart(a: Args) -> Dict[str, Any]:
    """Write service.json, (re)start the service on `current` and wait for /healthz ok on `release`.

    `a`: deploy_dir, release, service (the spec the workstation built: enabled, supervisor, unit,
    config, healthy_timeout_s, watchdog_s, restart_s). Never raises: failures are the answer's
    `ok: false` and `reason`.
    """
    root = os.path.abspath(a["deploy_dir"])
    spec = a["service"]
    out: Dict[str, Any] = {"ok": False, "reason": "", "health": None, "supervisor": None, "seconds": {}}
    start = time.time()
    try:
        kind = choose_supervisor(spec)
        out["supervisor"] = kind
        config = dict(spec["config"], frames_dir=os.path.abspath(spec["config"]["frames_dir"]))  # home-relative
        _write_atomic(_service_path(root, SERVICE_CONFIG), json.dumps(config, indent=2, sort_keys=True) + "\n")
        _write_atomic(_service_path(root, INSTALL_NAME), json.dumps(
            {"supervisor": kind, "unit": spec["unit"] if kind == "systemd" else None}, sort_keys=True) + "\n")
        url = _health_url(root)
        before, _ = get_health(url, timeout=1.0) if url else (None, "")
        started = _start_service(spec, root, kind)
        out["started"] = started
        out["seconds"]["service_start"] = round(time.time() - start, 3)
        waited = service_wait({"deploy_dir": root, "release": a["release"], "supervisor": kind, "started": started,
                               "timeout": spec["healthy_timeout_s"], "old_pid": (before or {}).get("pid")})
        out["seconds"]["service_wait"] = waited["seconds"]
        out.update(ok=waited["ok"], reason=waited["reason"], health=waited["health"])
    except (ServiceError, OSError, subprocess.SubprocessError) as e:
        out["reason"] = str(e)
        out["seconds"].setdefault("service_start", round(time.time() - start, 3))
    return out


def service_activate(a: Args) -> Dict[str, Any]:
    """After a switch to `release`: start the service on it; if it does not come up healthy, put the
    links back as they were before (`before`: {current, previous}) and restart the service there.

    With the service disabled, stops (and disables) a service left from an earlier deploy. The
    answer: ok, reason, health, supervisor, seconds and, after a failure, `rollback` (the release
    it went back to, or None when there was none: then `current` is removed and nothing serves).
    """
    root = os.path.abspath(a["deploy_dir"])
    spec = a["service"]
    release = a["release"]
    if not spec.get("enabled"):
        try:
            return {"enabled": False, "ok": True, "stopped": service_stop({"deploy_dir": root, "disable": True}),
                    "seconds": {}}
        except (ServiceError, OSError, subprocess.SubprocessError) as e:
            return {"enabled": False, "ok": False, "reason": "could not stop the service: %s" % e, "seconds": {}}
    out = dict(service_restart(a), enabled=True, rollback=None)
    if out["ok"]:
        return out
    before = a.get("before") or {}
    back = before.get("current")
    if back == release:
        return out  # a redeploy of the release that was already live: nothing to go back to
    start = time.time()
    if back and os.path.isfile(os.path.join(root, "releases", back, "manifest.json")):
        set_link(os.path.join(root, "current"), os.path.join("releases", back))
        if before.get("previous"):
            set_link(os.path.join(root, "previous"), os.path.join("releases", before["previous"]))
        elif os.path.lexists(os.path.join(root, "previous")):
            os.unlink(os.path.join(root, "previous"))
        fsync_dir(root)
        again = service_restart(dict(a, release=back))
        out["rollback"] = {"release": back, "ok": again["ok"], "reason": again["reason"], "health": again["health"]}
    else:  # the first release on this device: no older one to serve, so none is left current
        for name in ("current", "previous"):
            if os.path.lexists(os.path.join(root, name)) and not before.get(name):
                os.unlink(os.path.join(root, name))
        fsync_dir(root)
        try:
            service_stop({"deploy_dir": root})
            out["rollback"] = {"release": None, "ok": True, "reason": "", "health": None}
        except (ServiceError, OSError, subprocess.SubprocessError) as e:
            out["rollback"] = {"release": None, "ok": False, "reason": str(e), "health": None}
    out["seconds"]["rollback"] = round(time.time() - start, 3)
    return out


def service_status(root: str) -> Dict[str, Any]:
    """What `fab status` shows of the service: supervisor, running, release, FPS, restarts, last error."""
    install = _read_json(_service_path(root, INSTALL_NAME))
    if install is None:
        return {"configured": False}
    kind, unit = install.get("supervisor"), install.get("unit")
    out: Dict[str, Any] = {"configured": True, "supervisor": kind, "unit": unit}
    if kind == "systemd" and unit:
        show = _unit_show(unit)
        out.update(active=show.get("ActiveState", "unknown"), running=show.get("ActiveState") == "active",
                   pid=int(show["MainPID"]) if show.get("MainPID", "").isdigit() else None,
                   restarts=int(show["NRestarts"]) if show.get("NRestarts", "").isdigit() else None)
    else:
        pid = _supervisor_pid(root)
        st = _read_json(_service_path(root, "supervisor.json")) or {}
        running = pid is not None and st.get("child_pid") is not None
        out.update(active="active" if running else ("activating" if pid else "inactive"), running=running,
                   supervisor_pid=pid, pid=st.get("child_pid") if pid else None, restarts=st.get("restarts"),
                   crash_loop=st.get("crash_loop"), last_exit_code=st.get("last_exit_code"))
    url = _health_url(root)
    doc, text = get_health(url, timeout=2.0) if url else (None, "no service.json")
    out["healthz"] = doc
    out["health"] = text
    if doc:
        out.update(ok=doc.get("ok") is True, status=doc.get("status"), release=doc.get("release"), fps=doc.get("fps"))
    else:
        out.update(ok=False, status="down", release=None, fps=None)
    out["last_error"] = (doc or {}).get("last_error") or _log_error(root, str(kind), unit)
    return out


# --------------------------------------------------------------------------------------------
# Shadow runs: the running service runs a candidate release beside `current` (edge_runtime/shadow.py)
# --------------------------------------------------------------------------------------------

SHADOW_SUBDIR = "shadow"  # <deploy_dir>/service/shadow/: request.json in, <id>.json out
SHADOW_REQUEST = "request.json"
SHADOW_ID = re.compile(r"\A[A-Za-z0-9_.-]{1,64}\Z")  # = edge_runtime.shadow.SHADOW_ID
SHADOW_RESERVED_IDS = ("request", "rejected")  # their result would be the request itself / the refusals' file
SHADOW_POLL_S = 0.5
SHADOW_HEALTH_MISSES = 6  # consecutive polls /healthz did not answer: the service is gone (or hung)


def _shadow_request_id(path: str) -> Optional[str]:
    doc = _read_json(path)
    return doc.get("id") if doc is not None else None


def _withdraw_shadow(path: str, sid: str) -> None:
    """Remove request.json if it still asks for `sid` (the service then stops that shadow)."""
    if _shadow_request_id(path) == sid:
        try:
            os.unlink(path)
        except OSError:
            pass


def _pid_alive(pid: Any) -> bool:
    """The process exists (True where unknown: no pid, or one we may not signal)."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def shadow_run(a: Args) -> Dict[str, Any]:
    """Run the candidate of `request` in shadow inside the running service; wait for its result.

    `a`: deploy_dir, request (the request.json document: id, candidate, every_k, frames, seconds,
    engines, threads; edge_runtime/shadow.py checks it), timeout (seconds to wait for the result).
    Needs the service running and healthy; remembers its pid, removes an old result of the same
    id, writes the request atomically and polls for `<id>.json`. The answer: ok, result (the
    service's document) or null, reason, crashed (the service restarted or stopped answering
    during the shadow: the candidate may have crashed it), seconds. Never raises for the shadow's
    own failure; after a timeout or a crash the request is withdrawn, so no service runs it again.
    """
    root = os.path.abspath(a["deploy_dir"])
    req = a.get("request")
    timeout = float(a.get("timeout") or 600.0)
    start = time.time()

    def failed(reason: str, crashed: bool = False) -> Dict[str, Any]:
        return {"ok": False, "reason": reason, "crashed": crashed, "result": None,
                "seconds": round(time.time() - start, 3)}

    sid = req.get("id") if isinstance(req, dict) else None
    if not isinstance(sid, str) or not SHADOW_ID.match(sid) or sid in SHADOW_RESERVED_IDS:
        return failed("shadow request id %r: it must be 1 to 64 letters, digits, '_', '.' or '-' (not %s)"
                      % (sid, " or ".join(SHADOW_RESERVED_IDS)))
    url = _health_url(root)
    if url is None:
        return failed("shadow needs the service, and %s has no service.json with an http_port: enable service "
                      "in inventory.yaml and deploy" % _service_path(root, ""))
    health, text = get_health(url)
    if health is None:
        return failed("shadow needs the service running (%s): enable service in inventory.yaml and deploy" % text)
    if health.get("ok") is not True:
        return failed("the service is not healthy (%s); a shadow needs it serving frames" % text)
    if "shadow" not in health:
        return failed("the service's runtime predates shadow runs (its /healthz has no 'shadow'); deploy the "
                      "current runtime first")
    pid = health.get("pid")
    folder = _service_path(root, SHADOW_SUBDIR)
    result_path = os.path.join(folder, sid + ".json")
    request_path = os.path.join(folder, SHADOW_REQUEST)
    if os.path.lexists(result_path):
        os.unlink(result_path)  # an earlier answer to the same id must not be read as this one's
    _write_atomic(request_path, json.dumps(req, sort_keys=True) + "\n")
    deadline = start + timeout
    misses, progress = 0, None
    while True:
        doc = _read_json(result_path)
        if doc is not None and doc.get("id") == sid:
            return {"ok": True, "result": doc, "reason": "", "crashed": False, "seconds": round(time.time() - start, 3)}
        now, text = get_health(url, timeout=2.0)
        crash = ""
        if now is None:
            misses += 1
            if misses >= SHADOW_HEALTH_MISSES or not _pid_alive(pid):
                crash = ("the service stopped answering /healthz during the shadow (pid %s; %s): the candidate may "
                         "have crashed it" % (pid, text))
        else:
            misses = 0
            progress = now.get("shadow") or progress
            if pid is not None and now.get("pid") != pid:
                crash = ("the service restarted during the shadow (pid %s -> %s): the candidate may have crashed it"
                         % (pid, now.get("pid")))
        if crash:
            doc = _read_json(result_path)  # a clean stop writes its partial result before it exits
            if doc is not None and doc.get("id") == sid:
                return {"ok": True, "result": doc, "reason": "", "crashed": False,
                        "seconds": round(time.time() - start, 3)}
            _withdraw_shadow(request_path, sid)
            return failed(crash, crashed=True)
        if time.time() >= deadline:
            break
        time.sleep(SHADOW_POLL_S)
    _withdraw_shadow(request_path, sid)
    seen = (" (it had compared %s frame(s), status %s)" % (progress.get("frames_compared"), progress.get("status"))
            if isinstance(progress, dict) else " (the service never showed it running)")
    return failed("no shadow result within %g s%s; the request was withdrawn, so the service stops the shadow"
                  % (timeout, seen))


OPS: Dict[str, Callable[[Args], Dict[str, Any]]] = {
    "probe": probe, "publish": publish, "switch": switch, "status": status, "frames": frames, "activate": activate,
    "service_restart": service_restart, "service_activate": service_activate, "service_stop": service_stop,
    "service_wait": service_wait,
    "shadow_run": shadow_run,
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
