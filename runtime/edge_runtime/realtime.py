"""The real-time loop: capture -> (preprocess + infer) -> result handling, on three threads.

The threads are joined by `LatestSlot`s of size one: a new frame REPLACES a frame inference has
not picked up yet (counted as dropped), so inference always works on the freshest frame and the
delay between the scene and the decision stays bounded by about one frame interval plus one
inference -- a FIFO queue would instead grow without bound whenever the camera outruns the model
(see benchmarks/realtime.py). The same holds between inference and the result handler: an
actuator should act on the latest state of the line, not on a backlog.

Per frame it measures three slices: capture -> frame ready, frame ready -> inference done,
inference done -> result handled, and the frame's age when inference starts on it.

Thermal-adaptive mode: with several variants shipped (first = preferred, later = cheaper), the
`ThermalGovernor` steps down one variant when the CPU reaches `thermal.throttle_c` and back up
when it has cooled to `thermal.resume_c` (hysteresis: between the two nothing changes), at most
once per dwell time; every switch is logged and listed in the run summary.
"""

from __future__ import annotations

import importlib
import json
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Deque, Dict, Generic, List, Optional, Sequence, TextIO, TypeVar

import cv2
import numpy as np

from .detector import Detector, StageTimes
from .fileio import atomic_write_bytes
from .metrics import DEFAULT_WINDOW, Histogram, RateMeter, RollingWindow
from .postprocess import Detections
from .throttled_log import ThrottledWarning

log = logging.getLogger("edge_runtime.realtime")
T = TypeVar("T")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


class SourceError(ValueError):
    """A --source spec that cannot be opened."""


# --------------------------------------------------------------------------- hand-over between threads

class LatestSlot(Generic[T]):
    """A hand-over of capacity one: `put` replaces an unconsumed item (and counts it as dropped)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._item: Optional[T] = None
        self._has = False
        self._closed = False
        self.dropped = 0
        self.put_count = 0

    def put(self, item: T) -> bool:
        """Offer `item`; returns True when it replaced a stale, never-consumed item."""
        with self._cond:
            replaced = self._has
            if replaced:
                self.dropped += 1
            self._item, self._has = item, True
            self.put_count += 1
            self._cond.notify()
            return replaced

    def get(self, timeout: Optional[float] = None) -> Optional[T]:
        """Take the freshest item, waiting for one; None once closed and empty (or on timeout)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._has or self._closed, timeout):
                return None
            if not self._has:
                return None
            item, self._item, self._has = self._item, None, False
            return item

    def close(self) -> None:
        """No more puts: wake the consumer; it still gets the last item if one is waiting."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def discard(self) -> int:
        """Drop a waiting item (on an early stop); returns how many were dropped (0 or 1)."""
        with self._cond:
            if self._has:
                self._item, self._has = None, False
                self.dropped += 1
                return 1
            return 0

    def __len__(self) -> int:
        with self._cond:
            return int(self._has)


class UnboundedQueue(Generic[T]):
    """The naive alternative (a FIFO that never drops), same interface; for benchmarks only."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._items: Deque[T] = deque()
        self._closed = False
        self.dropped = 0
        self.put_count = 0
        self.max_depth = 0

    def put(self, item: T) -> bool:
        """Append; never replaces."""
        with self._cond:
            self._items.append(item)
            self.put_count += 1
            self.max_depth = max(self.max_depth, len(self._items))
            self._cond.notify()
            return False

    def get(self, timeout: Optional[float] = None) -> Optional[T]:
        """Oldest item first; None once closed and empty."""
        with self._cond:
            if not self._cond.wait_for(lambda: bool(self._items) or self._closed, timeout):
                return None
            return self._items.popleft() if self._items else None

    def close(self) -> None:
        """No more puts."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def discard(self) -> int:
        """Drop everything still queued."""
        with self._cond:
            n = len(self._items)
            self._items.clear()
            self.dropped += n
            return n

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)


# --------------------------------------------------------------------------- sources

class FrameSource:
    """Something that yields BGR frames: `read()` -> image or None at the end."""

    description = "source"

    def wait_next(self) -> None:
        """Block until the next frame is due (paced sources); the capture slice starts after this."""

    def read(self) -> Optional[np.ndarray]:
        """The next frame, or None when the source is exhausted."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the device/file."""


