"""Honest on-device benchmark: warm-up, a steady-state window, percentiles, thermals, soak drift.

One JSON document per run (the fleet collects it into MLflow):

- ``latency_ms`` p50/p95/p99/mean/min/max of the whole detection (preprocess + infer +
  postprocess) and ``stages_ms`` for each step, over the steady-state window only;
- ``fps`` = iterations / wall time of that window (single stream, one frame at a time);
- ``peak_rss_mb`` of this process;
- ``thermal``: CPU temperature at start / end / max, sampled on a background thread during the
  run, plus throttling state (Pi `get_throttled` flags, cpufreq cur/max ratio, Jetson nvpmodel)
  at start and end;
- ``power`` (`power.py`): where the device has sensors (Jetson INA3221 rails, Pi 5
  ``vcgencmd pmic_read_adc``), sampled on a background thread: idle W over a short rest before the
  warm-up, mean/min/max W during the window, mJ per inference (total and above idle), per rail;
  without sensors ``{"available": false, "reason": ...}``, never zeros;
- ``cpu``: this process's CPU time over the window's wall time, as % of one core and of all cores;
- ``soak`` (with --soak-minutes): per-window p50/p95/FPS/max temperature (and mean W, mJ per
  inference, CPU %) and the drift of the last window's p50 against the first, which is where
  thermal throttling shows;
- ``device``: the device description (`sysinfo.describe_device`).
"""

from __future__ import annotations

import datetime as _dt
import resource
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import cv2
import numpy as np

from .detector import Detector, ReleaseError, default_engines_dir, load_detector, resolve_release, select_variant
from .manifest import load_manifest
from .power import (
    NO_SENSOR_REASON,
    PowerReader,
    PowerSampler,
    cpu_summary,
    energy_mj,
    power_summary,
    process_cpu_seconds,
)
from .sysinfo import describe_device
from .thermal import ThermalReader, ThermalSampler

SCHEMA = 1
SOAK_WINDOWS = 10  # a soak is reported as this many equal time windows
IDLE_SECONDS = 2.0  # rest before the warm-up for the idle power figure (only where there are sensors)
POWER_INTERVAL_S = 0.1  # power sampling period (10 Hz)


class BenchError(ValueError):
    """Benchmark arguments that cannot work together."""


def percentiles(values_s: List[float]) -> Dict[str, Optional[float]]:
    """p50/p95/p99/mean/min/max/std in milliseconds (None for an empty list)."""
    if not values_s:
        return {k: None for k in ("p50", "p95", "p99", "mean", "min", "max", "std")}
    a = np.asarray(values_s, dtype=np.float64) * 1000.0
    p50, p95, p99 = np.percentile(a, [50, 95, 99])
    return {"p50": round(float(p50), 3), "p95": round(float(p95), 3), "p99": round(float(p99), 3),
            "mean": round(float(a.mean()), 3), "min": round(float(a.min()), 3), "max": round(float(a.max()), 3),
            "std": round(float(a.std()), 3)}


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (Linux reports ru_maxrss in KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)


def bench_image(release_dir: Path, sample: Optional[str], seed: int = 0) -> Tuple[np.ndarray, str]:
    """The frame to benchmark on: the release's health sample (a real image at camera size) or,
    when the release has none, a seeded synthetic 640x480 grey texture."""
    if sample is not None:
        image = cv2.imread(str(release_dir / sample), cv2.IMREAD_COLOR)
        if image is None:
            raise ReleaseError(f"health sample {sample} in {release_dir} is not a readable image; redeploy the release")
        return image, f"health_sample:{sample}"
    rng = np.random.default_rng(seed)
    image = np.clip(rng.normal(128, 20, (480, 640, 3)), 0, 255).astype(np.uint8)
    return image, "synthetic:640x480"


def _validate(warmup: int, iterations: Optional[int], seconds: Optional[float], soak_minutes: Optional[float],
              idle_s: float = IDLE_SECONDS, power_interval_s: float = POWER_INTERVAL_S) -> None:
    if idle_s < 0:
        raise BenchError(f"--idle-seconds {idle_s} must be >= 0")
    if power_interval_s <= 0:
        raise BenchError(f"--power-interval {power_interval_s} must be > 0")
    if warmup < 0:
        raise BenchError(f"--warmup {warmup} must be >= 0")
    given = [n for n, v in (("--iterations", iterations), ("--seconds", seconds), ("--soak-minutes", soak_minutes))
             if v is not None]
    if len(given) > 1:
        raise BenchError(f"{' and '.join(given)} both set; choose one way to size the steady-state window")
    if not given:
        raise BenchError("no steady-state window; pass --iterations N, --seconds S or --soak-minutes M")
    if iterations is not None and iterations < 1:
        raise BenchError(f"--iterations {iterations} must be >= 1")
    for name, v in (("--seconds", seconds), ("--soak-minutes", soak_minutes)):
        if v is not None and v <= 0:
            raise BenchError(f"{name} {v} must be > 0")


