"""The reproducibility check (pipeline/tools/repro_check.py).

Fast tests: the comparison rules on small hand-made workspaces (a dvc.yaml, a dvc.lock whose hashes
are the md5 of the files written next to it, metrics JSON), the params section, and how a
workspace is prepared (git only). Slow tests: the check itself on the whole tiny pipeline, twice
from clean (the session fixture `tiny_repro`, tests/tiny_repro.py: what CI relies on for "the
pipeline reproduces"), its command line comparing those two workspaces, and real `dvc repro
data` twice with the `data` stage made random on purpose (the check must fail naming it).
"""

from __future__ import annotations

import copy
import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import pytest
import support
import yaml
from support import REPO, copy_repo

from pipeline.config.params import MetricTolerance, ReproCheckParams, load_params
from pipeline.tools import repro_check
from pipeline.tools.repro_check import (
    EXIT_DIFFERENT,
    EXIT_ERROR,
    EXIT_OK,
    compare_metrics,
    compare_runs,
    downstream,
    main,
    prepare_workspace,
    within,
)
from pipeline.tracking.flatten import flatten

pytest_plugins = ["tiny_repro"]

if TYPE_CHECKING:
    from tiny_repro import TinyRepro

CFG = load_params("repro_check", ReproCheckParams, REPO / "params.yaml")
CFG_RAW = yaml.safe_load((REPO / "params.yaml").read_text())["repro_check"]

# A pipeline shaped like ours: data -> train; quantize picks by latency; evaluate and benchmark
# read its model; benchmark is tolerant. Each value: (deps, outputs {path: bytes | dict | folder}).
# As in dvc.yaml, headline.json files are the DVC metrics and the other JSON files (each stage's
# full record) are outs.
Outputs = dict[str, Any]


def _pipeline(**changes: Any) -> dict[str, tuple[list[str], Outputs]]:
    quantize_metrics = {"chosen": "a", "int8_mAP50-95": 0.5, "map_drop": 0.01, "size_int8_bytes": 1000}
    stages: dict[str, tuple[list[str], Outputs]] = {
        "data": ([], {"data/defects": {"images/0.jpg": b"img0", "images/1.jpg": b"img1"},
                      "reports/data/metrics.json": {"images": 2}}),
        "train": (["data/defects"], {"models/w.pt": b"weights", "reports/train/metrics.json": {"mAP50-95": 0.3}}),
        "quantize": (["models/w.pt"], {"models/int8.onnx": b"int8-a", "reports/quantize/candidates.csv": b"a,1.0ms",
                                       "reports/quantize/metrics.json": quantize_metrics,
                                       "reports/quantize/headline.json": {"chosen": "a", "int8_size_mb": 0.001}}),
        "evaluate": (["models/int8.onnx"], {"reports/evaluate/metrics.json": {"val": {"int8": {"mAP50-95": 0.5,
                                                                                               "precision": 0.6}}}}),
        "benchmark": (["models/int8.onnx"], {"reports/benchmark/results.csv": b"p50,1.0",
                                             "reports/benchmark/headline.json": {"int8_p50_ms": 1.0},
                                             "reports/benchmark/results.json": {
                                                 "results": {"64": {"int8": {"latency_ms": {"p50": 1.0},
                                                                             "fps": 1000.0, "peak_rss_mb": 70.0,
                                                                             "size_bytes": 1000,
                                                                             "model_sha256": "aa"}}}}}),
    }
    for key, value in changes.items():  # "stage:path" -> new content (None removes the stage)
        stage, _, path = key.partition(":")
        if value is None:
            del stages[stage]
        else:
            stages[stage] = (stages[stage][0], {**stages[stage][1], path: value})
    return stages


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _write_out(root: Path, path: str, content: Any) -> str:
    """Write one output; return the hash dvc.lock would record for it."""
    target = root / path
    if isinstance(content, dict) and not path.endswith(".json"):  # a folder
        listing = []
        for rel, data in sorted(content.items()):
            (target / rel).parent.mkdir(parents=True, exist_ok=True)
            (target / rel).write_bytes(data)
            listing.append({"relpath": rel, "md5": _md5(data)})
        return _md5(json.dumps(listing).encode()) + ".dir"
    target.parent.mkdir(parents=True, exist_ok=True)
    data = json.dumps(content, sort_keys=True).encode() if isinstance(content, dict) else content
    target.write_bytes(data)
    return _md5(data)


