"""Shadow runs: a candidate release beside `current`, on the same live frames, inside `serve`.

Before the fleet switches a device to a new release it uploads the candidate to
`D/releases/<candidate>/` (verified, health-checked, not current) and asks the running service
to run it in shadow (the device op `deploy_ops.shadow_run` writes the request and waits):

  D/service/shadow/request.json  {"id", "candidate", "every_k", "frames", "seconds", "engines", "threads"}
  D/service/shadow/<id>.json     the comparison, once `frames` frames were compared or `seconds`
                                 passed since the candidate loaded (or the service stopped); the
                                 request is removed then

`ShadowHandler` is one of the service's result handlers. It stats the request file at most once
per `POLL_S` (never per frame) and, for a new request, starts a `ShadowRun`: a worker thread that
loads the candidate the way the service loads its own model (manifest, the service's variant or
the manifest's first, the engines folder; ONNX Runtime threads from the request) and runs it on
every `every_k`-th frame the loop handles. The handler passes (frame, current's detections,
current's inference seconds) through a one-slot hand-off; while the worker is still busy with the
previous frame the new one is skipped and counted (`frames_skipped_busy`), so the line's detector
never waits for the candidate. Candidate exceptions are counted, a few kept as samples, never
raised into the loop; a candidate that does not load ends the shadow as "failed".

The comparison (`match_frame`, `Comparison`) takes `current` as the reference: per frame, each
candidate box, highest score first, is matched to the unmatched current box of the same class
with the highest IoU >= 0.5 (TP); the candidate's other boxes are FP, current's FN. Memory is
bounded for any run length: counts per class, latencies in rolling windows, at most
`MAX_ERROR_SAMPLES` error messages, the newest `KEEP_RESULTS` result files.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .detector import Detector, default_engines_dir, load_detector, select_variant
from .fileio import atomic_write_json
from .manifest import MANIFEST_NAME, load_manifest
from .metrics import RollingWindow
from .postprocess import Detections
from .realtime import LatestSlot
from .throttled_log import ThrottledWarning

log = logging.getLogger("edge_runtime.shadow")

SHADOW_DIR = "shadow"  # <deploy_dir>/service/shadow/
REQUEST_NAME = "request.json"
REJECTED_ID = "rejected"  # the result name for a request that has no usable id
SHADOW_ID = re.compile(r"\A[A-Za-z0-9_.-]{1,64}\Z")  # = pipeline.fleet.shadow.SHADOW_ID
RESERVED_IDS = ("request", REJECTED_ID)  # their result file would be the request itself, or the rejects'
RELEASE_NAME = re.compile(r"\A[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}\Z")  # a folder of releases/, never a .partial
REQUEST_FIELDS = ("id", "candidate", "every_k", "frames", "seconds", "engines", "threads")
MAX_THREADS = 1024
IOU = 0.5
POLL_S = 1.0  # how often the handler stats request.json
WAIT_S = 0.25  # the worker's wake-up without frames: the seconds limit holds on a stalled camera too
LATENCY_WINDOW = 4096
MAX_ERROR_SAMPLES = 5
KEEP_RESULTS = 50  # result files kept in shadow/, newest first: months of shadows must not fill the disk
CLOSE_WAIT_S = 5.0  # the service's stop waits this long for the worker (systemd's stop timeout is 15 s)
STALE_REQUEST_S = 1.0  # a request older than the service by this much was left by one that died
MAX_REQUEST_BYTES = 64 * 1024  # read on the loop's handler thread: never a large file


class ShadowRequestError(ValueError):
    """A request.json that cannot be run; the message names the field and what it must be."""


@dataclasses.dataclass(frozen=True)
class ShadowRequest:
    """One shadow, as request.json asks for it (see the module docstring)."""

    id: str
    candidate: str
    every_k: int = 3
    frames: Optional[int] = None
    seconds: Optional[float] = None
    engines: Optional[str] = None
    threads: int = 1


def request_id(doc: Any) -> Optional[str]:
    """The request's id when it is usable as a result file name, else None."""
    sid = doc.get("id") if isinstance(doc, dict) else None
    return sid if isinstance(sid, str) and SHADOW_ID.match(sid) and sid not in RESERVED_IDS else None


