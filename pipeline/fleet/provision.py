"""`fab provision`: give a device the venv `fab deploy` runs, with no package index on the device.

The workstation probes each device's base python (version, machine, glibc), builds a wheelhouse
for exactly that platform (the runtime's own wheel plus every dependency in
`runtime/pyproject.toml`, fetched with `pip download --only-binary=:all: --platform ...`),
cached under `build/wheelhouse/`, and pushes it content-addressed like a release:
`<deploy_dir>/wheelhouse/<sha12>/`, staged in `.<sha12>.partial/`, verified by sha256 and
renamed by the deploy helper's `publish`. The device then creates the venv that the host's
inventory `python` names (`<venv>/bin/python`) and installs into it with `pip --no-index`.
A marker file in the venv records which wheelhouse it holds, so provisioning an unchanged
device again is one SSH command and sends nothing.

Jetsons: the venv gets `--system-site-packages` so JetPack's tensorrt (and a pycuda built on the
device) stay importable; pycuda itself is never fetched (no wheel, it compiles against CUDA).

The functions named `_device_*` run ON THE DEVICE: their source is sent as `python -c` to the
base python, before any venv exists. They are stdlib only, Python 3.8, without annotations.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import os
import posixpath
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from edge_runtime.fileio import atomic_write_json
from pipeline.config import paths
from pipeline.fleet import steps
from pipeline.fleet.artifacts import Bundle, cached_sha256, runtime_bundle
from pipeline.fleet.inventory import SAFE_VALUE, SYSTEM_FOLDERS, SYSTEM_TREES, Host, Inventory
from pipeline.fleet.remote import RemoteError, last_error_line, parse_json_output, quote_command, run_helper
from pipeline.fleet.results import HostResult
from pipeline.fleet.runner import FleetRun, resolve_local_host, run_on_hosts

DEFAULT_BASE_PYTHON = "python3"  # on the device's PATH: what creates the venv
RUNTIME_DIST = "edge-defect-runtime"
WHEELHOUSE_KIND = "wheelhouse"  # <deploy_dir>/wheelhouse/<sha12>/
MARKER = ".edge-defect-provisioned.json"  # in the venv: which wheelhouse it was installed from
# Extras that are never fetched from PyPI: Jetson's pycuda has no wheel and builds on the device
# against JetPack's CUDA (a JetPack-installed one is visible through --system-site-packages).
DEVICE_BUILT_EXTRAS = frozenset({"jetson"})
# Legacy manylinux names and the glibc they stand for (PEP 600 aliases).
_LEGACY_MANYLINUX = {(2, 17): "manylinux2014", (2, 12): "manylinux2010", (2, 5): "manylinux1"}
_OLD_GLIBC_ARCHS = ("x86_64", "i686")  # the only ones with manylinux tags below glibc 2.17
_VENV_PYTHON = re.compile(r"\A(?P<venv>.+)/bin/python(?P<version>3(\.\d+)?)?\Z")
_NO_WHEEL = (re.compile(r"No matching distribution found for (\S+)"),
             re.compile(r"Could not find a version that satisfies the requirement (\S+)"))
_OFFLINE = ("Failed to establish a new connection", "Network is unreachable", "Temporary failure in name resolution",
            "Name or service not known", "Max retries exceeded")
PIP_TIMEOUT_S = 1800.0
INSTALL_TIMEOUT_S = 1800.0  # opencv + onnxruntime on a Pi's SD card take minutes
CHECK_TIMEOUT_S = 300.0


class ProvisionError(RuntimeError):
    """Provisioning one host failed; the message says what and what to do."""


class ProvisionInputError(ValueError):
    """The hosts cannot be provisioned as the inventory/options stand (reported before any host is touched)."""


# --------------------------------------------------------------------------------------------
# The target platform and the wheelhouse (workstation side)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """What a wheelhouse is built for: CPython version, wheel architecture, glibc version."""

    python: tuple[int, int]
    arch: str  # wheel arch: x86_64, aarch64, armv7l, ...
    glibc: tuple[int, int]

    @classmethod
    def from_facts(cls, facts: dict[str, Any]) -> "Target":
        """The target of a probed base python (`_device_facts`), or ProvisionError naming what is unsupported."""
        if facts.get("implementation") != "cpython":
            raise ProvisionError(f"{facts.get('executable')} is {facts.get('implementation')}, not CPython; the "
                                 "wheels are built for CPython: pass --base-python pointing at CPython 3.8+")
        libc, version = facts.get("libc") or ["", ""]
        if libc != "glibc" or not re.fullmatch(r"\d+\.\d+(\.\d+)?", version or ""):
            raise ProvisionError(f"{facts.get('executable')}: the device's C library is {libc or 'not glibc'} "
                                 f"{version or ''}; only glibc (manylinux) devices can be provisioned")
        arch = str(facts["machine"])
        if facts.get("bits") == 32:  # a 32-bit userland on a 64-bit kernel (Pi OS 32-bit): what pip does
            arch = {"aarch64": "armv7l", "armv8l": "armv7l", "x86_64": "i686"}.get(arch, arch)
        major, minor = (int(x) for x in version.split(".")[:2])
        return cls((int(facts["python"][0]), int(facts["python"][1])), arch, (major, minor))

    @property
    def python_tag(self) -> str:
        """cp311 for CPython 3.11 (the --abi and the cache key)."""
        return f"cp{self.python[0]}{self.python[1]}"

    def platform_tags(self) -> list[str]:
        """Every manylinux tag this glibc runs, newest first (pip takes them as given, no expansion)."""
        floor = 5 if self.arch in _OLD_GLIBC_ARCHS else 17
        tags: list[str] = []
        for minor in range(self.glibc[1], floor - 1, -1) if self.glibc[0] == 2 else []:
            tags.append(f"manylinux_2_{minor}_{self.arch}")
            if (2, minor) in _LEGACY_MANYLINUX and (minor >= 17 or self.arch in _OLD_GLIBC_ARCHS):
                tags.append(f"{_LEGACY_MANYLINUX[(2, minor)]}_{self.arch}")
        return tags

    def describe(self) -> str:
        """CPython 3.11 aarch64 glibc 2.36"""
        return f"CPython {self.python[0]}.{self.python[1]} {self.arch} glibc {self.glibc[0]}.{self.glibc[1]}"

    @property
    def key(self) -> str:
        """cp311-x86_64-glibc2.36: the cache folder's name."""
        return f"{self.python_tag}-{self.arch}-glibc{self.glibc[0]}.{self.glibc[1]}"


