"""Fleet deploy scaling: deploy to 1, 8 and 32 simulated devices, each behind its own shaped link.

Two modes; the output's first line says which one ran:

netns+tbf (the default, where network namespaces are allowed: root, `unshare -n` and
`ip netns add` work). Every simulated device is a real `sshd -D` in a network namespace of its
own. The deploy tool (this process) runs in a "workstation" namespace whose one veth (the shared
uplink, `tc tbf` 100 Mbit/s each way) goes to a bridge in a "router" namespace; each device hangs
off that bridge through its own veth, shaped with `tc tbf` to 20 Mbit/s each way. Nothing can
leave: the addresses (10.213.0.0/16) exist only inside the namespaces this script creates, the
workstation namespace has no other route, and the machine's own network namespace is not
touched. Each device's sshd, and so everything it starts (login shell, device helper, health,
bench), runs in a cgroup of its own with a CPU quota (cgroup v1 `cpu.cfs_quota_us`, or v2
`cpu.max`), all device cgroups together capped at the machine's cores minus 0.5, so the deploy
tool (in a cgroup beside them, without quota) keeps at least half a core. A quota is a ceiling,
not a guarantee, so weights (`cpu.shares` / `cpu.weight`) hold the shares while other work runs:
the benchmark's cgroups together weigh as much as N + 1 ordinary processes (what the N devices'
processes and the deploy tool would weigh without cgroups), and inside, the deploy tool weighs as
much as all devices together, so busy devices cannot starve it. The per-device quota is the same
at every fleet size, so a device is the same device whether 1 or 32 of them run: by default
(cores - 0.5) / largest size, i.e. 1.5 CPUs / 32 = 0.047 CPU per device on a 2-core machine. That
is a slow device (a real Pi has about a core per inference thread): the sum fits, so the devices
do not take the deploy tool's CPU and their health and bench take the same time at every size,
but every on-device step takes longer than on any real device.

Two things a simulated device would otherwise pay for that a real one does not, both measured
(docs/results.md, "2026-12-02: what the simulated devices were paying for"):
- the workstation user's shell start-up: sshd runs every command through the user's login shell,
  which reads ~/.bashrc; each device's sessions get the device's own folder as HOME
  (tests/fleet/conftest.py), as a real device has a home of its own;
- the kernel's packet processing: it runs as a softirq on top of whatever task the CPU was running
  and, without CONFIG_IRQ_TIME_ACCOUNTING, is charged to that task, mostly some device, against
  its quota; every veth here gets threaded NAPI (a kernel thread outside every device's cgroup;
  needs ethtool, which scripts/bootstrap.sh --with-sshd installs; without it the output says so).

No latency is added: this kernel has no netem qdisc (the script checks and says so), so every
link has the bandwidth of a real one but about zero round-trip time; a real fleet adds its RTT to
each of a deploy's few SSH round trips.

loopback (`--no-netns`, or automatically when namespaces are not allowed): the devices are sshd
processes on 127.0.0.x as in the fleet tests, with no shaping and no CPU quota: all of them share
this machine's cores with the deploy tool, so at 32 devices that sharing, not the tool, sets the
time (what this benchmark measured before it had namespaces).

For each fleet size, on fresh devices: a full deploy (connect, probe, push, verify, health,
switch, on-device benchmark, fetch of its JSON; the benchmark shortened: `--bench-warmup`,
`--bench-iterations`), then a redeploy of the same model, which must move 0 model bytes. A
throw-away 1-device deploy runs first so that every size is measured in a process that has
already imported Fabric/paramiko/onnx/MLflow.

The floor at N devices: max(S / r_device, N * S / R_uplink) + on-device s, where S is the bytes a
device was sent (model + runtime bundle, the results' `bytes_sent`) and on-device s is the slowest
device's verify + health + switch + bench as the device itself timed them during that deploy.
connect, probe and fetch, and the device helper's own start-up in each SSH command, count as the
deploy tool's overhead. Payload bytes are compared with the
link rate, which tbf counts in frame bytes: TCP/IP/Ethernet and SSH framing cost about 5 %, so a
push cannot quite reach its share of the floor. In loopback mode nothing is shaped and the floor is
the on-device steps alone.

Targets (issue): the largest fleet within 1.5x of one device and within 1.3x of its floor; a
redeploy moves 0 model bytes. Each is printed PASS or FAIL. With a shared uplink the floor itself
grows with N (N * S / R_uplink), which the output states next to the first target.

The devices get the model that inventory.yaml's `pis` group deploys, INT8 (`--precision int8`, the
default where --models has yolov8n.int8.onnx; 3.4 MB), or the FP32 ONNX (`--precision fp32`,
12.1 MB; the only one a tiny model built here has). S, and with it the link floor, is 3.6x larger
with FP32.

Usage:  .venv/bin/python benchmarks/fleet.py [--sizes 1 8 32] [--no-netns] [--out table.json]
        [--device-mbit 20] [--uplink-mbit 100] [--device-cpu X] [--bench-warmup 1] [--bench-iterations 3]
        [--precision int8|fp32]
Needs: openssh-server (scripts/bootstrap.sh --with-sshd); for netns+tbf also root, iproute2 (ip, tc).
Without models/yolov8n.onnx it builds a tiny YOLOv8n first (about a minute), as the tests do.
Namespaces (`fbench-<pid>-*`) and cgroups (`fbench-<pid>`) are removed at exit, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterator, Sequence

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
# tests/fleet/conftest.py imports tests/support.py and tests/fleet/fleet_hosts.py (pytest puts both on sys.path)
sys.path[1:1] = [str(REPO / "tests"), str(REPO / "tests" / "fleet")]

PREFIX = f"fbench-{os.getpid()}"  # every namespace and cgroup of this run starts with it
SUBNET = "10.213"  # /16; exists only inside this run's namespaces
DEVICE_PORT = 2222  # each device has its own address; not 22, whose known_hosts lines have no [host]:port
CPU_RESERVED = 0.5  # CPUs no device quota may take: the deploy tool's share
CFS_PERIOD_US = 100_000
CFS_MIN_QUOTA_US = 1_000  # the kernel refuses smaller quotas
STEPS = ("connect", "probe", "push", "verify", "health", "switch", "bench", "activate", "fetch")
DEVICE_STEPS = ("verify", "engine", "health", "switch", "bench")  # timed by the device itself


def _load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def tiny_model(root: Path) -> tuple[Path, Path]:
    """Build a tiny model with the real stages (tests/conftest.py's recipe); return (models, val)."""
    import yaml

    from pipeline.stages import data, export, train
    from pipeline.tools.repro_check import tiny_params

    root.mkdir(parents=True, exist_ok=True)
    params = tiny_params(yaml.safe_load((REPO / "params.yaml").read_text()))
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    os.environ.setdefault("YOLO_CONFIG_DIR", str(root / "yolo"))
    p = str(root / "params.yaml")
    data.main(["--out", str(root / "defects"), "--metrics", str(root / "d.json"), "--headline", str(root / "dh.json"),
               "--params", p])
    train.main(["--data", str(root / "defects" / "dataset.yaml"), "--out", str(root / "w.pt"), "--metrics",
                str(root / "t.json"), "--epochs-csv", str(root / "e.csv"), "--params", p])
    (root / "models").mkdir()
    export.main(["--weights", str(root / "w.pt"), "--data", str(root / "defects"), "--out",
                 str(root / "models" / "yolov8n.onnx"), "--metrics", str(root / "x.json"), "--params", p])
    return root / "models", root / "defects" / "images" / "val"


# --- cleanup that runs however the script ends -------------------------------------------------

class Cleanup:
    """Undo steps run last-in first-out, once: from `finally`, from atexit, and on SIGTERM/SIGHUP."""

    def __init__(self) -> None:
        self._undo: list[tuple[str, Callable[[], None]]] = []
        atexit.register(self.run)
        # Ctrl-C must interrupt (and so clean up) even where the shell started us with SIGINT ignored,
        # as a non-interactive shell does for `cmd &`.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for sig in (signal.SIGTERM, signal.SIGHUP):
            # SystemExit unwinds the main thread through every `finally`, as Ctrl-C's KeyboardInterrupt does.
            signal.signal(sig, lambda signum, _frame: sys.exit(128 + signum))

    def push(self, what: str, undo: Callable[[], None]) -> None:
        """Register `undo` (described as `what` if it fails)."""
        self._undo.append((what, undo))

    def run(self) -> None:
        """Run every registered step; a failing one is reported and the others still run."""
        # A second Ctrl-C (or a SIGTERM) must not cut the cleanup short and leave namespaces behind.
        signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        saved = [signal.signal(s, signal.SIG_IGN) for s in signals]
        try:
            while self._undo:
                what, undo = self._undo.pop()
                try:
                    undo()
                except Exception as e:  # noqa: BLE001 - the remaining steps must still run
                    print(f"cleanup: {what} failed: {e}", file=sys.stderr, flush=True)
        finally:
            for s, handler in zip(signals, saved):
                signal.signal(s, handler)


def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie has let go of its namespaces and cgroup already)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _kill(pids: Sequence[int]) -> None:
    """SIGKILL these pids (all of them processes this run started) and wait until they are gone."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)


# --- network namespaces and tbf links ----------------------------------------------------------

class NetnsUnavailable(RuntimeError):
    """Network namespaces, veth pairs or tbf cannot be set up here."""


def _cmd(*argv: str) -> str:
    """Run an iproute2 command; NetnsUnavailable with its stderr when it fails."""
    try:
        p = subprocess.run(list(argv), capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NetnsUnavailable(f"{' '.join(argv)}: {e}") from e
    if p.returncode != 0:
        raise NetnsUnavailable(f"{' '.join(argv)}: {(p.stderr or p.stdout).strip() or f'exit {p.returncode}'}")
    return p.stdout


def _setns(fd: int) -> None:
    """Move the calling thread into the network namespace `fd` (os.setns from Python 3.12 on)."""
    if hasattr(os, "setns"):
        os.setns(fd, os.CLONE_NEWNET)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _napi_thread(ns: str, dev: str) -> None:
    """Process what `dev` receives in a kernel thread of its own (threaded NAPI, which a veth has once
    GRO is on), outside every device's cgroup.

    Packet processing otherwise runs as a softirq on top of whatever task the CPU was running, and
    this kernel does not account interrupt time apart (no CONFIG_IRQ_TIME_ACCOUNTING): it is charged
    to that task, which under load is mostly some device, against that device's quota. Measured
    without it (2026-12-02): at 32 devices the slowest device's on-device steps took 35 s, not 26 s.
    """
    _cmd("ip", "netns", "exec", ns, "ethtool", "-K", dev, "gro", "on")
    _cmd("ip", "netns", "exec", ns, "sh", "-c", f"echo 1 > /sys/class/net/{dev}/threaded")


def _tbf(ns: str, dev: str, mbit: float) -> None:
    # burst: at least 10 ms of the rate (the kernel tick) and one GSO packet; small next to a model.
    burst = max(96 * 1024, int(mbit * 1e6 / 8 / 100))
    _cmd("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{mbit:g}mbit", "burst", str(burst),
         "latency", "50ms")


class Topology:
    """workstation ns --(uplink veth, tbf)-- router ns with a bridge --(veth per device, tbf)-- device ns.

    Every veth is created straight inside the namespaces (`ip -n ... peer ... netns ...`), so the
    machine's own namespace never holds any of them, nor a route to them.
    """

    def __init__(self, prefix: str, device_mbit: float, uplink_mbit: float) -> None:
        self.prefix, self.device_mbit, self.uplink_mbit = prefix, device_mbit, uplink_mbit
        self.ws, self.rt = f"{prefix}-ws", f"{prefix}-rt"
        self.namespaces: list[str] = []  # created so far, removed in reverse
        self.netem = False
        # Threaded NAPI needs ethtool (GRO on); without it the links still work, but the kernel's
        # packet processing is charged to whichever device happens to run (see _napi_thread).
        self.no_napi_why = "" if shutil.which("ethtool") else "ethtool not installed"

    def _napi(self, ns: str, dev: str) -> None:
        if self.no_napi_why:
            return
        try:
            _napi_thread(ns, dev)
        except NetnsUnavailable as e:  # an older kernel without threaded NAPI for veth: measure without it
            self.no_napi_why = str(e)

    def _add_ns(self, name: str) -> None:
        _cmd("ip", "netns", "add", name)
        self.namespaces.append(name)
        _cmd("ip", "-n", name, "link", "set", "lo", "up")

    def build(self) -> None:
        """The workstation and router namespaces and the shaped uplink; NetnsUnavailable if not allowed."""
        if os.geteuid() != 0:
            raise NetnsUnavailable("not root")
        for tool in ("ip", "tc", "unshare"):
            if shutil.which(tool) is None:
                raise NetnsUnavailable(f"{tool} not installed (iproute2 / util-linux)")
        _cmd("unshare", "-n", "true")
        self._add_ns(self.ws)
        self._add_ns(self.rt)
        _cmd("ip", "-n", self.rt, "link", "add", "br0", "type", "bridge")  # STP off: ports forward at once
        _cmd("ip", "-n", self.rt, "link", "set", "br0", "up")
        _cmd("ip", "-n", self.rt, "link", "add", "up1", "type", "veth", "peer", "name", "up0", "netns", self.ws)
        _cmd("ip", "-n", self.rt, "link", "set", "up1", "master", "br0", "up")
        _cmd("ip", "-n", self.ws, "addr", "add", f"{SUBNET}.0.1/16", "dev", "up0")
        _cmd("ip", "-n", self.ws, "link", "set", "up0", "up")
        self._napi(self.ws, "up0")
        self._napi(self.rt, "up1")
        _tbf(self.ws, "up0", self.uplink_mbit)  # workstation -> fleet: what carries the models
        _tbf(self.rt, "up1", self.uplink_mbit)  # fleet -> workstation
        try:  # latency needs netem; say whether it exists rather than assume
            _cmd("tc", "-n", self.ws, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms")
            _cmd("tc", "-n", self.ws, "qdisc", "del", "dev", "lo", "root")
            self.netem = True
        except NetnsUnavailable:
            self.netem = False

    def add_device(self, i: int) -> tuple[str, str]:
        """Device i's namespace and its shaped veth to the bridge; returns (namespace, address)."""
        ns, port = f"{self.prefix}-d{i:03d}", f"d{i:03d}"
        address = f"{SUBNET}.{1 + i // 250}.{i % 250 + 2}"
        self._add_ns(ns)
        _cmd("ip", "-n", self.rt, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _cmd("ip", "-n", self.rt, "link", "set", port, "master", "br0", "up")
        _cmd("ip", "-n", ns, "addr", "add", f"{address}/16", "dev", "eth0")
        _cmd("ip", "-n", ns, "link", "set", "eth0", "up")
        self._napi(self.rt, port)
        self._napi(ns, "eth0")
        _tbf(self.rt, port, self.device_mbit)  # to the device (the model's direction)
        _tbf(ns, "eth0", self.device_mbit)  # from the device
        return ns, address

    @contextmanager
    def entered(self) -> Iterator[None]:
        """Run the block's thread (and the threads it starts: the runner's pool, paramiko's) in the
        workstation namespace, where the devices are the only reachable addresses."""
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/run/netns/{self.ws}", os.O_RDONLY)
        try:
            _setns(target)
            try:
                yield
            finally:
                _setns(home)
        finally:
            os.close(home)
            os.close(target)

    def remove(self) -> None:
        """Kill what still runs in the device namespaces (our sshds' sessions) and delete every namespace."""
        for ns in reversed(self.namespaces):
            try:
                pids = [int(p) for p in _cmd("ip", "netns", "pids", ns).split()]
            except NetnsUnavailable:
                pids = []
            _kill([p for p in pids if p != os.getpid()])
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, stdin=subprocess.DEVNULL)
        self.namespaces.clear()


