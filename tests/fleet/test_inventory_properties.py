"""Property-based tests of `parse_inventory` (Hypothesis).

The property: an inventory document -- a valid one with one host field (or group default, or
service key) mutated, or any YAML-like value at all -- either parses into hosts whose every field
satisfies the documented constraints (shell-safe values, deploy_dir rules, ranges, enumerations,
no device twice, no host dropped), or raises an InventoryError whose every line names the file.
Never another exception, never a half-valid host.

The documented constraints are restated here independently of inventory.py's own patterns.
"""

from __future__ import annotations

import copy
import ipaddress
import math
import posixpath
import re
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
import test_fleet_inventory as tfi  # the valid documents of the example-based tests (tests/fleet on sys.path)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.config.params import load_yaml
from pipeline.fleet import inventory as inv_mod
from pipeline.fleet.inventory import Host, Inventory, InventoryError, parse_inventory

REPO = Path(__file__).resolve().parents[2]
PATH = Path("inventory.yaml")
SETTINGS = settings(max_examples=300, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

# The documented rules (inventory.py's docstring and inventory.yaml's header), restated.
SHELL_SAFE = re.compile(r"\A[A-Za-z0-9_.,:/@%+=-]+\Z")  # nothing a shell acts on; no whitespace or newline
NAME = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.-]*\Z")
SYSTEM = {"/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/proc", "/root", "/run", "/sbin", "/srv", "/sys",
          "/tmp", "/usr", "/usr/bin", "/usr/lib", "/usr/local", "/var", "/var/lib", "/var/log"}
SYSTEM_TREES = ("/bin", "/boot", "/dev", "/etc", "/lib", "/proc", "/sbin", "/sys", "/usr/bin", "/usr/lib", "/usr/sbin")
PRECISIONS = {"onnxruntime": {"int8", "fp32"}, "tensorrt": {"fp16", "int8", "fp32"}}


# --------------------------------------------------------------------------------------------
# Valid starting points: the example tests' documents and the repository's inventory.yaml
# --------------------------------------------------------------------------------------------


def _bases() -> List[Dict[str, Any]]:
    docs = [copy.deepcopy(tfi.BASE)]
    with_service = getattr(tfi, "_with_service", None)  # the `service:` section, where the tests have it
    if with_service is not None:
        docs.append(with_service())
    docs.append(load_yaml((REPO / "inventory.yaml").read_text()))
    return docs


BASES = _bases()
HOST_FIELDS = sorted(inv_mod._HostFields.model_fields)
SERVICE_MODEL = getattr(inv_mod, "ServiceSettings", None)
SERVICE_FIELDS = sorted(SERVICE_MODEL.model_fields) if SERVICE_MODEL is not None else []


def _hosts_of(doc: Dict[str, Any]) -> List[Tuple[str, str]]:
    return [(g, h) for g, body in doc["groups"].items() for h in ((body or {}).get("hosts") or {})]


# --------------------------------------------------------------------------------------------
# The property
# --------------------------------------------------------------------------------------------


def _int(v: Any, lo: int, hi: float = math.inf) -> bool:
    return type(v) is int and lo <= v <= hi


def _float(v: Any, lo: float, hi: float, lo_open: bool = False) -> bool:
    return type(v) is float and math.isfinite(v) and lo <= v <= hi and not (lo_open and v == lo)


def _shell_safe(v: Any, empty_ok: bool = False) -> bool:
    return isinstance(v, str) and ((empty_ok and v == "") or bool(SHELL_SAFE.fullmatch(v)))


def _deploy_dir_ok(v: str) -> bool:
    if ".." in v.split("/"):
        return False
    norm = posixpath.normpath(v)
    norm = "/" + norm.lstrip("/") if norm.startswith("//") else norm
    return norm != "." and norm not in SYSTEM and not any(norm.startswith(t + "/") for t in SYSTEM_TREES)


