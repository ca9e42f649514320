"""Electrical power during a benchmark: Jetson INA3221 rails and the Raspberry Pi 5 PMIC.

Where the readings come from (each reader takes a filesystem `root`, default "/", so tests can
point it at a recorded /sys tree, and a command runner for `vcgencmd`):

- **Jetson, JetPack 5/6** (mainline-style ``ina3221`` hwmon driver):
  ``/sys/bus/i2c/drivers/ina3221/<bus>-<addr>/hwmon/hwmon<N>/`` with ``in<c>_label`` (rail name),
  ``in<c>_input`` (bus voltage, mV) and ``curr<c>_input`` (current, mA) for channels c = 1..3
  (Linux Documentation/hwmon/ina3221.rst). ``in7_label`` is "sum of shunt voltages" and has no
  current: not a rail. NVIDIA's kernel labels unconnected channels "NC"; the mainline driver
  gives a disabled channel no label and fails its reads (AGX Orin's second monitor at 0x41).
- **Jetson, JetPack 4 / L4T 32** (NVIDIA's ``ina3221x`` IIO driver):
  ``/sys/bus/i2c/drivers/ina3221x/<bus>-<addr>/iio:device<N>/`` with ``rail_name_<c>``,
  ``in_power<c>_input`` (mW), ``in_voltage<c>_input`` (mV), ``in_current<c>_input`` (mA), c = 0..2.
- **Raspberry Pi 5**: ``vcgencmd pmic_read_adc`` prints ``<RAIL>_A current(n)=<amps>A`` and
  ``<RAIL>_V volt(n)=<volts>V`` lines; a rail's power is V*A of the two lines with the same
  prefix. EXT5V_V and BATT_V have no current and are not rails. The sum covers the PMIC's own
  outputs: not the 5 V that goes straight to USB/HATs, nor the PMIC's conversion losses.

Which rails make the total (names differ per module): the module's input rail where it has one
(``VDD_IN`` on Orin Nano/NX, Xavier NX, TX2 NX; ``POM_5V_IN`` on Nano), the parallel supply
rails where it has none (AGX Orin: VDD_GPU_SOC + VDD_CPU_CV + VIN_SYS_5V0; AGX Xavier: GPU + CPU +
SOC + CV + VDDRQ + SYS5V), every PMIC rail on a Pi 5, else every rail (said so in `scope`).
Rails named ...CPU... or ...GPU... are also summed as the compute rails.

Nothing here raises because a sensor is absent, and nothing reports a zero it did not read:
without sensors the benchmark says ``{"available": false, "reason": ...}``.
"""

from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .thermal import CommandRunner, is_raspberry_pi, read_sysfs, run_command

NO_SENSOR_REASON = "no INA3221 rails or vcgencmd pmic_read_adc on this device"

# The module's own input rail (jtop and energymon use the same names as "the total").
TOTAL_INPUT_RAILS = ("VDD_IN", "POM_5V_IN", "5V_IN")
# Modules without an input rail: the rails that together supply the module, none downstream of
# another (energymon's jetson/JetsonPowerRails.md; VDDQ_VDD2_1V8AO is fed by VIN_SYS_5V0).
PARALLEL_SUPPLY_RAILS: Tuple[Tuple[str, ...], ...] = (
    ("VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0"),  # AGX Orin
    ("GPU", "CPU", "SOC", "CV", "VDDRQ", "SYS5V"),  # AGX Xavier
)

_PMIC_LINE = re.compile(r"^\s*(?P<rail>\S+)_(?P<unit>[AV])\s+(?:current|volt)\(\d+\)=(?P<value>[-\d.eE+]+)[AV]\s*$")


def _read_number(path: Path) -> Optional[float]:
    """A sysfs number; a few NVIDIA nodes append a unit ("32760 ma"), so only the first word."""
    text = read_sysfs(path)
    if not text:
        return None
    try:
        return float(text.split()[0])
    except ValueError:
        return None


def _by_number(paths: Sequence[Path]) -> List[Path]:
    return sorted(paths, key=lambda p: (int(re.sub(r"\D", "", p.name) or 0), p.name))