def leftover_namespaces() -> list[str]:
    """`fbench-*` namespaces of earlier runs whose process is gone (a SIGKILL leaves them)."""
    try:
        names = [line.split()[0] for line in _cmd("ip", "netns", "list").splitlines() if line.strip()]
    except NetnsUnavailable:
        return []
    stale = []
    for n in names:
        parts = n.split("-")
        if len(parts) >= 3 and parts[0] == "fbench" and parts[1].isdigit() and not Path(f"/proc/{parts[1]}").exists():
            stale.append(n)
    return stale


# --- CPU quotas ---------------------------------------------------------------------------------

class CpuQuota:
    """The benchmark's cgroups: a quota per device, the devices capped together, the deploy tool beside them.

        <name>/              weight of N+1 processes: the benchmark takes from other work on the machine
                             no more than its N devices and the deploy tool would as plain processes
          ws/                this process while it measures; no quota, weighted like all devices together,
                             so busy devices cannot starve the deploy tool of the core they leave it
          devices/           quota: `total_cpus` (the cores minus the deploy tool's reserve)
            devNN/           quota: the per-device CPU; the device's sshd and all it starts

    A quota is only a ceiling; the weights are what hold the shares while other work runs.
    cgroup v1 (`cpu.cfs_quota_us`, `cpu.shares`) or v2 (`cpu.max`, `cpu.weight`).
    """

    def __init__(self, name: str, total_cpus: float, devices: int) -> None:
        v1, v2 = Path("/sys/fs/cgroup/cpu"), Path("/sys/fs/cgroup")
        v2_control = v2 / "cgroup.subtree_control"
        if (v1 / "cpu.cfs_quota_us").is_file():
            self.version, base = 1, v1
        elif v2_control.is_file() and "cpu" in v2_control.read_text().split():
            self.version, base = 2, v2
        else:
            raise OSError("no cgroup CPU controller (v1 /sys/fs/cgroup/cpu, or v2 with +cpu delegated)")
        self.root = base / name
        self.ws, self.devices = self.root / "ws", self.root / "devices"
        self.groups: list[Path] = []  # created so far, removed in reverse
        self._home = self._current(base)
        try:
            self._mkdir(self.root, weight=devices + 1)
            self._mkdir(self.ws, weight=devices)
            self._mkdir(self.devices, weight=devices, cpus=total_cpus)
        except OSError:
            self.remove()
            raise

    def _current(self, base: Path) -> Path:
        """The cgroup this process is in now (to return to before removing ours)."""
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if (self.version == 1 and "cpu" in controllers.split(",")) or (self.version == 2 and controllers == ""):
                return base / path.lstrip("/")
        return base

    def _mkdir(self, group: Path, weight: int, cpus: float | None = None) -> None:
        group.mkdir()
        self.groups.append(group)
        if self.version == 2 and group in (self.root, self.devices):  # their children get controllers of their own
            (group / "cgroup.subtree_control").write_text("+cpu")
        if self.version == 1:
            (group / "cpu.shares").write_text(str(1024 * weight))  # 1024: one ordinary process
        else:
            (group / "cpu.weight").write_text(str(min(10_000, 100 * weight)))  # 100: one ordinary process
        if cpus is not None:
            quota = max(CFS_MIN_QUOTA_US, round(cpus * CFS_PERIOD_US))
            if self.version == 1:
                (group / "cpu.cfs_period_us").write_text(str(CFS_PERIOD_US))
                (group / "cpu.cfs_quota_us").write_text(str(quota))
            else:
                (group / "cpu.max").write_text(f"{quota} {CFS_PERIOD_US}")

    def add(self, device: str, cpus: float) -> Path:
        """A cgroup for `device` limited to `cpus`; returns its cgroup.procs (write a pid to move it in)."""
        group = self.devices / device
        self._mkdir(group, weight=1, cpus=cpus)
        return group / "cgroup.procs"

    @contextmanager
    def deploy_tool(self) -> Iterator[None]:
        """This process (all its threads) in the `ws` cgroup inside the block, back where it was after."""
        (self.ws / "cgroup.procs").write_text(str(os.getpid()))
        try:
            yield
        finally:
            (self._home / "cgroup.procs").write_text(str(os.getpid()))

    def throttled_s(self) -> float:
        """Seconds the device cgroups spent throttled by their quotas so far (summed over devices)."""
        total = 0.0
        for group in self.groups:
            if group.parent != self.devices:
                continue
            stat = dict(line.split() for line in (group / "cpu.stat").read_text().splitlines() if line.strip())
            total += int(stat.get("throttled_time", 0)) / 1e9 if self.version == 1 \
                else int(stat.get("throttled_usec", 0)) / 1e6
        return total

    def remove(self) -> None:
        """Kill what is left in our cgroups (processes our sshds started), leave ws, remove the cgroups."""
        if self.ws.exists() and str(os.getpid()) in (self.ws / "cgroup.procs").read_text().split():
            (self._home / "cgroup.procs").write_text(str(os.getpid()))
        for group in reversed(self.groups):
            if group.exists():
                procs = [int(p) for p in (group / "cgroup.procs").read_text().split()]
                _kill([p for p in procs if p != os.getpid()])
                _rmdir(group)
        self.groups.clear()