def assert_host_valid(h: Host) -> None:
    """What the fleet relies on for one accepted host."""
    assert NAME.fullmatch(h.name) and NAME.fullmatch(h.group)
    assert h.kind in ("pi", "jetson", "local") and h.runtime in PRECISIONS and h.precision in PRECISIONS[h.runtime]
    assert _shell_safe(h.address, empty_ok=h.kind == "local"), h.address
    assert _int(h.port, 1, 65535)
    for f in ("user", "arch", "python", "deploy_dir", "frames_dir"):  # they end up in remote commands
        assert _shell_safe(getattr(h, f)), (f, getattr(h, f))
    assert _deploy_dir_ok(h.deploy_dir), h.deploy_dir
    assert h.key is None or _shell_safe(h.key[2:] if h.key.startswith("~/") else h.key), h.key
    if h.kind != "local":
        assert h.key is not None or h.agent is True
    assert type(h.agent) is bool and type(h.accept_new_host_key) is bool
    assert _int(h.ort_threads, 1) and _int(h.bench_warmup, 0) and _int(h.bench_iterations, 1) and _int(h.max_det, 1)
    assert h.trt_workspace_mb is None or _int(h.trt_workspace_mb, 1)
    if h.runtime == "tensorrt":
        assert h.trt_workspace_mb is not None
    assert _float(h.thermal_throttle_c, 0.0, 125.0, True) and _float(h.thermal_resume_c, 0.0, 125.0, True)
    assert h.thermal_resume_c < h.thermal_throttle_c
    assert _float(h.conf, 0.0, 1.0) and _float(h.iou, 0.0, 1.0)
    s = getattr(h, "service", None)
    if s is not None and s.enabled:
        _assert_service_valid(h, s)


def _assert_service_valid(h: Host, s: Any) -> None:
    assert s.supervisor in ("auto", "systemd", "runtime") and not (h.kind == "local" and s.supervisor == "systemd")
    assert _shell_safe(s.source), s.source
    if h.kind != "local" and not (re.fullmatch(r"[0-9]{1,3}", s.source) or s.source.startswith("synthetic")):
        assert s.source.startswith("/")
    assert s.fps is None or _float(s.fps, 0.0, 1000.0, True)
    # http_bind: an IP address or localhost. Its shell-safety is test_http_bind_is_shell_safe's (a known gap).
    assert s.http_bind == "localhost" or ipaddress.ip_address(s.http_bind)
    assert _int(s.http_port, 1, 65535) and _int(s.mqtt_port, 1, 65535) and _int(s.mqtt_queue, 1, 10_000_000)
    assert _float(s.stall_s, 0.1, 3600.0) and _float(s.jsonl_max_mb, 1.0, 1e6) and _int(s.jsonl_backups, 0, 1000)
    assert _shell_safe(s.mqtt_host, empty_ok=True) and _shell_safe(s.mqtt_topic, empty_ok=True)
    assert "#" not in s.mqtt_topic and "+" not in s.mqtt_topic
    assert _shell_safe(s.actuator, empty_ok=True) and (s.variant is None or NAME.fullmatch(s.variant))
    assert _float(s.frames_every_s, 0.0, 86400.0) and _int(s.frames_max_files, 1, 10_000_000)
    assert _float(s.frames_max_mb, 1.0, 1e6)
    lo, hi = s.frames_band
    assert 0.0 <= lo < hi <= 1.0 and all(map(math.isfinite, (lo, hi)))
    assert _float(s.healthy_timeout_s, 0.0, 3600.0, True) and _float(s.restart_s, 0.1, 600.0)
    assert _float(s.watchdog_s, 0.0, 3600.0) and (s.watchdog_s == 0 or s.watchdog_s > s.stall_s)


def _device(h: Host) -> Tuple[str, int, str, str]:
    folder = posixpath.normpath(h.deploy_dir)
    return h.address.lower(), h.port, "" if folder.startswith("/") else h.user, folder