def make_run(root: Path, stages: dict[str, tuple[list[str], Outputs]]) -> Path:
    """A finished workspace: outputs on disk, dvc.yaml (headline.json files as metrics, every other
    output an out, other JSON files with `cache: false` as in the real dvc.yaml), dvc.lock."""
    root.mkdir(parents=True)
    dvc_yaml: dict[str, Any] = {"stages": {}}
    lock: dict[str, Any] = {"schema": "2.0", "stages": {}}
    for name, (deps, outs) in stages.items():
        metrics = [p for p in outs if p.endswith("headline.json")]
        dvc_yaml["stages"][name] = {"cmd": f"python -m pipeline.{name}", "deps": deps,
                                    "outs": [{p: {"cache": False}} if p.endswith(".json") else p
                                             for p in outs if p not in metrics], "metrics": metrics}
        lock["stages"][name] = {
            "cmd": f"python -m pipeline.{name}",
            "deps": [{"path": d, "hash": "md5", "md5": "0" * 32} for d in deps],
            "outs": [{"path": p, "hash": "md5", "md5": _write_out(root, p, c)} for p, c in sorted(outs.items())],
        }
    (root / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))
    (root / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False))
    return root


@pytest.fixture
def runs(tmp_path: Path) -> Callable[..., tuple[Path, Path]]:
    """Two workspaces: run 1 the reference pipeline, run 2 with `changes` applied."""

    pairs = iter(range(100))

    def _make(**changes: Any) -> tuple[Path, Path]:
        root = tmp_path / f"pair{next(pairs)}"
        return make_run(root / "run1", _pipeline()), make_run(root / "run2", _pipeline(**changes))

    return _make


# --------------------------------------------------------------------------------------------
# Comparison rules
# --------------------------------------------------------------------------------------------


def test_identical_runs_pass(runs: Callable[..., tuple[Path, Path]]) -> None:
    result = compare_runs(*runs(), CFG)
    assert result.ok, result.render()
    assert result.modes == {"data": "bit-exact", "train": "bit-exact", "quantize": "bit-exact",
                            "evaluate": "bit-exact", "benchmark": "tolerant"}
    assert "picked 'a' in both runs" in result.render()


def test_bit_exact_folder_difference_names_stage_path_hashes_and_file(runs: Callable[..., tuple[Path, Path]]) -> None:
    run1, run2 = runs(**{"data:data/defects": {"images/0.jpg": b"img0", "images/1.jpg": b"CHANGED",
                                               "images/2.jpg": b"new"}})
    result = compare_runs(run1, run2, CFG)
    assert not result.ok
    (diff,) = result.differences
    assert (diff.stage, diff.path) == ("data", "data/defects")
    assert diff.hash1.endswith(".dir") and diff.hash1 != diff.hash2
    assert diff.details == ("only in run 2: images/2.jpg", "changed: images/1.jpg")
    text = result.render()
    assert "FAILED" in text and "stage data: data/defects" in text and diff.hash1 in text and diff.hash2 in text


def test_bit_exact_metrics_difference_lists_moved_keys(runs: Callable[..., tuple[Path, Path]]) -> None:
    result = compare_runs(*runs(**{"train:reports/train/metrics.json": {"mAP50-95": 0.3001}}), CFG)
    (diff,) = result.differences
    assert diff.stage == "train" and diff.path == "reports/train/metrics.json"
    # bit-exact stages are exact: the mAP tolerance does not apply to them
    assert diff.details == ("mAP50-95: 0.3 -> 0.3001 (diff +0.0001; must be equal)",)