def _rmdir(group: Path) -> None:
    deadline = time.monotonic() + 5
    while True:
        try:
            group.rmdir()
            return
        except OSError:  # EBUSY while a killed task is still being reaped
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


# --- measuring ----------------------------------------------------------------------------------

def _cpu_s(pids: list[int]) -> float:
    """user+sys CPU seconds of these processes and all their reaped children (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return total / tick


def _devices_cpu_s(pids: list[int]) -> float:
    """Device CPU once every SSH session has ended (sshd reaps a session just after we close it)."""
    last = _cpu_s(pids)
    for _ in range(20):
        time.sleep(0.25)
        now = _cpu_s(pids)
        if now == last:
            return now
        last = now
    return last


def _self_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def cpu_name() -> str:
    """The CPU's model name and whether it has AVX2 / AVX-512 VNNI (what the ORT kernels use)."""
    model = ""
    flags: set[str] = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and not model:
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    extras = [f for f in ("avx2", "avx512_vnni") if f in flags]
    return f"{model or 'unknown CPU'} ({', '.join(extras) or 'no AVX2'}), {os.cpu_count()} cores"


@dataclass
class SizeRow:
    """Everything measured at one fleet size (seconds unless named otherwise)."""

    n: int
    deploy_s: float
    floor_s: float
    link_s: float  # max(S / r_device, N*S / R_uplink); 0 in loopback mode (unshaped)
    on_device_s: float  # slowest device's verify+health+switch+bench, timed on the device
    push_s: float  # slowest device's push
    bytes_per_device: int  # S: bytes sent to the device that was sent the most
    bytes_total: int
    redeploy_s: float
    redeploy_model_bytes: int
    redeploy_bytes: int
    device_cpu_s: float  # the devices' sshd trees during the full deploy
    throttled_s: float  # summed over devices: time their quota held them back (netns mode)
    ws_cpu_s: float  # this process during the full deploy
    failed: int
    errors: list[str] = field(default_factory=list)
    steps: dict[str, tuple[float, float]] = field(default_factory=dict)  # step -> (mean, max) over devices


