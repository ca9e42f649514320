"""Inventory validation, artifact resolution and import hygiene (no SSH needed)."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from fleet_hosts import INVENTORY_DEFAULTS, INVENTORY_SETTINGS

from pipeline.fleet.artifacts import ArtifactError, Sources, build_release, runtime_bundle, select_model_files
from pipeline.fleet.inventory import Host, InventoryError, _HostFields, load_inventory, parse_inventory
from pipeline.fleet.remote import device_command

REPO = Path(__file__).resolve().parents[2]

BASE: dict[str, Any] = {
    "settings": dict(INVENTORY_SETTINGS),
    "defaults": dict(INVENTORY_DEFAULTS),
    "groups": {
        "pis": {"defaults": {"kind": "pi", "runtime": "onnxruntime", "precision": "int8"},
                "hosts": {"pi1": {"address": "10.0.0.1"}, "pi2": {"address": "10.0.0.2", "precision": "fp32"}}},
        "jetsons": {"defaults": {"kind": "jetson", "runtime": "tensorrt", "precision": "fp16", "trt_workspace_mb": 512},
                    "hosts": {"j1": {"address": "10.0.0.3"}}},
    },
}


def _parse(doc: dict[str, Any]) -> Any:
    return parse_inventory(doc, Path("inventory.yaml"))


def test_repo_inventory_loads() -> None:
    inv = load_inventory(REPO / "inventory.yaml")
    assert {"pis", "jetsons", "local"} <= set(inv.groups)
    local = inv.select("local")
    assert all(h.kind == "local" and h.runtime == "onnxruntime" for h in local)


def test_defaults_and_overrides() -> None:
    inv = _parse(copy.deepcopy(BASE))
    pi1, pi2 = inv.select("pis")
    assert (pi1.precision, pi2.precision) == ("int8", "fp32")  # host override beats group default
    assert pi1.frames_dir == "/home/pi/edge/frames"
    assert inv.select(host="j1")[0].trt_workspace_mb == 512


@pytest.mark.parametrize("field,value", [
    ("address", "10.0.0.1;reboot"), ("address", "$(reboot)"), ("user", "pi&&rm"), ("deploy_dir", "/home/pi/a b"),
    ("deploy_dir", "/tmp/`id`"), ("python", "python3|sh"), ("python", "py\nthon"), ("key", "~/k'ey"),
    ("arch", "x>y"), ("frames_dir", "/tmp/*"),
])
def test_hostile_values_rejected(field: str, value: str) -> None:
    doc = copy.deepcopy(BASE)
    doc["groups"]["pis"]["hosts"]["pi1"][field] = value
    with pytest.raises(InventoryError, match=rf"inventory\.yaml: host 'pi1'.*field '{field}'.*metacharacter"):
        _parse(doc)


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d["groups"]["pis"]["hosts"]["pi1"].update(colour="red"), r"host 'pi1'.*unknown field 'colour'"),
    (lambda d: d["defaults"].pop("python"), r"host 'pi1'.*missing field 'python'"),
    (lambda d: d["groups"]["jetsons"]["hosts"].update(pi1={"address": "10.0.0.9"}),
     r"host 'pi1' is listed in group 'pis' and again in group 'jetsons'"),
    (lambda d: d["groups"]["pis"]["hosts"]["pi1"].update(precision="fp16"), r"'precision' is 'fp16'"),
    (lambda d: d["groups"]["jetsons"]["defaults"].pop("trt_workspace_mb"), r"host 'j1'.*trt_workspace_mb"),
    (lambda d: d["groups"]["pis"]["hosts"]["pi1"].update(port="22"), r"'port' must be an integer"),
    (lambda d: d["defaults"].update(key=None), r"no authentication"),
    (lambda d: d["groups"]["pis"]["hosts"]["pi1"].update(deploy_dir="~/edge"),
     r"field 'deploy_dir'.*'~' is not expanded"),
    (lambda d: d["groups"]["pis"]["hosts"]["pi1"].update(thermal_resume_c=90), r"'thermal_resume_c' must be below"),
])
def test_invalid_inventory(mutate: Any, message: str) -> None:
    doc = copy.deepcopy(BASE)
    mutate(doc)
    with pytest.raises(InventoryError, match=message) as e:
        _parse(doc)
    assert str(e.value).startswith("inventory.yaml: ")


def test_duplicate_yaml_key_rejected(tmp_path: Path) -> None:
    text = yaml.safe_dump(BASE, sort_keys=False).replace("    pi2:", "    pi1:")
    (tmp_path / "inv.yaml").write_text(text)
    with pytest.raises(InventoryError, match=r"duplicate key 'groups\.pis\.hosts\.pi1' \(lines \d+ and \d+\)") as e:
        load_inventory(tmp_path / "inv.yaml")
    assert str(tmp_path / "inv.yaml") in str(e.value)


def _error(doc: dict[str, Any]) -> str:
    """The InventoryError message for `doc`; every line names the file."""
    with pytest.raises(InventoryError) as e:
        _parse(doc)
    lines = str(e.value).splitlines()
    assert lines and all(line.startswith("inventory.yaml: ") for line in lines), lines
    return str(e.value)


@pytest.mark.parametrize("field,value", [
    ("python", "/usr/bin/python3\n"), ("address", "10.0.0.1\n"), ("deploy_dir", "/home/pi/edge\r"),
    ("user", "pi\t"), ("frames_dir", "/home/pi/frames\x00"), ("key", "~/.ssh/id\n"),
])
def test_control_characters_rejected(field: str, value: str) -> None:
    doc = copy.deepcopy(BASE)
    doc["groups"]["pis"]["hosts"]["pi1"][field] = value
    message = _error(doc)
    assert f"host 'pi1' (group 'pis'): field '{field}'" in message and "control characters" in message
    assert repr(value[-1]) in message  # the offending character is shown


@pytest.mark.parametrize("value,what", [
    ("/", "a system folder"), ("/etc", "a system folder"), ("/etc/", "a system folder"), ("//etc", "a system folder"),
    ("/usr", "a system folder"), ("/var", "a system folder"), ("/etc/edge", "a system folder"),
    ("/proc/1", "a system folder"), ("../x", "'..' component"), ("/home/pi/../../etc", "'..' component"),
    ("edge/../..", "'..' component"),
])
def test_dangerous_deploy_dir_rejected(value: str, what: str) -> None:
    doc = copy.deepcopy(BASE)
    doc["groups"]["pis"]["hosts"]["pi1"]["deploy_dir"] = value
    message = _error(doc)
    assert f"host 'pi1' (group 'pis'): field 'deploy_dir' is {value!r}" in message and what in message


@pytest.mark.parametrize("value", ["/var/lib/edge", "/opt/edge", "/usr/local/edge", "edge-defect", "/tmp/edge"])
def test_ordinary_deploy_dirs_accepted(value: str) -> None:
    doc = copy.deepcopy(BASE)
    doc["groups"]["pis"]["hosts"]["pi1"]["deploy_dir"] = value
    assert _parse(doc).select(host="pi1")[0].deploy_dir == value


def test_same_device_under_two_names_rejected() -> None:
    doc = copy.deepcopy(BASE)
    doc["groups"]["jetsons"]["hosts"]["j2"] = {"address": "10.0.0.1", "deploy_dir": "/home/pi/edge/"}  # pi1's
    message = _error(doc)
    assert "hosts 'pi1' (group 'pis') and 'j2' (group 'jetsons') are the same device" in message
    doc["groups"]["jetsons"]["hosts"]["j2"]["port"] = 2222  # another port: another device (a forwarded one)
    assert len(_parse(doc).hosts()) == 4


def test_relative_deploy_dirs_of_two_users_differ() -> None:
    doc = copy.deepcopy(BASE)
    doc["defaults"]["deploy_dir"] = "edge"  # in each login's home
    doc["groups"]["pis"]["hosts"]["pi2"] = {"address": "10.0.0.1", "user": "other"}
    assert len(_parse(doc).hosts()) == 3
    doc["groups"]["pis"]["hosts"]["pi2"]["user"] = "pi"
    assert "are the same device" in _error(doc)


@pytest.mark.parametrize("field,value,message", [
    ("conf", 1.5, r"field 'conf' must be in \[0, 1\], got 1\.5"),
    ("conf", -0.1, r"field 'conf' must be in \[0, 1\], got -0\.1"),
    ("iou", 2, r"field 'iou' must be in \[0, 1\], got 2"),
    ("conf", float("nan"), r"field 'conf' must be a finite number"),
    ("max_det", 0, r"field 'max_det' must be in \[1, 100000\], got 0"),
    ("max_det", 10**6, r"field 'max_det' must be in \[1, 100000\], got 1000000"),
    ("port", 70000, r"field 'port' must be in \[1, 65535\], got 70000"),
    ("ort_threads", 0, r"field 'ort_threads' must be in \[1, 1024\], got 0"),
    ("ort_threads", 10**100, r"field 'ort_threads' must be in \[1, 1024\]"),
    ("bench_warmup", -1, r"field 'bench_warmup' must be in \[0, 1000000\], got -1"),
    ("frames_dir", "/etc/frames", r"field 'frames_dir' is '/etc/frames', a system folder"),
    ("python", "-oProxyCommand=x", r"field 'python' is '-oProxyCommand=x', which starts with '-'"),
    ("agent", "yes", r"field 'agent' must be true or false, got 'yes'"),
    ("kind", "robot", r"field 'kind' is 'robot'; choose one of pi, jetson, local"),
])
def test_out_of_range_values_rejected(field: str, value: Any, message: str) -> None:
    doc = copy.deepcopy(BASE)
    doc["groups"]["pis"]["hosts"]["pi1"][field] = value
    with pytest.raises(InventoryError, match=rf"inventory\.yaml: host 'pi1' \(group 'pis'\): {message}"):
        _parse(doc)


def test_value_from_defaults_says_where_it_is_set() -> None:
    doc = copy.deepcopy(BASE)
    doc["defaults"]["conf"] = 3
    message = _error(doc)
    assert message.count("field 'conf' must be in [0, 1], got 3 (set in the top-level defaults)") == 3  # every host


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d.update(colour=1), r"inventory\.yaml: unknown top-level key 'colour'; use settings, defaults, groups"),
    (lambda d: d["settings"].update(concurrency=0), r"inventory\.yaml: 'settings\.concurrency' must be >= 1, got 0"),
    (lambda d: d["settings"].update(retries=3),
     r"inventory\.yaml: unknown key 'settings\.retries'; valid keys are concurrency"),
    (lambda d: d["groups"]["pis"].update(vars={}),
     r"inventory\.yaml: unknown key 'groups\.pis\.vars'; valid keys are defaults, hosts"),
    (lambda d: d["groups"]["pis"]["hosts"].update({"pi3\n": {}}),
     r"inventory\.yaml: group 'pis': host name 'pi3\\n' must be"),
    (lambda d: d.update(groups={}), r"inventory\.yaml: no groups"),
])
def test_invalid_structure(mutate: Any, message: str) -> None:
    doc = copy.deepcopy(BASE)
    mutate(doc)
    with pytest.raises(InventoryError, match=message):
        _parse(doc)


def test_host_record_matches_the_schema() -> None:
    """Host (the record) and _HostFields (what is validated) must list the same fields."""
    from dataclasses import fields

    assert {f.name for f in fields(Host)} - {"name", "group"} == set(_HostFields.model_fields)

def test_unknown_group_and_host() -> None:
    inv = _parse(copy.deepcopy(BASE))
    with pytest.raises(InventoryError, match="unknown group 'robots'.*defines: pis, jetsons"):
        inv.select("robots")
    with pytest.raises(InventoryError, match="unknown host 'pi9'"):
        inv.select("pis", "pi9")
    with pytest.raises(InventoryError, match="--group NAME or --host NAME"):
        inv.select()


def test_unknown_group_from_fab(tmp_path: Path) -> None:
    (tmp_path / "inv.yaml").write_text(yaml.safe_dump(BASE))
    p = subprocess.run([str(REPO / ".venv/bin/fab"), "-r", str(REPO), "deploy", "--group", "robots",
                        "--inventory", str(tmp_path / "inv.yaml")], capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode != 0
    assert "unknown group 'robots'" in p.stderr + p.stdout
    assert "Traceback" not in p.stderr


def test_remote_commands_are_quoted() -> None:
    host = _parse(copy.deepcopy(BASE)).select(host="pi1")[0]
    cmd = device_command(host, "/home/pi/edge/runtime/abc", "health", ["--release", "/x/it's"])
    assert cmd == ("cd /home/pi/edge/runtime/abc && /usr/bin/python3 -m edge_runtime health "
                   "--release '/x/it'\"'\"'s'")


def test_int8_needs_quantize(tmp_path: Path) -> None:
    inv = _parse(copy.deepcopy(BASE))
    (tmp_path / "yolov8n.onnx").write_bytes(b"x")
    with pytest.raises(ArtifactError, match=r"yolov8n\.int8\.onnx not found.*dvc repro quantize"):
        select_model_files(inv.select(host="pi1")[0], tmp_path, "yolov8n")
    assert select_model_files(inv.select(host="pi2")[0], tmp_path, "yolov8n") == (tmp_path / "yolov8n.onnx", None)
    doc = copy.deepcopy(BASE)
    doc["groups"]["jetsons"]["hosts"]["j1"]["precision"] = "int8"
    with pytest.raises(ArtifactError, match=r"int8\.trt\.onnx not found.*dvc repro quantize"):
        select_model_files(_parse(doc).select(host="j1")[0], tmp_path, "yolov8n")
    with pytest.raises(ArtifactError, match="give a model name"):
        select_model_files(inv.select(host="pi2")[0], tmp_path, "../x;y")


def test_runtime_bundle_is_exactly_the_device_package() -> None:
    b = runtime_bundle(REPO / "runtime")
    assert {"pyproject.toml", "edge_runtime/__init__.py", "edge_runtime/__main__.py"} <= set(b.files)
    assert all(n in ("pyproject.toml", "README.md") or n.startswith("edge_runtime/") for n in b.files)
    assert not any("__pycache__" in n for n in b.files)
    assert runtime_bundle(REPO / "runtime").name == b.name  # content-addressed: stable
    with pytest.raises(ArtifactError, match="not the device runtime's source tree"):
        runtime_bundle(REPO)


@pytest.mark.slow
def test_release_is_content_addressed(fleet_models: dict[str, Any]) -> None:
    inv = _parse(copy.deepcopy(BASE))
    sources: Sources = fleet_models["sources"]
    rt = runtime_bundle(sources.runtime_root)
    pi2 = inv.select(host="pi2")[0]
    a, b = build_release(pi2, sources, "yolov8n", rt), build_release(pi2, sources, "yolov8n", rt)
    assert a.manifest.release == b.manifest.release and len(a.manifest.release) == 12
    assert a.manifest.health_sample() == "health_sample.jpg"
    assert build_release(pi2, sources, "alt", rt).manifest.release != a.manifest.release


def test_fleet_imports_no_heavy_modules() -> None:
    code = ("import sys; sys.path.insert(0, %r); import fabfile, pipeline.fleet.runner, pipeline.fleet.steps, "
            "pipeline.fleet.connection, pipeline.fleet.artifacts, pipeline.fleet.mlflow_log; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'ultralytics', 'dvc', 'mlflow', 'onnx'}))"
            % str(REPO))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]", out.stdout


# --------------------------------------------------------------------------------------------
# The service section
# --------------------------------------------------------------------------------------------

SERVICE: dict[str, Any] = {"enabled": True, "supervisor": "auto", "source": "0", "fps": None, "http_bind": "127.0.0.1",
                           "http_port": 8765, "stall_s": 10.0, "jsonl_max_mb": 50, "jsonl_backups": 5,
                           "mqtt_host": "", "mqtt_port": 1883, "mqtt_topic": "", "mqtt_queue": 1000,
                           "frames_every_s": 60.0, "frames_band": [0.25, 0.5], "frames_max_files": 2000,
                           "frames_max_mb": 500, "actuator": "", "variant": None, "healthy_timeout_s": 60,
                           "watchdog_s": 30, "restart_s": 5}


def _with_service(**host_service: Any) -> dict[str, Any]:
    doc = copy.deepcopy(BASE)
    doc["defaults"]["service"] = copy.deepcopy(SERVICE)
    if host_service:
        doc["groups"]["pis"]["hosts"]["pi1"]["service"] = host_service
    return doc


def test_service_merged_key_by_key() -> None:
    doc = _with_service(http_port=9000)  # the host changes one key ...
    doc["groups"]["pis"]["defaults"]["service"] = {"fps": 15.0, "source": "synthetic:640x480"}  # ... its group two
    inv = _parse(doc)
    pi1, pi2 = inv.select("pis")
    assert (pi1.service.http_port, pi1.service.fps, pi1.service.source) == (9000, 15.0, "synthetic:640x480")
    assert (pi2.service.http_port, pi2.service.fps) == (8765, 15.0)
    assert pi1.service.stall_s == 10.0 and pi1.service.frames_band == (0.25, 0.5)  # the rest from the defaults
    assert inv.select(host="j1")[0].service.source == "0"


def test_service_absent_or_disabled() -> None:
    assert not _parse(copy.deepcopy(BASE)).select(host="pi1")[0].service.enabled  # no section: no service
    doc = copy.deepcopy(BASE)
    doc["groups"]["pis"]["hosts"]["pi1"]["service"] = {"enabled": False}  # nothing else needed to opt out
    assert not _parse(doc).select(host="pi1")[0].service.enabled
    doc = _with_service(enabled=False, http_port=70000)  # still type-checked when off
    assert "field 'service.http_port' must be in [1, 65535], got 70000" in _error(doc)


def test_service_json_is_what_the_runtime_accepts() -> None:
    """The deploy writes exactly the fields `serve` reads; the runtime's own check accepts them."""
    from dataclasses import fields

    from edge_runtime.service_config import ServiceConfig, config_from_json

    host = _parse(_with_service(mqtt_host="broker.local", actuator="plc.gate:reject", variant="640")).select(
        host="pi1")[0]
    doc = host.service.config(host.name, host.frames_dir)
    assert set(doc) == {f.name for f in fields(ServiceConfig)}
    cfg = config_from_json(doc)
    assert cfg.device == "pi1" and cfg.frames_dir == "/home/pi/edge/frames" and cfg.frames_band == (0.25, 0.5)
    assert cfg.topic == "edge-defect/pi1/detections" and cfg.http_bind == "127.0.0.1"