class _Pacer:
    """Holds a source to a frame rate on an absolute schedule (no drift from sleep overshoot)."""

    def __init__(self, fps: Optional[float]) -> None:
        self.interval = 1.0 / fps if fps else 0.0
        self.next_t: Optional[float] = None

    def wait(self) -> None:
        if not self.interval:
            return
        now = time.perf_counter()
        if self.next_t is None:
            self.next_t = now
        elif now < self.next_t:
            time.sleep(self.next_t - now)
        else:
            self.next_t = max(self.next_t, now - self.interval)  # fell behind: don't burst to catch up
        self.next_t += self.interval


class SyntheticSource(FrameSource):
    """Generated frames (grey texture + a moving bright defect) at a set FPS; for tests/benchmarks."""

    def __init__(self, width: int = 640, height: int = 480, fps: Optional[float] = 30.0,
                 max_frames: Optional[int] = None, seed: int = 0) -> None:
        if width < 8 or height < 8:
            raise SourceError(f"synthetic size {width}x{height} too small; use at least 8x8")
        rng = np.random.default_rng(seed)
        self._base = np.clip(rng.normal(128, 12, (height, width, 3)), 0, 255).astype(np.uint8)
        self._pacer = _Pacer(fps)
        self.max_frames = max_frames
        self.index = 0
        self.description = f"synthetic:{width}x{height}@{fps or 'max'}"

    def wait_next(self) -> None:
        """Sleep until the next frame is due at the set FPS."""
        self._pacer.wait()

    def read(self) -> Optional[np.ndarray]:
        """Next frame on schedule (sleeps to hold the FPS)."""
        if self.max_frames is not None and self.index >= self.max_frames:
            return None
        frame = self._base.copy()
        h, w = frame.shape[:2]
        x = (self.index * 7) % max(w - 20, 1)
        y = (self.index * 3) % max(h - 20, 1)
        frame[y:y + 12, x:x + 20] = 230
        self.index += 1
        return frame


class ImageFolderSource(FrameSource):
    """The images of a folder in name order (optionally paced to an FPS).

    With `loop` (the service: a recorded line replayed) it starts over after the last image, so
    a folder feeds a service for as long as it runs; `max_frames` still bounds the total.
    """

    def __init__(self, folder: Path, fps: Optional[float] = None, max_frames: Optional[int] = None,
                 loop: bool = False) -> None:
        self.files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise SourceError(f"folder {folder} has no images ({', '.join(IMAGE_SUFFIXES)}); point --source at images")
        self._pacer = _Pacer(fps)
        self.max_frames = max_frames
        self.loop = loop
        self.index = 0  # frames delivered (or skipped as unreadable) so far
        self.description = f"folder:{folder} ({len(self.files)} images{', looped' if loop else ''})"

    def wait_next(self) -> None:
        """Sleep until the next image is due (only with --fps)."""
        self._pacer.wait()

    def read(self) -> Optional[np.ndarray]:
        """Next image (unreadable files are skipped with a warning, not fatal mid-run)."""
        skipped_in_a_row = 0
        while (self.loop or self.index < len(self.files)) and (self.max_frames is None or
                                                               self.index < self.max_frames):
            path = self.files[self.index % len(self.files)]
            self.index += 1
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if image is not None:
                return image
            log.warning("skipping unreadable image %s", path)
            skipped_in_a_row += 1
            if skipped_in_a_row >= len(self.files):  # a looped folder of nothing readable must not spin
                return None
        return None


