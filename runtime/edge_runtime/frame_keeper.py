"""Keep a bounded sample of camera frames on the device for the loop back to calibration and labelling.

A `FrameKeeper` is a result handler (`Callable[[Result], None]`) for the real-time loop. It keeps
a frame in `frames_dir` for one of two reasons:

``periodic``
    one frame every `every_s` seconds, whatever it shows: an unbiased sample of the scene, which
    is what INT8 calibration wants. Its schedule never depends on the content.
``uncertain``
    the frame's BEST detection score lies in the band ``[lo, hi)``: the model saw something but
    was unsure, which is what is worth labelling. At most one per `uncertain_min_interval_s`, so a
    scene stuck in the band cannot fill the disk in a second. The detector's own confidence
    threshold filters detections first, so a `lo` below it behaves as that threshold.

Each kept frame is two files with the same stem, ``<UTC stamp with ms>_<frame index>``:
``<stem>.json`` (the sidecar: time, release, variant, reason, best score, image size, detections)
and ``<stem>.jpg``. Both are written with `fileio.atomic_write_bytes` (a hidden ``.<name>.*.tmp``
file, then `os.replace`), the sidecar FIRST and the image LAST, and a failed image write removes
its sidecar: so `fab collect-frames`, which lists non-hidden image files, never sees a partial
image nor an image without its sidecar. Deletion goes the other way round (image, then sidecar).

The folder is capped in frames (`max_files`) and in size (`max_mb`, MiB, images + sidecars): after
each write the OLDEST frames go until both hold. The totals are kept in memory; the folder is
scanned once, at start, because it may hold frames of a previous run or release (those count
against the cap from the first frame on, and are trimmed at once if they exceed it).

A write that fails (a full disk, a read-only remount, a yanked USB stick) is counted, logged at
most once a minute, leaves no file behind and never raises into the loop: the service keeps
running.

Everything runs inline on the loop's handler thread, no encoder thread: a kept 640x480 frame
costs ~2.2 ms of JPEG encoding (quality 90) plus the two fsync'd writes, ~4.5 ms in all on an x86
box with ext4 (~3 ms on tmpfs), and a frame not kept ~6 us. At one kept frame per interval that
delays the handlers after it (an actuator) by a few ms once every few seconds, while a thread
would add a queue that must itself be bounded. On a Pi's SD card the fsyncs dominate: measure
there before setting `uncertain_min_interval_s` well below a second.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import OrderedDict
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Sequence, Tuple

import cv2
import numpy as np

from .fileio import atomic_write_bytes
from .throttled_log import ThrottledWarning

if TYPE_CHECKING:  # only for annotations: realtime may import this module (the serve wiring), no cycle
    from .realtime import Result


log = logging.getLogger("edge_runtime.frame_keeper")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")  # what `deploy_ops.frames` lists
SIDECAR_SUFFIX = ".json"
ERROR_LOG_INTERVAL_S = 60.0
MIB = 1024 * 1024


def utc_stamp(t: float) -> str:
    """`t` (unix seconds) as a file-name-safe UTC stamp with milliseconds: 20240501T120304.123Z."""
    ms = int(t * 1000)  # derive seconds from the same integer so the stamp never reads .1000
    whole = datetime.fromtimestamp(ms // 1000, timezone.utc)
    return "%s.%03dZ" % (whole.strftime("%Y%m%dT%H%M%S"), ms % 1000)


def iso_utc(t: float) -> str:
    """`t` (unix seconds) as ISO 8601 UTC with milliseconds: 2024-05-01T12:03:04.123Z."""
    ms = int(t * 1000)
    whole = datetime.fromtimestamp(ms // 1000, timezone.utc)
    return "%s.%03dZ" % (whole.strftime("%Y-%m-%dT%H:%M:%S"), ms % 1000)


class FrameKeeper:
    """Result handler that keeps periodic and uncertain frames (+ JSON sidecars) in a capped folder."""

    def __init__(self, frames_dir: Path, every_s: float = 60.0, band: Optional[Tuple[float, float]] = (0.25, 0.5),
                 uncertain_min_interval_s: float = 5.0, max_files: int = 1000, max_mb: float = 500.0,
                 release: str = "", class_names: Optional[Sequence[str]] = None, jpeg_quality: int = 90,
                 clock: Callable[[], float] = time.time) -> None:
        if every_s < 0:
            raise ValueError(f"every_s {every_s}: use a number of seconds >= 0 (0 = no periodic frames)")
        if band is not None and not 0.0 <= band[0] < band[1] <= 1.0:
            raise ValueError(f"uncertainty band {band}: write (lo, hi) with 0 <= lo < hi <= 1, or None for off")
        if uncertain_min_interval_s < 0:
            raise ValueError(f"uncertain_min_interval_s {uncertain_min_interval_s}: use seconds >= 0")
        if max_files < 1 or max_mb <= 0:
            raise ValueError(f"frame cap max_files={max_files}, max_mb={max_mb}: both must be positive "
                             "(an uncapped folder fills the device's disk)")
        if not 1 <= jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality {jpeg_quality}: use 1..100")
        self.frames_dir = Path(frames_dir)
        self.every_s = float(every_s)
        self.band = (float(band[0]), float(band[1])) if band is not None else None
        self.uncertain_min_interval_s = float(uncertain_min_interval_s)
        self.max_files = int(max_files)
        self.max_bytes = int(max_mb * MIB)
        self.release = release
        self.class_names = list(class_names) if class_names is not None else None
        self.jpeg_quality = int(jpeg_quality)
        self.clock = clock
        # counters() may be read from another thread (a metrics endpoint) while the handler runs.
        self._lock = threading.Lock()
        # image name -> (image bytes, sidecar bytes), oldest first: the in-memory view of the folder.
        self._stored: "OrderedDict[str, Tuple[int, int]]" = OrderedDict()
        self._bytes = 0
        self._last_periodic: Optional[float] = None
        self._last_uncertain: Optional[float] = None
        self._errors_log = ThrottledWarning(log, self.clock, ERROR_LOG_INTERVAL_S)
        self.kept_total = 0
        self.kept_uncertain_total = 0
        self.deleted_total = 0
        self.write_errors_total = 0
        self.frames_dir.mkdir(parents=True, exist_ok=True)
        self._scan()
        with self._lock:
            self._enforce_cap()

    # ------------------------------------------------------------------ start-up

    def _scan(self) -> None:
        """Count what a previous run left; drop its debris (temp files, sidecars without an image)."""
        images, sidecars, debris = [], set(), []
        for entry in os.scandir(self.frames_dir):
            if not entry.is_file(follow_symlinks=False):
                continue
            name = entry.name
            suffix = os.path.splitext(name)[1].lower()
            if name.startswith("."):
                if name.endswith(".tmp"):
                    debris.append(name)  # an atomic write cut short by a crash or power cut
            elif suffix in IMAGE_SUFFIXES:
                st = entry.stat(follow_symlinks=False)
                images.append((st.st_mtime, name, st.st_size))
            elif suffix == SIDECAR_SUFFIX:
                sidecars.add(name)
        paired = set()
        # Oldest first by mtime: foreign names (a capture's frame_001.jpg) do not sort by time.
        for _mtime, name, size in sorted(images):
            side = self._sidecar_name(name)
            side_size = 0
            if side in sidecars:
                paired.add(side)
                side_size = os.path.getsize(self.frames_dir / side)
            self._stored[name] = (size, side_size)
            self._bytes += size + side_size
        # A sidecar without its image is a frame whose image write never finished (written first).
        debris.extend(sorted(sidecars - paired))
        for name in debris:
            self._remove(name)
        if self._stored or debris:
            log.info("frame keeper: %s holds %d frames (%.1f MiB) from before; removed %d leftovers",
                     self.frames_dir, len(self._stored), self._bytes / MIB, len(debris))

    # ------------------------------------------------------------------ the handler

    def __call__(self, result: "Result") -> None:
        """Keep `result`'s frame when a periodic sample is due or its best score is in the band."""
        now = self.clock()
        scores = result.detections.scores
        best = float(np.max(scores)) if len(scores) else None
        with self._lock:
            reason = self._decide(now, best)
            if reason is not None:
                self._keep(result, now, reason, best)

    def _decide(self, now: float, best: Optional[float]) -> Optional[str]:
        """'periodic', 'uncertain' or None; advances the chosen timer even if the write then fails.

        Advancing on a failed write is on purpose: a full disk is retried once per interval, not
        once per frame. An interval clock that went backwards (NTP step) counts as due.
        """
        if self.every_s > 0 and _due(self._last_periodic, now, self.every_s):
            self._last_periodic = now
            return "periodic"
        if (self.band is not None and best is not None and self.band[0] <= best < self.band[1]
                and _due(self._last_uncertain, now, self.uncertain_min_interval_s)):
            self._last_uncertain = now
            return "uncertain"
        return None

    def _keep(self, result: "Result", now: float, reason: str, best: Optional[float]) -> None:
        image = result.frame.image
        stem = "%s_%06d" % (utc_stamp(now), result.frame.index)
        name = stem + ".jpg"
        n = 1
        while name in self._stored:  # same ms and index: only after a clock step back; never overwrite
            name = "%s-%d.jpg" % (stem, n)
            n += 1
        side = self._sidecar_name(name)
        doc: Dict[str, Any] = {
            "time": round(now, 3), "time_utc": iso_utc(now), "release": self.release, "variant": result.variant,
            "reason": reason, "best_score": None if best is None else round(best, 4),
            "in_band": self._in_band(best), "frame": result.frame.index, "image": name,
            "width": int(image.shape[1]), "height": int(image.shape[0]),
            "detections": result.detections_json(self.class_names),
        }
        side_bytes = (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode("utf-8")
        try:
            ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality])
            if not ok:
                raise ValueError("OpenCV could not encode the frame as JPEG")
            img_bytes = buf.tobytes()
            atomic_write_bytes(self.frames_dir / side, side_bytes)
            try:
                atomic_write_bytes(self.frames_dir / name, img_bytes)
            except BaseException:
                self._remove(side)  # no sidecar without its image either
                raise
        except (OSError, ValueError, cv2.error) as e:
            self.write_errors_total += 1
            self._errors_log.warn(now=now, message="frame keeper: could not keep frame %d in %s: %s" % (
                result.frame.index, self.frames_dir, e))
            return
        self._stored[name] = (len(img_bytes), len(side_bytes))
        self._bytes += len(img_bytes) + len(side_bytes)
        self.kept_total += 1
        if reason == "uncertain":
            self.kept_uncertain_total += 1
        self._enforce_cap()

    def _in_band(self, best: Optional[float]) -> bool:
        return self.band is not None and best is not None and self.band[0] <= best < self.band[1]

    # ------------------------------------------------------------------ the cap

    def _enforce_cap(self) -> None:
        """Delete the oldest frames (image first, then sidecar) until files and bytes are both within the cap."""
        while self._stored and (len(self._stored) > self.max_files or self._bytes > self.max_bytes):
            name, (img_size, side_size) = self._stored.popitem(last=False)
            self._bytes -= img_size + side_size
            # Image first: a crash in between leaves a sidecar alone (removed at the next start),
            # never an image without its sidecar.
            self._remove(name)
            self._remove(self._sidecar_name(name))
            self.deleted_total += 1

    def _remove(self, name: str) -> None:
        """Delete one file of the folder; gone already is fine, other failures are counted, not raised."""
        try:
            os.remove(self.frames_dir / name)
        except FileNotFoundError:
            pass  # an operator cleaned up by hand: the accounting simply forgets it
        except OSError as e:
            self.write_errors_total += 1
            self._errors_log.warn("frame keeper: could not delete %s: %s" % (self.frames_dir / name, e))

    @staticmethod
    def _sidecar_name(image_name: str) -> str:
        return os.path.splitext(image_name)[0] + SIDECAR_SUFFIX

    # ------------------------------------------------------------------ reporting

    def counters(self) -> Dict[str, float]:
        """Totals since start, plus what the folder holds now (frames = images, each with its sidecar)."""
        with self._lock:
            return {
                "frames_kept_total": self.kept_total,
                "frames_kept_uncertain_total": self.kept_uncertain_total,
                "frames_deleted_total": self.deleted_total,
                "frames_stored": len(self._stored),
                "frames_stored_bytes": self._bytes,
                "frames_write_errors_total": self.write_errors_total,
            }

    def stored(self) -> Sequence[str]:
        """Image names in the folder as the keeper accounts them, oldest first."""
        with self._lock:
            return list(self._stored)

    def close(self) -> None:
        """Nothing to flush: every frame is on disk (fsync'd) before `__call__` returns."""


def _due(last: Optional[float], now: float, interval: float) -> bool:
    """True when `interval` has passed since `last` (or never, or the clock stepped back)."""
    if last is None:
        return True
    elapsed = now - last
    return elapsed < 0 or elapsed >= interval