@dataclass(frozen=True)
class Wheelhouse:
    """A platform's wheels, as a content-addressed bundle (`name` = sha12 over sorted (file, sha256))."""

    target: Target
    bundle: Bundle  # the wheels + manifest.json
    pins: tuple[str, ...]  # what to install: name==version for each wheel (the runtime with its extras)
    runtime_wheel: str
    pip_wheel: str

    @property
    def name(self) -> str:
        """sha12 of the wheel list: the folder's name on the device."""
        return self.bundle.name

    @property
    def size(self) -> int:
        """Bytes of all files."""
        return sum(size for _, size in self.bundle.entries.values())


def _runtime_project(runtime_root: Path) -> dict[str, Any]:
    try:
        return tomllib.loads((runtime_root / "pyproject.toml").read_text())["project"]
    except (OSError, KeyError, tomllib.TOMLDecodeError) as e:
        raise ProvisionInputError(f"{runtime_root / 'pyproject.toml'}: cannot read the runtime's [project] ({e})") \
            from e


def device_requirements(runtime_root: Path) -> tuple[list[str], list[str]]:
    """(requirements to fetch, extras to install) from runtime/pyproject.toml: the dependencies plus
    every extra except those built on the device (`jetson`: pycuda); pip is added so the venv's
    pip comes from the wheelhouse too (no ensurepip, and one new enough for manylinux_2_x tags)."""
    project = _runtime_project(runtime_root)
    extras = sorted(e for e in project.get("optional-dependencies", {}) if e not in DEVICE_BUILT_EXTRAS)
    reqs = list(project.get("dependencies", []))
    for extra in extras:
        reqs += project["optional-dependencies"][extra]
    return reqs + ["pip"], extras