class CaptureSource(FrameSource):
    """A camera index or a video file through OpenCV's VideoCapture.

    A file ends at its last frame. A camera that stops delivering (unplugged, a driver hiccup)
    does not end the stream when `reconnect` is on (the service): the source reopens it with
    a backoff of up to `max_backoff_s`, and meanwhile delivers nothing, which is exactly what
    the service's `/healthz` reports as a stalled camera.
    """

    def __init__(self, spec: "int | str", fps: Optional[float] = None, max_frames: Optional[int] = None,
                 reconnect: bool = False, max_backoff_s: float = 5.0) -> None:
        self.spec = spec
        self.cap = cv2.VideoCapture(spec)
        if not self.cap.isOpened():
            what = f"camera {spec}" if isinstance(spec, int) else f"video {spec}"
            raise SourceError(f"cannot open {what}; check the device/path (ls /dev/video*) and permissions")
        # Cameras pace themselves; a file is paced only when asked, else it is read as fast as possible.
        self._pacer = _Pacer(fps if not isinstance(spec, int) else None)
        self.max_frames = max_frames
        self.reconnect = reconnect and isinstance(spec, int)
        self.max_backoff_s = max_backoff_s
        self.reconnects = 0
        self._interrupted = threading.Event()
        self.index = 0
        self.description = f"camera:{spec}" if isinstance(spec, int) else f"video:{spec}"

    def wait_next(self) -> None:
        """A file waits for its --fps schedule; a camera paces itself inside read()."""
        self._pacer.wait()

    def interrupt(self) -> None:
        """Stop waiting for a camera to come back (shutdown)."""
        self._interrupted.set()

    def read(self) -> Optional[np.ndarray]:
        """Next frame, None at the end of the file / when the camera stops (and is not reconnected)."""
        if self.max_frames is not None and self.index >= self.max_frames:
            return None
        backoff = 0.25
        while True:
            ok, frame = self.cap.read()
            if ok:
                self.index += 1
                return frame
            if not self.reconnect or self._interrupted.is_set():
                return None
            log.warning("camera %s delivered no frame; reopening in %.2f s", self.spec, backoff)
            if self._interrupted.wait(backoff):
                return None
            backoff = min(backoff * 2, self.max_backoff_s)
            self.cap.release()
            self.cap = cv2.VideoCapture(self.spec)
            self.reconnects += 1

    def close(self) -> None:
        """Release the capture device."""
        self.cap.release()


def open_source(spec: str, fps: Optional[float] = None, max_frames: Optional[int] = None,
                reconnect: bool = False) -> FrameSource:
    """`synthetic[:WxH]` | camera index (`0`) | folder of images | video file.

    `reconnect` (the service): a camera that stops delivering is reopened, a folder is replayed.
    """
    if spec == "synthetic" or spec.startswith("synthetic:"):
        w, h = 640, 480
        if ":" in spec:
            try:
                w, h = (int(v) for v in spec.split(":", 1)[1].lower().split("x"))
            except ValueError as e:
                raise SourceError(f"source '{spec}': write synthetic:WIDTHxHEIGHT, e.g. synthetic:640x480") from e
        return SyntheticSource(w, h, fps if fps is not None else 30.0, max_frames)
    if spec.isdigit():
        return CaptureSource(int(spec), fps, max_frames, reconnect=reconnect)
    path = Path(spec)
    if path.is_dir():
        return ImageFolderSource(path, fps, max_frames, loop=reconnect)
    if path.is_file():
        return CaptureSource(str(path), fps, max_frames)
    raise SourceError(f"source '{spec}' is not a camera index, folder, video file or synthetic[:WxH]; fix --source")


# --------------------------------------------------------------------------- thermal-adaptive switching

@dataclass
class ThermalGovernor:
    """Chooses the variant level from the CPU temperature with hysteresis and a dwell time."""

    variants: Sequence[str]
    throttle_c: float
    resume_c: float
    read_temp: Callable[[], Optional[float]]
    check_interval_s: float = 1.0
    min_dwell_s: float = 5.0
    clock: Callable[[], float] = time.monotonic
    level: int = 0
    # The latest switches only: a device that oscillates for months must not grow a list.
    switches: Deque[Dict[str, Any]] = field(default_factory=lambda: deque(maxlen=256))
    switch_count: int = 0
    last_temp: Optional[float] = None
    _last_check: Optional[float] = None
    _last_switch: Optional[float] = None
    _t0: Optional[float] = None

    def __post_init__(self) -> None:
        if self.resume_c >= self.throttle_c:
            raise ValueError(f"resume_c {self.resume_c} must be below throttle_c {self.throttle_c} (hysteresis)")
        if not self.variants:
            raise ValueError("thermal governor needs at least one variant")

    @property
    def current(self) -> str:
        """The variant to run now."""
        return self.variants[self.level]

    def update(self) -> Optional[Dict[str, Any]]:
        """Read the temperature if a check is due; switch at most one level; return the switch."""
        now = self.clock()
        if self._t0 is None:
            self._t0 = now
        if self._last_check is not None and now - self._last_check < self.check_interval_s:
            return None
        self._last_check = now
        temp = self.read_temp()
        self.last_temp = temp
        if temp is None:
            return None
        if self._last_switch is not None and now - self._last_switch < self.min_dwell_s:
            return None
        new = self.level
        if temp >= self.throttle_c and self.level < len(self.variants) - 1:
            new, reason = self.level + 1, f"{temp:.1f} C >= throttle {self.throttle_c:.1f} C"
        elif temp <= self.resume_c and self.level > 0:
            new, reason = self.level - 1, f"{temp:.1f} C <= resume {self.resume_c:.1f} C"
        if new == self.level:
            return None
        switch = {"t_s": round(now - self._t0, 3), "from": self.variants[self.level], "to": self.variants[new],
                  "temp_c": temp, "reason": reason}
        self.level = new
        self._last_switch = now
        self.switches.append(switch)
        self.switch_count += 1
        log.warning("thermal switch %s -> %s (%s)", switch["from"], switch["to"], reason)
        return switch