def measure(n: int, first: Any, again: Any, device_mbit: float | None, uplink_mbit: float | None, device_cpu: float,
            throttled: float, ws_cpu: float) -> SizeRow:
    """One size's row from its full deploy (`first`) and redeploy (`again`); rates None = unshaped."""
    results = first.results
    sent = [r.bytes_sent for r in results]
    s_max = max(sent)
    link = max(s_max * 8 / (device_mbit * 1e6), sum(sent) * 8 / (uplink_mbit * 1e6)) \
        if device_mbit and uplink_mbit else 0.0
    on_device = max(sum(r.timings.get(k, 0.0) for k in DEVICE_STEPS) for r in results)
    failed = [r for r in first.results + again.results if not r.ok]
    return SizeRow(
        n=n, deploy_s=first.wall_s, floor_s=link + on_device, link_s=link, on_device_s=on_device,
        push_s=max(r.timings.get("push", 0.0) for r in results), bytes_per_device=s_max, bytes_total=sum(sent),
        redeploy_s=again.wall_s, redeploy_model_bytes=sum(r.model_bytes_sent for r in again.results),
        redeploy_bytes=sum(r.bytes_sent for r in again.results), device_cpu_s=device_cpu, throttled_s=throttled,
        ws_cpu_s=ws_cpu, failed=len(failed), errors=[f"{r.host}: {r.failed_step}: {r.error}" for r in failed][:5],
        steps={k: (sum(r.timings.get(k, 0.0) for r in results) / n, max(r.timings.get(k, 0.0) for r in results))
               for k in STEPS})


