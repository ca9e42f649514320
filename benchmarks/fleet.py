"""Fleet deploy scaling: deploy to 1, 8 and 32 loopback sshd test hosts in one run.

For each fleet size: a first deploy (push + health + switch + on-device benchmark) on fresh
devices, then a redeploy of the same model. Prints wall time per size, the ratio to 1 host,
and the bytes moved on the redeploy. Targets (issue 5): 32 hosts <= 2x the time of 1; a
redeploy moves 0 model bytes.

All simulated devices share this machine's CPU, so on-device work (python start-up, health
inference, benchmark) is serialised over its cores; real devices each have their own. The
`push` column (slowest host's connect+probe+push) isolates what the fleet code itself adds.

Usage:  nice -n 15 .venv/bin/python benchmarks/fleet.py [--sizes 1 8 32] [--models DIR]
Needs: openssh-server (scripts/bootstrap.sh --with-sshd). Without models/yolov8n.onnx it builds
a tiny YOLOv8n first (about a minute), as the tests do.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

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

    from pipeline import data, export, train

    tiny_params = _load(REPO / "tests" / "conftest.py", "root_conftest").tiny_params
    root.mkdir(parents=True, exist_ok=True)
    params = tiny_params(yaml.safe_load((REPO / "params.yaml").read_text()))
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    os.environ.setdefault("YOLO_CONFIG_DIR", str(root / "yolo"))
    p = str(root / "params.yaml")
    data.main(["--out", str(root / "defects"), "--metrics", str(root / "d.json"), "--params", p])
    train.main(["--data", str(root / "defects" / "dataset.yaml"), "--out", str(root / "w.pt"), "--metrics",
                str(root / "t.json"), "--epochs-csv", str(root / "e.csv"), "--params", p])
    (root / "models").mkdir()
    export.main(["--weights", str(root / "w.pt"), "--data", str(root / "defects"), "--out",
                 str(root / "models" / "yolov8n.onnx"), "--metrics", str(root / "x.json"), "--params", p])
    return root / "models", root / "defects" / "images" / "val"


def main() -> None:
    """Run the scaling benchmark and print the table."""
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
        sources = Sources(models_dir=models, samples_dir=samples, runtime_root=REPO)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'bench-mlflow.db'}"
        key = fixture.keygen(tmp / "id_ed25519")
        (tmp / "fleet").mkdir()
        fleet = fixture.SshdFleet(tmp / "fleet", key)
        rows = []
        try:
            hosts = [fleet.start(f"dev{i:02d}") for i in range(max(args.sizes))]
            model_size = (models / "yolov8n.onnx").stat().st_size
            for n in args.sizes:
                for h in hosts[:n]:  # fresh devices for every size
                    shutil.rmtree(h.deploy_dir)
                    h.deploy_dir.mkdir()
                inv = load_inventory(fleet.inventory({"pis": [(h, {}) for h in hosts[:n]]},
                                                     path=tmp / f"inv{n}.yaml", concurrency=max(args.sizes)))
                first = runner.deploy(inv, group="pis", sources=sources, results_dir=tmp / "reports",
                                      log_to_mlflow=False)
                again = runner.deploy(inv, group="pis", sources=sources, results_dir=tmp / "reports",
                                      log_to_mlflow=False)
                failed = [r for r in first.results + again.results if not r.ok]
                push = max(sum(r.timings.get(k, 0.0) for k in ("connect", "probe", "push")) for r in first.results)
                rows.append((n, first.wall_s, push, again.wall_s, sum(r.bytes_sent for r in first.results),
                             sum(r.model_bytes_sent for r in again.results), sum(r.bytes_sent for r in again.results),
                             len(failed)))
                if failed:
                    print(f"{n} hosts: {len(failed)} failures, e.g. {failed[0].host}: {failed[0].error}", flush=True)
                print(f"  done: {n} host(s)", flush=True)
        finally:
            fleet.stop_all()
    base, base_push = rows[0][1], rows[0][2]
    print(f"\nfleet deploy scaling (loopback sshd hosts sharing {os.cpu_count()} CPU cores; model "
          f"{model_size / 1e6:.1f} MB, on-device bench {3} iterations)")
    print(f"{'hosts':>5}  {'deploy s':>8}  {'vs 1':>5}  {'push s':>6}  {'vs 1':>5}  {'redeploy s':>10}  "
          f"{'MB sent':>8}  {'redeploy model B':>16}  {'redeploy B':>10}  {'failed':>6}")
    for n, wall, push, again, sent, model_again, bytes_again, failed in rows:
        print(f"{n:>5}  {wall:>8.2f}  {wall / base:>5.2f}  {push:>6.2f}  {push / base_push:>5.2f}  {again:>10.2f}  "
              f"{sent / 1e6:>8.1f}  {model_again:>16}  {bytes_again:>10}  {failed:>6}")
    print("targets: 32 hosts <= 2.00x the time of 1; redeploy model bytes = 0")


if __name__ == "__main__":
    main()