# --------------------------------------------------------------------------- the loop

@dataclass
class Frame:
    """A captured frame and when its capture started / finished (perf_counter seconds)."""

    index: int
    image: np.ndarray
    t_grab: float
    t_ready: float


@dataclass
class Result:
    """One inferred frame on its way to the handlers."""

    frame: Frame
    detections: Detections
    variant: str
    t_infer_start: float
    t_infer_done: float
    stages: StageTimes
    _json: Optional[List[Dict[str, Any]]] = field(default=None, repr=False, compare=False)

    @property
    def age_s(self) -> float:
        """How old the frame was when inference started on it."""
        return self.t_infer_start - self.frame.t_ready

    def detections_json(self, class_names: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
        """`detections.to_json(class_names)`, computed once per result: every publisher (JSONL, MQTT,
        the frame sidecar, the live view) sends the same list, and at 100 FPS converting it again
        for each of them is measurable."""
        if self._json is None:
            self._json = self.detections.to_json(class_names)
        return self._json


Handler = Callable[[Result], None]


class JsonLinesHandler:
    """Writes one JSON line per handled frame (stdout or a file), flushed per line."""

    def __init__(self, stream: TextIO, class_names: Optional[Sequence[str]] = None) -> None:
        self.stream = stream
        self.class_names = class_names

    def __call__(self, r: Result) -> None:
        line = {"frame": r.frame.index, "time": time.time(), "variant": r.variant,
                "age_ms": round(r.age_s * 1000, 2), "detections": r.detections_json(self.class_names)}
        self.stream.write(json.dumps(line) + "\n")
        self.stream.flush()


def annotate(image: np.ndarray, detections: Detections, class_names: Optional[Sequence[str]] = None) -> np.ndarray:
    """A copy of `image` with each detection's box and `name score` drawn on it."""
    img = image.copy()
    for box, score, cls in zip(detections.boxes.astype(int), detections.scores, detections.classes):
        cv2.rectangle(img, (int(box[0]), int(box[1])), (int(box[2]), int(box[3])), (0, 0, 255), 2)
        name = class_names[cls] if class_names and cls < len(class_names) else str(cls)
        cv2.putText(img, f"{name} {score:.2f}", (int(box[0]), max(int(box[1]) - 3, 10)),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 255), 1)
    return img


class DrawHandler:
    """Keeps one JPEG updated (atomically) with the latest frame and its boxes, for a dashboard.

    One file rewritten rather than one per frame: a device's SD card must not fill up.
    """

    def __init__(self, path: Path, class_names: Optional[Sequence[str]] = None) -> None:
        self.path = path
        self.class_names = class_names

    def __call__(self, r: Result) -> None:
        ok, buf = cv2.imencode(".jpg", annotate(r.frame.image, r.detections, self.class_names))
        if ok:
            atomic_write_bytes(self.path, buf.tobytes())


def load_actuator(spec: str) -> Handler:
    """`module:function` -> that function, called with each `Result` (the actuator hook)."""
    module, _, func = spec.partition(":")
    if not module or not func:
        raise ValueError(f"--actuator '{spec}': write module:function, e.g. my_plc:on_result")
    try:
        target = getattr(importlib.import_module(module), func)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"--actuator '{spec}' cannot be imported ({e}); put the module on PYTHONPATH") from e
    if not callable(target):
        raise ValueError(f"--actuator '{spec}' is not callable")
    return target


SERIES = ("capture", "to_infer_done", "to_handled", "age", "end_to_end", "preprocess", "infer", "postprocess")
# The three slices a frame passes through, as /metrics exposes them (histograms).
SLICES = {"capture": "capture", "infer": "to_infer_done", "handle": "to_handled"}


