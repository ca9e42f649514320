"""Connections to devices: Fabric over SSH with strict host-key checks, or local for `local` hosts.

Both kinds expose what the steps use: `run(command, ...) -> result` (with .stdout, .stderr,
.exited), `put(local, remote)`, `get(remote, local)`, `close()`. Commands are strings for a
POSIX shell on the device; callers build them with `shlex.quote` (see remote.py).

Security: host keys are checked against the inventory's known_hosts file and an unknown key is
refused (paramiko's RejectPolicy) unless the host opted in with `accept_new_host_key: true`, in
which case the key is recorded on first contact, like OpenSSH's `accept-new`. A changed key is
always refused (paramiko raises BadHostKeyException before any policy is consulted). Only key
or agent authentication: no password is ever passed and ~/.ssh/config is not read, so what
the inventory says is what happens.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from pipeline.fleet.inventory import Host, Settings

# Called with (host name, bytes just sent) during uploads: progress display, byte accounting,
# and the kill-mid-transfer test all observe transfers through this one hook.
ProgressHook = Callable[[str, int], None]
_progress_hooks: list[ProgressHook] = []
_known_hosts_lock = threading.Lock()  # several threads may record new host keys at once


class ConnectError(RuntimeError):
    """The device could not be reached or refused us (down, wrong key, unknown host key)."""


def add_progress_hook(hook: ProgressHook) -> None:
    """Register a callback for upload progress (host name, bytes in this chunk)."""
    _progress_hooks.append(hook)


def remove_progress_hook(hook: ProgressHook) -> None:
    """Unregister a callback added with add_progress_hook."""
    _progress_hooks.remove(hook)


def _notify(host: str, nbytes: int) -> None:
    for hook in list(_progress_hooks):
        hook(host, nbytes)


@dataclass(frozen=True)
class LocalResult:
    """What a local command left: the same attributes Fabric's Result has."""

    stdout: str
    stderr: str
    exited: int

    @property
    def ok(self) -> bool:
        """True when the command exited 0."""
        return self.exited == 0


