"""Load and validate `inventory.yaml`: groups of hosts, group defaults, per-host overrides.

A host's fields are the top-level `defaults:`, then its group's `defaults:`, then its own values
(later wins; `null` unsets). The nested `service:` mapping (the detector as a supervised service,
`ServiceSettings`) and `shadow:` mapping (how a candidate is judged in shadow, `ShadowSettings`)
are merged key by key the same way, so a host can change one setting without repeating the
others. The merged fields are validated by a strict pydantic model
(`_HostFields`: exact types, no unknown or missing field, ranges for what reaches the device) and
become a frozen `Host` record. Every problem is one `InventoryError` line naming the file, the
host and its group, and the field, and saying how to fix it.

Every value that ends up in a remote command (addresses, users, paths, the remote python) must
match a conservative allow-list of characters, so a hostile or mistyped inventory cannot inject
shell syntax (or a newline) even before quoting (every remote command is also `shlex.quote`d;
this is the second fence). `deploy_dir` may not be `/`, a system folder or climb out with `..`:
the deploy creates, re-links and deletes files under it. Two names for one device (same address,
port and deploy folder) are refused too: their deploys would overwrite each other.
"""

from __future__ import annotations

import ipaddress
import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, get_args

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from pipeline.config.params import DuplicateKeyError, Problem, load_yaml, problems, rule

Kind = Literal["pi", "jetson", "local"]
Runtime = Literal["onnxruntime", "tensorrt"]
Precision = Literal["int8", "fp16", "fp32"]
KINDS: tuple[str, ...] = get_args(Kind)
RUNTIMES: tuple[str, ...] = get_args(Runtime)
# ONNX Runtime on a CPU has no fp16 path worth shipping; TensorRT builds all three.
PRECISIONS_BY_RUNTIME = {"onnxruntime": ("int8", "fp32"), "tensorrt": ("fp16", "int8", "fp32")}
# Letters, digits and the punctuation paths, hostnames and IPv6 need; nothing a shell acts on.
# \A...\Z, not ^...$: `$` also matches before a trailing newline, which would let "x\n" through.
SAFE_VALUE = re.compile(r"\A[A-Za-z0-9_.,:/@%+=-]+\Z")
SAFE_NAME = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.-]*\Z")
TOP_LEVEL_KEYS = ("settings", "defaults", "groups")
# deploy_dir may not be one of these folders (the deploy writes and deletes files in it) ...
SYSTEM_FOLDERS = frozenset({
    "/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64", "/libx32", "/media", "/mnt",
    "/opt", "/proc", "/root", "/run", "/sbin", "/srv", "/sys", "/tmp", "/usr", "/usr/bin", "/usr/lib",
    "/usr/local", "/usr/sbin", "/usr/share", "/var", "/var/lib", "/var/log", "/var/tmp",
})
# ... nor anything inside these (kernel filesystems and the OS itself: never an application's).
SYSTEM_TREES = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc", "/sbin", "/sys",
                "/usr/bin", "/usr/lib", "/usr/sbin")
_SAFE_HELP = ("use only letters, digits and _ . , : / @ % + = - (device paths: absolute, or relative to the "
              "login's home; '~' is not expanded in quoted commands)")


class InventoryError(ValueError):
    """The inventory is malformed: one line per problem, naming the file, the host (or group) and the field."""


@dataclass(frozen=True)
class Settings:
    """Fleet-wide settings (the `settings:` section)."""

    concurrency: int = 16  # hosts deployed at once; bounded so a big fleet cannot exhaust sockets
    known_hosts: str = "~/.ssh/known_hosts"  # host keys are verified against this file
    connect_timeout_s: float = 10.0


# --------------------------------------------------------------------------------------------
# Field checks
# --------------------------------------------------------------------------------------------


def _refuse_unsafe(value: str, checked: str) -> None:
    """Refuse `value` unless `checked` (the part of it that matters) is only allow-listed characters."""
    if not SAFE_VALUE.fullmatch(checked):
        bad = sorted({c for c in checked if not SAFE_VALUE.fullmatch(c)})
        raise ValueError(f"value {value!r} contains shell metacharacter(s), whitespace or control characters "
                         f"{' '.join(repr(c) for c in bad)}; {_SAFE_HELP}")