def targets(rows: list[SizeRow], shaped: bool, device_mbit: float | None = None) -> list[dict[str, Any]]:
    """The issue's targets, each with its numbers and PASS/FAIL; says when the links alone rule one out."""
    base, last = rows[0], rows[-1]
    scale = last.deploy_s / base.deploy_s
    vs_floor = last.deploy_s / last.floor_s if last.floor_s else float("inf")
    floor_growth = last.floor_s / base.floor_s if base.floor_s else float("inf")
    floor_what = "link-bound floor" if shaped else "floor (on-device steps only: loopback is unshaped)"
    return [
        {"target": f"{last.n} devices within 1.5x of {base.n} device(s)", "ok": scale <= 1.5, "ratio": scale,
         "detail": f"{last.deploy_s:.2f} s vs {base.deploy_s:.2f} s = {scale:.2f}x (the floor itself grows "
                   f"{floor_growth:.2f}x from {base.n} to {last.n}: {base.floor_s:.2f} -> {last.floor_s:.2f} s)"
                   + (f"; unreachable at these rates: the floor alone is {last.floor_s / base.deploy_s:.2f}x of "
                      f"one device's deploy (the shared uplink stops bounding {last.n} devices from "
                      f"{last.n} x {device_mbit:g} = {last.n * device_mbit:g} Mbit/s)"
                      if shaped and device_mbit and last.floor_s > 1.5 * base.deploy_s else "")},
        {"target": f"{last.n} devices within 1.3x of the {floor_what}", "ok": vs_floor <= 1.3, "ratio": vs_floor,
         "detail": f"{last.deploy_s:.2f} s vs {last.floor_s:.2f} s = {vs_floor:.2f}x"},
        {"target": "a redeploy moves 0 model bytes (every size)", "ok": all(r.redeploy_model_bytes == 0 for r in rows),
         "ratio": None, "detail": " / ".join(f"{r.n}: {r.redeploy_model_bytes} B" for r in rows)},
        {"target": "no device failed", "ok": all(r.failed == 0 for r in rows), "ratio": None,
         "detail": " / ".join(f"{r.n}: {r.failed}" for r in rows)},
    ]


