"""Power and CPU figures of the on-device benchmark (`edge_runtime/power.py`, `latency.py`).

The sensor tests read recorded trees under tests/runtime/data/power/<module>/ (README.md there
says, per tree, where the layout, the rail names and the numbers come from). In short, none was
captured by us from a device:

- orin_nano_jp6/ (JetPack 5/6 ina3221 hwmon, VDD_IN / VDD_CPU_GPU_CV / VDD_SOC at 1-0040):
  layout from https://www.kernel.org/doc/html/latest/hwmon/ina3221.html and NVIDIA's Jetson Linux
  Developer Guide r35.4.1 (https://docs.nvidia.com/jetson/archives/r35.4.1/DeveloperGuide/text/SD/
  PlatformPowerAndPerformance/JetsonOrinNanoSeriesJetsonOrinNxSeriesAndJetsonAgxOrinSeries.html),
  names from https://lore.kernel.org/linux-tegra/20230929102744.84989-5-jonathanh@nvidia.com/;
  numbers reconstructed from the tegrastats powers posted at https://forums.developer.nvidia.com/
  t/jetson-orin-nano-8gb-lowest-theoretical-operating-power-consumption/348662 with an assumed 5 V bus.
- xavier_nx_jp5/ (7-0040/hwmon/hwmon6): path and names from
  https://github.com/alumet-dev/alumet/blob/main/plugins/nvidia-jetson/README.md; numbers invented.
- agx_orin_jp5/ (two INA3221s, no VDD_IN, a disabled channel pair): names from the kernel patch above
  and https://github.com/energymon/energymon/blob/master/jetson/JetsonPowerRails.md, the 1-0041 layout
  from the device dump in https://github.com/alumet-dev/alumet/issues/212; numbers invented.
- nano_jp4/ (JetPack 4 ina3221x IIO, POM_5V_IN / POM_5V_GPU / POM_5V_CPU at 6-0040/iio:device0):
  layout from https://github.com/energymon/energymon/blob/master/jetson/ina3221x.c,
  https://github.com/rbonghi/jetson_stats/blob/master/jtop/core/power.py and
  https://github.com/rbonghi/jetson_stats/issues/131; numbers invented.
- pi5/pmic_read_adc.txt: copied verbatim from https://github.com/jfikar/RPi5-power/blob/
  3261e2961186383f24c67f11827a8910108bc4ff/README.md, shown there as `vcgencmd pmic_read_adc` on a Pi 5.
- no_sensors/: ours (an x86 VM's thermal zone and DMI ids, no INA3221, not a Pi).

Trees whose values must change (the sampler) are copies in tmp; `vcgencmd` is a fake runner.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Optional, Tuple

import numpy as np
import pytest

from edge_runtime.detector import StageTimes
from edge_runtime.latency import BenchError, run_benchmark, summary_line
from edge_runtime.power import (
    NO_SENSOR_REASON,
    PowerReader,
    PowerSampler,
    cpu_summary,
    energy_mj,
    parse_pmic_read_adc,
    power_summary,
)
from edge_runtime.thermal import ThermalReader, is_raspberry_pi
from pipeline.fleet.mlflow_log import _metrics as mlflow_metrics
from pipeline.fleet.results import HostResult, bench_metrics
from pipeline.stages.report import Report, device_rows, plot_tables, render_markdown

DATA = Path(__file__).parent / "data" / "power"
PMIC_TEXT = (DATA / "pi5" / "pmic_read_adc.txt").read_text()


def no_commands(argv: List[str]) -> Optional[str]:
    return None


def pmic_runner(text: str):  # type: ignore[no-untyped-def]
    def run(argv: List[str]) -> Optional[str]:
        return text if argv == ["vcgencmd", "pmic_read_adc"] else None
    return run


def put(path: Path, value: str) -> None:
    """Replace a sysfs value atomically (the sampler thread may be reading it)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(value + "\n")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------- discovery

