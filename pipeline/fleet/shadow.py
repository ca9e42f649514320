"""Shadow runs, workstation side: what to ask the device for, and whether the candidate passed.

The device runs the candidate release inside its service beside `current` on the same live
frames (`edge_runtime.shadow`, started by the device op `shadow_run`) and answers with the
comparison document. This module builds the request from the host's `shadow:` settings and the
command line, and judges the answer against the same settings (`judge`): every reason a
candidate fails is one sentence, so the rollout summary can say why a canary stopped it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

from pipeline.fleet.inventory import Host, ShadowSettings

SHADOW_ID = re.compile(r"\A[A-Za-z0-9_.-]{1,64}\Z")
LOAD_MARGIN_S = 120.0  # the candidate's model load (a Jetson engine load can take a minute) + the wait's slack
FRAMES_TIMEOUT_S = 3600.0  # a frames-only shadow on a camera that delivers nothing must still end


@dataclass(frozen=True)
class ShadowPlan:
    """How long a shadow runs: `frames` compared frames and/or `minutes`, whichever comes first.

    None for both means each host's own `shadow:` settings decide.
    """

    frames: int | None = None
    minutes: float | None = None

    def window(self, settings: ShadowSettings) -> tuple[int | None, float | None]:
        """(frames, seconds) for one host: the command line's window, else the inventory's."""
        if self.frames is None and self.minutes is None:
            return settings.frames, settings.minutes * 60.0 if settings.minutes else None
        return self.frames, self.minutes * 60.0 if self.minutes else None


def request(host: Host, shadow_id: str, candidate: str, plan: ShadowPlan, engines: str | None) -> dict[str, Any]:
    """The device's shadow request (see edge_runtime.shadow for the fields)."""
    if not SHADOW_ID.fullmatch(shadow_id):
        raise ValueError(f"shadow id {shadow_id!r}: letters, digits, '_', '.', '-' (at most 64)")
    frames, seconds = plan.window(host.shadow)
    return {"id": shadow_id, "candidate": candidate, "every_k": host.shadow.every_k, "frames": frames,
            "seconds": seconds, "engines": engines, "threads": host.shadow.threads}


def wait_timeout(req: Mapping[str, Any]) -> float:
    """How long the device op waits for the result: the window plus the model load's margin."""
    seconds = req.get("seconds")
    return (float(seconds) if seconds else FRAMES_TIMEOUT_S) + LOAD_MARGIN_S


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and \
        math.isfinite(value) else None


def judge(doc: Mapping[str, Any], settings: ShadowSettings) -> list[str]:
    """Why the candidate fails its shadow (empty: it passed), one sentence per reason.

    `doc` is the device's result document; a field it lacks is a failure, never a pass.
    """
    reasons: list[str] = []
    status = doc.get("status")
    if status != "done":
        error = doc.get("error") or "no reason given"
        reasons.append(f"the shadow did not complete (status {status!r}: {error})")
    compared = int(_num(doc.get("frames_compared")) or 0)
    if compared < settings.min_frames:
        reasons.append(f"only {compared} frame(s) compared, fewer than min_frames {settings.min_frames} (a camera "
                       "that delivers too slowly, or a candidate too slow for every_k; lengthen the shadow)")
    errors = int(_num(doc.get("errors")) or 0)
    if errors > settings.max_errors:
        samples = "; ".join(map(str, (doc.get("error_samples") or [])[:2]))
        reasons.append(f"the candidate raised {errors} error(s), more than max_errors {settings.max_errors}"
                       + (f" ({samples})" if samples else ""))
    agreement = doc.get("agreement") if isinstance(doc.get("agreement"), Mapping) else {}
    f1 = _num(agreement.get("f1"))
    seen = sum(int(_num(agreement.get(k)) or 0) for k in ("tp", "fp", "fn"))
    if f1 is None and seen:
        reasons.append("the device reported no agreement F1")
    elif f1 is not None and f1 < settings.min_f1:
        reasons.append(f"agreement with the current release F1 {f1:.3f} < min_f1 {settings.min_f1:g} (boxes at IoU "
                       f"0.5: {agreement.get('tp')} agree, {agreement.get('fp')} only the candidate's, "
                       f"{agreement.get('fn')} only current's)")
    per_class = agreement.get("per_class") if isinstance(agreement.get("per_class"), Mapping) else {}
    for name, c in sorted(per_class.items()):
        if not isinstance(c, Mapping):
            continue
        support = int(_num(c.get("tp")) or 0) + int(_num(c.get("fn")) or 0)  # current's boxes of this class
        class_f1 = _num(c.get("f1"))
        if support >= settings.min_class_support and class_f1 is not None and class_f1 < settings.min_class_f1:
            reasons.append(f"class {name!r}: F1 {class_f1:.3f} < min_class_f1 {settings.min_class_f1:g} "
                           f"({support} boxes by the current release)")
    counts = doc.get("counts") if isinstance(doc.get("counts"), Mapping) else {}
    delta = _num(counts.get("mean_abs_delta_per_frame"))
    if compared and delta is None:
        reasons.append("the device reported no detection-count delta")
    elif delta is not None and delta > settings.max_abs_count_delta:
        reasons.append(f"detections per frame differ by {delta:.2f} on average (candidate "
                       f"{counts.get('candidate_total')} vs current {counts.get('current_total')} in {compared} "
                       f"frames), more than max_abs_count_delta {settings.max_abs_count_delta:g}")
    if settings.max_p95_ratio is not None:
        latency = doc.get("latency_ms") if isinstance(doc.get("latency_ms"), Mapping) else {}
        cur = _num((latency.get("current") or {}).get("p95"))
        cand = _num((latency.get("candidate") or {}).get("p95"))
        if compared and (cur is None or cand is None):
            reasons.append("the device reported no P95 latency for both models")
        elif cur and cand is not None and cand > settings.max_p95_ratio * cur:
            reasons.append(f"candidate P95 {cand:.1f} ms is {cand / cur:.2f}x current's {cur:.1f} ms, above "
                           f"max_p95_ratio {settings.max_p95_ratio:g}")
    return reasons


def metrics(doc: Mapping[str, Any]) -> dict[str, float]:
    """The shadow's headline figures as flat MLflow metrics (`shadow_*`); absent figures are left out."""
    agreement = doc.get("agreement") if isinstance(doc.get("agreement"), Mapping) else {}
    counts = doc.get("counts") if isinstance(doc.get("counts"), Mapping) else {}
    latency = doc.get("latency_ms") if isinstance(doc.get("latency_ms"), Mapping) else {}
    values: dict[str, Any] = {
        "shadow_f1": agreement.get("f1"), "shadow_precision": agreement.get("precision"),
        "shadow_recall": agreement.get("recall"), "shadow_frames_compared": doc.get("frames_compared"),
        "shadow_frames_skipped_busy": doc.get("frames_skipped_busy"), "shadow_errors": doc.get("errors"),
        "shadow_mean_count_delta": counts.get("mean_delta_per_frame"),
        "shadow_mean_abs_count_delta": counts.get("mean_abs_delta_per_frame"),
        "shadow_duration_s": doc.get("duration_s"),
    }
    for model in ("current", "candidate"):
        for q in ("p50", "p95"):
            values[f"shadow_{model}_{q}_ms"] = (latency.get(model) or {}).get(q)
    for name, c in (agreement.get("per_class") or {}).items():
        if isinstance(c, Mapping):
            values[f"shadow_f1.{name}"] = c.get("f1")
    return {k: v for k, v in ((k, _num(v)) for k, v in values.items()) if v is not None}