def assert_inventory_valid(inv: Inventory, doc: Any) -> None:
    assert isinstance(inv, Inventory)
    hosts = inv.hosts()
    for h in hosts:
        assert_host_valid(h)
    # Nothing dropped: every host of the document is in the inventory, each once.
    expected = sorted((str(g), str(n)) for g, body in doc["groups"].items() for n in ((body or {}).get("hosts") or {}))
    assert sorted((h.group, h.name) for h in hosts) == expected
    assert len({h.name for h in hosts}) == len(hosts)
    assert len({_device(h) for h in hosts}) == len(hosts), "one device under two names"
    ports = [(h.address.lower(), h.port, h.service.http_port) for h in hosts
             if getattr(h, "service", None) is not None and h.service.enabled]
    assert len(set(ports)) == len(ports), "two services on one port of one device"


def check(doc: Any) -> None:
    """The property for one document."""
    try:
        inv = parse_inventory(doc, PATH)
    except InventoryError as e:
        lines = str(e).splitlines()
        assert lines, "an empty InventoryError"
        for line in lines:
            assert line.startswith("inventory.yaml: "), line
        return
    assert_inventory_valid(inv, doc)


def test_bases_are_valid() -> None:
    for doc in BASES:
        assert_inventory_valid(parse_inventory(copy.deepcopy(doc), PATH), doc)


# --------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------

SUFFIXES = ["", "\n", "\r\n", " ", "\t", "\x00", "\x0b", "\u00a0", "\u2028", "\u202e", ";reboot", "$(id)", "`id`",
            "|sh", "&&x", ">y", "<y", "'", '"', "\\", "*", "?", "~", "#", "!", "{a,b}", "é", "١", "/..", "/../..",
            "/.", "/", "//", "%$(id)", "%a b", "%eth0"]
BASE_STRINGS = ["", "x", "0", "10.0.0.1", "fe80::1", "fe80::1%eth0", "::1", "localhost", "127.0.0.1", "0.0.0.0",
                "pi", "/home/pi/edge", "edge", "build/x", "/", "/etc", "/home", "/home/pi", "/usr/local/bin", "/tmp",
                "~", "~/", "~/.ssh/id", "..", "../x", "-oProxyCommand=x", "/usr/bin/python3", "synthetic",
                "synthetic:640x480", "synthetic:0x0", "plc.gate:reject", "line/1", "onnxruntime", "tensorrt",
                "int8", "fp16", "pi", "jetson", "local", "auto", "systemd", "runtime", "true", "null", "22"]
strings = (st.builds(lambda p, b, s: p + b + s, st.sampled_from(["", " ", "\n", "-", "/", "~/"]),
                     st.sampled_from(BASE_STRINGS), st.sampled_from(SUFFIXES))
           | st.text(max_size=16))
numbers = (st.sampled_from([0, 1, -1, 2, 22, 1024, 65535, 65536, 2**31, 2**63, 10**100, -(10**100), 10**400, 0.0,
                            -0.0, 0.05, 0.5, 1.0, 1.5, 70.0, 80.0, 125.0, 125.000001, 1e308, 5e-324, math.inf,
                            -math.inf, math.nan, True, False])
           | st.integers() | st.floats())
others = st.sampled_from([None, [], {}, [0.25, 0.5], [0.5, 0.25], [0.0, 1.0], [0, math.nan], [1], [1, 2, 3],
                          {"enabled": False}, {"a": 1}, "0.25", ["x"]])
values = strings | numbers | others
_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
# Mapping keys without line breaks: a key with one is test_unknown_keys_with_line_breaks_are_one_line's (a known gap).
_keys = st.text(max_size=6).filter(lambda k: len(("x" + k + "x").splitlines()) == 1) | st.integers() | st.booleans()
yaml_values = st.recursive(_scalars, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(_keys, kids, max_size=3),
                           max_leaves=15)