def test_orin_nano_hwmon_rails() -> None:
    r = PowerReader(DATA / "orin_nano_jp6", runner=no_commands)
    assert r.available and r.source == "jetson-ina3221-hwmon"
    assert r.rail_names == ["VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"]  # in7 "sum of shunt voltages" is no rail
    assert r.total == ["VDD_IN"] and r.scope == "module input rail VDD_IN"
    assert r.compute == ["VDD_CPU_GPU_CV"]
    assert r.read() == pytest.approx({"VDD_IN": 2.18, "VDD_CPU_GPU_CV": 0.37, "VDD_SOC": 0.945})
    assert r.paths == [str(DATA / "orin_nano_jp6/sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon1")]


def test_xavier_nx_hwmon_on_bus_7() -> None:
    r = PowerReader(DATA / "xavier_nx_jp5", runner=no_commands)
    assert r.rail_names == ["VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"] and r.total == ["VDD_IN"]
    assert r.read()["VDD_IN"] == pytest.approx(5.032 * 1.056)
    assert r.paths[0].endswith("ina3221/7-0040/hwmon/hwmon6")


def test_agx_orin_two_monitors_no_input_rail() -> None:
    r = PowerReader(DATA / "agx_orin_jp5", runner=no_commands)
    assert r.rail_names == ["VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0", "VDDQ_VDD2_1V8AO"]
    # VDDQ_VDD2_1V8AO is fed by VIN_SYS_5V0: the total is the three parallel supplies, not all four
    assert r.total == ["VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0"]
    assert r.compute == ["VDD_GPU_SOC", "VDD_CPU_CV"]
    values = r.read()
    assert values is not None and sum(values[n] for n in r.total) == pytest.approx(19.14832)


def test_jetpack4_iio_rails() -> None:
    r = PowerReader(DATA / "nano_jp4", runner=no_commands)
    assert r.available and r.source == "jetson-ina3221x-iio"
    assert r.rail_names == ["POM_5V_IN", "POM_5V_GPU", "POM_5V_CPU"]
    assert r.total == ["POM_5V_IN"] and r.compute == ["POM_5V_GPU", "POM_5V_CPU"]
    assert r.read() == pytest.approx({"POM_5V_IN": 2.039, "POM_5V_GPU": 0.121, "POM_5V_CPU": 0.479})


def test_jetpack4_without_power_node_uses_volts_times_amps(tmp_path: Path) -> None:
    root = tmp_path / "nano"
    shutil.copytree(DATA / "nano_jp4", root)
    (root / "sys/bus/i2c/drivers/ina3221x/6-0040/iio:device0/in_power0_input").unlink()
    r = PowerReader(root, runner=no_commands)
    assert r.read()["POM_5V_IN"] == pytest.approx(5.048 * 0.404)


def test_nc_and_unreadable_channels_are_not_rails(tmp_path: Path) -> None:
    root = tmp_path / "orin"
    shutil.copytree(DATA / "orin_nano_jp6", root)
    hw = root / "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon1"
    put(hw / "in3_label", "NC")  # NVIDIA's kernel labels an unconnected channel "NC"
    (hw / "in2_input").unlink()  # a labelled channel whose reads fail (the real file gives EIO):
    (hw / "in2_input").mkdir()  # reading a directory fails the same way, with an OSError
    r = PowerReader(root, runner=no_commands)
    assert r.rail_names == ["VDD_IN"] and r.compute == []


def test_pi5_pmic_read_adc() -> None:
    rails = parse_pmic_read_adc(PMIC_TEXT)
    assert len(rails) == 12 and "EXT5V" not in rails and "BATT" not in rails  # volts only: not rails
    assert rails["VDD_CORE"] == pytest.approx(0.89745940 * 10.87674)
    r = PowerReader(DATA / "pi5", runner=pmic_runner(PMIC_TEXT))
    assert r.available and r.source == "rpi5-pmic" and r.paths == ["vcgencmd pmic_read_adc"]
    assert sorted(r.total) == sorted(rails) and "PMIC" in r.scope and r.compute == []
    values = r.read()
    assert values is not None and sum(values.values()) == pytest.approx(10.799894447)


