"""End to end: the tiny pipeline's first `dvc repro` from clean, in a temporary workspace of the repo.

Real DVC, real Ultralytics training (1 epoch, 64 px), real ONNX export and parity check, real
MLflow (a SQLite store in the workspace). Checks: every declared output exists; one MLflow run per
stage execution and no stray Ultralytics run; `dvc status` is clean; a second `dvc repro` runs
nothing. The workspace is run 1 of the reproducibility check's session fixture (`tiny_repro`,
tests/tiny_repro.py: the check's own `prepare_workspace` and `run_env`, the pipeline twice from
clean, compared), so the pipeline is not run a third time for these tests (CI time); whether run
2 reproduced it is tests/test_repro_check.py's `test_the_tiny_pipeline_reproduces`.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
import pytest
import yaml
from support import run_checked

from pipeline.tools.repro_check import run_env

pytestmark = pytest.mark.slow
pytest_plugins = ["tiny_repro"]

if TYPE_CHECKING:
    from tiny_repro import TinyRepro


def _lock_hashes(repo: Path) -> dict[str, dict[str, str]]:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {stage: {o["path"]: o["md5"] for o in spec.get("outs", [])} for stage, spec in lock["stages"].items()}


@pytest.fixture(scope="module")
def repo(tiny_repro: TinyRepro) -> Path:
    return tiny_repro.run1


@pytest.fixture(scope="module")
def env(repo: Path) -> dict[str, str]:
    return run_env(repo)  # MLflow store and Ultralytics config inside the workspace; this venv's python


def test_outputs_and_metrics(repo: Path) -> None:
    for out in ("data/defects/dataset.yaml", "models/yolov8n.pt", "models/yolov8n.onnx",
                "reports/data/metrics.json", "reports/train/metrics.json", "reports/train/epochs.csv",
                "reports/export/metrics.json",
                # issue 3: camera frames and calibration sets
                "data/camera_frames/labelled/dataset.yaml", "reports/camera/metrics.json",
                "calibration/camera/tensors.npy", "calibration/camera/manifest.json",
                "calibration/train/tensors.npy", "calibration/train/manifest.json", "reports/calibrate/metrics.json",
                # issue 3: evaluation and host benchmark
                "reports/evaluate/metrics.json", "reports/evaluate/per_class.csv",
                "reports/benchmark/results.json", "reports/benchmark/results.csv",
                "reports/benchmark/latency_samples.csv",
                # issue 6: the report stage
                "reports/report.md", "reports/report/summary.json", "reports/report/latency_quantiles.csv",
                # the DVC metrics: headline numbers only
                "reports/data/headline.json", "reports/quantize/headline.json", "reports/evaluate/headline.json",
                "reports/benchmark/headline.json",
                "reports/plots/accuracy_vs_latency.png", "reports/plots/latency_cdf.png",
                "reports/plots/per_class_ap.png", "reports/plots/thermal_timeline.png"):
        assert (repo / out).is_file(), out
    evaluate = json.loads((repo / "reports/evaluate/metrics.json").read_text())
    models = {"pytorch", "fp32", "int8", "dynamic", "int8_calib_train", "int8_calib_camera"}
    for split in ("val", "camera"):
        assert models <= set(evaluate[split]), f"evaluate {split}: {sorted(evaluate[split])}"
        assert evaluate[split]["fp32"]["drop_vs_fp32"] == 0.0
    assert "camera_calibration_gain_on_camera" in evaluate
    bench = json.loads((repo / "reports/benchmark/results.json").read_text())
    assert sorted(bench["results"]) == ["64", "96"]  # tiny params: export.imgsz and one size exported in-run
    for row in bench["results"].values():
        assert sorted(row) == ["dynamic", "fp32", "int8"]
        assert all(r["latency_ms"]["p50"] > 0 and r["peak_rss_mb"] > 0 for r in row.values())
    assert sorted(p.name for p in (repo / "data/camera_frames/frames").iterdir()), "no camera folders"
    calib = json.loads((repo / "reports/calibrate/metrics.json").read_text())
    assert calib["camera"]["selected"] == calib["train"]["selected"] > 0
    assert calib["camera"]["duplicates_dropped"] > 0, "synthetic camera bursts were not deduplicated"
    train = json.loads((repo / "reports/train/metrics.json").read_text())
    assert set(train) >= {"precision", "recall", "mAP50", "mAP50-95"} and train["epochs"] == 1
    export = json.loads((repo / "reports/export/metrics.json").read_text())
    assert export["max_abs_diff_score"] <= 1e-3 and export["size_bytes"] > 1_000_000
    assert not (repo / "runs").exists(), "Ultralytics litter escaped into the repo"
    assert not list((repo / "data/defects/labels").glob("*.cache")), "label cache written into a DVC output"


def test_dvc_metrics_are_the_headline_numbers(repo: Path, env: dict[str, str]) -> None:
    """`dvc metrics show` lists 13 numbers (was ~360 over nine files), each equal to the stage's full record."""
    proc = subprocess.run(["dvc", "metrics", "show", "--json"], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=120, check=True)
    (workspace,) = json.loads(proc.stdout).values()
    shown = {path: doc["data"] for path, doc in workspace["data"].items()}
    evaluate = json.loads((repo / "reports/evaluate/metrics.json").read_text())
    bench = json.loads((repo / "reports/benchmark/results.json").read_text())["results"]["64"]
    quantize = json.loads((repo / "reports/quantize/metrics.json").read_text())
    assert shown == {
        "reports/data/headline.json": {"images_total": 36},
        "reports/quantize/headline.json": {"chosen": quantize["chosen"],
                                           "fp32_size_mb": round(quantize["size_fp32_bytes"] / 1e6, 3),
                                           "int8_size_mb": round(quantize["size_int8_bytes"] / 1e6, 3)},
        "reports/evaluate/headline.json": {
            **{f"{v}_mAP50-95_{s}": evaluate[s][v]["mAP50-95"] for v in ("fp32", "int8") for s in ("val", "camera")},
            **{f"int8_drop_{s}": evaluate[s]["int8"]["drop_vs_fp32"] for s in ("val", "camera")}},
        "reports/benchmark/headline.json": {"fp32_p50_ms": bench["fp32"]["latency_ms"]["p50"],
                                            "int8_p50_ms": bench["int8"]["latency_ms"]["p50"],
                                            "int8_speedup": bench["int8"]["speedup_p50_vs_fp32"]},
    }
    table = subprocess.run(["dvc", "metrics", "show"], cwd=repo, env=env, capture_output=True, text=True,
                           timeout=120, check=True).stdout.strip().splitlines()
    assert len(table) == 1 + 4, table  # header + one row per headline file