def _int_field(doc: Dict[str, Any], key: str, lo: int, hi: int, default: Optional[int]) -> Optional[int]:
    value = doc.get(key, default)
    if value is None and default is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ShadowRequestError(f"'{key}' is {value!r}; it must be a whole number from {lo} to {hi}")
    return value


def parse_request(doc: Any) -> ShadowRequest:
    """Check a request.json document field by field; ShadowRequestError names the first problem."""
    if not isinstance(doc, dict):
        raise ShadowRequestError(f"the request is {type(doc).__name__}, not a JSON object")
    unknown = sorted(set(doc) - set(REQUEST_FIELDS))
    if unknown:
        raise ShadowRequestError(f"unknown field(s) {', '.join(unknown)}; a request has {', '.join(REQUEST_FIELDS)}")
    sid = request_id(doc)
    if sid is None:
        raise ShadowRequestError(f"'id' is {doc.get('id')!r}; it must be 1 to 64 letters, digits, '_', '.' or '-' "
                                 f"(and not {' or '.join(RESERVED_IDS)})")
    candidate = doc.get("candidate")
    if not isinstance(candidate, str) or not RELEASE_NAME.match(candidate):
        raise ShadowRequestError(f"'candidate' is {candidate!r}; it must be the name of a folder in releases/")
    seconds = doc.get("seconds")
    if seconds is not None and (not isinstance(seconds, (int, float)) or isinstance(seconds, bool)
                                or not math.isfinite(seconds) or not 0 < seconds <= 1e9):
        raise ShadowRequestError(f"'seconds' is {seconds!r}; it must be a number of seconds above 0, or null")
    frames = _int_field(doc, "frames", 1, 10 ** 9, None)
    if frames is None and seconds is None:
        raise ShadowRequestError("neither 'frames' nor 'seconds' is set: a shadow must end; set one or both")
    engines = doc.get("engines")
    if engines is not None and (not isinstance(engines, str) or not os.path.isabs(engines)):
        raise ShadowRequestError(f"'engines' is {engines!r}; it must be an absolute folder path, or null")
    return ShadowRequest(sid, candidate, _int_field(doc, "every_k", 1, 10 ** 6, 3) or 3, frames,
                         float(seconds) if seconds is not None else None, engines,
                         _int_field(doc, "threads", 1, MAX_THREADS, 1) or 1)


# --------------------------------------------------------------------------- the comparison (pure)

def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every xyxy box of `a` (N, 4) with every one of `b` (M, 4): (N, M); 0 for empty boxes."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clip(0)
    inter = wh[..., 0] * wh[..., 1]
    area_a = (a[:, 2] - a[:, 0]).clip(0) * (a[:, 3] - a[:, 1]).clip(0)
    area_b = (b[:, 2] - b[:, 0]).clip(0) * (b[:, 3] - b[:, 1]).clip(0)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def match_frame(current: Detections, candidate: Detections, iou: float = IOU) -> Dict[int, Tuple[int, int, int]]:
    """(TP, FP, FN) per class id for one frame, `current` the reference.

    Greedy by candidate score: each candidate box, highest score first, takes the still unmatched
    current box of its class with the highest IoU, if that IoU is >= `iou` (TP); unmatched
    candidate boxes are FP, unmatched current boxes FN. Classes neither model saw are absent.
    """
    cur_cls = np.asarray(current.classes, dtype=np.int64).reshape(-1)
    cand_cls = np.asarray(candidate.classes, dtype=np.int64).reshape(-1)
    cand_scores = np.asarray(candidate.scores, dtype=np.float64).reshape(-1)
    out: Dict[int, Tuple[int, int, int]] = {}
    for c in sorted(set(cur_cls.tolist()) | set(cand_cls.tolist())):
        ci = np.nonzero(cur_cls == c)[0]
        ki = np.nonzero(cand_cls == c)[0]
        tp = 0
        if ci.size and ki.size:
            ki = ki[np.argsort(-cand_scores[ki], kind="stable")]
            ious = box_iou(np.asarray(candidate.boxes)[ki], np.asarray(current.boxes)[ci])
            free = np.ones(ci.size, dtype=bool)
            for row in ious:
                open_row = np.where(free, row, -1.0)
                j = int(open_row.argmax())
                if open_row[j] >= iou:
                    free[j] = False
                    tp += 1
        out[int(c)] = (tp, int(ki.size) - tp, int(ci.size) - tp)
    return out


