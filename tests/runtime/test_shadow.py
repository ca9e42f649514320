"""Shadow runs (`edge_runtime.shadow`, the device op `shadow_run`): the comparison on hand-made
boxes, the hand-off with a stand-in detector, and the real thing: the service running a candidate
release of the tiny model beside `current` on live (synthetic) frames, in-process and as
`python -m edge_runtime serve` driven by the device op, including a service killed mid-shadow.

No timing assertions: whether the line keeps its rate shows as consistent frame counts
(offered = compared + skipped while busy + failed, give or take the one frame in the hand-off).
"""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import pytest
from support import free_port, healthz, parse_metrics, service_doc, start_serve, wait_for

from edge_runtime import deploy_ops
from edge_runtime.manifest import PostprocessSettings
from edge_runtime.postprocess import Detections
from edge_runtime.realtime import SyntheticSource
from edge_runtime.release import VariantFiles, assemble_release
from edge_runtime.service import Service
from edge_runtime.service_config import config_from_json
from edge_runtime.shadow import (
    Comparison,
    ShadowHandler,
    ShadowRequestError,
    load_candidate,
    match_frame,
    parse_request,
    rates,
)

SOURCE = Path(deploy_ops.__file__).read_text()


def dets(*rows: Tuple[float, float, float, float, float, int]) -> Detections:
    """Detections from (x1, y1, x2, y2, score, class) rows."""
    if not rows:
        return Detections.empty()
    a = np.asarray(rows, dtype=np.float64)
    return Detections(a[:, :4].astype(np.float32), a[:, 4].astype(np.float32), a[:, 5].astype(np.int64))


# --------------------------------------------------------------------------- the comparison

def agreement_of(pairs: List[Tuple[Detections, Detections]], names: Tuple[str, ...] = ("scratch", "dent")
                 ) -> Dict[str, Any]:
    c = Comparison(names)
    for current, candidate in pairs:
        c.add(current, candidate, 0.010, 0.020)
    return c.to_json()


def test_identical_detections_agree_fully() -> None:
    d = dets((10, 10, 50, 50, 0.9, 0), (60, 60, 90, 90, 0.8, 1), (12, 12, 48, 52, 0.4, 0))
    assert match_frame(d, d) == {0: (2, 0, 0), 1: (1, 0, 0)}
    doc = agreement_of([(d, d), (d, d)])
    a, counts = doc["agreement"], doc["counts"]
    assert (a["tp"], a["fp"], a["fn"], a["f1"], a["precision"], a["recall"]) == (6, 0, 0, 1.0, 1.0, 1.0)
    assert a["note"] == "" and a["per_class"]["scratch"]["f1"] == 1.0 and a["per_class"]["dent"]["tp"] == 2
    assert counts["current_total"] == counts["candidate_total"] == 6
    assert counts["mean_delta_per_frame"] == 0.0 and counts["mean_abs_delta_per_frame"] == 0.0
    assert counts["per_class"]["scratch"] == {"current": 4, "candidate": 4, "delta": 0}
    assert doc["latency_ms"]["current"] == {"p50": 10.0, "p95": 10.0, "n": 2}
    assert doc["latency_ms"]["candidate"]["p50"] == 20.0