class LoopStats:
    """Everything the loop measures, in bounded memory: rolling windows, histograms, counters.

    One per loop; written by the handler thread, read by the summary and the service's HTTP
    thread (a read racing a write sees a sample more or less, never a torn structure).
    """

    def __init__(self, window: int = DEFAULT_WINDOW, class_names: Optional[Sequence[str]] = None) -> None:
        self.windows = {k: RollingWindow(window) for k in SERIES}
        self.histograms = {name: Histogram() for name in SLICES}
        self.fps = RateMeter()
        self.class_names = list(class_names or [])
        self.detections_by_class: Dict[str, int] = {}
        self.handled = 0
        self.handler_errors = 0
        self.last_error = ""
        self.t_first_ready: Optional[float] = None
        self.t_last_ready: Optional[float] = None
        self.last_result: Optional[Result] = None  # the live view's frame: one frame, replaced each time

    def observe(self, r: Result, t_handled: float) -> None:
        """Account one handled frame."""
        f = r.frame
        values = {"capture": f.t_ready - f.t_grab, "to_infer_done": r.t_infer_done - f.t_ready,
                  "to_handled": t_handled - r.t_infer_done, "age": r.age_s, "end_to_end": t_handled - f.t_ready,
                  "preprocess": r.stages.preprocess, "infer": r.stages.infer, "postprocess": r.stages.postprocess}
        for k, v in values.items():
            self.windows[k].add(v)
        for name, key in SLICES.items():
            self.histograms[name].observe(values[key])
        for cls in r.detections.classes.tolist():
            name = self.class_names[cls] if 0 <= cls < len(self.class_names) else str(cls)
            self.detections_by_class[name] = self.detections_by_class.get(name, 0) + 1
        if self.t_first_ready is None:
            self.t_first_ready = f.t_ready
        self.t_last_ready = f.t_ready
        self.handled += 1
        self.fps.mark()
        self.last_result = r