def test_no_sensors_says_so() -> None:
    calls: List[List[str]] = []

    def runner(argv: List[str]) -> Optional[str]:
        calls.append(argv)
        return PMIC_TEXT

    r = PowerReader(DATA / "no_sensors", runner=runner)
    assert not r.available and r.read() is None
    assert calls == []  # not a Pi: vcgencmd is not even asked
    assert r.describe() == {"available": False, "reason": NO_SENSOR_REASON}
    # a Pi without the PMIC command (Pi 4, old firmware) has no sensors either
    pi4 = PowerReader(DATA / "pi5", runner=lambda argv: 'error=1 error_msg="Command not registered"')
    assert not pi4.available and pi4.describe()["reason"] == NO_SENSOR_REASON
    assert "pmic_read_adc" in pi4.describe()["detail"]
    sampler = PowerSampler(r, 0.01)
    assert power_summary(r, sampler, 1.0, 10, 2.0) == {"available": False, "reason": NO_SENSOR_REASON}


def test_parse_pmic_ignores_other_text() -> None:
    assert parse_pmic_read_adc(None) == {} and parse_pmic_read_adc("temp=48.3'C\nthrottled=0x0") == {}


# --------------------------------------------------------------------------------------- sampling

def test_sampler_idle_then_window_with_changing_values(tmp_path: Path) -> None:
    root = tmp_path / "orin"
    shutil.copytree(DATA / "orin_nano_jp6", root)
    curr = root / "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon1/curr1_input"
    reader = PowerReader(root, runner=no_commands)
    sampler = PowerSampler(reader, interval_s=0.005).start()
    sampler.begin("idle")
    time.sleep(0.1)
    sampler.begin(None)
    put(curr, "1000")  # VDD_IN 5.000 V x 1.000 A under load
    sampler.begin("window")
    time.sleep(0.15)
    sampler.stop()
    idle, window = sampler.phase("idle"), sampler.phase("window")
    assert idle is not None and window is not None and idle.n >= 3 and window.n >= 5
    assert idle.mean() == pytest.approx(2.18) and window.mean() == pytest.approx(5.0)
    assert all(not isinstance(getattr(window, s), list) for s in window.__slots__)  # running sums only
    doc = power_summary(reader, sampler, wall_s=1.0, inferences=10, idle_s=0.1)
    assert doc["available"] and doc["source"] == "jetson-ina3221-hwmon" and doc["total_rails"] == ["VDD_IN"]
    assert doc["idle_w"] == pytest.approx(2.18) and doc["mean_w"] == pytest.approx(5.0)
    assert doc["energy_mj_per_inference"] == pytest.approx(500.0)  # 5 W x 1 s / 10 inferences
    assert doc["energy_above_idle_mj_per_inference"] == pytest.approx(282.0)  # (5 - 2.18) W x 1 s / 10
    assert doc["rails"]["VDD_CPU_GPU_CV"] == {"idle_w": 0.37, "mean_w": 0.37}
    assert doc["cpu_gpu"] == {"rails": ["VDD_CPU_GPU_CV"], "idle_w": 0.37, "mean_w": 0.37}
    assert doc["failed_reads"] == 0 and doc["read_ms_mean"] > 0 and doc["samples"] == window.n


def test_sampler_soak_bins_and_cpu_per_window() -> None:
    """Explicit samples on an injected clock: each soak bin gets its own mean W and CPU %."""
    now, cpu = [100.0], [10.0]
    watts = {"VDD_IN": 2.0}

    class FakeReader(PowerReader):
        def __init__(self) -> None:
            self.source, self.rail_names, self.total, self.compute = "fake", ["VDD_IN"], ["VDD_IN"], []
            self.paths, self.scope = [], "fake"

        def read(self) -> Optional[Dict[str, float]]:
            return dict(watts)

    s = PowerSampler(FakeReader(), interval_s=1.0, clock=lambda: now[0], cpu=lambda: cpu[0])
    s.bins(100.0, 1.0, 2)
    s.begin("window")  # t = 100.0, bin 0
    for t, w, c in ((100.5, 2.0, 10.25), (101.0, 4.0, 10.5), (101.5, 4.0, 11.0), (105.0, 6.0, 12.75)):
        now[0], watts["VDD_IN"], cpu[0] = t, w, c
        s.sample()  # t >= 102 (past the planned end) is filed in the last bin
    bins = s.bin_stats()
    assert [b["mean_w"] for b in bins] == [2.0, pytest.approx(14 / 3, abs=1e-3)]
    assert bins[0]["cpu_percent"] == 50.0 and bins[1]["cpu_percent"] == 56.2  # 2.25 s CPU over 4 s


