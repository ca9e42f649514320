"""The device service against the bare real-time loop, and its memory over a long soak -- in one run.

    python benchmarks/serve.py [--release DIR] [--seconds 15] [--rounds 3] [--camera-fps F] [--soak-minutes 30]
                               [--out FILE]

1. Throughput: the bare `RealtimeLoop` (no handlers, no HTTP) against the full `Service` on the
   same release and the same synthetic 640x480 camera, paced at 1.5x the inference-only rate
   (so both are inference-bound; `--camera-fps 30` measures at a line camera's rate instead):
   rotated JSONL, MQTT to a real mosquitto on loopback (when installed), the frame sample on
   disk (one frame a second plus the uncertainty band), HTTP on, with a scraper hitting
   `/metrics` every second and a "browser" polling `/live.json` + `/frame.jpg` twice a second.
   Rounds alternate bare/service, and the ratio is of the medians. Target: service FPS >= 95 %
   of the bare loop.
2. Soak: `python -m edge_runtime serve` as its own process, paced at 30 FPS, with the same
   publishers and scrapers, for `--soak-minutes`. RSS is read from /proc every 10 s. Target: RSS
   at the end within 2 MB of RSS at minute 1.

Release: --release, else build/fleet-local/current (what `make run` deploys), else one assembled
from models/yolov8n.int8.onnx. The numbers depend on the CPU: say which one you ran on
(`grep -o 'avx512_vnni\\|avx2' /proc/cpuinfo | sort -u`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Dict, List, Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the test suite's mosquitto launcher

from mqtt_broker import Broker, mosquitto_binary  # noqa: E402
from support import free_port  # noqa: E402

from edge_runtime.manifest import load_manifest  # noqa: E402
from edge_runtime.realtime import RealtimeLoop, SyntheticSource  # noqa: E402
from edge_runtime.release import VariantFiles, assemble_release  # noqa: E402
from edge_runtime.service import Service, open_detectors  # noqa: E402
from edge_runtime.service_config import config_from_json  # noqa: E402

FRAME_W, FRAME_H = 640, 480


def find_release(arg: Optional[str], work: Path) -> Path:
    """--release, the local deploy's current release, or one assembled from the INT8 model."""
    if arg:
        return Path(arg).resolve()
    current = REPO / "build" / "fleet-local" / "current"
    if current.exists():
        return current.resolve()
    model = REPO / "models" / "yolov8n.int8.onnx"
    if not model.is_file():
        raise SystemExit("no release: pass --release DIR, or run `make run` (or `dvc repro quantize`) first")
    imgsz = int(load_onnx_imgsz(model))
    assemble_release(work / "release", [VariantFiles(str(imgsz), imgsz, model)], None, precision="int8")
    return work / "release"


def load_onnx_imgsz(model: Path) -> int:
    """The model's square input size from its ONNX input shape."""
    import onnxruntime as ort

    shape = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).get_inputs()[0].shape
    return int(shape[-1])


def start_broker(work: Path) -> Optional[Broker]:
    """A real mosquitto on loopback for the run (tests/mqtt_broker.py), or None when not installed."""
    binary = mosquitto_binary()
    if binary is None:
        print("mosquitto not installed (scripts/bootstrap.sh --with-mqtt): MQTT publishing is off", flush=True)
        return None
    (work / "broker").mkdir()
    broker = Broker(binary, work / "broker", free_port())
    broker.start()
    return broker


def service_doc(work: Path, port: int, broker: Optional[Broker], fps: Optional[float]) -> Dict[str, Any]:
    """service.json for the benchmark: every publisher on."""
    return {"device": "bench", "source": f"synthetic:{FRAME_W}x{FRAME_H}", "fps": fps, "http_bind": "127.0.0.1",
            "http_port": port, "stall_s": 10.0, "jsonl_max_mb": 5.0, "jsonl_backups": 2,
            "mqtt_host": "127.0.0.1" if broker else "", "mqtt_port": broker.port if broker else 1883,
            "mqtt_topic": "", "mqtt_queue": 1000, "frames_dir": str(work / "frames"),
            "frames_every_s": 1.0, "frames_band": [0.25, 0.5], "frames_max_files": 200, "frames_max_mb": 50.0,
            "actuator": "", "variant": None}