def _ratio(num: float, den: float) -> Optional[float]:
    return round(num / den, 4) if den else None


def rates(tp: int, fp: int, fn: int) -> Dict[str, Optional[float]]:
    """Precision, recall and F1 = 2TP / (2TP + FP + FN); each None where its denominator is 0."""
    return {"precision": _ratio(tp, tp + fp), "recall": _ratio(tp, tp + fn), "f1": _ratio(2 * tp, 2 * tp + fp + fn)}


class Comparison:
    """The running comparison of one shadow: agreement, detection counts, latencies (bounded memory)."""

    def __init__(self, class_names: Sequence[str], iou: float = IOU, window: int = LATENCY_WINDOW) -> None:
        self.class_names = list(class_names)
        self.iou = iou
        self.frames = 0
        self.match: Dict[int, List[int]] = {}  # class id -> [tp, fp, fn]; as many keys as classes
        self.current_count: Dict[int, int] = {}
        self.candidate_count: Dict[int, int] = {}
        self.abs_delta = 0
        self.latency = {"current": RollingWindow(window), "candidate": RollingWindow(window)}

    def add(self, current: Detections, candidate: Detections, current_s: Optional[float] = None,
            candidate_s: Optional[float] = None) -> None:
        """Account one frame both models saw (latencies in seconds, None when not measured)."""
        for c, (tp, fp, fn) in match_frame(current, candidate, self.iou).items():
            acc = self.match.setdefault(c, [0, 0, 0])
            acc[0] += tp
            acc[1] += fp
            acc[2] += fn
        for counts, dets in ((self.current_count, current), (self.candidate_count, candidate)):
            for c in np.asarray(dets.classes, dtype=np.int64).reshape(-1).tolist():
                counts[c] = counts.get(c, 0) + 1
        self.abs_delta += abs(len(candidate) - len(current))
        for name, value in (("current", current_s), ("candidate", candidate_s)):
            if value is not None:
                self.latency[name].add(value)
        self.frames += 1

    def name(self, cls: int) -> str:
        """The current manifest's name of class id `cls` (its number where the manifest has none)."""
        return self.class_names[cls] if 0 <= cls < len(self.class_names) else str(cls)

    def to_json(self) -> Dict[str, Any]:
        """{"agreement", "counts", "latency_ms"} as the result document carries them."""
        classes = sorted(set(range(len(self.class_names))) | set(self.match) | set(self.current_count)
                         | set(self.candidate_count))
        tp, fp, fn = (sum(v[i] for v in self.match.values()) for i in range(3))
        per_class = {}
        for c in classes:
            ctp, cfp, cfn = self.match.get(c, (0, 0, 0))
            per_class[self.name(c)] = {"tp": ctp, "fp": cfp, "fn": cfn, **rates(ctp, cfp, cfn)}
        agreement = {"iou": self.iou, "tp": tp, "fp": fp, "fn": fn, **rates(tp, fp, fn),
                     "note": "no detections" if tp + fp + fn == 0 else "", "per_class": per_class}
        cur_total, cand_total = sum(self.current_count.values()), sum(self.candidate_count.values())
        counts = {"current_total": cur_total, "candidate_total": cand_total,
                  "mean_delta_per_frame": _ratio(cand_total - cur_total, self.frames),
                  "mean_abs_delta_per_frame": _ratio(self.abs_delta, self.frames),
                  "per_class": {self.name(c): {"current": self.current_count.get(c, 0),
                                               "candidate": self.candidate_count.get(c, 0),
                                               "delta": self.candidate_count.get(c, 0) - self.current_count.get(c, 0)}
                                for c in classes}}
        latency = {}
        for name, window in self.latency.items():
            p = window.percentiles_ms()
            latency[name] = {"p50": p["p50"], "p95": p["p95"], "n": int(window.values().shape[0])}
        return {"agreement": agreement, "counts": counts, "latency_ms": latency}


