"""MQTT publisher (edge_runtime.mqtt) against a real mosquitto broker on 127.0.0.1.

The broker runs with persistence and the test subscriber has a persistent session (clean_session=False,
QoS 1), so messages published while the subscriber is still reconnecting after a broker restart are
kept for it: what arrives is decided by the publisher, not by which client reconnected first.
Tests that start mosquitto are marked `server` and skip when it is not installed
(`scripts/bootstrap.sh --with-mqtt`); the others need only paho-mqtt.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List

import numpy as np
import pytest
from mqtt_broker import Broker, Subscriber, free_port, mosquitto_binary

from edge_runtime.detector import StageTimes
from edge_runtime.mqtt import MqttPublisher, MqttUnavailable, from_config
from edge_runtime.postprocess import Detections
from edge_runtime.realtime import Frame, Result

pytest_plugins = ["mqtt_broker"]

paho = pytest.importorskip("paho.mqtt.client", reason="paho-mqtt missing: pip install 'edge-defect-runtime[mqtt]'")

TOPIC = "edge-defect/test-device/detections"
FAST = {"reconnect_min_s": 0.05, "reconnect_max_s": 0.2}  # backoff short enough for tests to take seconds
WAIT_S = 15.0


def wait_until(cond: Callable[[], bool], timeout: float = WAIT_S, what: str = "condition") -> None:
    """Poll `cond` until true, failing with `what` after `timeout` s (no fixed sleeps)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


@pytest.fixture
def subscriber(broker: Broker) -> Iterator[Subscriber]:
    """A subscriber on the broker's TOPIC."""
    s = Subscriber(broker.port, TOPIC)
    yield s
    s.close()


@pytest.fixture
def publishers() -> Iterator[List[MqttPublisher]]:
    """Publishers a test makes; closed after it even if it fails."""
    made: List[MqttPublisher] = []
    yield made
    for p in made:
        p.close(timeout=1.0)


def make_result(index: int) -> Result:
    """A handled frame with two detections."""
    dets = Detections(np.array([[10, 20, 30, 40], [1.26, 2, 3, 4]], np.float32), np.array([0.9, 0.51], np.float32),
                      np.array([0, 1], np.int64))
    return Result(Frame(index, np.zeros((8, 8, 3), np.uint8), 0.0, 0.0), dets, "int8", 0.01, 0.02,
                  StageTimes(0.001, 0.002, 0.003))


def counter(pub: MqttPublisher, name: str) -> float:
    """One counter's current value."""
    return pub.counters()[name]


# --------------------------------------------------------------------------- with a broker

@pytest.mark.server
def test_results_arrive_in_order_as_json_with_qos1(broker: Broker, subscriber: Subscriber,
                                                    publishers: List[MqttPublisher]) -> None:
    pub = from_config("127.0.0.1", broker.port, TOPIC, "test-device", queue_max=100, class_names=["scratch", "dent"],
                      release="abcdef012345", **FAST)
    publishers.append(pub)
    wait_until(lambda: counter(pub, "mqtt_connected") == 1, what="publisher connected")
    for i in range(30):
        pub(make_result(i))
    wait_until(lambda: len(subscriber.messages) == 30, what="30 messages at the subscriber")
    wait_until(lambda: counter(pub, "mqtt_published_total") == 30, what="30 PUBACKs")
    got = subscriber.messages
    assert [m["frame"] for m in got] == list(range(30))
    first = got[0]
    assert first["variant"] == "int8" and first["release"] == "abcdef012345"
    assert abs(first["time"] - time.time()) < 60
    assert first["detections"] == [{"box": [10.0, 20.0, 30.0, 40.0], "score": 0.9, "class": 0, "name": "scratch"},
                                   {"box": [1.3, 2.0, 3.0, 4.0], "score": 0.51, "class": 1, "name": "dent"}]
    c = pub.counters()
    assert c["mqtt_dropped_total"] == 0 and c["mqtt_queued"] == 0 and c["mqtt_reconnects_total"] == 0
    # close() flushes what is queued while connected
    for i in range(30, 80):
        pub(make_result(i))
    pub.close(timeout=5.0)
    wait_until(lambda: len(subscriber.messages) == 80, what="the flushed messages")
    assert [m["frame"] for m in subscriber.messages] == list(range(80))
    assert pub.counters()["mqtt_published_total"] == 80 and pub.counters()["mqtt_dropped_total"] == 0


