"""Bounded statistics for a loop that runs for months: rolling windows, histograms, rates.

Nothing here grows with the number of frames. A `RollingWindow` is a preallocated numpy ring
(its memory is taken once, at construction), a `Histogram` is a fixed list of bucket counters,
and a `RateMeter` keeps the timestamps of the last few seconds in a ring of fixed size. The
real-time loop's summary and the service's `/metrics` are built from these.

`/metrics` speaks the Prometheus text exposition format (version 0.0.4): `# HELP` and `# TYPE`
lines, then samples; histograms as cumulative `_bucket{le="..."}` counters plus `_sum` and
`_count`. `MetricsText` assembles it.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from typing import Callable, Deque, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from .latency import percentiles

# Seconds. Spans a fast accelerator (sub-millisecond handling) to a Pi 4 at 640 px (~300 ms) and
# a stalled step (seconds); Prometheus computes quantiles from these buckets.
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0,
                     2.5, 5.0)
DEFAULT_WINDOW = 4096  # samples kept for percentiles: ~2 min at 30 FPS, 32 KiB per series


class RollingWindow:
    """The last `size` float samples in a preallocated ring; percentiles over what it holds."""

    def __init__(self, size: int = DEFAULT_WINDOW) -> None:
        if size < 1:
            raise ValueError(f"rolling window size {size} must be >= 1")
        self._ring = np.zeros(size, dtype=np.float64)
        self._ring.fill(0.0)  # touch every page now, so the resident size does not creep up later
        self._next = 0
        self.total = 0  # samples ever added (the window holds min(total, size) of them)

    def add(self, value: float) -> None:
        """Append one sample, overwriting the oldest once the ring is full."""
        self._ring[self._next] = value
        self._next = (self._next + 1) % self._ring.shape[0]
        self.total += 1

    def values(self) -> np.ndarray:
        """A copy of the samples held, oldest first."""
        n = min(self.total, self._ring.shape[0])
        if n < self._ring.shape[0]:
            return self._ring[:n].copy()
        return np.concatenate([self._ring[self._next:], self._ring[:self._next]])

    def percentiles_ms(self) -> Dict[str, Optional[float]]:
        """p50/p95/p99/mean/min/max/std in ms of the samples held (seconds in, like `latency.percentiles`)."""
        return percentiles(self.values().tolist())


class Histogram:
    """Cumulative bucket counts with fixed upper bounds (seconds), plus sum and count."""

    def __init__(self, buckets: Sequence[float] = LATENCY_BUCKETS_S) -> None:
        if list(buckets) != sorted(buckets) or not buckets:
            raise ValueError("histogram buckets must be a non-empty ascending list")
        self.bounds = tuple(float(b) for b in buckets)
        self.counts = [0] * (len(self.bounds) + 1)  # last = +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        """Count one observation in the first bucket whose bound is >= value."""
        lo, hi = 0, len(self.bounds)
        while lo < hi:  # bisect by hand: no per-call allocation
            mid = (lo + hi) // 2
            if value <= self.bounds[mid]:
                hi = mid
            else:
                lo = mid + 1
        self.counts[lo] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> List[Tuple[str, int]]:
        """(le label, cumulative count) pairs, ending with +Inf."""
        out, running = [], 0
        for bound, c in zip(self.bounds + (math.inf,), self.counts):
            running += c
            out.append(("+Inf" if bound == math.inf else _fmt(bound), running))
        return out


class RateMeter:
    """Events per second over the last `window_s` seconds (ring of timestamps, fixed size)."""

    def __init__(self, window_s: float = 5.0, max_events: int = 4096,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self.clock = clock
        self._stamps: Deque[float] = deque(maxlen=max_events)

    def mark(self) -> None:
        """Record one event now."""
        self._stamps.append(self.clock())

    def rate(self) -> Optional[float]:
        """Events per second in the window, None before two events."""
        now = self.clock()
        recent = [t for t in self._stamps if now - t <= self.window_s]
        if len(recent) < 2:
            return 0.0 if self._stamps and now - self._stamps[-1] > self.window_s else None
        span = max(now - recent[0], recent[-1] - recent[0])
        return (len(recent) - 1) / span if span > 0 else None


def _fmt(value: float) -> str:
    """A sample value as Prometheus writes it (integers without a trailing .0, NaN for unknown)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "NaN"
    if isinstance(value, bool):
        return "1" if value else "0"
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def _labels(labels: Optional[Dict[str, str]]) -> str:
    if not labels:
        return ""
    escaped = (f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
               for k, v in sorted(labels.items()))
    return "{" + ",".join(escaped) + "}"


class MetricsText:
    """Builds one Prometheus text exposition; each metric family is declared once with HELP/TYPE."""

    def __init__(self, prefix: str = "edge_") -> None:
        self.prefix = prefix
        self._lines: List[str] = []
        self._declared: Dict[str, str] = {}
        self._lock = threading.Lock()

    def _declare(self, name: str, kind: str, help_text: str) -> str:
        full = self.prefix + name
        if full not in self._declared:
            self._declared[full] = kind
            self._lines.append(f"# HELP {full} {help_text}")
            self._lines.append(f"# TYPE {full} {kind}")
        return full

    def sample(self, name: str, kind: str, help_text: str, value: Optional[float],
               labels: Optional[Dict[str, str]] = None) -> None:
        """Add one gauge/counter sample (None is written as NaN: unknown, never a made-up 0)."""
        full = self._declare(name, kind, help_text)
        self._lines.append(f"{full}{_labels(labels)} {_fmt(float('nan') if value is None else value)}")

    def samples(self, name: str, kind: str, help_text: str, values: Iterable[Tuple[Dict[str, str], float]]) -> None:
        """Add one sample per label set of a family (declared even when there are none yet)."""
        self._declare(name, kind, help_text)
        for labels, value in values:
            self.sample(name, kind, help_text, value, labels)

    def histogram(self, name: str, help_text: str, hist: Histogram, labels: Optional[Dict[str, str]] = None) -> None:
        """Add a histogram's buckets, sum and count."""
        full = self._declare(name, "histogram", help_text)
        base = dict(labels or {})
        for le, count in hist.cumulative():
            self._lines.append(f"{full}_bucket{_labels({**base, 'le': le})} {count}")
        self._lines.append(f"{full}_sum{_labels(base)} {_fmt(hist.sum)}")
        self._lines.append(f"{full}_count{_labels(base)} {hist.count}")

    def text(self) -> str:
        """The exposition, newline-terminated."""
        return "\n".join(self._lines) + "\n"
