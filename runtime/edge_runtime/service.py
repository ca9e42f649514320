"""`serve`: the detector as a long-running service on the line's camera.

One process: the real-time loop (latest-frame slots, thermal-adaptive variants) over the
configured source, its results handed to the publishers (rotated JSONL, MQTT, the frame sample
on disk, the actuator hook), and a small HTTP server for people and monitors:

  /healthz   200 when frames arrive and inference keeps up, 503 otherwise (JSON body)
  /metrics   Prometheus text: FPS, latency histograms per slice, drops, detections per class,
             temperature, throttling, publisher counters
  /          live view: the last frame with its boxes, refreshing itself
  /frame.jpg the annotated last frame;  /live.json what the page shows beside it

A release served from `D/releases/<name>` also runs shadow requests: the fleet asks, through
`D/service/shadow/request.json`, for a candidate release to run beside this one on every k-th
live frame, and gets the comparison back as `D/service/shadow/<id>.json` (`shadow.py`). A shadow
never makes the service unhealthy; /healthz shows its progress under `shadow`.

Memory is bounded for any run length (see `metrics.py`). SIGTERM or SIGINT stop the loop, flush
the publishers and exit 0. Under systemd (`Type=notify`), `READY=1` is sent after the first
inference and `WATCHDOG=1` only while the service is healthy, so systemd restarts a service
whose camera or inference is stuck, not only one that crashed.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import cv2

from .detector import Detector, load_detector, select_variant
from .manifest import Manifest, Variant, load_manifest
from .metrics import MetricsText
from .realtime import FrameSource, RealtimeLoop, ThermalGovernor, annotate, load_actuator, open_source
from .service_config import ServiceConfig
from .shadow import ShadowHandler, deploy_dir_of
from .thermal import ThermalReader

log = logging.getLogger("edge_runtime.service")
Handler = Callable[[Any], None]
HTTP_TIMEOUT_S = 5.0
THERMAL_CACHE_S = 2.0  # a Pi's vcgencmd is a subprocess: not on every scrape of a busy Prometheus


def open_detectors(release_dir: Path, manifest: Manifest, variant: Optional[str], engines: Optional[Path],
                   adaptive: bool, thermal_root: "Path | str" = "/", check_interval_s: float = 1.0,
                   min_dwell_s: float = 5.0) -> Tuple[Dict[str, Detector], Optional[ThermalGovernor], Variant]:
    """Load the variants the loop may use and, when adaptive, the thermal governor over them.

    All variants are loaded up front: a thermal switch must not stall the loop on a model load.
    Adaptive switching needs the manifest's thermal settings and more than one variant.
    """
    start = select_variant(manifest, variant)
    adaptive = adaptive and manifest.thermal is not None and len(manifest.variants) > 1
    wanted = list(manifest.variants) if adaptive else [start]
    detectors: Dict[str, Detector] = {}
    try:
        for v in wanted:
            detectors[v.name] = load_detector(release_dir, manifest, v, engines)
    except BaseException:
        for d in detectors.values():
            d.backend.close()
        raise
    governor = None
    if adaptive and manifest.thermal is not None:
        names = [v.name for v in manifest.variants]
        governor = ThermalGovernor(names, manifest.thermal.throttle_c, manifest.thermal.resume_c,
                                   ThermalReader(thermal_root).cpu_temperature, check_interval_s=check_interval_s,
                                   min_dwell_s=min_dwell_s)
        governor.level = names.index(start.name)
    return detectors, governor, start


# --------------------------------------------------------------------------- systemd notification

def sd_notify(message: str) -> bool:
    """Send a datagram to systemd's notify socket ($NOTIFY_SOCKET); False when not under systemd.

    The protocol is one datagram of `KEY=value` lines (sd_notify(3)); an address starting with
    '@' is in the abstract namespace.
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(address)
            s.sendall(message.encode())
        return True
    except OSError as e:
        log.warning("sd_notify to %s failed: %s", os.environ.get("NOTIFY_SOCKET"), e)
        return False