# --- the run ------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 8, 32], help="fleet sizes (default 1 8 32)")
    ap.add_argument("--models", type=Path, default=REPO / "models", help="folder with yolov8n.onnx")
    ap.add_argument("--precision", choices=("int8", "fp32"), default=None,
                    help="the model the devices get (default: int8, what inventory.yaml's pis group deploys, "
                         "where --models has yolov8n.int8.onnx; else fp32)")
    ap.add_argument("--samples", type=Path, default=REPO / "data" / "defects" / "images" / "val",
                    help="health-check images")
    ap.add_argument("--no-netns", action="store_true", help="loopback mode: no namespaces, shaping or CPU quota")
    ap.add_argument("--no-cgroups", action="store_true", help="netns mode without the per-device CPU quota")
    ap.add_argument("--device-mbit", type=float, default=20.0, help="each device's link, Mbit/s (default 20)")
    ap.add_argument("--uplink-mbit", type=float, default=100.0, help="the shared uplink, Mbit/s (default 100)")
    ap.add_argument("--device-cpu", type=float, default=None,
                    help=f"CPU quota per device in CPUs (default: (cores - {CPU_RESERVED}) / largest size, at most 1)")
    ap.add_argument("--bench-warmup", type=int, default=1, help="on-device benchmark warm-up runs (default 1)")
    ap.add_argument("--bench-iterations", type=int, default=3, help="on-device benchmark iterations (default 3)")
    ap.add_argument("--out", type=Path, default=None, help="also write the table as JSON to this file")
    return ap


@dataclass
class Mode:
    """Which mode runs, and its links and quotas (None in loopback mode)."""

    name: str
    line: str
    net: Topology | None
    quota: CpuQuota | None
    device_cpu: float


def choose_mode(args: argparse.Namespace, cleanup: Cleanup, largest: int) -> Mode:
    """netns+tbf where namespaces are allowed (and not --no-netns), else loopback; says why."""
    cores = os.cpu_count() or 1
    net: Topology | None = None
    why_loopback = "--no-netns"
    if not args.no_netns:
        net = Topology(PREFIX, args.device_mbit, args.uplink_mbit)
        cleanup.push("removing the network namespaces", net.remove)
        try:
            net.build()
        except NetnsUnavailable as e:
            net.remove()
            net, why_loopback = None, f"namespaces not allowed here: {e}"
    if net is None:
        return Mode("loopback", f"mode: loopback (no shaping: {why_loopback}; no CPU quota: the devices share this "
                                f"machine's {cores} cores with the deploy tool)", None, None, 0.0)
    device_cpu = min(1.0, args.device_cpu or (cores - CPU_RESERVED) / largest)
    quota: CpuQuota | None = None
    quota_text = "no CPU quota (--no-cgroups)"
    if not args.no_cgroups:
        try:
            quota = CpuQuota(PREFIX, cores - CPU_RESERVED, largest)
            cleanup.push("removing the cgroups", quota.remove)
            fits = device_cpu * largest <= cores - CPU_RESERVED + 1e-9
            quota_text = (f"cgroup v{quota.version} CPU quota {device_cpu:.3f} CPU per device, "
                          f"{device_cpu * largest:.2f} CPUs for {largest} devices "
                          + ("(fits in" if fits else "(oversubscribed: the devices share")
                          + f" {cores - CPU_RESERVED:g} of the {cores} cores; the deploy tool in a cgroup "
                            "beside them, without quota)")
        except OSError as e:
            quota_text = f"no CPU quota (cgroups not available: {e})"
    latency = "no added latency: netem exists here but is not used" if net.netem \
        else "no added latency: this kernel has no netem"
    packets = (f"packet processing charged to whichever device runs (no threaded NAPI: {net.no_napi_why})"
               if net.no_napi_why else "packet processing in kernel threads outside the device quotas (threaded NAPI)")
    return Mode("netns+tbf", f"mode: netns+tbf ({args.device_mbit:g} Mbit/s per device, {args.uplink_mbit:g} Mbit/s "
                             f"uplink, {quota_text}; {packets}; {latency})", net, quota, device_cpu if quota else 0.0)


def start_devices(fleet: Any, mode: Mode, count: int) -> list[Any]:
    """`count` sshd devices: in their namespaces and cgroups (netns mode) or on 127.0.0.x (loopback)."""
    hosts = []
    for i in range(count):
        name = f"dev{i:02d}"
        if mode.net is None:
            hosts.append(fleet.start(name))
            continue
        ns, address = mode.net.add_device(i)
        prefix = ["ip", "netns", "exec", ns]
        if mode.quota is not None:
            # The shell moves itself into the cgroup, then execs ip, which execs sshd: one pid, inside
            # the cgroup before sshd can fork any session.
            prefix = ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(mode.quota.add(name, mode.device_cpu)), *prefix]
        hosts.append(fleet.start(name, address=address, port=DEVICE_PORT, prefix=prefix))
    return hosts