class Scrapers:
    """A Prometheus-like scraper (1 s) and a live-view poller (0.5 s) against one service port."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.stop_event = threading.Event()
        self.requests = 0
        self.errors = 0
        self.threads = [threading.Thread(target=self._poll, args=(paths, period), daemon=True)
                        for paths, period in ((["/metrics"], 1.0), (["/live.json", "/frame.jpg"], 0.5))]

    def _poll(self, paths: List[str], period: float) -> None:
        while not self.stop_event.wait(period):
            for p in paths:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{p}", timeout=5) as r:
                        r.read()
                    self.requests += 1
                except OSError:
                    self.errors += 1

    def __enter__(self) -> "Scrapers":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(timeout=10)


def inference_fps(release: Path, seconds: float = 3.0) -> float:
    """`Detector.detect` alone in a loop on one synthetic frame: what the model can do here."""
    manifest = load_manifest(release)
    detectors, _, start = open_detectors(release, manifest, None, None, adaptive=False)
    try:
        frame = SyntheticSource(FRAME_W, FRAME_H, fps=None).read()
        detector = detectors[start.name]
        for _ in range(5):
            detector.detect(frame)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            detector.detect(frame)
            n += 1
        return n / (time.perf_counter() - t0)
    finally:
        for d in detectors.values():
            d.backend.close()


def bare_fps(release: Path, seconds: float, camera_fps: float) -> float:
    """The real-time loop alone, no handlers, on a synthetic camera paced at `camera_fps`."""
    manifest = load_manifest(release)
    detectors, _, start = open_detectors(release, manifest, None, None, adaptive=False)
    try:
        loop = RealtimeLoop(detectors, SyntheticSource(FRAME_W, FRAME_H, fps=camera_fps), [], None, start.name,
                            max_seconds=seconds, class_names=manifest.class_names)
        return float(loop.run()["fps"])
    finally:
        for d in detectors.values():
            d.backend.close()


def service_fps(release: Path, seconds: float, camera_fps: float, work: Path,
                broker: Optional[Broker]) -> Dict[str, Any]:
    """The full service (publishers, HTTP, scrapers) on the same camera."""
    port = free_port()
    cfg = config_from_json(service_doc(work, port, broker, camera_fps))
    svc = Service(release, cfg, work / "out", source=SyntheticSource(FRAME_W, FRAME_H, fps=camera_fps),
                  max_seconds=seconds, adaptive=False)
    svc.start_http()
    with Scrapers(port) as scrapers:
        summary = svc.run()
    return {"fps": float(summary["fps"]), "http_requests": scrapers.requests, "http_errors": scrapers.errors,
            "counters": summary["counters"]}


def rss_kb(pid: int) -> Optional[int]:
    """VmRSS of a process in KiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def soak(release: Path, minutes: float, work: Path, broker: Optional[Broker]) -> Dict[str, Any]:
    """`serve` as a process at 30 FPS for `minutes`; RSS every 10 s."""
    deploy = work / "deploy"
    (deploy / "service").mkdir(parents=True)
    port = free_port()
    (deploy / "service" / "service.json").write_text(json.dumps(service_doc(work, port, broker, 30.0)))
    runtime = REPO / "runtime"
    summary_path = work / "soak-summary.json"
    log = (work / "serve.log").open("w")  # a file, not a pipe: 30 minutes of warnings must not block it
    proc = subprocess.Popen([sys.executable, "-m", "edge_runtime", "serve", "--deploy-dir", str(deploy), "--release",
                             str(release), "--no-adaptive", "--seconds", str(minutes * 60), "--summary",
                             str(summary_path)], cwd=runtime, stderr=log)
    samples: List[Dict[str, float]] = []
    t0 = time.monotonic()
    with Scrapers(port):
        while proc.poll() is None:
            kb = rss_kb(proc.pid)
            if kb is not None:
                samples.append({"t_s": round(time.monotonic() - t0, 1), "rss_mb": round(kb / 1024.0, 2)})
                if len(samples) % 30 == 0:
                    print(f"  soak {samples[-1]['t_s'] / 60:.1f} min: RSS {samples[-1]['rss_mb']} MB", flush=True)
            time.sleep(10.0)
    log.close()
    err = (work / "serve.log").read_text()
    if proc.returncode != 0:
        raise SystemExit(f"serve exited {proc.returncode}: {err[-2000:]}")
    summary = json.loads(summary_path.read_text())
    at_1 = next((s for s in samples if s["t_s"] >= 60.0), samples[0])
    end = samples[-1]
    return {"minutes": minutes, "rss_mb_at_1_min": at_1["rss_mb"], "rss_mb_at_end": end["rss_mb"],
            "rss_delta_mb": round(end["rss_mb"] - at_1["rss_mb"], 2),
            "rss_max_mb_after_1_min": max(s["rss_mb"] for s in samples if s["t_s"] >= at_1["t_s"]),
            "fps": summary["fps"], "frames_handled": summary["frames_handled"],
            "frames_dropped": summary["frames_dropped"], "counters": summary["counters"], "samples": samples}


