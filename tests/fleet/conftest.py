"""Real OpenSSH test hosts for the fleet tests (and benchmarks/fleet.py).

Each simulated device is its own `sshd -D` process, started as the current user on its own
127.0.0.x address and port, with its own host key, an authorized user key, and its own deploy
dir, which is also its sessions' HOME: a device's login shell reads the device's own (empty) rc
files, not the test user's (where a workstation's `eval "$(pyenv init -)"` would cost every SSH
command about 0.13 CPU s, and make concurrent sessions of all devices queue on one shared
`pyenv rehash` lock). The device's python is this repository's .venv python (numpy, opencv,
onnxruntime), so the real device runtime CLI runs on the "device". Nothing leaves 127.0.0.x. (benchmarks/fleet.py
starts the same hosts inside network namespaces of its own, through `SshdFleet.start`'s `prefix`.)
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import pytest
import yaml
from fleet_hosts import make_variant
from support import free_port

REPO = Path(__file__).resolve().parents[2]
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
DEVICE_PYTHON = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv/bin/python").exists() else sys.executable
_addresses = itertools.count(2)  # 127.0.0.2, .3, ... unique within a test session


def sshd_available() -> bool:
    """True when an OpenSSH server binary is installed (scripts/bootstrap.sh --with-sshd)."""
    return Path(SSHD).is_file() and shutil.which("ssh-keygen") is not None


def _wait_listening(address: str, port: int, proc: subprocess.Popen, log: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd on {address}:{port} exited {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with socket.create_connection((address, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"sshd on {address}:{port} did not start listening in {timeout}s")


def keygen(path: Path) -> Path:
    """Create an ed25519 key pair at `path` (+ .pub) with no passphrase."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "fleet-test", "-f", str(path)],
                   check=True, stdin=subprocess.DEVNULL)
    return path