def run_sizes(args: argparse.Namespace, sizes: list[int], mode: Mode, tmp: Path, cleanup: Cleanup
              ) -> tuple[list[SizeRow], float]:
    """Start the devices, deploy and redeploy at each size; returns the rows and the cold first deploy's s."""
    from pipeline.fleet import runner
    from pipeline.fleet.artifacts import Sources
    from pipeline.fleet.inventory import load_inventory

    fixture = _load(REPO / "tests" / "fleet" / "conftest.py", "fleet_conftest")
    models, samples = args.models, args.samples
    if not (models / "yolov8n.onnx").is_file() or not samples.is_dir():
        print("models/yolov8n.onnx or the val images missing: building a tiny model first ...", flush=True)
        models, samples = tiny_model(tmp / "tiny")
    has_int8 = (models / "yolov8n.int8.onnx").is_file()
    if args.precision == "int8" and not has_int8:
        sys.exit(f"--precision int8: {models / 'yolov8n.int8.onnx'} does not exist; run `dvc repro quantize` or use "
                 "--precision fp32")
    args.precision = args.precision or ("int8" if has_int8 else "fp32")
    model = models / ("yolov8n.int8.onnx" if args.precision == "int8" else "yolov8n.onnx")
    print(f"model: {model} ({args.precision}, {model.stat().st_size / 1e6:.2f} MB)", flush=True)
    # Deploy a snapshot of the device runtime: the working tree can change during the minutes this
    # runs (an editor, a checkout), and a file changed between hashing and upload fails `verify`.
    runtime = tmp / "runtime"
    shutil.copytree(REPO / "runtime", runtime, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    sources = Sources(models_dir=models, samples_dir=samples, runtime_root=runtime)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'bench-mlflow.db'}"
    key = fixture.keygen(tmp / "id_ed25519")
    (tmp / "fleet").mkdir()
    fleet = fixture.SshdFleet(tmp / "fleet", key)
    cleanup.push("stopping the devices' sshd", fleet.stop_all)
    bench = {"bench_warmup": args.bench_warmup, "bench_iterations": args.bench_iterations, "precision": args.precision}
    shaped = mode.net is not None
    rows: list[SizeRow] = []
    with ExitStack() as inside:
        if mode.net is not None:
            inside.enter_context(mode.net.entered())
        if mode.quota is not None:
            inside.enter_context(mode.quota.deploy_tool())
        hosts = start_devices(fleet, mode, sizes[-1])
        print(f"devices: sshd under {tmp / 'fleet'}", flush=True)

        def fresh(k: int) -> None:
            for h in hosts[:k]:
                shutil.rmtree(h.deploy_dir)
                h.deploy_dir.mkdir()

        def deploy(inv: Any) -> Any:
            return runner.deploy(inv, group="pis", sources=sources, results_dir=tmp / "reports", log_to_mlflow=False)

        # The first deploy in a process imports Fabric/paramiko/onnx/MLflow (seconds): pay that once on
        # a throw-away 1-device deploy so every size is measured the same way.
        fresh(1)
        cold = deploy(load_inventory(fleet.inventory({"pis": [(hosts[0], bench)]}, path=tmp / "warmup.yaml")))
        for n in sizes:
            inv = load_inventory(fleet.inventory({"pis": [(h, bench) for h in hosts[:n]]}, path=tmp / f"inv{n}.yaml",
                                                 concurrency=sizes[-1]))
            pids = [h.proc.pid for h in hosts[:n]]
            fresh(n)
            dev0, self0 = _devices_cpu_s(pids), _self_cpu_s()
            thr0 = mode.quota.throttled_s() if mode.quota else 0.0
            first = deploy(inv)
            ws_cpu = _self_cpu_s() - self0
            device_cpu_s = _devices_cpu_s(pids) - dev0
            throttled = (mode.quota.throttled_s() - thr0) if mode.quota else 0.0
            again = deploy(inv)
            row = measure(n, first, again, args.device_mbit if shaped else None, args.uplink_mbit if shaped else None,
                          device_cpu_s, throttled, ws_cpu)
            rows.append(row)
            if row.failed:
                print(f"{n} devices: {row.failed} failure(s), e.g. {row.errors[0]}", flush=True)
            print(f"  done: {n} device(s), {row.deploy_s:.2f} s", flush=True)
    return rows, cold.wall_s