def test_disjoint_boxes_and_a_class_mismatch_do_not_agree() -> None:
    current = dets((0, 0, 10, 10, 0.9, 0), (20, 20, 30, 30, 0.9, 1))
    far = dets((100, 100, 110, 110, 0.9, 0), (200, 200, 210, 210, 0.9, 1))
    assert match_frame(current, far) == {0: (0, 1, 1), 1: (0, 1, 1)}
    swapped = dets((0, 0, 10, 10, 0.9, 1))  # the right place, the wrong class
    assert match_frame(dets((0, 0, 10, 10, 0.9, 0)), swapped) == {0: (0, 0, 1), 1: (0, 1, 0)}
    doc = agreement_of([(current, far), (dets((0, 0, 10, 10, 0.9, 0)), swapped)])
    a = doc["agreement"]
    assert (a["tp"], a["fp"], a["fn"], a["f1"], a["precision"], a["recall"]) == (0, 3, 3, 0.0, 0.0, 0.0)
    assert a["per_class"]["dent"] == {"tp": 0, "fp": 2, "fn": 1, "precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert doc["counts"]["mean_delta_per_frame"] == 0.0 and doc["counts"]["mean_abs_delta_per_frame"] == 0.0
    # Counts: one frame with two boxes fewer, one with one box more -> mean -0.5, mean absolute 1.5.
    doc = agreement_of([(current, Detections.empty()), (Detections.empty(), swapped)])
    assert doc["counts"]["mean_delta_per_frame"] == -0.5 and doc["counts"]["mean_abs_delta_per_frame"] == 1.5
    assert doc["counts"]["per_class"]["dent"] == {"current": 1, "candidate": 1, "delta": 0}


def test_nothing_seen_by_either_is_null_not_perfect() -> None:
    doc = agreement_of([(Detections.empty(), Detections.empty())] * 3)
    a = doc["agreement"]
    assert a["f1"] is None and a["precision"] is None and a["recall"] is None and a["note"] == "no detections"
    assert a["per_class"]["scratch"]["f1"] is None  # every class of the manifest is listed
    assert doc["counts"]["mean_abs_delta_per_frame"] == 0.0 and doc["counts"]["current_total"] == 0
    assert rates(0, 0, 4) == {"precision": None, "recall": 0.0, "f1": 0.0}  # the candidate saw nothing
    empty = Comparison(("scratch",)).to_json()
    assert empty["counts"]["mean_delta_per_frame"] is None and empty["latency_ms"]["current"]["n"] == 0


def test_matching_is_greedy_by_candidate_score_at_iou_half() -> None:
    current = dets((0, 0, 10, 10, 0.9, 0))
    # Both overlap the one current box; the higher-scoring candidate takes it, the other is a FP.
    two = dets((0, 0, 10, 8, 0.3, 0), (0, 0, 10, 5, 0.7, 0))
    assert match_frame(current, two) == {0: (1, 1, 0)}
    assert match_frame(current, dets((0, 0, 10, 5, 0.7, 0))) == {0: (1, 0, 0)}  # IoU exactly 0.5 counts
    assert match_frame(current, dets((0, 0, 10, 4.9, 0.7, 0))) == {0: (0, 1, 1)}
    # A class id the current manifest does not name is reported under its number.
    doc = agreement_of([(current, dets((0, 0, 10, 10, 0.5, 7)))], ("scratch",))
    assert doc["agreement"]["per_class"]["7"]["fp"] == 1 and doc["counts"]["per_class"]["7"]["delta"] == 1


def test_requests_are_checked_field_by_field() -> None:
    ok = parse_request({"id": "s-1", "candidate": "abc123def456", "frames": 30, "seconds": None})
    assert (ok.every_k, ok.threads, ok.engines, ok.frames, ok.seconds) == (3, 1, None, 30, None)
    base = {"id": "s-1", "candidate": "abc123def456", "every_k": 3, "frames": 30, "seconds": 1.5, "engines": None,
            "threads": 1}
    assert parse_request(base).seconds == 1.5
    for bad, needle in (([], "not a JSON object"), (dict(base, extra=1), "unknown field(s) extra"),
                        (dict(base, id="a/b"), "'id'"), (dict(base, id="request"), "'id'"),
                        (dict(base, id="x" * 65), "'id'"), (dict(base, candidate="../x"), "'candidate'"),
                        (dict(base, candidate=".x.partial"), "'candidate'"), (dict(base, every_k=0), "'every_k'"),
                        (dict(base, every_k=True), "'every_k'"), (dict(base, frames=None, seconds=None), "neither"),
                        (dict(base, seconds=float("nan")), "'seconds'"), (dict(base, engines="rel"), "'engines'"),
                        (dict(base, threads=0), "'threads'")):
        with pytest.raises(ShadowRequestError, match=re.escape(needle)):
            parse_request(bad)


# --------------------------------------------------------------------------- the hand-off, with a stand-in

class FakeBackend:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


class GatedDetector:
    """Returns fixed detections, each call waiting for `gate`: the test decides when it is busy."""

    def __init__(self, out: Detections) -> None:
        self.out = out
        self.gate = threading.Semaphore(0)
        self.calls = 0
        self.backend = FakeBackend()

    def detect(self, image: np.ndarray) -> Tuple[Detections, Any]:
        self.gate.acquire()
        self.calls += 1
        if image is None:
            raise RuntimeError("candidate exploded")
        return self.out, None


class FakeResult:
    def __init__(self, image: Optional[np.ndarray], detections: Detections) -> None:
        self.frame = type("F", (), {"image": image})()
        self.detections = detections
        self.t_infer_start, self.t_infer_done = 1.0, 1.004


def write_request(deploy: Path, **req: Any) -> Path:
    """request.json as the device op writes it (atomically)."""
    folder = deploy / "service" / "shadow"
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"request.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(req))
    os.replace(tmp, folder / "request.json")
    return folder / "request.json"


def result_of(deploy: Path, sid: str, timeout: float = 60.0) -> Dict[str, Any]:
    path = deploy / "service" / "shadow" / f"{sid}.json"
    return wait_for(lambda: path.is_file() and json.loads(path.read_text()), timeout, f"shadow result {sid}")


def test_a_busy_candidate_skips_frames_and_never_blocks_the_loop(tmp_path: Path) -> None:
    d = dets((0, 0, 10, 10, 0.9, 0))
    detector = GatedDetector(d)
    (tmp_path / "releases" / "cand").mkdir(parents=True)
    (tmp_path / "releases" / "cand" / "manifest.json").write_text("{}")  # the loader below does not read it
    loaded: List[Tuple[Path, Optional[str], Optional[Path], int]] = []
    may_load = threading.Event()

    def loader(release: Path, variant: Optional[str], engines: Optional[Path], threads: int) -> Any:
        loaded.append((release, variant, engines, threads))
        may_load.wait(10)
        return detector

    handler = ShadowHandler(tmp_path, "cur", ("scratch",), "v1", loader=loader, poll_s=0.0)
    write_request(tmp_path, id="gate", candidate="cand", every_k=2, frames=3, seconds=None, engines=None, threads=3)
    image = np.zeros((4, 4, 3), np.uint8)
    handler(FakeResult(image, d))  # notices the request; frames handled while the candidate loads do not count
    run = handler.run
    assert run is not None and run.state == "loading" and handler.status()["status"] == "loading"
    handler(FakeResult(image, d))
    may_load.set()
    assert wait_for(lambda: run.state == "running", 10, "the candidate loaded")
    assert loaded == [(tmp_path / "releases" / "cand", "v1", tmp_path / "engines", 3)]
    for _ in range(8):  # 4 offered (every 2nd); the first is taken, the candidate is stuck on it: 3 skipped
        handler(FakeResult(image, d))
    assert (run.frames_offered, run.frames_skipped_busy) == (4, 3)
    status = handler.status()
    assert status is not None and status.pop("elapsed_s") >= 0
    assert status == {"id": "gate", "candidate": "cand", "status": "running", "frames_compared": 0, "target": 3,
                      "seconds": None, "errors": 0}
    detector.gate.release()
    wait_for(lambda: run.comparison.frames == 1 and not run._busy, 10, "the first comparison")
    handler(FakeResult(image, d))  # the 9th handled frame: not offered
    handler(FakeResult(None, d))  # the 10th: offered, and the stand-in raises on it
    detector.gate.release()
    wait_for(lambda: run.errors == 1 and not run._busy, 10, "the failing frame")
    for _ in range(2):
        handler(FakeResult(image, d))
    detector.gate.release()
    doc = result_of(tmp_path, "gate")
    assert doc["status"] == "done" and doc["error"] == "" and doc["frames_compared"] == 2 and doc["errors"] == 1
    assert doc["error_samples"] == ["frame: RuntimeError: candidate exploded"]
    assert (doc["frames_offered"], doc["frames_skipped_busy"], doc["every_k"]) == (6, 3, 2)
    assert doc["agreement"]["f1"] == 1.0 and doc["current"] == "cur" and doc["latency_ms"]["current"]["p50"] == 4.0
    assert detector.backend.closed and not (tmp_path / "service" / "shadow" / "request.json").exists()
    handler(FakeResult(image, d))
    assert handler.status() is None and handler.metrics() == {"frames_compared_total": 2, "errors_total": 1,
                                                              "active": 0}


# --------------------------------------------------------------------------- the real service

@pytest.fixture(scope="module")
def candidates(deploy: Path, tiny_model: Dict[str, Path]) -> Path:
    """The deploy folder (`current` = r1, conf 0.001, max_det 20) with candidate releases beside it:
    `same` (the same model and settings), `looser` (conf 0.00005: the barely trained model's one box
    per frame at 0.001 becomes several, a superset) and `broken` (a model file that is not ONNX)."""
    sample = Path(sorted(glob.glob(str(tiny_model["dataset"] / "images" / "val" / "*")))[0])
    for name, conf in (("same", 0.001), ("looser", 0.00005), ("broken", 0.001)):
        assemble_release(deploy / "releases" / name, [VariantFiles("big", 64, tiny_model["onnx"])], sample,
                         postprocess=PostprocessSettings(conf, 0.45, 20))
    (deploy / "releases" / "broken" / "model-big.onnx").write_bytes(b"this is not an ONNX model")
    return deploy


def start_in_process(candidates: Path, tmp_path: Path, write_config: bool = False
                     ) -> Tuple[Service, int, threading.Thread]:
    """The service on `current`, in-process on a synthetic camera, serving HTTP on a free port;
    `write_config` also writes service.json where the device op looks for it."""
    port = free_port()
    doc = service_doc(tmp_path, port, frames_every_s=0.0, frames_band=[0.0, 0.0001])
    if write_config:
        (candidates / "service" / "service.json").write_text(json.dumps(doc))
    svc = Service(candidates / "current", config_from_json(doc), tmp_path / "out",
                  source=SyntheticSource(160, 120, fps=30.0), adaptive=False)
    svc.start_http()
    runner = threading.Thread(target=svc.run, daemon=True)
    runner.start()
    return svc, port, runner


@pytest.fixture
def service(candidates: Path, tmp_path: Path) -> Iterator[Tuple[Service, int]]:
    """The service on `current`, in-process, on a synthetic camera; service.json written for the device op."""
    (candidates / "service").mkdir(exist_ok=True)
    svc, port, runner = start_in_process(candidates, tmp_path, write_config=True)
    try:
        wait_for(lambda: (healthz(port) or {}).get("ok"), 30, "a healthy service")
        yield svc, port
    finally:
        svc.stop()
        runner.join(timeout=20)
    assert not runner.is_alive()


def consistent(doc: Dict[str, Any]) -> None:
    """Every offered frame was compared, skipped while the candidate was busy, or failed; at most one
    was still in the hand-off when the shadow ended."""
    handled = doc["frames_compared"] + doc["frames_skipped_busy"] + doc["errors"]
    assert 0 <= doc["frames_offered"] - handled <= 1, doc


def test_the_same_release_agrees_fully(service: Tuple[Service, int], candidates: Path) -> None:
    svc, port = service
    write_request(candidates, id="same-1", candidate="same", every_k=2, frames=12, seconds=None, engines=None,
                  threads=2)  # r1's ORT threads: bit-identical outputs
    running = wait_for(lambda: (healthz(port) or {}).get("shadow"), 30, "the shadow in /healthz")
    assert running["id"] == "same-1" and running["candidate"] == "same" and running["target"] == 12
    doc = result_of(candidates, "same-1")
    assert doc["status"] == "done" and doc["error"] == "" and doc["frames_compared"] == 12, doc
    assert doc["current"] == "r1" and doc["candidate"] == "same" and doc["every_k"] == 2 and doc["errors"] == 0
    a, counts = doc["agreement"], doc["counts"]
    assert a["f1"] == 1.0 and a["fp"] == a["fn"] == 0 and a["tp"] > 0 and a["iou"] == 0.5  # conf 0.001: boxes
    assert counts["current_total"] == counts["candidate_total"] == a["tp"]
    assert counts["mean_delta_per_frame"] == 0.0 and counts["mean_abs_delta_per_frame"] == 0.0
    assert all(c["delta"] == 0 for c in counts["per_class"].values())
    assert set(a["per_class"]) >= set(svc.manifest.class_names)
    for model in ("current", "candidate"):
        lat = doc["latency_ms"][model]
        assert lat["n"] == 12 and 0 < lat["p50"] <= lat["p95"]
    consistent(doc)
    assert doc["started_at"] > 0 and doc["duration_s"] > 0 and doc["load_s"] is not None
    assert not (candidates / "service" / "shadow" / "request.json").exists()
    health = wait_for(lambda: (lambda h: h if h and h["shadow"] is None else None)(healthz(port)), 10, "idle")
    assert health["ok"]
    m = parse_metrics(svc.metrics_text())
    assert m["edge_shadow_frames_compared_total"] == 12 and m["edge_shadow_active"] == 0
    assert m["edge_shadow_errors_total"] == 0


def test_a_candidate_with_other_settings_disagrees(service: Tuple[Service, int], candidates: Path) -> None:
    write_request(candidates, id="looser-1", candidate="looser", every_k=1, frames=10, seconds=60, engines=None,
                  threads=2)
    doc = result_of(candidates, "looser-1")
    assert doc["status"] == "done" and doc["frames_compared"] == 10, doc
    a, counts = doc["agreement"], doc["counts"]
    assert a["f1"] < 1.0 and a["fp"] > 0 and a["precision"] < 1.0 and a["tp"] > 0
    assert counts["candidate_total"] > counts["current_total"] > 0
    assert counts["mean_delta_per_frame"] > 0 and counts["mean_abs_delta_per_frame"] > 0
    assert sum(c["delta"] for c in counts["per_class"].values()) == counts["candidate_total"] - counts["current_total"]
    consistent(doc)


def test_a_broken_candidate_fails_and_the_service_keeps_serving(service: Tuple[Service, int],
                                                                candidates: Path) -> None:
    svc, port = service
    handled = svc.loop.stats.handled
    write_request(candidates, id="broken-1", candidate="broken", every_k=1, frames=10, seconds=None, engines=None,
                  threads=1)
    doc = result_of(candidates, "broken-1")
    assert doc["status"] == "failed" and "did not load" in doc["error"] and doc["errors"] == 1, doc
    assert doc["frames_compared"] == 0 and len(doc["error_samples"]) == 1 and doc["error_samples"][0].startswith("load")
    health = wait_for(lambda: (lambda h: h if h and h["frames_handled"] > handled + 30 else None)(healthz(port)),
                      30, "frames handled after the failure")
    assert health["ok"] and health["status"] == "ok" and health["shadow"] is None and health["problems"] == []
    assert svc.loop.stats.handler_errors == 0
    assert parse_metrics(svc.metrics_text())["edge_shadow_errors_total"] == 1


def test_requests_that_cannot_run_get_a_failed_result(service: Tuple[Service, int], candidates: Path) -> None:
    write_request(candidates, id="nope-1", candidate="nope", every_k=1, frames=5, seconds=None, engines=None,
                  threads=1)
    doc = result_of(candidates, "nope-1")
    assert doc["status"] == "failed" and "candidate nope is not a release on this device" in doc["error"]
    assert doc["frames_compared"] == 0 and doc["agreement"]["f1"] is None
    write_request(candidates, id="bad-1", candidate="same", every_k=0, frames=5, seconds=None, engines=None,
                  threads=1)
    assert "'every_k' is 0" in result_of(candidates, "bad-1")["error"]
    (candidates / "service" / "shadow" / "request.json").write_text("{not json")
    doc = result_of(candidates, "rejected")
    assert doc["status"] == "failed" and doc["id"] is None and "not readable JSON" in doc["error"]
    wait_for(lambda: not (candidates / "service" / "shadow" / "request.json").exists(), 10, "the request removed")
    assert (healthz(service[1]) or {}).get("ok")


def test_a_new_request_stops_the_running_one(service: Tuple[Service, int], candidates: Path) -> None:
    _, port = service
    write_request(candidates, id="long-1", candidate="same", every_k=1, frames=None, seconds=600, engines=None,
                  threads=1)
    wait_for(lambda: ((healthz(port) or {}).get("shadow") or {}).get("frames_compared", 0) > 2, 30, "long-1 running")
    write_request(candidates, id="short-1", candidate="same", every_k=1, frames=5, seconds=None, engines=None,
                  threads=1)
    old = result_of(candidates, "long-1")
    assert old["status"] == "stopped" and "replaced by request short-1" in old["error"] and old["frames_compared"] > 2
    consistent(old)
    new = result_of(candidates, "short-1")
    assert new["status"] == "done" and new["frames_compared"] == 5


def test_stopping_the_service_keeps_the_partial_shadow(candidates: Path, tmp_path: Path) -> None:
    svc, port, runner = start_in_process(candidates, tmp_path)
    try:
        write_request(candidates, id="partial-1", candidate="same", every_k=1, frames=None, seconds=600,
                      engines=None, threads=2)
        wait_for(lambda: ((healthz(port) or {}).get("shadow") or {}).get("frames_compared", 0) > 2, 30, "running")
    finally:
        svc.stop()
        runner.join(timeout=20)
    result = json.loads((candidates / "service" / "shadow" / "partial-1.json").read_text())  # written before exit
    assert result["status"] == "stopped" and result["error"] == "the service stopped"
    assert result["frames_compared"] > 2 and result["agreement"]["f1"] == 1.0
    consistent(result)


def test_the_device_op_withdraws_a_shadow_that_outlasts_its_timeout(service: Tuple[Service, int],
                                                                    candidates: Path) -> None:
    req = {"id": "slow-1", "candidate": "same", "every_k": 1, "frames": None, "seconds": 600.0, "engines": None,
           "threads": 1}
    answer = deploy_ops.shadow_run({"deploy_dir": str(candidates), "request": req, "timeout": 3})
    assert answer["ok"] is False and answer["crashed"] is False and answer["result"] is None
    assert "no shadow result within 3 s" in answer["reason"] and "withdrawn" in answer["reason"]
    doc = result_of(candidates, "slow-1")  # the service noticed the request was gone
    assert doc["status"] == "stopped" and "withdrawn" in doc["error"]


def test_the_device_op_needs_a_running_service(tmp_path: Path) -> None:
    answer = deploy_ops.shadow_run({"deploy_dir": str(tmp_path), "request": {"id": "x", "candidate": "c"},
                                    "timeout": 5})
    assert answer["ok"] is False and not answer["crashed"] and "enable service in inventory.yaml" in answer["reason"]
    (tmp_path / "service").mkdir()
    (tmp_path / "service" / "service.json").write_text(json.dumps({"http_port": free_port()}))
    answer = deploy_ops.shadow_run({"deploy_dir": str(tmp_path), "request": {"id": "x", "candidate": "c"},
                                    "timeout": 5})
    assert answer["ok"] is False and "shadow needs the service running" in answer["reason"]
    assert "id" in deploy_ops.shadow_run({"deploy_dir": str(tmp_path), "request": {"id": "../x"}})["reason"]
    assert not (tmp_path / "service" / "shadow").exists()


def test_the_candidate_gets_the_requested_threads(candidates: Path) -> None:
    detector = load_candidate(candidates / "releases" / "same", None, None, 1)
    try:
        assert detector.backend.settings.threads == 1 and detector.name == "big"
    finally:
        detector.backend.close()


@pytest.mark.slow
def test_shadow_run_against_serve_and_a_service_killed_mid_shadow(runtime: Path, candidates: Path,
                                                                  tmp_path: Path) -> None:
    """The fleet's path: `python -c <deploy_ops> shadow_run` against `python -m edge_runtime serve`;
    then a shadow during which the service is SIGKILLed (as a candidate that crashes it would)."""
    port = free_port()
    proc = start_serve(runtime, candidates, service_doc(tmp_path, port, frames_every_s=0.0,
                                                        frames_band=[0.0, 0.0001]))
    try:
        wait_for(lambda: proc.poll() is None and (healthz(port) or {}).get("ok"), 60, "a healthy serve")
        req = {"id": "e2e-1", "candidate": "same", "every_k": 1, "frames": 10, "seconds": None, "engines": None,
               "threads": 2}
        run = subprocess.run([sys.executable, "-c", SOURCE, "shadow_run",
                              json.dumps({"deploy_dir": str(candidates), "request": req, "timeout": 60})],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        answer = json.loads(run.stdout)
        assert answer["ok"] is True and answer["seconds"] > 0, answer
        doc = answer["result"]
        assert doc["id"] == "e2e-1" and doc["status"] == "done" and doc["frames_compared"] == 10
        assert doc["agreement"]["f1"] == 1.0 and doc["counts"]["mean_abs_delta_per_frame"] == 0.0
        consistent(doc)

        out: Dict[str, Any] = {}
        req = dict(req, id="e2e-kill", frames=None, seconds=600.0, threads=1)
        waiter = threading.Thread(target=lambda: out.update(deploy_ops.shadow_run(
            {"deploy_dir": str(candidates), "request": req, "timeout": 120})))
        waiter.start()
        wait_for(lambda: ((healthz(port) or {}).get("shadow") or {}).get("frames_compared", 0) > 0, 60,
                 "the second shadow running")
        proc.kill()
        proc.wait(timeout=15)
        waiter.join(timeout=60)
        assert not waiter.is_alive()
        assert out["ok"] is False and out["crashed"] is True and out["result"] is None, out
        assert "stopped answering /healthz during the shadow" in out["reason"]
        assert not (candidates / "service" / "shadow" / "request.json").exists()  # no restart runs it again
        assert not (candidates / "service" / "shadow" / "e2e-kill.json").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_request_left_by_a_dead_service_is_not_run_again(candidates: Path) -> None:
    path = write_request(candidates, id="stale-1", candidate="same", every_k=1, frames=5, seconds=None,
                         engines=None, threads=1)
    old = time.time() - 30
    os.utime(path, (old, old))
    handler = ShadowHandler(candidates, "r1", ("scratch",), None)
    handler(FakeResult(np.zeros((4, 4, 3), np.uint8), Detections.empty()))
    # Withdrawn without a result: the device op, if it still waits, sees the new pid and reports the crash.
    assert not path.exists() and handler.run is None and handler.status() is None
    assert not (candidates / "service" / "shadow" / "stale-1.json").exists()