def test_tolerant_stage_ignores_latency_and_checks_the_rest(runs: Callable[..., tuple[Path, Path]]) -> None:
    moved_latency = {"results": {"64": {"int8": {"latency_ms": {"p50": 9.0}, "fps": 111.0, "peak_rss_mb": 90.0,
                                                 "size_bytes": 1000, "model_sha256": "aa"}}}}
    result = compare_runs(*runs(**{"benchmark:reports/benchmark/results.json": moved_latency,
                                   "benchmark:reports/benchmark/results.csv": b"p50,9.0"}), CFG)
    assert result.ok, result.render()

    other_model = copy.deepcopy(moved_latency)
    other_model["results"]["64"]["int8"].update(size_bytes=2000, providers=["CUDA"])
    result = compare_runs(*runs(**{"benchmark:reports/benchmark/results.json": other_model}), CFG)
    (diff,) = result.differences
    assert diff.stage == "benchmark" and diff.details == (
        "results.64.int8.providers[0]: only in run 2",
        "results.64.int8.size_bytes: 1000 -> 2000 (diff +1000; tolerance abs 0 rel 0.1)")


def test_headline_latency_ignored_full_record_still_compared(runs: Callable[..., tuple[Path, Path]]) -> None:
    """benchmark's DVC metrics are its headline.json; results.json is an out and still checked."""
    result = compare_runs(*runs(**{"benchmark:reports/benchmark/headline.json": {"int8_p50_ms": 7.5}}), CFG)
    assert result.ok, result.render()
    run1, _ = runs()
    spec = yaml.safe_load((run1 / "dvc.yaml").read_text())["stages"]["benchmark"]
    assert spec["metrics"] == ["reports/benchmark/headline.json"]
    assert {"reports/benchmark/results.json": {"cache": False}} in spec["outs"]
    record = json.loads((run1 / "reports/benchmark/results.json").read_text())
    record["results"]["64"]["int8"]["peak_rss_mb"] = 95.0  # ignored (*rss_mb) ...
    record["results"]["64"]["int8"]["model_sha256"] = "bb"  # ... a string must be equal
    result = compare_runs(*runs(**{"benchmark:reports/benchmark/results.json": record}), CFG)
    (diff,) = result.differences
    assert (diff.stage, diff.path, diff.details) == ("benchmark", "reports/benchmark/results.json",
                                                     ("results.64.int8.model_sha256: 'aa' -> 'bb'",))