def main(argv: Optional[List[str]] = None) -> int:
    """Run both measurements and print (and optionally write) the result."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--release", help="release folder (default build/fleet-local/current)")
    ap.add_argument("--seconds", type=float, default=15.0, help="length of each throughput round")
    ap.add_argument("--rounds", type=int, default=3, help="bare/service rounds (alternating; 0 = soak only)")
    ap.add_argument("--camera-fps", type=float, help="pace the camera at this rate (default 1.5x inference-only: "
                                                      "inference-bound; 30 = a line camera)")
    ap.add_argument("--soak-minutes", type=float, default=30.0, help="soak length (0 = skip)")
    ap.add_argument("--out", type=Path, help="also write the result JSON here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        work = Path(tmp)
        release = find_release(args.release, work)
        broker = start_broker(work)
        try:
            result: Dict[str, Any] = {"release": load_manifest(release).release, "cpu_flags": cpu_flags(),
                                      "cores": os.cpu_count(), "mqtt": broker is not None}
            bare, served = [], []
            camera_fps = 0.0
            if args.rounds > 0:
                # A camera that outruns the model (1.5x, as benchmarks/realtime.py): inference-bound,
                # without a capture thread that spins as fast as memcpy allows.
                result["inference_only_fps"] = round(inference_fps(release), 2)
                camera_fps = args.camera_fps or round(1.5 * result["inference_only_fps"], 1)
                result["camera_fps"] = camera_fps
                print(f"inference only: {result['inference_only_fps']} FPS; camera paced at {camera_fps}", flush=True)
            for i in range(args.rounds):
                bare.append(bare_fps(release, args.seconds, camera_fps))
                served.append(service_fps(release, args.seconds, camera_fps, work / f"round{i}", broker))
                print(f"round {i + 1}: bare {bare[-1]:.2f} FPS, service {served[-1]['fps']:.2f} FPS "
                      f"({served[-1]['http_requests']} HTTP requests)", flush=True)
            if args.rounds > 0:
                ratio = statistics.median(s["fps"] for s in served) / statistics.median(bare)
                result.update(bare_fps=bare, service_fps=[s["fps"] for s in served],
                              service_counters_last_round=served[-1]["counters"], service_vs_bare=round(ratio, 4),
                              target_service_vs_bare=0.95)
                print(f"service / bare FPS: {ratio:.3f} (target >= 0.95)", flush=True)
            if args.soak_minutes > 0:
                print(f"soak: {args.soak_minutes:g} min at 30 FPS ...", flush=True)
                result["soak"] = soak(release, args.soak_minutes, work, broker)
                s = result["soak"]
                print(f"soak: RSS {s['rss_mb_at_1_min']} MB at minute 1, {s['rss_mb_at_end']} MB at the end "
                      f"(delta {s['rss_delta_mb']} MB, target < 2), {s['fps']} FPS", flush=True)
        finally:
            if broker is not None:
                broker.stop()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return 0


def cpu_flags() -> List[str]:
    """Which of avx512_vnni / avx2 this CPU has (INT8 speed depends on it)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    return sorted({f for f in ("avx512_vnni", "avx2") if f in text.split()})


if __name__ == "__main__":
    sys.exit(main())