def watchdog_interval_s() -> Optional[float]:
    """Half of systemd's WatchdogSec (from $WATCHDOG_USEC, for this process), or None when off."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid.isdigit() and int(pid) != os.getpid()):
        return None
    try:
        return max(int(usec) / 2e6, 0.05)
    except ValueError:
        return None


# --------------------------------------------------------------------------- the service

class Service:
    """The loop, its publishers and the HTTP endpoints for one release on one source."""

    def __init__(self, release_dir: Path, config: ServiceConfig, out_dir: Path, engines: Optional[Path] = None,
                 thermal_root: "Path | str" = "/", source: Optional[FrameSource] = None,
                 max_seconds: Optional[float] = None, max_frames: Optional[int] = None,
                 adaptive: bool = True) -> None:
        self.release_dir = release_dir
        self.config = config
        self.out_dir = out_dir
        self.manifest = load_manifest(release_dir)
        self.thermal = ThermalReader(thermal_root)
        self.detectors, governor, start = open_detectors(release_dir, self.manifest, config.variant, engines,
                                                         adaptive, thermal_root)
        self.handlers: List[Any] = []
        self.shadow: Optional[ShadowHandler] = None
        self._thermal_cache: Tuple[float, Optional[float], Optional[bool]] = (-1e9, None, None)
        try:
            self.source = source or open_source(config.source, config.fps, max_frames, reconnect=True)
            self.handlers = self._build_handlers()
            self.loop = RealtimeLoop(self.detectors, self.source, self.handlers, governor, start.name,
                                     max_seconds=max_seconds, class_names=self.manifest.class_names,
                                     handler_errors="count")
        except BaseException:
            self.close()
            raise
        self.started = time.monotonic()
        self.started_perf = time.perf_counter()
        self.httpd: Optional[HTTPServer] = None
        self._jpeg_cache: Tuple[int, bytes] = (-1, b"")
        self._jpeg_lock = threading.Lock()
        self._stopped = threading.Event()
        self.fatal_error = ""

    # ----------------------------------------------------------------- publishers

    def _build_handlers(self) -> List[Any]:
        """Rotated JSONL always; MQTT, the frame sample and the actuator when configured."""
        from .frame_keeper import FrameKeeper
        from .jsonl import JsonlHandler, RotatingJsonlWriter

        c = self.config
        names = list(self.manifest.class_names)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        writer = RotatingJsonlWriter(self.out_dir / "detections.jsonl", int(c.jsonl_max_mb * 1024 * 1024),
                                     c.jsonl_backups)
        handlers: List[Any] = [JsonlHandler(writer, names)]
        if c.mqtt_host:
            from .mqtt import MqttPublisher

            handlers.append(MqttPublisher(c.mqtt_host, c.mqtt_port, c.topic, client_id=f"edge-defect-{c.device}",
                                          queue_max=c.mqtt_queue, class_names=names, release=self.manifest.release))
        if c.frames_every_s > 0 or c.frames_band[1] > c.frames_band[0]:
            handlers.append(FrameKeeper(Path(c.frames_dir), every_s=c.frames_every_s, band=c.frames_band,
                                        max_files=c.frames_max_files, max_mb=c.frames_max_mb,
                                        release=self.manifest.release, class_names=names))
        if c.actuator:
            handlers.append(load_actuator(c.actuator))
        deploy_dir = deploy_dir_of(self.release_dir)
        if deploy_dir is not None:  # last: the publishers get each result before the shadow's hand-off
            self.shadow = ShadowHandler(deploy_dir, self.release_dir.resolve().name, names, c.variant)
            handlers.append(self.shadow)
        return handlers

    def counters(self) -> Dict[str, float]:
        """Every publisher's counters, merged (names are distinct per publisher)."""
        out: Dict[str, float] = {}
        for h in self.handlers:
            fn = getattr(h, "counters", None)
            if fn is not None:
                out.update(fn())
        return out

    # ----------------------------------------------------------------- health

    def _thermal(self) -> Tuple[Optional[float], Optional[bool]]:
        """(CPU temperature C, throttled now) — cached for a couple of seconds; None = no sensor."""
        t, temp, throttled = self._thermal_cache
        now = time.monotonic()
        if now - t >= THERMAL_CACHE_S:
            temp = self.thermal.cpu_temperature()
            state = self.thermal.throttled()
            throttled = None if state is None else bool(state.get("throttled_now", state.get("any_now")))
            self._thermal_cache = (now, temp, throttled)
        return temp, throttled

    def health(self) -> Tuple[bool, Dict[str, Any]]:
        """(healthy, the /healthz document). Stalled = no frame captured, or none inferred, for stall_s."""
        loop = self.loop
        now = time.perf_counter()
        stall = self.config.stall_s

        def age(t: Optional[float]) -> Optional[float]:
            return round(now - t, 3) if t is not None else None

        frame_age, infer_age = age(loop.last_capture_t), age(loop.last_infer_t)
        problems: List[str] = []
        since_start = now - self.started_perf
        if self.fatal_error or loop.errors:
            status = "error"
            problems.append(self.fatal_error or f"{type(loop.errors[0]).__name__}: {loop.errors[0]}")
        elif self._stopped.is_set():
            status = "stopping"
            problems.append("the service is shutting down")
        else:
            if (frame_age if frame_age is not None else since_start) > stall:
                problems.append(f"camera stalled: no frame from {self.source.description} for "
                                f"{frame_age if frame_age is not None else round(since_start, 1)} s "
                                f"(stall_s {stall:g})")
            if loop.last_capture_t is not None and (infer_age if infer_age is not None else since_start) > stall:
                problems.append(f"inference stalled: no result for {infer_age if infer_age is not None else '?'} s "
                                f"while frames arrive (stall_s {stall:g})")
            status = "stalled" if problems else ("ok" if loop.last_infer_t is not None else "starting")
            if status == "starting":
                problems.append("starting: no inference yet")
        fps = loop.stats.fps.rate()
        doc = {
            "ok": status == "ok", "status": status, "release": self.manifest.release, "variant": loop.variant,
            "backend": self.manifest.backend, "precision": self.manifest.precision, "device": self.config.device,
            "uptime_s": round(time.monotonic() - self.started, 3), "fps": round(fps, 2) if fps is not None else None,
            "last_frame_age_s": frame_age, "last_inference_age_s": infer_age,
            "frames_captured": loop.captured, "frames_handled": loop.stats.handled,
            "frames_dropped": int(loop.frames.dropped), "last_error": self.fatal_error or loop.stats.last_error,
            "problems": problems, "pid": os.getpid(),
            "shadow": self.shadow.status() if self.shadow is not None else None,  # never part of `ok`
        }
        return doc["ok"], doc

    # ----------------------------------------------------------------- metrics

    def metrics_text(self) -> str:
        """The Prometheus exposition of the service's state."""
        loop, st, m = self.loop, self.loop.stats, MetricsText()
        labels = {"device": self.config.device, "release": self.manifest.release}
        m.sample("info", "gauge", "Release and variant being served (value always 1).", 1,
                 {**labels, "variant": loop.variant, "backend": self.manifest.backend,
                  "precision": self.manifest.precision})
        ok, doc = self.health()
        m.sample("healthy", "gauge", "1 when /healthz answers 200.", 1 if ok else 0)
        m.sample("uptime_seconds", "gauge", "Seconds since the service started.", doc["uptime_s"])
        m.sample("fps", "gauge", "Frames handled per second over the last 5 s.", doc["fps"])
        m.sample("frames_captured_total", "counter", "Frames delivered by the source.", loop.captured)
        m.sample("frames_inferred_total", "counter", "Frames inference ran on.", loop.inferred)
        m.sample("frames_handled_total", "counter", "Results handed to the publishers.", st.handled)
        m.sample("frames_dropped_total", "counter",
                 "Frames replaced by a newer one before inference took them (the loop keeps the freshest).",
                 int(loop.frames.dropped))
        m.sample("results_dropped_total", "counter", "Results replaced before the publishers took them.",
                 int(loop.results.dropped))
        for name, hist in st.histograms.items():
            m.histogram("slice_latency_seconds", "Per-frame latency of each slice: capture (grab to frame ready), "
                        "infer (frame ready to inference done), handle (inference done to published).",
                        hist, {"slice": name})
        m.samples("detections_total", "counter", "Detections published, per class.",
                  [({"class": k}, v) for k, v in sorted(st.detections_by_class.items())])
        m.sample("handler_errors_total", "counter", "Publisher or actuator calls that raised.", st.handler_errors)
        temp, throttled = self._thermal()
        m.sample("temperature_celsius", "gauge", "CPU temperature (NaN: the device has no sensor).", temp)
        m.sample("throttled", "gauge", "1 while the SoC is throttled (NaN: the device does not report it).",
                 None if throttled is None else int(throttled))
        if loop.governor is not None:
            m.sample("thermal_switches_total", "counter", "Thermal variant switches.", loop.governor.switch_count)
        m.sample("camera_reconnects_total", "counter", "Times the camera was reopened after it stopped delivering.",
                 getattr(self.source, "reconnects", 0))
        for name, value in sorted(self.counters().items()):
            kind = "counter" if name.endswith("_total") else "gauge"
            m.sample(name, kind, f"Publisher counter {name}.", value)
        if self.shadow is not None:
            sh = self.shadow.metrics()
            m.sample("shadow_frames_compared_total", "counter",
                     "Frames a shadow candidate release was compared on, over every shadow.",
                     sh["frames_compared_total"])
            m.sample("shadow_errors_total", "counter",
                     "Shadow candidate exceptions (load or inference), over every shadow.", sh["errors_total"])
            m.sample("shadow_active", "gauge", "1 while a shadow candidate runs beside the release.", sh["active"])
        return m.text()

    # ----------------------------------------------------------------- live view

    def latest_jpeg(self) -> Optional[bytes]:
        """The last handled frame with its boxes as JPEG (encoded once per new frame, on request)."""
        r = self.loop.stats.last_result
        if r is None:
            return None
        with self._jpeg_lock:
            if self._jpeg_cache[0] != r.frame.index:
                ok, buf = cv2.imencode(".jpg", annotate(r.frame.image, r.detections, self.manifest.class_names),
                                       [int(cv2.IMWRITE_JPEG_QUALITY), 80])
                if ok:
                    self._jpeg_cache = (r.frame.index, buf.tobytes())
            return self._jpeg_cache[1] or None

    def live(self) -> Dict[str, Any]:
        """What the live page shows next to the frame: health and the last detections."""
        _, doc = self.health()
        r = self.loop.stats.last_result
        doc["frame"] = r.frame.index if r is not None else None
        doc["detections"] = r.detections_json(self.manifest.class_names) if r is not None else []
        return doc

    # ----------------------------------------------------------------- lifecycle

    def start_http(self) -> Tuple[str, int]:
        """Bind the HTTP server (a port already in use is an error naming it) and serve in a thread.

        One thread answers every request in turn (each takes milliseconds, and a client that stalls
        is cut off after `HTTP_TIMEOUT_S`). A thread per request, as ThreadingHTTPServer does, made
        the resident size creep up by ~7 MB over the first minutes of a soak as glibc opened malloc
        arenas for the short-lived threads; a service that runs for months keeps its threads fixed.
        """
        try:
            self.httpd = HTTPServer((self.config.http_bind, self.config.http_port), _handler_for(self))
        except OSError as e:
            raise OSError(f"cannot listen on {self.config.http_bind}:{self.config.http_port} ({e.strerror}); "
                          "another service uses that port: set service.http_port in inventory.yaml") from None
        threading.Thread(target=self.httpd.serve_forever, name="http", daemon=True).start()
        host, port = self.httpd.server_address[:2]
        return str(host), int(port)

    def _notifier(self) -> None:
        """READY=1 after the first inference; then WATCHDOG=1 every half WatchdogSec while healthy."""
        interval = watchdog_interval_s()
        ready = False
        while not self._stopped.wait(min(interval or 1.0, 1.0) if not ready else (interval or 1.0)):
            ok, doc = self.health()
            if not ready and self.loop.last_infer_t is not None:
                ready = True
                sd_notify(f"READY=1\nSTATUS=serving release {self.manifest.release}")
            if ready and interval is not None and ok:
                sd_notify("WATCHDOG=1")
            elif ready and not ok:
                sd_notify(f"STATUS={doc['status']}: {'; '.join(doc['problems'])}"[:400])
            if ready and interval is None:
                break  # not watched: nothing more to send

    def stop(self) -> None:
        """Stop the loop (from a signal handler or another thread); `run` then returns."""
        self._stopped.set()
        self.loop.stop()

    def run(self) -> Dict[str, Any]:
        """Serve until the source ends or `stop()`; returns the loop summary. Closes everything."""
        threading.Thread(target=self._notifier, name="sd-notify", daemon=True).start()
        try:
            summary = self.loop.run()
        except BaseException as e:
            self.fatal_error = f"{type(e).__name__}: {e}"
            raise
        finally:
            self._stopped.set()
            sd_notify("STOPPING=1")
            self.close()
        summary.update(release=self.manifest.release, backend=self.manifest.backend,
                       precision=self.manifest.precision, counters=self.counters())
        return summary

    def close(self) -> None:
        """Shut HTTP down, flush and close publishers, release models and the source."""
        if getattr(self, "httpd", None) is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None
        for h in self.handlers:
            fn = getattr(h, "close", None)
            if fn is not None:
                try:
                    fn()
                except Exception as e:  # noqa: BLE001 - one publisher's failure must not keep others open
                    log.warning("closing %s failed: %s", type(h).__name__, e)
        if hasattr(self, "source"):
            self.source.close()
        for d in self.detectors.values():
            d.backend.close()
        self.detectors = {}


