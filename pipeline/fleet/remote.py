"""How the workstation runs things on a device: the deploy helper and the device runtime CLI.

The helper is the runtime's own module `edge_runtime.deploy_ops` (the filesystem work of a
deploy: probe, verify + publish, switch, status, frames). Its source goes to the device as the
argument of `python -c`, so it works before the runtime is there; the runtime CLI
(`python -m edge_runtime ...`) runs from the shipped runtime folder.

Every command is built from `shlex.quote`d words: inventory values cannot become shell syntax.
"""

from __future__ import annotations

import functools
import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from edge_runtime import deploy_ops
from pipeline.fleet.inventory import Host


@functools.lru_cache(maxsize=1)
def helper_source() -> str:
    """The source of `edge_runtime.deploy_ops`, sent as the argument of `python -c` (read once per
    process: a fleet command runs it on every host, several times each).

    Sent, not imported on the device: `probe` runs before the runtime is there.
    """
    return Path(deploy_ops.__file__).read_text()


class RemoteError(RuntimeError):
    """A command on the device failed; the message carries its exit code and stderr."""


def quote_command(words: Sequence[str]) -> str:
    """Join words into one shell command, each word quoted."""
    return " ".join(shlex.quote(str(w)) for w in words)


def run_helper(conn: Any, host: Host, op: str, args: dict[str, Any], timeout: float = 120.0) -> dict[str, Any]:
    """Run one helper operation on the device and return its JSON answer."""
    command = quote_command([host.python, "-c", helper_source(), op, json.dumps(args, sort_keys=True)])
    result = conn.run(command, timeout=timeout)
    if result.exited != 0:
        err = (result.stderr or result.stdout).strip().splitlines()
        raise RemoteError(f"{host.name}: device step '{op}' failed (exit {result.exited}): "
                          f"{err[-1] if err else 'no output'}; check that '{host.python}' is Python 3.8+ and "
                          f"that {host.user or 'the user'} can write {host.deploy_dir}")
    try:
        return json.loads(result.stdout)
    except json.JSONDecodeError as e:
        raise RemoteError(f"{host.name}: device step '{op}' printed no JSON: {result.stdout[:200]!r}") from e


@dataclass(frozen=True)
class DeviceRun:
    """One device CLI command's outcome as `activate` reports it (the fields of Fabric's Result)."""

    stdout: str
    stderr: str
    exited: int
    seconds: float

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "DeviceRun":
        """Read the helper's {"exited", "stdout", "stderr", "seconds"}."""
        return cls(str(doc.get("stdout") or ""), str(doc.get("stderr") or ""), int(doc["exited"]),
                   float(doc.get("seconds") or 0.0))


def device_command(host: Host, runtime_dir: str, verb: str, args: Sequence[str]) -> str:
    """`cd <runtime> && <python> -m edge_runtime <verb> <args...>`, every word quoted."""
    return f"cd {shlex.quote(runtime_dir)} && " + quote_command([host.python, "-m", "edge_runtime", verb, *args])


def run_device(conn: Any, host: Host, runtime_dir: str, verb: str, args: Sequence[str],
               timeout: float) -> Any:
    """Run the device runtime CLI from the release's runtime folder; return the raw result."""
    return conn.run(device_command(host, runtime_dir, verb, args), timeout=timeout)


def parse_json_output(host: Host, verb: str, result: Any) -> dict[str, Any]:
    """The JSON document a device CLI command printed on stdout (last JSON line wins)."""
    text = (result.stdout or "").strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    tail = (result.stderr or "").strip().splitlines()
    raise RemoteError(f"{host.name}: `edge_runtime {verb}` exited {result.exited} without JSON on stdout"
                      f"{': ' + tail[-1] if tail else ''}")


def last_error_line(result: Any) -> str:
    """The most telling line of a failed command's output (stderr first)."""
    for stream in (result.stderr or "", result.stdout or ""):
        lines = [ln.strip() for ln in stream.strip().splitlines() if ln.strip()]
        if lines:
            return lines[-1]
    return f"exit {result.exited}, no output"