def run_benchmark(detector: Detector, image: np.ndarray, warmup: int, iterations: Optional[int] = None,
                  seconds: Optional[float] = None, soak_minutes: Optional[float] = None,
                  thermal: Optional[ThermalReader] = None, sample_interval_s: float = 1.0,
                  clock: Callable[[], float] = time.perf_counter, power: Optional[PowerReader] = None,
                  idle_s: float = IDLE_SECONDS, power_interval_s: float = POWER_INTERVAL_S) -> Dict[str, Any]:
    """Benchmark `detector` on `image`; returns the measurement part of the document.

    Power (`power`, default: the sensors under the thermal reader's root) is sampled every
    `power_interval_s` on a background thread: for `idle_s` at rest before the warm-up (skipped
    where there are no sensors), then through the window. CPU % is the process's CPU time over
    the window's wall time."""
    _validate(warmup, iterations, seconds, soak_minutes, idle_s, power_interval_s)
    thermal = thermal or ThermalReader()
    power = power if power is not None else PowerReader(thermal.root, thermal.runner)
    duration = soak_minutes * 60.0 if soak_minutes is not None else seconds
    watts = PowerSampler(power, power_interval_s)
    if watts.reader is not None or soak_minutes is not None:  # the thread is only needed for these
        watts.start()
    idle_used = 0.0
    try:
        if watts.reader is not None and idle_s > 0:
            watts.begin("idle")
            time.sleep(idle_s)
            idle_used = idle_s
        watts.begin(None)
        for _ in range(warmup):
            detector.detect(image)
    except BaseException:
        watts.stop()
        raise
    snap_start = thermal.snapshot()
    sampler = ThermalSampler(thermal.cpu_temperature, sample_interval_s).start()
    if soak_minutes is not None and duration:
        watts.bins(time.monotonic(), duration / SOAK_WINDOWS, SOAK_WINDOWS)
    watts.begin("window")
    cpu_start = process_cpu_seconds()
    stamps: List[float] = []
    totals: List[float] = []
    stages: Dict[str, List[float]] = {"preprocess": [], "infer": [], "postprocess": []}
    n_dets = 0
    t_start = clock()
    mono_start = time.monotonic()
    try:
        while True:
            dets, t = detector.detect(image)
            now = clock()
            stamps.append(now - t_start)
            totals.append(t.total)
            stages["preprocess"].append(t.preprocess)
            stages["infer"].append(t.infer)
            stages["postprocess"].append(t.postprocess)
            n_dets = len(dets)
            if iterations is not None and len(totals) >= iterations:
                break
            if duration is not None and now - t_start >= duration:
                break
    finally:
        wall = clock() - t_start
        cpu_s = process_cpu_seconds() - cpu_start
        watts.stop()
        sampler.stop()
    mono_end = time.monotonic()
    snap_end = thermal.snapshot()
    doc: Dict[str, Any] = {
        "config": {"warmup": warmup, "iterations": iterations, "seconds": seconds, "soak_minutes": soak_minutes,
                   "idle_seconds": idle_s, "power_interval_s": power_interval_s},
        "iterations": len(totals),
        "duration_s": round(wall, 3),
        "fps": round(len(totals) / wall, 2) if wall > 0 else None,
        "latency_ms": percentiles(totals),
        "stages_ms": {k: percentiles(v) for k, v in stages.items()},
        "detections_last_frame": n_dets,
        "peak_rss_mb": peak_rss_mb(),
        "thermal": {**sampler.summary(), "sample_interval_s": sample_interval_s,
                    "start": snap_start.to_json(), "end": snap_end.to_json()},
        "power": power_summary(power, watts, wall, len(totals), idle_used),
        "cpu": cpu_summary(cpu_s, wall),
        "soak": None,
    }
    if soak_minutes is not None:
        doc["soak"] = soak_windows(stamps, totals, wall, sampler, mono_start, mono_end, power_bins=watts.bin_stats())
    return doc


