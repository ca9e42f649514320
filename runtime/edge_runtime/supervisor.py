"""Keep `serve` running where systemd is absent: ``python -m edge_runtime supervise --deploy-dir D``.

On Pis and Jetsons systemd supervises the service (the unit the deploy installs); on machines
without it (the fleet's `local` group, containers, the test hosts) this process does the same
job. It runs ``python -m edge_runtime serve --deploy-dir D --release D/releases/<sha12>`` with
the CURRENT release's runtime folder as working directory, re-resolving ``D/current`` at every
(re)start, so a restart after a deploy's switch picks up the new release and its runtime.

Files, all under ``D/service/``:

  supervisor.pid    the supervisor's pid, held under an exclusive ``flock`` while it runs: a
                    second supervisor for the same D refuses to start; a stale file (the lock
                    died with its process) is taken over
  supervisor.json   the state (written atomically on every change): supervisor and child pid,
                    release, restarts, consecutive failures, crash loop, last exit and last
                    error line, the child's last /healthz answer; `fab status` reads it
  serve.log (+ .1)  the child's stdout/stderr and the supervisor's own notes, capped at
                    ``--log-max-mb`` per file (one backup)

Behaviour:

- a child that exits on its own (crash, or even exit 0) is restarted after a back-off that
  doubles from ``--backoff-initial-s`` to ``--backoff-max-s``; it is reset once a child ran
  healthy for ``--stable-after-s``. ``--crash-loop-after`` consecutive failures set
  ``crash_loop`` in the state (it keeps retrying at the capped back-off: an unattended device
  must recover by itself once the camera is back);
- /healthz (address from ``service.json``) is polled: a child that is not healthy within
  ``--start-timeout-s`` of its start, or unhealthy for ``--watchdog-s`` after it was healthy, is
  killed and restarted, like systemd's start timeout and watchdog (0 turns either off);
- SIGHUP restarts the child now (what the deploy sends after a switch), with a fresh back-off;
- SIGTERM/SIGINT stop the child (SIGTERM, then SIGKILL after ``--stop-timeout-s``), remove the
  pidfile and exit 0. A serve left behind by a supervisor that was SIGKILLed is stopped by the
  next supervisor before it starts its own.

Stdlib only (Python 3.8), like the rest of the runtime.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Dict, List, Optional, Tuple

from .fileio import atomic_write_json
from .service_config import CONFIG_NAME, SERVICE_DIR

PID_NAME = "supervisor.pid"
STATE_NAME = "supervisor.json"
LOG_NAME = "serve.log"
RUNTIME_NAME = re.compile(r"\A[0-9a-f]{12}\Z")  # runtime/<sha12>: never a path that climbs out
# The lines of the child's output that tell why it failed (Python's last traceback line matches).
ERROR_LINE = re.compile(r"(?i)\b(error|exception|traceback|fatal|critical)\b")
MAX_LINE = 64 * 1024  # one log line is cut here, so a child without newlines cannot grow memory


class SupervisorError(ValueError):
    """Cannot supervise: another supervisor runs for the folder, or nothing is deployed there."""


@dataclass(frozen=True)
class Options:
    """How the supervisor runs `serve` (the `supervise` command line; defaults for a device)."""

    deploy_dir: Path
    python: str = sys.executable
    log_max_bytes: int = 5 * 1024 * 1024
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    stable_after_s: float = 30.0
    start_timeout_s: float = 120.0
    watchdog_s: float = 60.0
    stop_timeout_s: float = 10.0
    crash_loop_after: int = 5
    poll_s: float = 1.0

    @property
    def service_dir(self) -> Path:
        """``D/service``."""
        return self.deploy_dir / SERVICE_DIR


def service_file(deploy_dir: "Path | str", name: str) -> Path:
    """``<deploy_dir>/service/<name>``."""
    return Path(deploy_dir).absolute() / SERVICE_DIR / name


# --------------------------------------------------------------------------- pidfile lock

def _read_pid(path: Path) -> Optional[int]:
    try:
        return int(path.read_text().strip() or "0") or None
    except (OSError, ValueError):
        return None


class PidLock:
    """``supervisor.pid`` under an exclusive flock for the supervisor's lifetime.

    The kernel drops the lock when its process dies however it dies, so a stale file never
    blocks a new supervisor, and a pid reused by an unrelated process is never mistaken for one.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: Optional[int] = None

    def acquire(self, tries: int = 5) -> None:
        """Take the lock and write our pid, or SupervisorError naming the running supervisor."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        attempt = 0
        while True:
            fd = os.open(str(self.path), os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                attempt += 1
                if attempt < tries:  # a status probe holds a shared lock for a moment
                    time.sleep(0.1)
                    continue
                pid = _read_pid(self.path)
                raise SupervisorError(
                    f"a supervisor (pid {pid or '?'}) already runs for {self.path.parent.parent}; stop it first "
                    f"(python -m edge_runtime supervise --deploy-dir {self.path.parent.parent} --stop)") from None
            try:  # the file we locked must still be the one at `path` (a stopping supervisor unlinks it)
                same = os.fstat(fd).st_ino == os.stat(str(self.path)).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            os.fsync(fd)
            self.fd = fd
            return

    def release(self) -> None:
        """Remove the pidfile and drop the lock."""
        if self.fd is None:
            return
        try:
            if os.fstat(self.fd).st_ino == os.stat(str(self.path)).st_ino:
                os.unlink(str(self.path))
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None


def running_supervisor(deploy_dir: "Path | str") -> Optional[int]:
    """The pid of the supervisor running for `deploy_dir`, or None when none holds the lock."""
    path = service_file(deploy_dir, PID_NAME)
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return _read_pid(path) or -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def stop_supervisor(deploy_dir: "Path | str", timeout_s: float = 30.0) -> Dict[str, Any]:
    """SIGTERM the running supervisor and wait until it has stopped its child and exited."""
    pid = running_supervisor(deploy_dir)
    if pid is None:
        return {"running": False, "stopped": False, "pid": None}
    if pid <= 0:
        raise SupervisorError(f"{service_file(deploy_dir, PID_NAME)} is locked but holds no pid; stop it by hand")
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if running_supervisor(deploy_dir) is None:
            return {"running": True, "stopped": True, "pid": pid}
        time.sleep(0.05)
    raise SupervisorError(f"supervisor pid {pid} did not stop within {timeout_s:g} s; kill -9 it (its serve "
                          "child is then stopped by the next supervisor)")


# --------------------------------------------------------------------------- what to run

def resolve_current(deploy_dir: Path) -> Tuple[str, str, Path]:
    """(release sha12, runtime sha12, runtime folder) of ``D/current``, or SupervisorError."""
    manifest = deploy_dir / "current" / "manifest.json"
    try:
        release = os.path.basename(os.readlink(str(deploy_dir / "current")))
        runtime = json.loads(manifest.read_text())["source"]["runtime"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SupervisorError(f"no usable current release in {deploy_dir} ({e}); deploy one with fab deploy") from None
    folder = deploy_dir / "runtime" / str(runtime)
    if not isinstance(runtime, str) or not RUNTIME_NAME.match(runtime) or not (folder / "edge_runtime").is_dir():
        raise SupervisorError(f"release {release} names runtime {runtime!r}, which is not in {deploy_dir / 'runtime'}; "
                              "redeploy")
    return release, runtime, folder


def serve_command(python: str, deploy_dir: Path, release: str) -> List[str]:
    """The child's argv: `serve` on exactly the release whose runtime it runs from."""
    return [python, "-m", "edge_runtime", "serve", "--deploy-dir", str(deploy_dir),
            "--release", str(deploy_dir / "releases" / release)]


