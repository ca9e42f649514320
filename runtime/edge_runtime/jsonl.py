"""Detections as JSON lines in a size-capped, rotating file set, for a service that runs for months.

`RotatingJsonlWriter` appends whole lines to ``detections.jsonl`` and, when the next line would
take it past `max_bytes`, rotates ``detections.jsonl -> .1 -> ... -> .N`` (the oldest, ``.N``,
is dropped), like `logging.handlers.RotatingFileHandler`. It is not built on that class: a
logging handler reports write errors by printing a traceback to stderr instead of letting the
caller count them, buffers in a text stream (a failed flush would leave half a line to be written
later), and with ``backupCount=0`` never rotates at all, so the file grows without bound.

Guarantees:

- Disk use is bounded by ``(backups + 1) * max_bytes``: a line longer than `max_bytes` on its
  own is dropped (counted, logged), never written.
- A line is never split across files, and each line is handed to the kernel with one unbuffered
  write before `write_line` returns, so a crash of the process loses at most the line being
  written. There is no fsync per line (30 a second would wear an SD card); a power cut can lose
  what the kernel had not yet flushed.
- A write that fails (a full disk) is undone (the file is truncated back to its last whole line),
  counted and logged at most once a minute; it never raises into the real-time loop.
- A torn last line left by a crash (or a power cut) is cut off when the file is reopened, so the
  next line does not get glued to it.

`JsonlHandler` is the loop's result handler on top of it: one line per handled frame with the
fields of `realtime.JsonLinesHandler` (frame, time, variant, age_ms, detections).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Sequence

from .throttled_log import ThrottledWarning

if TYPE_CHECKING:  # only for annotations: realtime may import this module (the serve wiring), no cycle
    from .realtime import Result


log = logging.getLogger("edge_runtime.jsonl")
ERROR_LOG_INTERVAL_S = 60.0
MIN_MAX_BYTES = 1024  # below this every detection-rich line would be dropped as too long
TAIL_BLOCK = 1 << 16


class RotatingJsonlWriter:
    """Append-only JSON lines in `path` plus `backups` rotated files, each at most `max_bytes`."""

    def __init__(self, path: Path, max_bytes: int, backups: int, clock: Callable[[], float] = time.monotonic) -> None:
        if max_bytes < MIN_MAX_BYTES:
            raise ValueError(f"max_bytes {max_bytes}: use at least {MIN_MAX_BYTES} (one file must hold many lines)")
        if backups < 0:
            raise ValueError(f"backups {backups}: use 0 or more rotated files")
        self.path = Path(path)
        self.max_bytes = int(max_bytes)
        self.backups = int(backups)
        self.clock = clock
        self._lock = threading.Lock()  # several handlers (or a metrics reader) may share one writer
        self._errors_log = ThrottledWarning(log, self.clock, ERROR_LOG_INTERVAL_S)
        self.lines_total = 0
        self.rotations_total = 0
        self.bytes_total = 0
        self.write_errors_total = 0
        self.lines_dropped_total = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._drop_stale_backups()
        self._fd: Optional[int] = None
        self._size = 0
        self._open()

    def _open(self) -> None:
        """Open `path` for appending; cut a torn last line a crash may have left."""
        fd = os.open(str(self.path), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            self._size = _whole_lines_size(self.path)
            if self._size != os.fstat(fd).st_size:
                log.warning("jsonl: %s ended in a torn line (a crash while writing); cut it off", self.path)
                os.ftruncate(fd, self._size)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def _drop_stale_backups(self) -> None:
        """Backups beyond `backups` (left by an earlier, larger setting) would break the disk bound."""
        k = self.backups + 1
        while True:
            stale = self._backup(k)
            if not stale.exists():
                return
            stale.unlink()
            log.info("jsonl: removed %s (beyond backups=%d)", stale, self.backups)
            k += 1

    def _backup(self, k: int) -> Path:
        return self.path.with_name("%s.%d" % (self.path.name, k))

    def _rotate(self) -> None:
        """detections.jsonl -> .1 -> ... -> .N; with no backups the file simply starts over."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self.backups == 0:
            os.remove(str(self.path))
        else:
            for k in range(self.backups - 1, 0, -1):
                if self._backup(k).exists():
                    os.replace(str(self._backup(k)), str(self._backup(k + 1)))
            os.replace(str(self.path), str(self._backup(1)))
        self.rotations_total += 1
        self._open()

    def write_line(self, doc: Any) -> bool:
        """Append `doc` as one JSON line; True when written, False when dropped or failed (counted)."""
        data = (json.dumps(doc) + "\n").encode("utf-8")
        with self._lock:
            if len(data) > self.max_bytes:
                self.lines_dropped_total += 1
                self._errors_log.warn("jsonl: dropped a %d-byte line, longer than max_bytes %d (%s)"
                                % (len(data), self.max_bytes, self.path))
                return False
            try:
                if self._fd is None:  # an earlier rotation failed half way: try to reopen
                    self._open()
                if self._size > 0 and self._size + len(data) > self.max_bytes:
                    self._rotate()
                self._append(data)
            except OSError as e:
                self.write_errors_total += 1
                self._errors_log.warn("jsonl: could not write to %s: %s" % (self.path, e))
                return False
            self.lines_total += 1
            self.bytes_total += len(data)
            return True

    def _append(self, data: bytes) -> None:
        """One line through the raw fd (os.write may write part of it: loop); undo a failed line."""
        assert self._fd is not None
        view = memoryview(data)
        done = 0
        try:
            while done < len(data):
                done += os.write(self._fd, view[done:])
        except OSError:
            if done:
                try:
                    os.ftruncate(self._fd, self._size)  # drop the half line; the file ends in a whole line
                except OSError:
                    pass  # the next open cuts the torn line instead
            raise
        self._size += len(data)

    def counters(self) -> Dict[str, float]:
        """Lines, rotations and bytes written since start; lines dropped and write errors."""
        with self._lock:
            return {
                "jsonl_lines_total": self.lines_total,
                "jsonl_rotations_total": self.rotations_total,
                "jsonl_bytes_total": self.bytes_total,
                "jsonl_lines_dropped_total": self.lines_dropped_total,
                "jsonl_write_errors_total": self.write_errors_total,
            }

    def close(self) -> None:
        """Close the file (every line is already written); idempotent."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> "RotatingJsonlWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class JsonlHandler:
    """Result handler: one JSON line per handled frame into a `RotatingJsonlWriter`."""

    def __init__(self, writer: RotatingJsonlWriter, class_names: Optional[Sequence[str]] = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.writer = writer
        self.class_names = class_names
        self.clock = clock

    def __call__(self, result: "Result") -> None:
        """Write the frame's line: frame, time, variant, age_ms, detections (as `JsonLinesHandler`)."""
        self.writer.write_line({"frame": result.frame.index, "time": self.clock(), "variant": result.variant,
                                "age_ms": round(result.age_s * 1000, 2),
                                "detections": result.detections_json(self.class_names)})

    def counters(self) -> Dict[str, float]:
        """The writer's counters."""
        return self.writer.counters()

    def close(self) -> None:
        """Close the writer."""
        self.writer.close()


def _whole_lines_size(path: Path) -> int:
    """Size of `path` up to and including its last newline (0 for an empty or newline-free file)."""
    with open(str(path), "rb") as f:
        end = f.seek(0, os.SEEK_END)
        pos = end
        while pos > 0:
            start = max(0, pos - TAIL_BLOCK)
            f.seek(start)
            block = f.read(pos - start)
            nl = block.rfind(b"\n")
            if nl >= 0:
                return start + nl + 1
            pos = start
        return 0