@pytest.mark.parametrize("field,value,message", [
    ("http_port", 0, r"'service\.http_port' must be in \[1, 65535\], got 0"),
    ("mqtt_port", 65536, r"'service\.mqtt_port' must be in \[1, 65535\], got 65536"),
    ("frames_band", [0.6, 0.4], r"'service\.frames_band' is \[0\.6, 0\.4\]: need 0 <= lo < hi <= 1"),
    ("frames_band", [0.0, 1.5], r"'service\.frames_band' is \[0, 1\.5\]: need 0 <= lo < hi <= 1"),
    ("frames_max_files", 0, r"'service\.frames_max_files' must be in \[1, 10000000\], got 0"),
    ("frames_max_mb", 0.5, r"'service\.frames_max_mb' must be in \[1, 1e\+06\], got 0\.5"),
    ("jsonl_max_mb", 0, r"'service\.jsonl_max_mb' must be in \[1, 1e\+06\], got 0"),
    ("mqtt_queue", 0, r"'service\.mqtt_queue' must be in \[1, 10000000\], got 0"),
    ("jsonl_backups", -1, r"'service\.jsonl_backups' must be in \[0, 1000\], got -1"),
    ("stall_s", 0, r"'service\.stall_s' must be in \[0\.1, 3600\], got 0"),
    ("fps", 0, r"'service\.fps' must be in \(0, 1000\], got 0"),
    ("watchdog_s", 5, r"'service\.watchdog_s' is 5, not above stall_s \(10\)"),
    ("healthy_timeout_s", 0, r"'service\.healthy_timeout_s' must be in \(0, 3600\], got 0"),
    ("supervisor", "upstart", r"'service\.supervisor' is 'upstart'; choose one of auto, systemd, runtime"),
    ("http_port", "8765", r"'service\.http_port' must be an integer, got '8765'"),
    ("http_bind", "example.com", r"'service\.http_bind' is 'example\.com'; give an IP address"),
    ("source", "synthetic:640", r"'service\.source' is 'synthetic:640'; a synthetic source is"),
    ("source", "vids/line.mp4", r"'service\.source' is 'vids/line\.mp4', a relative path"),
    ("mqtt_topic", "line/#", r"'service\.mqtt_topic' is 'line/#'; use letters"),
    ("actuator", "plc", r"'service\.actuator' is 'plc'; give module:function"),
    ("colour", "red", r"unknown field 'service\.colour'; known fields: actuator, enabled"),
])
def test_service_values_checked(field: str, value: Any, message: str) -> None:
    with pytest.raises(InventoryError, match=rf"inventory\.yaml: host 'pi1' \(group 'pis'\): (field )?{message}"):
        _parse(_with_service(**{field: value}))