@pytest.mark.server
def test_broker_outage_drops_oldest_without_blocking_then_resumes(broker: Broker, subscriber: Subscriber,
                                                                  publishers: List[MqttPublisher]) -> None:
    qmax = 20
    pub = MqttPublisher("127.0.0.1", broker.port, TOPIC, "test-device", queue_max=qmax, keepalive=5, **FAST)
    publishers.append(pub)
    wait_until(lambda: counter(pub, "mqtt_connected") == 1, what="publisher connected")
    for seq in range(5):
        pub.publish({"seq": seq})
    wait_until(lambda: counter(pub, "mqtt_published_total") == 5, what="5 PUBACKs before the outage")
    wait_until(lambda: len(subscriber.seqs()) == 5, what="5 messages before the outage")

    broker.stop()
    wait_until(lambda: counter(pub, "mqtt_connected") == 0, what="publisher to notice the outage")
    durations, max_queued = [], 0.0
    for seq in range(5, 5 + 5 * qmax):
        t0 = time.perf_counter()
        pub.publish({"seq": seq, "detections": []})
        durations.append(time.perf_counter() - t0)
        max_queued = max(max_queued, counter(pub, "mqtt_queued"))
    c = pub.counters()
    assert max_queued <= qmax and c["mqtt_queued"] == qmax
    assert c["mqtt_dropped_total"] == 4 * qmax and c["mqtt_connected"] == 0
    assert max(durations) < 0.05, f"publish() blocked for {max(durations) * 1000:.1f} ms during the outage"

    broker.start()  # same port, same persistence file: the subscriber's session survives
    wait_until(lambda: counter(pub, "mqtt_connected") == 1, what="publisher reconnected")
    survivors = list(range(5 + 4 * qmax, 5 + 5 * qmax))  # the newest qmax; the oldest 4*qmax were dropped
    wait_until(lambda: len(subscriber.seqs()) >= 5 + qmax, what="the queued messages after the restart")
    for seq in range(1000, 1005):
        pub.publish({"seq": seq})
    wait_until(lambda: subscriber.seqs()[-1:] == [1004], what="messages published after the restart")
    assert subscriber.seqs() == list(range(5)) + survivors + list(range(1000, 1005))
    # the subscriber can see the last message before the publisher has its PUBACK
    wait_until(lambda: counter(pub, "mqtt_published_total") == 5 + qmax + 5, what="PUBACKs after the restart")
    c = pub.counters()
    assert c["mqtt_reconnects_total"] >= 1 and c["mqtt_queued"] == 0 and c["mqtt_inflight"] == 0
    assert c["mqtt_dropped_total"] == 4 * qmax


@pytest.mark.server
def test_unacknowledged_messages_are_resent_after_reconnect(broker: Broker, publishers: List[MqttPublisher]) -> None:
    pub = MqttPublisher("127.0.0.1", broker.port, TOPIC, "test-device", queue_max=10, inflight_max=5, **FAST)
    publishers.append(pub)
    wait_until(lambda: counter(pub, "mqtt_connected") == 1, what="publisher connected")
    broker.signal(signal.SIGSTOP)  # hung: the socket accepts the PUBLISHes, no PUBACK comes back
    for seq in range(30):
        pub.publish({"seq": seq})
    wait_until(lambda: counter(pub, "mqtt_inflight") == 5, what="5 messages inside paho, unacknowledged")
    c = pub.counters()
    # which 5 went into paho depends on when the sender thread ran; the books always balance
    assert c["mqtt_queued"] <= 10 and c["mqtt_published_total"] == 0
    assert c["mqtt_queued"] + c["mqtt_inflight"] + c["mqtt_dropped_total"] == 30
    dropped = c["mqtt_dropped_total"]
    broker.signal(signal.SIGKILL)
    broker.stop()
    wait_until(lambda: counter(pub, "mqtt_connected") == 0, what="publisher to notice the dead broker")
    assert counter(pub, "mqtt_inflight") == 5  # kept by paho for the next connection, not dropped
    broker.start()
    wait_until(lambda: counter(pub, "mqtt_published_total") == 30 - dropped, what="re-sent + queued acknowledged")
    c = pub.counters()
    assert c["mqtt_inflight"] == 0 and c["mqtt_queued"] == 0 and c["mqtt_dropped_total"] == dropped
    assert c["mqtt_reconnects_total"] == 1