class Rail:
    """One measured supply rail: a name and how to read its power in watts (None = no reading)."""

    def __init__(self, name: str, read: Callable[[], Optional[float]], where: str) -> None:
        self.name = name
        self._read = read
        self.where = where

    def watts(self) -> Optional[float]:
        """The rail's power now, in W (None when the read fails)."""
        return self._read()


def _hwmon_rail(hwmon: Path, channel: int, name: str) -> Rail:
    volt, curr = hwmon / f"in{channel}_input", hwmon / f"curr{channel}_input"

    def read() -> Optional[float]:
        mv, ma = _read_number(volt), _read_number(curr)
        return None if mv is None or ma is None else mv * ma / 1e6

    return Rail(name, read, str(hwmon))


def _iio_rail(device: Path, channel: int, name: str) -> Rail:
    power = device / f"in_power{channel}_input"
    volt, curr = device / f"in_voltage{channel}_input", device / f"in_current{channel}_input"

    def read() -> Optional[float]:
        mw = _read_number(power)
        if mw is not None:
            return mw / 1e3
        mv, ma = _read_number(volt), _read_number(curr)
        return None if mv is None or ma is None else mv * ma / 1e6

    return Rail(name, read, str(device))


def ina3221_hwmon_rails(root: "Path | str" = "/") -> List[Rail]:
    """Rails of the JetPack 5/6 ``ina3221`` hwmon driver under `root` (readable ones only)."""
    rails: List[Rail] = []
    base = Path(root) / "sys/bus/i2c/drivers/ina3221"
    for device in sorted(base.glob("*-*")):
        for hwmon in _by_number(list(device.glob("hwmon/hwmon*"))):
            for label in _by_number(list(hwmon.glob("in*_label"))):
                m = re.fullmatch(r"in(\d+)_label", label.name)
                name = read_sysfs(label)
                if not m or not name or name.upper() == "NC" or not (hwmon / f"curr{m.group(1)}_input").exists():
                    continue  # "sum of shunt voltages" (in7) has no current; NC = not connected
                rail = _hwmon_rail(hwmon, int(m.group(1)), name)
                if rail.watts() is not None:  # a disabled channel keeps its files but fails reads
                    rails.append(rail)
    return rails


def ina3221x_iio_rails(root: "Path | str" = "/") -> List[Rail]:
    """Rails of the JetPack 4 ``ina3221x`` IIO driver under `root` (readable ones only)."""
    rails: List[Rail] = []
    base = Path(root) / "sys/bus/i2c/drivers/ina3221x"
    for device in sorted(base.glob("*-*")):
        for iio in sorted(set(device.glob("iio:device*")) | set(device.glob("iio_device"))):
            if iio.is_symlink() and any(iio.resolve() == r.resolve() for r in device.glob("iio:device*")):
                continue  # iio_device is a link to iio:deviceN on some releases
            for label in sorted(iio.glob("rail_name_*")):
                m = re.fullmatch(r"rail_name_(\d+)", label.name)
                name = read_sysfs(label)
                if not m or not name or name.upper() == "NC":
                    continue
                rail = _iio_rail(iio, int(m.group(1)), name)
                if rail.watts() is not None:
                    rails.append(rail)
    return rails


def parse_pmic_read_adc(text: Optional[str]) -> Dict[str, float]:
    """`vcgencmd pmic_read_adc` output -> {rail: W} for every rail with both a current and a volt
    line (EXT5V_V, BATT_V have no current: left out). Empty for text that is not that output."""
    amps: Dict[str, float] = {}
    volts: Dict[str, float] = {}
    for line in (text or "").splitlines():
        m = _PMIC_LINE.match(line)
        if not m:
            continue
        try:
            value = float(m.group("value"))
        except ValueError:
            continue
        (amps if m.group("unit") == "A" else volts)[m.group("rail")] = value
    return {rail: volts[rail] * amps[rail] for rail in amps if rail in volts}