def _check_python(target: Target, runtime_root: Path) -> None:
    from packaging.specifiers import SpecifierSet

    spec = SpecifierSet(_runtime_project(runtime_root).get("requires-python", ""))
    version = f"{target.python[0]}.{target.python[1]}"
    if version not in spec:
        raise ProvisionError(f"the device's python is {version}; {RUNTIME_DIST} requires Python {spec} "
                             f"({runtime_root / 'pyproject.toml'}): pass --base-python with a newer python")


def _pip(args: Sequence[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", *args]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, stdin=subprocess.DEVNULL,
                              env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired as e:
        raise ProvisionError(f"pip {args[0]} took over {PIP_TIMEOUT_S:.0f} s; is the package index slow?") from e


def pip_failure(output: str, target: Target) -> str:
    """pip's failed `download` output as one line naming the package that has no wheel for `target`."""
    from packaging.requirements import InvalidRequirement, Requirement

    for pattern in _NO_WHEEL:
        m = pattern.search(output)
        if not m:
            continue
        try:
            package = Requirement(m.group(1)).name
        except InvalidRequirement:
            package = m.group(1)
        where = f"{target.describe()} (pip --platform {target.platform_tags()[0] if target.platform_tags() else '?'}" \
                f" ... --python-version {target.python[0]}.{target.python[1]})"
        if any(s in output for s in _OFFLINE):
            return (f"no wheel of {package} for {where} in pip's cache, and the package index is unreachable; "
                    "build the wheelhouse once on a connected workstation (it is kept in build/wheelhouse/)")
        return (f"no wheel of {package} ({m.group(1)}) exists for {where}: it cannot be installed there without "
                "compiling; use a device OS/python that package publishes wheels for (e.g. a 64-bit OS on a Pi)")
    lines = [ln for ln in output.strip().splitlines() if ln.startswith("ERROR")] or output.strip().splitlines()
    return f"pip download for {target.describe()} failed: {lines[-1] if lines else 'no output'}"


def _download_deps(target: Target, reqs: list[str], dest: Path) -> None:
    """pip download every requirement (resolved) as wheels for `target` into `dest` (atomically)."""
    if dest.is_dir():
        return
    if not target.platform_tags():
        raise ProvisionError(f"{target.describe()}: no manylinux tag fits this glibc (manylinux needs glibc 2.17+ "
                             f"on {target.arch})")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        args = ["download", "--only-binary=:all:", "--dest", str(tmp), "--progress-bar", "off",
                "--implementation", "cp", "--python-version", f"{target.python[0]}.{target.python[1]}",
                "--abi", target.python_tag]
        for tag in target.platform_tags():
            args += ["--platform", tag]
        p = _pip(args + reqs)
        if p.returncode != 0:
            raise ProvisionError(pip_failure(p.stdout + "\n" + p.stderr, target))
        try:
            os.rename(tmp, dest)
        except OSError:  # another process finished the same download first: theirs is as good
            if not dest.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _build_runtime_wheel(runtime_root: Path, cache: Path) -> Path:
    """The runtime's own wheel (py3-none-any), built from exactly the files `fab deploy` ships.

    Cached by the runtime bundle's sha12 and built with SOURCE_DATE_EPOCH, so the same source
    gives the same bytes (and so the same wheelhouse name) on every run and workstation.
    """
    bundle = runtime_bundle(runtime_root)
    out = cache / "runtime" / bundle.name
    wheels = sorted(out.glob("*.whl")) if out.is_dir() else []
    if wheels:
        return wheels[0]
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="runtime-wheel-") as tmp:
        src, dist = Path(tmp) / "src", Path(tmp) / "dist"
        for rel, path in bundle.files.items():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, src / rel)
        isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
        p = _pip(["wheel", "--no-deps", *isolation, "-q", "-w", str(dist), str(src)],
                 env={"SOURCE_DATE_EPOCH": "315532800"})
        built = sorted(dist.glob("*.whl"))
        if p.returncode != 0 or len(built) != 1 or not built[0].name.endswith("-py3-none-any.whl"):
            lines = (p.stderr or p.stdout).strip().splitlines()
            raise ProvisionError(f"building the {RUNTIME_DIST} wheel from {runtime_root} failed: "
                                 f"{lines[-1] if lines else [b.name for b in built]}")
        stage = Path(tempfile.mkdtemp(prefix=f".{bundle.name}.", dir=out.parent))
        shutil.copyfile(built[0], stage / built[0].name)
        try:
            os.rename(stage, out)
        except OSError:
            shutil.rmtree(stage, ignore_errors=True)
    return sorted(out.glob("*.whl"))[0]