@pytest.mark.parametrize("field,value", [
    ("source", "/data/a b.mp4"), ("source", "/data/$(reboot)"), ("mqtt_host", "broker;reboot"),
    ("mqtt_host", "broker\n"), ("source", "0\n"),
])
def test_service_strings_shell_safe(field: str, value: str) -> None:
    message = _error(_with_service(**{field: value}))
    assert f"host 'pi1' (group 'pis'): field 'service.{field}'" in message
    assert "metacharacter" in message or "control characters" in message


def test_service_missing_fields_named() -> None:
    doc = copy.deepcopy(BASE)
    doc["groups"]["pis"]["hosts"]["pi1"]["service"] = {"source": "0", "http_port": 8000}
    message = _error(doc)
    assert "field 'service' is missing stall_s, jsonl_max_mb, jsonl_backups" in message and "restart_s" in message
    doc = _with_service()
    doc["defaults"]["service"].pop("source")
    assert "field 'service.source' is missing: set it in the service section (or set 'enabled: false') (set in " \
           "the top-level defaults)" in _error(doc)


def test_service_port_unique_per_device() -> None:
    doc = _with_service()
    doc["groups"]["pis"]["hosts"]["pi2"] = {"address": "10.0.0.1", "deploy_dir": "/home/pi/other"}  # pi1's device
    assert "hosts 'pi1' (group 'pis') and 'pi2' (group 'pis') both serve on port 8765 of the same device" \
        in _error(doc)
    doc["groups"]["pis"]["hosts"]["pi2"]["service"] = {"http_port": 8766}
    assert len(_parse(doc).hosts()) == 3
    doc["groups"]["pis"]["hosts"]["pi2"]["service"] = {"http_port": 8765, "enabled": False}  # off: no port taken
    assert len(_parse(doc).hosts()) == 3