def soak_windows(stamps: List[float], totals: List[float], wall: float, sampler: ThermalSampler,
                 mono_start: float, mono_end: float, windows: int = SOAK_WINDOWS,
                 power_bins: Optional[List[Dict[str, Optional[float]]]] = None) -> Dict[str, Any]:
    """Split a soak into equal time windows; report each window and the p50 drift first -> last.

    `power_bins` (one per window, from `PowerSampler.bins`, cut at the planned window width) adds
    each window's mean W, mJ per inference and the process's CPU %."""
    width = wall / windows if wall > 0 else 0.0
    t = np.asarray(stamps)
    lat = np.asarray(totals)
    mono_scale = (mono_end - mono_start) / wall if wall > 0 else 1.0
    rows = []
    for w in range(windows):
        lo, hi = w * width, (w + 1) * width
        mask = (t >= lo) & ((t < hi) if w < windows - 1 else (t <= hi + 1e-9))
        temps = sampler.between(mono_start + lo * mono_scale, mono_start + hi * mono_scale)
        pct = percentiles(lat[mask].tolist())
        pb = power_bins[w] if power_bins and w < len(power_bins) else {}
        mean_w = pb.get("mean_w")
        mj = energy_mj(mean_w, width, int(mask.sum()))
        rows.append({"t_start_s": round(lo, 2), "t_end_s": round(hi, 2), "iterations": int(mask.sum()),
                     "p50_ms": pct["p50"], "p95_ms": pct["p95"],
                     "fps": round(int(mask.sum()) / width, 2) if width > 0 else None,
                     "temp_max_c": max(temps) if temps else None,
                     "power_mean_w": mean_w, "energy_mj_per_inference": None if mj is None else round(mj, 3),
                     "cpu_percent": pb.get("cpu_percent")})
    first = next((r["p50_ms"] for r in rows if r["p50_ms"] is not None), None)
    last = next((r["p50_ms"] for r in reversed(rows) if r["p50_ms"] is not None), None)
    drift = round((last / first - 1.0) * 100.0, 2) if first and last else None
    return {"window_s": round(width, 3), "windows": rows, "p50_drift_pct": drift}


def benchmark_release(release: "Path | str", engines: Optional["Path | str"] = None, variant: Optional[str] = None,
                      warmup: int = 10, iterations: Optional[int] = None, seconds: Optional[float] = None,
                      soak_minutes: Optional[float] = None, thermal: Optional[ThermalReader] = None,
                      sample_interval_s: float = 1.0, power: Optional[PowerReader] = None,
                      idle_s: float = IDLE_SECONDS, power_interval_s: float = POWER_INTERVAL_S) -> Dict[str, Any]:
    """The whole `bench` command: load the release's variant, benchmark it, describe the device."""
    _validate(warmup, iterations, seconds, soak_minutes, idle_s, power_interval_s)
    release_dir = resolve_release(release)
    manifest = load_manifest(release_dir)
    v = select_variant(manifest, variant)
    engines_dir = Path(engines) if engines is not None else default_engines_dir(release_dir)
    detector = load_detector(release_dir, manifest, v, engines_dir)
    try:
        image, image_source = bench_image(release_dir, manifest.health_sample())
        measured = run_benchmark(detector, image, warmup, iterations, seconds, soak_minutes, thermal,
                                 sample_interval_s, power=power, idle_s=idle_s, power_interval_s=power_interval_s)
        backend = detector.describe()
    finally:
        detector.backend.close()
    return {
        "schema": SCHEMA,
        "kind": "device-benchmark",
        "created_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "release": manifest.release,
        "backend": manifest.backend,
        "precision": manifest.precision,
        "variant": v.name,
        "imgsz": v.imgsz,
        "output_format": manifest.output_format,
        "source": dict(manifest.source),
        "input": {"image": image_source, "shape": list(image.shape)},
        "backend_info": backend,
        "device": describe_device(),
        **measured,
    }


def summary_line(doc: Dict[str, Any]) -> str:
    """One line for humans and logs: variant, backend, p50/p95, FPS, temperatures, power, CPU %."""
    lat, th = doc["latency_ms"], doc["thermal"]
    temps = "n/a" if th["max_c"] is None else f"{th['start_c']:.1f}->{th['end_c']:.1f} (max {th['max_c']:.1f}) C"
    drift = ""
    if doc.get("soak"):
        drift = f", soak p50 drift {doc['soak']['p50_drift_pct']}%"
    pw = doc.get("power") or {}
    if not pw:
        watts = ""
    elif pw.get("available"):
        idle = "" if pw.get("idle_w") is None else f" (idle {pw['idle_w']:.2f} W)"
        watts = f", power {pw['mean_w']:.2f} W{idle}, {pw['energy_mj_per_inference']} mJ/inference"
    else:
        watts = ", power n/a (" + ("no sensors" if pw.get("reason") == NO_SENSOR_REASON else "no readings") + ")"
    cpu = doc.get("cpu") or {}
    load = "" if cpu.get("percent_of_one_core") is None else f", process CPU {cpu['percent_of_one_core']}% of one core"
    return (f"bench {doc['release']} {doc['variant']} {doc['backend']}/{doc['precision']}: "
            f"p50 {lat['p50']} ms, p95 {lat['p95']} ms, p99 {lat['p99']} ms, {doc['fps']} FPS over "
            f"{doc['iterations']} frames, peak RSS {doc['peak_rss_mb']} MB, CPU {temps}{watts}{load}{drift}")