def build_wheelhouse(target: Target, runtime_root: Path | None = None, cache_dir: Path | None = None) -> Wheelhouse:
    """The wheelhouse for `target`: the runtime's wheel plus its dependencies' wheels for that platform.

    Dependencies are downloaded once per (target, requirement list) into
    `cache_dir/deps/<target.key>-<hash>/` and kept (delete the folder to pick up newer releases);
    the runtime wheel is rebuilt only when its source changes. A package with no wheel for the
    target is a ProvisionError naming it and the platform.
    """
    from packaging.utils import parse_wheel_filename

    runtime_root = runtime_root or paths.repo_root() / paths.RUNTIME_DIR
    cache_dir = cache_dir or paths.repo_root() / "build" / "wheelhouse"
    _check_python(target, runtime_root)
    reqs, extras = device_requirements(runtime_root)
    req_hash = hashlib.sha256(json.dumps(reqs).encode()).hexdigest()[:8]
    deps_dir = cache_dir / "deps" / f"{target.key}-{req_hash}"
    _download_deps(target, reqs, deps_dir)
    runtime_wheel = _build_runtime_wheel(runtime_root, cache_dir)
    files = {p.name: p for p in sorted(deps_dir.glob("*.whl"))}
    files[runtime_wheel.name] = runtime_wheel
    entries = {name: (cached_sha256(p), p.stat().st_size) for name, p in files.items()}
    digest = hashlib.sha256(json.dumps(sorted((n, sha) for n, (sha, _) in entries.items())).encode()).hexdigest()
    name = digest[:12]
    # manifest.json: what the folder holds, in the release manifests' `files` format.
    manifest = cache_dir / "manifests" / name / "manifest.json"
    if not manifest.is_file():
        atomic_write_json(manifest, {"kind": WHEELHOUSE_KIND, "files": {
            n: {"sha256": sha, "size": size} for n, (sha, size) in sorted(entries.items())}})
    files["manifest.json"] = manifest
    entries["manifest.json"] = (cached_sha256(manifest), manifest.stat().st_size)
    pins, pip_wheel = [], ""
    for wheel in sorted(files):
        if not wheel.endswith(".whl"):
            continue
        dist, version, _, _ = parse_wheel_filename(wheel)
        if wheel == runtime_wheel.name:
            pins.append(f"{RUNTIME_DIST}{'[' + ','.join(extras) + ']' if extras else ''}=={version}")
        else:
            pins.append(f"{dist}=={version}")
        if dist == "pip":
            pip_wheel = wheel
    return Wheelhouse(target, Bundle(name, files, entries), tuple(pins), runtime_wheel.name, pip_wheel)


class _WheelhouseCache:
    """One build per target per command, whichever host thread asks first; the others wait for it."""

    def __init__(self, runtime_root: Path | None, cache_dir: Path | None) -> None:
        self.runtime_root, self.cache_dir = runtime_root, cache_dir
        self._lock = threading.Lock()
        self._locks: dict[Target, threading.Lock] = {}
        self._built: dict[Target, Wheelhouse | ProvisionError] = {}

    def get(self, target: Target) -> Wheelhouse:
        with self._lock:
            lock = self._locks.setdefault(target, threading.Lock())
        with lock:
            if target not in self._built:
                try:
                    self._built[target] = build_wheelhouse(target, self.runtime_root, self.cache_dir)
                except ProvisionError as e:
                    self._built[target] = e
            built = self._built[target]
        if isinstance(built, ProvisionError):
            raise ProvisionError(str(built))
        return built


# --------------------------------------------------------------------------------------------
# Device side (sent as `python -c`: stdlib only, Python 3.8, no annotations)
# --------------------------------------------------------------------------------------------