class RealtimeLoop:
    """Three threads joined by size-one slots (or, for comparison, unbounded queues).

    Memory is bounded however long it runs: per-frame timings go into `LoopStats` (rolling
    windows of `window` samples and fixed histograms), never into a list kept until the end.
    `handler_errors="count"` (the service) counts and logs a failing handler instead of stopping
    the loop; the default, `"raise"`, stops it and re-raises from `run()`.
    """

    def __init__(self, detectors: Dict[str, Detector], source: FrameSource, handlers: Sequence[Handler] = (),
                 governor: Optional[ThermalGovernor] = None, start_variant: Optional[str] = None,
                 slot_factory: Callable[[], Any] = LatestSlot, max_seconds: Optional[float] = None,
                 window: int = DEFAULT_WINDOW, class_names: Optional[Sequence[str]] = None,
                 handler_errors: str = "raise") -> None:
        if not detectors:
            raise ValueError("the real-time loop needs at least one loaded variant")
        if handler_errors not in ("raise", "count"):
            raise ValueError(f"handler_errors must be 'raise' or 'count', not {handler_errors!r}")
        self.detectors = detectors
        self.source = source
        self.handlers = list(handlers)
        self.governor = governor
        self.fixed_variant = start_variant or next(iter(detectors))
        if self.fixed_variant not in detectors:
            raise ValueError(f"variant '{self.fixed_variant}' not loaded (have {', '.join(detectors)})")
        if governor is not None:
            missing = [v for v in governor.variants if v not in detectors]
            if missing:
                raise ValueError(f"thermal governor names variants {missing} that are not loaded")
        self.frames: Any = slot_factory()
        self.results: Any = slot_factory()
        self.max_seconds = max_seconds
        self.handler_errors = handler_errors
        self.stop_event = threading.Event()
        self.stats = LoopStats(window, class_names)
        self.variant_counts: Dict[str, int] = {}
        self.errors: List[BaseException] = []
        self.captured = 0
        self.inferred = 0
        self.last_capture_t: Optional[float] = None  # perf_counter of the last frame the source delivered
        self.last_infer_t: Optional[float] = None  # perf_counter of the last finished inference
        self._handler_log = ThrottledWarning(log, time.monotonic)  # a failing hook at 30 FPS must not flood the log

    @property
    def variant(self) -> str:
        """The variant inference uses now."""
        return self.governor.current if self.governor is not None else self.fixed_variant

    def stop(self) -> None:
        """Ask all threads to finish (Ctrl-C, SIGTERM, a time limit, a test)."""
        self.stop_event.set()
        interrupt = getattr(self.source, "interrupt", None)
        if interrupt is not None:
            interrupt()  # a camera waiting to reconnect must not hold the shutdown
        self.frames.close()

    def _guard(self, fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except BaseException as e:  # surface thread failures in run(), don't die silently
                self.errors.append(e)
                self.stop()
                self.results.close()
        return run

    def _capture(self) -> None:
        try:
            while not self.stop_event.is_set():
                self.source.wait_next()
                t_grab = time.perf_counter()
                image = self.source.read()
                if image is None:
                    break
                t_ready = time.perf_counter()
                self.frames.put(Frame(self.captured, image, t_grab, t_ready))
                self.last_capture_t = t_ready
                self.captured += 1
        finally:
            self.frames.close()

    def _infer(self) -> None:
        try:
            while True:
                frame = self.frames.get()
                if frame is None or self.stop_event.is_set():
                    break
                t0 = time.perf_counter()
                name = self.fixed_variant
                if self.governor is not None:
                    self.governor.update()
                    name = self.governor.current
                detections, stages = self.detectors[name].detect(frame.image)
                t_done = time.perf_counter()
                self.results.put(Result(frame, detections, name, t0, t_done, stages))
                self.last_infer_t = t_done
                self.inferred += 1
                self.variant_counts[name] = self.variant_counts.get(name, 0) + 1
        finally:
            self.frames.discard()
            self.results.close()

    def _run_handlers(self, r: Result) -> None:
        for h in self.handlers:
            try:
                h(r)
            except Exception as e:  # noqa: BLE001 - policy decided by handler_errors
                if self.handler_errors == "raise":
                    raise
                self.stats.handler_errors += 1
                self.stats.last_error = f"{getattr(h, '__name__', type(h).__name__)}: {e}"
                self._handler_log.warn(f"result handler failed ({self.stats.last_error})")

    def _handle(self) -> None:
        while True:
            r = self.results.get()
            if r is None:
                break
            self._run_handlers(r)
            self.stats.observe(r, time.perf_counter())

    def run(self) -> Dict[str, Any]:
        """Run until the source ends, `max_seconds` pass or `stop()`; return the summary."""
        threads = [threading.Thread(target=self._guard(fn), name=name, daemon=True)
                   for name, fn in (("capture", self._capture), ("infer", self._infer), ("handle", self._handle))]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        try:
            while any(t.is_alive() for t in threads):
                threads[2].join(timeout=0.1)
                if self.max_seconds is not None and time.perf_counter() - t0 >= self.max_seconds:
                    self.stop()
        except KeyboardInterrupt:
            self.stop()
        for t in threads:
            t.join()
        duration = time.perf_counter() - t0
        self.source.close()
        if self.errors:
            raise self.errors[0]
        return self.summary(duration)

    def summary(self, duration: float) -> Dict[str, Any]:
        """Counts, FPS, the three slices and frame age (percentiles over the last `window` frames,
        ms), variant use, switches."""
        w = self.stats.windows
        handled = self.stats.handled
        return {
            "source": self.source.description,
            "duration_s": round(duration, 3),
            "frames_captured": self.captured,
            "frames_inferred": self.inferred,
            "frames_handled": handled,
            "frames_dropped": int(self.frames.dropped),
            "results_dropped": int(self.results.dropped),
            "handler_errors": self.stats.handler_errors,
            "capture_fps": round(self.captured / duration, 2) if duration > 0 else None,
            "fps": round(handled / duration, 2) if duration > 0 else None,
            "percentile_window_frames": min(handled, w["age"].values().shape[0]) if handled else 0,
            "frame_age_ms": w["age"].percentiles_ms(),
            "slices_ms": {"capture_to_ready": w["capture"].percentiles_ms(),
                          "ready_to_inference_done": w["to_infer_done"].percentiles_ms(),
                          "inference_to_handled": w["to_handled"].percentiles_ms(),
                          "end_to_end": w["end_to_end"].percentiles_ms()},
            "stages_ms": {k: w[k].percentiles_ms() for k in ("preprocess", "infer", "postprocess")},
            "detections_by_class": dict(self.stats.detections_by_class),
            "variant_frames": dict(self.variant_counts),
            "thermal_switches": list(self.governor.switches) if self.governor else [],
            "max_queue_depth": getattr(self.frames, "max_depth", 1),
        }


def summary_line(summary: Dict[str, Any]) -> str:
    """One line for logs."""
    age = summary["frame_age_ms"]["mean"]
    return (f"run {summary['source']}: {summary['frames_handled']} frames handled of {summary['frames_captured']} "
            f"captured ({summary['frames_dropped']} dropped) in {summary['duration_s']} s, {summary['fps']} FPS, "
            f"mean frame age {age} ms, {len(summary['thermal_switches'])} thermal switches")
