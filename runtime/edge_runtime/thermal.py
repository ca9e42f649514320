"""Temperatures, clocks and throttling on a Raspberry Pi, a Jetson or any Linux box.

Every reader takes a filesystem `root` (default "/") so tests can build a fake /sys in a temp
folder, and an injectable command runner for `vcgencmd` / `nvpmodel` (those exist only on the
devices). Nothing here raises because a sensor is absent: missing data is None, since a
benchmark must still run on a machine without sensors.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

CommandRunner = Callable[[List[str]], Optional[str]]

# Zone types that measure the CPU (Pi: cpu-thermal; Jetson: CPU-therm / cpu-thermal; x86:
# x86_pkg_temp; many ARM SoCs: soc_thermal). Lower-cased prefix match.
CPU_ZONE_TYPES = ("cpu-thermal", "cpu_thermal", "cpu-therm", "x86_pkg_temp", "soc_thermal", "soc-thermal",
                  "cpu", "tcpu", "k10temp")

# `vcgencmd get_throttled` bits (Raspberry Pi firmware documentation).
THROTTLE_BITS = {
    0: "under_voltage_now", 1: "freq_capped_now", 2: "throttled_now", 3: "soft_temp_limit_now",
    16: "under_voltage_occurred", 17: "freq_capped_occurred", 18: "throttled_occurred",
    19: "soft_temp_limit_occurred",
}


def run_command(argv: List[str], timeout: float = 2.0) -> Optional[str]:
    """Run a device tool if it exists; its stdout, or None when absent/failing (never raises)."""
    if shutil.which(argv[0]) is None:
        return None
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def read_sysfs(path: Path) -> Optional[str]:
    """A sysfs (or procfs) file's text, stripped; None when it is absent or unreadable."""
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _read_int(path: Path) -> Optional[int]:
    text = read_sysfs(path)
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def thermal_zones(root: "Path | str" = "/") -> Dict[str, float]:
    """All readable /sys/class/thermal zones as {"<type>" (or "<type>#n" if repeated): Celsius}."""
    zones: Dict[str, float] = {}
    base = Path(root) / "sys/class/thermal"
    for zone in sorted(base.glob("thermal_zone*"), key=lambda p: int(re.sub(r"\D", "", p.name) or 0)):
        milli = _read_int(zone / "temp")
        if milli is None:
            continue
        name = read_sysfs(zone / "type") or zone.name
        key, n = name, 1
        while key in zones:
            n += 1
            key = f"{name}#{n}"
        # sysfs reports millidegrees; a few old drivers report degrees (values < 200).
        zones[key] = milli / 1000.0 if abs(milli) >= 200 else float(milli)
    return zones


def cpu_zone_temperature(zones: Dict[str, float]) -> Optional[float]:
    """The CPU's temperature from zone readings: a CPU-named zone, else the hottest zone."""
    for prefix in CPU_ZONE_TYPES:
        for name, temp in zones.items():
            if name.lower().startswith(prefix):
                return temp
    return max(zones.values()) if zones else None


def parse_vcgencmd_temp(text: Optional[str]) -> Optional[float]:
    """`temp=48.3'C` -> 48.3."""
    m = re.search(r"temp=([-\d.]+)", text or "")
    return float(m.group(1)) if m else None


def parse_throttled(text: Optional[str]) -> Optional[int]:
    """`throttled=0x50005` -> 0x50005."""
    m = re.search(r"throttled=(0x[0-9a-fA-F]+|\d+)", text or "")
    return int(m.group(1), 0) if m else None


def decode_throttled(value: int) -> Dict[str, Any]:
    """Decode the Pi firmware's throttle bit field into named flags (plus the raw hex)."""
    flags: Dict[str, Any] = {name: bool(value & (1 << bit)) for bit, name in THROTTLE_BITS.items()}
    flags["raw"] = hex(value)
    return flags


def cpufreq(root: "Path | str" = "/") -> Dict[str, Dict[str, Optional[float]]]:
    """Per-CPU current and maximum clock in MHz from cpufreq sysfs: {"cpu0": {"cur_mhz", "max_mhz"}}."""
    out: Dict[str, Dict[str, Optional[float]]] = {}
    base = Path(root) / "sys/devices/system/cpu"
    for cpu in sorted(base.glob("cpu[0-9]*"), key=lambda p: int(p.name[3:])):
        freq = cpu / "cpufreq"
        if not freq.is_dir():
            continue
        cur = _read_int(freq / "scaling_cur_freq") or _read_int(freq / "cpuinfo_cur_freq")
        mx = _read_int(freq / "cpuinfo_max_freq") or _read_int(freq / "scaling_max_freq")
        out[cpu.name] = {"cur_mhz": cur / 1000.0 if cur else None, "max_mhz": mx / 1000.0 if mx else None}
    return out


def device_model(root: "Path | str" = "/") -> Optional[str]:
    """The board model from the device tree (Pi, Jetson) or DMI (x86), else None."""
    r = Path(root)
    for p in (r / "proc/device-tree/model", r / "sys/firmware/devicetree/base/model"):
        text = read_sysfs(p)
        if text:
            return text.replace("\x00", "").strip()
    parts = [read_sysfs(r / "sys/class/dmi/id" / f) for f in ("sys_vendor", "product_name")]
    text = " ".join(p for p in parts if p)
    return text or None