def _device_facts(a):
    """The base python's version, machine, word size and glibc, and the venv's marker."""
    import json
    import os
    import platform
    import struct
    import sys

    root = os.path.abspath(a["deploy_dir"])
    marker = None
    try:
        with open(os.path.join(a["venv"], a["marker"])) as f:
            marker = json.load(f)
    except (OSError, ValueError):
        pass
    return {"python": list(sys.version_info[:3]), "implementation": sys.implementation.name,
            "machine": platform.machine(), "bits": struct.calcsize("P") * 8, "libc": list(platform.libc_ver()),
            "executable": sys.executable, "deploy_dir": root, "marker": marker, "venv": os.path.abspath(a["venv"]),
            "venv_python": os.path.isfile(os.path.join(a["venv"], "bin", "python"))}


def _device_stage(a):
    """Like deploy_ops.probe for one wheelhouse: present, or a `.partial` stage and the files still to send.

    A wheel an earlier wheelhouse already holds (same name, size and sha256) is hard-linked, not sent.
    """
    import hashlib
    import os
    import shutil

    def same(path, sha, size):
        if not os.path.isfile(path) or os.path.getsize(path) != size:
            return False
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest() == sha

    root = os.path.join(os.path.abspath(a["deploy_dir"]), a["kind"])
    final, stage = os.path.join(root, a["name"]), os.path.join(root, "." + a["name"] + ".partial")
    if os.path.isdir(final):
        return {"present": True, "need": [], "linked": [], "stage": stage}
    os.makedirs(stage, exist_ok=True)
    others = [os.path.join(root, n) for n in sorted(os.listdir(root)) if not n.startswith(".")]
    need, linked = [], []
    for fname, (sha, size) in sorted(a["files"].items()):
        dest = os.path.join(stage, fname)
        if same(dest, sha, size):
            continue  # sent by an earlier, interrupted provision
        src = [p for p in (os.path.join(o, fname) for o in others) if same(p, sha, size)]
        if not src:
            need.append(fname)
            continue
        if os.path.lexists(dest):
            os.unlink(dest)
        try:
            os.link(src[0], dest)
        except OSError:
            shutil.copyfile(src[0], dest)
        linked.append(fname)
    return {"present": False, "need": need, "linked": linked, "stage": stage}