def test_failed_reads_are_not_zero_watts() -> None:
    class Flaky(PowerReader):
        def __init__(self) -> None:
            self.source, self.rail_names, self.total, self.compute = "fake", ["VDD_IN", "VDD_SOC"], ["VDD_IN"], []
            self.paths, self.scope, self.n = [], "fake", 0

        def read(self) -> Optional[Dict[str, float]]:
            self.n += 1
            return {"VDD_IN": 3.0, "VDD_SOC": 1.0} if self.n % 2 else {"VDD_SOC": 1.0}  # total rail missing

    reader = Flaky()
    s = PowerSampler(reader, interval_s=1.0)
    s.begin("window")
    for _ in range(5):
        s.sample()
    doc = power_summary(reader, s, 1.0, 1, 0.0)
    assert doc["mean_w"] == 3.0 and doc["samples"] == 3 and doc["failed_reads"] == 3 and doc["idle_w"] is None
    assert doc["energy_above_idle_mj_per_inference"] is None  # no idle phase: unknown, not 0
    dead = Flaky()
    dead.read = lambda: None  # type: ignore[method-assign]
    s2 = PowerSampler(dead, interval_s=1.0)
    s2.begin("window")
    s2.stop()
    out = power_summary(dead, s2, 1.0, 1, 0.0)
    assert out["available"] is False and "no reading succeeded" in out["reason"]


def test_energy_and_cpu_arithmetic() -> None:
    assert energy_mj(4.0, 2.0, 100) == pytest.approx(80.0) and energy_mj(None, 2.0, 100) is None
    assert energy_mj(4.0, 2.0, 0) is None
    c = cpu_summary(cpu_s=3.0, wall_s=2.0, cores=4)
    assert c["percent_of_one_core"] == 150.0 and c["percent_of_all_cores"] == 37.5 and c["cores"] == 4


# ------------------------------------------------------------------------- the benchmark document

class SleepyDetector:
    """Stands in for a model: 2 ms of 'inference' per frame (busy, so the CPU % is real)."""

    def detect(self, image: np.ndarray) -> Tuple[list, StageTimes]:
        end = time.perf_counter() + 0.002
        while time.perf_counter() < end:
            pass
        return [], StageTimes(0.0001, 0.0018, 0.0001)


class NappingDetector(SleepyDetector):
    """2 ms asleep per frame: releases the GIL as ONNX Runtime does, so the sampler thread keeps
    its 10 Hz (a pure-Python busy loop would starve it; no real backend holds the GIL that long)."""

    def detect(self, image: np.ndarray) -> Tuple[list, StageTimes]:
        time.sleep(0.002)
        return [], StageTimes(0.0001, 0.0018, 0.0001)


def described(doc: dict) -> dict:
    """A measurement document plus what `benchmark_release` adds, enough for `summary_line`."""
    return {**doc, "release": "r1", "variant": "64", "backend": "onnxruntime", "precision": "fp32"}


def test_run_benchmark_on_recorded_orin(tmp_path: Path) -> None:
    thermal = ThermalReader(DATA / "orin_nano_jp6", runner=no_commands)
    image = np.zeros((8, 8, 3), np.uint8)
    doc = run_benchmark(SleepyDetector(), image, warmup=2, iterations=50, thermal=thermal, idle_s=0.2,
                        power_interval_s=0.01)
    pw, cpu = doc["power"], doc["cpu"]
    assert pw["available"] and pw["idle_w"] == 2.18 and pw["mean_w"] == 2.18 and pw["idle_samples"] >= 5
    assert pw["energy_mj_per_inference"] == pytest.approx(2.18 * doc["duration_s"] / 50 * 1000, rel=0.01)
    assert pw["energy_above_idle_mj_per_inference"] == 0.0  # measured equal, not filled in
    assert 50 <= cpu["percent_of_one_core"] <= 150 and cpu["percent_of_all_cores"] <= cpu["percent_of_one_core"]
    assert doc["config"]["idle_seconds"] == 0.2 and doc["config"]["power_interval_s"] == 0.01
    line = summary_line(described(doc))
    assert "power 2.18 W (idle 2.18 W)" in line and "mJ/inference" in line and "% of one core" in line
    json.dumps(doc)