def main(argv: Sequence[str] | None = None) -> int:
    """Run the scaling benchmark, print the tables and targets; exit 1 if any device failed."""
    args = _parser().parse_args(argv)
    sizes = sorted(set(args.sizes))
    if sizes[0] < 1 or sizes[-1] > 1000:
        sys.exit("--sizes: each between 1 and 1000")
    if args.device_mbit <= 0 or args.uplink_mbit <= 0:
        sys.exit("--device-mbit and --uplink-mbit must be > 0")
    if args.device_cpu is not None and not 0 < args.device_cpu <= 1:
        sys.exit("--device-cpu: a share of one CPU, > 0 and at most 1")
    fixture = _load(REPO / "tests" / "fleet" / "conftest.py", "fleet_conftest")
    if not fixture.sshd_available():
        sys.exit(f"OpenSSH server not found ({fixture.SSHD}); run scripts/bootstrap.sh --with-sshd")
    cleanup = Cleanup()
    with tempfile.TemporaryDirectory(prefix="fleet-bench-") as tmp_s:
        try:  # cleaned up before the temporary folder goes: the sshds run from it
            mode = choose_mode(args, cleanup, sizes[-1])
            print(mode.line, flush=True)
            stale = leftover_namespaces() if os.geteuid() == 0 and shutil.which("ip") else []
            if stale:
                print(f"note: namespaces left by killed earlier runs (remove with `ip netns del NAME`): "
                      f"{' '.join(stale)}", flush=True)
            if mode.net is not None:
                print(f"namespaces: {PREFIX}-*; cgroups: {mode.quota.root if mode.quota else 'none'} (removed at exit)",
                      flush=True)
            load_before = os.getloadavg()[0]
            rows, cold_s = run_sizes(args, sizes, mode, Path(tmp_s), cleanup)
            load = (load_before, os.getloadavg()[0])
        finally:
            cleanup.run()
    shaped = mode.net is not None
    goals = targets(rows, shaped, args.device_mbit)
    print_tables(rows, goals, mode.line, cold_s, load, shaped, args.precision)
    if args.out:
        doc = {"mode": mode.name, "mode_line": mode.line, "cpu": cpu_name(), "sizes": sizes,
               "device_mbit": args.device_mbit if shaped else None, "uplink_mbit": args.uplink_mbit if shaped else None,
               "device_cpu": mode.device_cpu or None, "netem": bool(mode.net and mode.net.netem),
               "precision": args.precision,
               "bench_warmup": args.bench_warmup, "bench_iterations": args.bench_iterations,
               "cold_first_deploy_s": cold_s, "loadavg_1min": list(load), "namespace_prefix": PREFIX,
               "cgroup": str(mode.quota.root) if mode.quota else None, "rows": [asdict(r) for r in rows],
               "targets": goals}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 1 if any(r.failed for r in rows) else 0


def print_tables(rows: list[SizeRow], goals: list[dict[str, Any]], mode_line: str, cold_wall: float,
                 load: tuple[float, float], shaped: bool, precision: str) -> None:
    """The scaling table, the per-step breakdown, the targets and what each number includes."""
    base = rows[0]
    print(f"\n{mode_line}\nCPU: {cpu_name()}; load average (1 min) {load[0]:.1f} before, {load[1]:.1f} after "
          f"(the machine is shared: other work adds noise); the devices' model: {precision}")
    print(f"{'devices':>7}  {'deploy s':>8}  {'vs ' + str(base.n):>5}  {'floor s':>7}  {'vs floor':>8}  "
          f"{'link s':>6}  {'on-device s':>11}  {'push s':>6}  {'push/link':>9}  {'MB/device':>9}  "
          f"{'redeploy s':>10}  {'redeploy model B':>16}  {'redeploy B':>10}  {'device CPU s':>12}  "
          f"{'per device':>10}  {'throttled s':>11}  {'ws CPU s':>8}  {'failed':>6}")
    for r in rows:
        push_link = f"{r.push_s / r.link_s:.2f}" if r.link_s else "n/a"
        print(f"{r.n:>7}  {r.deploy_s:>8.2f}  {r.deploy_s / base.deploy_s:>5.2f}  {r.floor_s:>7.2f}  "
              f"{r.deploy_s / r.floor_s if r.floor_s else float('inf'):>8.2f}  "
              f"{r.link_s:>6.2f}  {r.on_device_s:>11.2f}  {r.push_s:>6.2f}  {push_link:>9}  "
              f"{r.bytes_per_device / 1e6:>9.2f}  {r.redeploy_s:>10.2f}  {r.redeploy_model_bytes:>16}  "
              f"{r.redeploy_bytes:>10}  {r.device_cpu_s:>12.1f}  {r.device_cpu_s / r.n:>10.2f}  "
              f"{r.throttled_s:>11.1f}  {r.ws_cpu_s:>8.1f}  "
              f"{r.failed:>6}")
    print("\nper-step seconds of the full deploy, mean / max over devices (verify, health, switch, bench are "
          "timed on the device inside `activate`, the one SSH command that runs them):")
    print(f"{'devices':>7}  " + "  ".join(f"{k:>11}" for k in STEPS))
    for r in rows:
        print(f"{r.n:>7}  " + "  ".join(f"{r.steps[k][0]:>5.2f}/{r.steps[k][1]:<5.2f}" for k in STEPS))
    link_text = ("max(S / r_device, N*S / R_uplink): the time the links need for the bytes sent" if shaped
                 else "0: loopback is not shaped, so no link bounds the deploy")
    print(f"""
deploy s     full deploy wall time (all devices in parallel) in a process that has already imported
             Fabric/paramiko/onnx/MLflow; a fresh process's first deploy took {cold_wall:.2f} s for 1 device
floor s      link s + on-device s
link s       {link_text}
on-device s  the slowest device's verify + health + switch + bench, timed by the device itself
push s       the slowest device's upload (push/link: how close the push came to the link's limit; payload
             bytes against a rate tbf counts in frame bytes, so about 1.05 is the best possible)
MB/device    S: what a device was sent (model + runtime bundle; MB = 1e6 bytes)
redeploy     the same deploy again: nothing but the health check and benchmark should happen
device CPU s CPU of the devices during the full deploy (their sshd trees: sshd, shell, helper, health,
             bench), in all and per device (the same work at every size, so it should not grow with N;
             where it does, something charges the devices for more than their own work); throttled s: time
             their CPU quotas held them back, summed over devices; ws CPU s: this process
             (Fabric/paramiko, hashing, manifests)""")
    print("\ntargets:")
    for g in goals:
        print(f"  {'PASS' if g['ok'] else 'FAIL'}  {g['target']}: {g['detail']}")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit("interrupted (the cleanup above has run: namespaces, cgroups and devices removed)")
