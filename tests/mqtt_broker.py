"""A real mosquitto broker on 127.0.0.1 for tests and benchmarks (a pytest plugin: `broker` fixture).

`scripts/bootstrap.sh --with-mqtt` installs Debian's mosquitto; the `broker` fixture skips when it
is missing. `Subscriber` is a real paho client that records the JSON payloads it receives.
"""

from __future__ import annotations

import getpass
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import pytest
from support import free_port

START_S = 15.0  # a broker or a subscription that is not up by then is broken, not slow


def mosquitto_binary() -> Optional[str]:
    """mosquitto lives in /usr/sbin, which a non-root PATH often lacks."""
    return shutil.which("mosquitto") or next((p for p in ("/usr/sbin/mosquitto",) if os.access(p, os.X_OK)), None)


class Broker:
    """A mosquitto on 127.0.0.1:port that a test can stop and start again on the same port."""

    def __init__(self, binary: str, root: Path, port: int) -> None:
        self.binary, self.port = binary, port
        self.conf, self.log = root / "mosquitto.conf", root / "mosquitto.log"
        (root / "db").mkdir()
        # `user`: started as root, mosquitto would switch to user mosquitto, which cannot write the
        # (0700) pytest temp folder; as non-root the line has no effect.
        self.conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
                             f"persistence_location {root / 'db'}/\nuser {getpass.getuser()}\n")
        self.proc: Optional[subprocess.Popen[bytes]] = None

    def start(self) -> None:
        """Start and wait until the port accepts connections."""
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)], stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_S
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"mosquitto exited ({self.proc.returncode}): {self.log.read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError as e:
                if time.monotonic() > deadline:
                    tail = self.log.read_text()[-2000:]
                    raise AssertionError(f"mosquitto not listening on {self.port}: {tail}") from e
                time.sleep(0.02)

    def signal(self, sig: int) -> None:
        """Send `sig` to the broker (SIGSTOP: a hung broker whose TCP connections stay open)."""
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self) -> None:
        """SIGTERM (mosquitto saves its persistence file on the way out), then wait."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.send_signal(signal.SIGCONT)  # a test may have left it stopped
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A started mosquitto (stopped after the test)."""
    binary = mosquitto_binary()
    if binary is None:
        pytest.skip("mosquitto not installed: run scripts/bootstrap.sh --with-mqtt")
    b = Broker(binary, tmp_path, free_port())
    b.start()
    yield b
    b.stop()


class Subscriber:
    """A real paho client on `topic` (QoS 1, persistent session) that records JSON payloads in order."""

    def __init__(self, port: int, topic: str) -> None:
        self.messages: List[Dict[str, Any]] = []
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        import paho.mqtt.client as paho

        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="test-subscriber", clean_session=False)
        self.client.reconnect_delay_set(0.05, 0.2)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self.subscribed.wait(START_S), "subscriber got no SUBACK"

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        payload = json.loads(msg.payload)
        with self.lock:
            # QoS 1 is at least once: a broker restarted from its persistence file re-sends (DUP flag) what it
            # had not seen our PUBACK for. A consumer drops such repeats; the publisher's order is what is tested.
            if msg.dup and payload in self.messages:
                return
            self.messages.append(payload)

    def seqs(self) -> List[int]:
        """The `seq` field of every message received so far."""
        with self.lock:
            return [m["seq"] for m in self.messages if "seq" in m]

    def close(self) -> None:
        """Disconnect and stop the network thread."""
        self.client.disconnect()
        self.client.loop_stop()
