"""`serve`, the detector as a service: real processes, real sockets, a real (tiny) model.

The service runs the way a device runs it: `python -m edge_runtime serve` in a subprocess whose
working directory holds only a copy of `runtime/edge_runtime/`, with a clean environment. The
camera is the one thing this machine has not got: the synthetic source stands in for it, and
the stalled-camera test uses a frame source that stops delivering (a stand-in for an unplugged
camera), run in-process so the test controls the moment it stops.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import threading
import time
import tracemalloc
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import cv2
import numpy as np
import pytest
from support import free_port, healthz, parse_metrics, service_doc, start_serve, wait_for  # noqa: E402

from edge_runtime.manifest import load_manifest
from edge_runtime.realtime import FrameSource, RealtimeLoop, SyntheticSource
from edge_runtime.service import Service, open_detectors
from edge_runtime.service_config import ServiceConfigError, config_from_json, config_to_json, load_service_config

pytest_plugins = ["browser", "mqtt_broker"]


def get(url: str, timeout: float = 5.0) -> Tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def healthy(port: int) -> Optional[Dict[str, Any]]:
    doc = healthz(port)
    return doc if doc is not None and doc["ok"] else None


@pytest.mark.slow
def test_serve_health_metrics_frames_and_clean_sigterm(runtime: Path, deploy: Path, tmp_path: Path) -> None:
    port = free_port()
    proc = start_serve(runtime, deploy, service_doc(tmp_path, port), "--summary", str(tmp_path / "summary.json"))
    try:
        # fps needs two handled frames in its 5 s window: wait for it rather than for the first 200
        doc = wait_for(lambda: proc.poll() is None and (d := healthy(port)) is not None and d["fps"] and d, 60,
                       "a healthy /healthz with an FPS")
        release = load_manifest(deploy / "current").release
        assert doc["release"] == release and doc["variant"] == "big" and doc["pid"] == proc.pid
        assert doc["fps"] > 5 and doc["last_frame_age_s"] < 2 and doc["problems"] == []
        time.sleep(4.5)  # long enough for periodic frames (every 0.5 s) to exceed the 6-file cap
        code, text = get(f"http://127.0.0.1:{port}/metrics")
        assert code == 200
        m = parse_metrics(text.decode())
        assert m["edge_healthy"] == 1 and m["edge_fps"] > 5 and m["edge_frames_handled_total"] > 30
        for sl in ("capture", "infer", "handle"):
            count = m[f'edge_slice_latency_seconds_count{{slice="{sl}"}}']
            assert m[f'edge_slice_latency_seconds_bucket{{le="+Inf",slice="{sl}"}}'] == count > 0
        info = f'backend="onnxruntime",device="dev1",precision="fp32",release="{release}",variant="big"'
        assert f"edge_info{{{info}}}" in m
        assert sum(v for k, v in m.items() if k.startswith("edge_detections_total{")) > 0  # conf 0.001: boxes
        assert "edge_jsonl_lines_total" in m and "edge_frames_kept_total" in m
        code, jpeg = get(f"http://127.0.0.1:{port}/frame.jpg")
        image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
        assert code == 200 and image.shape == (240, 320, 3)
        assert get(f"http://127.0.0.1:{port}/nope")[0] == 404
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() - t0 < 10
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = proc.stderr.read() if proc.stderr else ""
    assert "Traceback" not in stderr and "serve stopped after" in stderr, stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["frames_handled"] > 30 and summary["counters"]["jsonl_lines_total"] == summary["frames_handled"]
    frames = sorted((tmp_path / "frames").glob("*.jpg"))
    assert 1 <= len(frames) <= 6 and summary["counters"]["frames_deleted_total"] >= 1
    assert all(f.with_suffix(".json").is_file() for f in frames)
    lines = (deploy / "service" / "detections.jsonl").read_text().splitlines()
    assert lines and all(json.loads(ln)["variant"] == "big" for ln in lines)
    with pytest.raises(ConnectionRefusedError):  # nothing listens any more: the server was shut down
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_serve_refuses_bad_config_in_one_line(runtime: Path, deploy: Path, tmp_path: Path) -> None:
    proc = start_serve(runtime, deploy, service_doc(tmp_path, free_port(), stall_s="5"))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "'stall_s'" in err and "service.json" in err


def test_serve_names_a_busy_port(runtime: Path, deploy: Path, tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = start_serve(runtime, deploy, service_doc(tmp_path, port))
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and f"127.0.0.1:{port}" in err and "http_port" in err, err


def test_service_config_is_checked_field_by_field(tmp_path: Path) -> None:
    good = service_doc(tmp_path, 8080)
    assert config_to_json(config_from_json(good)) == good
    for bad, needle in ((dict(good, http_port=0), "'http_port'"), (dict(good, frames_band=[0.6, 0.5]), "lo < hi"),
                        (dict(good, fps=float("inf")), "'fps'"), (dict(good, extra=1), "unknown field(s) extra"),
                        ({k: v for k, v in good.items() if k != "source"}, "missing field(s) source"),
                        (dict(good, device=" d"), "'device'"), (dict(good, jsonl_backups=True), "'jsonl_backups'")):
        with pytest.raises(ServiceConfigError, match=re.escape(needle)):
            config_from_json(bad)
    (tmp_path / "s.json").write_text("{nope")
    with pytest.raises(ServiceConfigError, match="not valid JSON"):
        load_service_config(tmp_path / "s.json")


class StallingCamera(FrameSource):
    """Stands in for a camera that stops delivering (no camera on this machine): `stall()` makes
    `read()` block, as a V4L2 read does when the sensor stops, until the loop shuts down."""

    def __init__(self) -> None:
        self.inner = SyntheticSource(160, 120, fps=30.0)
        self.stalled = threading.Event()
        self.released = threading.Event()
        self.description = "stalling-camera"

    def wait_next(self) -> None:
        self.inner.wait_next()

    def read(self) -> Optional[np.ndarray]:
        if self.stalled.is_set():
            self.released.wait()
            return None
        return self.inner.read()

    def interrupt(self) -> None:
        self.released.set()


def test_stalled_camera_turns_healthz_503_and_back(deploy: Path, tmp_path: Path) -> None:
    from edge_runtime.service_config import config_from_json

    port = free_port()
    cam = StallingCamera()
    svc = Service(deploy / "current", config_from_json(service_doc(tmp_path, port, stall_s=1.0, frames_every_s=0.0,
                                                                   frames_band=[0.0, 0.0001])),
                  tmp_path / "out", source=cam)
    svc.start_http()
    runner = threading.Thread(target=svc.run, daemon=True)
    runner.start()
    try:
        wait_for(lambda: healthy(port), 30, "healthy before the stall")
        cam.stalled.set()
        code, body = wait_for(lambda: (lambda r: r if r[0] == 503 else None)(get(f"http://127.0.0.1:{port}/healthz")),
                              10, "503 after the camera stalled")
        doc = json.loads(body)
        assert doc["status"] == "stalled" and not doc["ok"] and "camera stalled" in doc["problems"][0]
        assert doc["last_frame_age_s"] >= 1.0
        m = parse_metrics(get(f"http://127.0.0.1:{port}/metrics")[1].decode())
        assert m["edge_healthy"] == 0
    finally:
        svc.stop()
        runner.join(timeout=15)
    assert not runner.is_alive()


@pytest.mark.server
def test_results_are_published_over_mqtt(deploy: Path, tmp_path: Path, broker: Any) -> None:
    """service.json's MQTT settings reach a real broker: one QoS-1 message per result on the device's topic."""
    from mqtt_broker import Subscriber

    sub = Subscriber(broker.port, "edge-defect/dev1/detections")
    cfg = config_from_json(service_doc(tmp_path, free_port(), mqtt_host="127.0.0.1", mqtt_port=broker.port))
    svc = Service(deploy / "current", cfg, tmp_path / "out", source=SyntheticSource(160, 120, fps=30.0, max_frames=20))
    try:
        summary = svc.run()
        wait_for(lambda: len(sub.messages) >= 20, 60, "20 MQTT messages")  # 15 s timed out on a loaded 2-core machine
    finally:
        sub.close()
    release = load_manifest(deploy / "current").release
    assert [m["frame"] for m in sub.messages] == list(range(20))
    assert all(m["release"] == release and isinstance(m["detections"], list) for m in sub.messages)
    assert summary["counters"]["mqtt_published_total"] == 20 and summary["counters"]["mqtt_dropped_total"] == 0


def test_loop_memory_does_not_grow_with_frames(deploy: Path) -> None:
    """The per-frame statistics are bounded: allocations after 300 frames and after 3300 are the same
    (a list of per-frame records, as `run` kept before, grows by ~1 KB a frame)."""
    manifest = load_manifest(deploy / "current")
    detectors, _, start = open_detectors(deploy / "current", manifest, None, None, adaptive=False)
    window = 256
    sizes = []

    class Probe:
        def __call__(self, r: Any) -> None:
            if r.frame.index in (300, 3300):
                sizes.append(tracemalloc.get_traced_memory()[0])

    tracemalloc.start()
    try:
        loop = RealtimeLoop(detectors, SyntheticSource(64, 64, fps=None, max_frames=3400), [Probe()], None,
                            start.name, slot_factory=__import__("edge_runtime.realtime", fromlist=["x"]).UnboundedQueue,
                            window=window, class_names=manifest.class_names)
        summary = loop.run()
    finally:
        tracemalloc.stop()
        for d in detectors.values():
            d.backend.close()
    assert summary["frames_handled"] == 3400 and summary["percentile_window_frames"] == window
    assert len(sizes) == 2 and sizes[1] - sizes[0] < 64 * 1024, sizes


@pytest.mark.slow
@pytest.mark.server
def test_live_view_in_chromium(browser: Any, runtime: Path, deploy: Path, tmp_path: Path) -> None:
    from browser import UI_TIMEOUT_S, artifacts_dir
    from selenium.webdriver.support.ui import WebDriverWait

    port = free_port()
    proc = start_serve(runtime, deploy, service_doc(tmp_path, port))
    shot = artifacts_dir() / "service-live-view.png"
    try:
        wait_for(lambda: proc.poll() is None and healthy(port), 60, "a healthy service")
        browser.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(browser, UI_TIMEOUT_S)
        release = load_manifest(deploy / "current").release
        wait.until(lambda d: f"release {release}" in d.find_element("id", "status").text)
        wait.until(lambda d: d.execute_script(
            "const i = document.getElementById('frame'); return i.complete && i.naturalWidth;") == 320)
        first = browser.execute_script("return document.getElementById('frame').src")
        wait.until(lambda d: d.execute_script("return document.getElementById('frame').src") != first)  # refreshes
        status = browser.find_element("id", "status")
        assert status.get_attribute("class") == "ok" and "FPS" in status.text and "variant big" in status.text
        assert browser.execute_script("return document.getElementById('dets').rows.length") > 0
        browser.save_screenshot(str(shot))
    except Exception:
        browser.save_screenshot(str(shot))
        raise
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