def health_url(deploy_dir: Path) -> Optional[str]:
    """``http://<bind>:<port>/healthz`` from service.json (a wildcard bind is polled on loopback)."""
    try:
        doc = json.loads((deploy_dir / SERVICE_DIR / CONFIG_NAME).read_text())
        bind, port = str(doc.get("http_bind") or "127.0.0.1"), int(doc["http_port"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(bind, bind)
    return f"http://[{host}]:{port}/healthz" if ":" in host else f"http://{host}:{port}/healthz"


def fetch_health(url: str, timeout_s: float = 2.0) -> Tuple[Optional[Dict[str, Any]], str]:
    """(the /healthz JSON document or None, a one-line description of the answer)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 - loopback URL from our config
            body = resp.read()
    except urllib.error.HTTPError as e:  # 503: unhealthy, the body says why
        body = e.read()
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        return None, f"no answer on {url} ({reason})"
    try:
        doc = json.loads(body.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None, f"{url} answered something that is not JSON"
    if not isinstance(doc, dict):
        return None, f"{url} answered something that is not a JSON object"
    return doc, describe_health(doc)


def describe_health(doc: Dict[str, Any]) -> str:
    """`status` plus problems / last error of a /healthz document, in one line."""
    words = [f"/healthz {doc.get('status', '?')}"]
    problems = [str(p) for p in doc.get("problems") or []]
    if problems:
        words.append("; ".join(problems))
    if doc.get("last_error"):
        words.append(f"last error: {doc['last_error']}")
    return ": ".join(words)


def _is_our_serve(pid: int, deploy_dir: Path) -> bool:
    """The process is a `serve` for this deploy dir (checked on /proc where there is one)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    words = [w.decode("utf-8", "replace") for w in argv]
    return "serve" in words and "edge_runtime" in words and str(deploy_dir) in words


# --------------------------------------------------------------------------- the log

class CappedLog:
    """serve.log: appended to, rotated to serve.log.1 when the next line would pass `max_bytes`."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max(1024, max_bytes)
        self.lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f: BinaryIO = open(str(path), "ab")
        self.size = self.f.tell()

    def write(self, line: bytes) -> None:
        """Append one line (rotating first when it would not fit)."""
        with self.lock:
            if self.size and self.size + len(line) > self.max_bytes:
                self.f.close()
                os.replace(str(self.path), str(self.path) + ".1")
                self.f = open(str(self.path), "ab")
                self.size = 0
            self.f.write(line)
            self.f.flush()
            self.size += len(line)

    def note(self, text: str) -> None:
        """A line of the supervisor's own, timestamped."""
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime())
        self.write(f"{stamp} supervisor[{os.getpid()}]: {text}\n".encode("utf-8", "replace"))

    def close(self) -> None:
        """Close the file."""
        with self.lock:
            self.f.close()


# --------------------------------------------------------------------------- the child

@dataclass
class Child:
    """One run of `serve`."""

    proc: "subprocess.Popen[bytes]"
    release: str
    runtime: str
    started: float  # monotonic
    started_at: float  # wall clock
    pump: Optional[threading.Thread] = None
    last_error: str = ""
    last_line: str = ""
    healthy_once: bool = False
    last_ok: Optional[float] = None
    stable: bool = False
    health: Dict[str, Any] = field(default_factory=dict)
    health_text: str = ""
    kill_reason: str = ""  # why the supervisor killed it (start timeout, watchdog); "" = it exited itself
    requested: bool = False  # a stop or restart was asked for: its exit is not a failure


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


class Supervisor:
    """The supervising loop. `run()` returns the exit status (0 after SIGTERM/SIGINT)."""

    def __init__(self, options: Options) -> None:
        self.o = Options(**{**options.__dict__, "deploy_dir": Path(options.deploy_dir).absolute()})
        self.lock = PidLock(self.o.service_dir / PID_NAME)
        self.log: Optional[CappedLog] = None
        self.child: Optional[Child] = None
        self.state = "starting"
        self.started_at = time.time()
        self.generation = 0
        self.restarts = 0
        self.failures = 0
        self.crash_loop = False
        self.backoff = self.o.backoff_initial_s
        self.next_start = 0.0
        self.next_poll = 0.0
        self.last_exit: Optional[Dict[str, Any]] = None
        self.last_error = ""
        self._stop = False
        self._hup = False

    # ------------------------------------------------------------------ state

    def _own_runtime(self) -> str:
        return os.path.basename(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    def state_doc(self) -> Dict[str, Any]:
        """What supervisor.json holds."""
        c = self.child
        wait = max(0.0, self.next_start - time.monotonic()) if c is None and self.state == "backoff" else None
        return {
            "supervisor_pid": os.getpid(), "deploy_dir": str(self.o.deploy_dir),
            "supervisor_runtime": self._own_runtime(),
            "state": self.state, "started_at": self.started_at, "updated_at": time.time(),
            "generation": self.generation, "restarts": self.restarts, "consecutive_failures": self.failures,
            "crash_loop": self.crash_loop,
            "next_start_in_s": round(wait, 3) if wait is not None else None,
            "child_pid": c.proc.pid if c else None, "release": c.release if c else None,
            "runtime": c.runtime if c else None, "child_started_at": c.started_at if c else None,
            "healthy": (c.last_ok is not None and c.health.get("ok") is True) if c else None,
            "health": c.health if c else None,
            "last_exit": self.last_exit,
            "last_exit_code": self.last_exit.get("code") if self.last_exit else None,
            "last_error": self.last_error,
            "options": {"start_timeout_s": self.o.start_timeout_s, "watchdog_s": self.o.watchdog_s,
                        "backoff_initial_s": self.o.backoff_initial_s, "stop_timeout_s": self.o.stop_timeout_s},
        }

    def save(self) -> None:
        """Write supervisor.json atomically."""
        atomic_write_json(self.o.service_dir / STATE_NAME, self.state_doc())

    # ------------------------------------------------------------------ signals

    def _on_stop(self, _signum: int, _frame: Any) -> None:
        self._stop = True

    def _on_hup(self, _signum: int, _frame: Any) -> None:
        self._hup = True

    # ------------------------------------------------------------------ the loop

    def run(self) -> int:
        """Supervise until SIGTERM/SIGINT; 0 then. SupervisorError when another one runs."""
        self.lock.acquire()
        try:
            signal.signal(signal.SIGTERM, self._on_stop)
            signal.signal(signal.SIGINT, self._on_stop)
            signal.signal(signal.SIGHUP, self._on_hup)
            self.log = CappedLog(self.o.service_dir / LOG_NAME, self.o.log_max_bytes)
            self.log.note(f"started for {self.o.deploy_dir}")
            self._reap_orphan()
            self.save()
            while not self._stop:
                self._tick()
                time.sleep(0.05)
        finally:
            try:
                if self.child is not None:
                    self._stop_child("the supervisor is stopping")
                self.state = "stopped"
                self.save()
                if self.log is not None:
                    self.log.note("stopped")
                    self.log.close()
            finally:
                self.lock.release()
        return 0

    def _tick(self) -> None:
        now = time.monotonic()
        if self._hup:
            self._hup = False
            self.generation += 1
            if self.child is not None:
                self._stop_child("restart requested (SIGHUP)")
            else:
                self._note("restart requested (SIGHUP)")
            self.failures, self.crash_loop, self.backoff, self.next_start = 0, False, self.o.backoff_initial_s, now
            self.state = "starting"
            self.save()
        if self.child is None:
            if now >= self.next_start:
                self._start_child()
            return
        code = self.child.proc.poll()
        if code is not None:
            self._child_exited(code)
        elif now >= self.next_poll:
            self.next_poll = now + self.o.poll_s
            self._watch(now)

    def _note(self, text: str) -> None:
        if self.log is not None:
            self.log.note(text)

    def _reap_orphan(self) -> None:
        """Stop a serve that a SIGKILLed supervisor left running (it would hold the port)."""
        try:
            old = json.loads((self.o.service_dir / STATE_NAME).read_text())
            pid = int(old.get("child_pid") or 0)
        except (OSError, ValueError, TypeError):
            return
        if pid <= 0 or not _is_our_serve(pid, self.o.deploy_dir):
            return
        self._note(f"stopping serve pid {pid} left by a previous supervisor")
        _terminate_pid(pid, self.o.stop_timeout_s)

    def _start_child(self) -> None:
        try:
            release, runtime, folder = resolve_current(self.o.deploy_dir)
        except SupervisorError as e:
            self._failed(str(e), None, 0.0, None)
            return
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):  # we are its supervisor, not systemd
            env.pop(name, None)
        try:
            proc = subprocess.Popen(serve_command(self.o.python, self.o.deploy_dir, release), cwd=str(folder),
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    env=env)
        except OSError as e:
            self._failed(f"cannot start {self.o.python}: {e}", None, 0.0, release)
            return
        child = Child(proc, release, runtime, time.monotonic(), time.time())
        child.pump = threading.Thread(target=self._pump, args=(child,), name="serve-log", daemon=True)
        child.pump.start()
        self.child = child
        self.next_poll = time.monotonic() + min(self.o.poll_s, 0.5)
        self.state = "running"
        self._note(f"started serve pid {proc.pid} on release {release} (runtime {runtime})")
        self.save()

    def _pump(self, child: Child) -> None:
        """Copy the child's output into the log, remembering its last error line."""
        assert child.proc.stdout is not None
        for raw in iter(lambda: child.proc.stdout.readline(MAX_LINE), b""):  # type: ignore[union-attr]
            line = raw if raw.endswith(b"\n") else raw + b"\n"
            if self.log is not None:
                self.log.write(line)
            text = line.decode("utf-8", "replace").strip()
            if text:
                child.last_line = text[:500]
                if ERROR_LINE.search(text):
                    child.last_error = text[:500]
        child.proc.stdout.close()  # type: ignore[union-attr]

    def _watch(self, now: float) -> None:
        """Poll /healthz: stable -> reset the back-off; not healthy in time -> kill and restart."""
        c = self.child
        assert c is not None
        url = health_url(self.o.deploy_dir)
        if url is None:  # no config to poll: judge by uptime alone
            if not c.stable and now - c.started >= self.o.stable_after_s:
                self._stable(c)
            return
        doc, text = fetch_health(url, timeout_s=min(2.0, max(0.2, self.o.poll_s)))
        ok = bool(doc and doc.get("ok") is True)
        summary = {k: doc.get(k) for k in ("ok", "status", "release", "fps", "last_error", "problems", "pid")} \
            if doc else {"ok": False, "status": "unreachable", "problems": [text]}
        changed = summary != c.health
        c.health, c.health_text = summary, text
        if ok:
            c.healthy_once, c.last_ok = True, now
            if not c.stable and now - c.started >= self.o.stable_after_s:
                self._stable(c)
                changed = False
        elif not c.healthy_once:
            if self.o.start_timeout_s > 0 and now - c.started > self.o.start_timeout_s:
                self._kill(c, f"not healthy within {self.o.start_timeout_s:g} s of its start ({text})")
                return
        elif self.o.watchdog_s > 0 and c.last_ok is not None and now - c.last_ok > self.o.watchdog_s:
            self._kill(c, f"watchdog: unhealthy for {now - c.last_ok:.0f} s ({text})")
            return
        if changed:
            self.save()

    def _stable(self, c: Child) -> None:
        c.stable = True
        if self.failures or self.crash_loop or self.backoff != self.o.backoff_initial_s:
            self._note(f"serve pid {c.proc.pid} ran healthy for {self.o.stable_after_s:g} s: back-off reset")
        self.failures, self.crash_loop, self.backoff = 0, False, self.o.backoff_initial_s
        self.save()

    def _kill(self, c: Child, reason: str) -> None:
        """Stop a child that is running but not doing its job; its exit counts as a failure."""
        c.kill_reason = reason
        self._note(f"stopping serve pid {c.proc.pid}: {reason}")
        code = _terminate(c.proc, self.o.stop_timeout_s)
        self._child_exited(code)

    def _stop_child(self, why: str) -> None:
        """Stop the child on request (restart, shutdown): not a failure."""
        c = self.child
        assert c is not None
        c.requested = True
        self._note(f"stopping serve pid {c.proc.pid}: {why}")
        code = _terminate(c.proc, self.o.stop_timeout_s)
        if c.pump is not None:
            c.pump.join(2.0)
        ran = time.monotonic() - c.started
        self.last_exit = {"code": code, "at": time.time(), "release": c.release, "ran_s": round(ran, 3),
                          "requested": True, "reason": why}
        self._note(f"serve pid {c.proc.pid} stopped ({self._how(code)}) after {ran:.1f} s")
        self.child = None
        self.save()

    @staticmethod
    def _how(code: int) -> str:
        return f"killed by {_signal_name(code)}" if code < 0 else f"exit {code}"

    def _child_exited(self, code: int) -> None:
        c = self.child
        assert c is not None
        if c.pump is not None:
            c.pump.join(2.0)
        ran = time.monotonic() - c.started
        reason = c.kill_reason or c.last_error or c.last_line or self._how(code)
        self.child = None
        self._failed(reason, code, ran, c.release, pid=c.proc.pid)

    def _failed(self, reason: str, code: Optional[int], ran: float, release: Optional[str],
                pid: Optional[int] = None) -> None:
        """A start that failed or a child that ended by itself: back off, count, restart later."""
        self.restarts += 1
        self.failures += 1
        delay = self.backoff
        self.backoff = min(self.backoff * 2.0, self.o.backoff_max_s)
        self.crash_loop = self.failures >= self.o.crash_loop_after
        self.next_start = time.monotonic() + delay
        self.last_exit = {"code": code, "at": time.time(), "release": release, "ran_s": round(ran, 3),
                          "requested": False, "reason": reason}
        self.last_error = reason
        self.state = "backoff"
        what = f"serve pid {pid} ({self._how(code)}, after {ran:.1f} s)" if pid is not None else "serve did not start"
        loop = ", crash loop" if self.crash_loop else ""
        self._note(f"{what}: {reason}; failure {self.failures}{loop}, restarting in {delay:g} s")
        self.save()


def _terminate(proc: "subprocess.Popen[bytes]", timeout_s: float) -> int:
    """SIGTERM, then SIGKILL after `timeout_s`; the exit status."""
    if proc.poll() is None:
        try:
            proc.terminate()
            return proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


def _terminate_pid(pid: int, timeout_s: float) -> None:
    """The same for a process that is not our child (polled, since we cannot wait for it)."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def main_options(deploy_dir: str, **overrides: Any) -> Options:
    """Options from the command line's values (None = the default)."""
    return Options(Path(deploy_dir), **{k: v for k, v in overrides.items() if v is not None})