def test_service_local_hosts() -> None:
    doc = _with_service()
    doc["groups"]["local"] = {"defaults": {"kind": "local", "runtime": "onnxruntime", "precision": "int8",
                                           "deploy_dir": "build/x", "user": "me"},
                              "hosts": {"ws": {"service": {"supervisor": "systemd"}}}}
    assert "host 'ws' (group 'local'): field 'service.supervisor' is systemd, but local hosts" in _error(doc)
    doc["groups"]["local"]["hosts"]["ws"]["service"] = {"supervisor": "runtime", "source": "clips/line.mp4"}
    ws = _parse(doc).select(host="ws")[0]
    assert ws.service.source == "clips/line.mp4"  # relative to the inventory, resolved by the runner

    from pipeline.fleet.runner import resolve_local_host

    inv = _parse(doc)
    resolved = resolve_local_host(ws, inv)
    assert resolved.service.source == str(inv.path.resolve().parent / "clips/line.mp4")


def test_repo_inventory_service_defaults() -> None:
    inv = load_inventory(REPO / "inventory.yaml")
    (local,) = inv.select("local")
    s = local.service
    assert s.enabled and s.supervisor == "runtime" and s.source == "synthetic:640x480" and s.fps == 30
    assert s.http_bind == "127.0.0.1" and s.http_port == 18765
    pi = inv.select(host="pi-line1")[0].service
    assert pi.enabled and pi.supervisor == "auto" and pi.http_bind == "127.0.0.1" and pi.source == "0"
    assert inv.select(host="jetson-orin1")[0].service.healthy_timeout_s > pi.healthy_timeout_s
