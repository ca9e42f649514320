"""Fleet deploy scaling: deploy to 1, 8 and 32 loopback sshd test hosts in one run.

For each fleet size, on fresh devices:
  1. a full deploy: push + verify + health + switch + on-device benchmark + fetch of its JSON;
  2. a redeploy of the same model (bytes moved must be 0);
  3. a deploy without the on-device benchmark (fresh devices again): push + verify + health + switch;
  4. the on-device work alone, no SSH and no deploy tool: `health` then `bench` of the deployed
     release, run directly as the devices' processes, all hosts at once (the floor any deploy tool
     pays here, because all simulated devices share this machine's cores).

Prints wall time per size with its ratio to 1 host, the per-step breakdown, the CPU seconds the
simulated devices used (their sshd process trees: sshd, login shell, helper, health, bench) and
the CPU seconds of this process (the workstation side: Fabric/paramiko, hashing, manifests).
Targets (issue 5): 32 hosts <= 2x the time of 1; a redeploy moves 0 model bytes.

Real devices each have their own CPU; here 32 devices share this machine's, so on-device work
is serialised over its cores. The simulated hosts run ONNX Runtime with 1 thread
(tests/fleet/conftest.py), so they do not also fight over threads.

Usage:  .venv/bin/python benchmarks/fleet.py [--sizes 1 8 32] [--models DIR]
Needs: openssh-server (scripts/bootstrap.sh --with-sshd). Without models/yolov8n.onnx it builds
a tiny YOLOv8n first (about a minute), as the tests do.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def tiny_model(root: Path) -> tuple[Path, Path]:
    """Build a tiny model with the real stages (tests/conftest.py's recipe); return (models, val)."""
    import yaml

    from pipeline.stages import data, export, train

    tiny_params = _load(REPO / "tests" / "conftest.py", "root_conftest").tiny_params
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


STEPS = ("connect", "probe", "push", "verify", "health", "switch", "bench", "activate", "fetch")
HOST_STEPS = ("connect", "probe", "push", "activate", "fetch")  # timed here; together: one host's time
PUSH_PHASE = ("connect", "probe", "push", "verify", "switch")  # what moves and publishes the release


def _cpu_s(pids: list[int]) -> float:
    """user+sys CPU seconds of these processes and all their reaped children (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
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


def device_work_only(deploy_dirs: list[Path], python: str) -> float:
    """Wall seconds of `health` then `bench` on each device's current release, all at once, no SSH."""
    def one(d: Path) -> int:
        release = d / "current"
        runtime = json.loads((release / "manifest.json").read_text())["source"]["runtime"]
        cwd = d / "runtime" / runtime
        for verb, extra in (("health", []), ("bench", ["--out", str(d / "results" / "floor.json"), "--warmup", "1",
                                                       "--iterations", "3"])):
            p = subprocess.run([python, "-m", "edge_runtime", verb, "--release", str(release), *extra], cwd=cwd,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if p.returncode != 0:
                raise RuntimeError(f"{verb} on {d}: {p.stderr.strip()[-300:]}")
        return 0

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(deploy_dirs)) as pool:
        list(pool.map(one, deploy_dirs))
    return time.perf_counter() - start


@dataclass
class SizeRow:
    """Everything measured at one fleet size."""

    n: int
    wall: float
    redeploy: float
    nobench: float
    push_phase: float
    floor: float
    fixed: float
    device_cpu: float
    self_cpu: float
    sent: int
    model_again: int
    bytes_again: int
    failed: int
    steps: dict[str, tuple[float, float]]  # step -> (mean, max) over hosts, full deploy


def main() -> None:
    """Run the scaling benchmark and print the tables."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--models", type=Path, default=REPO / "models")
    ap.add_argument("--samples", type=Path, default=REPO / "data" / "defects" / "images" / "val")
    args = ap.parse_args()

    from pipeline.fleet import runner
    from pipeline.fleet.artifacts import Sources
    from pipeline.fleet.inventory import load_inventory

    fixture = _load(REPO / "tests" / "fleet" / "conftest.py", "fleet_conftest")
    if not fixture.sshd_available():
        sys.exit(f"OpenSSH server not found ({fixture.SSHD}); run scripts/bootstrap.sh --with-sshd")
    with tempfile.TemporaryDirectory(prefix="fleet-bench-") as tmp_s:
        tmp = Path(tmp_s)
        models, samples = args.models, args.samples
        if not (models / "yolov8n.onnx").is_file() or not samples.is_dir():
            print("models/yolov8n.onnx or the val images missing: building a tiny model first ...", flush=True)
            models, samples = tiny_model(tmp / "tiny")
        sources = Sources(models_dir=models, samples_dir=samples, runtime_root=REPO / "runtime")
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'bench-mlflow.db'}"
        key = fixture.keygen(tmp / "id_ed25519")
        (tmp / "fleet").mkdir()
        fleet = fixture.SshdFleet(tmp / "fleet", key)
        rows: list[SizeRow] = []
        try:
            hosts = [fleet.start(f"dev{i:02d}") for i in range(max(args.sizes))]
            model_size = (models / "yolov8n.onnx").stat().st_size

            def fresh(n: int) -> None:
                for h in hosts[:n]:
                    shutil.rmtree(h.deploy_dir)
                    h.deploy_dir.mkdir()

            # The first deploy in a process imports Fabric/paramiko/onnx/MLflow (seconds). Pay that
            # once on a throw-away 1-host deploy so every size below is measured the same way; what
            # it cost is reported as the extra a fresh `fab deploy` process pays at any size.
            fresh(1)
            warm_inv = load_inventory(fleet.inventory({"pis": [(hosts[0], {})]}, path=tmp / "warmup.yaml"))
            cold = runner.deploy(warm_inv, group="pis", sources=sources, results_dir=tmp / "reports",
                                 log_to_mlflow=False)
            for n in args.sizes:
                inv = load_inventory(fleet.inventory({"pis": [(h, {}) for h in hosts[:n]]},
                                                     path=tmp / f"inv{n}.yaml", concurrency=max(args.sizes)))
                pids = [h.proc.pid for h in hosts[:n]]

                def deploy(bench: bool = True, inv: Any = inv) -> Any:  # this size's inventory, bound now
                    return runner.deploy(inv, group="pis", sources=sources, results_dir=tmp / "reports",
                                         log_to_mlflow=False, bench=bench)

                fresh(n)
                dev0, self0 = _devices_cpu_s(pids), _self_cpu_s()
                first = deploy()
                device_cpu, self_cpu = _devices_cpu_s(pids) - dev0, _self_cpu_s() - self0
                again = deploy()
                floor = device_work_only([h.deploy_dir for h in hosts[:n]], fixture.DEVICE_PYTHON)
                fresh(n)
                nobench = deploy(bench=False)
                failed = [r for r in first.results + again.results + nobench.results if not r.ok]
                if failed:
                    print(f"{n} hosts: {len(failed)} failures, e.g. {failed[0].host}: {failed[0].error}", flush=True)
                steps = {k: (sum(r.timings.get(k, 0.0) for r in first.results) / n,
                             max(r.timings.get(k, 0.0) for r in first.results)) for k in STEPS}
                slowest = max(sum(r.timings.get(k, 0.0) for k in HOST_STEPS) for r in first.results)
                rows.append(SizeRow(
                    n, first.wall_s, again.wall_s, nobench.wall_s,
                    max(sum(r.timings.get(k, 0.0) for k in PUSH_PHASE) for r in nobench.results), floor,
                    first.wall_s - slowest, device_cpu, self_cpu, sum(r.bytes_sent for r in first.results),
                    sum(r.model_bytes_sent for r in again.results), sum(r.bytes_sent for r in again.results),
                    len(failed), steps))
                print(f"  done: {n} host(s)", flush=True)
        finally:
            fleet.stop_all()
    print_tables(rows, model_size, cold.wall_s)


def print_tables(rows: list[SizeRow], model_size: int, cold_wall: float) -> None:
    """The scaling table, the per-step breakdown and what each number includes."""
    base = rows[0]
    cores = os.cpu_count()
    startup = max(0.0, cold_wall - base.wall) if base.n == 1 else 0.0
    print(f"\nfleet deploy scaling: loopback sshd hosts sharing this machine's {cores} CPU cores; model "
          f"{model_size / 1e6:.1f} MB FP32; on-device bench 1 warm-up + 3 iterations, ORT 1 thread per device")
    print(f"{'hosts':>5}  {'deploy s':>8}  {'vs 1':>5}  {'+startup s':>10}  {'vs 1':>5}  {'no-bench s':>10}  "
          f"{'vs 1':>5}  {'push phase s':>12}  "
          f"{'vs 1':>5}  {'device-work s':>13}  {'fixed s':>7}  {'device CPU s':>12}  {'ws CPU s':>8}  "
          f"{'MB sent':>7}  {'redeploy s':>10}  {'redeploy model B':>16}  {'redeploy B':>10}  {'failed':>6}")
    for r in rows:
        print(f"{r.n:>5}  {r.wall:>8.2f}  {r.wall / base.wall:>5.2f}  {r.wall + startup:>10.2f}  "
              f"{(r.wall + startup) / (base.wall + startup):>5.2f}  {r.nobench:>10.2f}  "
              f"{r.nobench / base.nobench:>5.2f}  {r.push_phase:>12.2f}  {r.push_phase / base.push_phase:>5.2f}  "
              f"{r.floor:>13.2f}  {r.fixed:>7.2f}  {r.device_cpu:>12.1f}  {r.self_cpu:>8.1f}  "
              f"{r.sent / 1e6:>7.1f}  {r.redeploy:>10.2f}  {r.model_again:>16}  {r.bytes_again:>10}  {r.failed:>6}")
    print("\nper-step seconds of the full deploy, mean / max over hosts (verify, health, switch, bench are "
          "timed on the device inside `activate`, the one SSH command that runs them):")
    print(f"{'hosts':>5}  " + "  ".join(f"{k:>11}" for k in STEPS))
    for r in rows:
        print(f"{r.n:>5}  " + "  ".join(f"{r.steps[k][0]:>5.2f}/{r.steps[k][1]:<5.2f}" for k in STEPS))
    print(f"""
deploy s       full deploy wall time: resolve artifacts + per host connect, probe, push, verify, health,
               switch, on-device benchmark, fetch of its JSON (all hosts in parallel), in a process that
               has already imported Fabric/paramiko/onnx/MLflow (a throw-away 1-host deploy ran first)
+startup s     deploy s plus what that first deploy cost extra ({startup:.2f} s): a fresh `fab deploy` process
no-bench s     the same deploy without the on-device benchmark (fresh devices; still health-checked)
push phase s   slowest host's connect + probe + push + verify + switch in the no-bench deploy
device-work s  health + bench run directly as local processes on every device's release, all at once,
               no SSH and no deploy tool: what the simulated devices' own work costs on {cores} shared cores
fixed s        deploy s minus the slowest host's connect..fetch: once-per-deploy work (MLflow import and
               lineage lookup, manifests)
device CPU s   CPU of the simulated devices during the full deploy (their sshd trees: sshd, login shell,
               helper, health, bench); ws CPU s: this process (Fabric/paramiko, hashing, manifests)
targets: 32 hosts <= 2.00x the time of 1; redeploy model bytes = 0""")
    last = rows[-1]
    floor_cpu = last.device_cpu / max(cores or 1, 1)
    print(f"at {last.n} hosts the devices alone needed {last.device_cpu:.1f} CPU s = {floor_cpu:.1f} s of this "
          f"machine's {cores} cores; 2x of 1 host is {2 * base.wall:.1f} s")



if __name__ == "__main__":
    main()