# --------------------------------------------------------------------------- one shadow run

Loader = Callable[[Path, Optional[str], Optional[Path], int], Detector]


def load_candidate(release_dir: Path, variant: Optional[str], engines: Optional[Path], threads: int) -> Detector:
    """The candidate's detector, loaded as `serve` loads its own (ONNX Runtime threads from the request)."""
    manifest = load_manifest(release_dir)
    manifest = dataclasses.replace(manifest, ort=dataclasses.replace(manifest.ort, threads=threads))
    return load_detector(release_dir, manifest, select_variant(manifest, variant), engines)


def result_document(sid: Optional[str], candidate: Any, current: str, status: str, error: str, started_at: float,
                    duration_s: float, every_k: Any, comparison: Comparison, **counts: Any) -> Dict[str, Any]:
    """The <id>.json document (module docstring); `counts`: frames_offered, frames_skipped_busy,
    load_s, errors, error_samples (0 / None / [] when not given)."""
    doc: Dict[str, Any] = {
        "id": sid, "candidate": candidate, "current": current, "status": status, "error": error,
        "started_at": round(started_at, 3), "duration_s": round(duration_s, 3), "load_s": counts.get("load_s"),
        "every_k": every_k, "frames_offered": counts.get("frames_offered", 0), "frames_compared": comparison.frames,
        "frames_skipped_busy": counts.get("frames_skipped_busy", 0), "errors": counts.get("errors", 0),
        "error_samples": list(counts.get("error_samples", []))[:MAX_ERROR_SAMPLES],
    }
    doc.update(comparison.to_json())
    return doc


class Totals:
    """What /metrics counts over every shadow of this service (written by the worker threads, which
    run one at a time)."""

    def __init__(self) -> None:
        self.compared = 0
        self.errors = 0


