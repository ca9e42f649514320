"""benchmarks/fleet.py, really run at its smallest useful configuration, in both of its modes.

What is checked is what the script reports and what it leaves behind: the mode it names, a table
row per fleet size, a redeploy that moves 0 model bytes, and no namespace, cgroup or sshd left
afterwards, also when it is interrupted. Timings and their ratios are not asserted: the
benchmark itself measures those, on a machine whose load a test cannot control.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ssh]  # real sshd devices, the tiny YOLOv8n (built once, ~30 s)
REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "fleet.py"
# The smallest run that still has a fleet (2 devices sharing the uplink): a 0+1-iteration benchmark,
# and links fast enough that the 12 MB model crosses in well under a second.
SMALL = ["--sizes", "1", "2", "--bench-warmup", "0", "--bench-iterations", "1", "--device-mbit", "200",
         "--uplink-mbit", "400"]


def netns_problem() -> str:
    """Why the netns+tbf mode cannot run here ('' when it can): root, iproute2, `unshare -n`, `ip netns add`."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not (shutil.which("ip") and shutil.which("tc") and shutil.which("unshare")):
        return "iproute2 (ip, tc) or unshare not installed"
    if subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode != 0:
        return "`unshare -n` is not allowed here"
    probe = f"fbench-probe-{os.getpid()}"
    added = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if added.returncode != 0:
        return f"`ip netns add` is not allowed here: {added.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return ""


@pytest.fixture(scope="module")
def bench_sources(tiny_model: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """--models/--samples for the script: the session's tiny model, so no run builds its own."""
    models = tmp_path_factory.mktemp("bench-models")
    shutil.copyfile(tiny_model["onnx"], models / "yolov8n.onnx")
    return ["--models", str(models), "--samples", str(tiny_model["dataset"] / "images" / "val")]


def _namespaces() -> list[str]:
    p = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    return [line.split()[0] for line in p.stdout.splitlines() if line.strip()] if p.returncode == 0 else []


def _processes_mentioning(text: str) -> list[str]:
    """Command lines of running processes that contain `text` (the benchmark's temporary folder)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in args:
            found.append(args)
    return found


def _assert_nothing_left(out: str, doc: dict[str, Any] | None = None) -> None:
    prefix = doc["namespace_prefix"] if doc else re.search(r"^namespaces: (\S+)-\*", out, re.M).group(1)
    assert not [n for n in _namespaces() if n.startswith(prefix + "-")], f"namespaces of {prefix} left behind"
    cgroup = doc["cgroup"] if doc else re.search(r"cgroups: (\S+) \(removed at exit\)", out).group(1)
    if cgroup and cgroup != "none":
        assert not Path(cgroup).exists(), f"cgroup {cgroup} left behind"
    tmp = re.search(r"^devices: sshd under (\S+)", out, re.M)
    if tmp:
        assert not _processes_mentioning(tmp.group(1)), "sshd devices of the run still running"
        assert not Path(tmp.group(1)).exists()


def _run(tmp_path: Path, *args: str) -> tuple[str, dict[str, Any]]:
    out_json = tmp_path / "fleet.json"
    p = subprocess.run([sys.executable, str(SCRIPT), *args, "--out", str(out_json)], cwd=REPO, capture_output=True,
                       text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, f"benchmarks/fleet.py exited {p.returncode}:\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    return p.stdout, json.loads(out_json.read_text())


@pytest.mark.parametrize("mode", ["loopback", "netns+tbf"])
def test_fleet_benchmark_runs_and_cleans_up(mode: str, bench_sources: list[str], tmp_path: Path) -> None:
    """Both modes: names its mode, one row per size, a redeploy of 0 model bytes, nothing left behind."""
    if mode == "netns+tbf" and (why := netns_problem()):
        pytest.skip(f"netns+tbf mode not possible here: {why}")
    before = set(_namespaces())
    out, doc = _run(tmp_path, *SMALL, *bench_sources, *(["--no-netns"] if mode == "loopback" else []))

    assert out.splitlines()[0].startswith(f"mode: {mode} ("), out[:500]
    assert doc["mode"] == mode
    if mode == "loopback":
        assert "no shaping: --no-netns" in doc["mode_line"]
    else:
        assert "200 Mbit/s per device, 400 Mbit/s uplink" in doc["mode_line"]
        assert "no added latency" in doc["mode_line"]
        # where the links' packet processing is charged: outside the device quotas, or why not
        assert ("(threaded NAPI)" in doc["mode_line"]) != ("no threaded NAPI: " in doc["mode_line"])
    rows = doc["rows"]
    assert [r["n"] for r in rows] == [1, 2]
    table = [line for line in out.splitlines() if re.match(r"^\s+[12]\s+\d+\.\d\d[\s/]", line)]
    assert len(table) == 4, out  # the scaling table and the per-step table, a row per size each
    model = (Path(bench_sources[1]) / "yolov8n.onnx").stat().st_size
    for r in rows:
        assert r["failed"] == 0, r["errors"]
        assert r["redeploy_model_bytes"] == 0
        assert r["bytes_per_device"] > model  # the model and the runtime bundle crossed the link
        assert r["on_device_s"] > 0 and r["floor_s"] >= r["on_device_s"]
        assert (r["link_s"] > 0) == (mode == "netns+tbf")
    assert re.search(r"^  PASS  a redeploy moves 0 model bytes", out, re.M)
    floor = "link-bound floor" if mode == "netns+tbf" else "floor (on-device steps only: loopback is unshaped)"
    assert [t["target"] for t in doc["targets"]][:2] == ["2 devices within 1.5x of 1 device(s)",
                                                        f"2 devices within 1.3x of the {floor}"]
    assert len(re.findall(r"^  (PASS|FAIL)  ", out, re.M)) == len(doc["targets"])
    if mode == "netns+tbf":
        assert doc["namespace_prefix"].startswith("fbench-")
        assert set(_namespaces()) <= before, "the run's namespaces were not removed"
    _assert_nothing_left(out, doc)


def test_fleet_benchmark_interrupted_cleans_up(bench_sources: list[str], tmp_path: Path) -> None:
    """Ctrl-C in the middle of the netns run still removes its namespaces, cgroups and devices."""
    if why := netns_problem():
        pytest.skip(f"netns+tbf mode not possible here: {why}")
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *SMALL, "--device-mbit", "20", *bench_sources], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)
    out = ""
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            out += line
            if line.startswith("devices: sshd under"):  # namespaces, cgroups and sshds exist now
                time.sleep(1.0)  # into the first deploy (its model push takes seconds at 20 Mbit/s)
                proc.send_signal(signal.SIGINT)
                break
        assert "devices: sshd under" in out, out
        rest, _ = proc.communicate(timeout=120)
        out += rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0, out
    _assert_nothing_left(out)