def total_rails(names: Sequence[str], source: str) -> Tuple[List[str], str]:
    """Which rails add up to the device's power, and what that sum covers."""
    if source == "rpi5-pmic":
        return list(names), "sum of the Pi 5 PMIC rails (excludes 5 V taken directly by USB/HATs and PMIC losses)"
    for name in TOTAL_INPUT_RAILS:
        if name in names:
            return [name], f"module input rail {name}"
    for group in PARALLEL_SUPPLY_RAILS:
        if all(n in names for n in group):
            return list(group), "sum of the module's supply rails " + " + ".join(group)
    return list(names), "sum of every rail found (no known input rail for this module: may double-count)"


def compute_rails(names: Sequence[str]) -> List[str]:
    """Rails that feed the CPU and/or GPU (names differ per module: VDD_CPU_GPU_CV, POM_5V_GPU ...)."""
    return [n for n in names if ("CPU" in n.upper() or "GPU" in n.upper()) and n not in TOTAL_INPUT_RAILS]


class PowerReader:
    """Finds this device's power rails once, then reads them all at once (`read`)."""

    def __init__(self, root: "Path | str" = "/", runner: CommandRunner = run_command) -> None:
        self.root = Path(root)
        self.runner = runner
        self.source: Optional[str] = None
        self.rails: List[Rail] = []
        self.rail_names: List[str] = []
        self.paths: List[str] = []
        self.detail: Optional[str] = None
        finders = (("jetson-ina3221-hwmon", ina3221_hwmon_rails), ("jetson-ina3221x-iio", ina3221x_iio_rails))
        for source, find in finders:
            rails = find(self.root)
            if rails:
                self.source, self.rails = source, rails
                self.rail_names = [r.name for r in rails]
                self.paths = sorted({r.where for r in rails})
                break
        if self.source is None and is_raspberry_pi(self.root):
            names = sorted(parse_pmic_read_adc(self.runner(["vcgencmd", "pmic_read_adc"])))
            if names:
                self.source, self.rail_names, self.paths = "rpi5-pmic", names, ["vcgencmd pmic_read_adc"]
            else:
                self.detail = ("a Raspberry Pi, but `vcgencmd pmic_read_adc` gave no rail readings (Pi 5 only; "
                               "needs vcgencmd and access to /dev/vcio, e.g. the video group)")
        self.total, self.scope = total_rails(self.rail_names, self.source or "")
        self.compute = compute_rails(self.rail_names)

    @property
    def available(self) -> bool:
        """True when this device has rails that read."""
        return self.source is not None

    def read(self) -> Optional[Dict[str, float]]:
        """Every rail's power now, in W ({rail: W}); None when nothing could be read."""
        if self.source == "rpi5-pmic":
            values = parse_pmic_read_adc(self.runner(["vcgencmd", "pmic_read_adc"]))
        else:
            values = {}
            for rail in self.rails:
                w = rail.watts()
                if w is not None:
                    values[rail.name] = w
        return values or None

    def describe(self) -> Dict[str, Any]:
        """The sensor part of the benchmark document (what was read, where, what the total covers)."""
        if not self.available:
            out: Dict[str, Any] = {"available": False, "reason": NO_SENSOR_REASON}
            if self.detail:
                out["detail"] = self.detail
            return out
        return {"available": True, "source": self.source, "paths": self.paths, "rails": list(self.rail_names),
                "total_rails": self.total, "total_scope": self.scope, "cpu_gpu_rails": self.compute}


def process_cpu_seconds() -> float:
    """User + system CPU time of this process, all threads (children not included), in seconds."""
    t = os.times()
    return t.user + t.system


