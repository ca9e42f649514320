"""Per-host results of a fleet command, the summary table, and benchmark-JSON metric extraction."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

from pipeline.tracking.flatten import numeric_leaves


@dataclass
class HostResult:
    """What happened on one host. Steps fill it in as they go; failures land in `error`."""

    host: str
    group: str
    outcome: str = "pending"  # deployed | unchanged | failed | dry-run | rolled-back | ok ...
    error: str = ""
    failed_step: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    release: str = ""
    previous: str = ""
    runtime: str = ""
    bytes_sent: int = 0
    model_bytes_sent: int = 0
    files_sent: list[str] = field(default_factory=list)
    files_linked: list[str] = field(default_factory=list)
    engine: dict[str, Any] = field(default_factory=dict)
    health: dict[str, Any] = field(default_factory=dict)
    bench: dict[str, Any] = field(default_factory=dict)
    bench_path: str = ""
    details: dict[str, Any] = field(default_factory=dict)  # command-specific (status, frames...)

    @property
    def ok(self) -> bool:
        """True unless the host failed."""
        return self.outcome != "failed" and not self.error

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Time a step; if it raises, record which step failed (the runner records the error)."""
        start = time.perf_counter()
        try:
            yield
        except BaseException:
            self.failed_step = self.failed_step or name
            raise
        finally:
            self.timings[name] = round(time.perf_counter() - start, 3)

    @contextmanager
    def failing_as(self, name: str) -> Iterator[None]:
        """Attribute a failure to step `name` without timing it here (the device timed it)."""
        try:
            yield
        except BaseException:
            self.failed_step = self.failed_step or name
            raise


class FleetError(RuntimeError):
    """One or more hosts failed; `results` holds every host's result, good and bad."""

    def __init__(self, command: str, results: Sequence[HostResult]) -> None:
        self.results = list(results)
        failed = [r for r in results if not r.ok]
        lines = [f"  {r.host}: {r.failed_step + ': ' if r.failed_step else ''}{r.error}" for r in failed]
        super().__init__(f"{command}: {len(failed)} of {len(results)} host(s) failed\n" + "\n".join(lines))


def raise_for_failures(command: str, results: Sequence[HostResult]) -> None:
    """Raise FleetError (carrying all results) if any host failed."""
    if any(not r.ok for r in results):
        raise FleetError(command, results)


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f}"


def format_table(command: str, results: Sequence[HostResult], wall_s: float | None = None) -> str:
    """A plain-text table: one row per host with outcome, release, bytes moved and step timings."""
    headers = ["host", "group", "outcome", "release", "sent MB", "model MB", "steps (s)", "error"]
    rows = []
    for r in results:
        steps = " ".join(f"{k}={v:.2f}" for k, v in r.timings.items())
        error = (f"[{r.failed_step}] " if r.failed_step else "") + r.error
        rows.append([r.host, r.group, r.outcome, r.release or "-", _mb(r.bytes_sent), _mb(r.model_bytes_sent),
                     steps, error[:160]])
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths[:-1]) + "  {}"
    out = [fmt.format(*headers), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*row) for row in rows]
    ok = sum(r.ok for r in results)
    tail = f"{command}: {ok}/{len(results)} host(s) ok"
    if wall_s is not None:
        tail += f" in {wall_s:.1f} s"
    return "\n".join(out + [tail])


# Headline metric -> its key in the device's bench JSON (runtime/edge_runtime/latency.py, flattened).
HEADLINE_KEYS: dict[str, str] = {
    "latency_p50_ms": "latency_ms.p50",
    "latency_p95_ms": "latency_ms.p95",
    "latency_p99_ms": "latency_ms.p99",
    "fps": "fps",
    "peak_rss_mb": "peak_rss_mb",
    "temp_start_c": "thermal.start_c",
    "temp_max_c": "thermal.max_c",
    # Power (runtime/edge_runtime/power.py): absent, not zero, where the device has no sensors.
    "power_idle_w": "power.idle_w",
    "power_mean_w": "power.mean_w",
    "power_cpu_gpu_mean_w": "power.cpu_gpu.mean_w",
    "energy_mj_per_inference": "power.energy_mj_per_inference",
    "energy_above_idle_mj_per_inference": "power.energy_above_idle_mj_per_inference",
    # The bench process's CPU time over the window's wall time: 100 = one core busy.
    "cpu_percent": "cpu.percent_of_one_core",
    "cpu_percent_all_cores": "cpu.percent_of_all_cores",
}


def bench_metrics(doc: Mapping[str, Any]) -> dict[str, float]:
    """Headline metrics (p50/p95/p99 ms, fps, rss, temperatures, throttled, idle/mean W, mJ per
    inference, CPU %) plus every numeric leaf.

    Leaves are prefixed `bench.` so the headline names stay the ones compared across devices.
    """
    flat = numeric_leaves({k: v for k, v in doc.items() if k not in ("device",)})
    out = {f"bench.{k}": v for k, v in flat.items()}
    for name, key in HEADLINE_KEYS.items():
        if key in flat:  # absent when the device cannot measure it (no thermal zone, say)
            out[name] = flat[key]
    # Throttling: any firmware flag set at the start or end (Pi), else capped clocks (any Linux).
    thermal = doc.get("thermal") if isinstance(doc.get("thermal"), Mapping) else {}
    flags = [v for snap in ("start", "end") for k, v in ((thermal.get(snap) or {}).get("throttled") or {}).items()
             if isinstance(v, bool)]
    if flags:
        out["throttled"] = float(any(flags))
    elif isinstance((thermal.get("end") or {}).get("freq_ratio"), (int, float)):
        out["throttled"] = float(thermal["end"]["freq_ratio"] < 0.95)
    return out