def test_real_dvc_yaml_compares_every_json_record() -> None:
    """In the real dvc.yaml, `metrics:` is only headline.json files; every JSON file a stage declares
    (its full record: metrics.json, results.json, summary.json) is compared key by key all the same."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    documents = repro_check.compared_documents(REPO)
    metrics = repro_check.declared_metrics(REPO)
    for stage, spec in stages.items():
        declared = {next(iter(e)) if isinstance(e, dict) else e
                    for key in ("outs", "metrics", "plots") for e in spec.get(key, [])}
        assert documents[stage] == {p for p in declared if p.endswith(".json")}, stage
        assert all(Path(m).name == "headline.json" for m in metrics[stage]), (stage, metrics[stage])
    assert documents["benchmark"] == {"reports/benchmark/results.json", "reports/benchmark/headline.json"}
    assert documents["report"] == {"reports/report/summary.json"} and not metrics["report"]
    assert {s for s, m in metrics.items() if m} == {"data", "quantize", "evaluate", "benchmark"}


def test_tolerant_output_inside_bit_exact_stage(runs: Callable[..., tuple[Path, Path]]) -> None:
    result = compare_runs(*runs(**{"quantize:reports/quantize/candidates.csv": b"a,1.3ms"}), CFG)
    assert result.ok, result.render()


def test_same_pick_keeps_downstream_bit_exact(runs: Callable[..., tuple[Path, Path]]) -> None:
    evaluate = {"val": {"int8": {"mAP50-95": 0.5001, "precision": 0.6}}}
    result = compare_runs(*runs(**{"evaluate:reports/evaluate/metrics.json": evaluate}), CFG)
    (diff,) = result.differences
    assert diff.stage == "evaluate" and "val.int8.mAP50-95: 0.5 -> 0.5001" in diff.details[0]


def test_different_pick_is_reported_and_compared_within_tolerance(runs: Callable[..., tuple[Path, Path]]) -> None:
    picked_b = {"chosen": "b", "int8_mAP50-95": 0.505, "map_drop": 0.005, "size_int8_bytes": 1020}
    headline_b = {"chosen": "b", "int8_size_mb": 0.00102}  # the pick is read from here (params: choice)
    run1, run2 = runs(**{"quantize:reports/quantize/metrics.json": picked_b, "quantize:models/int8.onnx": b"int8-b",
                         "quantize:reports/quantize/headline.json": headline_b,
                         "evaluate:reports/evaluate/metrics.json": {"val": {"int8": {"mAP50-95": 0.51,
                                                                                     "precision": 0.62}}}})
    result = compare_runs(run1, run2, CFG)
    assert result.ok, result.render()
    assert result.modes["quantize"] == result.modes["evaluate"] == "tolerant (pick differed)"
    assert result.modes["train"] == "bit-exact" and result.modes["benchmark"] == "tolerant"
    text = result.render()
    assert "picked differently by measurement: run 1 'a', run 2 'b'" in text
    assert "chosen: 'a' -> 'b' (differs with the pick)" in text

    too_far = {"val": {"int8": {"mAP50-95": 0.6, "precision": 0.6}}}
    result = compare_runs(*runs(**{"quantize:reports/quantize/metrics.json": picked_b,
                                   "quantize:reports/quantize/headline.json": headline_b,
                                   "evaluate:reports/evaluate/metrics.json": too_far}), CFG)
    (diff,) = result.differences
    assert diff.stage == "evaluate"
    assert diff.details == ("val.int8.mAP50-95: 0.5 -> 0.6 (diff +0.1; tolerance abs 0.02 rel 0)",)


def test_stage_in_one_run_only(runs: Callable[..., tuple[Path, Path]]) -> None:
    result = compare_runs(*runs(benchmark=None), CFG)
    (diff,) = result.differences
    assert (diff.stage, diff.hash1, diff.hash2) == ("benchmark", "ran", "absent")


def test_unknown_tolerant_stage_is_a_note(runs: Callable[..., tuple[Path, Path]]) -> None:
    cfg = ReproCheckParams(**{**CFG.__dict__, "tolerant_stages": ("benchmark", "reprot")})
    result = compare_runs(*runs(), cfg)
    assert result.ok and "tolerant_stages lists reprot, not stage(s) in dvc.yaml" in result.render()


def test_downstream_follows_lock_deps() -> None:
    lock = {"a": {"outs": [{"path": "x"}]}, "b": {"deps": [{"path": "x/file"}], "outs": [{"path": "y"}]},
            "c": {"deps": [{"path": "y"}]}, "d": {"deps": [{"path": "z"}]}}
    assert downstream(lock, "a") == {"a", "b", "c"}
    assert downstream(lock, "c") == {"c"}


def test_metric_helpers() -> None:
    assert flatten({"a": {"b": [1, {"c": 2}]}, "d": "x"}) == {"a.b[0]": 1, "a.b[1].c": 2, "d": "x"}
    tol = MetricTolerance("*", abs_tol=0.01, rel_tol=0.1)
    assert within(1.0, 1.01, tol) and within(100.0, 109.0, tol) and not within(0.1, 0.2, tol)
    assert within(float("nan"), float("nan"), None) and not within(1.0, 1.0 + 1e-12, None)
    moved, expected = compare_metrics({"k": True, "n": 1}, {"k": False, "m": 1}, CFG)
    assert moved == ["k: True -> False", "m: only in run 2", "n: only in run 1"] and expected == []


# --------------------------------------------------------------------------------------------
# Params and CLI
# --------------------------------------------------------------------------------------------


def test_committed_section_loads() -> None:
    assert "benchmark" in CFG.tolerant_stages and CFG.choice.stage == "quantize"
    assert all(isinstance(t, MetricTolerance) for t in CFG.tolerances)
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert CFG.choice.stage in stages
    assert CFG.choice.metrics in stages[CFG.choice.stage]["metrics"]


@pytest.mark.parametrize("key,value,message", [
    ("tolerances", [{"metrics": "*", "abs_tol": -1, "rel_tol": 0}], r"abs_tol and rel_tol must be >= 0"),
    ("tolerances", [{"metrics": "*", "abs": 0.1, "rel_tol": 0}], r"unknown key 'repro_check\.tolerances\[0\]\.abs'"),
    ("choice", {"stage": "quantize", "metrics": "", "key": "chosen"}, r"metrics and key are required"),
    ("tolerant_stages", ["benchmark", "benchmark"], r"lists a stage twice"),
])
def test_bad_section(repo_params: dict[str, Any], write_params: Callable[..., Path], key: str, value: Any,
                     message: str) -> None:
    bad = copy.deepcopy(repo_params)
    bad["repro_check"][key] = value
    with pytest.raises(ValueError, match=message):
        load_params("repro_check", ReproCheckParams, write_params(bad))


def test_cli_compare_exit_status(runs: Callable[..., tuple[Path, Path]], capsys: pytest.CaptureFixture[str],
                                 tmp_path: Path) -> None:
    run1, run2 = runs(**{"train:models/w.pt": b"other weights"})
    assert main(["--compare", str(run1), str(run2)]) == EXIT_DIFFERENT
    out = capsys.readouterr().out
    assert "stage train: models/w.pt" in out and _md5(b"weights") in out and _md5(b"other weights") in out
    assert main(["--compare", str(run1), str(run1)]) == EXIT_OK
    assert main(["--compare", str(run1), str(tmp_path / "nowhere")]) == EXIT_ERROR
    assert "no dvc.lock; did `dvc repro` run" in capsys.readouterr().err


def test_tiny_params_has_one_home() -> None:
    assert support.tiny_params is repro_check.tiny_params


# --------------------------------------------------------------------------------------------
# Workspaces (git only)
# --------------------------------------------------------------------------------------------


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                   env={"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                        "GIT_COMMITTER_EMAIL": "t@t", "PATH": "/usr/bin:/bin", "HOME": str(cwd)})


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A small git repository: params.yaml, a tracked module, an ignored output, a .dvc folder."""
    src = tmp_path / "src"
    (src / "pipeline").mkdir(parents=True)
    (src / ".dvc").mkdir()
    (src / ".dvc" / "config").write_text("[core]\n    analytics = false\n")
    (src / "params.yaml").write_text((REPO / "params.yaml").read_text())
    (src / "pipeline" / "stage.py").write_text("committed\n")
    (src / ".gitignore").write_text("/models/\n")
    (src / "models").mkdir()
    (src / "models" / "big.onnx").write_text("output")
    _git(src, "init", "-q")
    _git(src, "add", "-A")
    _git(src, "commit", "-qm", "init")
    (src / "pipeline" / "stage.py").write_text("edited, not committed\n")
    (src / "pipeline" / "new.py").write_text("untracked\n")
    return src


