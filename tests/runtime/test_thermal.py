"""Thermal readers against fake /sys trees (a Pi's or Jetson's sensors cannot exist here, so the
files are built in tmp; `vcgencmd` / `nvpmodel` are replaced by a fake command runner)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, List, Optional

from edge_runtime.thermal import (
    ThermalReader,
    ThermalSampler,
    cpu_zone_temperature,
    cpufreq,
    decode_throttled,
    nvpmodel,
    parse_throttled,
    parse_vcgencmd_temp,
    thermal_zones,
)


def write(root: Path, rel: str, text: str) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


def fake_runner(outputs: Dict[str, Optional[str]]):  # type: ignore[no-untyped-def]
    calls: List[List[str]] = []

    def run(argv: List[str]) -> Optional[str]:
        calls.append(argv)
        return outputs.get(" ".join(argv))
    run.calls = calls  # type: ignore[attr-defined]
    return run


def test_thermal_zones_and_cpu_pick(tmp_path: Path) -> None:
    write(tmp_path, "sys/class/thermal/thermal_zone0/type", "GPU-therm\n")
    write(tmp_path, "sys/class/thermal/thermal_zone0/temp", "61500\n")
    write(tmp_path, "sys/class/thermal/thermal_zone1/type", "CPU-therm\n")
    write(tmp_path, "sys/class/thermal/thermal_zone1/temp", "55250\n")
    write(tmp_path, "sys/class/thermal/thermal_zone10/type", "CPU-therm\n")
    write(tmp_path, "sys/class/thermal/thermal_zone10/temp", "54000\n")
    write(tmp_path, "sys/class/thermal/thermal_zone2/type", "broken\n")
    write(tmp_path, "sys/class/thermal/thermal_zone2/temp", "n/a\n")
    zones = thermal_zones(tmp_path)
    assert zones == {"GPU-therm": 61.5, "CPU-therm": 55.25, "CPU-therm#2": 54.0}
    assert cpu_zone_temperature(zones) == 55.25
    assert cpu_zone_temperature({"acpitz": 40.0, "iwlwifi": 45.0}) == 45.0  # no CPU zone: hottest
    assert cpu_zone_temperature({}) is None
    assert thermal_zones(tmp_path / "nothing") == {}


def test_cpufreq(tmp_path: Path) -> None:
    write(tmp_path, "sys/devices/system/cpu/cpu0/cpufreq/scaling_cur_freq", "600000")
    write(tmp_path, "sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq", "1800000")
    write(tmp_path, "sys/devices/system/cpu/cpu1/cpufreq/scaling_cur_freq", "1800000")
    write(tmp_path, "sys/devices/system/cpu/cpu1/cpufreq/cpuinfo_max_freq", "1800000")
    (tmp_path / "sys/devices/system/cpu/cpufreq").mkdir()  # the policy dir is not a CPU
    assert cpufreq(tmp_path) == {"cpu0": {"cur_mhz": 600.0, "max_mhz": 1800.0},
                                 "cpu1": {"cur_mhz": 1800.0, "max_mhz": 1800.0}}
    assert ThermalReader(tmp_path, fake_runner({})).snapshot().freq_ratio() == 0.333


def test_raspberry_pi_vcgencmd(tmp_path: Path) -> None:
    write(tmp_path, "proc/device-tree/model", "Raspberry Pi 4 Model B Rev 1.4\x00")
    run = fake_runner({"vcgencmd measure_temp": "temp=71.2'C\n", "vcgencmd get_throttled": "throttled=0x50005\n"})
    reader = ThermalReader(tmp_path, run)
    assert reader.pi and not reader.jetson
    assert reader.cpu_temperature() == 71.2  # no sysfs zone in this tree: falls back to vcgencmd
    flags = reader.throttled()
    assert flags is not None and flags["raw"] == "0x50005"
    assert flags["under_voltage_now"] and flags["throttled_now"] and not flags["freq_capped_now"]
    assert flags["under_voltage_occurred"] and flags["throttled_occurred"] and not flags["soft_temp_limit_occurred"]
    snap = reader.snapshot().to_json()
    assert snap["cpu_c"] == 71.2 and snap["throttled"]["raw"] == "0x50005" and snap["nvpmodel"] is None
    # With a readable zone the cheap sysfs read wins over a subprocess.
    write(tmp_path, "sys/class/thermal/thermal_zone0/type", "cpu-thermal")
    write(tmp_path, "sys/class/thermal/thermal_zone0/temp", "48312")
    run.calls.clear()  # type: ignore[attr-defined]
    assert reader.cpu_temperature() == 48.312 and run.calls == []  # type: ignore[attr-defined]


def test_parsers() -> None:
    assert parse_vcgencmd_temp("temp=48.3'C") == 48.3
    assert parse_vcgencmd_temp(None) is None and parse_vcgencmd_temp("garbage") is None
    assert parse_throttled("throttled=0x0") == 0 and parse_throttled("throttled=0x80008") == 0x80008
    assert parse_throttled("") is None
    assert decode_throttled(0) == {**{k: False for k in decode_throttled(0) if k != "raw"}, "raw": "0x0"}
    assert decode_throttled(1 << 19)["soft_temp_limit_occurred"]


def test_jetson_nvpmodel(tmp_path: Path) -> None:
    write(tmp_path, "etc/nv_tegra_release", "# R35 (release), REVISION: 4.1, GCID: 33958178\n")
    write(tmp_path, "sys/class/thermal/thermal_zone0/type", "CPU-therm")
    write(tmp_path, "sys/class/thermal/thermal_zone0/temp", "50500")
    run = fake_runner({"nvpmodel -q": "NV Fan Mode:quiet\nNV Power Mode: 15W\n2\n"})
    reader = ThermalReader(tmp_path, run)
    assert reader.jetson and reader.throttled() is None
    assert reader.snapshot().nvpmodel == {"mode": "15W", "mode_id": 2, "source": "nvpmodel"}
    write(tmp_path, "var/lib/nvpmodel/status", "pmode:0000 fmode:quiet")
    assert nvpmodel(tmp_path, run) == {"mode_id": 0, "source": "status"}
    assert nvpmodel(tmp_path / "x", fake_runner({})) is None


def test_sampler_records_start_end_max(tmp_path: Path) -> None:
    temps = iter([50.0, 52.0, 58.0, 55.0] + [54.0] * 1000)
    sampler = ThermalSampler(lambda: next(temps), interval_s=0.001).start()
    deadline = time.monotonic() + 5
    while len(sampler.samples) < 4 and time.monotonic() < deadline:
        time.sleep(0.005)
    sampler.stop()
    s = sampler.summary()
    assert s["start_c"] == 50.0 and s["max_c"] == 58.0 and s["end_c"] == 54.0 and s["samples"] >= 5
    empty = ThermalSampler(lambda: None, interval_s=0.01).start()
    empty.stop()
    assert empty.summary() == {"start_c": None, "end_c": None, "max_c": None, "mean_c": None, "samples": 0}