class _Acc:
    """Running sums for one phase or window: bounded memory however long the run."""

    __slots__ = ("n", "total", "lo", "hi", "rails", "cpu_first", "cpu_last")

    def __init__(self) -> None:
        self.n = 0
        self.total = 0.0
        self.lo = float("inf")
        self.hi = float("-inf")
        self.rails: Dict[str, float] = {}
        self.cpu_first: Optional[Tuple[float, float]] = None
        self.cpu_last: Optional[Tuple[float, float]] = None

    def add_cpu(self, t: float, cpu: float) -> None:
        if self.cpu_first is None:
            self.cpu_first = (t, cpu)
        self.cpu_last = (t, cpu)

    def add_power(self, total: float, rails: Dict[str, float]) -> None:
        self.n += 1
        self.total += total
        self.lo = min(self.lo, total)
        self.hi = max(self.hi, total)
        for k, v in rails.items():
            self.rails[k] = self.rails.get(k, 0.0) + v

    def mean(self) -> Optional[float]:
        return self.total / self.n if self.n else None

    def rail_mean(self, name: str) -> Optional[float]:
        return self.rails[name] / self.n if self.n and name in self.rails else None

    def cpu_percent(self) -> Optional[float]:
        if self.cpu_first is None or self.cpu_last is None or self.cpu_last[0] <= self.cpu_first[0]:
            return None
        return (self.cpu_last[1] - self.cpu_first[1]) / (self.cpu_last[0] - self.cpu_first[0]) * 100.0


