"""Connections to devices: Fabric over SSH with strict host-key checks, or local for `local` hosts.

Both kinds expose what the steps use: `run(command, ...) -> result` (with .stdout, .stderr,
.exited), `put(local, remote)`, `get(remote, local)`, `remove(remote)`, `close()`. Commands are strings for a
POSIX shell on the device; callers build them with `shlex.quote` (see remote.py).

A connection may drop at any moment (the device loses power, sshd dies, the network goes): the
SSH connection's `run`/`put`/`get` then raise `ConnectionLost`, whose message names the host, what
it was doing and what to do, instead of paramiko's bare `EOFError` or `Socket is closed`. `close()`
always tears everything down (SFTP session, transport thread, socket) and raises `ConnectionLost`
only afterwards, so the caller can record that the goodbye failed (`runner.run_on_hosts`).

Security: host keys are checked against the inventory's known_hosts file and an unknown key is
refused (paramiko's RejectPolicy) unless the host opted in with `accept_new_host_key: true`, in
which case the key is recorded on first contact, like OpenSSH's `accept-new`. A changed key is
always refused (paramiko raises BadHostKeyException before any policy is consulted). Only key
or agent authentication: no password is ever passed and ~/.ssh/config is not read, so what
the inventory says is what happens.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
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
# paramiko's transport thread logs a dropped socket ("Socket exception: Connection reset by peer")
# at ERROR; with no logging configured Python would print it on stderr, in the middle of the table
# output. The drop is reported as the host's failure instead; configured logging still sees it.
logging.getLogger("paramiko").addHandler(logging.NullHandler())


class ConnectError(RuntimeError):
    """The device could not be reached or refused us (down, wrong key, unknown host key)."""


class ConnectionLost(ConnectError):
    """An open connection to the device dropped (or failed while being closed)."""


def _transport_errors() -> tuple[type[BaseException], ...]:
    import paramiko

    return (EOFError, ConnectionError, socket.timeout, paramiko.SSHException)


def _reason(e: BaseException) -> str:
    """A dropped connection's cause in words (paramiko often raises a bare EOFError)."""
    if isinstance(e, EOFError) or str(e) in ("", "Socket is closed"):
        return f"the device closed the connection: {type(e).__name__}" + (f" {e}" if str(e) else "")
    if isinstance(e, (ConnectionResetError, BrokenPipeError)):
        return f"the connection was reset ({e.strerror or e})"
    if isinstance(e, socket.timeout):
        return "the device stopped answering (timeout)"
    return f"{type(e).__name__}: {e}"


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

    def remove(self, remote: str) -> None:
        """Delete a file (best effort after a failed copy: no error if absent)."""
        try:
            os.unlink(remote)
        except FileNotFoundError:
            pass

    def get(self, remote: str, local: str) -> None:
        """Copy a file from the 'device' to this machine."""
        shutil.copyfile(remote, local)

    def close(self) -> None:
        """Nothing to close."""


class SshConnection:
    """A Fabric connection plus upload progress; the steps only use run/put/get/close.

    A connection that drops mid-operation raises `ConnectionLost` (with the host, the operation
    and the cause in words); other errors (an SFTP error status, a local file problem) pass
    through unchanged for the caller to translate.
    """

    def __init__(self, host: Host, fabric_connection: Any) -> None:
        self.host = host
        self.fabric = fabric_connection

    @property
    def where(self) -> str:
        """`name (address:port)` for messages."""
        return f"{self.host.name} ({self.host.address}:{self.host.port})"

    def alive(self) -> bool:
        """True while the SSH transport is up."""
        transport = self.fabric.client.get_transport() if self.fabric.client is not None else None
        return bool(transport is not None and transport.is_active())

    def _lost(self, e: BaseException, doing: str) -> BaseException:
        """`ConnectionLost` if `e` means the connection is gone, else `e` itself (re-raised as is)."""
        if isinstance(e, ConnectionLost):
            return e
        from invoke.exceptions import ThreadException

        if isinstance(e, ThreadException):  # invoke's I/O threads died: look at why
            inner = next((t.value for t in e.exceptions if isinstance(t.value, Exception)), None)
            lost = self._lost(inner, doing) if inner is not None else e
            return lost if isinstance(lost, ConnectionLost) else e
        # paramiko raises a bare OSError("Socket is closed") once the SFTP channel is gone; an
        # OSError without errno is also an SFTP error status (e.g. "Failure"): that one while the
        # transport is still up is the device's answer, not a drop.
        gone = isinstance(e, _transport_errors()) or (
            isinstance(e, OSError) and e.errno is None and (str(e) == "Socket is closed" or not self.alive()))
        if not gone:
            return e
        return ConnectionLost(self._dropped(doing, _reason(e)))

    def _dropped(self, doing: str, why: str) -> str:
        return (f"{self.where}: the SSH connection dropped while {doing} ({why}); re-run the command once the "
                "device is reachable (every step checks the device's state first and continues where this one "
                "stopped)")

    def run(self, command: str, timeout: Optional[float] = None, **_: Any) -> Any:
        """Run `command` on the device; never raises on a non-zero exit (callers check .exited)."""
        # in_stream=False: threads must not compete for this process's stdin.
        try:
            result = self.fabric.run(command, hide=True, warn=True, in_stream=False, timeout=timeout)
        except Exception as e:
            raise self._lost(e, "running a command on the device") from e
        if result.exited == -1 and not self.alive():  # the channel closed without an exit status
            raise ConnectionLost(self._dropped("running a command on the device", "no exit status came back"))
        return result

    def put(self, local: str, remote: str) -> None:
        """Upload over SFTP, reporting progress per chunk."""
        sent = [0]

        def progress(done: int, _total: int) -> None:
            _notify(self.host.name, done - sent[0])
            sent[0] = done

        try:
            self.fabric.sftp().put(local, remote, callback=progress, confirm=True)
        except Exception as e:
            raise self._lost(e, f"uploading {remote}") from e

    def remove(self, remote: str) -> None:
        """Delete a remote file over SFTP (best effort after a failed upload: no error if absent)."""
        try:
            self.fabric.sftp().remove(remote)
        except FileNotFoundError:
            pass
        except Exception as e:
            raise self._lost(e, f"removing {remote}") from e

    def get(self, remote: str, local: str) -> None:
        """Download over SFTP."""
        try:
            self.fabric.sftp().get(remote, local)
        except Exception as e:
            raise self._lost(e, f"downloading {remote}") from e

    def close(self) -> None:
        """Close the SFTP session and the SSH transport, each even when the other fails.

        On a dropped connection closing is where paramiko notices (sending the channel's close
        message raises EOFError); everything is still torn down, then `ConnectionLost` says so.
        """
        failure: Optional[BaseException] = None
        sftp, self.fabric._sftp = getattr(self.fabric, "_sftp", None), None
        client = self.fabric.client
        # fabric's close() skips the client when the transport is already inactive: close it
        # here in every case, so a dead connection never leaks its socket or transport thread.
        for step in (getattr(sftp, "close", None), self.fabric.close, getattr(client, "close", None)):
            if step is None:
                continue
            try:
                step()
            except Exception as e:  # noqa: BLE001 - finish the teardown, report the first failure below
                failure = failure or e
        if failure is not None:
            raise ConnectionLost(f"{self.where}: the SSH connection dropped while it was being closed "
                                 f"({_reason(failure)})") from failure


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