class LocalConnection:
    """A `local` host: commands run in /bin/sh on this machine, files are copied, no SSH."""

    def __init__(self, host: Host) -> None:
        self.host = host

    def run(self, command: str, timeout: Optional[float] = None, **_: Any) -> LocalResult:
        """Run `command` with /bin/sh (the same shell semantics an SSH host gives us)."""
        try:
            p = subprocess.run(["/bin/sh", "-c", command], capture_output=True, text=True, timeout=timeout,
                               stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as e:
            raise TimeoutError(f"{self.host.name}: command timed out after {timeout}s") from e
        return LocalResult(p.stdout, p.stderr, p.returncode)

    def put(self, local: str, remote: str) -> None:
        """Copy a file in chunks (reporting progress like an upload)."""
        with open(local, "rb") as src, open(remote, "wb") as dst:
            for block in iter(lambda: src.read(1 << 20), b""):
                dst.write(block)
                _notify(self.host.name, len(block))

    def get(self, remote: str, local: str) -> None:
        """Copy a file from the 'device' to this machine."""
        shutil.copyfile(remote, local)

    def close(self) -> None:
        """Nothing to close."""


class SshConnection:
    """A Fabric connection plus upload progress; the steps only use run/put/get/close."""

    def __init__(self, host: Host, fabric_connection: Any) -> None:
        self.host = host
        self.fabric = fabric_connection

    def run(self, command: str, timeout: Optional[float] = None, **_: Any) -> Any:
        """Run `command` on the device; never raises on a non-zero exit (callers check .exited)."""
        # in_stream=False: threads must not compete for this process's stdin.
        return self.fabric.run(command, hide=True, warn=True, in_stream=False, timeout=timeout)

    def put(self, local: str, remote: str) -> None:
        """Upload over SFTP, reporting progress per chunk."""
        sent = [0]

        def progress(done: int, _total: int) -> None:
            _notify(self.host.name, done - sent[0])
            sent[0] = done

        self.fabric.sftp().put(local, remote, callback=progress, confirm=True)

    def get(self, remote: str, local: str) -> None:
        """Download over SFTP."""
        self.fabric.sftp().get(remote, local)

    def close(self) -> None:
        """Close the SSH session."""
        self.fabric.close()


Connection = Any  # LocalConnection | SshConnection (duck-typed: run/put/get/close)


def _known_hosts_path(settings: Settings) -> Path:
    return Path(os.path.expanduser(settings.known_hosts))


def connect(host: Host, settings: Settings) -> Connection:
    """Open a connection to `host`, verifying its host key; raise ConnectError with a fix."""
    if host.is_local:
        return LocalConnection(host)
    import paramiko
    from fabric import Config
    from fabric import Connection as FabricConnection

    known_hosts = _known_hosts_path(settings)
    connect_kwargs: dict[str, Any] = {
        "allow_agent": host.agent,
        "look_for_keys": False,  # only the key the inventory names (or the agent)
        "banner_timeout": settings.connect_timeout_s,
        "auth_timeout": settings.connect_timeout_s,
    }
    if host.key:
        connect_kwargs["key_filename"] = os.path.expanduser(host.key)
    config = Config(overrides={"load_ssh_configs": False, "run": {"in_stream": False}})
    conn = FabricConnection(host.address, user=host.user, port=host.port, config=config,
                            connect_kwargs=connect_kwargs, connect_timeout=settings.connect_timeout_s)
    # Fabric loads ~/.ssh/known_hosts and auto-adds unknown keys by default; replace both.
    conn.client = paramiko.SSHClient()
    if known_hosts.is_file():
        conn.client.load_host_keys(str(known_hosts))
    conn.client.set_missing_host_key_policy(
        paramiko.AutoAddPolicy() if host.accept_new_host_key else paramiko.RejectPolicy())
    where = f"{host.name} ({host.address}:{host.port})"
    try:
        conn.open()
    except paramiko.BadHostKeyException as e:
        raise ConnectError(f"{where}: host key CHANGED (does not match {known_hosts}); refusing to connect. "
                           "If the device was re-imaged, remove its old line from known_hosts") from e
    except paramiko.SSHException as e:
        if "not found in known_hosts" in str(e):
            raise ConnectError(
                f"{where}: unknown host key (not in {known_hosts}); refusing to connect. Verify the key and add "
                f"it (ssh-keyscan -p {host.port} {host.address} >> {known_hosts}), or set "
                "'accept_new_host_key: true' for this host to trust it on first contact") from e
        if isinstance(e, paramiko.AuthenticationException):
            raise ConnectError(f"{where}: authentication failed for user '{host.user}' with "
                               f"{'key ' + host.key if host.key else 'the ssh-agent'}; install the public key "
                               "in the device's ~/.ssh/authorized_keys") from e
        raise ConnectError(f"{where}: SSH error: {e}") from e
    except OSError as e:
        raise ConnectError(f"{where}: cannot connect ({e.strerror or e}); is the device on and sshd "
                           "running, and are address/port in the inventory right?") from e
    if host.accept_new_host_key:
        # Record what we accepted so the next connection verifies against it.
        with _known_hosts_lock:
            known_hosts.parent.mkdir(parents=True, exist_ok=True)
            fresh = paramiko.HostKeys()
            if known_hosts.is_file():
                fresh.load(str(known_hosts))
            key = conn.client.get_transport().get_remote_server_key()
            name = host.address if host.port == 22 else f"[{host.address}]:{host.port}"
            if fresh.lookup(name) is None:
                fresh.add(name, key.get_name(), key)
                tmp = known_hosts.with_name(f".{known_hosts.name}.tmp")
                fresh.save(str(tmp))
                os.replace(tmp, known_hosts)
    return SshConnection(host, conn)