@pytest.mark.server
def test_broker_down_at_start_connects_when_it_appears(tmp_path: Path, publishers: List[MqttPublisher]) -> None:
    binary = mosquitto_binary()
    if binary is None:
        pytest.skip("mosquitto not installed: run scripts/bootstrap.sh --with-mqtt")
    b = Broker(binary, tmp_path, free_port())
    pub = MqttPublisher("127.0.0.1", b.port, TOPIC, "test-device", queue_max=10, **FAST)  # nothing listens: no raise
    publishers.append(pub)
    for seq in range(3):
        pub.publish({"seq": seq})
    assert pub.counters()["mqtt_connected"] == 0 and pub.counters()["mqtt_queued"] == 3
    b.start()
    try:
        wait_until(lambda: counter(pub, "mqtt_connected") == 1, what="publisher connected to the late broker")
        wait_until(lambda: counter(pub, "mqtt_published_total") == 3, what="the 3 early messages acknowledged")
        sub = Subscriber(b.port, TOPIC)
        try:
            pub.publish({"seq": 3})
            wait_until(lambda: sub.seqs() == [3], what="a message after the connect")
        finally:
            sub.close()
        assert pub.counters()["mqtt_reconnects_total"] == 0  # the first connection is not a reconnect
    finally:
        b.stop()


# --------------------------------------------------------------------------- without a broker

def test_close_returns_promptly_when_broker_is_down() -> None:
    pub = MqttPublisher("127.0.0.1", free_port(), TOPIC, "test-device", queue_max=5, **FAST)
    for seq in range(8):
        pub.publish({"seq": seq})
    t0 = time.monotonic()
    pub.close(timeout=1.0)
    assert time.monotonic() - t0 < 1.5
    c = pub.counters()
    assert c["mqtt_queued"] == 0 and c["mqtt_dropped_total"] == 8  # 3 pushed out + 5 unsent at close
    pub.publish({"seq": 99})  # after close: counted, not raised
    assert pub.counters()["mqtt_dropped_total"] == 9


def test_publish_is_bounded_while_never_connected(publishers: List[MqttPublisher]) -> None:
    pub = MqttPublisher("127.0.0.1", free_port(), TOPIC, "test-device", queue_max=50, **FAST)
    publishers.append(pub)
    for seq in range(1000):
        pub.publish({"seq": seq})
    c = pub.counters()
    assert c["mqtt_queued"] == 50 and c["mqtt_dropped_total"] == 950 and c["mqtt_inflight"] == 0


def test_missing_paho_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "paho.mqtt.client", None)  # import of it now raises ImportError
    with pytest.raises(MqttUnavailable, match=r"pip install 'edge-defect-runtime\[mqtt\]'"):
        MqttPublisher("127.0.0.1", 1883, TOPIC, "test-device")
    assert issubclass(MqttUnavailable, ValueError)


@pytest.mark.parametrize("kwargs, match", [
    ({"topic": "edge-defect/+/detections"}, "wildcards"),
    ({"qos": 3}, "qos"),
    ({"queue_max": 0}, "queue_max"),
    ({"port": 0}, "port"),
    ({"client_id": ""}, "client_id"),
])
def test_bad_settings_are_named(kwargs: Dict[str, Any], match: str) -> None:
    args: Dict[str, Any] = {"host": "127.0.0.1", "port": 1883, "topic": TOPIC, "client_id": "d", **kwargs}
    with pytest.raises(ValueError, match=match):
        MqttPublisher(**args)


def test_importing_the_module_does_not_import_paho() -> None:
    code = "import sys, edge_runtime.mqtt; assert not any(m.startswith('paho') for m in sys.modules), 'paho'"
    subprocess.run([sys.executable, "-c", code], check=True)