class PowerSampler:
    """Samples the rails on a background thread (every `interval_s`) into running sums.

    Phases: ``begin("idle")`` / ``begin("window")`` switch where samples go (``begin(None)``
    discards them, e.g. during warm-up); each phase takes one sample as it begins. Soak windows:
    ``bins(start, width_s, n)`` also files every window-phase sample by its time into n bins,
    with the process's CPU time, so each soak window gets its own mean W and CPU %.
    """

    def __init__(self, reader: Optional[PowerReader], interval_s: float = 0.1,
                 clock: Callable[[], float] = time.monotonic, cpu: Callable[[], float] = process_cpu_seconds) -> None:
        if interval_s <= 0:
            raise ValueError(f"power sample interval {interval_s} must be > 0")
        self.reader = reader if reader is not None and reader.available else None
        self.interval_s = interval_s
        self.clock = clock
        self.cpu = cpu
        self.phases: Dict[str, _Acc] = {}
        self.failed_reads = 0
        self.read_s = 0.0
        self.reads = 0
        self._phase: Optional[str] = None
        self._bins: List[_Acc] = []
        self._bin_start = 0.0
        self._bin_width = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _total(self, values: Dict[str, float]) -> Optional[float]:
        assert self.reader is not None
        if not all(n in values for n in self.reader.total):
            return None  # a missing total rail would understate the total: no sample rather than a low one
        return sum(values[n] for n in self.reader.total)

    def sample(self) -> None:
        """Take one reading now and add it to the current phase (and soak bin)."""
        with self._lock:
            phase = self._phase
        if phase is None:
            return
        values, total, read_s = None, None, 0.0
        if self.reader is not None:
            t0 = time.perf_counter()
            values = self.reader.read()
            read_s = time.perf_counter() - t0
            total = self._total(values) if values else None
        now, cpu = self.clock(), self.cpu()
        with self._lock:
            if self.reader is not None:
                self.read_s += read_s
                self.reads += 1
                self.failed_reads += int(total is None)
            if phase != self._phase:
                return  # the phase changed while reading: this sample belongs to neither
            acc = self.phases.setdefault(phase, _Acc())
            targets = [acc]
            if phase == "window" and self._bins and self._bin_width > 0:
                k = int((now - self._bin_start) // self._bin_width)
                targets.append(self._bins[min(max(k, 0), len(self._bins) - 1)])
            for a in targets:
                a.add_cpu(now, cpu)
                if values is not None and total is not None:
                    a.add_power(total, values)

    def begin(self, phase: Optional[str]) -> None:
        """Send samples to `phase` from now on (None: drop them), starting with one taken now."""
        with self._lock:
            self._phase = phase
        self.sample()

    def bins(self, start: float, width_s: float, n: int) -> None:
        """File window samples into `n` bins of `width_s` from monotonic time `start` (soak windows)."""
        with self._lock:
            self._bins = [_Acc() for _ in range(n)]
            self._bin_start, self._bin_width = start, width_s

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def start(self) -> "PowerSampler":
        """Start the background thread (samples go nowhere until `begin`)."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="power-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Take a final sample in the current phase and stop the thread."""
        self.sample()
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            self._phase = None

    def phase(self, name: str) -> Optional[_Acc]:
        with self._lock:
            return self.phases.get(name)

    def bin_stats(self) -> List[Dict[str, Optional[float]]]:
        """Per soak bin: mean W (None without sensors or samples) and the process's CPU %."""
        with self._lock:
            bins = list(self._bins)
        return [{"mean_w": _r(b.mean()), "samples": b.n, "cpu_percent": _r(b.cpu_percent(), 1)} for b in bins]


def _r(x: Optional[float], digits: int = 3) -> Optional[float]:
    return None if x is None else round(x, digits)


def _rail_sum(acc: Optional[_Acc], names: Sequence[str]) -> Optional[float]:
    """Sum of the named rails' means in `acc` (None unless every one was read)."""
    if acc is None:
        return None
    means = [acc.rail_mean(n) for n in names]
    return None if any(m is None for m in means) else _r(sum(m for m in means if m is not None))


def energy_mj(mean_w: Optional[float], seconds: float, inferences: int) -> Optional[float]:
    """mJ per inference from a mean power over `seconds` and the inferences in it (None if unknown)."""
    if mean_w is None or inferences <= 0 or seconds <= 0:
        return None
    return mean_w * seconds / inferences * 1000.0


def power_summary(reader: Optional[PowerReader], sampler: PowerSampler, wall_s: float, inferences: int,
                  idle_s: float) -> Dict[str, Any]:
    """The ``power`` part of the benchmark document: idle W before the window, mean W during it,
    mJ per inference (total and above idle), per rail; or why there is none (never zeros)."""
    if reader is None or not reader.available:
        return reader.describe() if reader is not None else {"available": False, "reason": NO_SENSOR_REASON}
    doc: Dict[str, Any] = reader.describe()
    window, idle = sampler.phase("window"), sampler.phase("idle")
    if window is None or window.n == 0:
        return {"available": False, "reason": f"power rails found ({', '.join(reader.rail_names)} via "
                f"{reader.source}) but no reading succeeded during the window"}
    mean_w = window.mean()
    idle_w = idle.mean() if idle is not None and idle.n else None
    per_inf = energy_mj(mean_w, wall_s, inferences)
    above = energy_mj(mean_w - idle_w, wall_s, inferences) if mean_w is not None and idle_w is not None else None
    rails = {}
    for name in reader.rail_names:
        rails[name] = {"idle_w": _r(idle.rail_mean(name)) if idle is not None else None,
                       "mean_w": _r(window.rail_mean(name))}
    compute = None
    if reader.compute:
        compute = {"rails": reader.compute, "idle_w": _rail_sum(idle, reader.compute),
                   "mean_w": _rail_sum(window, reader.compute)}
    doc.update({
        "sample_interval_s": sampler.interval_s,
        "idle_seconds": idle_s,
        "idle_w": _r(idle_w),
        "idle_samples": idle.n if idle is not None else 0,
        "mean_w": _r(mean_w),
        "min_w": _r(window.lo),
        "max_w": _r(window.hi),
        "samples": window.n,
        "failed_reads": sampler.failed_reads,
        "read_ms_mean": _r(sampler.read_s / sampler.reads * 1000.0, 3) if sampler.reads else None,
        "energy_mj_per_inference": _r(per_inf),
        "energy_above_idle_mj_per_inference": _r(above),
        "cpu_gpu": compute,
        "rails": rails,
    })
    return doc


def cpu_summary(cpu_s: float, wall_s: float, cores: Optional[int] = None) -> Dict[str, Any]:
    """The ``cpu`` part of the document: this process's CPU time over the window's wall time."""
    cores = cores or os.cpu_count() or 1
    one = cpu_s / wall_s * 100.0 if wall_s > 0 else None
    return {"percent_of_one_core": _r(one, 1), "percent_of_all_cores": _r(one / cores, 1) if one is not None else None,
            "cores": cores, "cpu_seconds": _r(cpu_s, 3),
            "basis": "process user+system CPU time (os.times, all threads, no children) / window wall time; "
                     "100 = one core busy, all-cores figure divides by os.cpu_count()"}
