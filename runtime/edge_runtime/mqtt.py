"""MQTT publishing of detections for the device service: a real-time-loop handler that never blocks.

Install with `pip install 'edge-defect-runtime[mqtt]'` (paho-mqtt 2.x; 1.6 works too). paho is imported
only when a publisher is built, so a device without MQTT configured never needs it.

Why its own queue: the handler thread of the real-time loop must not wait for the network, and a broker
outage must not grow memory on a device that runs for months. `publish()` appends to a bounded deque
(when full the OLDEST message is dropped and counted: after an outage the line wants the latest state,
as with the loop's `LatestSlot`), and a sender thread hands messages to paho only while connected.

Delivery: QoS 1 (at least once). The sender keeps at most `inflight_max` messages inside paho (handed
over, no PUBACK yet), and paho's own queue is capped at the same number, so nothing in paho grows either.
Those messages are NOT dropped when the connection drops: paho keeps them and re-sends them (DUP flag)
right after the next CONNACK, and the sender hands over new messages only once they are acknowledged,
which keeps the order. A subscriber may therefore see a message twice after a reconnect, never out of
order. Worst-case memory is `queue_max + inflight_max` encoded messages.

Counters (`counters()`, Prometheus names): mqtt_published_total (PUBACKs received), mqtt_dropped_total
(dropped because the queue was full, refused by paho, or still unsent at `close()`), mqtt_queued (deque
length now), mqtt_inflight (inside paho, unacknowledged), mqtt_connected (0/1), mqtt_reconnects_total
(successful connections after the first).
"""

from __future__ import annotations

import importlib
import json
import logging
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Deque, Dict, Optional, Sequence

if TYPE_CHECKING:  # typing only: the publisher itself needs nothing from the real-time loop
    from .realtime import Result

log = logging.getLogger("edge_runtime.mqtt")

INSTALL_HINT = "pip install 'edge-defect-runtime[mqtt]'"


class MqttUnavailable(ValueError):
    """MQTT is configured but paho-mqtt is not installed."""


def _load_paho() -> Any:
    """paho.mqtt.client, imported on first use (importlib: the module must not import paho at load time)."""
    try:
        return importlib.import_module("paho.mqtt.client")
    except ImportError as e:
        raise MqttUnavailable(f"MQTT is configured but paho-mqtt is not installed ({e}); run: {INSTALL_HINT} "
                              "or remove the MQTT settings") from e


def _failed(reason_code: Any) -> bool:
    """True for a failed CONNACK: paho 2 passes a ReasonCode, paho 1.6 an int."""
    is_failure = getattr(reason_code, "is_failure", None)
    if is_failure is not None:
        return bool(is_failure)
    return int(reason_code) != 0


