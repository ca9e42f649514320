"""The device service's settings: `<deploy_dir>/service/service.json`, written by `fab deploy`.

The fleet validates the same fields from `inventory.yaml` (its `service:` section) before any
host is contacted; this module checks them again on the device, because the file may also be
written by hand. Every field is required; a wrong type, an unknown key or a value out of range
is one `ServiceConfigError` naming the file, the field and the fix.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

SERVICE_DIR = "service"  # under the deploy dir: config, logs, pid and state files of the service
CONFIG_NAME = "service.json"


class ServiceConfigError(ValueError):
    """service.json is missing, malformed, or has a value out of range."""


@dataclass(frozen=True)
class ServiceConfig:
    """What `serve` runs: the source, where results go, HTTP, and the frame sample kept on disk."""

    device: str  # host name (MQTT topic, metrics labels)
    source: str  # camera index ("0"), video file, image folder or synthetic[:WxH]
    fps: Optional[float]  # pace the source (files, synthetic); None = its own rate
    http_bind: str  # 127.0.0.1 unless the inventory opens it
    http_port: int
    stall_s: float  # /healthz says 503 when no frame was captured or inferred for this long
    jsonl_max_mb: float  # detections.jsonl rotates at this size ...
    jsonl_backups: int  # ... keeping this many old files
    mqtt_host: str  # "" = no MQTT
    mqtt_port: int
    mqtt_topic: str  # "" = edge-defect/<device>/detections
    mqtt_queue: int  # messages held while the broker is away (oldest dropped beyond)
    frames_dir: str  # where the frame sample goes (fab collect-frames pulls from here)
    frames_every_s: float  # keep one frame every N seconds (0 = off)
    frames_band: Tuple[float, float]  # keep frames whose best score is in [lo, hi) (worth labelling)
    frames_max_files: int
    frames_max_mb: float
    actuator: str  # "" or module:function called with every result
    variant: Optional[str]  # manifest variant to start on; None = the first

    @property
    def topic(self) -> str:
        """The device's MQTT topic."""
        return self.mqtt_topic or f"edge-defect/{self.device}/detections"


_NUMBER = (int, float)


def _check(where: str, name: str, value: Any) -> Any:
    """Type and range of one field; returns the normalised value."""
    def bad(why: str) -> ServiceConfigError:
        return ServiceConfigError(f"{where}: field '{name}' {why}; fix it in inventory.yaml's service section and "
                                  "redeploy (or edit the file and restart the service)")

    def number(lo: float, hi: float = math.inf, integer: bool = False, lo_open: bool = False) -> float:
        if isinstance(value, bool) or not isinstance(value, int if integer else _NUMBER):
            raise bad(f"is {value!r}, not {'an integer' if integer else 'a number'}")
        if not math.isfinite(value) or value < lo or value > hi or (lo_open and value == lo):
            raise bad(f"is {value!r}, outside {'(' if lo_open else '['}{lo:g}, {hi:g}]")
        return value

    def text(empty_ok: bool) -> str:
        if not isinstance(value, str) or (not value and not empty_ok) or value != value.strip():
            raise bad(f"is {value!r}, not a {'' if empty_ok else 'non-empty '}string without surrounding spaces")
        return value

    if name in ("device", "source", "http_bind", "frames_dir"):
        return text(False)
    if name in ("mqtt_host", "mqtt_topic", "actuator"):
        return text(True)
    if name == "fps":
        return None if value is None else float(number(0.0, 1000.0, lo_open=True))
    if name in ("http_port", "mqtt_port"):
        return int(number(1, 65535, integer=True))
    if name == "stall_s":
        return float(number(0.1, 3600.0))
    if name in ("jsonl_max_mb", "frames_max_mb"):
        return float(number(0.0, 1e6, lo_open=True))
    if name in ("jsonl_backups",):
        return int(number(0, 1000, integer=True))
    if name in ("mqtt_queue", "frames_max_files"):
        return int(number(1, 10_000_000, integer=True))
    if name == "frames_every_s":
        return float(number(0.0, 86400.0))
    if name == "frames_band":
        if (not isinstance(value, list) or len(value) != 2
                or not all(isinstance(v, _NUMBER) and not isinstance(v, bool) for v in value)):
            raise bad(f"is {value!r}, not a list [lo, hi] of two numbers")
        lo, hi = float(value[0]), float(value[1])
        if not (0.0 <= lo < hi <= 1.0):
            raise bad(f"is {value!r}: need 0 <= lo < hi <= 1")
        return (lo, hi)
    if name == "variant":
        return None if value is None else text(False)
    raise AssertionError(name)  # every dataclass field has a rule above


def config_from_json(doc: Any, where: str = CONFIG_NAME) -> ServiceConfig:
    """Validate a parsed service.json document."""
    if not isinstance(doc, dict):
        raise ServiceConfigError(f"{where}: expected a JSON object of service settings")
    names = [f.name for f in fields(ServiceConfig)]
    unknown = sorted(set(doc) - set(names))
    if unknown:
        raise ServiceConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; valid fields: {', '.join(names)}")
    missing = [n for n in names if n not in doc]
    if missing:
        raise ServiceConfigError(f"{where}: missing field(s) {', '.join(missing)}; redeploy to rewrite the file")
    return ServiceConfig(**{n: _check(where, n, doc[n]) for n in names})


def load_service_config(path: "Path | str") -> ServiceConfig:
    """Read and validate service.json."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ServiceConfigError(f"{p}: not found; `fab deploy` writes it, or pass --config FILE") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ServiceConfigError(f"{p}: not valid JSON ({e}); redeploy to rewrite it") from None
    return config_from_json(doc, str(p))


def config_to_json(cfg: ServiceConfig) -> Dict[str, Any]:
    """The JSON document for a config (what the deploy writes)."""
    doc = {f.name: getattr(cfg, f.name) for f in fields(ServiceConfig)}
    doc["frames_band"] = list(cfg.frames_band)
    return doc