def test_onnx_metadata(repo: Path) -> None:
    import onnx

    from edge_runtime.fileio import sha256_file

    meta = {p.key: p.value for p in onnx.load(str(repo / "models/yolov8n.onnx")).metadata_props}
    assert meta["source_weights_sha256"] == sha256_file(repo / "models/yolov8n.pt")
    assert meta["output_format"] == "yolov8-raw" and "date" not in meta
    assert "crazing" in meta["names"] and meta["imgsz"] == "[64, 64]" and meta["stride"] == "32"


def test_one_mlflow_run_per_stage(repo: Path, env: dict[str, str]) -> None:
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    exps = client.search_experiments()
    # The report's summary run has nested runs (one per variant/device) for the compare view.
    runs = [r for e in exps for r in client.search_runs([e.experiment_id])
            if "mlflow.parentRunId" not in r.data.tags]
    stages = sorted(yaml.safe_load((repo / "dvc.yaml").read_text())["stages"])
    assert sorted(r.data.tags.get("stage") for r in runs) == stages, \
        f"expected one run per stage, got {[(r.info.run_name, r.data.tags.get('stage')) for r in runs]}"
    train = next(r for r in runs if r.data.tags["stage"] == "train")
    assert train.info.status == "FINISHED"
    assert len(client.get_metric_history(train.info.run_id, "mAP50-95")) == 1  # one point per epoch
    assert "train.lr0" in train.data.params and train.data.tags["model_sha256"]
    assert [a.path for a in client.list_artifacts(train.info.run_id, "weights")] == ["weights/yolov8n.pt"]
    export = next(r for r in runs if r.data.tags["stage"] == "export")
    assert export.data.tags["weights_sha256"] == train.data.tags["model_sha256"]


def test_lineage_tags_consistent_across_stages(repo: Path, env: dict[str, str]) -> None:
    """Every stage run names what it consumed/produced by sha256, and the values agree across stages."""
    from pipeline.tracking.mlflow_runs import walk_lineage

    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = {r.data.tags["stage"]: r.data.tags for e in client.search_experiments()
            for r in client.search_runs([e.experiment_id]) if "mlflow.parentRunId" not in r.data.tags}
    for stage, tags in runs.items():
        assert tags.get("git_commit") and len(tags.get("params_hash", "")) == 16, stage
    same = {
        "dataset_sha256": ("data", "train", "export", "camera", "calibrate", "quantize", "evaluate"),
        "weights_sha256": ("train", "export", "quantize", "evaluate", "benchmark"),
        "onnx_sha256": ("export", "quantize", "evaluate", "benchmark", "report"),
        "int8_sha256": ("quantize", "evaluate", "benchmark", "report"),
        "camera_frames_sha256": ("camera", "calibrate"),
    }
    for key, stages in same.items():
        values = {s: runs[s].get(key) for s in stages}
        assert len(set(values.values())) == 1 and None not in values.values(), (key, values)
    assert runs["quantize"]["calibration_sha256"] == runs["calibrate"]["calibration_camera_sha256"]
    assert runs["train"]["model_sha256"] == runs["train"]["weights_sha256"]
    report = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.stage = 'report'")[0]
    chain = [c["stage"] for c in walk_lineage(report.info.run_id, client)]
    assert {"report", "quantize", "export", "train", "data", "calibrate", "camera"} <= set(chain), chain


def test_status_clean_and_second_repro_is_noop(repo: Path, env: dict[str, str]) -> None:
    status = run_checked(["dvc", "status"], repo, env)
    assert "up to date" in status, status
    before = _lock_hashes(repo)
    again = run_checked(["dvc", "repro"], repo, env)
    for stage in yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]:
        assert f"Stage '{stage}' didn't change, skipping" in again, again
    assert _lock_hashes(repo) == before