@st.composite
def near_valid(draw: Any) -> Dict[str, Any]:
    """A valid inventory with one host field (or default, or service key) changed, removed or unknown."""
    doc = copy.deepcopy(draw(st.sampled_from(BASES)))
    group, name = draw(st.sampled_from(_hosts_of(doc)))
    body = doc["groups"][group]
    layer = draw(st.sampled_from(["host", "host", "host", "group", "top"]))
    if layer == "host":
        target = body["hosts"].get(name)
        if target is None:
            target = body["hosts"][name] = {}
    elif layer == "group":
        target = body.setdefault("defaults", {}) or {}
        body["defaults"] = target
    else:
        target = doc.setdefault("defaults", {}) or {}
        doc["defaults"] = target
    field = draw(st.sampled_from(HOST_FIELDS + [f"service.{f}" for f in SERVICE_FIELDS] + ["colour", "service.colour"]))
    how = draw(st.sampled_from(["set", "set", "set", "set", "null", "remove"]))
    if field.startswith("service."):
        key = field.split(".", 1)[1]
        section = target.get("service")
        if not isinstance(section, dict):
            section = target["service"] = {}
        target = section
        field = key
    if how == "set":
        target[field] = draw(values)
    elif how == "null":
        target[field] = None  # `null` unsets
    else:
        target.pop(field, None)
    if draw(st.booleans()):  # sometimes a second host on the same device, to exercise the duplicate checks
        twin = draw(st.sampled_from(["deploy_dir", "http_port", "address", "nothing"]))
        other = {"address": "10.0.0.1" if twin != "address" else "10.0.0.99"}
        if twin == "http_port":
            other["deploy_dir"] = "/home/pi/other"
        body["hosts"][name + "-twin"] = other
    return doc


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


@settings(SETTINGS, max_examples=1200)
@given(near_valid())
def test_near_valid_inventories(doc: Dict[str, Any]) -> None:
    check(doc)


@SETTINGS
@given(st.sampled_from(BASES), st.sampled_from(["user", "python", "deploy_dir", "address", "arch", "frames_dir"]),
       st.sampled_from(SUFFIXES))
def test_trailing_characters_on_valid_values(base: Dict[str, Any], field: str, suffix: str) -> None:
    """A valid value with whitespace, a newline, a shell metacharacter or unicode appended."""
    doc = copy.deepcopy(base)
    group, name = _hosts_of(doc)[0]
    host = parse_inventory(copy.deepcopy(base), PATH).select(host=name)[0]
    doc["groups"][group]["hosts"][name] = {**(doc["groups"][group]["hosts"][name] or {}),
                                           field: str(getattr(host, field) or "10.0.0.7") + suffix}
    check(doc)


@SETTINGS
@given(yaml_values)
def test_any_document(doc: Any) -> None:
    check(doc)


@SETTINGS
@given(st.sampled_from(BASES), yaml_values)
def test_any_value_as_a_host_or_group(base: Dict[str, Any], value: Any) -> None:
    doc = copy.deepcopy(base)
    group, name = _hosts_of(doc)[0]
    doc["groups"][group]["hosts"][name] = value
    check(doc)
    doc = copy.deepcopy(base)
    doc["groups"][group] = value
    check(doc)


@pytest.mark.parametrize("bind", ["fe80::1%$(reboot)", "fe80::1%a b", "fe80::1%é"])
def test_http_bind_is_shell_safe(bind: str) -> None:
    """service.http_bind goes to the device inside a remote command: the allow-list should hold for it too."""
    doc = tfi._with_service(http_bind=bind)
    check(doc)  # passes either way: the value is an IP address ...
    with pytest.raises(InventoryError, match=r"host 'pi1'.*field 'service\.http_bind'"):
        parse_inventory(doc, PATH)  # ... but one the shell-safety rule should refuse


@pytest.mark.parametrize("where", ["top", "settings", "group", "host", "service"])
def test_unknown_keys_with_line_breaks_are_one_line(where: str) -> None:
    doc = copy.deepcopy(tfi.BASE)
    target = {"top": doc, "settings": doc["settings"], "group": doc["groups"]["pis"],
              "host": doc["groups"]["pis"]["hosts"]["pi1"]}.get(where)
    if target is None:
        target = doc["groups"]["pis"]["hosts"]["pi1"].setdefault("service", {})
    target["col\rour"] = 1
    with pytest.raises(InventoryError) as e:
        parse_inventory(doc, PATH)
    assert all(line.startswith("inventory.yaml: ") for line in str(e.value).splitlines()), str(e.value)
