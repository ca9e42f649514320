"""Real-time loop: slot-of-one semantics, frames dropped (not queued), sources, and deterministic
thermal-adaptive switching (fake temperature readers and a simulated sensor file in a fake /sys).

The model and the loop are real. Where a test needs a deterministic interleaving of the threads
it wraps the real detector or source with an Event gate -- the cameras and sensors that would
otherwise set the pace cannot exist here.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import cv2
import numpy as np
import pytest

from edge_runtime.backends import OrtBackend
from edge_runtime.detector import Detector
from edge_runtime.manifest import OrtSettings
from edge_runtime.postprocess import HeadSpec
from edge_runtime.realtime import (
    FrameSource,
    ImageFolderSource,
    LatestSlot,
    RealtimeLoop,
    Result,
    SourceError,
    SyntheticSource,
    ThermalGovernor,
    UnboundedQueue,
    open_source,
)
from edge_runtime.thermal import ThermalReader


def test_latest_slot_replaces_and_counts_drops() -> None:
    slot: LatestSlot[int] = LatestSlot()
    assert slot.put(1) is False and slot.put(2) is True and slot.put(3) is True
    assert slot.dropped == 2 and len(slot) == 1
    assert slot.get() == 3 and slot.get(timeout=0.01) is None
    slot.put(4)
    slot.close()
    assert slot.get() == 4  # a closed slot still hands out the last frame
    assert slot.get() is None
    q: UnboundedQueue[int] = UnboundedQueue()
    for i in range(5):
        q.put(i)
    assert q.dropped == 0 and q.max_depth == 5 and q.get() == 0


def test_latest_slot_under_threads_consumer_sees_increasing_fresh_items() -> None:
    slot: LatestSlot[int] = LatestSlot()
    seen: List[int] = []

    def consume() -> None:
        while True:
            item = slot.get()
            if item is None:
                return
            seen.append(item)

    t = threading.Thread(target=consume)
    t.start()
    for i in range(2000):
        slot.put(i)
    slot.close()
    t.join()
    assert seen == sorted(set(seen)) and seen[-1] == 1999
    assert len(seen) + slot.dropped == 2000


@pytest.fixture
def detector(tiny_model: Dict[str, Path]) -> Detector:
    backend = OrtBackend(tiny_model["onnx"], OrtSettings(threads=1))
    backend.load()
    return Detector(backend, HeadSpec("yolov8-raw", 6, 64), 0.25, 0.45, 100)


class GatedDetector(Detector):
    """The real detector, but its first detect() waits until the source is exhausted."""

    def __init__(self, inner: Detector, gate: threading.Event) -> None:
        super().__init__(inner.backend, inner.spec, inner.conf, inner.iou, inner.max_det)
        self.gate = gate

    def detect(self, image: np.ndarray):  # type: ignore[no-untyped-def]
        self.gate.wait(10)
        return super().detect(image)


class NotifyingSource(FrameSource):
    """Synthetic frames as fast as possible; sets `done` when exhausted."""

    def __init__(self, n: int, done: threading.Event) -> None:
        self.inner = SyntheticSource(64, 48, fps=None, max_frames=n)
        self.done = done
        self.description = "gated"

    def read(self) -> Optional[np.ndarray]:
        frame = self.inner.read()
        if frame is None:
            self.done.set()
        return frame


def test_loop_drops_stale_frames_instead_of_queueing(detector: Detector) -> None:
    done = threading.Event()
    handled: List[int] = []
    loop = RealtimeLoop({"64": GatedDetector(detector, done)}, NotifyingSource(50, done),
                        [lambda r: handled.append(r.frame.index)])
    s = loop.run()
    # Inference may or may not have grabbed a first frame before the gate closed; after the gate
    # opens it only ever sees the freshest frame, 49. Everything else was dropped, not queued.
    assert s["frames_captured"] == 50
    assert s["frames_inferred"] in (1, 2) and s["frames_dropped"] == 50 - s["frames_inferred"]
    assert handled[-1] == 49 and s["frames_handled"] == len(handled) and s["max_queue_depth"] == 1
    for key in ("capture_to_ready", "ready_to_inference_done", "inference_to_handled", "end_to_end"):
        assert s["slices_ms"][key]["p50"] is not None
    assert s["frame_age_ms"]["max"] is not None

    done = threading.Event()
    naive = RealtimeLoop({"64": GatedDetector(detector, done)}, NotifyingSource(50, done),
                         slot_factory=UnboundedQueue)
    s = naive.run()
    assert s["frames_inferred"] == 50 and s["frames_dropped"] == 0 and s["max_queue_depth"] >= 49


def test_loop_handlers_get_every_result_in_order(detector: Detector) -> None:
    got: List[Result] = []
    s = RealtimeLoop({"64": detector}, SyntheticSource(96, 64, fps=200, max_frames=15), [got.append]).run()
    assert s["frames_handled"] == len(got) > 0
    assert [r.frame.index for r in got] == sorted(r.frame.index for r in got)
    assert all(r.variant == "64" and r.age_s >= 0 for r in got)


def test_loop_surfaces_thread_errors(detector: Detector) -> None:
    def boom(r: Result) -> None:
        raise RuntimeError("actuator failed")

    with pytest.raises(RuntimeError, match="actuator failed"):
        RealtimeLoop({"64": detector}, SyntheticSource(64, 48, fps=None, max_frames=5), [boom]).run()


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_governor_hysteresis_and_dwell() -> None:
    temps: Iterator[Optional[float]] = iter([79.0, 80.0, 75.0, 85.0, 85.0, 69.0, 72.0, 70.0, None])
    reads: List[int] = []

    def read() -> Optional[float]:
        reads.append(1)
        return next(temps)

    clock = FakeClock()
    g = ThermalGovernor(["416", "320", "256"], throttle_c=80.0, resume_c=70.0, read_temp=read,
                        check_interval_s=1.0, min_dwell_s=5.0, clock=clock)
    expected = ["416", "320", "320", "320", "256", "320", "320", "416", "416"]
    times = [0, 1, 2, 3, 6, 11, 12, 17, 18]
    for t, want in zip(times, expected):
        clock.t = t
        g.update()
        assert g.current == want, (t, g.switches)
        clock.t = t + 0.5
        assert g.update() is None  # within the check interval: no sensor read
    assert len(reads) == len(times)
    assert [(s["from"], s["to"]) for s in g.switches] == [("416", "320"), ("320", "256"), ("256", "320"),
                                                         ("320", "416")]
    assert g.switches[0]["temp_c"] == 80.0 and "throttle" in g.switches[0]["reason"]
    with pytest.raises(ValueError, match="hysteresis"):
        ThermalGovernor(["a"], 70.0, 70.0, read)


class LockstepSource(FrameSource):
    """Frame i is produced only after frame i-1 was handled, and it first writes the simulated
    CPU sensor file with temps[i] (what a heating device would do)."""

    def __init__(self, temps: List[int], sensor: Path, handled: threading.Event) -> None:
        self.temps, self.sensor, self.handled, self.i = temps, sensor, handled, 0
        self.description = "lockstep"

    def read(self) -> Optional[np.ndarray]:
        if self.i >= len(self.temps):
            return None
        if self.i > 0 and not self.handled.wait(10):
            return None
        self.handled.clear()
        self.sensor.write_text(f"{self.temps[self.i] * 1000}\n")
        self.i += 1
        return np.full((48, 64, 3), 100, np.uint8)


def test_thermal_switching_from_simulated_sensor_file(detector: Detector, tmp_path: Path) -> None:
    zone = tmp_path / "sys/class/thermal/thermal_zone0"
    zone.mkdir(parents=True)
    (zone / "type").write_text("cpu-thermal\n")
    handled = threading.Event()
    temps = [50] * 5 + [90] * 8 + [40] * 7
    reader = ThermalReader(tmp_path, runner=lambda argv: None)
    governor = ThermalGovernor(["big", "small"], 80.0, 70.0, reader.cpu_temperature, check_interval_s=0.0,
                               min_dwell_s=0.0)
    variants: List[str] = []

    def on_result(r: Result) -> None:
        variants.append(r.variant)
        handled.set()

    s = RealtimeLoop({"big": detector, "small": detector}, LockstepSource(temps, zone / "temp", handled),
                     [on_result], governor).run()
    assert variants == ["big"] * 5 + ["small"] * 8 + ["big"] * 7
    assert s["variant_frames"] == {"big": 12, "small": 8} and s["frames_dropped"] == 0
    assert [(x["from"], x["to"], x["temp_c"]) for x in s["thermal_switches"]] == [("big", "small", 90.0),
                                                                                  ("small", "big", 40.0)]


def test_sources(tmp_path: Path) -> None:
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(3):
        cv2.imwrite(str(folder / f"{i:03d}.png"), np.full((20, 30, 3), i * 50, np.uint8))
    (folder / "notes.txt").write_text("not an image")
    src = open_source(str(folder))
    assert isinstance(src, ImageFolderSource)
    frames = [src.read() for _ in range(4)]
    assert [f is not None for f in frames] == [True, True, True, False] and int(frames[2][0, 0, 0]) == 100
    # The service (reconnect) replays a folder: a recorded line feeds it for as long as it runs.
    looped = open_source(str(folder), reconnect=True, max_frames=7)
    values = [int(f[0, 0, 0]) if (f := looped.read()) is not None else None for _ in range(8)]
    assert values == [0, 50, 100, 0, 50, 100, 0, None] and "looped" in looped.description
    (folder / "000.png").write_bytes(b"junk")
    (folder / "001.png").write_bytes(b"junk")
    (folder / "002.png").write_bytes(b"junk")
    assert open_source(str(folder), reconnect=True).read() is None  # nothing readable: ends, never spins

    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (32, 24))
    for i in range(5):
        writer.write(np.full((24, 32, 3), i * 40, np.uint8))
    writer.release()
    src = open_source(str(video), max_frames=4)
    n = 0
    while src.read() is not None:
        n += 1
    src.close()
    assert n == 4

    synth = open_source("synthetic:80x60", fps=None, max_frames=2)
    first = synth.read()
    assert first is not None and first.shape == (60, 80, 3)
    assert synth.read() is not None and synth.read() is None
    with pytest.raises(SourceError, match="synthetic:WIDTHxHEIGHT"):
        open_source("synthetic:big")
    with pytest.raises(SourceError, match="not a camera index, folder, video file"):
        open_source(str(tmp_path / "nope"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SourceError, match="has no images"):
        open_source(str(empty))
