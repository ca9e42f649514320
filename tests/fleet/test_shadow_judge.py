"""Judging a shadow run, and the staged-rollout options: pure functions, no hosts."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from pipeline.fleet import runner
from pipeline.fleet.inventory import InventoryError, ShadowSettings, parse_inventory
from pipeline.fleet.shadow import ShadowPlan, judge, metrics

SETTINGS = ShadowSettings(min_frames=10, min_f1=0.9, min_class_f1=0.8, min_class_support=5,
                          max_abs_count_delta=0.5, max_p95_ratio=2.0, max_errors=0)
GOOD: dict[str, Any] = {
    "status": "done", "error": "", "frames_compared": 50, "frames_skipped_busy": 3, "errors": 0,
    "error_samples": [], "duration_s": 12.0,
    "agreement": {"iou": 0.5, "tp": 95, "fp": 3, "fn": 2, "precision": 0.969, "recall": 0.979, "f1": 0.974,
                  "per_class": {"scratch": {"tp": 60, "fp": 1, "fn": 1, "f1": 0.98},
                                "dent": {"tp": 1, "fp": 2, "fn": 1, "f1": 0.4}}},  # 2 boxes: below support
    "counts": {"current_total": 97, "candidate_total": 98, "mean_delta_per_frame": 0.02,
               "mean_abs_delta_per_frame": 0.1, "per_class": {}},
    "latency_ms": {"current": {"p50": 10.0, "p95": 12.0, "n": 50}, "candidate": {"p50": 11.0, "p95": 14.0, "n": 50}},
}


def _with(path: str, value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(GOOD)
    node = doc
    *parents, last = path.split(".")
    for key in parents:
        node = node[key]
    node[last] = value
    return doc


def test_a_candidate_that_agrees_passes() -> None:
    assert judge(GOOD, SETTINGS) == []
    m = metrics(GOOD)
    assert m["shadow_f1"] == pytest.approx(0.974) and m["shadow_candidate_p95_ms"] == 14.0
    assert m["shadow_f1.scratch"] == 0.98 and m["shadow_frames_compared"] == 50


@pytest.mark.parametrize("path,value,reason", [
    ("status", "failed", "did not complete (status 'failed'"),
    ("frames_compared", 4, "only 4 frame(s) compared, fewer than min_frames 10"),
    ("errors", 2, "raised 2 error(s), more than max_errors 0"),
    ("agreement.f1", 0.5, "F1 0.500 < min_f1 0.9"),
    ("agreement.per_class.scratch.f1", 0.7, "class 'scratch': F1 0.700 < min_class_f1 0.8"),
    ("counts.mean_abs_delta_per_frame", 3.0, "differ by 3.00 on average"),
    ("latency_ms.candidate.p95", 40.0, "3.33x current's 12.0 ms, above max_p95_ratio 2"),
    # A missing figure is a failure, never a pass.
    ("agreement.f1", None, "reported no agreement F1"),
    ("counts.mean_abs_delta_per_frame", None, "no detection-count delta"),
    ("latency_ms.candidate", {}, "no P95 latency"),
])
def test_each_failure_is_one_named_reason(path: str, value: Any, reason: str) -> None:
    reasons = judge(_with(path, value), SETTINGS)
    assert any(reason in r for r in reasons), reasons


def test_both_models_seeing_nothing_is_agreement_not_a_missing_figure() -> None:
    empty = _with("agreement", {"iou": 0.5, "tp": 0, "fp": 0, "fn": 0, "f1": None, "per_class": {}})
    assert judge(empty, SETTINGS) == []
    off = ShadowSettings(min_frames=10, max_p95_ratio=None)
    assert judge(_with("latency_ms.candidate.p95", 1e6), off) == []


def test_shadow_plan_window() -> None:
    s = ShadowSettings(frames=300, minutes=10.0)
    assert ShadowPlan().window(s) == (300, 600.0)
    assert ShadowPlan(frames=20).window(s) == (20, None)
    assert ShadowPlan(minutes=0.5).window(s) == (None, 30.0)


def test_rollout_options() -> None:
    assert runner.parse_rollout() is None
    r = runner.parse_rollout("1", "25%", "10")
    assert (r.canary, r.batch, r.batch_percent, r.max_fail_percent) == (1, None, 25.0, 10.0)
    assert r.batch_size(10) == 2 and r.batch_size(3) == 1 and r.batch_text == "25%"
    r = runner.parse_rollout(None, "4", None)
    assert (r.canary, r.batch_size(10), r.max_fail_percent) == (0, 4, 0.0)
    assert runner.parse_rollout("2", None, None).batch_size(7) == 7  # no --batch: the rest in one batch
    for args, message in [(("many", None, None), "--canary 'many'"), ((None, "0", None), "--batch '0'"),
                          ((None, "150%", None), "--batch '150%'"), ((None, "x", None), "--batch 'x'"),
                          ((None, None, "150"), "--max-fail-percent '150'"),
                          ((None, None, "-1"), "--max-fail-percent '-1'"), (("-1", None, None), "--canary '-1'")]:
        with pytest.raises(ValueError, match=message):
            runner.parse_rollout(*args)
    assert runner.parse_frames(" 20 ") == 20 and runner.parse_minutes("0.5") == 0.5
    with pytest.raises(ValueError, match="--frames '0'"):
        runner.parse_frames("0")
    with pytest.raises(ValueError, match="--minutes 'forever'"):
        runner.parse_minutes("forever")


def _inventory(shadow_defaults: Any, host_shadow: Any = None) -> dict[str, Any]:
    host: dict[str, Any] = {"address": "10.0.0.2"}
    if host_shadow is not None:
        host["shadow"] = host_shadow
    return {"defaults": {"kind": "pi", "port": 22, "user": "pi", "key": "/k", "agent": False,
                         "accept_new_host_key": False, "arch": "aarch64", "runtime": "onnxruntime",
                         "precision": "fp32", "deploy_dir": "/home/pi/edge", "python": "/usr/bin/python3",
                         "ort_threads": 4, "thermal_throttle_c": 80.0, "thermal_resume_c": 70.0, "bench_warmup": 1,
                         "bench_iterations": 10, "conf": 0.25, "iou": 0.45, "max_det": 100,
                         "shadow": shadow_defaults},
            "groups": {"pis": {"hosts": {"pi1": host}}}}


def test_inventory_shadow_section_merges_key_by_key_and_is_checked(tmp_path: Any) -> None:
    inv = parse_inventory(_inventory({"min_f1": 0.95, "frames": 100}, {"every_k": 5, "max_p95_ratio": None}),
                          tmp_path / "inv.yaml")
    s = inv.select(host="pi1")[0].shadow
    assert (s.min_f1, s.frames, s.every_k, s.max_p95_ratio, s.min_class_f1) == (0.95, 100, 5, None, 0.8)
    for bad, message in [({"min_f1": 1.5}, "shadow.min_f1"), ({"every_k": 0}, "shadow.every_k"),
                         ({"frames": 10, "min_frames": 30}, "min_frames"), ({"fraems": 10}, "'shadow.fraems'"),
                         ({"minutes": float("inf")}, "shadow.minutes")]:
        with pytest.raises(InventoryError, match=message):
            parse_inventory(_inventory(bad), tmp_path / "inv.yaml")


def test_the_report_reads_the_latest_shadow_per_host(tmp_path: Any) -> None:
    import json

    from pipeline.stages.report import latest_device_results, latest_fleet_docs, shadow_rows

    host = tmp_path / "fleet" / "pi1"
    host.mkdir(parents=True)
    for stamp, passed in (("20261201T100000Z", False), ("20261201T120000Z", True)):
        doc = {"kind": "shadow", "created_utc": stamp, "candidate": "c" * 12, "current": "a" * 12, "passed": passed,
               "reasons": [] if passed else ["F1 0.5 < min_f1 0.9"], "result": GOOD}
        (host / f"shadow-{stamp}.json").write_text(json.dumps(doc))
    (host / "20261201T110000Z.json").write_text(json.dumps({"kind": "device-benchmark", "created_utc": "x"}))
    rows = shadow_rows(latest_fleet_docs(tmp_path / "fleet", "shadow"))
    assert len(rows) == 1 and rows[0]["passed"] and rows[0]["measured_utc"] == "20261201T120000Z"
    assert rows[0]["f1"] == pytest.approx(0.974) and rows[0]["p95_candidate_ms"] == 14.0
    assert [d["_file"] for d in latest_device_results(tmp_path / "fleet")] == ["20261201T110000Z.json"]
