"""Load and validate `inventory.yaml`: groups of hosts, group defaults, per-host overrides.

Every value that ends up in a remote command (addresses, users, paths, the remote python) must
match a conservative allow-list of characters, so a hostile or mistyped inventory cannot inject
shell syntax even before quoting (every remote command is also `shlex.quote`d; this is the
second fence). Errors name the host and the field and say how to fix them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

KINDS = ("pi", "jetson", "local")
RUNTIMES = ("onnxruntime", "tensorrt")
# ONNX Runtime on a CPU has no fp16 path worth shipping; TensorRT builds all three.
PRECISIONS_BY_RUNTIME = {"onnxruntime": ("int8", "fp32"), "tensorrt": ("fp16", "int8", "fp32")}
# Letters, digits and the punctuation paths, hostnames and IPv6 need; nothing a shell acts on.
SAFE_VALUE = re.compile(r"^[A-Za-z0-9_.,:/@%+=-]+$")
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Fields that are paths on THIS machine (never sent to a shell): `~/` is expanded here.
LOCAL_PATH_FIELDS = ("key",)
TOP_LEVEL_KEYS = ("settings", "defaults", "groups")


class InventoryError(ValueError):
    """The inventory is malformed: the message names the host (or group) and the field."""


@dataclass(frozen=True)
class Settings:
    """Fleet-wide settings (the `settings:` section)."""

    concurrency: int = 16  # hosts deployed at once; bounded so a big fleet cannot exhaust sockets
    known_hosts: str = "~/.ssh/known_hosts"  # host keys are verified against this file
    connect_timeout_s: float = 10.0


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

    @property
    def is_local(self) -> bool:
        """True for hosts that run on this machine without SSH."""
        return self.kind == "local"

    def public_tags(self) -> dict[str, str]:
        """Descriptive fields safe to record in MLflow (no key paths, users or addresses)."""
        return {"device": self.name, "group": self.group, "kind": self.kind, "arch": self.arch,
                "runtime": self.runtime, "precision": self.precision}


REQUIRED = tuple(f.name for f in fields(Host) if f.name not in ("name", "group", "trt_workspace_mb", "key",
                                                                  "frames_dir", "address"))
OPTIONAL_DEFAULTS: dict[str, Any] = {"trt_workspace_mb": None, "key": None, "frames_dir": "",
                                     "address": ""}
INT_FIELDS = ("port", "ort_threads", "trt_workspace_mb", "bench_warmup", "bench_iterations", "max_det")
FLOAT_FIELDS = ("thermal_throttle_c", "thermal_resume_c", "conf", "iou")
BOOL_FIELDS = ("agent", "accept_new_host_key")


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


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (PyYAML silently keeps the last one)."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise InventoryError(f"line {key_node.start_mark.line + 1}: duplicate key '{key}' "
                                 "(a host or field listed twice); remove one of them")
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def _check_value(where: str, field: str, value: Any) -> None:
    """Reject values that could carry shell syntax into a remote command."""
    if not isinstance(value, str) or (value == "" and OPTIONAL_DEFAULTS.get(field) == ""):
        return
    text = value[2:] if field in LOCAL_PATH_FIELDS and value.startswith("~/") else value
    if not text or not SAFE_VALUE.match(text):
        bad = sorted({c for c in text if not SAFE_VALUE.match(c)}) or ["(empty)"]
        raise InventoryError(
            f"{where}: field '{field}' value {value!r} contains shell metacharacter(s) or whitespace "
            f"{' '.join(repr(c) for c in bad)}; use only letters, digits and _ . , : / @ % + = - (device paths: absolute, or relative to the login's home; "
            "'~' is not expanded in quoted commands)"
        )


def _coerce(where: str, field: str, value: Any) -> Any:
    """Check the type of one field; never silently convert."""
    if value is None:
        return None
    if field in INT_FIELDS:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InventoryError(f"{where}: field '{field}' must be an integer, got {value!r}")
        return value
    if field in FLOAT_FIELDS:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InventoryError(f"{where}: field '{field}' must be a number, got {value!r}")
        return float(value)
    if field in BOOL_FIELDS:
        if not isinstance(value, bool):
            raise InventoryError(f"{where}: field '{field}' must be true or false, got {value!r}")
        return value
    if not isinstance(value, str):
        raise InventoryError(f"{where}: field '{field}' must be a string, got {value!r}")
    _check_value(where, field, value)
    return value


def _build_host(name: str, group: str, merged: Mapping[str, Any]) -> Host:
    where = f"host '{name}' (group '{group}')"
    known = {f.name for f in fields(Host)} - {"name", "group"}
    for key in merged:
        if key not in known:
            raise InventoryError(f"{where}: unknown field '{key}'; known fields: {', '.join(sorted(known))}")
    values = {**OPTIONAL_DEFAULTS, **merged}
    for key in REQUIRED:
        if key not in values or values[key] is None:
            raise InventoryError(f"{where}: missing field '{key}'; set it on the host or in the group's defaults")
    values = {k: _coerce(where, k, v) for k, v in values.items()}
    kind, runtime, precision = values["kind"], values["runtime"], values["precision"]
    if kind not in KINDS:
        raise InventoryError(f"{where}: field 'kind' is '{kind}'; use one of {', '.join(KINDS)}")
    if runtime not in RUNTIMES:
        raise InventoryError(f"{where}: field 'runtime' is '{runtime}'; use one of {', '.join(RUNTIMES)}")
    if precision not in PRECISIONS_BY_RUNTIME[runtime]:
        raise InventoryError(f"{where}: field 'precision' is '{precision}', which {runtime} hosts do not "
                             f"support; use one of {', '.join(PRECISIONS_BY_RUNTIME[runtime])}")
    if runtime == "tensorrt" and not values["trt_workspace_mb"]:
        raise InventoryError(f"{where}: missing field 'trt_workspace_mb' (TensorRT engine builds need a "
                             "workspace limit on a Jetson)")
    if kind != "local" and not values["address"]:
        raise InventoryError(f"{where}: missing field 'address'; SSH hosts need an address")
    if kind != "local" and not values["key"] and not values["agent"]:
        raise InventoryError(f"{where}: no authentication: set 'key' (a private key path) or 'agent: true' "
                             "(passwords are not supported)")
    if not 1 <= values["port"] <= 65535:
        raise InventoryError(f"{where}: field 'port' {values['port']} is not a TCP port")
    if values["ort_threads"] < 1 or values["bench_iterations"] < 1 or values["bench_warmup"] < 0:
        raise InventoryError(f"{where}: ort_threads and bench_iterations must be >= 1, bench_warmup >= 0")
    if values["thermal_resume_c"] >= values["thermal_throttle_c"]:
        raise InventoryError(f"{where}: thermal_resume_c must be below thermal_throttle_c (hysteresis)")
    if not values["frames_dir"]:
        values["frames_dir"] = values["deploy_dir"].rstrip("/") + "/frames"
    return Host(name=name, group=group, **values)


def parse_inventory(doc: Any, path: Path) -> Inventory:
    """Validate an inventory document (already parsed YAML) into an Inventory."""
    if not isinstance(doc, dict):
        raise InventoryError(f"{path}: expected a mapping with 'groups:' at the top level")
    for key in doc:
        if key not in TOP_LEVEL_KEYS:
            raise InventoryError(f"{path}: unknown top-level key '{key}'; use {', '.join(TOP_LEVEL_KEYS)}")
    raw_settings = doc.get("settings") or {}
    known_settings = {f.name for f in fields(Settings)}
    for key, value in raw_settings.items():
        if key not in known_settings:
            raise InventoryError(f"{path}: unknown settings field '{key}'; known: {', '.join(sorted(known_settings))}")
    settings = Settings(**raw_settings)
    if not isinstance(settings.concurrency, int) or settings.concurrency < 1:
        raise InventoryError(f"{path}: settings.concurrency must be an integer >= 1")
    defaults = doc.get("defaults") or {}
    groups_doc = doc.get("groups")
    if not isinstance(groups_doc, dict) or not groups_doc:
        raise InventoryError(f"{path}: no groups; add a 'groups:' mapping of group name -> hosts")
    groups: dict[str, tuple[Host, ...]] = {}
    seen: dict[str, str] = {}
    for group, body in groups_doc.items():
        if not isinstance(group, str) or not SAFE_NAME.match(group):
            raise InventoryError(f"{path}: group name {group!r} must be letters, digits, '_', '.', '-'")
        body = body or {}
        if not isinstance(body, dict) or set(body) - {"defaults", "hosts"}:
            raise InventoryError(f"group '{group}': expected only 'defaults:' and 'hosts:'")
        hosts_doc = body.get("hosts") or {}
        if not isinstance(hosts_doc, dict):
            raise InventoryError(f"group '{group}': 'hosts:' must map host names to their fields")
        built = []
        for name, overrides in hosts_doc.items():
            if not isinstance(name, str) or not SAFE_NAME.match(name):
                raise InventoryError(f"group '{group}': host name {name!r} must be letters, digits, '_', '.', '-'")
            if name in seen:
                raise InventoryError(f"host '{name}' is listed in group '{seen[name]}' and again in group "
                                     f"'{group}'; host names must be unique across the inventory")
            seen[name] = group
            merged = {**defaults, **(body.get("defaults") or {}), **(overrides or {})}
            built.append(_build_host(name, group, merged))
        groups[group] = tuple(built)
    return Inventory(path=path, settings=settings, groups=groups)


def load_inventory(path: Path | str) -> Inventory:
    """Read and validate an inventory file (see inventory.yaml for the documented format)."""
    p = Path(path)
    try:
        doc = yaml.load(p.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 - SafeLoader subclass
    except FileNotFoundError as e:
        raise InventoryError(f"{p}: not found; pass --inventory PATH or create inventory.yaml") from e
    except yaml.YAMLError as e:
        raise InventoryError(f"{p}: not valid YAML ({e})") from e
    return parse_inventory(doc, p)


def host_names(hosts: Iterable[Host]) -> str:
    """Comma-separated host names, for messages."""
    return ", ".join(h.name for h in hosts)