def _shell_safe(value: str) -> str:
    if not value:
        raise ValueError("is empty; set it")
    _refuse_unsafe(value, value)
    if value.startswith("-"):  # ssh, python and cd would read it as an option ("-oProxyCommand=...")
        raise ValueError(f"is {value!r}, which starts with '-' and would be read as a command-line option; "
                         "give a name or path that does not start with '-'")
    return value


def _shell_safe_or_empty(value: str) -> str:
    return _shell_safe(value) if value else value


def _local_path(value: str) -> str:
    # A path on THIS machine (never sent to a shell): `~/` is expanded here, so it is allowed.
    checked = value[2:] if value.startswith("~/") else value
    if not checked:
        raise ValueError(f"is {value!r}; give the path of a file")
    _refuse_unsafe(value, checked)
    return value


def _deploy_dir(value: str) -> str:
    if ".." in value.split("/"):
        raise ValueError(f"is {value!r}: a '..' component climbs out of the folder; give the deploy folder itself "
                         "(absolute, or relative to the login's home)")
    norm = posixpath.normpath(value)
    if norm.startswith("//"):  # POSIX keeps a leading '//' (implementation-defined); it still means '/'
        norm = "/" + norm.lstrip("/")
    if norm == "." or norm in SYSTEM_FOLDERS or any(norm.startswith(t + "/") for t in SYSTEM_TREES):
        what = "the login's home (or the inventory's folder) itself" if norm == "." else "a system folder"
        raise ValueError(f"is {value!r}, {what}: the deploy creates, re-links and deletes files under deploy_dir; "
                         "use a folder of its own, e.g. /home/<user>/edge-defect")
    return value


def _frames_dir(value: str) -> str:
    return _deploy_dir(value) if value else value


ShellSafe = Annotated[str, AfterValidator(_shell_safe)]
ShellSafeOrEmpty = Annotated[str, AfterValidator(_shell_safe_or_empty)]