def test_workspace_is_the_working_tree_with_tiny_params(source: Path, tmp_path: Path) -> None:
    ws1 = prepare_workspace(source, tmp_path / "ws1", from_head=False)
    ws2 = prepare_workspace(source, tmp_path / "ws2", from_head=False)
    assert (ws1 / "pipeline" / "stage.py").read_text() == "edited, not committed\n"
    assert (ws1 / "pipeline" / "new.py").is_file() and not (ws1 / "models").exists()
    params = yaml.safe_load((ws1 / "params.yaml").read_text())
    assert params["train"]["epochs"] == 1 and params["repro_check"] == CFG_RAW
    head = [subprocess.run(["git", "rev-parse", "HEAD"], cwd=w, capture_output=True, text=True).stdout
            for w in (ws1, ws2)]
    assert head[0] == head[1], "workspace commits must be identical (fixed dates)"
    config = (ws1 / ".dvc" / "config.local").read_text()
    assert str(ws1 / ".dvc" / "cache") in config


def test_workspace_from_head_leaves_uncommitted_edits_out(source: Path, tmp_path: Path) -> None:
    ws = prepare_workspace(source, tmp_path / "ws", from_head=True)
    assert (ws / "pipeline" / "stage.py").read_text() == "committed\n"
    assert not (ws / "pipeline" / "new.py").exists()