def is_jetson(root: "Path | str" = "/") -> bool:
    """True on NVIDIA Jetson (L4T release file or a Jetson device-tree model)."""
    model = device_model(root) or ""
    return (Path(root) / "etc/nv_tegra_release").is_file() or "jetson" in model.lower()


def is_raspberry_pi(root: "Path | str" = "/") -> bool:
    """True on a Raspberry Pi (device-tree model)."""
    return "raspberry pi" in (device_model(root) or "").lower()


def nvpmodel(root: "Path | str" = "/", runner: CommandRunner = run_command) -> Optional[Dict[str, Any]]:
    """Jetson power mode: from /var/lib/nvpmodel/status ("pmode:0002 ...") or `nvpmodel -q`."""
    status = read_sysfs(Path(root) / "var/lib/nvpmodel/status")
    if status:
        m = re.search(r"pmode:(\d+)", status)
        if m:
            return {"mode_id": int(m.group(1)), "source": "status"}
    text = runner(["nvpmodel", "-q"])
    if text:
        name = re.search(r"NV Power Mode:\s*(\S+)", text)
        ids = re.findall(r"^\s*(\d+)\s*$", text, re.M)
        return {"mode": name.group(1) if name else None, "mode_id": int(ids[-1]) if ids else None, "source": "nvpmodel"}
    return None


@dataclass(frozen=True)
class ThermalSnapshot:
    """One reading of everything thermal the device exposes."""

    time: float
    cpu_c: Optional[float]
    zones: Dict[str, float]
    cpufreq_mhz: Dict[str, Dict[str, Optional[float]]]
    throttled: Optional[Dict[str, Any]]
    nvpmodel: Optional[Dict[str, Any]]

    def freq_ratio(self) -> Optional[float]:
        """Lowest current/max clock ratio across CPUs (below 1 under load = capped clocks)."""
        ratios = [f["cur_mhz"] / f["max_mhz"] for f in self.cpufreq_mhz.values() if f["cur_mhz"] and f["max_mhz"]]
        return round(min(ratios), 3) if ratios else None

    def to_json(self) -> Dict[str, Any]:
        """JSON form for the benchmark document."""
        return {"cpu_c": self.cpu_c, "zones": self.zones, "cpufreq_mhz": self.cpufreq_mhz,
                "freq_ratio": self.freq_ratio(), "throttled": self.throttled, "nvpmodel": self.nvpmodel}


class ThermalReader:
    """Reads CPU temperature / clocks / throttling for this device kind, from `root`."""

    def __init__(self, root: "Path | str" = "/", runner: CommandRunner = run_command) -> None:
        self.root = Path(root)
        self.runner = runner
        self.pi = is_raspberry_pi(self.root)
        self.jetson = is_jetson(self.root)

    def cpu_temperature(self) -> Optional[float]:
        """CPU temperature in Celsius: thermal zones first (cheap), `vcgencmd measure_temp` on a Pi
        without a readable zone, None when the machine has no sensor."""
        temp = cpu_zone_temperature(thermal_zones(self.root))
        if temp is None and self.pi:
            temp = parse_vcgencmd_temp(self.runner(["vcgencmd", "measure_temp"]))
        return temp

    def throttled(self) -> Optional[Dict[str, Any]]:
        """Decoded `vcgencmd get_throttled` on a Pi; None elsewhere (use cpufreq ratios there)."""
        if not self.pi:
            return None
        value = parse_throttled(self.runner(["vcgencmd", "get_throttled"]))
        return decode_throttled(value) if value is not None else None

    def snapshot(self) -> ThermalSnapshot:
        """Everything at once (costs a subprocess on a Pi/Jetson: not for every frame)."""
        zones = thermal_zones(self.root)
        cpu = cpu_zone_temperature(zones)
        if cpu is None and self.pi:
            cpu = parse_vcgencmd_temp(self.runner(["vcgencmd", "measure_temp"]))
        return ThermalSnapshot(time.time(), cpu, zones, cpufreq(self.root), self.throttled(),
                               nvpmodel(self.root, self.runner) if self.jetson else None)


@dataclass
class ThermalSampler:
    """Samples a temperature function on a background thread (start/end/max over a run).

    Sampling in the background, not between inferences, keeps the sensor reads (a subprocess on
    a Pi without sysfs) out of the measured latency.
    """

    read: Callable[[], Optional[float]]
    interval_s: float = 1.0
    samples: List[Tuple[float, float]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: Optional[threading.Thread] = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _sample(self) -> None:
        temp = self.read()
        if temp is not None:
            with self._lock:
                self.samples.append((time.monotonic(), float(temp)))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def start(self) -> "ThermalSampler":
        """Take a first sample now and keep sampling every `interval_s` until `stop`."""
        self._sample()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="thermal-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread and take a final sample."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()

    def between(self, t0: float, t1: float) -> List[float]:
        """Temperatures sampled in the monotonic window [t0, t1]."""
        with self._lock:
            return [c for t, c in self.samples if t0 <= t <= t1]

    def summary(self) -> Dict[str, Optional[float]]:
        """start_c, end_c, max_c, mean_c and the sample count."""
        with self._lock:
            temps = [c for _, c in self.samples]
        if not temps:
            return {"start_c": None, "end_c": None, "max_c": None, "mean_c": None, "samples": 0}
        return {"start_c": temps[0], "end_c": temps[-1], "max_c": max(temps),
                "mean_c": round(sum(temps) / len(temps), 2), "samples": len(temps)}