class _Strict(BaseModel):
    """Exact types (no "22" for 22), no unknown keys, finite floats."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)


# --------------------------------------------------------------------------------------------
# The service section
# --------------------------------------------------------------------------------------------

CAMERA_SOURCE = re.compile(r"\A[0-9]{1,3}\Z")
SYNTHETIC_SOURCE = re.compile(r"\Asynthetic(:[1-9][0-9]{0,4}x[1-9][0-9]{0,4})?\Z")
ACTUATOR = re.compile(r"\A[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*\Z")
MQTT_TOPIC = re.compile(r"\A[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*\Z")  # a publish topic: no wildcards, no spaces
# Required in an enabled service section (the others have the defaults below).
SERVICE_REQUIRED = ("source", "http_port", "stall_s", "jsonl_max_mb", "jsonl_backups", "frames_every_s",
                    "frames_band", "frames_max_files", "frames_max_mb", "healthy_timeout_s", "watchdog_s",
                    "restart_s")


def _is_camera_or_synthetic(value: str) -> bool:
    return bool(CAMERA_SOURCE.fullmatch(value) or SYNTHETIC_SOURCE.fullmatch(value))


def _source(value: str) -> str:
    if value.startswith("synthetic") and not SYNTHETIC_SOURCE.fullmatch(value):
        raise ValueError(f"is {value!r}; a synthetic source is 'synthetic' or 'synthetic:WxH' (e.g. synthetic:640x480)")
    return _shell_safe(value)


def _http_bind(value: str) -> str:
    if value != "localhost":
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise ValueError(f"is {value!r}; give an IP address of the device (127.0.0.1 = this device only, "
                             "0.0.0.0 = every interface)") from None
    # ipaddress accepts any IPv6 scope id ("fe80::1%<anything>"): the value still reaches a remote command.
    return _shell_safe(value)


def _pattern(regex: re.Pattern[str], what: str) -> Any:
    def check(value: str) -> str:
        if value and not regex.fullmatch(value):
            raise ValueError(f"is {value!r}; {what}")
        return value
    return AfterValidator(check)


def _pair(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


class ServiceSettings(_Strict):
    """A host's `service:` section: how `python -m edge_runtime serve` runs on it.

    The fields of `<deploy_dir>/service/service.json` (the runtime's `service_config.ServiceConfig`
    checks them again on the device) except `device` (the host's name) and `frames_dir` (the
    host's own `frames_dir`, so `fab collect-frames` pulls from where the service writes), plus
    what the deploy and the supervisors need: `enabled`, `supervisor`, `healthy_timeout_s`,
    `watchdog_s`, `restart_s`. With `enabled: false` nothing else is required.
    """

    enabled: bool = True
    supervisor: Literal["auto", "systemd", "runtime"] = "auto"
    source: Annotated[str, AfterValidator(_source)] | None = None
    fps: float | None = Field(default=None, gt=0.0, le=1000.0)
    http_bind: Annotated[str, AfterValidator(_http_bind)] = "127.0.0.1"
    http_port: int | None = Field(default=None, ge=1, le=65535)
    stall_s: float | None = Field(default=None, ge=0.1, le=3600.0)
    jsonl_max_mb: float | None = Field(default=None, ge=1.0, le=1e6)
    jsonl_backups: int | None = Field(default=None, ge=0, le=1000)
    mqtt_host: ShellSafeOrEmpty = ""
    mqtt_port: int = Field(default=1883, ge=1, le=65535)
    mqtt_topic: Annotated[str, _pattern(MQTT_TOPIC, "use letters, digits, '_', '.', '-' between '/' (no wildcards); "
                                                    "'' = edge-defect/<host>/detections")] = ""
    mqtt_queue: int = Field(default=1000, ge=1, le=10_000_000)
    frames_every_s: float | None = Field(default=None, ge=0.0, le=86400.0)
    frames_band: Annotated[tuple[float, float], BeforeValidator(_pair)] | None = None
    frames_max_files: int | None = Field(default=None, ge=1, le=10_000_000)
    frames_max_mb: float | None = Field(default=None, ge=1.0, le=1e6)
    actuator: Annotated[str, _pattern(ACTUATOR, "give module:function (a Python module on the device's path), "
                                                "or '' for none")] = ""
    variant: Annotated[str, _pattern(SAFE_NAME, "give a variant name from the release's manifest, or null for "
                                                "its first")] | None = None
    healthy_timeout_s: float | None = Field(default=None, gt=0.0, le=3600.0)
    watchdog_s: float | None = Field(default=None, ge=0.0, le=3600.0)
    restart_s: float | None = Field(default=None, ge=0.1, le=600.0)

    @model_validator(mode="after")
    def _complete(self) -> ServiceSettings:
        if not self.enabled:
            return self
        missing = [n for n in SERVICE_REQUIRED if getattr(self, n) is None]
        if len(missing) == 1:
            raise rule(missing[0], "is missing: set it in the service section (or set 'enabled: false')")
        if missing:
            raise rule("", f"is missing {', '.join(missing)}: set them in the service section "
                           "(or set 'enabled: false')")
        lo, hi = self.frames_band or (0.0, 0.0)
        if not 0.0 <= lo < hi <= 1.0:
            raise rule("frames_band", f"is [{lo:g}, {hi:g}]: need 0 <= lo < hi <= 1 (a band of detection scores)")
        if self.watchdog_s and self.stall_s and self.watchdog_s <= self.stall_s:
            raise rule("watchdog_s", f"is {self.watchdog_s:g}, not above stall_s ({self.stall_s:g}): the watchdog "
                                     "acts on a service /healthz already calls stalled, so it must wait longer; "
                                     "0 turns it off")
        return self

    def config(self, device: str, frames_dir: str) -> dict[str, Any]:
        """The service.json document for a host (exactly the fields `serve` accepts)."""
        return {"device": device, "source": self.source, "fps": self.fps, "http_bind": self.http_bind,
                "http_port": self.http_port, "stall_s": self.stall_s, "jsonl_max_mb": self.jsonl_max_mb,
                "jsonl_backups": self.jsonl_backups, "mqtt_host": self.mqtt_host, "mqtt_port": self.mqtt_port,
                "mqtt_topic": self.mqtt_topic, "mqtt_queue": self.mqtt_queue, "frames_dir": frames_dir,
                "frames_every_s": self.frames_every_s, "frames_band": list(self.frames_band or ()),
                "frames_max_files": self.frames_max_files, "frames_max_mb": self.frames_max_mb,
                "actuator": self.actuator, "variant": self.variant}

    @property
    def source_is_path(self) -> bool:
        """The source is a video file or an image folder (not a camera index or synthetic)."""
        return self.source is not None and not _is_camera_or_synthetic(self.source)


SERVICE_OFF = ServiceSettings(enabled=False)


class ShadowSettings(_Strict):
    """A host's `shadow:` section: how `fab shadow` (and a staged deploy's canaries) judge a candidate.

    The candidate release runs inside the service beside `current` on every `every_k`-th live
    frame (`edge_runtime.shadow`), until `frames` frames were compared or `minutes` passed
    (`--frames` / `--minutes` override both). It passes when all of these hold:
      - at least `min_frames` frames were compared (a shadow that saw nothing proves nothing);
      - box-level F1 at IoU 0.5 against `current` >= `min_f1` (where either model detected anything);
      - per-class F1 >= `min_class_f1` for each class `current` detected at least `min_class_support`
        times (rarer classes are reported, not judged: a few boxes make a noisy F1);
      - mean |detections per frame, candidate - current| <= `max_abs_count_delta`;
      - candidate P95 latency <= `max_p95_ratio` x current's (null: not judged; both run on the
        device's CPU at once, so this bounds a regression, it is not the benchmark);
      - candidate errors (inference exceptions) <= `max_errors`, and it loaded at all.
    Merged key by key across defaults -> group -> host, like `service:`.
    """

    every_k: int = Field(default=3, ge=1, le=1000)
    frames: int = Field(default=300, ge=1, le=10_000_000)
    minutes: float | None = Field(default=10.0, gt=0.0, le=7 * 24 * 60.0)
    threads: int = Field(default=1, ge=1, le=1024)  # the candidate's ONNX Runtime threads
    min_frames: int = Field(default=30, ge=1, le=10_000_000)
    min_f1: float = Field(default=0.9, ge=0.0, le=1.0)
    min_class_f1: float = Field(default=0.8, ge=0.0, le=1.0)
    min_class_support: int = Field(default=20, ge=1, le=10_000_000)
    max_abs_count_delta: float = Field(default=0.5, ge=0.0, le=1e6)
    max_p95_ratio: float | None = Field(default=2.0, gt=0.0, le=1e3)
    max_errors: int = Field(default=0, ge=0, le=10_000_000)

    @model_validator(mode="after")
    def _consistent(self) -> ShadowSettings:
        if self.min_frames > self.frames:
            raise rule("min_frames", f"is {self.min_frames}, above frames ({self.frames}): such a shadow could "
                                     "never pass; lower min_frames or raise frames")
        return self


SHADOW_DEFAULTS = ShadowSettings()
NESTED_SECTIONS = ("service", "shadow")  # merged key by key across defaults -> group -> host


@dataclass(frozen=True)
class Host:
    """One device, after group defaults and per-host overrides are merged and validated."""

    name: str
    group: str
    kind: str  # pi | jetson | local
    address: str
    port: int
    user: str
    key: str | None  # private key path on this machine; None = ssh-agent only
    agent: bool  # also offer keys from ssh-agent
    accept_new_host_key: bool  # opt-in: trust and record an unknown host key on first contact
    arch: str
    runtime: str  # onnxruntime | tensorrt
    precision: str  # int8 | fp16 | fp32
    deploy_dir: str  # absolute, or relative to the login's home (local: to the inventory file)
    python: str  # the device's python (3.8+ with numpy, opencv, onnxruntime)
    ort_threads: int
    thermal_throttle_c: float
    thermal_resume_c: float
    trt_workspace_mb: int | None  # required for tensorrt hosts
    frames_dir: str  # where the device's camera writes frames (collect-frames pulls from here)
    bench_warmup: int
    bench_iterations: int
    conf: float  # postprocess thresholds shipped in the manifest
    iou: float
    max_det: int
    service: ServiceSettings = field(default=SERVICE_OFF)  # the supervised `serve` (enabled: false = none)
    shadow: ShadowSettings = field(default=SHADOW_DEFAULTS)  # how a candidate is judged in shadow

    @property
    def is_local(self) -> bool:
        """True for hosts that run on this machine without SSH."""
        return self.kind == "local"

    def public_tags(self) -> dict[str, str]:
        """Descriptive fields safe to record in MLflow (no key paths, users or addresses)."""
        return {"device": self.name, "group": self.group, "kind": self.kind, "arch": self.arch,
                "runtime": self.runtime, "precision": self.precision}


@dataclass(frozen=True)
class Inventory:
    """All groups and hosts of one inventory file."""

    path: Path
    settings: Settings
    groups: Mapping[str, tuple[Host, ...]]

    def hosts(self) -> tuple[Host, ...]:
        """Every host, in file order."""
        return tuple(h for hs in self.groups.values() for h in hs)

    def select(self, group: str | None = None, host: str | None = None) -> tuple[Host, ...]:
        """Hosts of `group` and/or the one named `host`; an unknown name is an InventoryError."""
        if group is None and host is None:
            raise InventoryError("choose hosts with --group NAME or --host NAME "
                                 f"(groups in {self.path}: {', '.join(self.groups)})")
        if group is not None and group not in self.groups:
            raise InventoryError(f"unknown group '{group}'; {self.path} defines: {', '.join(self.groups)}")
        pool = self.groups[group] if group is not None else self.hosts()
        if host is None:
            if not pool:
                raise InventoryError(f"group '{group}' in {self.path} has no hosts")
            return tuple(pool)
        chosen = tuple(h for h in pool if h.name == host)
        if not chosen:
            where = f"group '{group}'" if group else str(self.path)
            names = ", ".join(h.name for h in pool)
            raise InventoryError(f"unknown host '{host}' in {where}; known hosts: {names}")
        return chosen


class _HostFields(_Strict):
    """The fields of one host after merging (`Host` minus name and group), with their constraints."""

    kind: Kind
    address: ShellSafeOrEmpty = ""  # not needed for local hosts
    port: int = Field(ge=1, le=65535)
    user: ShellSafe
    key: Annotated[str, AfterValidator(_local_path)] | None = None
    agent: bool
    accept_new_host_key: bool
    arch: ShellSafe
    runtime: Runtime
    precision: Precision
    deploy_dir: Annotated[str, AfterValidator(_shell_safe), AfterValidator(_deploy_dir)]
    python: ShellSafe
    # Upper bounds are the device manifest's (manifest.py): refused here, before any host is contacted.
    ort_threads: int = Field(ge=1, le=1024)
    # Junction limits of these boards are about 100-105 C: a threshold above 125 would never trigger.
    thermal_throttle_c: float = Field(gt=0.0, le=125.0)
    thermal_resume_c: float = Field(gt=0.0, le=125.0)
    trt_workspace_mb: int | None = Field(default=None, ge=1, le=1048576)
    # The service deletes the oldest files in frames_dir: the deploy_dir rules apply to it too.
    frames_dir: Annotated[str, AfterValidator(_shell_safe_or_empty), AfterValidator(_frames_dir)] = ""
    bench_warmup: int = Field(ge=0, le=1_000_000)
    bench_iterations: int = Field(ge=1, le=10_000_000)
    conf: float = Field(ge=0.0, le=1.0)
    iou: float = Field(ge=0.0, le=1.0)
    max_det: int = Field(ge=1, le=100_000)
    service: ServiceSettings = SERVICE_OFF  # absent = no service (the deploy then only benchmarks)
    shadow: ShadowSettings = SHADOW_DEFAULTS

    @model_validator(mode="after")
    def _consistent(self) -> _HostFields:
        supported = PRECISIONS_BY_RUNTIME[self.runtime]
        if self.precision not in supported:
            raise rule("precision", f"is '{self.precision}', which {self.runtime} hosts do not support; "
                                    f"use one of {', '.join(supported)}")
        if self.runtime == "tensorrt" and self.trt_workspace_mb is None:
            raise rule("trt_workspace_mb", "is missing: TensorRT engine builds need a workspace limit on a Jetson; "
                                           "set it (e.g. 1024)")
        if self.kind != "local" and not self.address:
            raise rule("address", "is missing: SSH hosts need an address; set it on the host")
        if self.kind != "local" and self.key is None and not self.agent:
            raise rule("key", "is not set and agent is false: no authentication; set 'key' (a private key path) or "
                              "'agent: true' (passwords are not supported)")
        if self.thermal_resume_c >= self.thermal_throttle_c:
            raise rule("thermal_resume_c", f"must be below thermal_throttle_c (hysteresis): {self.thermal_resume_c:g} "
                                           f">= {self.thermal_throttle_c:g}")
        svc = self.service
        if svc.enabled and self.kind == "local" and svc.supervisor == "systemd":
            raise rule("service.supervisor", "is systemd, but local hosts are this workstation: the deploy does not "
                                             "install system units here; use runtime (or auto)")
        if svc.enabled and self.kind != "local" and svc.source_is_path and not str(svc.source).startswith("/"):
            raise rule("service.source", f"is {svc.source!r}, a relative path; give the video file or image folder "
                                         "as an absolute path on the device")
        return self


class _SettingsFields(_Strict):
    """The `settings:` section; every field is optional (the defaults are Settings')."""

    concurrency: int = Field(default=Settings.concurrency, ge=1)
    known_hosts: str = Field(default=Settings.known_hosts, min_length=1)  # read here, never sent to a shell
    connect_timeout_s: float = Field(default=Settings.connect_timeout_s, gt=0.0)


class _GroupDoc(_Strict):
    """One entry of `groups:`; host names and their fields are checked when hosts are built."""

    defaults: dict[Any, Any] | None = None
    hosts: dict[Any, dict[Any, Any] | None] | None = None


class _InventoryDoc(_Strict):
    """The top level of the file."""

    settings: _SettingsFields | None = None
    defaults: dict[Any, Any] | None = None
    groups: dict[Any, _GroupDoc | None] | None = None


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------


def _doc_line(path: Path, p: Problem) -> str:
    """A problem of the file's structure (top level, settings, groups) as one message line."""
    if p.kind == "unknown" and len(p.loc) == 1:
        return f"{path}: unknown top-level key {p.key!r}; use {', '.join(TOP_LEVEL_KEYS)}"
    if p.kind == "unknown":
        return f"{path}: unknown key {p.key!r}; valid keys are {', '.join(p.valid)}"
    return f"{path}: {p.key!r} {p.phrase}"


def _host_line(path: Path, name: str, group: str, p: Problem, origin: Mapping[str, str]) -> str:
    """A problem of one host's merged fields; says where a value came from when not from the host."""
    field = p.key if p.loc else ""
    where = f"{path}: host '{name}' (group '{group}')"
    source = origin.get(field) or origin.get(field.split(".")[0], "the host")
    set_in = f" (set in {source})" if source != "the host" else ""
    if p.kind == "missing":
        return f"{where}: missing field {field!r}; set it on the host or in the group's defaults"
    if p.kind == "unknown":
        # repr: a key with a line break or control character stays on this one line, visible
        return f"{where}: unknown field {field!r}{set_in}; known fields: {', '.join(sorted(p.valid))}"
    return f"{where}: field {field!r} {p.phrase}{set_in}"


def _build_host(path: Path, name: str, group: str, layers: list[tuple[str, Mapping[Any, Any]]],
                errors: list[str]) -> Host | None:
    """Merge `layers` (lowest precedence first) and validate; problems go to `errors`."""
    merged: dict[Any, Any] = {}
    origin: dict[str, str] = {}
    for label, layer in layers:
        for key, value in layer.items():
            if key in NESTED_SECTIONS and isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
                merged[key] = {**merged[key], **value}  # nested: key by key, not replaced wholesale
            else:
                merged[key] = dict(value) if isinstance(value, Mapping) else value
            origin[str(key)] = label
            if key in NESTED_SECTIONS and isinstance(value, Mapping):
                origin.update({f"{key}.{k}": label for k in value})
    # `null` unsets: the field falls back to its default, or is reported missing.
    values = {k: v for k, v in merged.items() if v is not None}
    if isinstance(values.get("service"), Mapping):
        values["service"] = {k: v for k, v in values["service"].items() if v is not None or k in ("fps", "variant")}
    if isinstance(values.get("shadow"), Mapping):  # null: no time cap (minutes), not judged (max_p95_ratio)
        values["shadow"] = {k: v for k, v in values["shadow"].items()
                            if v is not None or k in ("minutes", "max_p95_ratio")}
    try:
        f = _HostFields.model_validate(values)
    except ValidationError as e:
        errors.extend(_host_line(path, name, group, p, origin) for p in problems(e, _HostFields))
        return None
    frames_dir = f.frames_dir or f.deploy_dir.rstrip("/") + "/frames"
    return Host(name=name, group=group, **{**f.model_dump(), "frames_dir": frames_dir, "service": f.service,
                                           "shadow": f.shadow})


def _device(h: Host) -> tuple[str, int, str, str]:
    """What makes two entries the same device folder: a relative deploy_dir is in the login's home."""
    folder = posixpath.normpath(h.deploy_dir)
    return h.address.lower(), h.port, "" if folder.startswith("/") else h.user, folder


def parse_inventory(doc: Any, path: Path) -> Inventory:
    """Validate an inventory document (already parsed YAML) into an Inventory."""
    if not isinstance(doc, dict):
        raise InventoryError(f"{path}: expected a mapping with 'groups:' at the top level")
    try:
        top = _InventoryDoc.model_validate(doc)
    except ValidationError as e:
        raise InventoryError("\n".join(_doc_line(path, p) for p in problems(e, _InventoryDoc))) from None
    settings = Settings(**(top.settings or _SettingsFields()).model_dump())
    if not top.groups:
        raise InventoryError(f"{path}: no groups; add a 'groups:' mapping of group name -> hosts")
    errors: list[str] = []
    groups: dict[str, tuple[Host, ...]] = {}
    seen: dict[str, str] = {}  # host name -> its group
    devices: dict[tuple[str, int, str, str], Host] = {}
    http_ports: dict[tuple[str, int, int], Host] = {}  # (address, ssh port, service.http_port): one device's port
    for group, body in top.groups.items():
        if not isinstance(group, str) or not SAFE_NAME.fullmatch(group):
            errors.append(f"{path}: group name {group!r} must be letters, digits, '_', '.', '-'")
            continue
        body = body or _GroupDoc()
        built = []
        for name, overrides in (body.hosts or {}).items():
            if not isinstance(name, str) or not SAFE_NAME.fullmatch(name):
                errors.append(f"{path}: group '{group}': host name {name!r} must be letters, digits, '_', '.', '-'")
                continue
            if name in seen:
                errors.append(f"{path}: host '{name}' is listed in group '{seen[name]}' and again in group "
                              f"'{group}'; host names must be unique across the inventory")
                continue
            seen[name] = group
            layers = [("the top-level defaults", top.defaults or {}),
                      (f"group '{group}' defaults", body.defaults or {}), ("the host", overrides or {})]
            host = _build_host(path, name, group, layers, errors)
            if host is None:
                continue
            other = devices.setdefault(_device(host), host)
            if other is not host:
                errors.append(f"{path}: hosts '{other.name}' (group '{other.group}') and '{name}' (group '{group}') "
                              f"are the same device ({host.address or 'this machine'} port {host.port}, deploy_dir "
                              f"{host.deploy_dir}): their deploys would overwrite each other; remove one, or give "
                              "each its own deploy_dir")
            if host.service.enabled and host.service.http_port is not None:
                key = (host.address.lower(), host.port, host.service.http_port)
                first = http_ports.setdefault(key, host)
                if first is not host:
                    errors.append(f"{path}: hosts '{first.name}' (group '{first.group}') and '{name}' (group "
                                  f"'{group}') both serve on port {host.service.http_port} of the same device "
                                  f"({host.address or 'this machine'}): give one of them another service.http_port")
            built.append(host)
        groups[group] = tuple(built)
    if errors:
        raise InventoryError("\n".join(errors))
    return Inventory(path=path, settings=settings, groups=groups)


def load_inventory(path: Path | str) -> Inventory:
    """Read and validate an inventory file (see inventory.yaml for the documented format)."""
    p = Path(path)
    try:
        doc = load_yaml(p.read_text())
    except FileNotFoundError as e:
        raise InventoryError(f"{p}: not found; pass --inventory PATH or create inventory.yaml") from e
    except DuplicateKeyError as e:
        raise InventoryError(f"{p}: {e} (a host or field listed twice)") from None
    except yaml.YAMLError as e:
        raise InventoryError(f"{p}: not valid YAML ({e})") from e
    return parse_inventory(doc, p)