def test_source_must_be_a_git_repository(tmp_path: Path) -> None:
    with pytest.raises(repro_check.ReproCheckError, match="is not a git repository"):
        prepare_workspace(tmp_path, tmp_path / "ws", from_head=False)


# --------------------------------------------------------------------------------------------
# Real DVC: an injected nondeterminism is caught
# --------------------------------------------------------------------------------------------


def _check_data_stage(src: Path, tmp: Path) -> subprocess.CompletedProcess[str]:
    """`python -m pipeline.tools.repro_check --source src --stages data`, in a subprocess like `make repro-check`."""
    return subprocess.run([sys.executable, "-m", "pipeline.tools.repro_check", "--source", str(src), "--stages", "data",
                           "--workdir", str(tmp)], capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_the_tiny_pipeline_reproduces(tiny_repro: TinyRepro) -> None:
    """CI's reproducibility check: every stage held as params.yaml's `repro_check` says, nothing differed."""
    result = tiny_repro.result
    assert result.ok, result.render()
    stages = set(yaml.safe_load((tiny_repro.run1 / "dvc.yaml").read_text())["stages"])
    assert set(result.modes) == stages, result.modes
    for stage in ("data", "camera", "camera_profile", "train", "export", "calibrate"):
        assert result.modes[stage] == "bit-exact", (stage, result.render())
    assert result.ran_on.startswith("train.device=cpu, "), result.ran_on


@pytest.mark.slow
def test_command_line_compares_two_finished_runs(tiny_repro: TinyRepro) -> None:
    """`python -m pipeline.tools.repro_check --compare RUN1 RUN2`: the report and exit status 0."""
    proc = subprocess.run([sys.executable, "-m", "pipeline.tools.repro_check", "--compare", str(tiny_repro.run1),
                           str(tiny_repro.run2)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == EXIT_OK, proc.stdout + proc.stderr
    assert "data         bit-exact" in proc.stdout and "OK, both runs agree" in proc.stdout, proc.stdout


@pytest.mark.slow
def test_injected_nondeterminism_is_caught(tmp_path: Path) -> None:
    src = copy_repo(tmp_path / "src")
    _git(src, "init", "-q")
    _git(src, "add", "-A")
    _git(src, "commit", "-qm", "copy")
    # Make the data stage random: it also writes 8 random bytes into its output folder.
    dvc_yaml = yaml.safe_load((src / "dvc.yaml").read_text())
    dvc_yaml["stages"]["data"]["cmd"] = ("python -m pipeline.stages.data && python -c \"import os; "
                                         "open('data/defects/noise.bin', 'wb').write(os.urandom(8))\"")
    (src / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))
    bad = _check_data_stage(src, tmp_path / "random")
    assert bad.returncode == EXIT_DIFFERENT, bad.stdout + bad.stderr
    assert "stage data: data/defects" in bad.stdout and "changed: noise.bin" in bad.stdout, bad.stdout
    assert "train" not in bad.stdout.split("FAILED")[1], "only the data stage ran and differed"