def _device_write_marker(a):
    """Write the venv's marker atomically (last step: only a verified install gets one)."""
    import json
    import os

    tmp = a["path"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(a["marker"], f, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, a["path"])
    return {"written": a["path"]}


def _device_call(conn: Any, host: Host, python: str, fn: Callable[[dict[str, Any]], dict[str, Any]],
                 args: dict[str, Any], timeout: float = 120.0) -> dict[str, Any]:
    """Run one `_device_*` function with `python` on the device; its JSON answer."""
    source = textwrap.dedent(inspect.getsource(fn)) + \
        f"\nimport json, sys\njson.dump({fn.__name__}(json.loads(sys.argv[1])), sys.stdout)\n"
    res = conn.run(quote_command([python, "-c", source, json.dumps(args, sort_keys=True)]), timeout=timeout)
    if res.exited != 0:
        raise RemoteError(f"{host.name}: '{python}' failed on the device (exit {res.exited}): {last_error_line(res)}; "
                          "is it Python 3.8+ (--base-python), and can the user write the deploy folder?")
    try:
        return json.loads(res.stdout)
    except json.JSONDecodeError as e:
        raise RemoteError(f"{host.name}: '{python}' printed no JSON: {res.stdout[:200]!r}") from e


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def venv_of(host: Host) -> str:
    """The venv folder the host's inventory `python` lives in, or ProvisionInputError saying how to fix it."""
    m = _VENV_PYTHON.fullmatch(host.python)
    venv = posixpath.normpath(m.group("venv")) if m else ""
    if not m or venv in SYSTEM_FOLDERS or any(venv.startswith(t + "/") for t in SYSTEM_TREES):
        keep = " (created with --system-site-packages, so JetPack's tensorrt stays visible)" \
            if host.kind == "jetson" else ""
        raise ProvisionInputError(
            f"host '{host.name}': python '{host.python}' is not a venv's python (<venv>/bin/python): provision creates "
            f"the venv that deploys run{keep}; set the host's python to e.g. /home/{host.user}/edge-defect-venv/bin/"
            "python in the inventory")
    return venv


def _check_hosts(hosts: Sequence[Host], base_python: str) -> dict[str, str]:
    if not SAFE_VALUE.fullmatch(base_python):
        raise ProvisionInputError(f"--base-python {base_python!r}: letters, digits and _ . , : / @ % + = - only")
    problems, venvs = [], {}
    for h in hosts:
        if h.is_local:
            problems.append(f"host '{h.name}' is kind local: it runs the workstation's own environment "
                            f"({h.python}), which scripts/bootstrap.sh sets up; provision is for SSH devices")
            continue
        try:
            venvs[h.name] = venv_of(h)
        except ProvisionInputError as e:
            problems.append(str(e))
    if problems:
        raise ProvisionInputError("\n".join(problems))
    return venvs


def _pip_install_error(res: Any, wheelhouse: Wheelhouse) -> str:
    out = (res.stdout or "") + "\n" + (res.stderr or "")
    for pattern in _NO_WHEEL:
        m = pattern.search(out)
        if m:
            return (f"pip install on the device found no wheel for {m.group(1)} in wheelhouse {wheelhouse.name} "
                    f"(built for {wheelhouse.target.describe()}); the device's python differs from what was probed, "
                    "or a dependency marker pip evaluated on the workstation: report it")
    return f"pip install failed on the device (exit {res.exited}): {last_error_line(res)}"


def provision(inventory: Inventory, group: str | None = None, host: str | None = None,
              base_python: str = DEFAULT_BASE_PYTHON, force: bool = False, runtime_root: Path | None = None,
              cache_dir: Path | None = None) -> FleetRun:
    """Create each selected device's venv (the inventory's `python`) and install the runtime, offline.

    Per host: probe the base python (SSH 1), build or reuse the platform's wheelhouse here, and
    unless the venv's marker already names it (outcome `unchanged`, nothing sent; `force` skips
    this check): push the missing wheels into `wheelhouse/.<sha12>.partial/`, verify and publish
    (deploy helper), `<base_python> -m venv`, `pip install --no-index` from the wheelhouse, check
    with `python -m edge_runtime info`, write the marker (outcome `provisioned`).
    """
    start = time.perf_counter()
    hosts = [resolve_local_host(h, inventory) for h in inventory.select(group, host)]
    venvs = _check_hosts(hosts, base_python)
    cache = _WheelhouseCache(runtime_root, cache_dir)

    def work(conn: Any, h: Host, r: HostResult) -> None:
        with r.step("probe"):
            facts = _device_call(conn, h, base_python, _device_facts,
                                 {"deploy_dir": h.deploy_dir, "venv": venvs[h.name], "marker": MARKER})
            target = Target.from_facts(facts)
            wanted = _VENV_PYTHON.fullmatch(h.python).group("version") or ""
            have = f"{target.python[0]}.{target.python[1]}"
            if "." in wanted and wanted != have:
                raise ProvisionError(f"the inventory's python {h.python} is Python {wanted}, but {base_python} on the "
                                     f"device is {have}; pass --base-python python{wanted}")
        venv = facts["venv"]  # absolute on the device (an inventory path may be relative to the home)
        vpy = posixpath.join(venv, "bin", "python")
        r.details.update(target=target.describe(), venv=venv, base_python=facts["executable"])
        with r.step("wheelhouse"):
            wh = cache.get(target)
        r.release = wh.name
        r.details.update(wheelhouse_bytes=wh.size, wheels=len(wh.pins))
        marker = {"wheelhouse": wh.name, "base_python": facts["executable"],
                  "system_site_packages": h.kind == "jetson", "pins": list(wh.pins)}
        if not force and facts["venv_python"] and facts["marker"] == marker:
            r.outcome = "unchanged"
            return
        root = facts["deploy_dir"]
        base = replace(h, python=base_python)  # the deploy helper runs before the venv exists
        with r.step("stage"):
            state = {WHEELHOUSE_KIND: {wh.name: _device_stage_call(conn, h, base_python, root, wh)}}
        with r.step("push"):
            publish = steps.upload_bundle(conn, h, WHEELHOUSE_KIND, wh.bundle, state, r)
        if publish is not None:
            with r.step("verify"):
                answer = run_helper(conn, base, "publish", {**publish, "deploy_dir": root})
                if answer["problems"]:
                    raise ProvisionError(f"wheelhouse upload verification failed ({'; '.join(answer['problems'])}); "
                                         "the bad files were removed, re-run provision")
        house = posixpath.join(root, WHEELHOUSE_KIND, wh.name)
        with r.step("venv"):
            _venv(conn, h, base_python, venv, house, wh)
        with r.step("install"):
            pip = ["env", "PIP_CONFIG_FILE=/dev/null", vpy, "-m", "pip", "--isolated", "--disable-pip-version-check",
                   "--no-input", "install", "--no-index", "--find-links", house, "-q"]
            res = conn.run(quote_command([*pip, *wh.pins]) + " && " + quote_command(
                [*pip, "--no-deps", "--force-reinstall", posixpath.join(house, wh.runtime_wheel)]),
                timeout=INSTALL_TIMEOUT_S)
            if res.exited != 0:
                raise ProvisionError(_pip_install_error(res, wh))
        with r.step("check"):
            res = conn.run(f"cd / && {quote_command([vpy, '-m', 'edge_runtime', 'info'])}", timeout=CHECK_TIMEOUT_S)
            if res.exited != 0:
                raise ProvisionError(f"`{vpy} -m edge_runtime info` failed after the install (exit {res.exited}): "
                                     f"{last_error_line(res)}")
            info = parse_json_output(h, "info", res)
            r.details["versions"] = info.get("versions", {})
            if h.runtime == "tensorrt" and not info.get("tensorrt"):
                raise ProvisionError(f"TensorRT is not importable from {vpy} (created with --system-site-packages); "
                                     "install JetPack's python3-libnvinfer for the base python, or run this host "
                                     "with runtime onnxruntime")
            _device_call(conn, h, base_python, _device_write_marker, {"path": posixpath.join(venv, MARKER),
                                                                      "marker": marker})
        r.outcome = "provisioned"

    results = run_on_hosts(hosts, inventory, work)
    return FleetRun("provision", results, time.perf_counter() - start,
                    {"group": group or "", "host": host or "", "base_python": base_python, "force": force})


def _device_stage_call(conn: Any, h: Host, base_python: str, root: str, wh: Wheelhouse) -> dict[str, Any]:
    # deploy_ops.probe only knows "runtime" and "releases"; this does its job for the wheelhouse.
    return _device_call(conn, h, base_python, _device_stage,
                        {"deploy_dir": root, "kind": WHEELHOUSE_KIND, "name": wh.name,
                         "files": {k: list(v) for k, v in wh.bundle.entries.items()}})


def _venv(conn: Any, h: Host, base_python: str, venv: str, house: str, wh: Wheelhouse) -> None:
    """Create (or refresh) the venv without ensurepip, then install the wheelhouse's pip into it.

    The pip comes from the wheelhouse, run from its own wheel: no ensurepip (Debian splits it into
    python3-venv), and never an old system pip seen through --system-site-packages (JetPack's
    pip 20 cannot read manylinux_2_28 tags). The marker goes first, so an install that dies
    half-way is redone by the next provision. `python -m venv` on an existing venv keeps its
    packages and rewrites pyvenv.cfg.
    """
    vpy = posixpath.join(venv, "bin", "python")
    flags = ["--system-site-packages"] if h.kind == "jetson" else []
    pip_whl = posixpath.join(house, wh.pip_wheel)
    bootstrap = quote_command(["env", "PIP_CONFIG_FILE=/dev/null", vpy, posixpath.join(pip_whl, "pip"), "--isolated",
                               "--disable-pip-version-check", "--no-input", "install", "--no-index", "--no-compile",
                               "-q", pip_whl])
    command = (f"rm -f {quote_command([posixpath.join(venv, MARKER)])} && "
               f"{quote_command([base_python, '-m', 'venv', '--without-pip', *flags, venv])} && "
               f"{bootstrap}")
    res = conn.run(command, timeout=INSTALL_TIMEOUT_S)
    if res.exited != 0:
        raise ProvisionError(f"creating the venv {venv} with {base_python} failed (exit {res.exited}): "
                             f"{last_error_line(res)}")