class ShadowRun:
    """One shadow: the worker thread (the only one that touches the candidate's model), the
    one-slot hand-off to it, and the figures. `offer` is called from the loop's handler thread."""

    def __init__(self, req: ShadowRequest, shadow_dir: Path, release_dir: Path, current: str,
                 class_names: Sequence[str], variant: Optional[str], loader: Loader = load_candidate,
                 after: Optional["ShadowRun"] = None, totals: Optional[Totals] = None) -> None:
        self.req = req
        self.shadow_dir = shadow_dir
        self.release_dir = release_dir
        self.current = current
        self.variant = variant
        self.engines = Path(req.engines) if req.engines else default_engines_dir(release_dir)
        self.comparison = Comparison(class_names)
        self.totals = totals or Totals()
        self.state = "loading"  # -> running -> done | failed | stopped
        self.started_at = time.time()
        self._t0 = time.monotonic()
        self.load_s: Optional[float] = None
        self.frames_offered = 0
        self.frames_skipped_busy = 0
        self.frame_errors = 0  # inference/comparison exceptions: they count toward `frames` too
        self.errors = 0
        self.error_samples: List[str] = []
        self._loader = loader
        self._after = after
        self._handled = 0
        self._busy = False  # set by `offer`, cleared by the worker when it is done with that frame
        self._slot: LatestSlot[Tuple[Any, Detections, float]] = LatestSlot()
        self._stop = threading.Event()
        self._stop_reason = ""
        self._lock = threading.Lock()
        self.finished = False
        self._thread = threading.Thread(target=self._main, name=f"shadow-{req.id}", daemon=True)

    # ----------------------------------------------------------------- called from other threads

    def start(self) -> None:
        """Start the worker (it waits for the previous shadow's worker to end first)."""
        self._thread.start()

    def offer(self, r: Any) -> None:
        """One handled `realtime.Result`: every `every_k`-th goes to the worker unless it is busy."""
        if self.state != "running" or self._stop.is_set():
            return
        self._handled += 1
        if self._handled % self.req.every_k:
            return
        self.frames_offered += 1
        if self._busy:
            self.frames_skipped_busy += 1
            return
        self._busy = True
        # The loop never writes into a frame's image after capture: handing over the reference is safe.
        self._slot.put((r.frame.image, r.detections, r.t_infer_done - r.t_infer_start))

    def stop(self, reason: str) -> None:
        """End the shadow as "stopped" (unless it is done already); the worker writes the result."""
        if not self._stop.is_set():
            self._stop_reason = reason
            self._stop.set()
        self._slot.close()

    def join(self, timeout: Optional[float] = None) -> bool:
        """Wait for the worker; True when it has ended."""
        if self._thread.ident is not None:
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def finish_now(self) -> None:
        """Write the "stopped" result now (the service is stopping and the worker is still loading)."""
        self._finish("stopped", self._stop_reason or "the service stopped")

    def status(self) -> Dict[str, Any]:
        """What /healthz shows while the shadow runs."""
        return {"id": self.req.id, "candidate": self.req.candidate, "status": self.state,
                "frames_compared": self.comparison.frames, "target": self.req.frames, "seconds": self.req.seconds,
                "elapsed_s": round(time.monotonic() - self._t0, 1), "errors": self.errors}

    # ----------------------------------------------------------------- the worker

    def _error(self, where: str, e: BaseException) -> None:
        self.errors += 1
        self.totals.errors += 1
        if len(self.error_samples) < MAX_ERROR_SAMPLES:
            self.error_samples.append(f"{where}: {type(e).__name__}: {e}"[:500])

    def _main(self) -> None:
        if self._after is not None:
            self._after.join(CLOSE_WAIT_S)  # one candidate model in memory at a time
        detector: Optional[Detector] = None
        status, error = "stopped", ""
        try:
            if self._stop.is_set():
                return
            try:
                detector = self._loader(self.release_dir, self.variant, self.engines, self.req.threads)
            except Exception as e:  # noqa: BLE001 - a candidate that does not load ends its shadow, never the service
                self._error("load", e)
                status, error = "failed", f"the candidate {self.req.candidate} did not load: {type(e).__name__}: {e}"
                return
            self.load_s = round(time.monotonic() - self._t0, 3)
            if self._stop.is_set():
                return
            self.state = "running"
            status, error = self._compare(detector)
        finally:
            if detector is not None:
                try:
                    detector.backend.close()
                except Exception as e:  # noqa: BLE001 - the result must still be written
                    log.warning("shadow %s: closing the candidate failed: %s", self.req.id, e)
            if status == "stopped" and not error:
                error = self._stop_reason or "stopped"
            self._finish(status, error)

    def _compare(self, detector: Detector) -> Tuple[str, str]:
        """Compare frames until the request's frames or seconds are reached, or `stop`."""
        req = self.req
        t_loaded = time.monotonic()
        while not self._stop.is_set():
            if req.seconds is not None and time.monotonic() - t_loaded >= req.seconds:
                return "done", ""
            item = self._slot.get(timeout=WAIT_S)
            if item is None:
                continue
            image, current, current_s = item
            try:
                t0 = time.perf_counter()
                dets, _ = detector.detect(image)
                candidate_s = time.perf_counter() - t0
                with self._lock:  # `finish_now` may be writing the result from the stopping service's thread
                    if self.finished:
                        break
                    self.comparison.add(current, dets, current_s, candidate_s)
                self.totals.compared += 1
            except Exception as e:  # noqa: BLE001 - counted: the candidate's failure is the finding
                self.frame_errors += 1
                self._error("frame", e)
            finally:
                self._busy = False
            if req.frames is not None and self.comparison.frames + self.frame_errors >= req.frames:
                return "done", ""
        return "stopped", self._stop_reason

    def _finish(self, status: str, error: str) -> None:
        """Write the result (once), remove the request if it is still ours, prune old results."""
        with self._lock:
            if self.finished:
                return
            self.finished = True
            doc = result_document(self.req.id, self.req.candidate, self.current, status, error, self.started_at,
                                  time.monotonic() - self._t0, self.req.every_k, self.comparison,
                                  frames_offered=self.frames_offered, frames_skipped_busy=self.frames_skipped_busy,
                                  load_s=self.load_s, errors=self.errors, error_samples=self.error_samples)
        self.state = status
        write_result(self.shadow_dir, self.req.id, doc)
        log.warning("shadow %s of %s %s: %d frame(s) compared, F1 %s%s", self.req.id, self.req.candidate, status,
                    doc["frames_compared"], doc["agreement"]["f1"], f" ({error})" if error else "")