def install_signal_handlers(service: Service) -> None:
    """SIGTERM (systemd, the supervisor) and SIGINT (Ctrl-C) stop the service cleanly."""
    def handler(signum: int, _frame: Any) -> None:
        log.warning("signal %d: stopping", signum)
        service.stop()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


# --------------------------------------------------------------------------- HTTP

LIVE_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>edge-defect live: {device}</title>
<style>body{{font-family:sans-serif;margin:1em;background:#111;color:#eee}}
img{{max-width:100%;border:1px solid #444}} .bad{{color:#f66}} .ok{{color:#6f6}}
td{{padding:0 .6em}}</style></head>
<body><h1>{device}</h1>
<p id="status">loading...</p>
<img id="frame" alt="latest frame with detections">
<table id="dets"></table>
<script>
const REFRESH_MS = {refresh_ms};
async function tick() {{
  try {{
    const r = await fetch('live.json', {{cache: 'no-store'}});
    const d = await r.json();
    const s = document.getElementById('status');
    s.className = d.ok ? 'ok' : 'bad';
    s.textContent = `${{d.status}} | release ${{d.release}} | variant ${{d.variant}} | ` +
      `${{d.fps === null ? '-' : d.fps}} FPS | frame ${{d.frame}} | last frame ${{d.last_frame_age_s}} s ago` +
      (d.problems.length ? ' | ' + d.problems.join('; ') : '');
    if (d.frame !== null) document.getElementById('frame').src = 'frame.jpg?f=' + d.frame;
    document.getElementById('dets').innerHTML = d.detections.map(
      x => `<tr><td>${{x.name || x.class}}</td><td>${{x.score.toFixed(2)}}</td><td>${{x.box.join(', ')}}</td></tr>`
    ).join('');
  }} catch (e) {{
    document.getElementById('status').textContent = 'service unreachable: ' + e;
  }}
  setTimeout(tick, REFRESH_MS);
}}
tick();
</script></body></html>
"""


def _handler_for(service: Service) -> type:
    class ServiceHTTPHandler(BaseHTTPRequestHandler):
        """GET-only endpoints of one service (stdlib: nothing to install on a device)."""

        server_version = "edge-runtime"
        timeout = HTTP_TIMEOUT_S  # socket timeout per connection: a stalled client cannot hold the server

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib's signature
            log.debug("http %s", format % args)  # a scrape every 15 s must not fill the journal

        def _send(self, code: int, body: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 - stdlib's name
            path = self.path.split("?", 1)[0]
            try:
                if path == "/healthz":
                    ok, doc = service.health()
                    self._send(200 if ok else 503, json.dumps(doc, sort_keys=True).encode(), "application/json")
                elif path == "/metrics":
                    self._send(200, service.metrics_text().encode(), "text/plain; version=0.0.4; charset=utf-8")
                elif path in ("/", "/index.html"):
                    page = LIVE_PAGE.format(device=service.config.device, refresh_ms=500)
                    self._send(200, page.encode(), "text/html; charset=utf-8")
                elif path == "/live.json":
                    self._send(200, json.dumps(service.live()).encode(), "application/json")
                elif path == "/frame.jpg":
                    jpeg = service.latest_jpeg()
                    if jpeg is None:
                        self._send(404, b"no frame yet\n", "text/plain")
                    else:
                        self._send(200, jpeg, "image/jpeg")
                else:
                    self._send(404, b"not found: try /, /healthz, /metrics\n", "text/plain")
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client went away; nothing to answer

        do_HEAD = do_GET

    return ServiceHTTPHandler


def resolve_outputs(deploy_dir: Optional[Path], out_dir: Optional[str]) -> Path:
    """Where the service writes detections.jsonl: --out-dir, else <deploy_dir>/service."""
    if out_dir:
        return Path(out_dir)
    if deploy_dir is None:
        raise ValueError("serve needs --deploy-dir (or --out-dir with --release and --config)")
    return deploy_dir / "service"


def release_of(deploy_dir: Optional[Path], release: Optional[str]) -> Path:
    """--release, else <deploy_dir>/current resolved once (a later switch needs a restart)."""
    if release:
        return Path(release).resolve()
    if deploy_dir is None:
        raise ValueError("serve needs --deploy-dir or --release")
    current = deploy_dir / "current"
    if not current.exists():
        raise ValueError(f"{current} does not exist: nothing is deployed in {deploy_dir}; run `fab deploy` first")
    return current.resolve()


def config_path(deploy_dir: Optional[Path], config: Optional[str]) -> Path:
    """--config, else <deploy_dir>/service/service.json."""
    if config:
        return Path(config)
    if deploy_dir is None:
        raise ValueError("serve needs --deploy-dir or --config FILE")
    return deploy_dir / "service" / "service.json"


def format_summary(summary: Dict[str, Any]) -> str:
    """One line for the log when the service stops."""
    return (f"serve stopped after {summary['duration_s']} s: {summary['frames_handled']} frames handled, "
            f"{summary['frames_dropped']} dropped, {summary['fps']} FPS, release {summary.get('release')}")

