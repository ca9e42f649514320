"""FrameKeeper on a real folder: real JPEG encoding, `Result`s built from real numpy frames and
`Detections`, and an injected clock (the only fake: time, so the sampling is deterministic).

A full disk cannot be made on demand without root and a loop device, and this suite runs as root
in CI (so a read-only folder would not refuse writes either). The write-error tests therefore
patch the OS call: `os.replace` raising ENOSPC, and `os.write` failing half way through a file
(a real partial temp file on disk) -- the two places a full disk shows up in an atomic write.

Measured on the CI box (x86, ext4 on virtio), 640x480 frame, quality 90: ~2.2 ms JPEG encode,
~4.5 ms per kept frame including the sidecar and both fsyncs (~3 ms on tmpfs); ~6 us per frame
not kept. Inline on the handler thread is fine at one kept frame per interval.
"""

from __future__ import annotations

import errno
import functools
import json
import os
from pathlib import Path
from typing import Any, List, Optional, Sequence

import cv2
import numpy as np
import pytest

from edge_runtime import fileio
from edge_runtime.detector import StageTimes
from edge_runtime.frame_keeper import FrameKeeper, iso_utc, utc_stamp
from edge_runtime.postprocess import Detections
from edge_runtime.realtime import Frame, Result

T0 = 1_714_564_984.123  # 2024-05-01T12:03:04.123Z
NAMES = ("scratch", "dent")


class Clock:
    """The injected clock: a number the test moves."""

    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@functools.lru_cache(maxsize=None)
def _texture(h: int = 480, w: int = 640) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.clip(rng.normal(128, 20, (h, w, 3)), 0, 255).astype(np.uint8)  # noise: JPEGs of a real size


def _image(index: int) -> np.ndarray:
    img = _texture().copy()  # drawn once: 300 frames of fresh noise would cost seconds
    img[40:80, 60 + index % 200:120 + index % 200] = 240
    return img


def _result(index: int, scores: Sequence[float] = (), image: Optional[np.ndarray] = None) -> Result:
    k = len(scores)
    boxes = np.array([[60.0 + i, 40.0, 120.0 + i, 80.0] for i in range(k)], np.float32).reshape(k, 4)
    det = Detections(boxes, np.array(scores, np.float32), np.arange(k, dtype=np.int64) % len(NAMES))
    img = _image(index) if image is None else image
    return Result(Frame(index, img, 0.0, 0.0), det, "int8", 0.0, 0.001, StageTimes(0.0, 0.001, 0.0))


def _keeper(tmp_path: Path, clock: Clock, **kw: Any) -> FrameKeeper:
    kw.setdefault("every_s", 0)
    kw.setdefault("band", None)
    return FrameKeeper(tmp_path / "frames", release="abc123def456", class_names=NAMES, clock=clock, **kw)


def _listing(folder: Path) -> List[str]:
    return sorted(p.name for p in folder.iterdir())


def test_stamps() -> None:
    assert utc_stamp(T0) == "20240501T120304.123Z"
    assert iso_utc(T0) == "2024-05-01T12:03:04.123Z"
    assert utc_stamp(1_714_564_984.9999) == "20240501T120304.999Z"  # never .1000