@dataclass
class TestHost:
    """One simulated device: an sshd, its host key and its deploy dir."""

    name: str
    address: str
    port: int
    root: Path
    proc: subprocess.Popen | None

    @property
    def deploy_dir(self) -> Path:
        """The device's deploy dir (absolute; the same filesystem as the test)."""
        return self.root / "deploy"

    @property
    def host_pub(self) -> str:
        """The host's public key line (type + base64)."""
        return " ".join((self.root / "ssh_host_ed25519_key.pub").read_text().split()[:2])

    def known_hosts_line(self) -> str:
        """This host's line for a known_hosts file."""
        return f"[{self.address}]:{self.port} {self.host_pub}\n"

    def stop(self) -> None:
        """Kill this host's sshd (the host goes 'down'); idempotent."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


class SshdFleet:
    """Starts and stops sshd test hosts; writes known_hosts and inventory files for them."""

    def __init__(self, tmp: Path, user_key: Path) -> None:
        self.tmp = tmp
        self.user_key = user_key
        self.hosts: list[TestHost] = []
        self.known_hosts = tmp / "known_hosts"
        self.known_hosts.write_text("")
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege-separation dir when run as root

    def start(self, name: str, trust: bool = True, *, address: str | None = None, port: int | None = None,
              prefix: Sequence[str] = ()) -> TestHost:
        """Start one device; `trust` adds its host key to the fleet's known_hosts.

        By default the device listens on the next 127.0.0.x address and a free port there. A caller
        that runs the device somewhere else (benchmarks/fleet.py: inside a network namespace of its
        own) passes that `address` and `port` and a `prefix` that sshd is started under, e.g.
        `ip netns exec NAME`; the prefix must exec sshd (not fork it), so that `TestHost.proc` is sshd.
        """
        address = address or f"127.0.0.{next(_addresses) % 250 + 2}"
        port = port or free_port(address)
        root = self.tmp / name
        root.mkdir(parents=True)
        (root / "deploy").mkdir()
        keygen(root / "ssh_host_ed25519_key")
        shutil.copyfile(f"{self.user_key}.pub", root / "authorized_keys")
        user = os.environ.get("USER") or subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()
        cfg = root / "sshd_config"
        cfg.write_text("\n".join([
            f"ListenAddress {address}:{port}",
            f"HostKey {root / 'ssh_host_ed25519_key'}",
            f"AuthorizedKeysFile {root / 'authorized_keys'}",
            f"PidFile {root / 'sshd.pid'}",
            "StrictModes no", "UsePAM no", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
            "PubkeyAuthentication yes", "PermitRootLogin prohibit-password", f"AllowUsers {user}",
            "Subsystem sftp internal-sftp", "LogLevel ERROR", "MaxStartups 200:30:400", "UseDNS no",
            f'SetEnv "HOME={root}"', "",
        ]))
        log = root / "sshd.log"
        proc = subprocess.Popen([*prefix, SSHD, "-D", "-e", "-f", str(cfg)], stdout=open(log, "wb"),
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        host = TestHost(name, address, port, root, proc)
        try:
            _wait_listening(address, port, proc, log)
        except RuntimeError:
            host.stop()
            raise
        self.hosts.append(host)
        if trust:
            with open(self.known_hosts, "a") as f:
                f.write(host.known_hosts_line())
        return host

    def down_host(self, name: str) -> TestHost:
        """A host entry whose address has no sshd listening (a device that is off)."""
        address = f"127.0.0.{next(_addresses) % 250 + 2}"
        root = self.tmp / name
        (root / "deploy").mkdir(parents=True)
        return TestHost(name, address, free_port(address), root, None)

    def stop_all(self) -> None:
        """Stop every sshd this fleet started."""
        for h in self.hosts:
            h.stop()

    def inventory(self, groups: dict[str, list[tuple[TestHost, dict[str, Any]]]], path: Path | None = None,
                  concurrency: int = 16) -> Path:
        """Write an inventory for these hosts: {group: [(host, overrides)]}."""
        user = os.environ.get("USER") or subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()
        doc: dict[str, Any] = {
            "settings": {"concurrency": concurrency, "known_hosts": str(self.known_hosts), "connect_timeout_s": 5},
            "defaults": {"user": user, "key": str(self.user_key), "agent": False, "accept_new_host_key": False,
                         "python": DEVICE_PYTHON, "ort_threads": 1, "thermal_throttle_c": 80.0,
                         "thermal_resume_c": 70.0, "bench_warmup": 1, "bench_iterations": 3, "conf": 0.01,
                         "iou": 0.45, "max_det": 100, "arch": "x86_64"},
            "groups": {},
        }
        for group, members in groups.items():
            hosts = {}
            for h, overrides in members:
                entry = {"address": h.address, "port": h.port, "deploy_dir": str(h.deploy_dir)}
                entry.update(overrides)
                hosts[h.name] = entry
            kind = "jetson" if group.startswith("jetson") else "pi"
            defaults = {"kind": kind, "runtime": "tensorrt" if kind == "jetson" else "onnxruntime",
                        "precision": "fp16" if kind == "jetson" else "fp32"}
            if kind == "jetson":
                defaults["trt_workspace_mb"] = 256
            doc["groups"][group] = {"defaults": defaults, "hosts": hosts}
        out = path or self.tmp / "inventory.yaml"
        out.write_text(yaml.safe_dump(doc, sort_keys=False))
        return out


@pytest.fixture(scope="session")
def user_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fleet operator's SSH key (authorized on every test host)."""
    return keygen(tmp_path_factory.mktemp("userkey") / "id_ed25519")


@pytest.fixture
def sshd_fleet(tmp_path: Path, user_key: Path) -> Iterator[SshdFleet]:
    """A factory of real sshd test hosts, all stopped at the end of the test."""
    if not sshd_available():
        pytest.skip(f"OpenSSH server not installed ({SSHD}); run scripts/bootstrap.sh --with-sshd")
    (tmp_path / "fleet").mkdir()
    fleet = SshdFleet(tmp_path / "fleet", user_key)
    try:
        yield fleet
    finally:
        fleet.stop_all()