def remove_request(shadow_dir: Path, sid: Optional[str]) -> None:
    """Remove request.json if it still asks for `sid` (None: if it has no usable id); a newer
    request that replaced it in the meantime stays."""
    request = shadow_dir / REQUEST_NAME
    try:
        holds = request_id(json.loads(request.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        holds = None
    if holds == sid:
        try:
            request.unlink()
        except OSError:
            pass


def write_result(shadow_dir: Path, sid: str, doc: Dict[str, Any]) -> None:
    """Write <sid>.json atomically, then remove request.json if it still asks for `sid`; keep the
    newest `KEEP_RESULTS` results. Disk errors are logged, never raised into the service."""
    try:
        atomic_write_json(shadow_dir / f"{sid}.json", doc)
    except OSError as e:
        log.warning("shadow %s: cannot write its result in %s: %s", sid, shadow_dir, e)
    remove_request(shadow_dir, sid if sid != REJECTED_ID else None)
    try:
        results = sorted((p for p in shadow_dir.glob("*.json") if p.name != REQUEST_NAME),
                         key=lambda p: p.stat().st_mtime, reverse=True)
        for old in results[KEEP_RESULTS:]:
            old.unlink()
    except OSError:
        pass  # one vanished between listing and stat: the next shadow prunes again


# --------------------------------------------------------------------------- the service's handler

def deploy_dir_of(release_dir: Path) -> Optional[Path]:
    """`D` for a release at `D/releases/<name>` (after symlinks such as `current`), else None."""
    real = Path(release_dir).resolve()
    return real.parent.parent if real.parent.name == "releases" else None


class ShadowHandler:
    """The service's result handler that runs shadow requests, at most one at a time.

    Never raises into the loop and never blocks it: a poll of request.json at most once per
    `poll_s`, and per frame a counter and, for every `every_k`-th, a hand-off to the worker.
    """

    def __init__(self, deploy_dir: Path, current: str, class_names: Sequence[str], variant: Optional[str],
                 loader: Loader = load_candidate, poll_s: float = POLL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.dir = deploy_dir / "service" / SHADOW_DIR
        self.releases = deploy_dir / "releases"
        self.current = current
        self.class_names = list(class_names)
        self.variant = variant
        self.loader = loader
        self.poll_s = poll_s
        self.clock = clock
        self.started_wall = time.time()
        self.totals = Totals()
        self.run: Optional[ShadowRun] = None
        self._seen: Optional[Tuple[int, int, int]] = None
        self._next_poll = -math.inf
        self._warn = ThrottledWarning(log, time.monotonic)

    @property
    def request_path(self) -> Path:
        """Where the device op writes the request."""
        return self.dir / REQUEST_NAME

    def __call__(self, r: Any) -> None:
        try:
            now = self.clock()
            if now >= self._next_poll:
                self._next_poll = now + self.poll_s
                self._poll()
            run = self.run
            if run is not None:
                run.offer(r)
        except Exception as e:  # noqa: BLE001 - a shadow's trouble must never disturb the line's loop
            self._warn.warn(f"shadow: {type(e).__name__}: {e}")

    def _poll(self) -> None:
        """Notice a new, replaced or withdrawn request."""
        run = self.run if self.run is not None and not self.run.finished else None
        try:
            st = os.stat(self.request_path)
        except FileNotFoundError:
            self._seen = None
            if run is not None:
                run.stop(f"the request was withdrawn ({REQUEST_NAME} removed)")
            return
        key = (st.st_mtime_ns, st.st_size, st.st_ino)
        if key == self._seen:
            return
        self._seen = key
        doc: Any = None
        problem = ""
        if st.st_size > MAX_REQUEST_BYTES:
            problem = f"{REQUEST_NAME} has {st.st_size} bytes; a request is a few hundred"
        else:
            try:
                doc = json.loads(self.request_path.read_text(encoding="utf-8"))
            except FileNotFoundError:
                self._seen = None
                return
            except (OSError, ValueError) as e:
                problem = f"{REQUEST_NAME} is not readable JSON ({e})"
        sid = request_id(doc)
        if run is not None:
            if sid == run.req.id:
                return  # the same request written again: it is running
            run.stop(f"replaced by request {sid or '(without a usable id)'}")
        if st.st_mtime < self.started_wall - STALE_REQUEST_S:
            # Left by a service that died during its shadow, perhaps killed by this very candidate:
            # never run it again. No result either: the device op, if it still waits, sees the new
            # pid and reports the crash.
            log.warning("shadow request %s is older than this service: withdrawn, not run", sid or "(no usable id)")
            remove_request(self.dir, sid)
            return
        req = None
        if not problem:
            try:
                req = self._check_candidate(parse_request(doc))
            except ShadowRequestError as e:
                problem = str(e)
        if req is None:
            self._reject(sid, doc, problem)
            return
        self.run = ShadowRun(req, self.dir, self.releases / req.candidate, self.current, self.class_names,
                             self.variant, self.loader, after=self.run, totals=self.totals)
        self.run.start()
        log.warning("shadow %s: candidate %s beside %s, every_k %d, frames %s, seconds %s",
                    req.id, req.candidate, self.current, req.every_k, req.frames, req.seconds)

    def _check_candidate(self, req: ShadowRequest) -> ShadowRequest:
        manifest = self.releases / req.candidate / MANIFEST_NAME
        if not manifest.is_file():
            raise ShadowRequestError(f"candidate {req.candidate} is not a release on this device (no {manifest}); "
                                     "upload it first (fab shadow stages it)")
        return req

    def _reject(self, sid: Optional[str], doc: Any, problem: str) -> None:
        """A "failed" result for a request that cannot run, named after its id (`rejected.json` without one)."""
        log.warning("shadow request %s refused: %s", sid or "(no usable id)", problem)
        raw = doc if isinstance(doc, dict) else {}
        now = time.time()
        every_k = raw.get("every_k") if isinstance(raw.get("every_k"), int) else None
        result = result_document(sid, raw.get("candidate"), self.current, "failed",
                                 f"request refused: {problem}", now, 0.0, every_k, Comparison(self.class_names))
        write_result(self.dir, sid or REJECTED_ID, result)

    def status(self) -> Optional[Dict[str, Any]]:
        """/healthz's `shadow`: None when idle, else the running shadow's progress."""
        run = self.run
        return run.status() if run is not None and not run.finished else None

    def metrics(self) -> Dict[str, float]:
        """Counters over every shadow of this service, and whether one is running."""
        return {"frames_compared_total": self.totals.compared, "errors_total": self.totals.errors,
                "active": 1 if self.status() is not None else 0}

    def close(self) -> None:
        """The service stops: end a running shadow as "stopped", keeping its figures so far."""
        run = self.run
        if run is None or run.finished:
            return
        run.stop("the service stopped")
        if not run.join(CLOSE_WAIT_S):
            run.finish_now()  # still loading (a TensorRT engine can take minutes): write what there is