def test_soak_windows_carry_power_and_cpu() -> None:
    thermal = ThermalReader(DATA / "nano_jp4", runner=no_commands)
    doc = run_benchmark(NappingDetector(), np.zeros((8, 8, 3), np.uint8), warmup=0, soak_minutes=0.01,
                        thermal=thermal, sample_interval_s=0.05, idle_s=0.05, power_interval_s=0.002)
    rows = doc["soak"]["windows"]
    assert len(rows) == 10 and all(r["power_mean_w"] == 2.039 for r in rows)
    for r in rows:
        assert r["energy_mj_per_inference"] == pytest.approx(2.039 * doc["soak"]["window_s"] / r["iterations"] * 1000,
                                                             rel=0.02)
        assert r["cpu_percent"] is not None and r["cpu_percent"] >= 0


def test_no_sensors_bench_skips_idle_and_keeps_cpu() -> None:
    thermal = ThermalReader(DATA / "no_sensors", runner=no_commands)
    start = time.monotonic()
    doc = run_benchmark(SleepyDetector(), np.zeros((8, 8, 3), np.uint8), warmup=0, iterations=20, thermal=thermal,
                        idle_s=5.0)
    assert time.monotonic() - start < 4.0  # no sensors: no idle rest to wait for
    assert doc["power"] == {"available": False, "reason": NO_SENSOR_REASON}
    assert doc["cpu"]["percent_of_one_core"] > 0
    assert "power n/a (no sensors)" in summary_line(described(doc))
    soak = run_benchmark(NappingDetector(), np.zeros((8, 8, 3), np.uint8), warmup=0, soak_minutes=0.005,
                         thermal=thermal, idle_s=0.0, power_interval_s=0.002)
    assert all(w["power_mean_w"] is None and w["energy_mj_per_inference"] is None and w["cpu_percent"] is not None
               for w in soak["soak"]["windows"])


@pytest.mark.parametrize("kwargs,message", [({"idle_s": -1.0}, "--idle-seconds"),
                                            ({"power_interval_s": 0.0}, "--power-interval")])
def test_bad_power_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(BenchError, match=message):
        run_benchmark(SleepyDetector(), np.zeros((8, 8, 3), np.uint8), 0, iterations=1, **kwargs)


# ----------------------------------------------------------------------- MLflow metrics and report

def bench_doc(power: dict, cpu: Optional[dict] = None, host: str = "pi-1") -> dict:
    return {"kind": "device-benchmark", "_host": host, "backend": "onnxruntime", "precision": "int8",
            "release": "r1", "created_utc": "2026-12-01T17:00:00Z", "fps": 20.0,
            "latency_ms": {"p50": 40.0, "p95": 45.0, "p99": 50.0}, "thermal": {"max_c": 55.0},
            "power": power, "cpu": cpu or {"percent_of_one_core": 180.5, "percent_of_all_cores": 45.1}}


