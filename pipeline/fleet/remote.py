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
import re
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


# How a full disk shows in a device command's output (Python's OSError text, coreutils, C errno name).
NO_SPACE = re.compile(r"No space left on device|\[Errno 28\]|\bENOSPC\b|Disk quota exceeded|\[Errno 122\]")


def mb(n: int | None) -> str:
    """Bytes as `12.3 MB` (decimal, like the summary table), or `? MB` when unknown."""
    return "? MB" if n is None else f"{n / 1e6:.1f} MB"


def free_space(conn: Any, host: Host) -> dict[str, Any]:
    """A fresh look at the deploy dir's free space on the device (a read-only probe): free_bytes,
    free_inodes and deploy_dir; None values when it cannot be measured (never raises for that)."""
    try:
        state = run_helper(conn, host, "probe", {"deploy_dir": host.deploy_dir, "dry": True}, space_check=False)
    except Exception:  # noqa: BLE001 - a best-effort detail for a message about another failure
        return {"free_bytes": None, "free_inodes": None, "deploy_dir": host.deploy_dir}
    return {"free_bytes": state.get("free_bytes"), "free_inodes": state.get("free_inodes"),
            "deploy_dir": state.get("deploy_dir") or host.deploy_dir}


def no_space_message(host: Host, space: dict[str, Any], need: str = "") -> str:
    """`device pi1: no space left in /home/pi/edge-defect (3.1 MB free, the release needs 12.0 MB ...); ...`

    `space`: free_bytes, free_inodes, deploy_dir (a probe's answer); `need`: what did not fit, in words.
    """
    inodes = space.get("free_inodes")
    state = "no free inodes left (df -i)" if inodes == 0 else mb(space.get("free_bytes")) + " free"
    if need:
        state += f", {need}"
    return (f"device {host.name}: no space left in {space.get('deploy_dir') or host.deploy_dir} ({state}); free "
            "space on the device (releases/ folders other than current and previous, results/, the frames "
            "folder, or anything else on that disk) or point the host's deploy_dir at a bigger disk, then re-run")


def quote_command(words: Sequence[str]) -> str:
    """Join words into one shell command, each word quoted."""
    return " ".join(shlex.quote(str(w)) for w in words)


def run_helper(conn: Any, host: Host, op: str, args: dict[str, Any], timeout: float = 120.0,
               space_check: bool = True) -> dict[str, Any]:
    """Run one helper operation on the device and return its JSON answer.

    A helper that failed because the device's disk is full says so, with the free space a
    fresh probe measured (`space_check`; off for that probe itself).
    """
    command = quote_command([host.python, "-c", helper_source(), op, json.dumps(args, sort_keys=True)])
    result = conn.run(command, timeout=timeout)
    if result.exited != 0:
        err = (result.stderr or result.stdout).strip().splitlines()
        if space_check and NO_SPACE.search(result.stderr or result.stdout or ""):
            raise RemoteError(f"{no_space_message(host, free_space(conn, host))} (device step '{op}': "
                              f"{err[-1] if err else 'no output'})")
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
    """The most telling line of a failed command's output (stderr first); a full disk is named."""
    for stream in (result.stderr or "", result.stdout or ""):
        lines = [ln.strip() for ln in stream.strip().splitlines() if ln.strip()]
        if lines:
            full = NO_SPACE.search((result.stderr or "") + (result.stdout or ""))
            return lines[-1] + ("; the device's disk is full: free space in its deploy_dir and re-run" if full else "")
    return f"exit {result.exited}, no output"