class MqttPublisher:
    """Publishes JSON messages on one topic with QoS 1 from a bounded drop-oldest queue.

    `publish(payload)` and `publisher(result)` (the real-time-loop handler interface) return at once,
    connected or not; a broker that is down at start or goes away is retried with exponential backoff
    (`reconnect_min_s` doubling up to `reconnect_max_s`). Call `close()` at shutdown.
    """

    def __init__(self, host: str, port: int, topic: str, client_id: str, qos: int = 1, queue_max: int = 1000,
                 keepalive: int = 30, inflight_max: int = 20, reconnect_min_s: float = 1.0,
                 reconnect_max_s: float = 60.0, class_names: Optional[Sequence[str]] = None,
                 release: Optional[str] = None, username: Optional[str] = None,
                 password: Optional[str] = None) -> None:
        if not topic or "+" in topic or "#" in topic:
            raise ValueError(f"MQTT topic '{topic}' must be non-empty and without wildcards (+, #), "
                             "e.g. edge-defect/<device>/detections")
        if qos not in (0, 1, 2):
            raise ValueError(f"MQTT qos {qos} must be 0, 1 or 2")
        if queue_max < 1 or inflight_max < 1:
            raise ValueError(f"MQTT queue_max ({queue_max}) and inflight_max ({inflight_max}) must be >= 1")
        if not 0 < port < 65536:
            raise ValueError(f"MQTT port {port} must be in 1..65535")
        if not client_id:
            # paho would make one up, but a fixed id per device is what lets the broker tell devices apart
            raise ValueError("MQTT client_id must be set (one per device, e.g. the host name)")
        if not 0 < reconnect_min_s <= reconnect_max_s:
            raise ValueError(f"MQTT reconnect delays {reconnect_min_s}..{reconnect_max_s} s: need 0 < min <= max")
        paho = _load_paho()
        self.host, self.port, self.topic, self.qos = host, port, topic, qos
        self.queue_max, self.inflight_max = queue_max, inflight_max
        self.class_names = class_names
        self.release = release

        self._cond = threading.Condition()
        self._queue: Deque[bytes] = deque(maxlen=queue_max)
        self._inflight = 0
        self._published = 0
        self._dropped = 0
        self._reconnects = 0
        self._connects = 0
        self._connected = False
        self._resending = False  # paho re-sends old in-flight messages: hold new ones back to keep the order
        self._closing = False
        self._stopped = False
        self._fail_logged = False
        self._queue_size_rc = getattr(paho, "MQTT_ERR_QUEUE_SIZE", 15)

        api = getattr(paho, "CallbackAPIVersion", None)  # absent in paho 1.x
        kwargs: Dict[str, Any] = {"client_id": client_id, "clean_session": True}
        self._client = paho.Client(api.VERSION2, **kwargs) if api is not None else paho.Client(**kwargs)
        if username is not None:
            self._client.username_pw_set(username, password)
        # Both limits before connecting (paho refuses to change max_inflight on a live connection). The sender
        # never has more than inflight_max inside paho; the queue cap is the guard if that ever slipped.
        self._client.max_inflight_messages_set(inflight_max)
        self._client.max_queued_messages_set(inflight_max)
        self._client.reconnect_delay_set(min_delay=reconnect_min_s, max_delay=reconnect_max_s)  # type: ignore[arg-type]
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish
        self._client.on_connect_fail = self._on_connect_fail
        # connect_async + loop_start: the first attempt runs on paho's thread and is retried there, so a broker
        # that is down when the service starts is an outage like any other, not a failed start.
        self._client.connect_async(host, port, keepalive=keepalive)
        self._client.loop_start()
        self._sender = threading.Thread(target=self._send_loop, name=f"mqtt-sender-{client_id}", daemon=True)
        self._sender.start()

    # ------------------------------------------------------------------ caller side (handler thread)

    def publish(self, payload: Dict[str, Any]) -> None:
        """Queue one message (JSON-encoded here, so later changes to `payload` cannot race the sender).

        Never blocks on the network and never raises on a broker outage; when the queue is full the oldest
        queued message is dropped and counted.
        """
        data = json.dumps(payload, separators=(",", ":")).encode()
        with self._cond:
            if self._closing:
                self._dropped += 1
                return
            if len(self._queue) == self.queue_max:
                self._dropped += 1  # deque(maxlen) discards the oldest on append
            self._queue.append(data)
            self._cond.notify_all()

    def __call__(self, result: "Result") -> None:
        """The real-time-loop handler: one message per handled frame."""
        payload: Dict[str, Any] = {"frame": result.frame.index, "time": round(time.time(), 3),
                                   "variant": result.variant, "detections": result.detections_json(self.class_names)}
        if self.release is not None:
            payload["release"] = self.release
        self.publish(payload)

    def counters(self) -> Dict[str, float]:
        """Prometheus-ready numbers (see the module docstring)."""
        with self._cond:
            return {"mqtt_published_total": float(self._published), "mqtt_dropped_total": float(self._dropped),
                    "mqtt_queued": float(len(self._queue)), "mqtt_inflight": float(self._inflight),
                    "mqtt_connected": float(self._connected), "mqtt_reconnects_total": float(self._reconnects)}

    def close(self, timeout: float = 5.0) -> None:
        """Flush what the broker acknowledges within `timeout` s (only while connected), then disconnect.

        Messages still queued or unacknowledged after that are counted as dropped. Returns within about
        `timeout` seconds even when the broker is down.
        """
        deadline = time.monotonic() + max(timeout, 0.0)
        with self._cond:
            if self._stopped:
                return
            self._closing = True
            self._cond.wait_for(lambda: not self._connected or (not self._queue and not self._inflight),
                                timeout=max(deadline - time.monotonic(), 0.0))
            self._stopped = True
            self._cond.notify_all()
        self._sender.join(max(deadline - time.monotonic(), 0.1))
        self._client.disconnect()
        # loop_stop joins paho's thread, which may be inside a TCP connect to an unreachable host (up to
        # paho's connect_timeout): join it from a helper so close() keeps its deadline; both are daemons.
        stopper = threading.Thread(target=self._client.loop_stop, name="mqtt-loop-stop", daemon=True)
        stopper.start()
        stopper.join(max(deadline - time.monotonic(), 0.1))
        with self._cond:
            lost = len(self._queue) + self._inflight
            self._dropped += lost
            self._queue.clear()
            self._inflight = 0
            self._connected = False
        if lost:
            log.warning("mqtt: closed with %d message(s) unsent to %s:%d (counted as dropped)", lost, self.host,
                        self.port)

    # ------------------------------------------------------------------ sender thread

    def _send_loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stopped or (self._connected and not self._resending
                                                              and self._inflight < self.inflight_max
                                                              and bool(self._queue)))
                if self._stopped:
                    return
                data = self._queue.popleft()
                self._inflight += 1  # before paho.publish: its PUBACK can arrive before publish returns
            try:
                # Returns at once: paho only writes to its socket pair / buffer; for QoS >= 1 an rc NO_CONN
                # still keeps the message (re-sent on reconnect), so only a refusal is a drop.
                rc = self._client.publish(self.topic, data, qos=self.qos).rc
            except (ValueError, OSError) as e:  # payload too large, socket gone mid-write
                log.warning("mqtt: publish to %s failed: %s", self.topic, e)
                rc = self._queue_size_rc
            # QoS 0 is not stored by paho: unless it went out on the socket, it is gone
            if rc == self._queue_size_rc or (self.qos == 0 and rc != 0):
                with self._cond:
                    self._inflight -= 1
                    self._dropped += 1
                    self._cond.notify_all()

    # ------------------------------------------------------------------ paho callbacks (paho's thread)
    # *_rest takes the properties paho 2 adds (and the reason code of on_publish), so paho 1.6 works too.

    def _on_connect(self, _client: Any, _userdata: Any, _flags: Any, reason_code: Any, *_rest: Any) -> None:
        if _failed(reason_code):
            log.warning("mqtt: broker %s:%d refused the connection: %s", self.host, self.port, reason_code)
            return
        with self._cond:
            self._connects += 1
            if self._connects > 1:
                self._reconnects += 1
            self._connected = True
            self._fail_logged = False
            self._resending = self._inflight > 0
            self._cond.notify_all()
        log.info("mqtt: connected to %s:%d (topic %s)", self.host, self.port, self.topic)

    def _on_disconnect(self, _client: Any, _userdata: Any, *_rest: Any) -> None:
        with self._cond:
            was = self._connected
            self._connected = False
            self._cond.notify_all()
            queued = len(self._queue)
        if was and not self._closing:
            log.warning("mqtt: lost broker %s:%d; keeping the newest %d messages, %d queued now", self.host,
                        self.port, self.queue_max, queued)

    def _on_connect_fail(self, _client: Any, _userdata: Any, *_rest: Any) -> None:
        # One line per outage, not one per retry: a device can be offline for hours.
        if not self._fail_logged:
            self._fail_logged = True
            log.warning("mqtt: cannot reach broker %s:%d; retrying with backoff", self.host, self.port)

    def _on_publish(self, _client: Any, _userdata: Any, _mid: int, *_rest: Any) -> None:
        with self._cond:
            self._published += 1
            self._inflight = max(self._inflight - 1, 0)
            if self._inflight == 0:
                self._resending = False
            self._cond.notify_all()


def from_config(host: str, port: int, topic: str, client_id: str, queue_max: int, qos: int = 1,
                keepalive: int = 30, class_names: Optional[Sequence[str]] = None,
                release: Optional[str] = None, **kwargs: Any) -> MqttPublisher:
    """The service's entry point: a started publisher from its MQTT settings (paho imported only here)."""
    return MqttPublisher(host, port, topic, client_id, qos=qos, queue_max=queue_max, keepalive=keepalive,
                         class_names=class_names, release=release, **kwargs)