def test_bench_metrics_and_report_rows_carry_power_or_dash() -> None:
    measured = bench_doc({"available": True, "idle_w": 2.18, "mean_w": 5.0, "energy_mj_per_inference": 250.0,
                          "energy_above_idle_mj_per_inference": 141.0, "cpu_gpu": {"mean_w": 1.5}}, host="orin-1")
    none = bench_doc({"available": False, "reason": NO_SENSOR_REASON})
    m = bench_metrics(measured)
    assert m["power_idle_w"] == 2.18 and m["power_mean_w"] == 5.0 and m["energy_mj_per_inference"] == 250.0
    assert m["energy_above_idle_mj_per_inference"] == 141.0 and m["power_cpu_gpu_mean_w"] == 1.5
    assert m["cpu_percent"] == 180.5 and m["cpu_percent_all_cores"] == 45.1
    n = bench_metrics(none)
    assert not any(k.startswith(("power_", "energy_")) for k in n)  # absent, never 0
    assert n["bench.power.available"] == 0.0 and n["cpu_percent"] == 180.5
    # what the fleet logs to the device's MLflow run (pipeline/fleet/mlflow_log.py)
    logged = mlflow_metrics(HostResult("orin-1", "jetsons", bench=measured))
    assert logged["power_mean_w"] == 5.0 and logged["energy_mj_per_inference"] == 250.0
    assert logged["cpu_percent"] == 180.5
    assert "power_mean_w" not in mlflow_metrics(HostResult("pi-1", "pis", bench=none))
    rows = device_rows([measured, none], {})
    assert rows[0]["power_mean_w"] == 5.0 and rows[1]["power_mean_w"] is None and rows[1]["cpu_percent"] == 180.5
    report = Report(imgsz="64", winner="", variants=[], devices=rows, thermal=[], shadows=[], quantiles={},
                    per_class={}, candidates=[], summary={})
    md = render_markdown(report, SimpleNamespace(split="val"), SimpleNamespace(max_map_drop=0.01), "plots")
    assert "| idle W | mean W | mJ / inference | CPU % |" in md
    orin = next(line for line in md.splitlines() if line.startswith("| orin-1 |"))
    pi = next(line for line in md.splitlines() if line.startswith("| pi-1 |"))
    assert "| 2.18 | 5.00 | 250.0 | 180.5 |" in orin and "| – | – | – | 180.5 |" in pi
    csv_lines = plot_tables(report)["devices.csv"].splitlines()
    assert csv_lines[0].endswith("power_idle_w,power_mean_w,energy_mj_per_inference,cpu_percent")
    assert csv_lines[1].endswith(",2.18,5.0,250.0,180.5") and csv_lines[2].endswith(",,,,180.5")


# ------------------------------------------------------------- `python -m edge_runtime bench` for real

def bench_cli(runtime: Path, release: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_runtime", "bench", "--release", str(release), "--out", str(out),
                           "--warmup", "2", "--iterations", "20", *extra], cwd=runtime, capture_output=True,
                          text=True, timeout=300, env={"PATH": "/usr/bin:/bin", "HOME": str(runtime)})


def test_bench_cli_on_this_machine(runtime: Path, release: Path, tmp_path: Path) -> None:
    """This machine has no power sensors: the document says so, and still has the CPU %."""
    if glob.glob("/sys/bus/i2c/drivers/ina3221*/*-*") or is_raspberry_pi("/"):
        pytest.skip("this machine may have power sensors (an INA3221 driver, or a Pi)")
    out = tmp_path / "bench.json"
    p = bench_cli(runtime, release, out)
    assert p.returncode == 0, p.stderr
    doc = json.loads(out.read_text())
    assert doc["power"] == {"available": False, "reason": NO_SENSOR_REASON}
    assert doc["cpu"]["percent_of_one_core"] > 0 and doc["cpu"]["cores"] == os.cpu_count()
    assert "power n/a (no sensors)" in p.stdout
    m = bench_metrics(doc)
    assert "power_mean_w" not in m and m["cpu_percent"] == doc["cpu"]["percent_of_one_core"]


def test_bench_cli_reads_a_recorded_jetson_tree(runtime: Path, release: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    p = bench_cli(runtime, release, out, "--thermal-root", str(DATA / "orin_nano_jp6"))
    assert p.returncode == 0, p.stderr
    pw = json.loads(out.read_text())["power"]
    assert pw["available"] and pw["rails"].keys() == {"VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"}
    assert pw["idle_w"] == 2.18 and pw["mean_w"] == 2.18 and pw["idle_seconds"] == 2.0
    assert pw["energy_mj_per_inference"] > 0 and "power 2.18 W (idle 2.18 W)" in p.stdout