def test_periodic_sampling_with_injected_clock(tmp_path: Path) -> None:
    clock = Clock()
    keeper = _keeper(tmp_path, clock, every_s=10)
    kept_at = []
    for i in range(100):  # 100 frames, 0.5 s apart: 50 s -> due at 0, 10, 20, 30, 40
        clock.t = T0 + i * 0.5
        before = keeper.counters()["frames_kept_total"]
        keeper(_result(i, scores=[0.9]))
        if keeper.counters()["frames_kept_total"] > before:
            kept_at.append(i)
    assert kept_at == [0, 20, 40, 60, 80]
    folder = tmp_path / "frames"
    jpgs = sorted(folder.glob("*.jpg"))
    assert [p.name for p in jpgs][0] == "20240501T120304.123Z_000000.jpg"
    assert len(jpgs) == 5 and len(list(folder.glob("*.json"))) == 5 and not list(folder.glob(".*"))
    side = json.loads(jpgs[1].with_suffix(".json").read_text())
    assert side["reason"] == "periodic" and side["release"] == "abc123def456" and side["variant"] == "int8"
    assert side["frame"] == 20 and side["time"] == pytest.approx(T0 + 10, abs=1e-3)
    assert side["time_utc"] == "2024-05-01T12:03:14.123Z" and side["image"] == jpgs[1].name
    assert (side["width"], side["height"]) == (640, 480) and side["best_score"] == pytest.approx(0.9)
    assert side["detections"][0]["name"] == "scratch" and side["detections"][0]["box"] == [60.0, 40.0, 120.0, 80.0]
    assert cv2.imread(str(jpgs[1])).shape == (480, 640, 3)
    ok, want = cv2.imencode(".jpg", _image(20), [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok and jpgs[1].read_bytes() == want.tobytes()  # exactly that frame, JPEG quality 90
    c = keeper.counters()
    assert c["frames_kept_total"] == 5 and c["frames_kept_uncertain_total"] == 0 and c["frames_stored"] == 5
    assert c["frames_stored_bytes"] == sum(p.stat().st_size for p in folder.iterdir())


def test_periodic_survives_a_clock_step_back(tmp_path: Path) -> None:
    clock = Clock()
    keeper = _keeper(tmp_path, clock, every_s=60)
    keeper(_result(0))
    clock.t = T0 - 3600  # NTP stepped the wall clock back an hour: keep sampling, don't go silent
    keeper(_result(1))
    clock.t = T0 - 3600 + 1
    keeper(_result(2))
    assert keeper.counters()["frames_kept_total"] == 2


def test_uncertain_band_and_min_interval(tmp_path: Path) -> None:
    clock = Clock()
    keeper = _keeper(tmp_path, clock, band=(0.3, 0.6), uncertain_min_interval_s=5)
    cases = [  # (time offset, scores, kept?)
        (0.0, [], False),                # nothing seen
        (0.1, [0.29], False),            # below the band
        (0.2, [0.6], False),             # hi is exclusive
        (0.3, [0.95, 0.4], False),       # BEST score decides: 0.95 is sure
        (0.4, [0.3], True),              # lo is inclusive
        (1.0, [0.45], False),            # in band but 0.6 s after the last: min interval
        (5.3, [0.5], False),             # 4.9 s
        (5.4, [0.59, 0.1], True),        # 5.0 s: due again
        (5.5, [0.2, 0.35], False),       # 0.1 s later
    ]
    kept = []
    for i, (dt, scores, _want) in enumerate(cases):
        clock.t = T0 + dt
        n = keeper.counters()["frames_kept_total"]
        keeper(_result(i, scores))
        kept.append(keeper.counters()["frames_kept_total"] > n)
    assert kept == [want for *_, want in cases]
    c = keeper.counters()
    assert c["frames_kept_uncertain_total"] == 2 == c["frames_kept_total"]
    sides = [json.loads(p.read_text()) for p in sorted((tmp_path / "frames").glob("*.json"))]
    assert [(s["frame"], s["reason"], s["best_score"], s["in_band"]) for s in sides] == [
        (4, "uncertain", 0.3, True), (7, "uncertain", 0.59, True)]


def test_periodic_and_uncertain_together(tmp_path: Path) -> None:
    clock = Clock()
    keeper = _keeper(tmp_path, clock, every_s=100, band=(0.3, 0.6), uncertain_min_interval_s=1)
    keeper(_result(0, [0.4]))  # periodic is due and the frame is in band: periodic, marked in_band
    clock.t += 1
    keeper(_result(1, [0.4]))  # periodic not due: uncertain
    clock.t += 0.5
    keeper(_result(2, [0.4]))  # neither
    sides = [json.loads(p.read_text()) for p in sorted((tmp_path / "frames").glob("*.json"))]
    assert [(s["reason"], s["in_band"]) for s in sides] == [("periodic", True), ("uncertain", True)]
    assert keeper.counters()["frames_kept_uncertain_total"] == 1


def test_cap_in_files_holds_over_300_frames_oldest_first(tmp_path: Path) -> None:
    clock = Clock()
    keeper = _keeper(tmp_path, clock, every_s=1, max_files=25, max_mb=1000)
    folder = tmp_path / "frames"
    for i in range(300):
        clock.t = T0 + i
        keeper(_result(i))
        assert len(list(folder.glob("*.jpg"))) <= 25
    jpgs = sorted(folder.glob("*.jpg"))
    assert [int(p.stem.split("_")[1]) for p in jpgs] == list(range(275, 300))  # the newest 25 remain
    assert sorted(p.stem for p in folder.glob("*.json")) == [p.stem for p in jpgs]  # sidecars went with them
    c = keeper.counters()
    assert (c["frames_kept_total"], c["frames_deleted_total"], c["frames_stored"]) == (300, 275, 25)
    assert c["frames_stored_bytes"] == sum(p.stat().st_size for p in folder.iterdir())
    assert list(keeper.stored()) == [p.name for p in jpgs]


def test_cap_in_mb_holds_over_300_frames(tmp_path: Path) -> None:
    clock = Clock()
    keeper = _keeper(tmp_path, clock, every_s=1, max_files=10_000, max_mb=2.0)
    folder = tmp_path / "frames"
    cap = 2 * 1024 * 1024
    for i in range(300):
        clock.t = T0 + i
        keeper(_result(i))
        on_disk = sum(p.stat().st_size for p in folder.iterdir())
        assert on_disk <= cap and on_disk == keeper.counters()["frames_stored_bytes"]
    c = keeper.counters()
    frame_bytes = on_disk / c["frames_stored"]
    assert 50_000 < frame_bytes < 400_000  # a real 640x480 JPEG (+ sidecar), so the MB cap is what bites
    assert c["frames_stored"] == len(list(folder.glob("*.jpg"))) == len(list(folder.glob("*.json")))
    assert cap - on_disk < 2 * frame_bytes  # it deletes only what it must
    newest = max(int(p.stem.split("_")[1]) for p in folder.glob("*.jpg"))
    oldest = min(int(p.stem.split("_")[1]) for p in folder.glob("*.jpg"))
    assert newest == 299 and newest - oldest + 1 == c["frames_stored"]  # a contiguous run of the newest
    assert c["frames_deleted_total"] == 300 - c["frames_stored"]


def test_prefilled_folder_is_counted_at_start_and_oldest_go_first(tmp_path: Path) -> None:
    folder = tmp_path / "frames"
    folder.mkdir()
    ok, buf = cv2.imencode(".jpg", _image(0))
    for i in range(6):  # a previous run/release: foreign names, time order only in mtime
        (folder / f"frame_{5 - i:03d}.jpg").write_bytes(buf.tobytes())
        os.utime(folder / f"frame_{5 - i:03d}.jpg", (1_000_000 + i, 1_000_000 + i))
    (folder / "frame_005.json").write_text('{"reason": "periodic"}\n')  # the oldest has a sidecar
    (folder / "20240101T000000.000Z_000001.json").write_text("{}\n")  # sidecar whose image never landed
    (folder / ".20240101T000000.000Z_000002.jpg.x1y2.tmp").write_bytes(b"half")  # a crash mid-write
    (folder / "README.txt").write_text("not ours, not counted, left alone")
    expected_bytes = 6 * len(buf) + (folder / "frame_005.json").stat().st_size
    clock = Clock()
    keeper = _keeper(tmp_path, clock, every_s=1, max_files=7)
    c = keeper.counters()
    assert (c["frames_stored"], c["frames_stored_bytes"], c["frames_kept_total"]) == (6, expected_bytes, 0)
    assert _listing(folder) == ["README.txt"] + [f"frame_{i:03d}.jpg" for i in range(6)] + ["frame_005.json"]
    for i in range(3):  # 3 new frames over a cap of 7: the two oldest old ones go, with the sidecar
        clock.t = T0 + i
        keeper(_result(i))
    names = _listing(folder)
    assert "frame_005.jpg" not in names and "frame_005.json" not in names and "frame_004.jpg" not in names
    assert "frame_003.jpg" in names and "README.txt" in names
    assert keeper.counters()["frames_deleted_total"] == 2 and keeper.counters()["frames_stored"] == 7


def test_prefilled_folder_over_the_cap_is_trimmed_at_start(tmp_path: Path) -> None:
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(5):
        (folder / f"f{i}.jpg").write_bytes(b"x" * 100)
        os.utime(folder / f"f{i}.jpg", (1_000_000 + i, 1_000_000 + i))
    keeper = _keeper(tmp_path, Clock(), max_files=2)
    assert _listing(folder) == ["f3.jpg", "f4.jpg"] and keeper.counters()["frames_deleted_total"] == 3


def test_full_disk_on_the_image_rename_is_counted_and_leaves_nothing(tmp_path: Path, monkeypatch: Any,
                                                                     caplog: Any) -> None:
    # Simulated: os.replace raising ENOSPC (see the module docstring for why the OS call is patched).
    clock = Clock()
    keeper = _keeper(tmp_path, clock, every_s=1)
    folder = tmp_path / "frames"
    keeper(_result(0))  # one good frame before the disk fills
    real_replace = os.replace

    def full(src: Any, dst: Any) -> None:
        if str(dst).endswith(".jpg"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", full)
    for i in range(1, 6):  # 5 failures within a minute: counted 5 times, logged once
        clock.t = T0 + i
        keeper(_result(i))  # never raises into the loop
    assert sum("No space left" in r.getMessage() for r in caplog.records) == 1
    clock.t = T0 + 70
    keeper(_result(70))
    warnings = [r.getMessage() for r in caplog.records if "No space left" in r.getMessage()]
    assert len(warnings) == 2 and "4 more not logged" in warnings[1]
    c = keeper.counters()
    assert c["frames_write_errors_total"] == 6 and c["frames_kept_total"] == 1 and c["frames_stored"] == 1
    assert _listing(folder) == ["20240501T120304.123Z_000000.jpg", "20240501T120304.123Z_000000.json"]
    monkeypatch.setattr(os, "replace", real_replace)  # disk freed: writing resumes
    clock.t = T0 + 80
    keeper(_result(80))
    assert keeper.counters()["frames_kept_total"] == 2 and len(list(folder.glob("*.jpg"))) == 2


def test_full_disk_half_way_through_a_write_leaves_no_partial_file(tmp_path: Path, monkeypatch: Any) -> None:
    # Simulated: the image's temp file write fails after its first 4 KiB reached the disk (ENOSPC);
    # the small sidecar before it is written fine, and must be removed again.
    clock = Clock()
    keeper = _keeper(tmp_path, clock, every_s=1)
    folder = tmp_path / "frames"
    real_fdopen = os.fdopen
    temps: List[str] = []

    class HalfFull:
        def __init__(self, f: Any) -> None:
            self.f = f

        def __enter__(self) -> "HalfFull":
            return self

        def __exit__(self, *exc: Any) -> None:
            self.f.close()

        def write(self, data: bytes) -> int:
            if len(data) < 8192:  # the sidecar
                return int(self.f.write(data))
            self.f.write(data[:4096])
            self.f.flush()
            temps.extend(p.name for p in folder.iterdir() if p.name.startswith("."))
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name: str) -> Any:
            return getattr(self.f, name)

    monkeypatch.setattr(fileio.os, "fdopen", lambda fd, mode: HalfFull(real_fdopen(fd, mode)))
    keeper(_result(0))
    assert [t.endswith(".jpg." + t.split(".")[-2] + ".tmp") for t in temps] == [True]  # a partial image was there
    assert _listing(folder) == []  # ... and it is gone, and so is everything else of that frame
    assert keeper.counters()["frames_write_errors_total"] == 1 and keeper.counters()["frames_stored"] == 0


def test_sidecar_is_written_before_the_image(tmp_path: Path, monkeypatch: Any) -> None:
    order: List[str] = []
    real_replace = os.replace

    def spy(src: Any, dst: Any) -> None:
        order.append(Path(dst).suffix)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    keeper = _keeper(tmp_path, Clock(), every_s=1)
    keeper(_result(0))
    assert order == [".json", ".jpg"]


def test_rejects_bad_settings(tmp_path: Path) -> None:
    for kw in ({"band": (0.6, 0.3)}, {"band": (0.2, 1.5)}, {"max_files": 0}, {"max_mb": 0}, {"every_s": -1},
               {"jpeg_quality": 0}):
        with pytest.raises(ValueError):
            _keeper(tmp_path, Clock(), **kw)