def make_int8(fp32: Path, dataset: Path, dest: Path) -> Path:
    """A real static-INT8 model of `fp32`: the committed params' first quantize candidate, calibrated
    on a few of the dataset's training images (the quantize stage's own building block)."""
    import tempfile

    import onnx
    import yaml

    from edge_runtime.preprocess import letterbox, to_tensor
    from pipeline.config.params import QuantizeParams, build
    from pipeline.imagesets.yolo import decode_image, iter_split_files
    from pipeline.onnx_models.int8_candidates import build_candidate

    raw = yaml.safe_load((REPO / "params.yaml").read_text())["quantize"]
    candidate = build(QuantizeParams, raw, "quantize", REPO / "params.yaml").candidates[0]
    model = onnx.load(str(fp32))
    imgsz = model.graph.input[0].type.tensor_type.shape.dim[2].dim_value
    calib = to_tensor([letterbox(decode_image(p), imgsz)[0] for p, _ in list(iter_split_files(dataset, "train"))[:8]])
    with tempfile.TemporaryDirectory() as tmp:
        dest.write_bytes(build_candidate(model, candidate, calib, Path(tmp)))
    return dest


def make_broken_model(src: Path, dest: Path) -> Path:
    """A valid ONNX graph with the real model's metadata whose output is NOT detections
    (an Identity of the input): it loads and runs, so only the health check can catch it."""
    import onnx
    from onnx import TensorProto, helper

    real = onnx.load(str(src))
    shape = [d.dim_value for d in real.graph.input[0].type.tensor_type.shape.dim]
    graph = helper.make_graph([helper.make_node("Identity", [real.graph.input[0].name], ["output0"])], "broken",
                              [helper.make_tensor_value_info(real.graph.input[0].name, TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("output0", TensorProto.FLOAT, shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = real.ir_version
    for p in real.metadata_props:
        e = model.metadata_props.add()
        e.key, e.value = p.key, p.value
    dest.write_bytes(model.SerializeToString())
    return dest


def make_shifted(src: Path, dest: Path, dx: float = 48.0) -> Path:
    """A copy of an ONNX YOLOv8 model whose boxes all come out `dx` pixels to the right (an Add on
    the x-centre row of output0): it loads, runs and passes the health check, but its boxes no
    longer overlap the original's, so it must fail a shadow beside it. (Perturbing the weights of
    the barely-trained tiny model changes nothing: its output is its biases.)"""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    out = model.graph.output[0]
    rows = out.type.tensor_type.shape.dim[1].dim_value  # 4 box rows + one per class
    for node in model.graph.node:
        node.output[:] = [f"{o}_unshifted" if o == out.name else o for o in node.output]
    offset = np.zeros((1, rows, 1), np.float32)
    offset[0, 0, 0] = dx
    model.graph.initializer.append(numpy_helper.from_array(offset, "fleet_test_shift"))
    model.graph.node.append(helper.make_node("Add", [f"{out.name}_unshifted", "fleet_test_shift"], [out.name]))
    onnx.checker.check_model(model)
    dest.write_bytes(model.SerializeToString())
    return dest


@pytest.fixture(scope="session")
def fleet_models(tiny_model: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A models/ folder (yolov8n, a same-behaviour variant 'alt', a 'broken' one, a 'shifted' one
    whose boxes are elsewhere) + health samples."""
    from pipeline.fleet.artifacts import Sources

    models = tmp_path_factory.mktemp("models")
    shutil.copyfile(tiny_model["onnx"], models / "yolov8n.onnx")
    # The export stage's FP16 copy (written beside its --out): TensorRT fp16 hosts ship it too.
    shutil.copyfile(tiny_model["onnx"].with_name("yolov8n.fp16.onnx"), models / "yolov8n.fp16.onnx")
    make_variant(tiny_model["onnx"], models / "alt.onnx", "alt")
    make_broken_model(tiny_model["onnx"], models / "broken.onnx")
    make_shifted(tiny_model["onnx"], models / "shifted.onnx")  # healthy, but disagrees in shadow
    # INT8 models as the quantize stage writes them (the committed inventory's local group is int8).
    make_int8(tiny_model["onnx"], tiny_model["dataset"], models / "yolov8n.int8.onnx")
    make_variant(models / "yolov8n.int8.onnx", models / "alt.int8.onnx", "alt")
    sources = Sources(models_dir=models, samples_dir=tiny_model["dataset"] / "images" / "val",
                      runtime_root=REPO / "runtime")
    return {"dir": models, "sources": sources}


@pytest.fixture
def services() -> Iterator[list[Path]]:
    """Deploy dirs whose runtime supervisor is stopped at the end (they outlive the SSH session)."""
    from edge_runtime.supervisor import stop_supervisor

    dirs: list[Path] = []
    yield dirs
    for d in dirs:
        stop_supervisor(d)
